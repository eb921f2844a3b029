"""Refitting the layers that consume a cut channel group, on sampled inputs.

After a cut, each consumer (Conv 1x1, Gemm, MatMul) of the group has lost input columns.
:func:`refit_consumers` folds what the removed channels contributed on average into the
consumer's bias and, with enough samples, refits the kept columns by ridge regression so the
consumer's output on the sampled inputs changes as little as it can. :func:`collect_inputs`
samples those inputs; behind global mean pooling they are the positions of the map before the
pooling (:func:`pooled_source`), which give many more rows than the images.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import onnx_ir as ir

from onnxpipe.graphs.base import attr_int
from onnxpipe.graphs.channel_space import Group
from onnxpipe.graphs.channel_walk import reduce_axes
from onnxpipe.graphs.quant_utils import tap_session, token_rows

logger = logging.getLogger(__name__)


def collect_inputs(
    model: ir.Model,
    groups: Sequence[Group],
    feeds: Sequence[Mapping[str, np.ndarray]],
    max_rows: int = 20000,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """Samples ``[rows, channels]`` of every group consumer's input tensor, keyed by name.

    Spatial positions (or tokens) are subsampled so a large feature map costs at most
    ``max_rows`` rows; a transformer's padded tokens are left out (:func:`token_rows`).
    Channels are axis 1, except for a MatMul's input (its last axis). A
    consumer behind global mean pooling also gets the feature map before the pooling
    (:func:`pooled_source`), whose positions give the refit many more rows than the images.
    """
    axes: dict[str, int] = {}
    for node in (n for g in groups for n in g.consumers):
        if node.inputs[0] is None or not node.inputs[0].name:
            continue
        axes[node.inputs[0].name] = -1 if node.op_type == "MatMul" else 1
        source = pooled_source(node.inputs[0])
        if source is not None and source[0].name:
            axes[source[0].name] = source[1]
    names = list(axes)
    if not feeds or not names:
        return {}
    session = tap_session(model, names)
    rng = np.random.default_rng(seed)
    per_batch = max(1, max_rows // len(feeds))
    rows: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for batch in feeds:
        mask = batch.get("attention_mask")
        for name, out in zip(names, session.run(names, dict(batch)), strict=True):
            flat = token_rows(out, mask, axes[name])
            if len(flat) > per_batch:
                flat = flat[rng.choice(len(flat), per_batch, replace=False)]
            rows[name].append(flat.astype(np.float32))
    return {name: np.concatenate(parts) for name, parts in rows.items()}


SHAPE_ONLY = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})


def pooled_source(value: ir.Value) -> tuple[ir.Value, int] | None:
    """The feature map that global mean pooling (then reshapes) turns into ``value``.

    Returns (map, its channel axis): GlobalAveragePool or a ReduceMean over every spatial
    axis (channels on axis 1), or tf2onnx's ReduceMean over axes 1 and 2 of an NHWC map
    (channels last). Mean pooling is linear, so a consumer that fits its output on the map's
    positions fits the pooled output too. None for anything else.
    """
    node = value.producer()
    while node is not None and node.op_type in SHAPE_ONLY and node.inputs[0] is not None:
        node = node.inputs[0].producer()
    if node is None or node.inputs[0] is None:
        return None
    source = node.inputs[0]
    rank = len(source.shape) if source.shape is not None else None
    if node.op_type == "GlobalAveragePool":
        return source, 1
    if node.op_type != "ReduceMean" or rank is None or rank < 3:
        return None
    axes = reduce_axes(node)
    reduced = sorted(a % rank for a in axes) if axes is not None else None
    if reduced == list(range(2, rank)):
        return source, 1
    if reduced == list(range(1, rank - 1)):
        return source, rank - 1
    return None


def consumer_matrix(node: ir.Node) -> np.ndarray | None:
    """A consumer's weight as ``[out, in]`` when it acts per position (1x1 Conv, Gemm, MatMul)."""
    weight = node.inputs[1].const_value.numpy()  # type: ignore[union-attr]
    attrs = {k: a.value for k, a in node.attributes.items()}
    if node.op_type == "Conv":
        pointwise = weight.shape[2:] == (1,) * (weight.ndim - 2)
        return weight[:, :, 0, 0] if pointwise and attr_int(node, "group", 1) == 1 else None
    if node.op_type == "Gemm":
        if attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            return None
        return weight if attrs.get("transB", 0) else weight.T
    return weight.T if node.op_type == "MatMul" else None


