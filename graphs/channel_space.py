"""The records of a channel group, which channel_groups finds and prune_channels cuts by.

A :class:`Group` is one channel space; its :class:`Cut` entries are the arrays to slice, a
:class:`Segment` places the group's channels in a Concat's output, a :class:`Part` is the slice
a Split hands one of its outputs, and a :class:`ShapeEdit` is a Reshape target that holds the
channel count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxpipe.graphs.base import attr_int, constant


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
        axis = concat_axis(self.concat)
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

    def columns(self, node: ir.Node) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Where consumer ``node`` takes the group: weight columns now, sampled columns, channels.

        Three index arrays of one length: the input columns of the consumer's weight now, the
        columns of its sampled inputs, and the group channel each column carries. Every column,
        in order, for a consumer of the group's own tensors. Behind a Concat, the group's
        segment: at its offset now (other groups of the Concat may have been cut since the
        analysis) and at its offset when the inputs were sampled. Behind a Split, the part's
        channels only; a consumer may take the group several ways (both halves of a Split).
        """
        views = self.span(node) or [(None, None)]
        now, then, channel = [], [], []
        for segment, part in views:
            width = self.width(part)
            first = part.start if part else 0
            channel.append(np.arange(first, first + width))
            now.append(np.arange(width) + (segment.offset() if segment else 0))
            then.append(np.arange(width) + (segment.start if segment else 0))
        return np.concatenate(now), np.concatenate(then), np.concatenate(channel)

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


def concat_axis(node: ir.Node) -> int:
    """A Concat's axis, made non-negative with its output's rank (-1 when the rank is unknown)."""
    shape = node.outputs[0].shape
    rank = None if shape is None else len(shape)
    return attr_int(node, "axis", 0) % rank if rank else -1


def static_dim(value: ir.Value | None, axis: int) -> int:
    """``value``'s size on ``axis``, which the analysis checked is static."""
    assert value is not None and value.shape is not None
    dim = value.shape[axis]
    assert isinstance(dim, int), f"{value.name}: dim {axis} is not static"
    return dim
