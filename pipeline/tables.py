"""Rich tables for the CLI's human output."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from onnxpipe.card import BENCH_COLUMNS, bench_row, sig3
from onnxpipe.parity import not_compared_note, parity_notes, verdict


def _num(value: Any, fmt: str = ".3g") -> str:
    return "n/a" if value is None else format(value, fmt)


def summary_table(manifest: dict[str, Any], out: Path) -> Table:
    """One bundle at a glance: source, exporter, parity, validation, latency."""
    table = Table(title=f"bundle {out}", show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    source = manifest.get("source", {})
    model = manifest["model"]
    table.add_row(
        "model", f"{model['file']} ({model['bytes'] / 1e6:.2f} MB, opset {model['opset']})"
    )
    table.add_row("sha256", model["sha256"])
    table.add_row("source", f"{source.get('framework')} via {source.get('exporter')}")
    if source.get("fallback_reason"):
        table.add_row("fallback", escape(str(source["fallback_reason"])))
    if source.get("notes"):
        table.add_row("notes", escape("; ".join(source["notes"])))
    for kind in ("inputs", "outputs"):
        table.add_row(
            kind,
            escape(
                ", ".join(
                    f"{v['name']}:{v['dtype']}[{','.join(str(d) for d in v['shape'])}]"
                    for v in manifest[kind]
                )
            ),
        )
    parity = manifest.get("parity")
    if parity:
        table.add_row(
            "parity",
            f"max abs {_num(parity['max_abs_diff'])}, cosine "
            f"{_num(parity['cosine'], '.7f')}, top-1 {_num(parity['top1_agreement'])}, "
            f"{parity['samples']} samples, {verdict(parity)}"
            + "".join(f"; {n}" for n in parity_notes(parity)),
        )
    step = _step_summary(manifest.get("steps", []))
    if step:
        table.add_row("step", escape(step))
    for ep, result in manifest.get("validation", {}).items():
        reason = f" ({result['reason']})" if result.get("reason") else ""
        table.add_row(f"validation.{ep}", escape(result["status"] + reason))
    mobile = manifest.get("mobile")
    if mobile:
        parts = [
            f"{ep}: {mobile[ep]['partitions']} partition(s), {mobile[ep]['nodes_supported']}/"
            f"{mobile[ep]['nodes_total']} nodes"
            if mobile[ep]["partitions"] is not None
            else f"{ep}: not analysed ({mobile[ep].get('reason')})"
            for ep in ("nnapi", "coreml")
            if ep in mobile
        ]
        hint = f"; {mobile['hint']}" if mobile.get("hint") else ""
        table.add_row("mobile", escape(f"{mobile['ort_file']}; " + "; ".join(parts) + hint))
    latency = _latency_lines(manifest)
    if latency:
        table.add_row("latency", escape("\n".join(latency)))
    return table


def _latency_lines(manifest: dict[str, Any]) -> list[str]:
    """One line per bench configuration the bundle records, for the summary table.

    It showed the first only: a recipe's ``bench: {batch: [1, 4]}`` printed batch 1. Threads
    and input shapes are shown where the configurations differ in them.
    """
    records = manifest.get("bench_records") or [manifest.get("bench")]
    records = [r for r in records if r]
    threads = len({r.get("threads") for r in records}) > 1
    # sizes other than the batch (two bench steps at seq 16 and 128)
    shapes = len({(r["ep"], r["batch"], r.get("threads")) for r in records}) < len(records)
    lines = []
    for record in records:
        lat = record["latency_ms"]
        what = f"{record['ep']} batch {record['batch']}"
        if threads:
            what += f", threads {record.get('threads') or 'default'}"
        if shapes and record.get("shapes"):
            what += ", " + ", ".join(f"{k} {v}" for k, v in record["shapes"].items())
        lines.append(
            f"{what}: p50 {sig3(lat['p50'])} ms, p90 {sig3(lat['p90'])}, p99 {sig3(lat['p99'])}"
        )
    return lines


def _step_summary(steps: list[dict[str, Any]]) -> str | None:
    """What the last model-changing step bought: parameters, size, speed (None if none)."""
    step = next((s for s in reversed(steps) if "size_ratio" in s.get("metrics", {})), None)
    if step is None:
        return None
    m = step["metrics"]
    parts = []
    if m.get("params_before") and m.get("params_after") is not None:
        change = m["params_after"] / m["params_before"] - 1
        parts.append(f"params {m['params_before']:,} -> {m['params_after']:,} ({change:+.1%})")
    ratio = m["size_ratio"]
    parts.append(f"{ratio:.2f}x smaller" if ratio >= 1 else f"{1 / max(ratio, 1e-9):.2f}x larger")
    timing = f"cpu batch 1, p50 {sig3(m['p50_ms_before'])} -> {sig3(m['p50_ms_after'])} ms"
    if max(m["p50_ms_before"], m["p50_ms_after"]) < TOO_FAST_MS:
        parts.append(f"speed not compared ({timing}: too fast to time apart)")
    else:
        parts.append(f"{m['speedup']:.2f}x the speed ({timing})")
    return f"{step['name']}: " + ", ".join(parts)


TOO_FAST_MS = 0.1
"""Below this p50 one process's timing differs from the next by more than any model change
(a 9 KB model: 0.41x "the speed" of itself after a no-op cleanup)."""


def bench_table(records: list[dict[str, Any]]) -> Table:
    """One row per (ep, batch, threads)."""
    table = Table(title="latency (ONNX Runtime)")
    for col in BENCH_COLUMNS:
        table.add_column(col, justify="right")
    for record in records:
        table.add_row(*bench_row(record))
    return table


def validation_table(results: dict[str, dict[str, Any]]) -> Table:
    """One row per EP: status, numbers, reason."""
    table = Table(title="validation")
    for col in ("ep", "status", "max abs diff", "cosine", "reason"):
        table.add_column(col)
    style = {"passed": "green", "failed": "red", "unavailable": "yellow"}
    for ep, r in results.items():
        table.add_row(
            ep,
            f"[{style[r['status']]}]{r['status']}[/]",
            _num(r.get("max_abs_diff")),
            _num(r.get("cosine"), ".7f"),
            escape(r.get("reason") or ""),
        )
    return table


def compare_table(record: dict[str, Any]) -> Table:
    """Two bundles side by side: parameters, latency, agreement, op counts that differ."""
    table = Table(title="compare")
    table.add_column("")
    table.add_column("A", overflow="fold")
    table.add_column("B", overflow="fold")
    table.add_row("bundle", escape(record["a"]), escape(record["b"]))
    table.add_row(
        "inputs",
        *(
            escape(
                ", ".join(
                    f"{v['name']}[{','.join(map(str, v['shape']))}]" for v in record["inputs"][k]
                )
            )
            for k in ("a", "b")
        ),
    )
    table.add_row("parameters", f"{record['params']['a']:,}", f"{record['params']['b']:,}")
    lat = record["latency_ms"]
    at = f"cpu, batch {record.get('latency_batch', 1)}"
    cells = ("n/a" if v is None else sig3(v) for v in (lat["a"], lat["b"]))
    table.add_row(f"p50 ms ({at})", *cells)
    out = record["outputs"]
    table.add_row(  # B's numbers against A: one cell, A is the reference
        "agreement (B vs A)",
        "reference",
        f"max abs {_num(out['max_abs_diff'])}, cosine {_num(out['cosine'], '.7f')}, "
        f"top-1 {_num(out['top1_agreement'])}",
    )
    if pairs := record.get("paired_by_position"):  # names differ: which output met which
        shown = ", ".join(f"{x} ~ {y}" for x, y in pairs.items())
        table.add_row("paired by position", escape(shown), "")
    if note := not_compared_note(out):
        table.add_row("", escape(note), "")
    for error in out.get("errors") or []:  # outputs that could not be compared, and why
        table.add_row("not compared", escape(error), "")
    ops_a, ops_b = record["ops"]["a"], record["ops"]["b"]
    for op in sorted(set(ops_a) | set(ops_b)):
        if ops_a.get(op) != ops_b.get(op):
            table.add_row(f"op {escape(op)}", str(ops_a.get(op, 0)), str(ops_b.get(op, 0)))
    return table
