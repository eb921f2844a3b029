"""Static int8 quantization (QDQ or QOperator) with calibration, on ORT's quantizer.

Activation/weight types follow the CPU rather than ORT's default: on x86 without VNNI the
U8S8 GEMM kernels sum pairs of products in int16 and saturate, so there the weights of GEMM
convs and Gemm get per-channel ranges that keep neighbouring pairs under the int16 bound
(``saturation_safe``, see :mod:`onnxpipe.graphs.quant_weights`) while depthwise convs keep
8 bits; with VNNI (or on ARM) saturation cannot happen. Bias correction then folds the mean
shift that weight rounding causes into each quantized Conv/Gemm's int32 bias.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import GraphPass, PassConfig
from onnxpipe.graphs.empirical_bias import MAX_SAMPLES as EMPIRICAL_SAMPLES
from onnxpipe.graphs.empirical_bias import (
    correct_biases_empirically,
    measured_tensors,
    sample_means,
)
from onnxpipe.graphs.quant_exclude import float_index_math, split_exclude
from onnxpipe.graphs.quant_rounding import (
    input_hessians,
    round_weights,
    supported,
    weight_shape,
)
from onnxpipe.graphs.quant_sentinels import drop_sentinel_qdq
from onnxpipe.graphs.quant_utils import (
    Feeds,
    FeedsReader,
    first_samples,
    fixed_batch,
    has_vnni,
    is_x86,
    load_arrays,
    load_from_ort,
    refuse_quantized,
    save_arrays,
    save_for_ort,
    scratch_dir,
    tap_session,
)
from onnxpipe.graphs.quant_weights import (
    bias_targets,
    correct_biases,
    input_means,
    integer_limits,
    keep_float_weights,
    saturation_safe_ranges,
)

logger = logging.getLogger(__name__)

Method = Literal["minmax", "entropy", "percentile", "distribution"]
DISTRIBUTION_REFUSED = (
    "--method distribution is ONNX Runtime's float8 calibration (mean and std per tensor); "
    "for int8 it ranges every tensor symmetrically around 0, which wrecks ReLU6 outputs "
    "(EfficientNet-Lite0: top-1 agreement 0.0 with ORT alone; int8 ranges clipped at "
    "mean +- 8 std of its statistics: 0.79, minmax 0.82). Use --method minmax, percentile or "
    "entropy"
)
_METHODS = {
    "minmax": "MinMax",
    "entropy": "Entropy",
    "percentile": "Percentile",
    "distribution": "Distribution",
}


class QuantizeStaticConfig(PassConfig):
    """Settings of :class:`QuantizeStaticPass`."""

    format: Literal["qdq", "qop"] = Field(default="qdq", description="QDQ nodes or QOperator ops")
    activation_type: Literal["auto", "uint8", "int8"] = Field(
        default="auto", description="activation int type; auto: uint8 on x86, int8 on ARM"
    )
    per_channel: bool = Field(default=True, description="one weight scale per output channel")
    reduce_range: bool = Field(
        default=False, description="7-bit weights: no int16 saturation on x86 CPUs without VNNI"
    )
    method: Method = Field(default="minmax", description="calibration method for activation ranges")
    percentile: float = Field(
        default=99.999, description="percentile kept by the percentile method"
    )
    exclude: tuple[str, ...] = Field(
        default=(), description="node names or op types kept in float (e.g. Gemm, node_Conv_12)"
    )
    include: tuple[str, ...] = Field(
        default=(), description="quantize only these nodes (empty: every quantizable node)"
    )
    saturation_safe: bool | None = Field(
        default=None,
        description="weight ranges free of int16 saturation in U8S8 GEMMs; "
        "None: on x86 CPUs without VNNI",
    )
    bias_correction: bool = Field(
        default=True,
        description="fold the output mean shift of weight rounding into int32 biases (QDQ)",
    )
    empirical_bias: bool = Field(
        default=True,
        description="then fold the output mean shift measured layer by layer on calibration "
        "data (what activation quantization adds) into int32 biases (QDQ)",
    )
    rounding: Literal["nearest", "gptq"] = Field(
        default="gptq",
        description="int8 weight rounding: to nearest, or error-compensating on calibration "
        "inputs (GPTQ; QDQ)",
    )


def resolve_activation_type(setting: str) -> str:
    """``uint8``/``int8`` for ``auto``: U8S8 on x86 (fast VPMADDUBSW/VNNI kernels), else S8S8."""
    if setting != "auto":
        return setting
    return "uint8" if is_x86() else "int8"


class QuantizeStaticPass(GraphPass[QuantizeStaticConfig]):
    """Insert int8 quantization calibrated on ``calibration`` feeds.

    ``calibration_cache`` (a JSON file) stores the activation ranges of one calibration
    method, so that many candidates (types, per-channel, exclusions) share one calibration
    run. ``statistics_cache`` (a path whose suffix is replaced) stores what does not depend on
    the method: GPTQ Hessians, input and output means; by default it sits beside
    ``calibration_cache``. Conv/Gemm nodes left in float
    get their own per-axis DequantizeLinear input so that ORT does not quantize them at
    session start (:func:`~onnxpipe.graphs.quant_weights.keep_float_weights`).

    Refuses: a model that is quantized already, no calibration data, ``exclude`` entries
    that name neither a node nor an op type of the model.
    """

    name = "quantize_static"
    config_class = QuantizeStaticConfig
    modifies_in_place = False

    def __init__(
        self,
        config: QuantizeStaticConfig | None = None,
        *,
        calibration: Sequence[Feeds] = (),
        calibration_cache: Path | None = None,
        statistics_cache: Path | None = None,
        **settings: Any,
    ) -> None:
        super().__init__(config, **settings)
        self.calibration = list(calibration)
        self.calibration_cache = calibration_cache
        self.statistics_cache = statistics_cache or calibration_cache

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Return the quantized model (a new object)."""
        from onnxruntime.quantization import (  # noqa: PLC0415
            CalibrationMethod,
            QuantFormat,
            QuantType,
            quantize_static,
        )
        from onnxruntime.quantization.registry import (  # noqa: PLC0415
            QDQRegistry,
            QLinearOpsRegistry,
        )

        refuse_quantized(model, self.name)
        cfg = self.config
        if cfg.method == "distribution":
            raise PassError(f"{self.name}: {DISTRIBUTION_REFUSED}.")
        cached = self.calibration_cache is not None and self.calibration_cache.is_file()
        if not self.calibration and not cached:
            raise PassError(f"{self.name}: static quantization needs calibration data (--calib).")
        nodes, op_types = split_exclude(model, cfg.exclude, self.name)
        # ORT gives a quantized Softmax output the fixed scale 1/256: probabilities under
        # 0.002 become 0 (most of a 1000-class output). A final Softmax costs nothing in float.
        final_softmax = [
            name
            for n in model.graph
            if n.op_type == "Softmax" and n.name not in nodes
            for name in _to_output(n)
        ]
        index_math = [n for n in float_index_math(model) if n not in nodes]
        nodes = [*nodes, *final_softmax, *index_math]
        activation = resolve_activation_type(cfg.activation_type)
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        extra: dict[str, Any] = {"CalibPercentile": cfg.percentile}
        safe = _saturation_safe(cfg)
        if safe:
            extra["TensorQuantOverrides"] = _range_overrides(model, cfg.per_channel)
        registry = QDQRegistry if cfg.format == "qdq" else QLinearOpsRegistry
        quantizable = sorted(set(registry) - op_types) if op_types else None
        with scratch_dir() as tmp:
            src = save_for_ort(model, tmp / "in.onnx")
            out = tmp / "out.onnx"
            quantize_static(
                str(src),
                str(out),
                FeedsReader(self.calibration, fixed_batch(model)),
                quant_format=QuantFormat.QDQ if cfg.format == "qdq" else QuantFormat.QOperator,
                op_types_to_quantize=quantizable,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                activation_type=qtype[activation],
                weight_type=QuantType.QInt8,
                nodes_to_exclude=nodes,
                nodes_to_quantize=list(cfg.include) or None,
                calibrate_method=getattr(CalibrationMethod, _METHODS[cfg.method]),
                calibration_cache_path=self.calibration_cache,
                extra_options=extra,
            )
            result = load_from_ort(out)
        sentinels = drop_sentinel_qdq(result)  # masks of float min / -inf: scale 1e36 or inf
        rounded = self._round_weights(result, model, safe) if cfg.rounding == "gptq" else []
        corrected = self._correct_biases(result, model) if cfg.bias_correction else []
        kept_float = keep_float_weights(result)
        measured = self.correct_empirically(result, model) if cfg.empirical_bias else []
        quant = sum(1 for n in result.graph if n.op_type in ("QuantizeLinear", "QLinearConv"))
        self.metrics = {
            "activation_type": activation,
            "weight_type": "int8",
            "vnni": has_vnni(),
            "excluded_nodes": [n for n in nodes if n not in {*final_softmax, *index_math}],
            "excluded_op_types": sorted(op_types),
            **({"float_output_softmax": final_softmax} if final_softmax else {}),
            **({"float_index_math": index_math} if index_math else {}),
            "float_sentinel_ranges": len(sentinels),
            "quantize_nodes": quant,
            "saturation_safe_weights": safe,
            # what was applied: GPTQ and the empirical correction work on QDQ weights only
            "rounding": cfg.rounding if cfg.format == "qdq" else "nearest",
            "gptq_rounded_nodes": len(rounded),
            "bias_corrected_nodes": len(corrected),
            "empirical_bias_nodes": len(measured),
            "empirical_bias": bool(measured),
            "float_weight_nodes": kept_float,
        }
        logger.info("quantize_static: %s, %d quantize nodes", cfg.model_dump(), quant)
        return ir.passes.PassResult(result, modified=True)

    def _round_weights(self, result: ir.Model, model: ir.Model, safe: bool) -> list[str]:
        """GPTQ rounding of every quantized Conv/Gemm/MatMul weight (H cached per node)."""
        floats = {n.name: n for n in model.graph if supported(n)}
        targets = [
            floats[n.name]
            for n in result.graph
            if n.name in floats
            and len(n.inputs) > 1
            and (dq := n.inputs[1].producer() if n.inputs[1] is not None else None) is not None
            and dq.op_type == "DequantizeLinear"
        ]
        if not targets or not self.calibration:
            return []
        by_name = {n.name or "": n for n in targets}
        hessians = self._statistics(
            ".hessians.npz",
            list(by_name),
            lambda names: input_hessians(model, self.calibration, [by_name[n] for n in names]),
            np.float32,
        )
        limits = {
            n.name or "": integer_limits(n, weight_shape(n), safe, self.config.reduce_range)
            for n in targets
        }
        return round_weights(result, model, hessians, limits)

    def _statistics(
        self,
        suffix: str,
        keys: Sequence[str],
        compute: Callable[[list[str]], dict[str, np.ndarray]],
        stored_dtype: type | None = None,
    ) -> dict[str, np.ndarray]:
        """Float statistics of the calibration data by key, cached (``suffix``).

        Candidates of ``--auto`` share them: only keys not cached yet are computed.
        """
        cache = self.statistics_cache.with_suffix(suffix) if self.statistics_cache else None
        values = load_arrays(cache)
        missing = [k for k in keys if k not in values]
        if missing:
            computed = compute(missing)
            if stored_dtype is not None:
                # use what the cache keeps, so a fresh build equals one that reads the cache
                computed = {k: v.astype(stored_dtype) for k, v in computed.items()}
            values.update(computed)
            if cache is not None:
                save_arrays(cache, values)
        return values

    def _correct_biases(self, result: ir.Model, model: ir.Model) -> list[str]:
        """Bias correction with input means measured on the calibration feeds (cached)."""
        floats = {n.name: n for n in model.graph}
        tensors = sorted(
            {
                v.name
                for n in bias_targets(result)
                if n.name in floats and (v := floats[n.name].inputs[0]) is not None and v.name
            }
        )
        if not tensors or not self.calibration:
            return []
        means = self._statistics(
            ".means.npz", tensors, lambda names: input_means(model, self.calibration, names)
        )
        done = correct_biases(result, model, means)
        logger.info("quantize_static: bias correction on %d nodes", len(done))
        return done

    def correct_empirically(self, result: ir.Model, model: ir.Model) -> list[str]:
        """Empirical bias correction of ``result`` (quantized from ``model``), in place.

        Measured on the first calibration samples; the float means are cached. Returns the
        corrected nodes (see :mod:`onnxpipe.graphs.empirical_bias`).
        """
        targets = measured_tensors(result, model)
        if not targets or not self.calibration:
            return []
        feeds = first_samples(self.calibration, EMPIRICAL_SAMPLES, fixed_batch(model))
        means = self._statistics(
            ".output-means.npz",
            sorted({t.reference for t in targets}),
            lambda names: sample_means(tap_session(model, names), names, feeds),
        )
        done = correct_biases_empirically(result, feeds, means, targets)
        logger.info("quantize_static: empirical bias correction on %d nodes", len(done))
        return done


