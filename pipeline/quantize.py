"""``onnxpipe quantize``: a quantized bundle from a float one, behind an accuracy gate.

Modes: ``static`` (int8 with calibration; ``--auto`` searches configurations and keeps the
most sensitive nodes in float until the gate holds), ``dynamic`` (int8 weights, run-time
activations; MatMul/Gemm models), ``int4`` (MatMulNBits weight-only) and ``fp16``. Every
result must run on ORT's CPU EP with every op on a CPU kernel before it is written.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import onnx_ir as ir
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

from onnxpipe.data import Feeds, check_table_ids, load_data
from onnxpipe.errors import InputError, PassError, invalid_settings
from onnxpipe.gate import Gate
from onnxpipe.graphs.base import GraphPass
from onnxpipe.graphs.quant_utils import (
    quantized_nodes,
    refuse_cpu_fused,
    refuse_float16,
    refuse_quantized,
)
from onnxpipe.modelio import MODEL_FILE
from onnxpipe.option_scope import read_settings, refuse_unread
from onnxpipe.runtime import ORT_ERRORS, SessionOptions, make_session
from onnxpipe.transform import TransformContext, derive_bundle

logger = logging.getLogger(__name__)


class QuantizeSettings(BaseModel):
    """The ``quantize`` step's settings, as recorded in the manifest."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["static", "dynamic", "int4", "fp16"] = Field(description="quantization mode")
    calib: str | None = Field(
        default=None,
        description="calibration DATA (static; dynamic: smoothing statistics; int4: GPTQ rounding)",
    )
    method: Literal["minmax", "entropy", "percentile", "distribution"] = Field(
        default="minmax", description="calibration method (static)"
    )
    per_channel: bool = Field(
        default=True,
        description="per-channel weights (static and dynamic; --per-tensor turns it off)",
    )
    smooth_alpha: float = Field(
        default=0.7,
        ge=0.0,
        le=1.0,
        description="dynamic: SmoothQuant strength, statistics from --calib or --eval (0: off)",
    )
    rounding: Literal["gptq", "nearest"] = Field(
        default="gptq",
        description="weight rounding (static QDQ int8; int4 with --calib): error-compensating "
        "(GPTQ) or nearest",
    )
    empirical_bias: bool = Field(
        default=True,
        description="static QDQ: bias correction measured layer by layer on the calibration data",
    )
    format: Literal["qdq", "qop"] = Field(default="qdq", description="QDQ or QOperator (static)")
    activation_type: Literal["auto", "uint8", "int8"] = Field(
        default="auto",
        description="static: activation int type; auto: uint8 (U8S8) on x86, int8 (S8S8) "
        "elsewhere; int8 for an ARM target quantized on x86",
    )
    exclude: tuple[str, ...] = Field(default=(), description="node names or op types kept in float")
    auto: bool = Field(
        default=False, description="search configurations and float fallbacks (static)"
    )
    gates: tuple[str, ...] = Field(default=(), description="accuracy gates against the input model")

    @model_validator(mode="after")
    def _check(self) -> QuantizeSettings:
        # an option the mode would ignore is refused, even at its default value: it would
        # read in the manifest as if it applied
        given = self.model_fields_set
        refuse_unread(given, _APPLIES, self.mode, "--mode", _FLAGS)
        if self.format == "qop" and {"rounding", "empirical_bias"} & given:
            raise ValueError(
                "--rounding and --no-empirical-bias apply to --format qdq only (QOperator "
                "weights round to nearest, with no bias correction)"
            )
        searched = sorted({"method", "per_channel", "format"} & given) if self.auto else []
        if searched:
            flags = ", ".join(_FLAGS.get(n, f"--{n.replace('_', '-')}") for n in searched)
            raise ValueError(
                f"--auto searches the calibration method, weight scales and format itself; drop "
                f"{flags} (the chosen candidate's flags are in the step's metrics)"
            )
        if self.mode == "int4" and not self.calib and "rounding" in given:
            if self.rounding == "gptq":
                raise ValueError("--mode int4 --rounding gptq needs --calib DATA to round on")
        if self.mode == "static" and not self.calib:
            raise ValueError("--mode static needs --calib DATA (samples like the real inputs)")
        if self.auto and not self.gates:
            raise ValueError("--auto needs a --gate to search for, e.g. --gate top1>=0.97")
        if self.method == "distribution":
            from onnxpipe.graphs.quantize_static import DISTRIBUTION_REFUSED  # noqa: PLC0415

            raise ValueError(DISTRIBUTION_REFUSED)
        return self

    @model_serializer(mode="wrap")
    def _applied(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """The settings the mode uses: what the manifest records as applied."""
        applied = read_settings(handler(self), _APPLIES, self.mode)
        if self.mode == "int4" and not self.calib:
            applied["rounding"] = "nearest"  # GPTQ rounds on calibration data only
        if self.mode == "static" and self.format == "qop":
            applied.update(rounding="nearest", empirical_bias=False)  # QDQ weights only
        if self.auto:  # searched: the chosen candidate is in the step's metrics
            for name in ("method", "per_channel", "format"):
                applied.pop(name, None)
        return applied


_APPLIES = {
    "calib": ("static", "dynamic", "int4"),
    "method": ("static",),
    "per_channel": ("static", "dynamic"),
    "smooth_alpha": ("dynamic",),
    "rounding": ("static", "int4"),
    "empirical_bias": ("static",),
    "format": ("static",),
    "activation_type": ("static",),
    "auto": ("static",),
}
"""The modes that use each setting; the others refuse it and leave it out of the record."""
_FLAGS = {"per_channel": "--per-channel/--per-tensor", "empirical_bias": "--no-empirical-bias"}


def settings_from(**values: Any) -> QuantizeSettings:
    """Validated settings; a bad combination is an :class:`InputError` (exit 2).

    ``None`` values are options not given: they take the defaults of the modes that use them.
    """
    values = {k: v for k, v in values.items() if v is not None}
    try:
        return QuantizeSettings(**values)
    except ValueError as e:  # pydantic's ValidationError
        raise invalid_settings("quantize", e) from e


def quantize_bundle(
    bundle: Path,
    out: Path,
    settings: QuantizeSettings,
    eval_data: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Quantize ``bundle`` into the new bundle ``out``; returns its manifest.

    Raises:
        InputError: bad data, a quantized input model, a result without CPU kernels.
        GateFailed: the result misses a gate (nothing written at ``out``).
    """
    gates = [Gate.parse(g) for g in settings.gates]
    settings = without_statistics(settings, eval_data is not None)

    def transform(model: ir.Model, ctx: TransformContext) -> tuple[ir.Model, dict[str, Any]]:
        refuse_quantized(model, f"quantize --mode {settings.mode}")
        refuse_float16(model, f"quantize --mode {settings.mode}")
        refuse_cpu_fused(model, f"quantize --mode {settings.mode}", "Quantize")
        result, metrics = _quantize(model, ctx, settings, gates, eval_data is not None)
        refuse_unchanged(result, settings)
        check_cpu_kernels(ctx.save(result, "ep-check"), ctx)
        return result, metrics

    return derive_bundle(
        bundle,
        out,
        "quantize",
        settings,
        transform,
        gates,
        eval_data,
        overwrite,
    )


def refuse_unchanged(result: ir.Model, settings: QuantizeSettings) -> None:
    """Raise :class:`PassError` when ``result`` holds nothing quantized (all stayed float).

    ``--exclude`` naming every node the mode quantizes (``--exclude Gemm`` on an MLP) gave a
    "quantize" step holding the float model unchanged, with exit 0.
    """
    if settings.mode == "fp16":  # a float16 weight, or a Cast into float16 compute
        done = any(v.dtype == ir.DataType.FLOAT16 for v in result.graph.initializers.values())
        done = done or any(
            n.op_type == "Cast" and n.attributes.get_int("to") == ir.DataType.FLOAT16
            for n in result.graph
        )
    else:
        done = bool(quantized_nodes(result)) or any(
            n.op_type == "GatherBlockQuantized" for n in result.graph
        )
    if done:
        return
    ops = ", ".join(sorted({n.op_type for n in result.graph})) or "none"
    why = (
        f"with --exclude {' '.join(settings.exclude)}, every node it would convert stays float"
        if settings.exclude
        else f"the model has no node it converts (ops: {ops})"
    )
    raise PassError(
        f"quantize --mode {settings.mode}: nothing to quantize: {why}, so the result would be "
        "the input model. Exclude fewer nodes, or keep the float bundle as it is."
    )


def without_statistics(settings: QuantizeSettings, eval_given: bool) -> QuantizeSettings:
    """Dynamic mode with no data to smooth on: smoothing is off, and recorded so (0).

    A ``--smooth-alpha`` the user gave then does nothing, so it is an InputError.
    """
    if settings.mode != "dynamic" or settings.calib or eval_given or not settings.smooth_alpha:
        return settings
    if "smooth_alpha" in settings.model_fields_set:
        raise InputError(
            f"--smooth-alpha {settings.smooth_alpha}: smoothing needs activation statistics; "
            "give --calib DATA (samples like the real inputs), or --eval DATA, or drop it."
        )
    return settings.model_copy(update={"smooth_alpha": 0.0})


def _quantize(
    model: ir.Model,
    ctx: TransformContext,
    s: QuantizeSettings,
    gates: Sequence[Gate],
    eval_given: bool,
) -> tuple[ir.Model, dict[str, Any]]:
    from onnxpipe.graphs.quantize_preprocess import QuantizePreprocessPass  # noqa: PLC0415

    if s.mode == "fp16":
        from onnxpipe.graphs.quantize_fp16 import QuantizeFp16Pass  # noqa: PLC0415

        return _apply(QuantizeFp16Pass(exclude=s.exclude), model)
    if s.mode == "int4":
        from onnxpipe.graphs.quantize_int4 import QuantizeInt4Pass  # noqa: PLC0415

        # GPTQ rounding needs calibration data; without --calib the values round to nearest.
        calib = _calibration(s.calib, ctx) if s.calib else []
        int4 = QuantizeInt4Pass(exclude=s.exclude, rounding=s.rounding, calibration=calib)
        return _apply(int4, model)
    from onnxpipe.graphs.quant_exclude import fused_add_names  # noqa: PLC0415

    pre = QuantizePreprocessPass()
    model, before = pre(model).model, model
    s = s.model_copy(update={"exclude": fused_add_names(before, model, s.exclude)})
    if s.mode == "dynamic":
        from onnxpipe.quant_dynamic import dynamic_int8  # noqa: PLC0415

        statistics = _calibration(s.calib, ctx) if s.calib else None
        result, metrics = dynamic_int8(model, ctx, s, gates, eval_given, statistics)
        return result, {"preprocess": pre.metrics, **metrics}
    assert s.calib is not None
    calib = _calibration(s.calib, ctx)
    from onnxpipe.graphs.quantize_static import QuantizeStaticPass  # noqa: PLC0415

    if s.auto:
        from onnxpipe.quant_search import auto_static  # noqa: PLC0415

        result, metrics = auto_static(model, ctx, calib, gates, s)
    else:
        from onnxpipe.quant_search import caches  # noqa: PLC0415

        static = QuantizeStaticPass(
            calibration=calib,
            **caches(ctx, s.method),
            format=s.format,
            per_channel=s.per_channel,
            activation_type=s.activation_type,
            method=s.method,
            exclude=s.exclude,
            rounding=s.rounding,
            empirical_bias=s.empirical_bias,
        )
        result, metrics = _apply(static, model)
    return result, {"preprocess": pre.metrics, "calibration_batches": len(calib), **metrics}


def _calibration(data: str, ctx: TransformContext) -> list[Feeds]:
    """``--calib`` feeds, checked against the inputs and run once through the input model.

    A sample the model cannot run (a token id past the vocabulary) is exit 2 naming the
    data, not an error from deep inside a calibrator.
    """
    feeds = load_data(data, ctx.inputs)
    check_table_ids(feeds, ctx.bundle / MODEL_FILE, data)
    ctx.outputs_on(feeds, data, keep=False)  # a check: a large set's outputs are not held
    return feeds


def _apply(graph_pass: GraphPass[Any], model: ir.Model) -> tuple[ir.Model, dict[str, Any]]:
    result = graph_pass(model).model
    return result, {graph_pass.name: graph_pass.metrics}


def check_cpu_kernels(path: Path, ctx: TransformContext) -> None:
    """Refuse a result ORT's CPU EP cannot run: an op without a CPU kernel fails here.

    The CPU EP has no fallback, so a session that builds and runs one eval batch proves
    every node found a kernel.
    """
    try:
        session = make_session(path, SessionOptions(ep="cpu"))
        session.run(None, ctx.eval_feeds[0])
    except ORT_ERRORS as e:
        raise PassError(
            f"quantize: the result has ops without an ONNX Runtime CPU kernel ({e}). Keep "
            "the offending nodes in float with --exclude NODE_OR_OP_TYPE."
        ) from e


def with_preprocess_all(
    preprocess: str | None, calib: str | None, eval_data: str | None
) -> tuple[str | None, str | None]:
    """``calib`` and ``eval_data`` with ``--preprocess SPEC`` attached where it applies.

    Raises:
        InputError: ``--preprocess`` would apply to neither (it was ignored, exit 0).
    """
    attached = with_preprocess(calib, preprocess), with_preprocess(eval_data, preprocess)
    if preprocess is not None and attached == (calib, eval_data):
        raise InputError(
            f"--preprocess {preprocess}: neither --calib nor --eval is a folder of images "
            "without its own spec (DIR?SPEC), so it would apply to nothing; arrays are fed as "
            "they are. Drop --preprocess, or give a folder of images."
        )
    return attached


def with_preprocess(data: str | None, preprocess: str | None) -> str | None:
    """Attach ``--preprocess SPEC`` to a DATA directory of images (``DIR?SPEC``)."""
    from onnxpipe.images import ImageSpec, image_files  # noqa: PLC0415

    if preprocess is None:
        return data
    ImageSpec.parse(preprocess)  # a bad spec is exit 2 even when no image dir uses it
    if data is None or "?" in data or not Path(data).is_dir() or not image_files(Path(data)):
        return data
    return f"{data}?{preprocess}"
