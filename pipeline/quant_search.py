"""``quantize --auto``: search static int8 configurations, then float fallbacks, for the gate.

1. Build candidates over activation type (U8S8/S8S8), calibration method and per-channel
   weights, all QDQ with bias correction and saturation-safe weights where the CPU needs
   them; calibration runs once per method (ORT's calibration cache) and every candidate is
   measured on the eval data.
2. When none passes, rank the nodes of the best candidate by their own damage: the model
   with only that node (and the Relu/Clip it alone feeds) quantized, on ORT's real int8
   kernels, against the float model on a slice of the calibration data (not the eval data
   the gate is judged on).
3. Keep units in float, in growing groups, until the gate holds, then bisect back to the
   fewest that hold it (:mod:`onnxpipe.quant_fallback`): first those whose float kernels
   beat ORT's int8 ones here, then by damage per millisecond of float cost
   (:mod:`onnxpipe.node_cost`, from ORT profiles of the float and the int8 model). Nodes
   kept in float stay float at run time (``keep_float_weights`` in the static pass).
4. Of the passing candidates, ship the fastest (batch-1 latency, each timed alone in a
   fresh process, taking turns: :func:`onnxpipe.bench.isolated_ms`).
5. Apply empirical bias correction (:mod:`onnxpipe.graphs.empirical_bias`) to that one only,
   and keep it when it measures no worse.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TypedDict

import onnx_ir as ir

from onnxpipe import node_cost
from onnxpipe.bench import isolated_ms
from onnxpipe.data import Feeds
from onnxpipe.errors import PassError
from onnxpipe.gate import Gate, gate_metrics, primary
from onnxpipe.graphs.base import copy_model
from onnxpipe.graphs.quant_utils import fixed_batch, is_x86
from onnxpipe.graphs.quantize_static import (
    QuantizeStaticConfig,
    QuantizeStaticPass,
    resolve_activation_type,
)
from onnxpipe.progress import report
from onnxpipe.quant_fallback import (
    calib_slice,
    cost_order,
    fallback_units,
    fewest_passing,
    one_batch,
    sample_count,
)
from onnxpipe.transform import TransformContext

logger = logging.getLogger(__name__)

SENSITIVITY_SAMPLES = 24
MAX_FLOAT_SHARE = 0.6


def candidates(settings: Any) -> list[QuantizeStaticConfig]:
    """The configurations ``--auto`` tries, for this CPU.

    All QDQ with bias correction and, on x86 without VNNI, saturation-safe weight ranges
    (:mod:`onnxpipe.graphs.quant_weights`): QOperator runs the same kernels without bias
    correction, and 7-bit weights everywhere lose more than the pair bound. Entropy
    calibration is left to ``--method entropy``: on EfficientNet-Lite0 ORT's entropy ranges
    scored exactly as min-max and cost 90 s of the search.
    """
    exclude = tuple(settings.exclude)
    base = QuantizeStaticConfig(
        activation_type=settings.activation_type,
        per_channel=True,
        exclude=exclude,
        rounding=settings.rounding,
        empirical_bias=False,  # applied to the chosen candidate only (see _refine)
    )
    other = "int8" if is_x86() else "uint8"
    found = [
        base,
        base.model_copy(update={"method": "percentile"}),
        base.model_copy(update={"per_channel": False}),
    ]
    if settings.activation_type == "auto":  # a type the user chose is not searched over
        found.append(base.model_copy(update={"activation_type": other}))
    return found


def describe(cfg: QuantizeStaticConfig) -> str:
    """A short label, e.g. ``qdq u8s8 per-channel minmax``."""
    resolved = resolve_activation_type(cfg.activation_type)
    act = {"uint8": "u8s8", "int8": "s8s8"}.get(resolved, resolved)
    parts = [cfg.format, act, "per-channel" if cfg.per_channel else "per-tensor", cfg.method]
    if cfg.rounding == "nearest":
        parts.append("nearest rounding")
    if cfg.reduce_range:
        parts.append("7-bit weights")
    return " ".join(parts)


def reproduce(cfg: QuantizeStaticConfig, empirical_bias: bool) -> list[str] | None:
    """``quantize --mode static`` flags that rebuild ``cfg`` (None: QOperator or 7-bit weights).

    Search candidates are built without the empirical bias correction, so a rebuild needs
    ``--no-empirical-bias`` unless the correction was applied and kept: on EfficientNet-Lite0
    the same 36 float nodes gave top-1 0.951 without it and 0.924 with it (same KL).
    """
    if cfg.format != "qdq" or cfg.reduce_range:
        return None
    flags = ["--method", cfg.method, "--per-channel" if cfg.per_channel else "--per-tensor"]
    if cfg.activation_type != "auto":
        flags += ["--activation-type", cfg.activation_type]
    flags += ["--rounding", cfg.rounding]
    flags += [f for node in cfg.exclude for f in ("--exclude", node)]
    return flags + ([] if empirical_bias else ["--no-empirical-bias"])


def _score(gates: Sequence[Gate], metrics: dict[str, Any]) -> float:
    """Higher is better: the primary gate's metric, sign-adjusted."""
    metric, higher = primary(gates)
    value = metrics.get(metric)
    if value is None:
        return -math.inf
    return float(value) if higher else -float(value)


