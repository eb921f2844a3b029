"""Load a PyTorch SOURCE safely: a callable, TorchScript ``.pt``, ExportedProgram ``.pt2``.

Full-pickle ``torch.load`` runs arbitrary code from the file, so it is refused unless the user
passes ``--unsafe-load``; a file holding only a state_dict is refused with what to pass instead.
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from onnxpipe.converters.source import (
    Loaded,
    call_factory,
    framework_of_object,
    importable_from,
    is_callable_ref,
)
from onnxpipe.errors import InputError

logger = logging.getLogger(__name__)

_STATE_DICT_HINT = (
    "A state_dict holds weights but not the architecture. Pass path/file.py:make where make() "
    "builds the nn.Module and loads this file with model.load_state_dict(torch.load(...)), or "
    "save the module with torch.jit.script(model).save('model.pt') or "
    "torch.export.save(torch.export.export(model, example), 'model.pt2')."
)


def load_torch_source(source: str | object, unsafe_load: bool = False) -> Any:
    """Return an ``nn.Module`` (eval mode) or an ``ExportedProgram`` for ``source``.

    Raises:
        InputError: the file is not a PyTorch model, holds only a state_dict, needs full
            pickle loading without ``--unsafe-load``, or the callable returns the wrong type.
    """
    if isinstance(source, Loaded):
        return _checked_module(source.obj, source.name)
    if not isinstance(source, str):
        return _checked_module(source, "the object passed to convert()")
    if is_callable_ref(source):
        return _checked_module(call_factory(source), source)
    path = Path(source)
    if path.is_dir():
        raise InputError(
            f"{source}: a directory (a TensorFlow SavedModel?), not a PyTorch model file. Drop "
            "--framework torch, or pass a .pt, .pt2 or path/file.py:callable."
        )
    if not path.is_file():
        raise InputError(f"{source}: no such file. Pass a .pt, .pt2 or path/file.py:callable.")
    if path.suffix.lower() == ".pt2":
        return _load_exported_program(path)
    return _load_pt(path, unsafe_load)


def _checked_module(obj: Any, where: str) -> torch.nn.Module:
    if isinstance(obj, torch.export.ExportedProgram):
        return obj  # type: ignore[return-value]
    if not isinstance(obj, torch.nn.Module) and framework_of_object(obj) == "tf":
        raise InputError(
            f"{where}: is a Keras/TensorFlow model, not PyTorch. Drop --framework torch (or "
            "pass --framework tf)."
        )
    if not isinstance(obj, torch.nn.Module):
        raise InputError(
            f"{where}: returned {type(obj).__module__}.{type(obj).__qualname__}, expected a "
            "torch.nn.Module (or a keras.Model). Return the model object itself, not a tuple, "
            "a state_dict or a path."
        )
    return obj.eval()


def _load_exported_program(path: Path) -> Any:
    try:
        return torch.export.load(str(path))
    except (RuntimeError, ValueError, KeyError, zipfile.BadZipFile, pickle.UnpicklingError) as e:
        raise InputError(
            f"{path}: not a readable torch.export ExportedProgram ({type(e).__name__}: "
            f"{str(e)[:200]}). Save one with torch.export.save(torch.export.export(model, "
            "example_inputs), 'model.pt2')."
        ) from e


def _is_torchscript_archive(path: Path) -> bool:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False
    return any(n.endswith("/constants.pkl") or "/code/" in n for n in names)


def _load_pt(path: Path, unsafe_load: bool) -> Any:
    if _is_torchscript_archive(path):
        try:
            return torch.jit.load(str(path), map_location="cpu").eval()
        except RuntimeError as e:
            raise InputError(f"{path}: a damaged TorchScript archive ({str(e)[:200]}).") from e
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not _looks_saved(path):
            raise InputError(
                f"{path}: not a PyTorch model file (neither torch.save's zip archive nor a "
                "pickle). Pass a TorchScript .pt, a torch.export .pt2 or path/file.py:callable."
            ) from e
        if not unsafe_load:
            raise InputError(
                f"{path}: holds a pickled Python object (likely a whole nn.Module saved with "
                "torch.save(model)). Loading it runs arbitrary code from the file, so onnxpipe "
                "refuses by default. If you trust the file, pass --unsafe-load; better, save "
                "it as TorchScript (.pt) or torch.export (.pt2)."
            ) from e
        obj = _unsafe_load(path)
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError, IndexError) as e:
        raise InputError(
            f"{path}: not a PyTorch model file ({type(e).__name__}: {str(e)[:160]}). Pass a "
            "TorchScript .pt, a torch.export .pt2 or path/file.py:callable."
        ) from e
    if isinstance(obj, dict) and all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(
            f"{path}: holds only a state_dict ({len(obj)} tensors). {_STATE_DICT_HINT}"
        )
    return _checked_module(obj, str(path))


def _looks_saved(path: Path) -> bool:
    """torch.save writes a zip archive (a pickle inside); older files are a bare pickle (0x80)."""
    with path.open("rb") as f:
        head = f.read(1)
    return zipfile.is_zipfile(path) or head == b"\x80"


def _unsafe_load(path: Path) -> Any:
    """A full-pickle ``torch.load``; the classes are looked up as ``python -m`` would.

    The working directory and the file's folder are importable while it unpickles, as for a
    ``module:callable`` source (the model's ``model.py`` usually sits there).
    """
    logger.warning("%s: full-pickle torch.load (--unsafe-load)", path)
    try:
        with importable_from(Path.cwd(), path.resolve().parent):
            return torch.load(str(path), map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, AttributeError, ModuleNotFoundError, RuntimeError) as e:
        raise InputError(
            f"{path}: could not be unpickled ({type(e).__name__}: {str(e)[:200]}). The classes "
            "it was saved with must be importable; pass path/file.py:callable instead."
        ) from e
