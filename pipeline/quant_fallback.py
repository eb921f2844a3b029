"""The float fallback's building blocks for ``quantize --auto`` (:mod:`onnxpipe.quant_search`).

Which nodes may be kept in float (:func:`fallback_units`), in what order (:func:`cost_order`),
and how few of them (:func:`fewest_passing`); the eval and calibration slices they are
measured and timed on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import onnx_ir as ir

from onnxpipe import node_cost
from onnxpipe.data import Feeds
from onnxpipe.graphs.quant_utils import regroup
from onnxpipe.runtime import ORT_ERRORS
from onnxpipe.transform import TransformContext

logger = logging.getLogger(__name__)

# Activations ORT folds into the quantized op before them (their output range is the op's).
_ACTIVATIONS = {"Relu", "Clip"}
_PROFILE_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError, *ORT_ERRORS)


def fewest_passing(limit: int, passes: Callable[[int], bool]) -> int | None:
    """The fewest units kept in float that pass, of counts up to ``limit``; None if none does.

    ``passes(count)`` builds and measures the candidate with the first ``count`` units in
    float. Damage concentrates in a few units (on EfficientNet-Lite0: the stem conv and the
    first depthwise conv), so counts grow geometrically from one (1, 2, 3, 4, 6, 9, ...);
    once one passes, the counts between it and the last that failed are bisected, since a
    candidate with fewer float units is faster and smaller.
    """
    failed, count = 0, 1
    while count <= limit:
        if passes(count):
            while count - failed > 1:
                middle = (failed + count) // 2
                if passes(middle):
                    count = middle
                else:
                    failed = middle
            return count
        failed, count = count, max(count + 1, round(count * 1.5))
    return None


def cost_order(
    model: ir.Model,
    ctx: TransformContext,
    units: list[tuple[str, ...]],
    damage: dict[tuple[str, ...], float],
    paths: tuple[Path, Path],
) -> tuple[list[tuple[str, ...]], dict[tuple[str, ...], float]]:
    """Units in fallback order with their estimated cost (ms).

    By damage alone when the profiles cannot be taken (the order then ignores speed).
    """
    feeds = one_batch(ctx)
    owners = node_cost.weight_owners(model, {n for u in units for n in u})
    try:
        profiles = [
            node_cost.profile(p, feeds, owners, ctx.scratch / f"profile-{i}")
            for i, p in enumerate(paths)
        ]
    except _PROFILE_ERRORS as e:
        logger.warning("auto: no per-node profile (%s); float fallbacks by damage alone", e)
        return sorted(units, key=lambda u: -damage[u]), {}
    ordered = node_cost.fallback_order(model, units, damage, *profiles)
    for unit, ms in ordered[:10]:
        logger.debug("fallback %s: damage %.5f, cost %.3f ms", unit, damage[unit], ms)
    return [u for u, _ in ordered], {u: round(ms, 4) for u, ms in ordered}


def fallback_units(
    model: ir.Model, quantizable: set[str], exclude: set[str]
) -> list[tuple[str, ...]]:
    """The nodes ``--auto`` may keep in float, each with the activation it feeds alone.

    A Conv kept in float while the Relu/Clip after it stays quantized puts a Q/DQ pair on
    the pre-activation tensor, whose range is far wider than the activation's output: on
    EfficientNet-Lite0 keeping one depthwise conv in float that way cost 17 points of top-1.
    Ranked alone, a Conv quantized without its activation shows the same artefact. So a node
    and the activation that is its only consumer are ranked and kept in float together.
    """
    units: list[tuple[str, ...]] = []
    absorbed: set[str] = set()
    for node in model.graph:
        if node.op_type not in quantizable or node.name in exclude or node.name in absorbed:
            continue
        unit = [node.name or ""]
        users = list(node.outputs[0].uses()) if node.outputs else []
        if len(users) == 1:
            user = users[0].node
            if user.op_type in _ACTIVATIONS and user.name not in exclude:
                unit.append(user.name or "")
                absorbed.add(user.name or "")
        units.append(tuple(unit))
    return units


def calib_slice(feeds: Sequence[Feeds], samples: int, batch: int | None = None) -> list[Feeds]:
    """``samples`` samples spread across the batches, in one feed dict.

    A model fixed at a ``batch`` gets them that many at a time.
    """
    stacked = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    count = len(next(iter(stacked.values())))
    index = np.linspace(0, count - 1, min(samples, count)).round().astype(int)
    picked = [{k: v[index] for k, v in stacked.items()}]
    return regroup(picked, batch) or regroup(feeds, batch)[:1]


def one_batch(ctx: TransformContext) -> Feeds:
    """The first eval sample, or batch for a model fixed at one: what latency is timed on."""
    first = ctx.inputs[0].shape[0] if ctx.inputs and ctx.inputs[0].shape else None
    size = first if isinstance(first, int) else 1
    return {k: v[:size] for k, v in ctx.eval_feeds[0].items()}


def sample_count(feeds: Sequence[Feeds]) -> int:
    """How many samples ``feeds`` hold over all its batches."""
    return sum(len(next(iter(f.values()))) for f in feeds)
