"""Structured channel pruning: remove whole output channels of Conv/Gemm/MatMul layers.

The cut is propagated through each channel group (see :mod:`onnxpipe.graphs.channel_groups`):
producer rows and biases, BatchNormalization parameters, depthwise Conv weights and ``group``,
per-channel constants, the flatten before a classifier and the consumers' input channels.
In a transformer the FFN's hidden features (MatMul + Add -> activation -> MatMul, channels
on the last axis) are cut; attention projections are not (the head reshape needs them all).
Tensors physically shrink, so unlike magnitude pruning this makes ONNX Runtime faster.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir
from pydantic import Field, field_validator

from onnxpipe.graphs.base import (
    GraphPass,
    PassConfig,
    attr_int,
    computed_weights_hint,
    new_initializer,
    parameter_count,
)
from onnxpipe.graphs.channel_groups import find_groups
from onnxpipe.graphs.channel_refit import collect_inputs, refit_consumers
from onnxpipe.graphs.channel_space import Cut, Group, Part, ShapeEdit, static_dim
from onnxpipe.graphs.quant_utils import cpu_flags
from onnxpipe.graphs.shared_weights import merge_equal_copies, unshare_initializers

logger = logging.getLogger(__name__)


class PruneChannelsConfig(PassConfig):
    """Settings of :class:`PruneChannelsPass`."""

    ratio: float = Field(
        0.3, gt=0.0, lt=1.0, description="share of each group's channels to remove, in (0, 1)"
    )
    ratios: dict[str, float] | None = Field(
        None,
        description="per-group ratios by group key (first producer's weight name); when given, "
        "groups not listed are left alone and 'ratio' is only the upper bound",
    )
    criterion: Literal["weight", "activation"] = Field(
        "weight",
        description="channel importance: weight = producer row norm x consumer column norm; "
        "activation = RMS activation on the given feeds x consumer column norm",
    )
    multiple_of: int | None = Field(
        None,
        ge=1,
        description="keep a multiple of this many channels (None: this CPU's NCHWc block, 16 "
        "with AVX-512, else 8): ORT's NCHWc conv kernels pad channel counts to the SIMD "
        "block, so a cut that is not a multiple of it saves little time",
    )
    min_channels: int = Field(8, ge=1, description="never keep fewer channels than this")
    refit: Literal["none", "bias", "lstsq"] = Field(
        "bias",
        description="with criterion=activation, compensate the consumers of a cut group on "
        "the feeds: bias = fold the removed channels' mean contribution into the bias; "
        "lstsq = also refit 1x1 Conv/Gemm/MatMul weights by ridge regression, on 4 rows per "
        "kept channel or more (a classifier behind global mean pooling on the positions of the "
        "map before it). On EfficientNet-Lite0, 30% of one group cut with channels from 15 "
        "photos, it lowered the KL on 14 other photos in 20 of 21 groups (block 1: 0.10 -> "
        "0.012), yet the gated search cut no more with it (0.997x params)",
    )
    ridge: float = Field(
        1.0,
        gt=0.0,
        description="lstsq refit: pull toward the original weights, relative to the mean "
        "channel variance (large = bias compensation only)",
    )

    @field_validator("ratios")
    @classmethod
    def _ratios_in_range(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, ratio in (value or {}).items():
            if not 0.0 <= ratio < 1.0:
                raise ValueError(f"ratio {ratio} for group {key!r} must lie in [0, 1)")
        return value


class PruneChannelsPass(GraphPass[PruneChannelsConfig]):
    """Remove the least important output channels of every prunable Conv/Gemm/MatMul group.

    Refuses (``PassError``) a model with no prunable group, naming why each group is blocked.
    Groups that cannot be cut safely are skipped and listed in ``metrics["skipped"]``.
    """

    name = "prune_channels"
    config_class = PruneChannelsConfig
    modifies_in_place = True

    def __init__(
        self,
        config: PruneChannelsConfig | None = None,
        *,
        feeds: Sequence[Mapping[str, np.ndarray]] = (),
        inputs: Mapping[str, np.ndarray] | None = None,
        **settings: Any,
    ) -> None:
        """``feeds``, or ``inputs`` from :func:`collect_inputs`, serve criterion=activation."""
        super().__init__(config, **settings)
        self.feeds = list(feeds)
        self.inputs = inputs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Cut channels group by group; see the class docstring."""
        from onnxpipe.errors import PassError  # noqa: PLC0415 - errors is a leaf module

        before = parameter_count(model)
        unshared = unshare_initializers(model)
        groups = find_groups(model)
        prunable = [g for g in groups if not g.blocked]
        skipped = {g.key: sorted(set(g.blocked)) for g in groups if g.blocked}
        if not prunable:
            reasons = (
                "; ".join(f"{k}: {v[0]}" for k, v in skipped.items())
                or "no Conv/Gemm/MatMul with a constant weight"
            )
            hint = computed_weights_hint(model, ("Conv", "Gemm", "MatMul")) + _fused_hint(model)
            raise PassError(
                "nothing to prune: no Conv/Gemm/MatMul output channels can be cut safely "
                f"({reasons}).{hint}"
            )
        inputs: Mapping[str, np.ndarray] = {}
        if self.config.criterion == "activation":
            inputs = self.inputs or collect_inputs(model, prunable, self.feeds)
        changes: dict[str, list[int]] = {}
        for group in prunable:
            ratio = self._ratio(group)
            if self.keep_count(group.channels, ratio) >= group.channels:
                continue
            keep = self.select(group, channel_scores(group, inputs), ratio)
            keep_n = len(keep)
            if keep_n >= group.channels:
                continue
            if inputs and self.config.refit != "none":
                refit_consumers(
                    group, keep, inputs, self.config.refit == "lstsq", self.config.ridge
                )
            apply_cut(group, keep)
            changes[group.key] = [group.channels, keep_n]
            logger.debug("group %s: %d -> %d channels", group.key, group.channels, keep_n)
        merge_equal_copies(model, unshared)
        after = parameter_count(model)
        if changes:
            logger.info("pruned %d channel groups: %d -> %d params", len(changes), before, after)
        self.metrics = {
            "groups": len(groups),
            "groups_prunable": len(prunable),
            "groups_pruned": len(changes),
            "channels": changes,
            "skipped": skipped,
            "params_before": before,
            "params_after": after,
        }
        return ir.passes.PassResult(model, modified=bool(changes))

    def _ratio(self, group: Group) -> float:
        if self.config.ratios is None:
            return self.config.ratio
        return min(self.config.ratios.get(group.key, 0.0), self.config.ratio)

    def select(self, group: Group, scores: np.ndarray, ratio: float) -> np.ndarray:
        """The channels ``group`` keeps at ``ratio``: the best scored, counted per Split part.

        A group divided by a Split keeps the same share of each part, so that no Split
        output is left empty and each part's count is rounded like a layer's. A group that
        grouped Convs take or make keeps as many channels in each of their blocks.
        """
        spans = [(p.start, p.length) for p in group.parts] or [(0, group.channels)]
        counts = [self.keep_count(length, ratio) for _, length in spans]
        if group.blocks > 1:  # grouped Convs: as many in every block, the total rounded up
            size = group.channels // group.blocks
            spans = [(b * size, size) for b in range(group.blocks)]
            counts = [math.ceil(counts[0] / group.blocks)] * group.blocks
        chosen = [
            start + np.argsort(-scores[start : start + length], kind="stable")[:count]
            for (start, length), count in zip(spans, counts, strict=True)
        ]
        return np.sort(np.concatenate(chosen))

    def keep_count(self, channels: int, ratio: float) -> int:
        """Channels a group of ``channels`` keeps at ``ratio``: rounded up to the multiple."""
        if ratio <= 0:
            return channels
        step = self.config.multiple_of or nchwc_block()
        keep = channels - int(round(channels * ratio))
        keep = int(math.ceil(keep / step) * step)
        return min(channels, max(keep, self.config.min_channels))


