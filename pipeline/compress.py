"""``onnxpipe prune``: compression as a gated bundle step.

``prune`` runs the cleanup pass (standard ONNX ops only), then one compression method. With
``--gate``, ``channels`` and ``lowrank`` search per-layer settings: each layer is first tried
alone at the full ratio (its sensitivity), then layers are added least sensitive first, each
at the full ratio or else half of it, while every gate holds on the eval data. The search asks
for one standard error more ``top1`` than the gate, so that what holds on the eval samples is
likelier to hold on unseen ones; the final gate is the one given.

``channels`` chooses which channels to drop from activation statistics of the eval data, so
measuring the result on the same samples flatters it (on EfficientNet-Lite0 the eval KL was a
tenth of the KL on other photos). The search therefore cross-fits: the eval batches are split
into two contiguous halves (contiguous, because neighbouring samples are often crops of one
photo or one class), each half's statistics choose the cut measured on the other half, and the
two halves' metrics are pooled. The bundle's model uses the statistics of all eval data.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxpipe.data import Feeds
from onnxpipe.errors import GateFailed, PassError
from onnxpipe.gate import Gate, gate_metrics
from onnxpipe.graphs.base import GraphPass, copy_model, parameter_count
from onnxpipe.graphs.channel_refit import collect_inputs
from onnxpipe.graphs.cleanup import CleanupPass
from onnxpipe.graphs.lowrank import LowRankPass, factorable, input_covariances
from onnxpipe.graphs.prune_channels import PruneChannelsPass, nchwc_block
from onnxpipe.graphs.prune_magnitude import PruneMagnitudePass, zipped_size
from onnxpipe.graphs.quant_utils import refuse_cpu_fused, refuse_quantized
from onnxpipe.progress import report
from onnxpipe.prune_settings import PruneSettings, check_ratio
from onnxpipe.transform import TransformContext, derive_bundle

logger = logging.getLogger(__name__)


def prune_bundle(
    bundle: Path,
    out: Path,
    settings: PruneSettings,
    eval_data: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """``onnxpipe prune``: one compression method, gated, as a new bundle."""
    check_ratio(settings.ratio)
    gates = [Gate.parse(g) for g in settings.gates]

    def transform(model: ir.Model, ctx: TransformContext) -> tuple[ir.Model, dict[str, Any]]:
        # Pruning sees no float Conv/Gemm weights behind Q/DQ pairs and would say so wrongly.
        refuse_quantized(
            model,
            f"prune --method {settings.method}",
            "Prune the float bundle this one was derived from, then quantize the result.",
        )
        refuse_cpu_fused(model, f"prune --method {settings.method}", "Prune")
        metrics: dict[str, Any] = {"params_before": parameter_count(model)}
        metrics["zipped_bytes_before"] = zipped_size(model)
        if settings.cleanup:
            model, metrics["cleanup"] = apply_pass(CleanupPass(level="none"), model)
        if settings.method == "magnitude":
            model, metrics["pass"] = apply_pass(
                PruneMagnitudePass(ratio=settings.ratio, scope=settings.scope), model
            )
            metrics["sparsity"] = metrics["pass"]["sparsity"]
            metrics["note"] = metrics["pass"]["note"]
            # the step's zipped sizes span the step (input -> result); the pass's, which
            # start after the cleanup, would read as a second "before"
            for key in ("zipped_bytes_before", "zipped_bytes_after"):
                metrics["pass"].pop(key)
        elif settings.method == "channels":
            model, found = _channels(model, ctx, settings, gates, eval_data is not None)
            metrics.update(found)
        else:
            model, found = _lowrank(model, ctx, settings, gates, eval_data is not None)
            metrics.update(found)
        metrics["params_after"] = parameter_count(model)
        metrics["params_reduction"] = 1 - metrics["params_after"] / max(metrics["params_before"], 1)
        metrics["zipped_bytes_after"] = zipped_size(model)
        return model, metrics

    name = f"prune_{settings.method}"
    return derive_bundle(bundle, out, name, settings, transform, gates, eval_data, overwrite)


def apply_pass(graph_pass: GraphPass[Any], model: ir.Model) -> tuple[ir.Model, dict[str, Any]]:
    """``graph_pass`` on ``model``: the result and the pass's metrics."""
    result = graph_pass(model)
    return result.model, dict(graph_pass.metrics)


