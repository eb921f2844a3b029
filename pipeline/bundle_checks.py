"""Checks on what a command is given to read or write: a bundle's manifest, OUT, source paths.

Each failure is an :class:`~onnxpipe.errors.InputError` (exit 2) raised before any work, so a
damaged manifest, a read-only bundle or an OUT that is a link never costs a whole run first.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

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


class _Manifest(BaseModel):
    """The manifest keys commands read, with their types (others are carried as they are)."""

    model_config = ConfigDict(extra="allow", strict=True, populate_by_name=True)
    schema_name: str = Field(alias="schema")
    model: _Described
    inputs: list[_Record]
    outputs: list[_Record]
    steps: list[_Record]
    source: _Record | None = None
    parity: _Record | None = None
    parity_samples: _Record | None = None
    validation: dict[str, _Record] | None = None
    bench: _Record | None = None
    bench_records: list[_Record] | None = None
    mobile: _Record | None = None
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
        wrong = sorted({".".join(map(str, item["loc"][:2])) for item in e.errors()})
        raise InputError(
            f"{path}: {', '.join(wrong)} missing or of the wrong type; the manifest is damaged. "
            "Re-create the bundle with onnxpipe."
        ) from e


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