def _fused_hint(model: ir.Model) -> str:
    """Why a transformer's layers offer no group after ``optimize --transformer``; else empty."""
    fused = sorted({n.op_type for n in model.graph if n.domain == "com.microsoft"})
    if not fused:
        return ""
    return (
        f" The model holds ONNX Runtime's fused ops ({', '.join(fused)}), whose channels "
        "pruning does not follow: prune the bundle before optimize --transformer, then optimize "
        "the result."
    )


def nchwc_block() -> int:
    """Channels per SIMD block of ORT's NCHWc conv kernels on this CPU.

    Measured on a 2-core AVX-512 machine (1x1 + depthwise 3x3 + 1x1 at 56x56): 96 channels
    0.53 ms, 104 0.69, 112 0.71, 120 0.78, 128 0.80: time steps at multiples of 16.
    """
    return 16 if "avx512f" in cpu_flags() else 8


def _norms(cut: Any) -> np.ndarray:
    array = np.moveaxis(cut.value.const_value.numpy().astype(np.float64), cut.axis, 0)
    return np.sqrt((array.reshape(array.shape[0], -1) ** 2).sum(1))


def _grouped_norms(cut: Any) -> np.ndarray:
    """Per input channel, the norm of the grouped Conv weights that read it."""
    array = cut.value.const_value.numpy().astype(np.float64)
    rows = array.shape[0] // cut.groups
    # [groups, rows, in / groups, ...] -> [groups, in / groups]: block b's rows read block b
    blocks = array.reshape(cut.groups, rows, array.shape[1], -1)
    return np.sqrt((blocks**2).sum(axis=(1, 3))).reshape(-1)


