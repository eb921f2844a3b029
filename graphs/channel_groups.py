"""Find the channel groups of a graph: output channels that can be cut together, and how.

A *group* is one channel space shared by tensors that must stay aligned: the outputs of the
Conv, Gemm and MatMul layers that produce it (several when residual Adds join them; a MatMul's
bias follows in an Add, as tf2onnx writes a Keras ``Dense``), the ops it
passes through (activations, BatchNormalization, depthwise Conv, per-channel constants,
global pooling, the ``[N, C, 1, 1] -> [N, C]`` flatten before a classifier, and tf2onnx's
global pooling of a Keras model: a Transpose to channels-last, then a Reduce over H and W)
and the layers that consume it (a Conv's, Gemm's or MatMul's input channels). Cutting channel
``c`` of a group removes row ``c`` from every producer, the entries ``c`` of every
pass-through parameter, and column ``c`` from every consumer, so every tensor of the group
physically shrinks. Channels are axis 1 (NCHW feature maps, ``[batch, features]``), or the
last axis (a MatMul's output on a 3-D input, a transformer's FFN; an NHWC tensor after a
Transpose, as tf2onnx writes Keras models; ``Group.channels_last``), where only
elementwise ops and Reshapes that keep every token whole (GPT-2's ``[B * S, C]`` Gemms,
tf2onnx's Tensordot for a Keras ``Dense`` on a feature map) may pass them on, and a Shape
may read the other dims. Constant Pads and Resizes (upsampling) that leave the channel axis
alone pass channels on too.

A Concat on the channel axis (a DenseNet's dense block, a U-Net's skip, a YOLO neck) passes
each input group's channels on at an offset (:class:`Segment`): the group also cuts, at that
offset, whatever works on the Concat's output (BatchNorm, per-channel constants, depthwise
convs, the consumers' input columns, further Concats), and the output shrinks by what the
group removes. A Split on the channel axis (YOLOv8's C2f) gives each output a slice of the
group's channels (:class:`Part`): what works on an output is cut by the group's kept channels
in that slice, the Split's sizes are rewritten, and the group keeps the same share of each
slice. A consumer may take a group several ways (both halves of a Split, concatenated).

A grouped Conv (ResNeXt, RegNet) is a layer like the others, except that the groups it
takes and makes must keep as many channels in each of its blocks (``Group.blocks``); its
weight's input columns are cut block by block.

A group is *blocked*, with the reason kept, when any of its tensors reaches something that
would need the removed channels: a graph output, a graph input, an op not listed above, a
Concat on another axis, two Concat or Split outputs added together (their groups would have
to be cut as one), or a weight shared by two nodes (the pruning pass first gives each use its
own copy: :func:`unshare_initializers`). A layer whose output is added to a Concat or Split
output is cut by the groups that make that output, at their offsets, not on its own.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxpipe.graphs.base import attr_int, constant, new_initializer

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


@dataclass
class Segment:
    """Where a group's channels sit in a Concat's output: input ``index`` of ``concat``.

    ``inner``: the segment of the Concat output that this Concat takes in turn (a DenseNet
    block concatenates its growing features again), None for a group's own tensor. ``start``
    is the offset when the analysis ran (where sampled activations have the channels);
    :meth:`offset` is the offset now, after other groups of the same Concat were cut.
    """

    concat: ir.Node
    index: int
    inner: Segment | None = None
    start: int = 0

    def __post_init__(self) -> None:
        self.start = self.offset()

    def offset(self) -> int:
        """The first channel of the group in the outermost Concat's output, as shapes are now."""
        axis = _concat_axis(self.concat)
        before = sum(static_dim(value, axis) for value in self.concat.inputs[: self.index])
        return before + (self.inner.offset() if self.inner is not None else 0)


@dataclass
class Part:
    """The slice of a group's channels that a Split on the channel axis gives output ``index``.

    ``start`` and ``length`` are in the group's channels, as the analysis found them.
    """

    split: ir.Node
    index: int
    start: int
    length: int

    def local(self, keep: np.ndarray) -> np.ndarray:
        """The kept channels (of the group) that fall in this slice, counted from its start."""
        inside = keep[(keep >= self.start) & (keep < self.start + self.length)]
        return inside - self.start