def _saturation_safe(cfg: QuantizeStaticConfig) -> bool:
    """Whether to bound weight pairs: asked for, or auto on x86 without VNNI (not with 7 bits)."""
    if cfg.reduce_range:
        return False
    if cfg.saturation_safe is not None:
        return cfg.saturation_safe
    return is_x86() and not has_vnni()


def _range_overrides(model: ir.Model, per_channel: bool) -> dict[str, list[dict[str, Any]]]:
    """ORT ``TensorQuantOverrides`` with saturation-safe ranges (per channel needs ``axis``)."""
    out = {}
    for name, (axis, ranges) in saturation_safe_ranges(model).items():
        if per_channel:
            out[name] = [{"axis": axis, "rmin": -r, "rmax": r} for r in ranges]
        else:
            out[name] = [{"rmin": -max(ranges), "rmax": max(ranges)}]
    return out


_SHAPE_ONLY = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose"})


def _to_output(softmax: ir.Node) -> list[str]:
    """``softmax`` and the shape-only nodes that take its output to a graph output, by name.

    Empty when the output goes anywhere else (a Softmax inside attention is quantized as
    usual). A ``reshape(-1, 1000, 1, 1)`` after the final Softmax would otherwise carry the
    quantized probabilities (96.5% of EfficientNet-Lite0's became exactly 0). Unnamed nodes
    of the chain are named, so that ORT can keep them float.
    """
    chain = [softmax]
    node = softmax
    while not node.outputs[0].is_graph_output():
        uses = list(node.outputs[0].uses())
        if len(uses) != 1 or uses[0].node.op_type not in _SHAPE_ONLY or uses[0].idx != 0:
            return []
        node = uses[0].node
        chain.append(node)
    taken = {n.name for n in softmax.graph or ()}
    for index, node in enumerate(chain):
        if not node.name:  # the opset upgrade of a zoo model adds an unnamed Reshape here
            name = f"{node.op_type}_float_output_{index}"
            while name in taken:
                name += "_"
            node.name = name  # a name changes nothing it computes; ORT excludes nodes by name
            taken.add(name)
    return [n.name or "" for n in chain]
