"""Static int8 quantization (QDQ or QOperator) with calibration, on ORT's quantizer.

Activation/weight types follow the CPU rather than ORT's default: on x86 without VNNI the
U8S8 kernels sum pairs of products in int16 and saturate, so ``activation_type="auto"``
picks U8S8 there with 7-bit weights available as ``reduce_range``; with VNNI (or on ARM)
saturation cannot happen and U8S8 (x86) / S8S8 (ARM) run at full precision.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import onnx_ir as ir
from pydantic import Field

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import GraphPass, PassConfig
from onnxpipe.graphs.quant_utils import (
    Feeds,
    FeedsReader,
    has_vnni,
    is_x86,
    load_from_ort,
    refuse_quantized,
    save_for_ort,
    scratch_dir,
)

logger = logging.getLogger(__name__)

Method = Literal["minmax", "entropy", "percentile", "distribution"]
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


def resolve_activation_type(setting: str) -> str:
    """``uint8``/``int8`` for ``auto``: U8S8 on x86 (fast VPMADDUBSW/VNNI kernels), else S8S8."""
    if setting != "auto":
        return setting
    return "uint8" if is_x86() else "int8"


class QuantizeStaticPass(GraphPass[QuantizeStaticConfig]):
    """Insert int8 quantization calibrated on ``calibration`` feeds.

    ``calibration_cache`` (a JSON file) stores the activation ranges per method, so that many
    candidates (types, per-channel, exclusions) share one calibration run.

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
        **settings: Any,
    ) -> None:
        super().__init__(config, **settings)
        self.calibration = list(calibration)
        self.calibration_cache = calibration_cache

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
        cached = self.calibration_cache is not None and self.calibration_cache.is_file()
        if not self.calibration and not cached:
            raise PassError(f"{self.name}: static quantization needs calibration data (--calib).")
        nodes, op_types = split_exclude(model, cfg.exclude, self.name)
        activation = resolve_activation_type(cfg.activation_type)
        qtype = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        extra: dict[str, Any] = {"CalibPercentile": cfg.percentile}
        registry = QDQRegistry if cfg.format == "qdq" else QLinearOpsRegistry
        quantizable = sorted(set(registry) - op_types) if op_types else None
        with scratch_dir() as tmp:
            src = save_for_ort(model, tmp / "in.onnx")
            out = tmp / "out.onnx"
            quantize_static(
                str(src),
                str(out),
                FeedsReader(self.calibration),
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
        quant = sum(1 for n in result.graph if n.op_type in ("QuantizeLinear", "QLinearConv"))
        self.metrics = {
            "activation_type": activation,
            "weight_type": "int8",
            "vnni": has_vnni(),
            "excluded_nodes": nodes,
            "excluded_op_types": sorted(op_types),
            "quantize_nodes": quant,
        }
        logger.info("quantize_static: %s, %d quantize nodes", cfg.model_dump(), quant)
        return ir.passes.PassResult(result, modified=True)


def split_exclude(
    model: ir.Model, exclude: Sequence[str], pass_name: str
) -> tuple[list[str], set[str]]:
    """Split ``exclude`` into node names and op types of ``model``; unknown entries raise."""
    names = {n.name for n in model.graph}
    ops = {n.op_type for n in model.graph}
    unknown = [e for e in exclude if e not in names and e not in ops]
    if unknown:
        raise PassError(
            f"{pass_name}: --exclude {', '.join(unknown)}: no node or op type of that name in "
            f"the model. Op types present: {', '.join(sorted(ops))}."
        )
    return [e for e in exclude if e in names], {e for e in exclude if e in ops and e not in names}
