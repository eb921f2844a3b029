"""Resolve a SOURCE argument: ``pkg.module:callable``, ``path/file.py:callable`` or a file.

Loading user code runs it; that is the user's own code, named on the command line, and is the
documented way to hand onnxpipe a model. Files are never modified.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import re
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from onnxpipe.converters import extra_for
from onnxpipe.errors import InputError

logger = logging.getLogger(__name__)

Framework = Literal["torch", "tf", "onnx"]
_ATTR_RE = re.compile(r"^[A-Za-z_][\w.]*$")
_MODULE_RE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


@dataclass(frozen=True)
class Loaded:
    """A model already built from a SOURCE string, kept with that string for messages."""

    obj: Any
    name: str


def describe(source: object) -> str:
    """How messages name a source: its SOURCE string, or the object's class."""
    if isinstance(source, str):
        return source
    if isinstance(source, Loaded):
        return source.name
    return type(source).__qualname__


def is_callable_ref(source: str) -> bool:
    """True for ``module:callable`` and ``file.py:callable`` strings (not Windows drive paths)."""
    if Path(source).exists():
        return False
    target, sep, attr = source.rpartition(":")
    return bool(
        sep and _ATTR_RE.match(attr) and (target.endswith(".py") or _MODULE_RE.match(target))
    )


def named_path(text: str) -> tuple[str, str]:
    """The file or folder a SOURCE or DATA string names, and the rest of the string.

    ``file.py:make`` -> (``file.py``, ``:make``); ``DIR?resize=256`` -> (``DIR``,
    ``?resize=256``); a plain path -> (path, ""); ``module:callable`` names no file -> ("", text).
    """
    head, sep, query = text.partition("?")
    if is_callable_ref(head):
        target, colon, attr = head.rpartition(":")
        return (target, colon + attr + sep + query) if target.endswith(".py") else ("", text)
    return head, sep + query


def quiet_imports() -> bool:
    """Whether imports keep their C++ notices off the terminal.

    The CLI without ``--debug`` sets the ``tensorflow`` logger to ERROR.
    """
    return logging.getLogger("tensorflow").getEffectiveLevel() >= logging.ERROR