class Caches(TypedDict):
    """Keyword arguments of :class:`QuantizeStaticPass` naming its caches."""

    calibration_cache: Path
    statistics_cache: Path


def caches(ctx: TransformContext, method: str = "minmax") -> Caches:
    """Cache paths shared by the static builds of one run.

    Activation ranges are kept per calibration method; the float statistics (GPTQ Hessians,
    input and output means) do not depend on the method, so every method shares them.
    """
    return {
        "calibration_cache": ctx.scratch / f"calib-{method}.json",
        "statistics_cache": ctx.scratch / "float-statistics.json",
    }


def auto_static(
    model: ir.Model,
    ctx: TransformContext,
    calib: Sequence[Feeds],
    gates: Sequence[Gate],
    settings: Any,
) -> tuple[ir.Model, dict[str, Any]]:
    """Search configurations and float fallbacks; return the fastest model meeting ``gates``.

    When nothing passes, the best-scoring candidate comes back and the caller's gate fails
    with its numbers.
    """
    rows: list[dict[str, Any]] = []
    models: dict[int, tuple[ir.Model, Path]] = {}
    configs: dict[int, QuantizeStaticConfig] = {}  # by row, for every row that built a model

    def attempt(cfg: QuantizeStaticConfig, label: str) -> dict[str, Any]:
        report(f"candidate {len(rows) + 1}: {label}")
        started = time.perf_counter()
        q = QuantizeStaticPass(cfg, calibration=calib, **caches(ctx, cfg.method))
        try:
            result = q(model).model
        except PassError as e:
            row = {"config": label, "error": str(e), "passed": False}
            rows.append(row)
            return row
        path = ctx.save(result, f"candidate-{len(rows)}")
        measured = ctx.measure(path)
        float_nodes = [n for n in cfg.exclude if n not in settings.exclude]
        row = {
            "config": label,
            "kept_float": len(float_nodes),
            **({"float_nodes": float_nodes} if float_nodes else {}),
            # quantize --mode static flags that rebuild this candidate without the search
            "flags": reproduce(cfg, empirical_bias=False),
            **{k: measured[k] for k in ("top1", "kl", "cosine", "max_abs")},
            "passed": all(g.passes(measured) for g in gates),
            "bytes": path.stat().st_size,
            "seconds": round(time.perf_counter() - started, 1),
        }
        models[len(rows)] = (result, path)
        configs[len(rows)] = cfg
        rows.append(row)
        logger.info("auto: %s -> %s", label, row)
        return row

    for cfg in candidates(settings):
        attempt(cfg, describe(cfg))
    fallback: dict[str, Any] = {}
    if not any(r["passed"] for r in rows):
        best = max(models, key=lambda i: _score(gates, rows[i]))
        fallback = _float_fallback(
            model, ctx, calib, gates, (settings, configs[best], models[best][1]), attempt
        )
    passing = [i for i, r in enumerate(rows) if r["passed"]]
    chosen_pool = passing or [max(models, key=lambda i: _score(gates, rows[i]))]
    report(f"timing {len(chosen_pool)} candidate(s)")
    latency = _latencies({i: models[i][1] for i in chosen_pool}, ctx)
    for i, ms in latency.items():
        rows[i]["latency_ms"] = round(ms, 3)
    chosen = min(chosen_pool, key=lambda i: latency[i])
    rows[chosen]["chosen"] = True
    logger.info("auto: chose %s", rows[chosen]["config"])
    if fallback:  # the float nodes of the model shipped (or whose numbers a failure shows)
        fallback["kept_float_nodes"] = rows[chosen].get("float_nodes", [])
    result, refined = models[chosen][0], dict[str, Any]()
    if settings.empirical_bias:
        result, refined = _refine(model, ctx, calib, gates, rows[chosen], result)
        if refined.get("kept"):
            rows[chosen]["flags"] = reproduce(configs[chosen], empirical_bias=True)
    metrics = {
        "auto": {
            "candidates": rows,
            "chosen": rows[chosen]["config"],
            **fallback,
            **({"empirical_bias": refined} if refined else {}),
        }
    }
    return result, metrics


