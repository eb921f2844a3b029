"""Checks on what a command is given to read or write: a bundle's manifest, OUT, source paths.

Each failure is an :class:`~onnxpipe.errors.InputError` (exit 2) raised before any work, so a
damaged manifest, a read-only bundle or an OUT that is a link never costs a whole run first.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from onnxpipe.errors import InputError

_Record = dict[str, Any]


class _Described(BaseModel):
    """``manifest["model"]``: what commands read of it."""

    model_config = ConfigDict(extra="allow", strict=True)
    sha256: str
    bytes: int | None = None
    opset: int | None = None
    ir_version: int | None = None
    external_data: _Record | None = None


_Number = float | int | Literal["nan", "inf", "-inf"] | None
"""A number as the manifest holds it: JSON has no NaN or infinity, so those are strings."""


class _Loose(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)


class _Step(_Loose):
    name: str
    config: _Record | None = None
    metrics: _Record | None = None
    seconds: _Number = None


class _Parity(_Loose):
    max_abs_diff: _Number = None
    max_rel_diff: _Number = None
    cosine: _Number = None
    top1_agreement: _Number = None
    kl: _Number = None
    samples: int | None = None
    reference: str | None = None
    outputs: list[_Record] | None = None


class _Input(_Loose):
    index_limit: int | None = Field(default=None, ge=1)
    """Rows of the table the ids index: generated ids are drawn below it (package, bench)."""


class _Validation(_Loose):
    status: str


class _Bench(_Loose):
    latency_ms: dict[str, _Number]


class _Mobile(_Loose):
    ort_file: str | None = None
    ort_sha256: str | None = None
    ort_bytes: int | None = None
    operators_config: str | None = None
    operators_config_sha256: str | None = None
    nnapi: _Record | None = None
    coreml: _Record | None = None


class _Manifest(BaseModel):
    """The manifest keys commands read, with their types (others are carried as they are)."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    schema_name: str = Field(alias="schema")
    model: _Described
    inputs: list[_Input]
    outputs: list[_Record]
    steps: list[_Step]
    source: _Record | None = None
    parity: _Parity | None = None
    parity_samples: _Record | None = None
    validation: dict[str, _Validation] | None = None
    bench: _Bench | None = None
    bench_records: list[_Bench] | None = None
    mobile: _Mobile | None = None
    versions: _Record | None = None
    title: str | None = None


_JSON_KIND = {list: "array", str: "string", int: "number", float: "number", bool: "boolean",
              type(None): "null"}  # fmt: skip


def check_manifest(path: Path, data: Any) -> None:
    """InputError unless ``data`` (read from ``path``) has the manifest's keys and types."""
    if not isinstance(data, dict):
        raise InputError(
            f"{path}: holds a JSON {_JSON_KIND.get(type(data), 'value')}, not the manifest's "
            "object; the bundle "
            "is damaged. Re-create the bundle with onnxpipe."
        )
    try:
        _Manifest.model_validate(data)
    except ValidationError as e:
        wrong = sorted({_where(item["loc"]) for item in e.errors()})
        raise InputError(
            f"{path}: {', '.join(wrong)} missing or of the wrong type; the manifest is damaged. "
            "Re-create the bundle with onnxpipe."
        ) from e
    _check_recorded_sizes(path, data)


