"""What a :class:`~onnxpipe.graphs.channel_walk.ChannelWalk` records about channel spaces.

:class:`ChannelRecord` holds the union-find of tensors that share a channel space and, per
tensor, the constants to cut with it, the layers that consume it, and why it is blocked;
the walk's node handlers (:mod:`~onnxpipe.graphs.channel_shapes`,
:mod:`~onnxpipe.graphs.channel_walk`) write to it through :meth:`ChannelRecord.join`,
:meth:`~ChannelRecord.block` and :meth:`~ChannelRecord.cut`.
"""

from __future__ import annotations

import onnx_ir as ir

from onnxpipe.graphs.channel_space import Part, Segment, ShapeEdit


def rank_of(value: ir.Value) -> int | None:
    """The rank of ``value``; None when its shape is unknown."""
    return None if value.shape is None else len(value.shape)


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


class ChannelRecord:
    """The channel spaces of one graph, as a walk over its nodes finds them."""

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

    def _channel_axis(self, value: ir.Value, rank: int) -> int:
        """Where ``value``'s channels are: its last axis (``self.last``) or axis 1."""
        return rank - 1 if id(value) in self.last else 1

    def _opaque(self, node: ir.Node, acts: list[ir.Value]) -> None:
        what = f"{node.op_type} node {node.name!r}"
        for value in acts:
            self.block(value, f"feeds {what}, which needs every channel")
        for out in node.outputs:
            self.block(out, f"comes from {what}, not from a Conv/Gemm/MatMul")