def _channels(
    model: ir.Model,
    ctx: TransformContext,
    settings: PruneSettings,
    gates: Sequence[Gate],
    real_data: bool,
) -> tuple[ir.Model, dict[str, Any]]:
    # Activation statistics only mean something on real data; generated noise would mislead.
    criterion = "activation" if real_data else "weight"
    probe = PruneChannelsPass(ratio=settings.ratio, multiple_of=settings.multiple_of)
    from onnxpipe.graphs.channel_groups import find_groups, infer_missing_shapes  # noqa: PLC0415
    from onnxpipe.graphs.shared_weights import unshare_initializers  # noqa: PLC0415

    infer_missing_shapes(model)  # once here, not in every candidate the search builds
    analysed = copy_model(model)
    unshare_initializers(analysed)  # as the pass does: an equal constant blocks no group
    groups = [g for g in find_groups(analysed) if not g.blocked]
    if not groups:
        probe(copy_model(model))  # raises PassError naming why every group is blocked
    _refuse_uncut(probe, [g.channels for g in groups], settings.ratio)
    inputs = collect_inputs(model, groups, ctx.eval_feeds) if real_data else {}

    def build(
        ratios: dict[str, float] | None, stats: dict[str, Any] = inputs
    ) -> tuple[ir.Model, dict[str, Any]]:
        graph_pass = PruneChannelsPass(
            ratio=settings.ratio,
            ratios=ratios,
            criterion=criterion,
            inputs=stats,
            multiple_of=settings.multiple_of,
        )
        return apply_pass(graph_pass, copy_model(model))

    if not gates:
        pruned, metrics = build(None)
        return pruned, {"pass": metrics, "criterion": criterion}
    # A layer whose kept count rounds up to all its channels at this ratio has nothing to cut:
    # measured, it would show "damage 0" as if it were free.
    units = [g.key for g in groups if probe.keep_count(g.channels, settings.ratio) < g.channels]
    collect = (lambda feeds: collect_inputs(model, groups, feeds)) if real_data else None
    return _gated_search(units, settings.ratio, build, ctx, gates, criterion, collect)


def _refuse_uncut(probe: PruneChannelsPass, channels: list[int], ratio: float) -> None:
    """PassError when ``ratio`` cuts no group once kept counts are rounded up (exit 2).

    Without it a small model came back unchanged, with exit 0 and params_reduction 0.
    """
    if any(probe.keep_count(n, ratio) < n for n in channels):
        return
    cfg = probe.config
    if max(channels) <= cfg.min_channels:  # no ratio or multiple helps: say so
        raise PassError(
            f"nothing to cut: the prunable layers have {', '.join(map(str, sorted(set(channels))))}"
            f" output channels, and channel pruning keeps at least {cfg.min_channels} in each. "
            "This model's layers are too narrow to prune channels; try --method magnitude."
        )
    rounding = (
        f"multiples of {cfg.multiple_of}"
        if cfg.multiple_of
        else f"multiples of {nchwc_block()} (ORT's NCHWc block on this CPU)"
    )
    raise PassError(
        f"nothing to cut at --ratio {ratio:g}: the prunable layers have "
        f"{', '.join(map(str, sorted(set(channels))))} output channels, and each keeps them all "
        f"once its count is rounded up to {rounding}, at least {cfg.min_channels}. Raise "
        "--ratio, or pass --multiple-of 1 (smaller, though ORT pads to its block)."
    )


def _gated_search(
    units: Sequence[str],
    ratio: float,
    build: Callable[..., tuple[ir.Model, dict[str, Any]]],
    ctx: TransformContext,
    gates: Sequence[Gate],
    criterion: str,
    collect: Callable[[Sequence[Feeds]], Any] | None,
) -> tuple[ir.Model, dict[str, Any]]:
    """:func:`_search`, cross-fitted when ``build`` uses statistics of the eval data.

    With ``collect`` (statistics of some feeds, passed to ``build`` as its second argument)
    and 4 eval batches or more, a candidate built from one half's statistics is measured on
    the other half, and the other way round, so the gate predicts unseen data instead of
    flattering the data the statistics came from.
    """
    halves = _halves(ctx.eval_feeds) if collect is not None else None
    if collect is None or halves is None:
        found = _search(units, ratio, build, ctx, gates, criterion)
        found[1]["search"]["cross_fitted"] = False  # no eval statistics, or under 4 batches
        return found
    stats = [collect(half) for half in halves]
    references = _split(ctx.reference(), len(halves[0]))

    def cross_fitted(ratios: dict[str, float]) -> dict[str, Any]:
        outputs = []
        for own, other in ((0, 1), (1, 0)):
            candidate = build(ratios, stats[own])[0]
            outputs += ctx.run(candidate, halves[other])
        paired = references[1] + references[0]
        return gate_metrics(
            paired, outputs, [f.get("attention_mask") for f in halves[1] + halves[0]]
        )

    found = _search(units, ratio, build, ctx, gates, criterion, cross_fitted)
    found[1]["search"]["cross_fitted"] = True
    return found


