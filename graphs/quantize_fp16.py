"""Float16 weights and compute with float32 inputs/outputs kept, sensitive ops left float32.

ORT's float16 converter with ``keep_io_types`` (Cast at the edges, so callers keep feeding
float32) and a block list: ORT's own list plus ops whose range or accumulation overflows
float16 (exponent/normalisation ops and reductions).
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from pydantic import Field

from onnxpipe.graphs.base import GraphPass, PassConfig
from onnxpipe.graphs.quant_exclude import split_exclude
from onnxpipe.graphs.quant_utils import from_proto, refuse_float16, refuse_quantized, to_proto

logger = logging.getLogger(__name__)

SENSITIVE_OPS = (
    "Exp",
    "Log",
    "Pow",
    "Softmax",
    "LogSoftmax",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceLogSumExp",
    "CumSum",
    "Erf",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
)


class QuantizeFp16Config(PassConfig):
    """Settings of :class:`QuantizeFp16Pass`."""

    block_sensitive: bool = Field(default=True, description="keep overflow-prone ops in float32")
    exclude: tuple[str, ...] = Field(default=(), description="node names or op types kept float32")


class QuantizeFp16Pass(GraphPass[QuantizeFp16Config]):
    """Convert weights and compute to float16; graph inputs/outputs stay float32.

    Refuses a quantized model or one with float16 weights already.
    """

    name = "quantize_fp16"
    config_class = QuantizeFp16Config
    modifies_in_place = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Return the float16 model (a new object)."""
        from onnxruntime.transformers.float16 import (  # noqa: PLC0415
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )

        refuse_quantized(model, self.name)
        refuse_float16(model, self.name)
        nodes, op_types = split_exclude(model, self.config.exclude, self.name)
        blocked = set(DEFAULT_OP_BLOCK_LIST) | op_types
        if self.config.block_sensitive:
            blocked |= set(SENSITIVE_OPS)
        proto = convert_float_to_float16(
            to_proto(model),
            keep_io_types=True,
            op_block_list=sorted(blocked),
            node_block_list=nodes,
        )
        result = from_proto(proto)
        # The converter appends its input/output Casts after the nodes that read them; ORT
        # runs that, the ONNX checker (and so `validate`) refuses it.
        result.graph.sort()
        for value in result.graph.initializers.values():
            # Weights of blocked ops (LayerNormalization) stay float32 while the converter's
            # value_info calls them float16: the ONNX checker refuses the mismatch.
            if value.const_value is not None:
                value.dtype = value.const_value.dtype
        kept = [n.name for n in model.graph if n.op_type in blocked or n.name in nodes]
        self.metrics = {"blocked_op_types": sorted(blocked & {n.op_type for n in model.graph}),
                        "float32_nodes": len(kept)}  # fmt: skip
        logger.info("quantize_fp16: %d nodes kept float32", len(kept))
        return ir.passes.PassResult(result, modified=True)
