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
    from_proto,
    load_from_ort,
    refuse_quantized,
    save_for_ort,
    scratch_dir,
    to_proto,
    working_directory,
)

logger = logging.getLogger(__name__)


class QuantizePreprocessConfig(PassConfig):
    """Settings of :class:`QuantizePreprocessPass`."""

    optimize: bool = Field(
        default=True, description="run ORT's basic graph optimizations (BN folding)"
    )
    min_opset: int = Field(
        default=13,
        ge=10,
        description="convert older models to this opset: per-channel QuantizeLinear/"
        "DequantizeLinear (the axis attribute) need 13",
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
        opset = result.opset_imports.get("", 0)
        if opset < self.config.min_opset:
            result = _upgrade(result, self.config.min_opset, self.name)
        after = sum(1 for _ in result.graph)
        self.metrics = {"nodes_before": before, "nodes_after": after, "symbolic_shapes": symbolic,
                        "opset": max(opset, self.config.min_opset)}  # fmt: skip
        logger.info("quantize_preprocess: %d -> %d nodes", before, after)
        return ir.passes.PassResult(result, modified=True)


def _upgrade(model: ir.Model, opset: int, pass_name: str) -> ir.Model:
    """``model`` converted to ``opset`` by ONNX's version converter."""
    import onnx  # noqa: PLC0415

    try:
        proto = onnx.version_converter.convert_version(to_proto(model), opset)
    except (RuntimeError, ValueError, onnx.checker.ValidationError) as e:
        raise PassError(
            f"{pass_name}: the model is opset {model.opset_imports.get('', 0)} and ONNX's "
            f"version converter could not bring it to {opset}, which per-channel quantization "
            f"needs ({e}). Re-export it at opset >= {opset}."
        ) from e
    return from_proto(proto)
