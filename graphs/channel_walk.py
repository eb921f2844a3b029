"""The walk over a graph that :func:`onnxpipe.graphs.channel_groups.find_groups` assembles.

:class:`ChannelWalk` visits every node once, in order: a layer (Conv, Gemm, MatMul on a
constant weight) starts a channel space at its output and consumes one at its input; the ops
that keep channels aligned join their tensors into one space (a union-find) and record what
must be cut with it; anything else blocks the spaces it touches, with the reason.
"""

from __future__ import annotations

import logging
from typing import Any

import onnx_ir as ir

from onnxpipe.graphs.base import attr_int, constant
from onnxpipe.graphs.channel_space import Part, Segment, ShapeEdit, concat_axis, static_dim

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


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


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


class _Union:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


class ChannelWalk:
    """One walk over a graph in node order, recording channel spaces.

    Joins the tensors that share a channel space and records, per tensor, the arrays to cut,
    the consumers, and why a tensor is blocked.
    """

    def __init__(self, graph: ir.Graph) -> None:
        self.graph = graph
        self.uf = _Union()
        self.values: dict[int, ir.Value] = {}
        self.blocked: dict[int, list[str]] = {}
        self.cuts: dict[int, list[tuple[ir.Value, int]]] = {}
        self.consumers: dict[int, list[tuple[ir.Node, ir.Value, int]]] = {}
        self.depthwise: list[tuple[ir.Node, ir.Value]] = []
        self.reshapes: list[tuple[ir.Value, ShapeEdit]] = []
        self.expects: list[tuple[ir.Value, int]] = []  # channel counts that Reshapes fix
        self.last: set[int] = set()  # ids of rank >= 3 values whose channels are the last axis
        self.links: list[tuple[ir.Value, Segment]] = []  # a Concat input and its segment
        self.splits: list[tuple[ir.Value, Part]] = []  # a Split input and one output's part
        self.assembled: dict[int, str] = {}  # Concat and Split outputs: the node, described
        self.blocks: dict[int, set[int]] = {}  # the group counts of grouped Convs on a tensor
        # ops whose handler passes the channels on when it can; otherwise they fall through
        self.passing = {
            "Reshape": self._token_reshape,
            "Shape": self._reads_other_dims,
            "Transpose": self._layout,
            "Pad": self._spatial_pad,
            "Concat": self._channel_concat,
            "Split": self._channel_split,
        }

    def track(self, value: ir.Value) -> int:
        """Remember ``value``; returns the root of its channel space."""
        self.values[id(value)] = value
        return self.uf.find(id(value))

    def join(self, a: ir.Value, b: ir.Value) -> None:
        """Put ``a`` and ``b`` in one channel space."""
        self.track(a)
        self.track(b)
        self.uf.union(id(a), id(b))

    def block(self, value: ir.Value, reason: str) -> None:
        """Mark ``value``'s channel space as not cuttable, for ``reason``."""
        self.track(value)
        self.blocked.setdefault(id(value), []).append(reason)

    def cut(self, activation: ir.Value, param: ir.Value, axis: int) -> None:
        """Cutting ``activation``'s channels cuts constant ``param`` along ``axis``."""
        self.track(activation)
        self.cuts.setdefault(id(activation), []).append((param, axis))

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

    def _channel_axis(self, value: ir.Value, rank: int) -> int:
        """Where ``value``'s channels are: its last axis (``self.last``) or axis 1."""
        return rank - 1 if id(value) in self.last else 1

    def _opaque(self, node: ir.Node, acts: list[ir.Value]) -> None:
        what = f"{node.op_type} node {node.name!r}"
        for value in acts:
            self.block(value, f"feeds {what}, which needs every channel")
        for out in node.outputs:
            self.block(out, f"comes from {what}, not from a Conv/Gemm/MatMul")

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

    def _layout(self, node: ir.Node) -> bool:
        """A Transpose that moves the channels to axis 1 or to the last axis.

        tf2onnx keeps a Keras model's NHWC ops (activations, Dense, LayerNorm) between
        Transposes around the NCHW convs; the channels follow the permutation.
        """
        value, out = node.inputs[0], node.outputs[0]
        perm = node.attributes.get("perm")
        rank = _rank(value) if value is not None else None
        if value is None or perm is None or rank is None or rank < 3:
            return False
        order = list(perm.as_ints())
        moved = order.index(self._channel_axis(value, rank))
        if moved not in (1, rank - 1):
            return False
        self.join(value, out)
        if moved == rank - 1:
            self.last.add(id(out))
        return True

    def _spatial_pad(self, node: ir.Node) -> bool:
        """A constant-mode Pad that adds nothing on the channel axis.

        tf2onnx pads a Keras NHWC map this way before a strided depthwise conv.
        """
        value = node.inputs[0]
        rank = _rank(value) if value is not None else None
        pads = constant(node.inputs[1]) if len(node.inputs) > 1 else None
        axes = node.inputs[3] if len(node.inputs) > 3 else None
        mode = node.attributes.get("mode")
        if value is None or rank is None or pads is None or axes is not None:
            return False
        if (mode.as_string() if mode is not None else "constant") != "constant":
            return False
        channel = self._channel_axis(value, rank)
        flat = pads.reshape(-1)
        if flat.size != 2 * rank or flat[channel] != 0 or flat[channel + rank] != 0:
            return False
        self.join(value, node.outputs[0])
        if id(value) in self.last:
            self.last.add(id(node.outputs[0]))
        return True

    def _channel_concat(self, node: ir.Node) -> bool:
        """A Concat on the channel axis whose inputs' channel counts are known.

        Axis 1 of NCHW maps or ``[N, C]`` rows, or the last axis of channels-last tensors
        (token features, NHWC maps). Each input's group goes on at its offset
        (:class:`Segment`); the output starts a channel space of its own, which
        :func:`find_groups` hands to the input groups.
        """
        out = node.outputs[0]
        rank = _rank(out)
        if rank is None or rank < 2 or not node.inputs or None in node.inputs:
            return False
        last = [id(v) in self.last for v in node.inputs]  # type: ignore[union-attr]
        if any(last) != all(last):
            return False
        axis = concat_axis(node)
        if axis != (rank - 1 if all(last) and rank > 2 else 1):
            return False
        for value in node.inputs:
            shape = value.shape  # type: ignore[union-attr]
            if shape is None or len(shape) != rank or not isinstance(shape[axis], int):
                return False
        self.track(out)
        self.assembled[id(out)] = f"Concat node {node.name!r}"
        if all(last):
            self.last.add(id(out))
        for index, value in enumerate(node.inputs):
            if value is not None and constant(value) is None:
                self.track(value)
                self.links.append((value, Segment(node, index)))
        return True

    def _channel_split(self, node: ir.Node) -> bool:
        """A Split on the channel axis into outputs of known sizes (YOLOv8's C2f ``chunk``).

        Each output takes a slice of the input's channels (:class:`Part`) and starts a
        channel space of its own, which :func:`find_groups` hands to the input's group.
        """
        value = node.inputs[0] if node.inputs else None
        rank = _rank(value) if value is not None else None
        if value is None or rank is None or not node.outputs:
            return False
        axis = attr_int(node, "axis", 0) % rank
        if axis != self._channel_axis(value, rank):
            return False
        sizes = []
        for out in node.outputs:
            if out.shape is None or len(out.shape) != rank or not isinstance(out.shape[axis], int):
                return False
            sizes.append(static_dim(out, axis))
        start = 0
        self.track(value)
        for index, (out, size) in enumerate(zip(node.outputs, sizes, strict=True)):
            self.track(out)
            self.assembled[id(out)] = f"Split node {node.name!r}"
            if id(value) in self.last:
                self.last.add(id(out))
            self.splits.append((value, Part(node, index, start, size)))
            start += size
        return True

    def _spatial_resize(self, node: ir.Node) -> bool:
        """A Resize by constant scales that leave the channel axis alone.

        Upsampling in a U-Net or an FPN resizes each channel on its own.
        """
        value = node.inputs[0]
        scales = constant(node.inputs[2]) if len(node.inputs) > 2 else None
        sizes = node.inputs[3] if len(node.inputs) > 3 else None
        rank = _rank(value) if value is not None else None
        if value is None or scales is None or sizes is not None or rank is None:
            return False
        if scales.size != rank or scales.reshape(-1)[1] != 1.0 or "axes" in node.attributes:
            return False
        self.join(value, node.outputs[0])
        return True

    def _token_reshape(self, node: ir.Node) -> bool:
        """A Reshape that keeps the channels-last axis whole: ``[B, S, C] <-> [B * S, C]``.

        GPT-2's ``Conv1D`` layers flatten the tokens for a Gemm and restore ``[B, S, C]``
        after it, with a target computed from the input's shape and a constant ``C`` (a
        Concat). With the last dim equal on both sides, every row is one token intact, so the
        channels pass through; the constant ``C`` is what the cut rewrites (ONNX shape
        inference may not know the restored last dim; the constant says what it is).
        """
        value, out = node.inputs[0], node.outputs[0]
        if value is None or value.shape is None or out.shape is None:
            return False
        if not (len(value.shape) == 2 or id(value) in self.last) or len(out.shape) < 2:
            return False
        known = value.shape[-1]
        channels = known if isinstance(known, int) else None
        edit = _target_edit(node, len(out.shape), channels)
        # a constant last element fixes the last dim; an inferred one (-1) must be seen equal
        if edit is None or channels == 1 or (edit.index < 0 and out.shape[-1] != channels):
            return False
        if channels is None:  # the group's weights must then agree with the target
            self.expects.append((value, edit.count()))
        self.join(value, out)
        if len(out.shape) > 2:
            self.last.add(id(out))
        if edit.index >= 0:
            self.reshapes.append((value, edit))
        return True

    def _reads_other_dims(self, node: ir.Node) -> bool:
        """A Shape whose users only pick dims other than the channel axis.

        tf2onnx's ``Tensordot`` (a Keras ``Dense`` on a 4-D input) computes its output shape
        from the leading dims of its input: Shape -> Cast -> Gather([0, 1, 2]).
        """
        value = node.inputs[0]
        rank = _rank(value) if value is not None else None
        if (
            value is None
            or rank is None
            or node.attributes.get("start")
            or "end" in node.attributes
        ):
            return False
        channel = self._channel_axis(value, rank)
        users = [use.node for use in node.outputs[0].uses()]
        while len(users) == 1 and users[0].op_type == "Cast":
            users = [use.node for use in users[0].outputs[0].uses()]
        for user in users:
            picked = constant(user.inputs[1]) if user.op_type == "Gather" else None
            if picked is None or attr_int(user, "axis", 0) != 0:
                return False
            if any(int(i) % rank == channel for i in picked.reshape(-1)):
                return False
        return bool(users)

    def _flatten(self, node: ir.Node) -> None:
        """``[N, C, 1, 1] -> [N, C]`` (Flatten or Reshape), and Reshapes between such shapes.

        tf2onnx's squeeze-and-excitation reshapes the pooled ``[N, C]`` to ``[N, C, 1, 1]``
        for the 1x1 convs, and reshapes their outputs to the shape they already have. A
        Reshape's target keeps ``C`` in position 1, which the cut rewrites.
        """
        value, out = node.inputs[0], node.outputs[0]
        assert value is not None
        ok = _unit_spatial(value.shape) and _unit_spatial(out.shape)
        if node.op_type == "Flatten":
            ok = ok and attr_int(node, "axis", 1) == 1 and len(out.shape or ()) == 2
        elif ok:
            target = constant(node.inputs[1])
            ok = (
                target is not None
                and target.size == len(out.shape)  # type: ignore[arg-type]
                and int(target[0]) in (-1, 0)
                and all(int(t) == 1 for t in target.reshape(-1)[2:])
            )
            if ok:
                self.reshapes.append((value, ShapeEdit(node, 1, 1, node)))
        if ok:
            self.join(value, out)
        else:
            self._opaque(node, [value])


