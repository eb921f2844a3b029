"""Prepare a float model for quantization: shape inference plus ORT's graph optimizations.

What ``onnxruntime.quantization.quant_pre_process`` does: symbolic and ONNX shape inference
(the quantizer needs a type and shape on every tensor it touches) and ORT's basic-level
optimizations (constant folding, Conv+BatchNorm / Conv+Add fusion), so that calibration sees
the tensors that will actually be quantized and no QDQ pair lands between fusable nodes.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from pydantic import Field

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import GraphPass, PassConfig
from onnxpipe.graphs.quant_utils import (
    load_from_ort,
    refuse_quantized,
    save_for_ort,
    scratch_dir,
    working_directory,
)

logger = logging.getLogger(__name__)


class QuantizePreprocessConfig(PassConfig):
    """Settings of :class:`QuantizePreprocessPass`."""

    optimize: bool = Field(
        default=True, description="run ORT's basic graph optimizations (BN folding)"
    )
    symbolic_shapes: bool = Field(
        default=True, description="run ORT's symbolic shape inference before ONNX shape inference"
    )


class QuantizePreprocessPass(GraphPass[QuantizePreprocessConfig]):
    """Shape inference + ORT optimization ahead of any quantization pass.

    Refuses a model that is quantized already. Symbolic shape inference fails on some
    graphs (custom domains); the pass then falls back to ONNX shape inference alone and
    says so in its metrics.
    """

    name = "quantize_preprocess"
    config_class = QuantizePreprocessConfig
    modifies_in_place = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Return the optimized, shape-annotated model."""
        from onnxruntime.quantization.shape_inference import quant_pre_process  # noqa: PLC0415

        refuse_quantized(model, self.name)
        before = sum(1 for _ in model.graph)
        with scratch_dir() as tmp, working_directory(tmp):
            src = save_for_ort(model, tmp / "in.onnx")
            out = tmp / "out.onnx"
            symbolic = self.config.symbolic_shapes
            try:
                quant_pre_process(
                    str(src),
                    str(out),
                    skip_optimization=not self.config.optimize,
                    skip_symbolic_shape=not symbolic,
                )
            except Exception as e:  # noqa: BLE001 - ORT's symbolic shape tool raises bare errors
                if not symbolic:
                    raise PassError(f"{self.name}: ORT could not pre-process the model: {e}") from e
                logger.info("symbolic shape inference failed (%s); using ONNX's alone", e)
                symbolic = False
                quant_pre_process(
                    str(src),
                    str(out),
                    skip_optimization=not self.config.optimize,
                    skip_symbolic_shape=True,
                )
            result = load_from_ort(out)
        after = sum(1 for _ in result.graph)
        self.metrics = {"nodes_before": before, "nodes_after": after, "symbolic_shapes": symbolic}
        logger.info("quantize_preprocess: %d -> %d nodes", before, after)
        return ir.passes.PassResult(result, modified=True)