@contextlib.contextmanager
def stderr_kept_back(active: bool) -> Iterator[None]:
    """Point descriptor 2 at a scratch file; replay what it caught if the body raises.

    TensorFlow logs from C++ while it loads, before its log level applies ("All log
    messages before absl::InitializeLog() is called are written to STDERR", oneDNN and CUDA
    notices), whether onnxpipe imports it or a user's module does.
    """
    if not active:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            sink.seek(0)
            sys.stderr.write(sink.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def importable_from(*folders: Path) -> Iterator[None]:
    """``folders`` on the import path (after what is there) for the block, in that order.

    Those already on it stay where they are; the others are taken off again afterwards.
    """
    added = [d for d in dict.fromkeys(str(f) for f in folders) if d not in sys.path]
    sys.path.extend(added)
    try:
        yield
    finally:
        for d in added:
            with contextlib.suppress(ValueError):
                sys.path.remove(d)


def load_callable(ref: str) -> Callable[[], Any]:
    """Import the callable named by ``pkg.module:callable`` or ``path/file.py:callable``.

    Raises:
        InputError: the module or file cannot be imported, or the attribute is missing or
            not callable.
    """
    target, _, attr = ref.rpartition(":")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise InputError(f"{target}: no such Python file. Check the path in {ref!r}.")
        module_name = f"onnxpipe_user_{abs(hash(path.resolve()))}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise InputError(f"{target}: cannot be imported as a Python file.")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        # The file may import its neighbours, as `python file.py` would allow.
        sys.path.insert(0, str(path.resolve().parent))
        try:
            with stderr_kept_back(quiet_imports()):  # e.g. a file that imports keras
                spec.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001 - user code may raise anything; report it as input
            raise InputError(
                missing_framework(target, e)
                or f"{target}: importing it raised {type(e).__name__}: {e}. Fix the file, or "
                "check that its imports are installed."
            ) from e
        finally:
            sys.path.remove(str(path.resolve().parent))
    else:
        # A module in the working directory imports as `python -m` (or uvicorn) would find it.
        try:
            with importable_from(Path.cwd()), stderr_kept_back(quiet_imports()):
                module = importlib.import_module(target)
        except ImportError as e:
            raise InputError(
                missing_framework(ref, e)
                or f"{ref}: cannot import module {target!r} ({e}). Install it or pass "
                "path/file.py:callable instead."
            ) from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise InputError(f"{ref}: {target!r} has no attribute {part!r}.")
        obj = getattr(obj, part)
    if not callable(obj):
        raise InputError(f"{ref}: {attr!r} is not callable; name a function or class.")
    return obj


def call_factory(ref: str, returns: str = "build and return the model") -> Any:
    """Load ``ref`` and call it with no arguments, reporting user-code failures as input errors.

    ``returns`` says what the callable is for, in the message (DATA callables return samples).
    """
    factory = load_callable(ref)
    try:
        with stderr_kept_back(quiet_imports()):  # a factory that imports keras inside
            return factory()
    except InputError:
        raise  # onnxpipe's own factories (the demo) say what to do already
    except Exception as e:  # noqa: BLE001 - user code may raise anything; report it as input
        raise InputError(
            missing_framework(ref, e)
            or f"{ref}: calling it raised {type(e).__name__}: {e}. The callable must {returns} "
            "with no arguments."
        ) from e


def missing_framework(ref: str, error: BaseException) -> str | None:
    """The message for user code that needs a framework that is not installed, else None."""
    name = error.name if isinstance(error, ModuleNotFoundError) else None
    root = (name or "").split(".")[0]
    extra = extra_for(root)
    if extra is None:
        return None
    return f"{ref}: needs {root}, which is not installed. Install it with: pip install '{extra}'"


def framework_of_object(obj: Any) -> Framework | None:
    """The framework an in-memory model belongs to, judged by its class's module (no imports)."""
    for klass in type(obj).__mro__:
        root = klass.__module__.split(".")[0]
        if root == "torch":
            return "torch"
        if root in ("keras", "tensorflow", "tf_keras"):
            return "tf"
    return None


def detect_framework(source: str) -> Framework:
    """Guess the framework of a SOURCE string from its form and file type, without loading it.

    Raises:
        InputError: the path does not exist, or its type is not one onnxpipe reads.
    """
    path = Path(source)
    if not path.exists():
        if is_callable_ref(source):
            # Decided after calling it (framework_of_object); torch is the common case.
            return "torch"
        raise InputError(
            f"{source}: no such file or directory. Pass a model file (.onnx, .pt, .pt2, .keras, "
            ".h5), a SavedModel directory, or pkg.module:callable / path/file.py:callable."
        )
    suffix = path.suffix.lower()
    if path.is_dir():
        if (path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists():
            return "tf"
        raise InputError(
            f"{source}: is a directory but not a SavedModel (no saved_model.pb inside). Pass the "
            "SavedModel directory itself, or a model file."
        )
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".pt", ".pth", ".pt2", ".jit", ".ts"):
        return "torch"
    if suffix in (".keras", ".h5", ".hdf5"):
        return "tf"
    if zipfile.is_zipfile(path):
        return "torch"
    if path.name in ("saved_model.pb", "saved_model.pbtxt"):  # was "unknown model file type .pb"
        raise InputError(
            f"{source}: is the graph file of the SavedModel {path.resolve().parent}; pass that "
            "directory."
        )
    raise InputError(
        f"{source}: unknown model file type {suffix or '(none)'}. Use .onnx, .pt (TorchScript), "
        ".pt2 (torch.export), .keras, .h5, a SavedModel directory, or pass --framework."
    )
