"""``report.html``: one self-contained page per bundle (no network), with inline SVG plots.

Sections: the model and its source, parity, validation per EP, the latency table and its
distribution plot (one row per EP/batch/threads), every step with its numbers, candidate
tables from optimization steps with their size/latency/accuracy trade-off, and mobile packaging.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Sequence
from typing import Any

from onnxpipe.card import BENCH_COLUMNS, bench_row, fixed_shapes_text, shape_text
from onnxpipe.parity import parity_notes, tolerance_text, verdict

_PALETTE = ("#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2")
_CSS = """body{font:14px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;color:#111}
h1{margin-bottom:.2em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ccc;padding:3px 9px;
text-align:left;vertical-align:top}th{background:#f3f4f6}.passed{color:#047857;font-weight:600}
.failed{color:#b91c1c;font-weight:600}.unavailable{color:#b45309;font-weight:600}
code{background:#f3f4f6;padding:1px 4px}svg text{font:11px system-ui,sans-serif}
details pre{max-height:30em;overflow:auto;background:#f8fafc;padding:1em}"""


def _e(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _status(value: str) -> str:
    return f'<span class="{_e(value)}">{_e(value)}</span>'


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """Axis ticks from 0 past ``top`` in steps of 1, 2 or 5 times a power of ten, about ``count``.

    The latency axis was cut in fifths of 1.05x the slowest run, labelled ``.1f``: 0.0, 2.7,
    5.4, 8.1 ms, and a model timed in microseconds read 0.0 at every tick.
    """
    if not math.isfinite(top) or top <= 0:
        return [0.0, 1.0]
    raw = top / count
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    steps = max(1, math.ceil(top / step - 1e-9))
    return [round(i * step, 12) for i in range(steps + 1)]


def _tick_digits(ticks: Sequence[float]) -> int:
    """Decimals that tell ``ticks`` apart without trailing noise (step 0.002: 3)."""
    return max(0, -math.floor(math.log10(ticks[1] - ticks[0]) + 1e-9))


def latency_plot(records: Sequence[dict[str, Any]], width: int = 760) -> str:
    """Strip + box plot of per-run latencies, one row per bench record."""
    rows = [r for r in records if r.get("samples_ms")]
    if not rows:
        return ""
    ticks = nice_ticks(max(max(r["samples_ms"]) for r in rows) * 1.05)
    top, digits = ticks[-1], _tick_digits(ticks)
    left, row_h, plot_w = 170, 34, width - 190
    height = 30 + row_h * len(rows) + 30

    def x(v: float) -> float:
        return left + plot_w * v / top

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="latency distribution">'
    ]
    for tick in ticks:
        parts.append(
            f'<line x1="{x(tick):.1f}" y1="20" x2="{x(tick):.1f}" y2="{height - 28}" '
            'stroke="#e5e7eb"/>'
        )
        parts.append(
            f'<text x="{x(tick):.1f}" y="{height - 12}" text-anchor="middle">'
            f"{tick:.{digits}f}</text>"
        )
    parts.append(
        f'<text x="{left + plot_w / 2}" y="12" text-anchor="middle">latency per run (ms)</text>'
    )
    for i, r in enumerate(rows):
        y = 30 + i * row_h + row_h / 2
        color = _PALETTE[i % len(_PALETTE)]
        label = f"{r['ep']} batch {r['batch']} threads {r.get('threads') or 'default'}"
        parts.append(f'<text x="{left - 8}" y="{y + 4}" text-anchor="end">{_e(label)}</text>')
        for j, v in enumerate(r["samples_ms"]):
            jitter = ((j * 7919) % 17 - 8) * 0.9
            parts.append(
                f'<circle cx="{x(v):.1f}" cy="{y + jitter:.1f}" r="2" fill="{color}" '
                'fill-opacity=".35"/>'
            )
        lat = r["latency_ms"]
        parts.append(
            f'<rect x="{x(lat["p50"]):.1f}" y="{y - 9}" width="'
            f'{max(x(lat["p90"]) - x(lat["p50"]), 1):.1f}" height="18" fill="none" '
            f'stroke="{color}" stroke-width="1.5"/>'
        )
        for key, dash in (("p50", ""), ("p99", ' stroke-dasharray="3,2"')):
            parts.append(
                f'<line x1="{x(lat[key]):.1f}" y1="{y - 12}" x2="{x(lat[key]):.1f}" '
                f'y2="{y + 12}" stroke="{color}" stroke-width="2"{dash}/>'
            )
    parts.append("</svg>")
    return "".join(parts)


def tradeoff_plot(
    candidates: Sequence[dict[str, Any]],
    x_key: str,
    y_key: str,
    size_key: str | None,
    width: int = 560,
    height: int = 320,
) -> str:
    """Scatter of candidates: latency (x) against the accuracy metric (y), area ~ size."""
    points = [
        c
        for c in candidates
        if isinstance(c.get(x_key), int | float) and isinstance(c.get(y_key), int | float)
    ]
    if not points:
        return ""
    xs = [float(c[x_key]) for c in points]
    ys = [float(c[y_key]) for c in points]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05 or 1.0
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 0.01, y1 + 0.01
    pad = (y1 - y0) * 0.1
    y0, y1 = y0 - pad, y1 + pad
    left, bottom, plot_w, plot_h = 60, height - 40, width - 80, height - 70
    sizes = [float(c.get(size_key) or 0) for c in points] if size_key else []
    biggest = max(sizes) if sizes and max(sizes) > 0 else 1.0

    def px(v: float) -> float:
        return left + plot_w * (v - x0) / max(x1 - x0, 1e-12)

    def py(v: float) -> float:
        return bottom - plot_h * (v - y0) / (y1 - y0)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        'role="img" aria-label="trade-off">',
        f'<line x1="{left}" y1="{bottom}" x2="{left + plot_w}" y2="{bottom}" stroke="#555"/>',
        f'<line x1="{left}" y1="{bottom}" x2="{left}" y2="{bottom - plot_h}" stroke="#555"/>',
        f'<text x="{left + plot_w / 2}" y="{height - 8}" text-anchor="middle">{_e(x_key)}</text>',
        f'<text x="14" y="{bottom - plot_h / 2}" transform="rotate(-90 14 {bottom - plot_h / 2})"'
        f' text-anchor="middle">{_e(y_key)}</text>',
    ]
    for v in (x0, (x0 + x1) / 2, x1):
        parts.append(f'<text x="{px(v):.1f}" y="{bottom + 14}" text-anchor="middle">{v:.3g}</text>')
    for v in (y0, (y0 + y1) / 2, y1):
        parts.append(f'<text x="{left - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{v:.4g}</text>')
    for i, c in enumerate(points):
        radius = 4 + 10 * (sizes[i] / biggest) ** 0.5 if sizes else 6
        chosen = c.get("chosen") or c.get("selected")
        parts.append(
            f'<circle cx="{px(xs[i]):.1f}" cy="{py(ys[i]):.1f}" r="{radius:.1f}" '
            f'fill="{_PALETTE[0 if not chosen else 1]}" fill-opacity=".55">'
            f"<title>{_e(json.dumps(c, default=str)[:300])}</title></circle>"
        )
    parts.append("</svg>")
    return "".join(parts)


_SEARCH_TABLES = {"candidates": "candidates", "sensitivity": "sensitivity", "steps": "search steps"}
_MAX_ROWS = 40


def _search_tables(metrics: dict[str, Any], depth: int = 2) -> list[tuple[str, list[dict]]]:
    """(title, rows) for each search table in a step's metrics (``auto.candidates``, ...)."""
    found = []
    for key, value in metrics.items():
        if key in _SEARCH_TABLES and isinstance(value, list) and value:
            if all(isinstance(row, dict) for row in value):
                found.append((_SEARCH_TABLES[key], value))
        elif isinstance(value, dict) and depth > 1:
            found += _search_tables(value, depth - 1)
    return found


def _candidate_sections(steps: Sequence[dict[str, Any]]) -> str:
    """The search tables of optimization steps; candidates with latency also get a plot."""
    out = []
    for step in steps:
        for title, rows in _search_tables(step.get("metrics") or {}):
            keys = list(dict.fromkeys(k for c in rows for k in c))
            x_key = next((k for k in keys if "ms" in k or "latency" in k), None)
            y_key = next(
                (k for k in keys if k in ("top1", "cosine", "metric", "kl", "max_abs")), None
            )
            size_key = next((k for k in keys if "bytes" in k or "size" in k), None)
            plot = tradeoff_plot(rows, x_key, y_key, size_key) if x_key and y_key else ""
            shown = rows[:_MAX_ROWS]
            more = (
                f"<p>{len(rows) - len(shown)} more rows in manifest.json</p>"
                if rows[len(shown) :]
                else ""
            )
            table = _table(keys, [[_e(c.get(k)) for k in keys] for c in shown])
            out.append(f"<h3>{_e(step['name'])}: {title}</h3>{plot}{table}{more}")
    return "".join(out)


def render_report(manifest: dict[str, Any], title: str | None = None) -> str:
    """The whole page for one bundle's manifest."""
    model, source = manifest["model"], manifest.get("source", {})
    parts = [
        f"<h1>{_e(title or 'onnxpipe bundle report')}</h1>",
        f"<p><code>{_e(model['file'])}</code>: opset {_e(model['opset'])}, "
        f"{model['bytes'] / 1e6:.2f} MB, sha256 <code>{_e(model['sha256'])}</code><br>"
        f"source: {_e(source.get('framework'))} via {_e(source.get('exporter'))}"
        + (f" (fallback: {_e(source['fallback_reason'])})" if source.get("fallback_reason") else "")
        + "".join(f"<br>note: {_e(note)}" for note in source.get("notes") or [])
        + "</p>",
    ]
    io_rows = [
        [kind[:-1], f"<code>{_e(v['name'])}</code>", _e(v["dtype"]), _e(shape_text(v["shape"]))]
        for kind in ("inputs", "outputs")
        for v in manifest[kind]
    ]
    parts += ["<h2>Inputs and outputs</h2>", _table(["kind", "name", "dtype", "shape"], io_rows)]
    parity = manifest.get("parity")
    if parity:
        parts += [
            "<h2>Parity</h2>",
            f"<p>reference: {_e(parity.get('reference'))}, {_e(parity.get('samples'))} samples"
            + (f"; judged at {_e(tolerance)}" if (tolerance := tolerance_text(parity)) else "")
            + "</p>",
            _table(
                ["max abs diff", "max rel diff", "cosine", "top-1 agreement", "passed"],
                [
                    [
                        _e(parity.get("max_abs_diff")),
                        _e(parity.get("max_rel_diff")),
                        _e(parity.get("cosine")),
                        _e(parity.get("top1_agreement")),
                        _status(verdict(parity)),
                    ]
                ],
            ),
            *[f"<p>{_e(note)}</p>" for note in parity_notes(parity)],
        ]
    validation = manifest.get("validation", {})
    if validation:
        parts += [
            "<h2>Validation per execution provider</h2>",
            _table(
                ["EP", "status", "max abs diff", "reason"],
                [
                    [
                        _e(ep),
                        _status(r["status"]),
                        _e(r.get("max_abs_diff")),
                        _e(r.get("reason") or ""),
                    ]
                    for ep, r in validation.items()
                ],
            ),
        ]
    records = manifest.get("bench_records") or (
        [manifest["bench"]] if manifest.get("bench") else []
    )
    if records:
        parts += [
            "<h2>Latency (ONNX Runtime)</h2>",
            latency_plot(records),
            "<p>Dots: single runs; box: p50 to p90; dashed line: p99.</p>",
            _table(BENCH_COLUMNS, [[_e(cell) for cell in bench_row(r)] for r in records]),
        ]
    steps = manifest.get("steps", [])
    if steps:
        parts += [
            "<h2>Steps</h2>",
            _table(
                ["#", "step", "seconds", "numbers"],
                [
                    [
                        str(i + 1),
                        _e(s["name"]),
                        _e(s["seconds"]),
                        _e(
                            ", ".join(
                                f"{k}={_short(v)}"
                                for k, v in s.get("metrics", {}).items()
                                if not isinstance(v, list | dict)
                            )
                        ),
                    ]
                    for i, s in enumerate(steps)
                ],
            ),
        ]
        parts.append(_candidate_sections(steps))
    mobile = manifest.get("mobile")
    if mobile:
        parts += [
            "<h2>Mobile package</h2>",
            f"<p><code>{_e(mobile['ort_file'])}</code> ({_e(mobile.get('ort_bytes'))} bytes), "
            f"<code>{_e(mobile['operators_config'])}</code>, fixed shapes "
            f"{_e(fixed_shapes_text(mobile.get('fixed_shapes') or {}) or 'none')}, "
            "ORT optimization level "
            f"{_e(mobile.get('optimization_level'))}</p>",
            f"<p>{_e(mobile['level_note'])}</p>" if mobile.get("level_note") else "",
            f"<p>{_e(mobile['hint'])}</p>" if mobile.get("hint") else "",
            _table(
                ["EP", "partitions", "nodes supported", "nodes total", "unsupported ops"],
                [
                    [
                        ep.upper(),
                        _e(mobile[ep]["partitions"]),
                        _e(mobile[ep]["nodes_supported"]),
                        _e(mobile[ep]["nodes_total"]),
                        _e(", ".join(mobile[ep]["unsupported_ops"])),
                    ]
                    for ep in ("nnapi", "coreml")
                    if ep in mobile
                ],
            ),
        ]
    versions = manifest.get("versions", {})
    parts += [
        "<h2>Versions</h2><p>" + _e(", ".join(f"{k} {v}" for k, v in versions.items())) + "</p>",
        "<details><summary>manifest.json</summary><pre>"
        + _e(json.dumps(manifest, indent=2, default=str))
        + "</pre></details>",
    ]
    return (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>'
        f"{_e(title or 'onnxpipe report')}</title><style>{_CSS}</style></head><body>"
        + "\n".join(parts)
        + "</body></html>\n"
    )


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
