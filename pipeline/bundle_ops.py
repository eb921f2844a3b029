"""Operations on an existing bundle: validate and bench, each an atomic manifest update."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from onnxpipe.atomic import write_json_atomic
from onnxpipe.bench import BenchConfig, bench_model
from onnxpipe.bundle import MANIFEST, open_bundle, read_manifest
from onnxpipe.bundle_checks import check_recordable, check_renders
from onnxpipe.card import write_docs
from onnxpipe.converters.base import InputSpec, unnamed_dim
from onnxpipe.data import recorded_sizes
from onnxpipe.errors import GateFailed
from onnxpipe.modelio import MODEL_FILE
from onnxpipe.steps import raise_on_failed_validation
from onnxpipe.validate import source_tolerance, validate_bundle

logger = logging.getLogger(__name__)


def bundle_inputs(manifest: dict[str, Any]) -> list[InputSpec]:
    """Input specs from the manifest's ``inputs`` (unnamed dynamic dims get a symbol)."""
    specs = []
    for entry in manifest["inputs"]:
        shape = tuple(
            d if isinstance(d, int) else (d or unnamed_dim(entry["name"], i))
            for i, d in enumerate(entry["shape"])
        )
        specs.append(InputSpec(entry["name"], entry["dtype"], shape, entry.get("index_limit")))
    return specs


def _record(bundle: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change the manifest and rewrite the card and report; all rendered before any write."""
    manifest = read_manifest(bundle)
    change(manifest)
    docs = check_renders(bundle / MANIFEST, manifest)
    write_json_atomic(bundle / MANIFEST, manifest)
    write_docs(bundle, manifest, docs)


def validate_existing(
    bundle: Path, eps: Sequence[str], require: Sequence[str], data: str | None, atol: float
) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Validate ``bundle`` on ``eps``; record ``validation.<ep>``; return results and failure."""
    manifest = open_bundle(bundle)
    if not (bundle / MODEL_FILE).is_file():
        raise_missing(bundle)
    check_recordable(bundle, "validate")
    check_renders(bundle / MANIFEST, manifest)  # its card is rewritten: broken values first
    atol = source_tolerance(manifest, atol)
    results = validate_bundle(bundle, eps, bundle_inputs(manifest), data, atol, require)
    _record(bundle, lambda m: m.setdefault("validation", {}).update(results))
    try:
        raise_on_failed_validation(results, tuple(require))
    except GateFailed as e:
        return results, str(e)
    return results, None


def bench_existing(bundle: Path, config: BenchConfig) -> list[dict[str, Any]]:
    """Bench ``bundle``; ``bench`` is the first record, ``bench_records`` all of them."""
    manifest = open_bundle(bundle)
    if not (bundle / MODEL_FILE).is_file():
        raise_missing(bundle)
    check_recordable(bundle, "bench")
    check_renders(bundle / MANIFEST, manifest)  # its card is rewritten: broken values first
    inputs = bundle_inputs(manifest)
    # where it was timed before (its --data sizes), not 8x8 pixels; --size overrides per symbol
    config = replace(config, recorded=recorded_sizes(inputs, manifest))
    framework = (manifest.get("source") or {}).get("framework")
    records = bench_model(bundle / MODEL_FILE, [s.to_json() for s in inputs], config, framework)

    def change(m: dict[str, Any]) -> None:
        m["bench"] = records[0]
        m["bench_records"] = records

    _record(bundle, change)
    return records


def raise_missing(bundle: Path) -> None:
    """Raise the input error for a bundle without its model file."""
    from onnxpipe.errors import InputError  # noqa: PLC0415

    raise InputError(f"{bundle}: the bundle has no {MODEL_FILE}; it is incomplete. Re-create it.")
