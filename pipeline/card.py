"""The bundle's README.md: a model card a deployment team can act on."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxpipe.parity import parity_notes, tolerance_text, verdict

REPORT_FILE = "report.html"
BENCH_COLUMNS = (
    "EP",
    "batch",
    "threads",
    "p50 ms",
    "p90 ms",
    "p99 ms",
    "per s",
    "session ms",
    "peak RSS MB",
)


def bench_row(record: dict[str, Any]) -> list[str]:
    """One bench record as the cells of :data:`BENCH_COLUMNS` (card, CLI table, report)."""
    lat = record["latency_ms"]
    return [
        str(record["ep"]),
        str(record["batch"]),
        str(record.get("threads") or "default"),
        sig3(lat["p50"]),
        sig3(lat["p90"]),
        sig3(lat["p99"]),
        sig3(record["throughput_per_s"]),
        sig3(record["session_create_ms"]),
        f"{record['peak_rss_mb']:.0f}",
    ]


def sig3(value: float) -> str:
    """``value`` to 3 significant figures in plain notation: 0.0123, 4.56, 78.9, 60400.

    Latency was ``.2f`` ms: a model that runs in 4 us read 0.00 ms, and a throughput of
    60419.3/s was too wide for its table column (``60419…``). ``.3g`` would write 1.23e-05.
    """
    if not math.isfinite(value) or value == 0:
        return f"{value:g}"
    exponent = math.floor(math.log10(abs(value)))
    rounded = round(value, 2 - exponent)
    if rounded and math.floor(math.log10(abs(rounded))) != exponent:  # 9.996 -> 10.0
        exponent += 1
        rounded = round(value, 2 - exponent)
    return f"{rounded:.{max(0, 2 - exponent)}f}"


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def shape_text(shape: list[Any]) -> str:
    """``[batch, 3, 224, 224]``: a manifest shape as the card, report and tables print it."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def fixed_shapes_text(fixed: dict[str, list[int]]) -> str:
    """``input [1, 3, 224, 224]``: a package's fixed shapes, '' when there are none."""
    return ", ".join(f"{k} {shape_text(v)}" for k, v in fixed.items())


def _example_sizes(manifest: dict[str, Any]) -> dict[str, int]:
    """Sizes of the symbolic dims but the batch where the bundle ran: last timed, or --data.

    An image model with free height and width runs at its data's 16x16, not at 1x1.
    """
    from onnxpipe.converters.base import InputSpec  # noqa: PLC0415 - card stays light
    from onnxpipe.data import recorded_sizes  # noqa: PLC0415

    specs = [InputSpec.from_json(v) for v in manifest["inputs"]]
    return dict(recorded_sizes(specs, manifest))


def _example_feed(inputs: list[dict[str, Any]], sizes: dict[str, int]) -> str:
    lines = []
    for spec in inputs:
        dims = [
            d if isinstance(d, int) else (sizes.get(d, 1) if axis else 1)
            for axis, d in enumerate(spec["shape"])
        ]
        dtype = spec["dtype"] or "float32"
        maker = "np.random.random" if dtype.startswith("float") else "np.ones"
        shape = f"({', '.join(map(str, dims))}{',' if len(dims) == 1 else ''})"  # () for a scalar
        lines.append(f'    "{spec["name"]}": {maker}({shape}).astype(np.{dtype}),')
    return "\n".join(lines)


def _symbolic(entries: Sequence[dict[str, Any]]) -> bool:
    return any(isinstance(d, str) for v in entries for d in v["shape"])


def _dims_note(inputs: Sequence[dict[str, Any]], outputs: Sequence[dict[str, Any]]) -> list[str]:
    """What the I/O table's symbolic dims and id inputs allow, as far as onnxpipe knows."""
    lines = []
    if _symbolic([*inputs, *outputs]):
        lines.append(
            "Symbolic dims (strings) are dynamic, within what the model itself supports (a "
            "transformer's maximum sequence length, say)."
        )
    for v in inputs:
        if v.get("index_limit") is not None:
            lines.append(
                f"`{v['name']}` holds ids from 0 to {v['index_limit'] - 1}: they index a table "
                f"of {v['index_limit']} rows."
            )
    return [" ".join(lines), ""] if lines else []


def _samples_note(parity: dict[str, Any], inputs: Sequence[dict[str, Any]]) -> str:
    """What the parity samples were: a derived bundle's data is named in its reference."""
    count = parity.get("samples")
    if "source_parity" in parity or not _symbolic(inputs):
        return f"{count} samples."
    return f"{count} samples; generated ones at sizes of the symbolic dims the export never saw."