def _halves(feeds: Sequence[Feeds]) -> tuple[list[Feeds], list[Feeds]] | None:
    """The eval batches in two contiguous halves, or None when there are too few batches."""
    if len(feeds) < 4:
        return None
    middle = len(feeds) // 2
    return list(feeds[:middle]), list(feeds[middle:])


def _split(items: Sequence[Any], first: int) -> tuple[list[Any], list[Any]]:
    return list(items[:first]), list(items[first:])


def _lowrank(
    model: ir.Model,
    ctx: TransformContext,
    settings: PruneSettings,
    gates: Sequence[Gate],
    real_data: bool,
) -> tuple[ir.Model, dict[str, Any]]:
    # Input statistics make the SVD activation-aware; only real data has meaningful ones.
    collect = (lambda feeds: input_covariances(model, feeds)) if real_data else None
    stats = collect(ctx.eval_feeds) if collect is not None else {}
    criterion = "activation-aware svd" if stats else "svd"
    probe = LowRankPass(ratio=settings.ratio, energy=settings.energy, covariances=stats)
    if not gates:
        pruned, metrics = apply_pass(probe, model)
        return pruned, {"pass": metrics, "criterion": criterion}
    units = [w.name or "" for _, w in factorable(model, probe.config.min_elements)]
    if not units:
        probe(copy_model(model))  # raises PassError: nothing to factor
    shapes = {w.name: w.const_value.numpy().shape for _, w in factorable(model, 1)}  # type: ignore[union-attr]

    def build(
        ratios: dict[str, float] | None, covariances: dict[str, Any] = stats
    ) -> tuple[ir.Model, dict[str, Any]]:
        ranks = {}
        for name, ratio in (ratios or {}).items():
            k, n = shapes[name]
            ranks[name] = max(1, math.floor((1 - ratio) * k * n / (k + n)))
        graph_pass = LowRankPass(ratio=settings.ratio, ranks=ranks, covariances=covariances)
        return apply_pass(graph_pass, copy_model(model))

    return _gated_search(units, settings.ratio, build, ctx, gates, criterion, collect)


