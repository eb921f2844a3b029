"""Writes that land whole or not at all: bundle folders, text and JSON files.

A bundle is built in a temp folder beside OUT and renamed into place; a file is written to a
temp file in its folder and replaced in one ``os.replace``. Readers never see half of either.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.errors import InputError, note_written, raise_if_interrupted


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside ``out``; on success it replaces ``out`` in one rename.

    ``out`` is checked again when the bundle is complete: what appeared there during the run
    is replaced only with ``overwrite``. A bundle that stood there comes back if the new one
    cannot take its place; SIGINT/SIGTERM wait while the two renames run.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would hide the bundle from others
        yield tmp
        raise_if_interrupted()  # a signal whose exception was lost: nothing is written
        _check_still_free(out, overwrite)
        old = out.parent / f".{out.name}.old-{os.getpid()}" if os.path.lexists(out) else None
        swapped = False
        try:
            with _signals_held():
                _swap_in(tmp, out, old)
                swapped = True
                note_written(out)
        finally:  # a signal held back during the swap is raised as the block ends
            if swapped and old is not None:
                _remove(old)
            report = failure_report(out)
            # an earlier failed run's report would contradict the bundle (not a user's folder)
            if swapped and report_writable(report):
                report.unlink(missing_ok=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def failure_report(out: Path) -> Path:
    """Where a failed run's numbers for ``out`` go: ``<out>.failed.json`` beside it."""
    return out.parent / f"{out.name}.failed.json"


def report_writable(report: Path) -> bool:
    """Whether onnxpipe may write or remove ``report``: absent, or a plain file.

    A link or a folder of the user's at that path is left as it is.
    """
    return not os.path.lexists(report) or (report.is_file() and not report.is_symlink())


def _check_still_free(out: Path, overwrite: bool) -> None:
    """InputError unless the finished bundle may take ``out`` now (checked again at the end).

    What appeared there while onnxpipe ran is kept without ``overwrite``, and a link is never
    replaced (the bundle would not land where it points).
    """
    if out.is_symlink():
        raise InputError(
            f"{out}: became a symbolic link while onnxpipe ran and was left as it is; nothing "
            "was written. Give the real path or a new -o."
        )
    empty_dir = out.is_dir() and not any(out.iterdir())
    if out.exists() and not (overwrite or empty_dir):
        raise InputError(
            f"{out}: appeared (not empty) while onnxpipe ran and was left as it is; nothing "
            "was written. Pick a new -o or pass --overwrite."
        )


def _remove(path: Path) -> None:
    """Remove ``path``, a folder or anything else, quietly."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap_in(tmp: Path, out: Path, old: Path | None) -> None:
    """Rename ``tmp`` to ``out``, moving what stands there to ``old`` first and back on failure."""
    if old is not None:
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except BaseException:
        if old is not None:
            os.rename(old, out)
        raise


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back until the block is done, then act on them as before.

    The Python handlers are swapped for one that only remembers the signal: masking it
    (``pthread_sigmask``) holds nothing back once ORT or torch run threads of their own,
    which the kernel then hands the signal to. Only the main thread can swap handlers.
    """
    import signal  # noqa: PLC0415
    import threading  # noqa: PLC0415

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, _: pending.append(signum)) for s in held}
    try:
        yield
    finally:
        for held_signal, handler in before.items():
            signal.signal(held_signal, handler)
        for signum in pending[-1:]:
            signal.raise_signal(signum)  # to the handler it had


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through a temp file in the same directory and ``os.replace`` it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp's 0600 would replace the file's own mode (or the umask's, for a new file).
        mode = path.stat().st_mode if path.exists() else 0o666 & ~_umask()
        os.fchmod(fd, stat.S_IMODE(mode))
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    # The only portable way to read the umask is to set it; set it straight back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON atomically (see :func:`write_text_atomic`)."""
    write_text_atomic(path, json.dumps(strict_json(data), indent=2, default=_json_default) + "\n")


def strict_json(data: Any) -> Any:
    """``data`` with NaN and infinities as the strings "nan", "inf", "-inf".

    ``json.dumps`` would write the literals NaN and Infinity, which strict JSON parsers reject.
    """
    if isinstance(data, float) and not math.isfinite(data):
        return "nan" if math.isnan(data) else ("inf" if data > 0 else "-inf")
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(v) for v in data]
    return data


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON-serialisable: {type(obj).__name__}")