@dataclass
class Cut:
    """One array to slice when the group's channels are cut: ``value`` along ``axis``.

    With a ``segment``, the array spans a Concat's output and the group's channels start at
    the segment's offset on that axis. With a ``part``, only that slice of the group's
    channels reaches the array (through a Split).
    """

    value: ir.Value
    axis: int
    segment: Segment | None = None
    part: Part | None = None
    groups: int = 1
    """A grouped Conv's weight as a consumer (axis 1 holds one block's channels): each block
    of output rows keeps the columns of its own block of input channels."""


@dataclass
class ShapeEdit:
    """The element of a Reshape target that holds a group's channel count.

    ``node.inputs[index]`` is the constant: the Reshape's own target, or the last piece of the
    Concat that computes it. The cut writes a fresh constant there (equal shape constants are
    often one shared initializer), into a copy of the Concat when other nodes use it too.
    """

    node: ir.Node
    index: int
    position: int
    reshape: ir.Node

    def count(self) -> int:
        """The channel count the target holds now."""
        array = constant(self.node.inputs[self.index])
        assert array is not None
        return int(array.reshape(-1)[self.position])


@dataclass
class Group:
    """One channel space and everything that must change with it."""

    key: str
    channels: int
    producers: list[ir.Node] = field(default_factory=list)
    consumers: list[ir.Node] = field(default_factory=list)
    tensors: list[ir.Value] = field(default_factory=list)
    cuts: list[Cut] = field(default_factory=list)
    depthwise: list[ir.Node] = field(default_factory=list)
    reshapes: list[ShapeEdit] = field(default_factory=list)
    channels_last: list[ir.Value] = field(default_factory=list)
    """The tensors (of rank 3 or more) whose channels are the last axis: a transformer's token
    features, a Keras model's NHWC tensors between tf2onnx's Transposes."""
    blocked: list[str] = field(default_factory=list)
    wide: list[tuple[ir.Value, Part | None]] = field(default_factory=list)
    wide_last: list[ir.Value] = field(default_factory=list)
    wide_depthwise: list[tuple[ir.Node, Part | None]] = field(default_factory=list)
    wide_reshapes: list[tuple[ShapeEdit, Part | None]] = field(default_factory=list)
    """Tensors (``wide_last``: those with channels last), depthwise convs and Reshape targets
    behind a Concat or a Split: their channel count shrinks by what the group removes (of
    the part, behind a Split)."""
    spans: dict[int, list[tuple[Segment | None, Part | None]]] = field(default_factory=dict)
    """How each consumer (by ``id``) that takes the group through Concats or a Split sees it:
    one (segment, part) per way in (YOLOv8's C2f concatenates both halves of a Split)."""
    parts: list[Part] = field(default_factory=list)
    """The Split outputs the group's channels are divided into (their sizes change)."""
    blocks: int = 1
    """Equal blocks the channels fall into for grouped Convs: each keeps as many."""

    def width(self, part: Part | None) -> int:
        """How many of the group's channels reach through ``part`` (all of them for None)."""
        return part.length if part else self.channels

    def kept(self, keep: np.ndarray, part: Part | None) -> np.ndarray:
        """Kept channels ``keep`` as ``part`` sees them, from its start (all of them for None)."""
        return part.local(keep) if part else keep

    def span(self, node: ir.Node) -> list[tuple[Segment | None, Part | None]]:
        """The (segment, part) ways ``node`` consumes the group; empty when it takes it whole."""
        return self.spans.get(id(node), [])

    @property
    def axis(self) -> int:
        """-1 when some channels sit on the last axis (``channels_last``), else 1."""
        return -1 if self.channels_last else 1

    def producer_cuts(self) -> list[Cut]:
        """The cuts on producer weights (rows = output channels), for scoring."""
        return [c for c in self.cuts if c.value in {p.inputs[1] for p in self.producers}]

    def consumer_cuts(self) -> list[Cut]:
        """The cuts on consumer weights (columns = input channels), for scoring."""
        return [c for c in self.cuts if c.value in {n.inputs[1] for n in self.consumers}]


def _rank(value: ir.Value) -> int | None:
    return None if value.shape is None else len(value.shape)


def _is_depthwise(node: ir.Node) -> bool:
    """A Conv with one input channel and one output channel per group."""
    weight = constant(node.inputs[1])
    group = attr_int(node, "group", 1)
    return weight is not None and group > 1 and weight.shape[0] == group and weight.shape[1] == 1


def _is_producer(node: ir.Node) -> bool:
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