def _check_recorded_sizes(path: Path, data: _Record) -> None:
    """InputError unless each recorded size of a symbolic dim is an integer >= 1.

    ``bench.shapes`` and ``source.data_sizes`` size the inputs later commands generate
    (:func:`~onnxpipe.data.recorded_sizes`): a hand-edited -3 crashed the benchmark (exit 3),
    0 timed empty tensors, and 2.5, "x" or true were used as 8 or 1 without a word.
    """
    recorded: list[tuple[str, str, Any]] = []  # (manifest key, symbol, value)
    shapes = (data.get("bench") or {}).get("shapes")
    if isinstance(shapes, dict):
        for entry in data["inputs"]:
            dims, shape = shapes.get(entry.get("name")), entry.get("shape")
            if not isinstance(dims, list) or not isinstance(shape, list):
                continue
            for axis, (dim, size) in enumerate(zip(shape, dims, strict=False)):
                if axis and not isinstance(dim, int):
                    symbol = dim or f"{entry['name']}_d{axis}"
                    recorded.append((f"bench.shapes.{entry['name']}[{axis}]", symbol, size))
    given = (data.get("source") or {}).get("data_sizes")
    if isinstance(given, dict):
        recorded += [(f"source.data_sizes.{k}", k, v) for k, v in given.items()]
    for key, symbol, size in recorded:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise InputError(
                f"{path}: {key}, the recorded size of dim {symbol!r}, is {json.dumps(size)}; "
                "a size must be an integer >= 1 (bench and the derived steps generate inputs "
                "at it). Set it to a size the model runs at, or re-create the bundle with "
                "onnxpipe."
            )


def check_renders(path: Path, data: _Record) -> dict[str, str]:
    """The card and report of manifest ``data``; InputError where a value breaks them.

    Run before anything is written: validate rewrote the manifest, then crashed on the card.
    """
    from onnxpipe.card import render_docs  # noqa: PLC0415 - card imports the bundle modules

    try:
        return render_docs(data)
    except (TypeError, KeyError, ValueError, AttributeError, IndexError) as e:
        raise InputError(
            f"{path}: a value the model card reads is missing or of the wrong type "
            f"({type(e).__name__}: {e}); the manifest is damaged. Re-create the bundle with "
            "onnxpipe."
        ) from e


def _where(loc: tuple[Any, ...]) -> str:
    """A pydantic error location as a manifest key path: steps[0].metrics, model.bytes."""
    parts = [
        f"[{p}]" if isinstance(p, int) else f".{p}"
        for p in loc
        if p not in _UNIONS and not str(p).startswith("literal[")
    ]
    return "".join(parts).lstrip(".")


_UNIONS = frozenset({"function-after", "int", "float", "none", "str", "dict", "list"})


def check_recordable(bundle: Path, command: str) -> None:
    """InputError unless ``command`` can record its results in ``bundle`` (a writable folder).

    ``validate`` and ``bench`` write manifest.json, README.md and report.html afresh; on a
    read-only bundle they failed with an internal error after all their work.
    """
    try:
        fd, probe = tempfile.mkstemp(prefix=".onnxpipe-probe-", dir=bundle)
    except OSError as e:
        raise InputError(
            f"{bundle}: cannot be written ({e.strerror or e}), and {command} records its results "
            "in the bundle's manifest.json and card. Copy the bundle somewhere writable "
            f"(cp -r {bundle} COPY) or make it writable, then run {command} on it."
        ) from e
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(probe)


def check_out_path(out: Path) -> None:
    """InputError for an OUT that cannot be replaced as a folder: a link, the working folder."""
    if out.is_symlink():
        raise InputError(
            f"{out}: is a symbolic link (to {os.readlink(out)}); onnxpipe writes a bundle as a "
            "new folder and would replace the link, not write where it points. Give the real "
            "path or a new -o."
        )
    here = Path.cwd().resolve()
    if here == out.resolve() or here.is_relative_to(out.resolve()):
        raise InputError(
            f"{out}: is (or contains) the current directory, which cannot be replaced by a "
            "bundle; pick a new -o, e.g. -o bundle."
        )


_MODULE_REF = re.compile(r"([A-Za-z_]\w*)(?:\.[A-Za-z_]\w*)*:[A-Za-z_][\w.]*")


def module_source(text: str) -> Path | None:
    """The package folder or module file a ``package.module:callable`` reference imports.

    Found on the import path without importing anything, so that OUT can be refused where it
    would replace the user's code (``convert mypkg.mod:make -o mypkg --overwrite``).
    """
    match = _MODULE_REF.fullmatch(text)
    if match is None:
        return None
    top = match.group(1)
    for base in (Path.cwd(), *(Path(p) for p in sys.path if p)):
        for candidate in (base / top, base / f"{top}.py"):
            with contextlib.suppress(OSError):
                if candidate.is_dir() or candidate.is_file():
                    return candidate
    return None
