"""Int4 weight-only quantization: MatMul with constant weights -> MatMulNBits (ORT contrib).

Weights are stored as 4-bit blocks (``block_size`` values share a scale), activations stay
float; the CPU kernel dequantizes on the fly. Suited to large MatMul weights (transformers);
Gemm with constant weights is rewritten too; Conv is left alone.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from pydantic import Field

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import GraphPass, PassConfig
from onnxpipe.graphs.quant_utils import from_proto, refuse_quantized, to_proto
from onnxpipe.graphs.quantize_static import split_exclude

logger = logging.getLogger(__name__)


class QuantizeInt4Config(PassConfig):
    """Settings of :class:`QuantizeInt4Pass`."""

    block_size: int = Field(default=32, ge=16, description="weights sharing one scale (power of 2)")
    symmetric: bool = Field(default=True, description="symmetric 4-bit weights (no zero points)")
    accuracy_level: int = Field(
        default=4,
        ge=0,
        le=4,
        description="MatMulNBits compute type: 4 = int8 activations (fastest)",
    )
    exclude: tuple[str, ...] = Field(default=(), description="MatMul node names kept in float")


class QuantizeInt4Pass(GraphPass[QuantizeInt4Config]):
    """Rewrite MatMuls with constant 2-D weights into MatMulNBits.

    Refuses a quantized model and a model with no MatMul on constant weights (nothing to do).
    """

    name = "quantize_int4"
    config_class = QuantizeInt4Config
    modifies_in_place = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Return the model with 4-bit MatMul weights (a new object)."""
        from onnxruntime.quantization.matmul_nbits_quantizer import (  # noqa: PLC0415
            MatMulNBitsQuantizer,
        )

        refuse_quantized(model, self.name)
        cfg = self.config
        if cfg.block_size & (cfg.block_size - 1):
            raise PassError(f"{self.name}: block_size {cfg.block_size} is not a power of 2.")
        nodes, _ = split_exclude(model, cfg.exclude, self.name)
        quantizer = MatMulNBitsQuantizer(
            to_proto(model),
            block_size=cfg.block_size,
            is_symmetric=cfg.symmetric,
            accuracy_level=cfg.accuracy_level,
            nodes_to_exclude=nodes,
            op_types_to_quantize=("MatMul", "Gemm"),
        )
        quantizer.process()
        result = from_proto(quantizer.model.model)
        done = sum(1 for n in result.graph if n.op_type == "MatMulNBits")
        if not done:
            raise PassError(
                f"{self.name}: no MatMul with a constant 2-D weight to quantize. int4 is "
                "weight-only for MatMul (transformers); use --mode static for CNNs."
            )
        self.metrics = {"matmulnbits_nodes": done, "block_size": cfg.block_size}
        logger.info("quantize_int4: %d MatMul -> MatMulNBits", done)
        return ir.passes.PassResult(result, modified=True)
