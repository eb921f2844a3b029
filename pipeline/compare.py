"""Compare two bundles: signatures, op histograms, parameters, output agreement, latency.

Typically the same architecture from Keras and from PyTorch. Inputs are matched by name
when both models have the same input names, else by position; where one side is NHWC and
the other NCHW (same dims, channels moved), feeds and rank-4 outputs are transposed so the
numbers compare like with like.
"""

from __future__ import annotations

import html
import logging
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpipe.bench import BenchConfig, bench_model
from onnxpipe.benchworker import batch_input
from onnxpipe.bundle import open_bundle
from onnxpipe.bundle_ops import bundle_inputs
from onnxpipe.converters.base import InputSpec
from onnxpipe.data import check_table_ids, load_data, parity_feeds
from onnxpipe.errors import InputError
from onnxpipe.gate import gate_metrics
from onnxpipe.graphs.base import parameter_count
from onnxpipe.modelio import MODEL_FILE, random_outputs
from onnxpipe.parity import compare_outputs, not_compared_note
from onnxpipe.runtime import ORT_ERRORS, SessionOptions, make_session

logger = logging.getLogger(__name__)

NHWC_TO_NCHW = (0, 3, 1, 2)
NCHW_TO_NHWC = (0, 2, 3, 1)


def op_histogram(model: ir.Model) -> dict[str, int]:
    """Op types (``domain::Op`` outside the default domain) and their counts, subgraphs included."""
    counts: Counter[str] = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        counts[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
    return dict(sorted(counts.items()))


def layout_map(a: InputSpec, b: InputSpec) -> tuple[int, ...] | None:
    """The transpose taking A-layout to B-layout: None when shapes agree as they are."""
    if len(a.shape) != len(b.shape):
        raise InputError(f"input {a.name!r} has rank {len(a.shape)}, {b.name!r} {len(b.shape)}.")
    if len(a.shape) != 4:
        return None
    # The layout under which most dims match (equal sizes or the same symbol), identity on a
    # tie: symbols match any size, so [batch, h, w, 3] "fit" [batch, 3, h, w] as it was and
    # the NHWC model got NCHW arrays (cosine -0.24 between one model in both layouts).
    fits = {
        m: _matches(a.shape if m is None else tuple(a.shape[i] for i in m), b.shape)
        for m in (None, NCHW_TO_NHWC, NHWC_TO_NCHW)
    }
    scores = {m: fit for m, fit in fits.items() if fit is not None}
    return max(scores, key=lambda m: scores[m]) if scores else None


def _matches(x: tuple[Any, ...], y: tuple[Any, ...]) -> int | None:
    """How many dims of ``x`` and ``y`` are equal; None when two sizes differ."""
    if not _same(x, y):
        return None
    return sum(p == q for p, q in zip(x, y, strict=True))


def _same(x: tuple[Any, ...], y: tuple[Any, ...]) -> bool:
    return all(
        not (isinstance(p, int) and isinstance(q, int)) or p == q for p, q in zip(x, y, strict=True)
    )


def compare_bundles(
    a: Path, b: Path, data: str | None = None, bench: bool = True, runs: int = 30
) -> dict[str, Any]:
    """The contract's compare record for bundles ``a`` and ``b``.

    Raises:
        InputError: not bundles, or their inputs cannot be matched (count, rank, dtype).
    """
    manifests = {"a": open_bundle(a), "b": open_bundle(b)}
    specs = {k: bundle_inputs(m) for k, m in manifests.items()}
    if len(specs["a"]) != len(specs["b"]):
        raise InputError(
            f"{a} has {len(specs['a'])} inputs and {b} has {len(specs['b'])}; compare needs "
            "models with the same inputs."
        )
    by_name = {y.name: y for y in specs["b"]}
    if set(by_name) == {x.name for x in specs["a"]}:
        # Same names, maybe another order (a Keras model and its SavedModel export).
        specs["b"] = [by_name[x.name] for x in specs["a"]]
    for x, y in zip(specs["a"], specs["b"], strict=True):
        if len(x.shape) != len(y.shape):
            raise InputError(
                f"input {x.name!r} has shape {list(x.shape)} in {a}, {y.name!r} has "
                f"{list(y.shape)} in {b}: their ranks differ, so no data fits both. Compare "
                "bundles of the same model (converted from two frameworks, or before and "
                "after a step)."
            )
    maps = [layout_map(x, y) for x, y in zip(specs["a"], specs["b"], strict=True)]
    for x, y, m in zip(specs["a"], specs["b"], maps, strict=True):
        if x.dtype != y.dtype:
            raise InputError(f"input {x.name!r} is {x.dtype} in {a}, {y.name!r} is {y.dtype}.")
        if m is None and not _same(x.shape, y.shape):
            raise InputError(
                f"input {x.name!r} has shape {list(x.shape)} in {a}, {y.name!r} has "
                f"{list(y.shape)} in {b}; compare needs inputs that match by name (or else by "
                "position) with the same dims, NCHW against NHWC allowed."
            )
    both = [_fixed_by(x, y, m) for x, y, m in zip(specs["a"], specs["b"], maps, strict=True)]
    feeds_a = load_data(data, both) if data else parity_feeds(both)
    sessions = {k: make_session(p / MODEL_FILE, SessionOptions()) for k, p in (("a", a), ("b", b))}
    names = [o.name for o in sessions["a"].get_outputs()]
    names_b = [o.name for o in sessions["b"].get_outputs()]
    if len(names) != len(names_b):
        raise InputError(
            f"{a} has {len(names)} outputs ({', '.join(names)}) and {b} has {len(names_b)} "
            f"({', '.join(names_b)}); compare needs models with the same outputs."
        )
    # Outputs are paired by name when both models name them alike, else by position.
    order = (
        [names_b.index(n) for n in names] if set(names) == set(names_b) else list(range(len(names)))
    )
    # Outputs fed by a random op (in either model) differ on every run.
    random = random_outputs(a / MODEL_FILE)
    random_b = random_outputs(b / MODEL_FILE)
    for name, index in zip(names, order, strict=False):
        if names_b[index] in random_b:
            random.setdefault(name, random_b[names_b[index]])
    back = _output_map(maps, *(_nhwc_outputs(manifests[k]) for k in ("a", "b")))
    rows: list[dict[str, Any]] = []
    ran: list[tuple[list[np.ndarray], list[np.ndarray], np.ndarray | None]] = []
    all_b = [
        {
            y.name: (feeds[x.name].transpose(m) if m else feeds[x.name])
            for x, y, m in zip(specs["a"], specs["b"], maps, strict=True)
        }
        for feeds in feeds_a
    ]
    if data:  # ORT reads ids past a 4-bit table unchecked: two int4 bundles agreed on garbage
        for key, path, feeds_list in (("a", a, feeds_a), ("b", b, all_b)):
            check_table_ids(feeds_list, path / MODEL_FILE, f"{data} (for {key.upper()}, {path})")
    for feeds, feeds_b in zip(feeds_a, all_b, strict=True):
        out_a = _run(sessions["a"], feeds, a)
        ran_b = _run(sessions["b"], feeds_b, b)
        out_b = [ran_b[i] for i in order]
        out_b = [_like(o_b, o_a, back) for o_a, o_b in zip(out_a, out_b, strict=False)]
        compared = compare_outputs(out_a, out_b, names[: len(out_b)], atol=1e-4)
        rows.extend(r for r in compared if r["output"] not in random)
        ran.append((out_a, out_b, feeds.get("attention_mask")))
    models = {k: ir.load(p / MODEL_FILE) for k, p in (("a", a), ("b", b))}
    # named apart, paired by position: say which with which (logits/probs against
    # probs/logits of one shape compare as if they were the same output)
    pairs = {n: names_b[i] for n, i in zip(names, order, strict=True) if n != names_b[i]}
    record: dict[str, Any] = {
        "a": str(a),
        "b": str(b),
        **({"paired_by_position": pairs} if pairs else {}),
        "inputs": {k: m["inputs"] for k, m in manifests.items()},
        "outputs": _agreement(rows, ran, names, random)
        | ({"not_compared": random} if random else {}),
        "ops": {k: op_histogram(m) for k, m in models.items()},
        "params": {k: parameter_count(m) for k, m in models.items()},
        "latency_ms": {"a": None, "b": None},
        "layout": [
            ("nchw->nhwc" if m == NCHW_TO_NHWC else "nhwc->nchw") if m else None for m in maps
        ],
    }
    # both timed at the shapes compared (A at its default 8x8 and a fixed B at 256x256
    # showed the same model 75x faster), at batch 1 unless one model fixes its batch (a
    # fixed 64 timed beside a free batch at 1 read 36x slower)
    batch = _latency_batch(specs["a"], specs["b"])
    record["latency_batch"] = batch
    if bench:
        first = feeds_a[0]
        config = BenchConfig(runs=runs, warmup=3, batches=(batch,))
        timed = {
            "a": [_at(x, first[x.name].shape, batch) for x in specs["a"]],
            "b": [
                _at(y, tuple(first[x.name].shape[i] for i in m or range(len(y.shape))), batch)
                for x, y, m in zip(specs["a"], specs["b"], maps, strict=True)
            ],
        }
        for key, path in (("a", a), ("b", b)):
            spec_json = [s.to_json() for s in timed[key]]
            result = bench_model(path / MODEL_FILE, spec_json, config)[0]
            record["latency_ms"][key] = result["latency_ms"]["p50"]
        record["latency_shapes"] = {k: {s.name: list(s.shape) for s in v} for k, v in timed.items()}
    return record


def _latency_batch(*models: list[InputSpec]) -> int:
    """1, or the batch a model fixes on axis 0 of its batch input (as ``bench`` reads it).

    Another input's fixed axis 0 is not the batch: with ``s[2, 4]`` beside ``x[N, 4]`` both
    models were timed with x at batch 2.
    """
    for specs in models:
        spec = batch_input(specs)
        if spec is not None and isinstance(spec.shape[0], int):
            return spec.shape[0]
    return 1


def _at(spec: InputSpec, shape: tuple[int, ...], batch: int) -> InputSpec:
    """``spec`` at ``shape`` (the sizes compared), with ``batch`` on a free axis 0."""
    if not spec.shape:
        return spec
    return replace(spec, shape=(batch if isinstance(spec.shape[0], str) else shape[0], *shape[1:]))


def _fixed_by(x: InputSpec, y: InputSpec, layout: tuple[int, ...] | None) -> InputSpec:
    """A's input spec with the dims that only B fixes fixed, so generated feeds fit both.

    Generated ids stay inside the smaller of the two tables (A's 50 rows against B's 30
    made ids B could not look up: exit 2 asking for --data).
    """
    dims_b = y.shape if layout is None else tuple(y.shape[layout.index(i)] for i in range(4))
    shape = tuple(
        db if isinstance(db, int) and not isinstance(da, int) else da
        for da, db in zip(x.shape, dims_b, strict=True)
    )
    limits = [h for h in (x.high, y.high) if h is not None]
    return replace(x, shape=shape, high=min(limits) if limits else None)


def _run(session: Any, feeds: dict[str, np.ndarray], bundle: Path) -> list[np.ndarray]:
    try:
        return list(session.run(None, feeds))
    except ORT_ERRORS as e:
        shapes = ", ".join(f"{k}{list(v.shape)}" for k, v in feeds.items())
        raise InputError(
            f"{bundle}: its model cannot run the compared inputs ({shapes}): "
            f"{str(e).splitlines()[0][:200]}. Give --data that fits both bundles."
        ) from e


def _nhwc_outputs(manifest: dict[str, Any]) -> bool:
    """Whether the bundle came from ``convert --nchw``: NCHW inputs, the model's NHWC outputs."""
    return any(
        step.get("name") == "convert" and (step.get("config") or {}).get("nchw") is True
        for step in manifest.get("steps", [])
        if isinstance(step, dict)
    )


def _output_map(
    maps: list[tuple[int, ...] | None], nhwc_a: bool, nhwc_b: bool
) -> tuple[int, ...] | None:
    """The transpose taking B's rank-4 outputs to A's layout, or None.

    Outputs are in their inputs' layout, except those of a ``--nchw`` bundle, which
    transposes its inputs only: against the Keras model it came from (NHWC inputs, the
    same outputs) its [N, 8, 8, 8] maps were moved all the same (cosine 0.06 for one model).
    """
    layout = next((m for m in maps if m), None)
    if nhwc_a == nhwc_b:  # outputs differ as the inputs do
        if layout is None:
            return None
        return NHWC_TO_NCHW if layout == NCHW_TO_NHWC else NCHW_TO_NHWC
    if layout is not None:  # the --nchw side's inputs moved, its outputs did not
        return None
    # same (NCHW) inputs: the --nchw side's outputs are NHWC, the other's NCHW
    return NHWC_TO_NCHW if nhwc_b else NCHW_TO_NHWC


def _like(out_b: np.ndarray, out_a: np.ndarray, back: tuple[int, ...] | None) -> np.ndarray:
    """Bring a rank-4 output of B into A's layout (``back``, see :func:`_output_map`)."""
    if back is None or out_b.ndim != 4:
        return out_b
    moved = out_b.transpose(back)
    # B's layout is the other one: a map whose channels equal its width ([N, 8, 8, 8]) has
    # the same shape either way and is moved all the same
    return moved if moved.shape == out_a.shape else out_b


def _agreement(
    rows: list[dict[str, Any]],
    ran: list[tuple[list[np.ndarray], list[np.ndarray], np.ndarray | None]],
    names: list[str],
    random: dict[str, Any],
) -> dict[str, Any]:
    """Agreement of the outputs (``names``, A's order) over every feed, as gates measure it.

    Cosine is the mean per sample (the worst output), and where a feed has an
    ``attention_mask``, padded tokens count in neither cosine nor max abs diff: a quantized
    encoder's outputs at padding mean nothing. Outputs that differ in shape are errors;
    ``random`` ones (fed by a random op) are left out.
    """
    # one line per output, naming it: a shape mismatch showed once per feed, unnamed
    first: dict[str, str] = {}
    for r in rows:
        if "error" in r:
            first.setdefault(r["output"], f"output {r['output']}: {r['error']}")
    errors, bad = list(first.values()), set(first)
    keep = [i for i, name in enumerate(names) if name not in random and name not in bad]
    if not ran or not keep:
        return {"max_abs_diff": None, "cosine": None, "top1_agreement": None, "errors": errors[:5]}
    metrics = gate_metrics(
        [[a[i] for i in keep] for a, _, _ in ran],
        [[b[i] for i in keep] for _, b, _ in ran],
        [mask for _, _, mask in ran],
    )
    return {
        "max_abs_diff": metrics["max_abs"],
        "cosine": metrics["cosine"],
        "top1_agreement": metrics["top1"],
        "errors": errors[:5],
    }


def render_html(record: dict[str, Any]) -> str:
    """A single self-contained page with the comparison side by side."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4g}"
        return html.escape("n/a" if value is None else str(value))

    ops = sorted(set(record["ops"]["a"]) | set(record["ops"]["b"]))
    op_rows = "".join(
        f"<tr{' class=diff' if record['ops']['a'].get(op) != record['ops']['b'].get(op) else ''}>"
        f"<td>{html.escape(op)}</td><td>{record['ops']['a'].get(op, 0)}</td>"
        f"<td>{record['ops']['b'].get(op, 0)}</td></tr>"
        for op in ops
    )
    io_rows = "".join(
        f"<tr><td>{cell(x['name'])} {cell(x['dtype'])}{cell(x['shape'])}</td>"
        f"<td>{cell(y['name'])} {cell(y['dtype'])}{cell(y['shape'])}</td></tr>"
        for x, y in zip(record["inputs"]["a"], record["inputs"]["b"], strict=False)
    )
    out = record["outputs"]
    # outputs left out of the numbers above (random, or unpaired), as the table lists them
    pairs = record.get("paired_by_position") or {}
    skipped = [n for n in (not_compared_note(out),) if n] + [
        f"not compared: {e}" for e in out.get("errors") or []
    ]
    if pairs:  # named apart: which output of A met which of B
        skipped.insert(
            0, "paired by position: " + ", ".join(f"{x} ~ {y}" for x, y in pairs.items())
        )
    skipped_rows = "".join(f"<tr><td colspan=3>{cell(line)}</td></tr>" for line in skipped)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>onnxpipe compare</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;max-width:1000px}}
table{{border-collapse:collapse;margin:1em 0}}td,th{{border:1px solid #ccc;padding:4px 10px}}
th{{background:#f3f3f3}}tr.diff td{{background:#fff3cd}}</style></head><body>
<h1>onnxpipe compare</h1>
<table><tr><th></th><th>A</th><th>B</th></tr>
<tr><td>bundle</td><td>{cell(record["a"])}</td><td>{cell(record["b"])}</td></tr>
<tr><td>parameters</td><td>{record["params"]["a"]:,}</td><td>{record["params"]["b"]:,}</td></tr>
<tr><td>p50 latency (ms, CPU, batch {record.get("latency_batch", 1)}, at the compared shapes)</td>
<td>{cell(record["latency_ms"]["a"])}</td><td>{cell(record["latency_ms"]["b"])}</td></tr></table>
<h2>Output agreement (B against A)</h2>
<table><tr><th>max abs diff</th><th>cosine</th><th>top-1 agreement</th></tr>
<tr><td>{cell(out["max_abs_diff"])}</td><td>{cell(out["cosine"])}</td>
<td>{cell(out["top1_agreement"])}</td></tr>{skipped_rows}</table>
<h2>Inputs</h2><table><tr><th>A</th><th>B</th></tr>{io_rows}</table>
<h2>Operators</h2><table><tr><th>op</th><th>A</th><th>B</th></tr>{op_rows}</table>
</body></html>
"""