def _target_edit(reshape: ir.Node, rank: int, channels: int | None) -> ShapeEdit | None:
    """Where ``reshape``'s target holds ``channels`` as its last element; None if it does not.

    The target is a constant, or a Concat whose last piece is one (through tf2onnx's Casts).
    A last element of -1 needs no edit (index -1). ``channels`` None (unknown): any positive
    last element.
    """
    target = reshape.inputs[1] if len(reshape.inputs) > 1 else None
    array = constant(target)

    def fits(last: int) -> bool:
        return last == channels if channels is not None else last > 0

    if array is not None:
        last = int(array.reshape(-1)[-1]) if array.size == rank else 0
        if last == -1 and channels is not None:
            return ShapeEdit(reshape, -1, rank - 1, reshape)
        return ShapeEdit(reshape, 1, rank - 1, reshape) if fits(last) else None
    concat = target.producer() if target is not None else None
    while concat is not None and concat.op_type == "Cast" and concat.inputs[0] is not None:
        if len(concat.outputs[0].uses()) != 1:  # tf2onnx casts the computed target to int64
            return None
        concat = concat.inputs[0].producer()
    if concat is None or concat.op_type != "Concat" or not concat.inputs:
        return None
    if concat.outputs[0] is not target and len(concat.outputs[0].uses()) != 1:
        return None  # shared behind a Cast: a copy would not reach this Reshape alone
    piece = constant(concat.inputs[-1])
    last = int(piece.reshape(-1)[-1]) if piece is not None and piece.size else 0
    if not fits(last):
        return None
    return ShapeEdit(concat, len(concat.inputs) - 1, piece.size - 1, reshape)  # type: ignore[union-attr]


def reduce_axes(node: ir.Node) -> list[int] | None:
    """A Reduce node's axes: the constant input (opset 18+) or the attribute; None if neither."""
    given = constant(node.inputs[1]) if len(node.inputs) > 1 else None
    if given is not None:
        return [int(a) for a in given.reshape(-1)]
    attr = node.attributes.get("axes")
    return list(attr.as_ints()) if attr is not None else None


def _unit_spatial(shape: ir.Shape | None) -> bool:
    """``[N, C]`` or ``[N, C, 1, ...]``: channels on axis 1 and nothing else but the batch."""
    return shape is not None and len(shape) >= 2 and all(d == 1 for d in list(shape)[2:])