class _Analysis:
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
        self.values[id(value)] = value
        return self.uf.find(id(value))

    def join(self, a: ir.Value, b: ir.Value) -> None:
        self.track(a)
        self.track(b)
        self.uf.union(id(a), id(b))

    def block(self, value: ir.Value, reason: str) -> None:
        self.track(value)
        self.blocked.setdefault(id(value), []).append(reason)

    def cut(self, activation: ir.Value, param: ir.Value, axis: int) -> None:
        self.track(activation)
        self.cuts.setdefault(id(activation), []).append((param, axis))

    def visit(self, node: ir.Node) -> None:
        op, ins = node.op_type, list[Any](node.inputs)
        acts = [v for v in ins if v is not None and constant(v) is None]
        last = any(id(v) in self.last for v in acts)
        if node.domain not in ("", "ai.onnx"):
            self._opaque(node, acts)
        elif op == "MatMul" and _is_producer(node):
            self._matmul(node)
        elif op in self.passing and self.passing[op](node):
            pass  # its handler passed the channels on
        elif last and op not in UNARY and op not in BINARY and op not in REDUCES:
            self._opaque(node, acts)  # pooling, BatchNorm, reshapes: written for axis 1
        elif _is_producer(node):
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
        axis = _concat_axis(node)
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


def _concat_axis(node: ir.Node) -> int:
    """A Concat's axis, made non-negative with its output's rank (-1 when the rank is unknown)."""
    rank = _rank(node.outputs[0])
    return attr_int(node, "axis", 0) % rank if rank else -1


def static_dim(value: ir.Value | None, axis: int) -> int:
    """``value``'s size on ``axis``, which the analysis checked is static."""
    assert value is not None and value.shape is not None
    dim = value.shape[axis]
    assert isinstance(dim, int), f"{value.name}: dim {axis} is not static"
    return dim


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


def unshare_initializers(model: ir.Model) -> list[tuple[str, str]]:
    """Give every extra use of a shared multi-element initializer its own copy.

    Returns (copy, original) name pairs, for :func:`merge_equal_copies` after the cut.

    Deduplication merges equal constants (zero biases, the untouched BatchNorm parameters of
    ``keras.applications(weights=None)``), and a shared constant blocks its group: cutting it
    for one layer would cut it for the others. Copies compute the same thing; the ones still
    equal after the cut are merged back (a tied embedding read by a Gather and, through a
    Transpose, by the LM head: GPT-2 would otherwise ship its largest table twice).

    A weight shared by layers (the weight input of two Conv/Gemm/MatMul nodes: tied, or
    equal and merged by dedup) stays one tensor and its groups stay blocked: each copy would
    be cut its own way and the model would grow (the onnx zoo's light SqueezeNet, whose
    constant-filled expand weights dedup merges: +22.6% parameters at ratio 0.3).
    """
    graph = model.graph
    copies: list[tuple[str, str]] = []
    for name, value in list(graph.initializers.items()):
        tensor = value.const_value
        uses = list(value.uses())
        if tensor is None or tensor.size <= 1 or len(uses) < 2 or value.is_graph_output():
            continue
        if sum(_is_weight_use(node, index) for node, index in uses) >= 2:
            continue
        for k, (node, index) in enumerate(uses[1:], start=1):
            copy = new_initializer(graph, f"{name}__{k}", tensor.numpy().copy())
            node.replace_input_with(index, copy)
            copies.append((copy.name or "", name))
    return copies


def merge_equal_copies(model: ir.Model, copies: Sequence[tuple[str, str]]) -> int:
    """Merge each copy back into its original, or an earlier copy, that it still equals.

    Returns how many copies were merged.
    """
    graph = model.graph
    kept: dict[str, list[ir.Value]] = {}  # per original: the tensors left standing
    merged = 0
    for fresh, name in copies:
        copy = graph.initializers.get(fresh)
        if copy is None or copy.const_value is None:
            continue
        standing = kept.setdefault(name, [v for v in [graph.initializers.get(name)] if v])
        target = next((v for v in standing if _equal_constants(v, copy)), None)
        if target is None:
            standing.append(copy)
            continue
        for node, index in list(copy.uses()):
            node.replace_input_with(index, target)
        del graph.initializers[fresh]
        merged += 1
    return merged


def _equal_constants(a: ir.Value, b: ir.Value) -> bool:
    x, y = a.const_value, b.const_value
    if x is None or y is None or x.shape != y.shape or x.dtype != y.dtype:
        return False
    return bool(np.array_equal(x.numpy(), y.numpy()))


