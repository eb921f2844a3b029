"""The walk over a graph that :func:`onnxpipe.graphs.channel_groups.find_groups` assembles.

:class:`ChannelWalk` visits every node once, in order: a layer (Conv, Gemm, MatMul on a
constant weight) starts a channel space at its output and consumes one at its input; the ops
that keep channels aligned join their tensors into one space (a union-find) and record what
must be cut with it (:mod:`~onnxpipe.graphs.channel_record`; the shape and layout ops are
:mod:`~onnxpipe.graphs.channel_shapes`'s); anything else blocks the spaces it touches, with
the reason.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir

from onnxpipe.graphs.base import attr_int, constant
from onnxpipe.graphs.channel_record import rank_of as _rank
from onnxpipe.graphs.channel_shapes import ShapeOps

logger = logging.getLogger(__name__)

UNARY = frozenset(
    {
        "Relu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "LeakyRelu", "Tanh", "Elu",
        "Selu", "Softplus", "Softsign", "Gelu", "Identity", "Dropout", "Neg", "Abs", "Mish",
        "Erf", "Sqrt", "Exp", "Round", "Floor", "Ceil",
    }
)  # fmt: skip
BINARY = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "PRelu", "Sum", "Mean"})
"""Elementwise ops on two (Sum, Mean, Max, Min: any number of) tensors of one rank."""
POOLS = frozenset({"GlobalAveragePool", "GlobalMaxPool", "AveragePool", "MaxPool"})
REDUCES = frozenset({"ReduceMean", "ReduceMax", "ReduceSum", "ReduceMin"})


def _is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input channel and one output channel per group."""
    weight = constant(node.inputs[1])
    group = attr_int(node, "group", 1)
    return weight is not None and group > 1 and weight.shape[0] == group and weight.shape[1] == 1


def is_producer(node: ir.Node) -> bool:
    """A Conv (not depthwise), Gemm, or MatMul on a 2-D constant weight: its outputs can go.

    A grouped Conv (ResNeXt, RegNet) takes its input and makes its output in ``group``
    blocks: the groups on both sides must keep as many channels in every block
    (``Group.blocks``).

    A MatMul's channels are the last axis of its output (``[batch, seq, features]`` in a
    transformer); the analysis follows them there (``Group.axis`` -1).
    """
    if node.domain != "" or len(node.inputs) < 2 or constant(node.inputs[1]) is None:
        return False
    if node.op_type == "Conv":
        return attr_int(node, "group", 1) == 1 or not _is_depthwise(node)
    if node.op_type == "Gemm":
        return attr_int(node, "transA", 0) == 0
    if node.op_type == "MatMul":
        weight = constant(node.inputs[1])
        rank = _rank(node.inputs[0]) if node.inputs[0] is not None else None
        return weight is not None and weight.ndim == 2 and rank is not None and rank >= 2
    return False


