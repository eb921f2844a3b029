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
own copy: :mod:`onnxpipe.graphs.shared_weights`). A layer whose output is added to a Concat or
Split output is cut by the groups that make that output, at their offsets, not on its own.
"""

from __future__ import annotations

import logging
import math

import onnx_ir as ir
import onnx_ir.passes.common as common

from onnxpipe.graphs.base import attr_int, constant
from onnxpipe.graphs.channel_space import (
    Cut,
    Group,
    Part,
    Segment,
    concat_axis,
    static_dim,
)
from onnxpipe.graphs.channel_walk import ChannelWalk, is_producer

logger = logging.getLogger(__name__)


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
    analysis = ChannelWalk(graph)
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
            if v.producer() is not None and is_producer(v.producer())  # type: ignore[arg-type]
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
    analysis: ChannelWalk,
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


def _joins_another(analysis: ChannelWalk, values: list[ir.Value]) -> bool:
    """Whether a channel space holds more than one Concat/Split output (Adds joined them).

    One is fine, even joined to layers' outputs (a residual block on a Concat output, the
    bottleneck that adds its input back in YOLOv8's C2f): the layers' rows are cut with the
    group that owns that slice. Two would need their groups cut as one.
    """
    return sum(id(v) in analysis.assembled for v in values) > 1


def _is_split(analysis: ChannelWalk, values: list[ir.Value]) -> bool:
    """Whether a Split divides any of ``values`` (one channel space)."""
    inside = {id(v) for v in values}
    return any(id(v) in inside for v, _ in analysis.splits)


def _follow_concats(
    group: Group,
    analysis: ChannelWalk,
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
    group: Group, analysis: ChannelWalk, roots: dict[int, list[ir.Value]], members: list[ir.Value]
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
            width = static_dim(concat.outputs[0], concat_axis(concat))
        else:
            width = cut.part.length  # type: ignore[union-attr]
        if constant(cut.value).shape[cut.axis] * cut.groups != width:  # type: ignore[union-attr]
            group.blocked.append(f"{cut.value.name!r} does not span the {width} channels it takes")
    if not group.consumers and not group.blocked:
        group.blocked.append("no consumer takes these channels")