def refit_consumers(
    group: Group,
    keep: np.ndarray,
    inputs: Mapping[str, np.ndarray],
    lstsq: bool = False,
    ridge: float = 1e-2,
) -> int:
    """Compensate each consumer for the channels about to be removed.

    Call before the cut (:func:`onnxpipe.graphs.prune_channels.apply_cut`). The removed
    channels' mean contribution is folded into the consumer's bias; with ``lstsq`` and enough
    samples (4 per kept channel) the kept weights are also refitted by ridge regression.
    Returns the number of consumers changed.
    """
    changed = 0
    for node in group.consumers:
        x = _fit_rows(node, inputs)
        w = consumer_matrix(node)
        bias = consumer_bias(node)
        if x is None or w is None or bias is None or bias.const_value is None:
            continue
        b = bias.const_value.numpy()
        if b.shape != (w.shape[0],):
            continue
        now, then, channel = group.columns(node)
        local = np.nonzero(np.isin(channel, keep))[0]  # the kept ones among those columns
        new_w, delta = _refit(x[:, then].astype(np.float64), w[:, now], local, lstsq, ridge)
        full = w.astype(np.float64).copy()
        full[:, now] = new_w
        _set_consumer_matrix(node, full.astype(w.dtype))
        bias.const_value = ir.tensor((b + delta).astype(b.dtype), name=bias.name)
        changed += 1
    return changed


def _refit(
    x: np.ndarray, w: np.ndarray, keep: np.ndarray, lstsq: bool, ridge: float
) -> tuple[np.ndarray, np.ndarray]:
    """New weights ``w`` [out, in] for inputs ``x`` [rows, in] and the bias shift, ``keep`` left.

    The removed inputs' mean contribution goes to the bias; with ``lstsq`` and enough rows the
    kept columns are refitted too (the removed ones come back as they were: the cut drops them).
    """
    w = w.astype(np.float64)
    drop = np.setdiff1d(np.arange(w.shape[1]), keep)
    mean = x.mean(0)
    delta = mean[drop] @ w[:, drop].T
    new_w = w.copy()
    if lstsq and len(x) >= 4 * len(keep):
        xk = x[:, keep] - mean[keep]
        target = (x - mean) @ w.T
        gram = xk.T @ xk
        lam = ridge * np.trace(gram) / len(keep) + 1e-12  # shrinks toward the old weights
        rhs = xk.T @ target + lam * w[:, keep].T
        new_w[:, keep] = np.linalg.solve(gram + lam * np.eye(len(keep)), rhs).T
        delta = mean @ w.T - mean[keep] @ new_w[:, keep].T
    return new_w, delta


def _fit_rows(node: ir.Node, inputs: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """The consumer's input samples for a refit: the map before its pooling where there is one."""
    value = node.inputs[0]
    if value is None:
        return None
    source = pooled_source(value)
    before_pooling = inputs.get(source[0].name or "") if source is not None else None
    return before_pooling if before_pooling is not None else inputs.get(value.name or "")


def consumer_bias(node: ir.Node) -> ir.Value | None:
    """The bias of a Conv/Gemm; for a MatMul, the constant of the one Add after it."""
    if node.op_type != "MatMul":
        return node.inputs[2] if len(node.inputs) > 2 else None
    uses = list(node.outputs[0].uses())
    if len(uses) != 1 or uses[0].node.op_type != "Add":
        return None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx] if len(add.inputs) == 2 else None
    if other is None or other.const_value is None or len(other.uses()) != 1:
        return None
    return other


def _set_consumer_matrix(node: ir.Node, matrix: np.ndarray) -> None:
    value = node.inputs[1]
    assert value is not None and value.const_value is not None
    old = value.const_value.numpy()
    if node.op_type == "Conv":
        new = matrix.reshape(old.shape)
    elif (
        node.op_type == "Gemm" and node.attributes.get("transB") and node.attributes["transB"].value
    ):
        new = matrix
    else:
        new = matrix.T
    value.const_value = ir.tensor(np.ascontiguousarray(new), name=value.name)