def channel_scores(group: Group, inputs: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
    """Importance per channel, summed over the group's consumers.

    With ``inputs`` (sampled consumer inputs): RMS of the channel's activation x the norm of
    the consumer's weights for it, i.e. how much the channel feeds forward. Without: producer
    row norm x consumer column norm. Each layer's numbers are divided by their mean so one
    large layer does not decide alone for a group joined by residual Adds.
    """
    total = np.zeros(group.channels)
    producer = np.zeros(group.channels)
    for cut in group.producer_cuts():
        n = _norms(cut)
        producer += n / max(float(n.mean()), 1e-12)
    consumer_weights = {cut.value.name: cut for cut in group.consumer_cuts()}
    for node in group.consumers:
        found = consumer_weights.get(node.inputs[1].name)  # type: ignore[union-attr]
        if found is None:
            continue
        now, then, channel = group.columns(node)
        col = _norms(found)[now] if found.groups == 1 else _grouped_norms(found)
        x = inputs.get(node.inputs[0].name or "") if inputs and node.inputs[0] else None
        rms = np.sqrt((x[:, then].astype(np.float64) ** 2).mean(0)) if x is not None else None
        source = rms if rms is not None else producer[channel]
        score = source * col
        np.add.at(total, channel, score / max(float(score.mean()), 1e-12))
    return total


def apply_cut(group: Group, keep: np.ndarray) -> None:
    """Keep only channels ``keep`` everywhere in ``group`` (weights, attributes, shapes)."""
    n = len(keep)

    def removed(part: Part | None) -> int:
        return group.width(part) - len(group.kept(keep, part))

    # Each cut names the entries it drops; an array that takes the group several ways (both
    # halves of a Split in one Concat) drops them all at once. Offsets in Concat outputs are
    # read before this cut changes the shapes they are summed from.
    dropped: dict[tuple[int, int], tuple[Cut, list[np.ndarray]]] = {}
    for cut in group.cuts:
        if cut.groups > 1:
            _cut_grouped(cut, keep, group.channels)
            continue
        kept = group.kept(keep, cut.part)
        drop = np.setdiff1d(np.arange(group.width(cut.part)), kept)
        drop += cut.segment.offset() if cut.segment else 0
        dropped.setdefault((id(cut.value), cut.axis), (cut, []))[1].append(drop)
    for cut, drops in dropped.values():
        array = cut.value.const_value.numpy()  # type: ignore[union-attr]
        index = np.setdiff1d(np.arange(array.shape[cut.axis]), np.concatenate(drops))
        sliced = np.ascontiguousarray(np.take(array, index, axis=cut.axis))
        cut.value.const_value = ir.tensor(sliced, name=cut.value.name)
        cut.value.shape = ir.Shape(sliced.shape)
    for node in group.depthwise:
        node.attributes["group"] = ir.AttrInt64("group", n)
    for node, part in group.wide_depthwise:
        groups = attr_int(node, "group", 1) - removed(part)
        node.attributes["group"] = ir.AttrInt64("group", groups)
    for edit in group.reshapes:
        _write_channels(edit, n)
    for edit, part in group.wide_reshapes:
        _write_channels(edit, edit.count() - removed(part))
    last = {id(v) for v in group.channels_last}  # a subset of the group's tensors
    for value in group.tensors:
        axis = -1 if id(value) in last else 1
        if value.shape is not None and len(value.shape) > 1:
            dims = list(value.shape)
            dims[axis] = n
            value.shape = ir.Shape(dims)
    wide_last = {id(v) for v in group.wide_last}
    for value, part in group.wide:  # behind a Concat or a Split
        shape = value.shape
        axis = -1 if id(value) in wide_last else 1
        if shape is not None and isinstance(count := shape[axis], int):
            dims = list(shape)
            dims[axis] = count - removed(part)
            value.shape = ir.Shape(dims)
    for split in {id(p.split): p.split for p in group.parts}.values():
        _write_split_sizes(split)


def _write_split_sizes(split: ir.Node) -> None:
    """Give a Split the sizes its outputs have now, as a constant input of its own."""
    graph = split.graph
    assert graph is not None
    axis = attr_int(split, "axis", 0) % len(split.outputs[0].shape or ())
    sizes = np.array([static_dim(out, axis) for out in split.outputs], np.int64)
    if "num_outputs" in split.attributes:
        del split.attributes["num_outputs"]
    opset = (graph.opset_imports or {}).get("", 13)
    if opset < 13:
        split.attributes["split"] = ir.AttrInt64s("split", [int(x) for x in sizes])
        return
    fresh = new_initializer(graph, f"{split.name or 'split'}_sizes", sizes)
    old = split.inputs[1] if len(split.inputs) > 1 else None
    if old is None:
        split.resize_inputs(2)
    split.replace_input_with(1, fresh)
    if old is not None and old.name in graph.initializers and not old.uses():
        del graph.initializers[old.name or ""]


def _cut_grouped(cut: Cut, keep: np.ndarray, channels: int) -> None:
    """A grouped Conv's input columns: each block of rows keeps its own block's channels.

    The weight is ``[out, in / groups, ...]``; output block ``b`` reads input block ``b``.
    """
    array = cut.value.const_value.numpy()  # type: ignore[union-attr]
    rows, size = array.shape[0] // cut.groups, channels // cut.groups
    pieces = [
        np.take(array[b * rows : (b + 1) * rows], keep[keep // size == b] - b * size, axis=1)
        for b in range(cut.groups)
    ]
    sliced = np.ascontiguousarray(np.concatenate(pieces))
    cut.value.const_value = ir.tensor(sliced, name=cut.value.name)
    cut.value.shape = ir.Shape(sliced.shape)


def _write_channels(edit: ShapeEdit, n: int) -> None:
    """Put ``n`` into a Reshape target's channel element, as a constant of its own.

    A Concat that computes the targets of other Reshapes too (GPT-2's layers share one) is
    copied for this Reshape first.
    """
    old = edit.node.inputs[edit.index]
    assert old is not None and old.const_value is not None
    array = old.const_value.numpy().copy()
    flat = array.reshape(-1)
    if flat[edit.position] <= 0:  # 0 copies the input's dim, -1 infers it: right as they are
        return
    flat[edit.position] = n
    graph = edit.node.graph
    assert graph is not None
    node = edit.node
    if node is not edit.reshape and len(node.outputs[0].uses()) > 1:
        attrs = {k: a.value for k, a in node.attributes.items()}
        node = ir.node(node.op_type, list(node.inputs), attrs, name=f"{node.name}_c{n}")
        graph.insert_before(edit.reshape, node)
        edit.reshape.replace_input_with(1, node.outputs[0])
    fresh = new_initializer(graph, f"{old.name}_c{n}", array)
    node.replace_input_with(edit.index, fresh)
    if old.name in graph.initializers and not old.uses() and not old.is_graph_output():
        del graph.initializers[old.name or ""]
