"""Int8 weights that ORT's CPU kernels compute exactly, and the bias their rounding shifts.

Saturation. On x86 without VNNI, MLAS's U8S8 GEMM (behind QLinearConv with one group, QGemm,
QLinearMatMul) multiplies with VPMADDUBSW, which adds the products of two neighbouring
``k`` into int16 and saturates: ``255 * (|w_k| + |w_k+1|)`` must stay under 32767, i.e.
``|w_k| + |w_k+1| <= 128``. ORT's answer, ``reduce_range``, makes every weight 7-bit, including
depthwise convs, whose MLAS kernel accumulates in int32 and never saturates; on
EfficientNet-Lite0 that costs more agreement than the saturation it removes. Here each output
channel gets the smallest scale that keeps its neighbouring pairs under the bound: 8 bits where
the large weights are not neighbours, 7 where they are. The pairs are known for weights whose
``k`` axis is the GEMM's (Gemm, 1x1 convs: input channels); other grouped convs get 7 bits.

Bias correction. Rounding a channel's weights shifts its output mean by ``dW . E[x]``
(Nagel et al., "Data-Free Quantization", 2019), which per-channel scales do not remove;
depthwise convs with few weights per channel suffer most. :func:`correct_biases` measures
``E[x]`` per input channel on calibration data and folds ``-dW . E[x]`` into the int32 bias
of every quantized Conv/Gemm of a QDQ model, using the weights as quantized.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxpipe.graphs.base import attr_int, constant
from onnxpipe.graphs.quant_utils import Feeds, tap_session

logger = logging.getLogger(__name__)

PAIR_BOUND = 127
"""``|q_k| + |q_k+1| <= 127 + 1`` after rounding; ``255 * 128`` fits int16."""


def weight_layout(node: ir.Node, shape: Sequence[int]) -> str | None:
    """How ORT's U8S8 kernels pair a node's weights (``shape``) along the GEMM's ``k``.

    ``depthwise``: MLAS accumulates in int32, nothing saturates. ``paired``: neighbouring
    ``k`` are known (Gemm, 1x1 convs: input channels). ``unpaired``: the ``k`` order is not
    known (other convs), so any two weights may be neighbours. None: not covered (MatMul).
    """
    if node.op_type == "Gemm":
        return "paired"
    if node.op_type != "Conv":
        return None
    if shape[1] == 1 and attr_int(node, "group", 1) > 1:
        return "depthwise"
    return "paired" if all(d == 1 for d in shape[2:]) else "unpaired"


def integer_limits(
    node: ir.Node, shape: Sequence[int], safe: bool, reduce_range: bool
) -> tuple[tuple[int, int], bool]:
    """The integer range of a node's int8 weights and whether its ``k`` pairs are bounded.

    The ranges :func:`saturation_safe_ranges` chose, as integers: 7 bits with
    ``reduce_range`` and for unpaired convs, 8 bits with the pair bound for paired weights,
    plain 8 bits for depthwise convs and where the ranges do not apply.
    """
    if reduce_range:
        return (-64, 64), False
    layout = weight_layout(node, shape) if safe else None
    if layout == "unpaired":
        return (-64, 64), False
    return (-127, 127), layout == "paired"


def saturation_safe_ranges(model: ir.Model) -> dict[str, tuple[int, list[float]]]:
    """Weight initializer -> (channel axis, symmetric range per channel) free of int16 saturation.

    Covers Conv (one or more groups; depthwise convs are left to ORT's default 8 bits) and
    Gemm. The ranges feed ORT's ``TensorQuantOverrides`` as ``rmin=-r, rmax=r``.
    """
    out: dict[str, tuple[int, list[float]]] = {}
    for node in model.graph:
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        w = constant(weight)
        if w is None or weight is None or weight.name is None or w.ndim < 2:
            continue
        layout = weight_layout(node, w.shape)
        if layout == "depthwise":
            continue  # ORT's default 8 bits
        axis = 0 if node.op_type == "Conv" or attr_int(node, "transB", 0) else 1
        rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
        paired = layout == "paired"
        out[weight.name] = (axis, [float(r) for r in _pair_range(np.abs(rows), paired)])
    return out


def _pair_range(a: np.ndarray, paired: bool) -> np.ndarray:
    """Per row: the symmetric range whose int8 scale keeps neighbouring pairs under the bound."""
    largest = a.max(1)
    if not paired:
        return largest * PAIR_BOUND / 64  # 7 bits: any two weights may be neighbours
    if a.shape[1] % 2:
        a = np.concatenate([a, np.zeros((a.shape[0], 1), a.dtype)], 1)
    pairs = (a[:, 0::2] + a[:, 1::2]).max(1)
    return np.maximum(largest, pairs)


def input_means(model: ir.Model, feeds: Sequence[Feeds], tensors: Sequence[str]) -> dict:
    """Mean per channel (axis 1; all other axes averaged) of ``tensors`` over ``feeds``."""
    session = tap_session(model, tensors)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for feed in feeds:
        for name, value in zip(tensors, session.run(list(tensors), dict(feed)), strict=True):
            v = np.moveaxis(np.asarray(value, np.float64), 1, 0).reshape(value.shape[1], -1)
            sums[name] = sums.get(name, 0) + v.sum(1)
            counts[name] = counts.get(name, 0) + v.shape[1]
    return {name: sums[name] / counts[name] for name in tensors}


def bias_targets(quantized: ir.Model) -> list[ir.Node]:
    """Conv/Gemm nodes of a QDQ model with quantized weights and an int32-quantized bias."""
    found = []
    for node in quantized.graph:
        if node.op_type not in ("Conv", "Gemm") or len(node.inputs) < 3:
            continue
        w, b = (v.producer() if v is not None else None for v in node.inputs[1:3])
        if not (w and b and w.op_type == b.op_type == "DequantizeLinear"):
            continue
        scales = [node.attributes.get(k) for k in ("alpha", "beta")]
        if node.op_type == "Gemm" and (
            attr_int(node, "transA", 0)
            or any(a is not None and a.as_float() != 1.0 for a in scales)
        ):
            continue
        if constant(w.inputs[0]) is not None and constant(b.inputs[0]) is not None:
            found.append(node)
    return found


def correct_biases(
    quantized: ir.Model, reference: ir.Model, means: dict[str, np.ndarray]
) -> list[str]:
    """Fold ``-(W_int8 - W) . E[x]`` into each target's int32 bias, in place; returns the nodes.

    ``reference`` is the float model ``quantized`` came from (nodes matched by name);
    ``means`` maps each float node's input tensor to its per-channel mean (:func:`input_means`).
    """
    floats = {n.name: n for n in reference.graph}
    done = []
    for node in bias_targets(quantized):
        source = floats.get(node.name)
        if source is None or source.inputs[0] is None or source.inputs[0].name not in means:
            continue
        w_float = constant(source.inputs[1])
        if w_float is None:
            continue
        w_dq, b_dq = (v.producer() for v in node.inputs[1:3])  # type: ignore[union-attr]
        assert w_dq is not None and b_dq is not None
        delta = _dequantize(w_dq) - w_float.astype(np.float64)
        shift = _output_shift(node, delta, means[source.inputs[0].name])
        bias_value = b_dq.inputs[0]
        assert bias_value is not None and bias_value.const_value is not None
        scale = np.asarray(constant(b_dq.inputs[1]), np.float64)
        fixed = minus_shift(bias_value.const_value.numpy(), shift, scale)
        bias_value.const_value = ir.tensor(fixed, name=bias_value.name)
        done.append(node.name or "")
        logger.debug("bias correction %s: max shift %.4g", node.name, float(np.abs(shift).max()))
    return done


def minus_shift(q_bias: np.ndarray, shift: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """An int32 bias with a float output ``shift`` taken off, in steps of its ``scale``.

    A channel with scale 0 is left as it is; the result is clipped to the int32 range.
    """
    steps = np.round(shift / np.where(scale == 0, 1, scale)).astype(np.int64)
    info = np.iinfo(np.int32)
    return np.clip(q_bias.astype(np.int64) - steps, info.min, info.max).astype(np.int32)


def _dequantize(dq: ir.Node) -> np.ndarray:
    q = np.asarray(constant(dq.inputs[0]), np.float64)
    scale = np.asarray(constant(dq.inputs[1]), np.float64)
    zero = constant(dq.inputs[2]) if len(dq.inputs) > 2 else None
    zp = np.zeros_like(scale) if zero is None else np.asarray(zero, np.float64)
    if scale.ndim == 1 and scale.size > 1:
        shape = [1] * q.ndim
        shape[attr_int(dq, "axis", 1)] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return (q - zp) * scale


def _output_shift(node: ir.Node, delta: np.ndarray, mean: np.ndarray) -> np.ndarray:
    """``delta . E[x]`` per output channel of a Conv (any groups) or Gemm."""
    if node.op_type == "Gemm":
        return delta @ mean if attr_int(node, "transB", 0) else mean @ delta
    groups = attr_int(node, "group", 1)
    out_ch, per_group = delta.shape[0], delta.shape[1]
    d = delta.reshape(groups, out_ch // groups, per_group, -1).sum(-1)
    return np.einsum("gok,gk->go", d, mean.reshape(groups, per_group)).reshape(out_ch)


def keep_float_weights(quantized: ir.Model) -> list[str]:
    """Stop ORT from quantizing the weights of the Conv/Gemm nodes that were kept in float.

    At session start ORT's ``WeightBiasQuantization`` optimizer gives every Conv,
    ConvTranspose or Gemm whose input comes from a per-tensor DequantizeLinear and whose
    weight is a float initializer per-tensor int8 weights (no saturation bound, no bias
    correction), so a node kept in float between quantized neighbours silently runs in int8:
    on EfficientNet-Lite0 one such depthwise conv cost half the top-1 agreement. The optimizer
    only matches a scalar input scale, so each such node gets its own DequantizeLinear with
    the same scale repeated per channel (axis 1): the same numbers, no match. In place;
    returns the nodes rewired.
    """
    done = []
    for node in list(quantized.graph):
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 2:
            continue
        weight, source = node.inputs[1], node.inputs[0]
        dq = source.producer() if source is not None else None
        if weight is None or weight.const_value is None or dq is None:
            continue
        if weight.const_value.dtype != ir.DataType.FLOAT or dq.op_type != "DequantizeLinear":
            continue
        scale, zero = constant(dq.inputs[1]), constant(dq.inputs[2]) if len(dq.inputs) > 2 else None
        if scale is None or scale.size != 1 or source is None:
            continue
        channels = _input_channels(node, weight.const_value.shape.numpy())
        if channels < 2:
            continue
        zp = np.zeros((), np.uint8) if zero is None else zero
        stem = f"{node.name}_float_input"
        per_axis = ir.node(
            "DequantizeLinear",
            [
                dq.inputs[0],
                _initializer(
                    quantized, f"{stem}_scale", np.full(channels, scale.item(), scale.dtype)
                ),
                _initializer(
                    quantized, f"{stem}_zero_point", np.full(channels, zp.item(), zp.dtype)
                ),
            ],
            attributes={"axis": 1},
            name=stem,
        )
        per_axis.outputs[0].name = stem
        per_axis.outputs[0].dtype = ir.DataType.FLOAT
        per_axis.outputs[0].shape = source.shape
        quantized.graph.insert_before(node, per_axis)
        node.replace_input_with(0, per_axis.outputs[0])
        done.append(node.name or "")
    return done


def _input_channels(node: ir.Node, weight_shape: Sequence[int]) -> int:
    """Size of axis 1 of the node's input, from its weight's shape."""
    if node.op_type == "Gemm":
        return int(weight_shape[1] if attr_int(node, "transB", 0) else weight_shape[0])
    if node.op_type == "ConvTranspose":
        return int(weight_shape[0])
    return int(weight_shape[1]) * attr_int(node, "group", 1)


def _initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
    value.shape, value.dtype = ir.Shape(array.shape), value.const_value.dtype  # type: ignore[union-attr]
    model.graph.register_initializer(value)
    return value
