"""Take the QDQ pairs off activations that hold sentinels (attention masks of float min, -inf).

Masks built as ``(1 - mask) * finfo(float32).min`` (T5, BERT-like encoders) or ``-inf`` carry
a calibrated range of about 3.4e38, or an infinite one. ORT then gives the tensor a scale of
1.3e36 (uint8) or inf: every value of it, the real 0 entries included, dequantizes to a
multiple of that scale or to NaN, and the mask and everything it is added to are lost. No
real activation comes near such a range, so the pair goes and the tensor stays float.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from onnxpipe.graphs.base import identity_output

logger = logging.getLogger(__name__)

SENTINEL_SCALE = 1e28
"""A QuantizeLinear scale above this (or not finite) marks a sentinel range: 255 steps of it
span 2.5e30, far past any activation and far below float32's 3.4e38 sentinels."""


def drop_sentinel_qdq(model: ir.Model) -> list[str]:
    """Remove the QuantizeLinear/DequantizeLinear pairs with a sentinel scale, in place.

    The DequantizeLinear readers read the float tensor again; a DequantizeLinear output that
    is a graph output keeps its name (through an Identity). A QuantizeLinear output read by
    anything but DequantizeLinear (a QOperator op) is left as it is. Returns the names of the
    float tensors set free, in graph order.
    """
    graph = model.graph
    freed = []
    for quant in list(graph):
        if quant.op_type != "QuantizeLinear" or quant.domain not in ("", "ai.onnx"):
            continue
        if not _sentinel_scale(quant.inputs[1]) or quant.inputs[0] is None:
            continue
        source = quant.inputs[0]
        dropped = False
        for use in list(quant.outputs[0].uses()):
            dequant = use.node
            if dequant.op_type != "DequantizeLinear" or use.idx != 0:
                continue
            _reconnect(graph, dequant, source)
            dropped = True
        if not quant.outputs[0].uses() and not quant.outputs[0].is_graph_output():
            params = [v for v in quant.inputs[1:] if v is not None]
            graph.remove(quant, safe=True)
            for value in params:  # the scale and zero point, unless shared
                if value.is_initializer() and not value.uses() and value.name:
                    graph.initializers.pop(value.name)
        if dropped:
            freed.append(source.name or "")
            logger.debug("sentinel range: %s stays float", source.name)
    if freed:
        logger.info("quantize: %d sentinel-range tensors stay float", len(freed))
    return freed


def _sentinel_scale(scale: ir.Value | None) -> bool:
    """Whether ``scale`` is a constant with a non-finite entry or one over SENTINEL_SCALE."""
    if scale is None or scale.const_value is None:
        return False
    values = np.abs(scale.const_value.numpy().astype(np.float64))
    return bool(not np.all(np.isfinite(values)) or values.max(initial=0.0) > SENTINEL_SCALE)


def _reconnect(graph: ir.Graph, dequant: ir.Node, source: ir.Value) -> None:
    """Make the readers of ``dequant``'s output read ``source``, and remove ``dequant``."""
    out = dequant.outputs[0]
    for index, value in enumerate(graph.outputs):
        if value is out:
            name = out.name or ""
            out.name = f"{name}_sentinel_dequantized"  # the Identity takes the name over
            graph.outputs[index] = identity_output(graph, source, name)
    out.replace_all_uses_with(source)
    graph.remove(dequant, safe=True)
