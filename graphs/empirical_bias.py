"""Empirical bias correction: remove the output mean shift that activation quantization leaves.

Analytic bias correction (:func:`onnxpipe.graphs.quant_weights.correct_biases`) removes the
shift that weight rounding causes, given the float input means. Quantizing activations shifts
means too: rounding noise pushed through a clipping activation (ReLU6) moves the mean of its
output, and the shift compounds from layer to layer. This step measures it. For each Conv/Gemm
of a QDQ model with an int32 bias, in graph order, the mean per channel of its quantized
output (after its Q/DQ pair, as the next layer sees it) on calibration feeds is compared with
the float model's same tensor, and the difference is folded into the int32 bias where it is
larger than its sampling noise (differences are paired per sample).

Layer by layer, so that each layer is measured with every layer before it corrected: correcting
all at once counts the inherited shift twice (on EfficientNet-Lite0 that tripled KL instead of
lowering it). One ORT session serves every layer, the biases fed as overridable initializers.
The quantized model runs with its intermediate outputs tapped, i.e. as float ops on quantized
values; ORT's int8 kernels compute the same values (saturation-safe weights, see
:mod:`onnxpipe.graphs.quant_weights`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxpipe.graphs.base import constant
from onnxpipe.graphs.quant_utils import Feeds, tap_session, to_proto
from onnxpipe.graphs.quant_weights import bias_targets, minus_shift

logger = logging.getLogger(__name__)

MAX_SAMPLES = 32
"""Calibration samples the output means are measured on."""
SIGNIFICANCE = 2.0
"""Standard errors (of the per-sample differences) a channel's shift must exceed to be
corrected. Correcting noise moves near-tie decisions: on EfficientNet-Lite0 the classifier's
per-class shifts over 32 samples are mostly noise; with this test KL fell further (0.0088 ->
0.0083) and top-1 agreement no longer dropped."""


@dataclass
class Measured:
    """One corrected node: its int32 bias, the quantized tensor and its float counterpart."""

    node: ir.Node
    bias: ir.Value
    scale: np.ndarray
    quantized: str
    reference: str


def measured_tensors(quantized: ir.Model, reference: ir.Model) -> list[Measured]:
    """The bias targets of ``quantized`` whose output has a float counterpart, in graph order.

    With a Q/DQ pair after the node, the quantized tensor is the DequantizeLinear output and
    the reference the float tensor of that name or of the node's output name (ORT folds a
    Relu/Clip into the Q, so a Conv of the QDQ model outputs the name the float model's
    activation had; the Q clips the same way). Without one, the node's raw output compares
    only with the same node's float output: under a folded activation's name it would be
    the unclipped pre-activation measured against the clipped float tensor.
    """
    producers = {v.name: n.name for n in reference.graph for v in n.outputs}
    found = []
    for node in bias_targets(quantized):
        out = node.outputs[0]
        after = _dequantized(out)
        if after is not None:
            reference_name = next((n for n in (after, out.name) if n in producers), None)
        else:
            reference_name = out.name if producers.get(out.name) == node.name else None
        dq = node.inputs[2].producer() if node.inputs[2] is not None else None
        if reference_name is None or dq is None or dq.inputs[0] is None:
            continue
        scale = np.asarray(constant(dq.inputs[1]), np.float64)
        found.append(Measured(node, dq.inputs[0], scale, after or out.name or "", reference_name))
    return found


def _dequantized(value: ir.Value) -> str | None:
    """The output of a DequantizeLinear after the QuantizeLinear that is ``value``'s only use.

    A Q may feed several DQs (a node kept in float gets its own, see
    :func:`~onnxpipe.graphs.quant_weights.keep_float_weights`); they give the same values.
    """
    uses = [u.node for u in value.uses()]
    if len(uses) != 1 or uses[0].op_type != "QuantizeLinear":
        return None
    dqs = [u.node for u in uses[0].outputs[0].uses() if u.node.op_type == "DequantizeLinear"]
    return dqs[0].outputs[0].name if dqs else None


def sample_means(
    session: Any,
    tensors: Sequence[str],
    feeds: Sequence[Feeds],
    extra: Mapping[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Per sample, the mean per channel (axis 1) of each of ``tensors``: ``[samples, C]``.

    ``session`` returns the tensors (:func:`~onnxpipe.graphs.quant_utils.tap_session`);
    ``extra`` is fed with every batch.
    """
    rows: dict[str, list[np.ndarray]] = {name: [] for name in tensors}
    for feed in feeds:
        values = session.run(list(tensors), {**feed, **(extra or {})})
        for name, value in zip(tensors, values, strict=True):
            v = np.moveaxis(np.asarray(value, np.float64), 1, -1)
            rows[name].append(v.reshape(len(v), -1, v.shape[-1]).mean(1))
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def correct_biases_empirically(
    quantized: ir.Model,
    feeds: Sequence[Feeds],
    reference: Mapping[str, np.ndarray],
    targets: Sequence[Measured],
) -> list[str]:
    """Fold each target's measured output mean shift into its int32 bias, in place.

    ``reference`` maps each target's reference tensor to the float model's
    :func:`sample_means` on the same ``feeds``. A channel is corrected only where the mean
    of the per-sample differences exceeds :data:`SIGNIFICANCE` standard errors. Returns the
    nodes whose bias changed.
    """
    proto = _with_bias_inputs(quantized, [t.bias for t in targets])
    session = tap_session(proto, [t.quantized for t in targets])
    biases = {t.bias.name or "": _int32(t.bias) for t in targets}
    done = []
    for target in targets:
        got = sample_means(session, [target.quantized], feeds, biases)[target.quantized]
        diff = got - reference[target.reference]
        mean = diff.mean(0)
        error = diff.std(0, ddof=1) / np.sqrt(len(diff)) if len(diff) > 1 else np.inf
        shift = np.where(np.abs(mean) > SIGNIFICANCE * error, mean, 0.0)
        name = target.bias.name or ""
        fixed = minus_shift(biases[name], shift, target.scale)
        if np.array_equal(fixed, biases[name]):
            continue
        biases[name] = fixed
        done.append(target.node.name or "")
        logger.debug(
            "empirical bias %s: %d of %d channels, max shift %.4g",
            target.node.name, int((shift != 0).sum()), shift.size, np.abs(shift).max(),
        )  # fmt: skip
    for target in targets:
        target.bias.const_value = ir.tensor(biases[target.bias.name or ""], name=target.bias.name)
    return done


def _int32(value: ir.Value) -> np.ndarray:
    assert value.const_value is not None
    return value.const_value.numpy().astype(np.int32)


def _with_bias_inputs(model: ir.Model, biases: Sequence[ir.Value]) -> onnx.ModelProto:
    """``model`` as a proto whose bias initializers are also graph inputs (fed per run)."""
    proto = to_proto(model)
    listed = {i.name for i in proto.graph.input}
    for value in biases:
        if value.name is None or value.name in listed:
            continue
        shape = _int32(value).shape
        proto.graph.input.append(
            onnx.helper.make_tensor_value_info(value.name, onnx.TensorProto.INT32, shape)
        )
    return proto