def _is_weight_use(node: ir.Node, index: int) -> bool:
    """``node`` takes the constant as a layer weight: a Conv's kernel, a Gemm/MatMul operand."""
    if node.op_type in ("Conv", "ConvTranspose"):
        return index == 1
    return node.op_type in ("Gemm", "MatMul") and index in (0, 1)


def infer_missing_shapes(model: ir.Model) -> None:
    """Infer, into ``model``, the tensor shapes it does not carry.

    Files that ONNX Runtime optimized drop them, and a tensor of unknown rank blocks its
    group. Run it once on a model that is copied for many cuts, so that each copy has them.
    """
    if any(o.shape is None for node in model.graph for o in node.outputs):
        common.ShapeInferencePass(check_type=False, strict_mode=False)(model)


def find_groups(model: ir.Model) -> list[Group]:
    """Every channel group of the model's main graph, blocked ones included (with reasons).

    Tensor shapes the model does not carry are inferred first (:func:`infer_missing_shapes`).
    """
    infer_missing_shapes(model)
    graph = model.graph
    analysis = _Analysis(graph)
    for node in graph:
        analysis.visit(node)
    for value in graph.inputs:
        analysis.block(value, f"is graph input {value.name!r}")
    for value in graph.outputs:
        analysis.block(value, f"reaches graph output {value.name!r}")

    uf = analysis.uf
    roots: dict[int, list[ir.Value]] = {}
    for key, value in analysis.values.items():
        roots.setdefault(uf.find(key), []).append(value)
    groups: list[Group] = []
    for members in roots.values():
        producers = [
            v.producer()
            for v in members
            if v.producer() is not None and _is_producer(v.producer())  # type: ignore[arg-type]
        ]
        if not producers:
            continue
        first = producers[0]
        group = Group(key=first.inputs[1].name or first.name or "?", channels=0)  # type: ignore[union-attr]
        group.producers = producers  # type: ignore[assignment]
        group.tensors = members
        group.channels_last = [v for v in members if id(v) in analysis.last]
        group.blocked += [
            f"added to the output of {analysis.assembled[id(v)]}: cut with the layers that make it"
            for v in members
            if id(v) in analysis.assembled
        ]
        _collect(group, analysis, members)
        _follow_concats(group, analysis, roots, members)
        _follow_splits(group, analysis, roots, members)
        ids = {id(v) for v in members}
        _check_sizes(group, {n for v, n in analysis.expects if id(v) in ids})
        counts = {g for vid in ids for g in analysis.blocks.get(vid, ())}
        group.blocks = math.lcm(*counts) if counts else 1
        if group.blocks > 1 and (group.parts or group.channels % group.blocks):
            group.blocked.append(
                f"grouped Convs need {group.blocks} equal blocks of its {group.channels} channels"
                + (", and a Split divides them too" if group.parts else "")
            )
        groups.append(group)
    return groups


def _collect(
    group: Group,
    analysis: _Analysis,
    members: list[ir.Value],
    segment: Segment | None = None,
    part: Part | None = None,
) -> None:
    """Add what ``members`` (one channel space) cut to ``group``, behind ``segment``/``part``."""
    ids = {id(v) for v in members}
    via = f"through Concat node {segment.concat.name!r}, " if segment is not None else ""
    via += f"through Split node {part.split.name!r}, " if part is not None else ""
    for vid in ids:
        group.blocked += [via + r for r in analysis.blocked.get(vid, [])]
        group.cuts += [Cut(p, a, segment, part) for p, a in analysis.cuts.get(vid, [])]
        for node, weight, axis in analysis.consumers.get(vid, []):
            if id(node) not in group.spans:  # listed once, however many ways it takes it
                group.consumers.append(node)
            grouped = attr_int(node, "group", 1) if node.op_type == "Conv" else 1
            group.cuts.append(Cut(weight, axis, segment, part, grouped))
            if grouped > 1 and via:
                group.blocked.append(f"{via}grouped Conv node {node.name!r} takes it")
            if via:
                group.spans.setdefault(id(node), []).append((segment, part))
    depthwise = [n for n, out in analysis.depthwise if id(out) in ids]
    reshapes = [edit for v, edit in analysis.reshapes if id(v) in ids]
    if not via:
        group.depthwise, group.reshapes = depthwise, reshapes
        return
    group.wide += [(v, part) for v in members]
    group.wide_last += [v for v in members if id(v) in analysis.last]
    group.wide_depthwise += [(n, part) for n in depthwise]
    group.wide_reshapes += [(edit, part) for edit in reshapes]