def render_card(manifest: dict[str, Any], title: str | None = None) -> str:
    """Markdown: I/O table, a runnable ONNX Runtime snippet, parity, validation and latency."""
    model = manifest["model"]
    source = manifest.get("source", {})
    out = [
        f"# {title or 'ONNX model'}",
        "",
        f"`{model['file']}`: opset {model['opset']}, IR {model['ir_version']}, "
        f"{model['bytes'] / 1e6:.2f} MB, sha256 `{model['sha256']}`.",
        f"Source: {source.get('framework', 'n/a')} via {source.get('exporter', 'n/a')}"
        + (f" (fallback: {source['fallback_reason']})" if source.get("fallback_reason") else "")
        + "."
        + "".join(f" {note[:1].upper()}{note[1:]}." for note in source.get("notes") or []),
        "",
        "## Inputs and outputs",
        "",
        "| kind | name | dtype | shape |",
        "|---|---|---|---|",
    ]
    for kind in ("inputs", "outputs"):
        for v in manifest[kind]:
            out.append(f"| {kind[:-1]} | `{v['name']}` | {v['dtype']} | {shape_text(v['shape'])} |")
    out += ["", *_dims_note(manifest["inputs"], manifest["outputs"])]
    out += [
        "## Run it",
        "",
        "```python",
        "import numpy as np",
        "import onnxruntime as ort",
        "",
        f'session = ort.InferenceSession("{model["file"]}", providers=["CPUExecutionProvider"])',
        "feeds = {",
        _example_feed(manifest["inputs"], _example_sizes(manifest)),
        "}",
        "outputs = session.run(None, feeds)",
        "```",
        "",
    ]
    parity = manifest.get("parity")
    if parity:
        out += [
            "## Parity",
            "",
            f"Reference: {parity.get('reference')}; {_samples_note(parity, manifest['inputs'])}"
            + (f" Judged at {tolerance}." if (tolerance := tolerance_text(parity)) else ""),
            "",
            "| max abs diff | max rel diff | cosine | top-1 agreement | passed |",
            "|---|---|---|---|---|",
            f"| {_fmt(parity.get('max_abs_diff'))} | {_fmt(parity.get('max_rel_diff'))} | "
            f"{_fmt(parity.get('cosine'), 7)} | {_fmt(parity.get('top1_agreement'))} | "
            f"{verdict(parity)} |",
            "",
            *[f"{n[:1].upper()}{n[1:]}.\n" for n in parity_notes(parity)],
        ]
    validation = manifest.get("validation")
    if validation:
        out += ["## Validation", "", "| EP | status | reason |", "|---|---|---|"]
        out += [
            f"| {ep} | {r['status']} | {r.get('reason') or ''} |" for ep, r in validation.items()
        ]
        out.append("")
    records = manifest.get("bench_records") or (
        [manifest["bench"]] if manifest.get("bench") else []
    )
    if records:
        out += [
            "## Latency (ONNX Runtime)",
            "",
            "| " + " | ".join(BENCH_COLUMNS) + " |",
            "|" + "---|" * len(BENCH_COLUMNS),
        ]
        out += ["| " + " | ".join(bench_row(r)) + " |" for r in records]
        out.append("")
    out += _mobile_section(manifest.get("mobile"))
    out += [
        "## Provenance",
        "",
        "Steps: "
        + ", ".join(f"{s['name']} ({s['seconds']:.1f} s)" for s in manifest.get("steps", [])),
        "",
        *_step_notes(manifest.get("steps", [])),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in manifest.get("versions", {}).items()),
        "",
        "Check the file: `sha256sum model.onnx` must print the sha256 above. "
        "Re-check parity on your EPs: `onnxpipe validate . --ep cpu,cuda`.",
        "",
    ]
    return "\n".join(out)


def _step_notes(steps: Sequence[dict[str, Any]]) -> list[str]:
    """Each step's ``note``, which the command printed under its table (no speedup, ...)."""
    notes = [
        f"Note from {s['name']}: {s['metrics']['note'].rstrip('.')}."
        for s in steps
        if isinstance((s.get("metrics") or {}).get("note"), str)
    ]
    return [line for note in notes for line in (note, "")]


def _mobile_section(mobile: dict[str, Any] | None) -> list[str]:
    """The packaged ORT-format model: file, shapes, level, operators and NNAPI/CoreML fit."""
    if not mobile:
        return []
    shapes = fixed_shapes_text(mobile.get("fixed_shapes") or {}) or "as model.onnx (dynamic)"
    out = [
        "## Mobile package",
        "",
        f"- `{mobile.get('ort_file')}` ({mobile.get('ort_bytes', 0) / 1e6:.2f} MB, sha256 "
        f"`{str(mobile.get('ort_sha256', ''))[:16]}...`), ORT optimization level "
        f"{mobile.get('optimization_level')}; input shapes: {shapes}.",
        f"- Reduced-operator build: `{mobile.get('operators_config')}` "
        "(build ORT with `--include_ops_by_config`).",
    ]
    if mobile.get("level_note"):
        out.append(f"- {mobile['level_note']}.")
    if mobile.get("hint"):
        out.append(f"- {mobile['hint']}.")
    out += ["", "| EP | partitions | nodes supported | unsupported ops |", "|---|---|---|---|"]
    for ep in ("nnapi", "coreml"):
        info = mobile.get(ep) or {}
        out.append(
            f"| {ep} | {info.get('partitions')} | {info.get('nodes_supported')}/"
            f"{info.get('nodes_total')} | {', '.join(info.get('unsupported_ops') or []) or '-'} |"
        )
    out.append("")
    return out


def render_docs(manifest: dict[str, Any]) -> dict[str, str]:
    """The bundle's ``README.md`` card and ``report.html`` texts, by file name."""
    from onnxpipe.report import render_report  # noqa: PLC0415

    title = manifest.get("title")
    return {"README.md": render_card(manifest, title), REPORT_FILE: render_report(manifest, title)}


def write_docs(
    directory: Path, manifest: dict[str, Any], docs: dict[str, str] | None = None
) -> None:
    """Write the bundle's ``README.md`` card and ``report.html``, each atomically.

    ``docs``: the texts :func:`render_docs` made already.
    """
    from onnxpipe.atomic import write_text_atomic  # noqa: PLC0415 - bundle imports stay one-way

    for name, text in (docs or render_docs(manifest)).items():
        write_text_atomic(directory / name, text)