class ChannelWalk(ShapeOps):
    """One walk over a graph in node order, recording channel spaces.

    Joins the tensors that share a channel space and records, per tensor, the arrays to cut,
    the consumers, and why a tensor is blocked. The shape ops are :class:`ShapeOps`'s.
    """

    def __init__(self, graph: ir.Graph) -> None:
        super().__init__(graph)
        # ops whose handler passes the channels on when it can; otherwise they fall through
        self.passing = {
            "Reshape": self._token_reshape,
            "Shape": self._reads_other_dims,
            "Transpose": self._layout,
            "Pad": self._spatial_pad,
            "Concat": self._channel_concat,
            "Split": self._channel_split,
        }

    def visit(self, node: ir.Node) -> None:
        """Record what ``node`` does to the channels of its inputs and outputs."""
        op, ins = node.op_type, list[Any](node.inputs)
        acts = [v for v in ins if v is not None and constant(v) is None]
        last = any(id(v) in self.last for v in acts)
        if node.domain not in ("", "ai.onnx"):
            self._opaque(node, acts)
        elif op == "MatMul" and is_producer(node):
            self._matmul(node)
        elif op in self.passing and self.passing[op](node):
            pass  # its handler passed the channels on
        elif last and op not in UNARY and op not in BINARY and op not in REDUCES:
            self._opaque(node, acts)  # pooling, BatchNorm, reshapes: written for axis 1
        elif is_producer(node):
            trans = op == "Conv" or attr_int(node, "transB", 0) == 1  # weight rows = outputs
            self._consume(node, ins[0], 1 if trans else 0)
            out = node.outputs[0]
            self.cut(out, ins[1], 0 if trans else 1)  # type: ignore[arg-type]
            bias = constant(ins[2]) if len(ins) > 2 else None
            if bias is not None and bias.size > 1:
                self.cut(out, ins[2], 0 if op == "Conv" else bias.ndim - 1)  # type: ignore[arg-type]
            if op == "Conv" and attr_int(node, "group", 1) > 1:
                for value in (ins[0], out):
                    self.blocks.setdefault(id(value), set()).add(attr_int(node, "group", 1))
        elif op == "Conv" and _is_depthwise(node):
            self.join(ins[0], node.outputs[0])
            self.depthwise.append((node, node.outputs[0]))
            self.cut(ins[0], ins[1], 0)
            if len(ins) > 2 and ins[2] is not None:
                self.cut(ins[0], ins[2], 0)
        elif op in UNARY and ins[0] is not None:
            self.join(ins[0], node.outputs[0])  # extra inputs (Clip bounds) are scalars
            if last:
                self.last.add(id(node.outputs[0]))
            for extra in node.outputs[1:]:
                self.block(extra, f"second output of {op} node {node.name!r}")
        elif op == "BatchNormalization" and len(acts) == 1:
            self.join(ins[0], node.outputs[0])
            for param in ins[1:5]:
                self.cut(ins[0], param, 0)  # type: ignore[arg-type]
        elif op in BINARY and len(node.outputs) == 1:
            self._binary(node, acts)
        elif op in POOLS or op in REDUCES:
            self._pool(node)
        elif op == "Resize" and self._spatial_resize(node):
            pass
        elif op in ("Reshape", "Flatten"):
            self._flatten(node)
        else:
            self._opaque(node, acts)

    def _matmul(self, node: ir.Node) -> None:
        """A MatMul contracts its input's last axis: those are the channels it consumes."""
        value, out = node.inputs[0], node.outputs[0]
        assert value is not None
        if _rank(value) == 2 or id(value) in self.last:
            self._consume(node, value, 0)
        else:  # e.g. [N, C, H, W] @ W: it mixes W positions, not the C channels
            self.block(value, f"MatMul node {node.name!r} contracts its last axis, not channels")
        self.cut(out, node.inputs[1], 1)  # type: ignore[arg-type]
        if (_rank(out) or _rank(value) or 0) > 2:
            self.last.add(id(out))

    def _consume(self, node: ir.Node, value: ir.Value, axis: int) -> None:
        if _rank(value) is None:
            self.block(value, f"rank of {value.name!r} unknown")
            return
        self.track(value)
        self.consumers.setdefault(id(value), []).append((node, node.inputs[1], axis))  # type: ignore[arg-type]

    def _per_channel(self, act: ir.Value, const: ir.Value, node: ir.Node, rank: int | None) -> None:
        array = constant(const)
        assert array is not None
        if array.size == 1:
            return
        act_rank = rank if rank is not None else _rank(act)
        if act_rank is None or array.ndim > act_rank:
            self.block(act, f"constant {const.name!r} of {node.op_type} does not broadcast")
            return
        # where the channel axis lands in the constant (right-aligned broadcasting)
        axis = array.ndim - 1 if id(act) in self.last else array.ndim - (act_rank - 1)
        others = [d for i, d in enumerate(array.shape) if i != axis]
        if axis < 0 or any(d != 1 for d in others):
            self.block(act, f"constant {const.name!r} of {node.op_type} is not per-channel")
            return
        self.cut(act, const, axis)

    def _binary(self, node: ir.Node, acts: list[ir.Value]) -> None:
        out = node.outputs[0]
        if not acts:
            return
        if node.op_type == "PRelu" and len(acts) == 1 and acts[0] is node.inputs[0]:
            self.join(acts[0], out)
            self._per_channel(acts[0], node.inputs[1], node, None)  # type: ignore[arg-type]
            return
        ranks = {_rank(v) for v in acts} | {_rank(out)}
        if None in ranks or len(ranks) != 1:
            self._opaque(node, acts)  # broadcasting across ranks: channel axes may not align
            return
        if any(id(v) in self.last for v in acts):
            if not all(id(v) in self.last for v in acts):  # e.g. a residual Add in a transformer
                self._opaque(node, acts)  # the other side's channels may sit on axis 1
                return
            self.last.add(id(out))
        for value in acts:
            self.join(value, out)
        for const in node.inputs:
            if const is not None and constant(const) is not None:
                self._per_channel(acts[0], const, node, None)

    def _pool(self, node: ir.Node) -> None:
        """Pooling over positions: the channels stay where they are.

        On axis 1, or on the last axis for a Reduce over an NHWC map (tf2onnx's
        squeeze-and-excitation of a Keras model).
        """
        value, out = node.inputs[0], node.outputs[0]
        assert value is not None
        rank = _rank(value)
        last = id(value) in self.last
        if node.op_type in POOLS:
            if last:
                self._opaque(node, [value])  # pooling ops are NCHW
            else:
                self.join(value, out)
            return
        axes = reduce_axes(node)
        if axes is None or rank is None:
            self._opaque(node, [value])
            return
        reduced = {a % rank for a in axes}
        channel = self._channel_axis(value, rank)
        keep = attr_int(node, "keepdims", 1)
        moved = channel - (0 if keep else sum(1 for a in reduced if a < channel))
        out_rank = rank if keep else rank - len(reduced)
        if channel in reduced or (not keep and 0 in reduced) or moved not in (1, out_rank - 1):
            self._opaque(node, [value])  # channels reduced, or moved off axis 1 / the last
            return
        self.join(value, out)
        if moved == out_rank - 1 and out_rank > 2:
            self.last.add(id(out))


def reduce_axes(node: ir.Node) -> list[int] | None:
    """A Reduce node's axes: the constant input (opset 18+) or the attribute; None if neither."""
    given = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if given is not None:
        return [int(a) for a in given.reshape(-1)]
    attr = node.attributes.get("axes")
    return list(attr.as_ints()) if attr is not None else None