def _joins_another(analysis: _Analysis, values: list[ir.Value]) -> bool:
    """Whether a channel space holds more than one Concat/Split output (Adds joined them).

    One is fine, even joined to layers' outputs (a residual block on a Concat output, the
    bottleneck that adds its input back in YOLOv8's C2f): the layers' rows are cut with the
    group that owns that slice. Two would need their groups cut as one.
    """
    return sum(id(v) in analysis.assembled for v in values) > 1


def _is_split(analysis: _Analysis, values: list[ir.Value]) -> bool:
    """Whether a Split divides any of ``values`` (one channel space)."""
    inside = {id(v) for v in values}
    return any(id(v) in inside for v, _ in analysis.splits)


def _follow_concats(
    group: Group,
    analysis: _Analysis,
    roots: dict[int, list[ir.Value]],
    members: list[ir.Value],
    inner: Segment | None = None,
    part: Part | None = None,
) -> None:
    """Hand ``group`` the channel spaces of the Concats that ``members`` feed, recursively."""
    ids = {id(v) for v in members}
    for value, link in analysis.links:
        if id(value) not in ids:
            continue
        segment = Segment(link.concat, link.index, inner)
        spread = roots[analysis.uf.find(id(link.concat.outputs[0]))]
        if _joins_another(analysis, spread):
            group.blocked.append(
                f"Concat node {link.concat.name!r}: its output is added to another Concat's "
                "or Split's"
            )
            continue
        _collect(group, analysis, spread, segment, part)
        _follow_concats(group, analysis, roots, spread, segment, part)
        if _is_split(analysis, spread):
            group.blocked.append(f"Concat node {link.concat.name!r}: its output is split again")


def _follow_splits(
    group: Group, analysis: _Analysis, roots: dict[int, list[ir.Value]], members: list[ir.Value]
) -> None:
    """Hand ``group`` the channel spaces of the Split outputs its tensors are divided into."""
    ids = {id(v) for v in members}
    for value, part in analysis.splits:
        if id(value) not in ids:
            continue
        spread = roots[analysis.uf.find(id(part.split.outputs[part.index]))]
        if _joins_another(analysis, spread):
            group.blocked.append(
                f"Split node {part.split.name!r}: output {part.index} is added to another "
                "Concat's or Split's"
            )
            continue
        if _is_split(analysis, spread):
            name = part.split.name
            group.blocked.append(f"Split node {name!r}: output {part.index} is split again")
            continue
        if any(other.split is not part.split for other in group.parts):
            group.blocked.append(f"Split node {part.split.name!r}: the channels are split twice")
            continue
        group.parts.append(part)
        _collect(group, analysis, spread, None, part)
        _follow_concats(group, analysis, roots, spread, None, part)


def _check_sizes(group: Group, expected: set[int]) -> None:
    """Every cut must see one channel count, every sliced weight must be used once.

    ``expected``: counts that Reshape targets fix where the tensor's shape did not say. A cut
    through a Concat must span the Concat's whole output instead.
    """
    sizes = set(expected)
    spanned: list[Cut] = []
    for cut in group.cuts:
        array = constant(cut.value)
        if array is None or not cut.value.is_initializer():
            group.blocked.append(f"{cut.value.name!r} is not an initializer")
            continue
        if cut.axis >= array.ndim:
            group.blocked.append(f"{cut.value.name!r} has no axis {cut.axis}")
            continue
        if cut.segment is None and cut.part is None:
            sizes.add(array.shape[cut.axis] * cut.groups)  # a grouped Conv reads a block
        else:
            spanned.append(cut)
        if len(cut.value.uses()) != 1 or cut.value.is_graph_output():
            group.blocked.append(f"weight {cut.value.name!r} is shared by several nodes")
    if len(sizes) != 1:
        group.blocked.append(f"channel counts disagree: {sorted(sizes)}")
    group.channels = min(sizes) if sizes else 0
    for cut in spanned:
        if cut.segment is not None:
            concat = cut.segment.concat
            width = static_dim(concat.outputs[0], _concat_axis(concat))
        else:
            width = cut.part.length  # type: ignore[union-attr]
        if constant(cut.value).shape[cut.axis] * cut.groups != width:  # type: ignore[union-attr]
            group.blocked.append(f"{cut.value.name!r} does not span the {width} channels it takes")
    if not group.consumers and not group.blocked:
        group.blocked.append("no consumer takes these channels")
