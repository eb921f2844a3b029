"""Dynamic int8 as a ``quantize`` mode: SmoothQuant kept only where it measures better.

Smoothing at a fixed strength helps a transformer with activation outliers and can hurt a
model without them, so both results are built and the better one on real data is kept; the
comparison (metric, data, both numbers, the decision) goes into the step's metrics.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from onnxpipe.data import Feeds
from onnxpipe.gate import Gate, gate_metrics, primary
from onnxpipe.graphs.quantize_dynamic import QuantizeDynamicPass
from onnxpipe.transform import TransformContext

if TYPE_CHECKING:
    from onnxpipe.quantize import QuantizeSettings


def dynamic_int8(
    model: ir.Model,
    ctx: TransformContext,
    s: QuantizeSettings,
    gates: Sequence[Gate],
    eval_given: bool,
    calib: list[Feeds] | None,
) -> tuple[ir.Model, dict[str, Any]]:
    """Dynamic int8 of the preprocessed ``model``, smoothed on ``calib`` (else on --eval).

    With neither, nothing is smoothed. When smoothing changed nodes, plain dynamic int8 is
    built too and whichever measures better on the gate's metric (cosine where the outputs
    have no such metric) is kept: on the eval data when given, else on the calibration data.
    """
    source = "calib" if calib else ("eval" if eval_given else None)
    statistics = calib or ctx.eval_feeds
    dynamic = QuantizeDynamicPass(
        exclude=s.exclude,
        per_channel=s.per_channel,
        statistics=statistics if source else (),
        smooth_alpha=s.smooth_alpha,
    )
    result, metrics = _apply(dynamic, model)
    smoothing = metrics["smoothing"]
    smoothing["statistics"] = source
    if not smoothing["smoothed_nodes"]:
        return result, {dynamic.name: metrics}
    plain = QuantizeDynamicPass(exclude=s.exclude, per_channel=s.per_channel)
    plain_result, plain_metrics = _apply(plain, model)
    metric, higher = primary(gates)
    on_calib = s.calib if calib and not eval_given else None
    measure = _measure_on(ctx, statistics, on_calib) if on_calib else ctx.measure
    measured = measure(result), measure(plain_result)
    if any(m.get(metric) is None for m in measured):
        metric, higher = "cosine", True
    with_it, without = (m[metric] for m in measured)
    smoothing.update(
        compared_on=metric,
        compared_data="calib" if on_calib else "eval",
        smoothed=with_it,
        plain=without,
        kept=not ((without > with_it) if higher else (without < with_it)),
    )
    if smoothing["kept"]:
        return result, {dynamic.name: metrics}
    return plain_result, {plain.name: {**plain_metrics, "smoothing": smoothing}}


def _apply(graph_pass: QuantizeDynamicPass, model: ir.Model) -> tuple[ir.Model, dict[str, Any]]:
    return graph_pass(model).model, graph_pass.metrics


def _measure_on(
    ctx: TransformContext, feeds: Sequence[Feeds], source: str
) -> Callable[[ir.Model], dict[str, Any]]:
    """Gate metrics of a model against the input model on ``feeds`` (real data, ``source``).

    Without ``--eval`` the eval feeds are the bundle's samples, often generated: on them a
    digits MLP's smoothing measured cosine -0.03 and was dropped.
    """
    reference = ctx.outputs_on(feeds, source)
    masks = [f.get("attention_mask") for f in feeds]
    return lambda model: gate_metrics(reference, ctx.run(model, feeds), masks)
