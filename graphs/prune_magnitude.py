"""Unstructured magnitude pruning: zero the smallest weights of Conv/Gemm/MatMul.

Honest about what it buys: ONNX Runtime stores and runs the weights dense, so the model is
neither smaller on disk nor faster; only its compressed (zipped) size drops, and the zeros
are a starting point for sparse runtimes or fine-tuning elsewhere.
"""

from __future__ import annotations

import logging
import zlib
from typing import ClassVar, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import GraphPass, PassConfig, computed_weights_hint

logger = logging.getLogger(__name__)

NO_SPEEDUP_NOTE = (
    "unstructured sparsity: ONNX Runtime CPU keeps these weights dense, so expect no speedup "
    "and no smaller model.onnx; only the zipped size shrinks"
)


class PruneMagnitudeConfig(PassConfig):
    """Settings of :class:`PruneMagnitudePass`."""

    ratio: float = Field(0.5, gt=0.0, lt=1.0, description="share of weights to zero, in (0, 1)")
    scope: Literal["global", "layer"] = Field(
        "layer",
        description="layer: zero `ratio` of every weight; global: one threshold over all "
        "weights (small-magnitude layers lose more)",
    )
    op_types: tuple[str, ...] = Field(
        ("Conv", "Gemm", "MatMul"), description="ops whose constant weight inputs are pruned"
    )
    min_size: int = Field(
        16, ge=1, description="leave weights with fewer elements than this (scalars, tiny)"
    )


def prunable_weights(model: ir.Model, op_types: tuple[str, ...], min_size: int) -> list[ir.Value]:
    """Constant float weights (not biases) read by ``op_types``, each listed once."""
    found: dict[int, ir.Value] = {}
    for node in model.graph:
        if node.op_type not in op_types or node.domain not in ("", "ai.onnx"):
            continue
        slots = (0, 1) if node.op_type == "MatMul" else (1,)
        for slot in slots:
            value = node.inputs[slot] if slot < len(node.inputs) else None
            if value is None or value.const_value is None or not value.is_initializer():
                continue
            if value.const_value.dtype.is_floating_point() and value.const_value.size >= min_size:
                if len(value.const_value.shape) >= 2:
                    found[id(value)] = value
    return list(found.values())


def _array(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None
    return value.const_value.numpy()


def weight_sparsity(weights: list[ir.Value]) -> float:
    """Share of exact zeros over ``weights``."""
    total = sum(_array(v).size for v in weights)
    zeros = sum(int((_array(v) == 0).sum()) for v in weights)
    return zeros / max(total, 1)


def zipped_size(model: ir.Model) -> int:
    """Bytes of the serialized model after zlib (level 6): what a zip of the file costs."""
    return len(zlib.compress(ir.serde.serialize_model(model).SerializeToString(), 6))


class PruneMagnitudePass(GraphPass[PruneMagnitudeConfig]):
    """Zero the ``ratio`` smallest-magnitude weights, per layer or with one global threshold.

    Refuses (``PassError``) a model with no Conv/Gemm/MatMul constant weight.
    """

    name = "prune_magnitude"
    config_class = PruneMagnitudeConfig
    modifies_in_place: ClassVar[bool] = True

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Zero weights in place; ``metrics`` get sparsity before/after and the zipped sizes."""
        cfg = self.config
        weights = prunable_weights(model, cfg.op_types, cfg.min_size)
        if not weights:
            hint = computed_weights_hint(model, cfg.op_types) or (
                " Export with weights as initializers."
            )
            raise PassError(
                f"nothing to prune: no constant weight of {', '.join(cfg.op_types)} with at "
                f"least {cfg.min_size} elements.{hint}"
            )
        zipped_before = zipped_size(model)
        sparsity_before = weight_sparsity(weights)
        threshold = None
        if cfg.scope == "global":
            magnitudes = np.concatenate(
                [np.abs(v.const_value.numpy()).ravel() for v in weights]  # type: ignore[union-attr]
            )
            threshold = _kth(magnitudes, cfg.ratio)
        for value in weights:
            array = value.const_value.numpy()  # type: ignore[union-attr]
            magnitude = np.abs(array)
            if threshold is None:
                mask = _mask_smallest(magnitude.ravel(), cfg.ratio).reshape(array.shape)
            else:
                mask = magnitude <= threshold
            pruned = np.where(mask, np.zeros((), array.dtype), array)
            value.const_value = ir.tensor(pruned, name=value.name)
            logger.debug("%s: %.1f%% zeros", value.name, 100 * float((pruned == 0).mean()))
        sparsity = weight_sparsity(weights)
        if sparsity <= sparsity_before:  # the result would be the model as it was
            raise PassError(
                f"nothing to prune: --ratio {cfg.ratio:g} zeros no weight that was not zero "
                f"already ({100 * sparsity_before:.1f}% zeros, {len(weights)} weights, "
                f"{cfg.scope} scope). Raise --ratio above the share already zero."
            )
        logger.info("magnitude pruning: %d weights, %.1f%% zeros", len(weights), 100 * sparsity)
        self.metrics = {
            "weights_pruned": len(weights),
            "weight_elements": sum(_array(v).size for v in weights),
            "sparsity_before": sparsity_before,
            "sparsity": sparsity,
            "zipped_bytes_before": zipped_before,
            "zipped_bytes_after": zipped_size(model),
            "note": NO_SPEEDUP_NOTE,
        }
        return ir.passes.PassResult(model, modified=True)


def _kth(magnitudes: np.ndarray, ratio: float) -> float:
    k = int(round(ratio * magnitudes.size))
    if k <= 0:
        return -1.0
    return float(np.partition(magnitudes, k - 1)[k - 1])


def _mask_smallest(magnitudes: np.ndarray, ratio: float) -> np.ndarray:
    """Exactly ``round(ratio * n)`` entries, the smallest (ties broken by position)."""
    k = int(round(ratio * magnitudes.size))
    mask = np.zeros(magnitudes.size, bool)
    if k > 0:
        mask[np.argpartition(magnitudes, k - 1)[:k]] = True
    return mask