def _refine(
    model: ir.Model,
    ctx: TransformContext,
    calib: Sequence[Feeds],
    gates: Sequence[Gate],
    row: dict[str, Any],
    chosen: ir.Model,
) -> tuple[ir.Model, dict[str, Any]]:
    """Empirical bias correction of the chosen candidate, kept when it measures no worse.

    It costs a pass over part of the calibration data per layer (about 30 s on
    EfficientNet-Lite0), so the search leaves it out and applies it once here: on the gate's
    metric it must not lose (ties go to the lower KL, else the higher cosine), and a
    candidate that passed must still pass.
    """
    report("empirical bias correction of the chosen candidate")
    refined = copy_model(chosen)
    static = QuantizeStaticPass(calibration=calib, statistics_cache=caches(ctx)["statistics_cache"])
    nodes = static.correct_empirically(refined, model)
    if not nodes:
        return chosen, {}
    measured = ctx.measure(ctx.save(refined, "empirical-bias"))
    before, after = _score(gates, row), _score(gates, measured)
    tie = "kl" if measured.get("kl") is not None else "cosine"
    sign = -1 if tie == "kl" else 1
    better = after > before or (
        after == before and sign * measured[tie] >= sign * (row.get(tie) or 0.0)
    )
    keep = better and (not row["passed"] or all(g.passes(measured) for g in gates))
    info = {
        "nodes": len(nodes),
        "kept": keep,
        "before": {k: row.get(k) for k in ("top1", "kl", "cosine", "max_abs")},
        "after": {k: measured.get(k) for k in ("top1", "kl", "cosine", "max_abs")},
    }
    logger.info("auto: empirical bias correction %s", info)
    return (refined if keep else chosen), info


def _float_fallback(
    model: ir.Model,
    ctx: TransformContext,
    calib: Sequence[Feeds],
    gates: Sequence[Gate],
    base: tuple[Any, QuantizeStaticConfig, Path],
    attempt: Any,
) -> dict[str, Any]:
    """Keep units in float, in growing groups, until the gate holds.

    ``base`` is (settings, the best candidate's config, its model path). Units go to float
    in :func:`onnxpipe.node_cost.fallback_order`: those float runs faster first, then by
    damage per millisecond, so that the passing model gives up as little speed as it can.
    """
    from onnxruntime.quantization.registry import QDQRegistry, QLinearOpsRegistry  # noqa: PLC0415

    settings, cfg, int8_path = base
    registry = QDQRegistry if cfg.format == "qdq" else QLinearOpsRegistry
    units = fallback_units(model, set(registry) - node_cost.MOVERS, set(cfg.exclude))
    sens_feeds = calib_slice(calib, SENSITIVITY_SAMPLES, fixed_batch(model))
    ref_path = ctx.save(model, "float-reference")
    reference = ctx.run(ref_path, sens_feeds)
    damage: dict[tuple[str, ...], float] = {}
    for done, unit in enumerate(units):
        report(f"sensitivity of {unit[0]}", done, len(units))
        one = cfg.model_copy(update={"include": unit})
        q = QuantizeStaticPass(one, calibration=calib, **caches(ctx, cfg.method))
        path = ctx.save(q(model).model, "sensitivity")
        measured = gate_metrics(reference, ctx.run(path, sens_feeds))
        damage[unit] = measured["kl"] if measured["kl"] is not None else 1 - measured["cosine"]
        logger.debug("sensitivity %s: %.5f", unit, damage[unit])
    report("profiling float and int8 kernel times")
    order, costs = cost_order(model, ctx, units, damage, (ref_path, int8_path))

    def passes(count: int) -> bool:
        names = [name for unit in order[:count] for name in unit]
        trial = cfg.model_copy(update={"exclude": tuple(cfg.exclude) + tuple(names)})
        return bool(attempt(trial, f"{describe(cfg)} + {count} units in float")["passed"])

    fewest_passing(max(1, int(len(order) * MAX_FLOAT_SHARE)), passes)
    ranked = [
        {"nodes": list(u), "damage": round(damage[u], 6), "cost_ms": costs.get(u)}
        for u in order[:15]
    ]
    return {"sensitivity": ranked, "sensitivity_samples": sample_count(sens_feeds)}


def _latencies(paths: dict[int, Path], ctx: TransformContext) -> dict[int, float]:
    """Batch-1 median latency (ms) per model, each timed alone in its own process."""
    feeds = one_batch(ctx)
    return {i: statistics.median(t) for i, t in isolated_ms(paths, feeds, 50, 3).items()}
