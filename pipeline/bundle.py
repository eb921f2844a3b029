"""Handoff bundles: written to a temp dir and renamed into place, complete or absent.

Layout (contract): ``model.onnx`` (+ ``model.onnx.data`` where needed), ``manifest.json``,
``README.md`` (the model card), and ``parity.npz``: sample inputs with the source framework's
outputs, so ``onnxpipe validate`` can re-prove parity later without the framework installed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import platform
import tempfile
import zipfile
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.atomic import failure_report, report_writable, write_json_atomic
from onnxpipe.bundle_checks import check_manifest, check_out_path, module_source
from onnxpipe.converters.source import named_path
from onnxpipe.errors import InputError

logger = logging.getLogger(__name__)

SCHEMA = "onnxpipe.manifest/1"
MANIFEST = "manifest.json"
PARITY_FILE = "parity.npz"
PARITY_MAX_BYTES = 16 << 20


def check_out_dir(out: Path, overwrite: bool, protect: tuple[Path, ...] = ()) -> None:
    """Refuse an OUT that exists non-empty (unless ``overwrite``) or that is an input.

    Raises:
        InputError: OUT cannot be written without harming something.
    """
    check_out_path(out)
    resolved = out.resolve()
    for path in protect:
        p = path.resolve()
        if resolved == p or p.is_relative_to(resolved) or resolved.is_relative_to(p):
            raise InputError(
                f"{out}: is (or contains, or is inside) the input {path}; pick a new -o."
            )
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: exists and is not a directory; pick a new -o.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(f"{out}: exists and is not empty. Pick a new -o or pass --overwrite.")
    _probe_writable(out)


def input_paths(*values: Any) -> tuple[Path, ...]:
    """The existing files and folders that settings name: sources, ``--data``/``--calib``.

    Strings (in settings models, recursively through their fields) count when they are a path,
    a ``path.py:callable`` whose file exists, a ``package.module:callable`` (its package folder
    on the import path) or an image folder with its preprocessing (``DIR?resize=...``), so OUT
    can be refused where it would replace them.
    """
    found: list[Path] = []
    for value in values:
        if hasattr(value, "model_dump"):
            found += input_paths(*value.model_dump().values())
        elif isinstance(value, list | tuple):
            found += input_paths(*value)
        elif isinstance(value, dict):  # a recipe step's settings (quantize's calib)
            found += input_paths(*value.values())
        elif isinstance(value, str | Path) and str(value):
            text = str(value)
            for candidate in (text, named_path(text)[0], module_source(text)):
                with contextlib.suppress(OSError, ValueError):
                    if candidate and Path(candidate).exists():
                        found.append(Path(candidate))
                        break
    return tuple(dict.fromkeys(found))


def _probe_writable(out: Path) -> None:
    """InputError unless a directory can be made beside ``out``, checked before any work.

    Parents the probe creates are removed again, so a run that fails later leaves nothing.
    """
    missing = []
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        missing.append(parent)  # innermost first
        parent = parent.parent
    if not parent.is_dir():  # mkdir said "File exists", naming neither the file nor the fix
        raise InputError(f"{out}: {parent} is a file, not a folder; pick a -o outside it.")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent))
    except OSError as e:
        raise InputError(
            f"{out}: cannot be written ({e.strerror or e}). Pick a -o in a directory you can write."
        ) from e
    finally:
        for path in missing:
            with contextlib.suppress(OSError):
                path.rmdir()


def write_failure_report(out: Path, record: dict[str, Any]) -> str:
    """``<out>.failed.json`` beside the bundle that was not written: what failed and its numbers.

    ``record`` holds at least ``failed_step``, ``error`` and ``metrics``; the report starts
    with ``status: gate_failed``, as the ``--json`` record of the failure does. Returns where
    the numbers are for the message: a folder or link of the user's at that path is left as
    it is and the message says so (the numbers are printed with the failure anyway).
    """
    report = failure_report(out)
    if not report_writable(report):
        return f"this message ({report} is not a file, left as it is)"
    write_json_atomic(report, {"status": "gate_failed", **record})
    return str(report)


def read_manifest(bundle: Path) -> dict[str, Any]:
    """The bundle's manifest.

    Raises:
        InputError: ``bundle`` is not an onnxpipe bundle.
    """
    path = bundle / MANIFEST
    if not path.is_file():
        if (bundle.parent / MANIFEST).is_file():  # a bundle's model.onnx given for the bundle
            raise InputError(f"{bundle}: inside the bundle {bundle.parent}; pass that folder.")
        what = f"no {MANIFEST}" if bundle.exists() else "no such folder"
        raise InputError(
            f"{bundle}: not an onnxpipe bundle ({what}). Create one with onnxpipe "
            "convert SOURCE -o OUT (an .onnx file is a valid SOURCE)."
        )
    try:
        data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{path}: not valid JSON ({e}); the bundle is damaged.") from e
    if not isinstance(data, dict):
        check_manifest(path, data)  # raises: not an object
    if data.get("schema") != SCHEMA:
        raise InputError(f"{path}: schema {data.get('schema')!r}, expected {SCHEMA!r}.")
    return data


def open_bundle(bundle: Path) -> dict[str, Any]:
    """The manifest of a bundle whose files are as the manifest recorded them.

    Checks that ``model.onnx`` (and its external data, where the manifest lists it) is there
    with the recorded sha256, that ``parity.npz`` is there where the manifest has a parity
    record (onnxpipe stores its samples with it), that a packaged bundle's ``.ort`` file is
    there and an unpackaged one holds none, and that no input's ``index_limit`` exceeds the
    rows of the table it indexes, so no command works on, or ships, a model the manifest does
    not describe.

    Raises:
        InputError: not a bundle, or a file is missing or changed since the manifest was written.
    """
    from onnxpipe.modelio import (  # noqa: PLC0415 - modelio loads onnx_ir
        DATA_FILE,
        MOBILE_MODEL,
        MODEL_FILE,
        sha256,
    )

    manifest = read_manifest(bundle)
    check_manifest(bundle / MANIFEST, manifest)
    model = manifest["model"]
    if (bundle / DATA_FILE).exists() and not model.get("external_data"):
        raise InputError(
            f"{bundle}: holds {DATA_FILE}, which its manifest does not record, so nothing "
            "vouches for those weights. Re-create the bundle with onnxpipe."
        )
    mobile = (manifest.get("mobile") or {}).get("ort_file")
    if (bundle / MOBILE_MODEL).exists() and mobile != MOBILE_MODEL:
        # bench --ep mobile timed such a file (another bundle's) and recorded it as this one's
        raise InputError(
            f"{bundle}: {MOBILE_MODEL} is not recorded in the manifest, so nothing says it is "
            f"this bundle's model; run package again (onnxpipe package {bundle} -o OUT --target "
            f"mobile), or remove {bundle / MOBILE_MODEL}."
        )
    files = [(MODEL_FILE, model.get("sha256"))]
    if model.get("external_data"):
        files.append((DATA_FILE, model["external_data"].get("sha256")))
    if mobile and manifest["mobile"].get("ort_sha256"):
        files.append((mobile, manifest["mobile"]["ort_sha256"]))
    parity = [PARITY_FILE] if manifest.get("parity") else []  # stored with the parity record
    samples = manifest.get("parity_samples")
    if isinstance(samples, dict) and samples.get("sha256"):
        files.append((PARITY_FILE, samples["sha256"]))
    config = (manifest.get("mobile") or {}).get("operators_config")
    if config and manifest["mobile"].get("operators_config_sha256"):
        files.append((config, manifest["mobile"]["operators_config_sha256"]))
    names = [name for name, _ in files] + parity + [p for p in (mobile, config) if p]
    names = list(dict.fromkeys(names))
    missing = [name for name in names if not (bundle / name).is_file()]
    if missing:
        raise InputError(
            f"{bundle}: the bundle is incomplete: {', '.join(missing)} missing, though onnxpipe "
            "wrote it. Re-create the bundle (onnxpipe convert, or the step that made it)."
        )
    for name, recorded in files:
        if recorded and sha256(bundle / name) != recorded:
            fix = (
                "To work on an edited model, make a new bundle of it: onnxpipe convert "
                f"{bundle / name} -o NEW_BUNDLE."
                if name == MODEL_FILE
                else "Re-create the bundle with the step that made it."
            )
            raise InputError(
                f"{bundle / name}: changed since onnxpipe wrote the bundle (its sha256 is not the "
                f"manifest's {recorded[:12]}...), so the manifest's numbers are not about it. {fix}"
            )
    _check_signature(bundle, manifest)
    return manifest


def _check_signature(bundle: Path, manifest: dict[str, Any]) -> None:
    """InputError unless the manifest's ``inputs``/``outputs`` are model.onnx's own."""
    import onnx_ir as ir  # noqa: PLC0415 - heavy; only once the bundle's files check out

    from onnxpipe.modelio import MODEL_FILE, io_signature  # noqa: PLC0415

    def plain(entries: Any) -> list[Any]:
        return [
            {k: e.get(k) for k in ("name", "dtype", "shape")} if isinstance(e, dict) else e
            for e in entries
        ]

    inputs, outputs = io_signature(ir.load(bundle / MODEL_FILE))
    for key, actual in (("inputs", inputs), ("outputs", outputs)):
        recorded, real = plain(manifest[key]), plain(actual)
        if recorded != real:
            wrong = next(
                ((r, a) for r, a in zip(recorded, real, strict=False) if r != a),
                (recorded, real),  # another count
            )
            raise InputError(
                f"{bundle / MANIFEST}: its {key} are not those of {MODEL_FILE} ({wrong[0]} where "
                f"the model has {wrong[1]}); the manifest was edited or damaged. Re-create the "
                "bundle with onnxpipe."
            )
    for i, (entry, own) in enumerate(zip(manifest["inputs"], inputs, strict=True)):
        # generated ids are drawn below the recorded limit: past the table, ORT's Gather fails
        limit, rows = entry.get("index_limit"), own.get("index_limit")
        if limit is not None and rows is not None and limit > rows:
            raise InputError(
                f"{bundle / MANIFEST}: inputs[{i}].index_limit is {limit}, but "
                f"{entry.get('name')} indexes a table of {rows} rows in {MODEL_FILE}; the "
                "manifest was edited or damaged. Re-create the bundle with onnxpipe."
            )


def save_parity_samples(
    directory: Path, feeds_list: list[dict[str, np.ndarray]], outputs: list[list[np.ndarray]]
) -> int:
    """Store sample inputs and reference outputs, as many runs as fit ``PARITY_MAX_BYTES``."""
    arrays: dict[str, np.ndarray] = {}
    size = 0
    kept = 0
    for i, (feeds, outs) in enumerate(zip(feeds_list, outputs, strict=True)):
        run = {f"in{i}/{k}": v for k, v in feeds.items()}
        run.update({f"out{i}/{j}": o for j, o in enumerate(outs)})
        run_bytes = sum(a.nbytes for a in run.values())
        if size + run_bytes > PARITY_MAX_BYTES and kept:
            break
        arrays.update(run)
        size += run_bytes
        kept += 1
    # numpy's stubs read the first keyword as allow_pickle; the names here are array keys.
    np.savez_compressed(directory / PARITY_FILE, **arrays)  # type: ignore[arg-type]
    return kept


NPZ_ERRORS = (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error, KeyError)
"""What numpy raises on a damaged .npz: truncated, bit rot, empty, a member not an array."""


def unreadable_numpy(path: Path, error: Exception) -> InputError:
    """The error for a .npy/.npz numpy cannot read (one of :data:`NPZ_ERRORS`)."""
    return InputError(f"{path}: not a readable numpy file ({type(error).__name__}: {error}).")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of the .npz at ``path``, read now (no pickles).

    Raises:
        InputError: the file is not a readable .npz of arrays (truncated, damaged, empty, or
            a member that is not a numpy array), named with the reason.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except NPZ_ERRORS as e:
        raise unreadable_numpy(path, e) from e
    bad = [key for key, value in arrays.items() if not isinstance(value, np.ndarray)]
    if bad:
        raise InputError(f"{path}: member(s) {bad} are not numpy arrays; save it with np.savez.")
    return arrays


def load_parity_samples(bundle: Path) -> list[tuple[dict[str, np.ndarray], list[np.ndarray]]]:
    """The stored (feeds, reference outputs) pairs, or [] when the bundle has none."""
    path = bundle / PARITY_FILE
    if not path.is_file():
        return []
    runs: dict[int, tuple[dict[str, np.ndarray], dict[int, np.ndarray]]] = {}
    try:
        arrays = read_npz(path)
        for key, array in arrays.items():
            kind, _, name = key.partition("/")
            index = int(kind[3:] if kind.startswith("out") else kind[2:])
            feeds, outs = runs.setdefault(index, ({}, {}))
            if kind.startswith("out"):
                outs[int(name)] = array
            else:
                feeds[name] = array
    except (InputError, ValueError) as e:
        raise InputError(
            f"{path}: the bundle's stored parity samples are damaged ({e}). Re-create the "
            "bundle (onnxpipe convert, or the step that made it)."
        ) from e
    return [(f, [o[j] for j in sorted(o)]) for _, (f, o) in sorted(runs.items())]


_FRAMEWORK_DISTS = {"torch": ("torch", "onnxscript"), "tf": ("tensorflow", "tf2onnx", "keras")}


def versions(framework: str | None = None) -> dict[str, str]:
    """Versions of onnxpipe, ONNX tooling and the source framework's packages (if installed)."""
    wanted = set(_FRAMEWORK_DISTS.get(framework or "", ()))
    out = {"python": platform.python_version()}
    for name, dist in (
        ("onnxpipe", "onnxpipe"),
        ("onnx", "onnx"),
        ("onnxruntime", "onnxruntime"),
        ("onnxruntime", "onnxruntime-gpu"),
        ("onnx_ir", "onnx-ir"),
        ("onnxscript", "onnxscript"),
        ("onnxslim", "onnxslim"),
        ("torch", "torch"),
        ("tensorflow", "tensorflow"),
        ("tf2onnx", "tf2onnx"),
        ("keras", "keras"),
    ):
        if name in _FRAMEWORK_DISTS["torch"] + _FRAMEWORK_DISTS["tf"] and name not in wanted:
            continue
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(dist)
    return out