def _search(
    units: Sequence[str],
    ratio: float,
    build: Callable[[dict[str, float] | None], tuple[ir.Model, dict[str, Any]]],
    ctx: TransformContext,
    gates: Sequence[Gate],
    criterion: str,
    measure: Callable[[dict[str, float]], dict[str, Any]] | None = None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Greedy per-layer ratios, least sensitive first, while every (margined) gate holds.

    ``measure`` maps per-layer ratios to gate metrics (default: build, then measure on all
    eval data).
    """
    strict = _with_margin(gates, ctx)

    def measured_for(ratios: dict[str, float], candidate: ir.Model | None = None) -> dict:
        if measure is not None:  # builds its own candidates
            return measure(ratios)
        return ctx.measure(candidate if candidate is not None else build(ratios)[0])

    sensitivity: list[dict[str, Any]] = []
    for done, unit in enumerate(units):
        report(f"sensitivity of {unit}", done, len(units))
        measured = measured_for({unit: ratio})
        sensitivity.append({"layer": unit, "ratio": ratio, **_brief(measured, strict)})
    sensitivity.sort(key=lambda row: row["damage"])
    chosen: dict[str, float] = {}
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    params = parameter_count(build({})[0])
    for done, row in enumerate(sensitivity):
        report(f"cutting {row['layer']} ({len(chosen)} layers kept)", done, len(sensitivity))
        for level in (ratio, ratio / 2):
            trial = {**chosen, row["layer"]: level}
            candidate = build(trial)[0]
            if parameter_count(candidate) >= params:
                continue  # rounding kept every channel (or rank): nothing gained
            measured = measured_for(trial, candidate)
            ok = all(g.passes(measured) for g in strict)
            steps.append({"layer": row["layer"], "ratio": level, "accepted": ok,
                          **_brief(measured, strict)})  # fmt: skip
            if best is None or steps[-1]["damage"] < best["damage"]:
                best = steps[-1]
            if ok:
                chosen, params = trial, parameter_count(candidate)
                break
    if best is None:  # every candidate kept all it was asked to cut (rounding)
        raise PassError(
            f"nothing to cut at --ratio {ratio:g}: at that ratio each of the {len(units)} "
            "layers keeps all its channels or rank once rounded. Raise --ratio."
        )
    if not chosen:
        shown = ", ".join(f"{k}={v:.4g}" for k, v in (best or {}).items() if k in _METRICS)
        raise GateFailed(
            f"no per-layer setting meets {_gates_searched(gates, strict)}; the best found, "
            f"{best and best['layer']} at ratio {best and best['ratio']:.3g}, gives {shown}. "
            "Loosen the gate or lower --ratio.",
            metrics={"best": best, "sensitivity": sensitivity},
        )
    model, metrics = build(chosen)
    logger.info("search kept %d of %d layers", len(chosen), len(units))
    note = _shortfall(chosen, units, ratio, gates, strict)
    return model, {
        "pass": metrics,
        "criterion": criterion,
        "ratios": chosen,
        **({"note": note} if note else {}),
        "search": {
            "gates": [str(g) for g in strict],  # top1 with one standard error added
            "gates_asked": [str(g) for g in gates],
            "sensitivity": sensitivity,
            "steps": steps,
        },  # fmt: skip
    }


_METRICS = ("top1", "cosine", "max_abs", "kl")


def _shortfall(
    chosen: dict[str, float],
    units: Sequence[str],
    ratio: float,
    gates: Sequence[Gate],
    strict: Sequence[Gate],
) -> str | None:
    """What the gate left of ``--ratio``, for the user, or None when every layer took it all.

    A gated EfficientNet-Lite0 at ``--ratio 0.3`` came back 0.5% smaller under a table
    that did not say the gate, not the ratio, had decided.
    """
    full = sum(1 for r in chosen.values() if r >= ratio)
    if full == len(units):
        return None
    return (
        f"the gate {_gates_searched(gates, strict)} let {len(chosen)} of {len(units)} layers be "
        f"cut, {full} at --ratio {ratio:g} and {len(chosen) - full} at {ratio / 2:g}; more broke "
        "it (metrics.search.steps). For a larger cut, loosen the gate or give more --eval samples."
    )


def _gates_searched(gates: Sequence[Gate], strict: Sequence[Gate]) -> str:
    """The gates as asked, and as searched where the ``top1`` margin changed them."""
    asked, searched = ", ".join(map(str, gates)), ", ".join(map(str, strict))
    return asked if searched == asked else f"{asked} (searched as {searched}: one standard error)"


def _with_margin(gates: Sequence[Gate], ctx: TransformContext) -> list[Gate]:
    """Gates with one standard error added to ``top1`` thresholds (binomial, eval samples)."""
    n = max(1, sum(int(next(iter(f.values())).shape[0]) for f in ctx.eval_feeds))
    out = []
    for gate in gates:
        if gate.metric == "top1" and gate.value < 1.0:
            se = math.sqrt(gate.value * (1 - gate.value) / n)
            out.append(Gate(gate.metric, gate.op, min(1.0, gate.value + se)))
        else:
            out.append(gate)
    return out


def _brief(measured: dict[str, Any], gates: Sequence[Gate]) -> dict[str, Any]:
    """The gate metrics plus ``damage``: the worst shortfall against the gates' slack."""
    row = {k: measured.get(k) for k in _METRICS if measured.get(k) is not None}
    damage = 0.0
    for gate in gates:
        value = measured.get(gate.metric)
        if value is None:
            damage = math.inf
            continue
        slack = abs(gate.value) if gate.value else 1.0
        lost = (gate.value - value if gate.op == ">=" else value - gate.value) / slack
        damage = max(damage, lost)
    if measured.get("kl") is not None:
        damage += 1e-3 * float(measured["kl"])  # breaks top1 ties among classifiers
    elif measured.get("cosine") is not None:
        damage += 1e-3 * (1 - float(measured["cosine"]))
    row["damage"] = damage
    return row
