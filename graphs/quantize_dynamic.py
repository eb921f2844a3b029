"""Dynamic int8 quantization for MatMul/Gemm/attention models, on ORT's quantizer.

Weights become int8 (per output channel by default), activations are quantized at run time
(DynamicQuantizeLinear + MatMulInteger, or DynamicQuantizeMatMul after ORT's fusion).

Conv is never quantized dynamically: ORT's ConvInteger has no fast CPU kernel (measured on
EfficientNet-Lite0: 20x slower than fp32 with 42% top-1 agreement). Conv nodes stay float
and the pass says so; when Conv holds most of the weights the pass refuses and points to
static mode, since dynamic quantization would then buy neither size nor speed.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import GraphPass, PassConfig
from onnxpipe.graphs.quant_utils import load_from_ort, refuse_quantized, save_for_ort, scratch_dir
from onnxpipe.graphs.quantize_static import split_exclude

logger = logging.getLogger(__name__)

DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather")


class QuantizeDynamicConfig(PassConfig):
    """Settings of :class:`QuantizeDynamicPass`."""

    per_channel: bool = Field(default=True, description="one weight scale per output channel")
    reduce_range: bool = Field(default=False, description="7-bit weights (x86 without VNNI)")
    exclude: tuple[str, ...] = Field(default=(), description="node names or op types kept in float")
    max_conv_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="refuse when Conv holds more than this share of the weight parameters",
    )


class QuantizeDynamicPass(GraphPass[QuantizeDynamicConfig]):
    """Int8 weights and run-time-quantized activations for MatMul/Gemm/attention.

    Refuses: a quantized model; a model without MatMul/Gemm weights; a Conv-heavy model
    (more than ``max_conv_share`` of the parameters in Conv), with a pointer to static mode.
    """

    name = "quantize_dynamic"
    config_class = QuantizeDynamicConfig
    modifies_in_place = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Return the quantized model (a new object)."""
        from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

        refuse_quantized(model, self.name)
        cfg = self.config
        nodes, op_types = split_exclude(model, cfg.exclude, self.name)
        params = _weight_params(model)
        total = sum(params.values()) or 1
        conv_share = params.get("Conv", 0) / total
        dense = sum(params.get(op, 0) for op in DYNAMIC_OPS if op != "Gather")
        if not dense:
            raise PassError(
                f"{self.name}: the model has no MatMul/Gemm weights to quantize dynamically "
                f"(weights by op: {params}). Use --mode static with --calib DATA."
            )
        if conv_share > cfg.max_conv_share:
            raise PassError(
                f"{self.name}: {conv_share:.0%} of the weights are in Conv nodes. Dynamic mode "
                "would leave them in float (ORT's ConvInteger measured 20x slower than fp32 "
                "Conv with 42% top-1 agreement on EfficientNet-Lite0), so it buys neither size "
                "nor speed here. Use --mode static --calib DATA (or --auto) instead."
            )
        ops = [op for op in DYNAMIC_OPS if op not in op_types]
        with scratch_dir() as tmp:
            src = save_for_ort(model, tmp / "in.onnx")
            out = tmp / "out.onnx"
            quantize_dynamic(
                str(src),
                str(out),
                op_types_to_quantize=ops,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=nodes,
                extra_options={"MatMulConstBOnly": True},
            )
            result = load_from_ort(out)
        counts: dict[str, int] = {}
        for node in result.graph:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        conv = sum(1 for n in model.graph if n.op_type == "Conv")
        self.metrics = {
            "quantized_op_types": ops,
            "excluded_nodes": nodes,
            "conv_kept_float": conv,
            "conv_weight_share": round(conv_share, 4),
            "integer_nodes": counts.get("MatMulInteger", 0)
            + counts.get("DynamicQuantizeMatMul", 0),
        }
        if conv:
            logger.info("quantize_dynamic: %d Conv nodes kept float (no fast ConvInteger)", conv)
        return ir.passes.PassResult(result, modified=True)


def _weight_params(model: ir.Model) -> dict[str, Any]:
    """Parameters of float initializers by the op type that consumes them."""
    sizes: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        users = {use.node.op_type for use in value.uses()}
        count = int(np.prod(tensor.shape.numpy())) if tensor.shape.rank() else 1
        for op in users:
            sizes[op] = sizes.get(op, 0) + count
    return sizes
