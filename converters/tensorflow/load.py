"""Load a TensorFlow/Keras SOURCE safely into one callable form, ``TFSource``.

Sources: a ``.keras`` archive, a legacy ``.h5`` model, a SavedModel directory (including Keras 3
``model.export()`` output), ``pkg.module:callable`` / ``path/file.py:callable`` returning a
``keras.Model``, or an in-memory ``keras.Model`` or ``tf.function``. Keras archives load with
``safe_mode=True`` (no Python lambdas deserialised) unless the user passes ``--unsafe-load``.
Files are only read, never written.
"""

from __future__ import annotations

import json
import logging
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxpipe.converters.source import (
    Loaded,
    call_factory,
    is_callable_ref,
    quiet_imports,
    stderr_kept_back,
)
from onnxpipe.errors import InputError

logger = logging.getLogger(__name__)

# (name, numpy dtype name, shape with None for unknown dims); shape None: rank unknown.
Declared = tuple[str, str, tuple[int | None, ...] | None]
_AUTO_NAME = re.compile(r"^(keras_tensor|input_layer)(_\d+)?$")
_UNSAFE_HINT = (
    "Loading it would deserialise Python code (a Lambda layer), which can run arbitrary code, "
    "so onnxpipe refuses by default. If you trust the file, pass --unsafe-load; better, replace "
    "the Lambda with a registered custom layer or pass path/file.py:callable that builds the model."
)


@dataclass
class TFSource:
    """A TensorFlow model reduced to what the converter needs.

    Attributes:
        where: the file or description named in error messages.
        call: takes one tensor per input, positionally, and returns the model's outputs
            (a tensor, a list or a dict of tensors).
        inputs: the declared inputs, or None when the model does not say (unbuilt subclassed
            model, ``tf.function`` without an input signature).
        output_keys: the model's own output names, if it has them.
        keep: objects that must stay alive while ``call`` is used (a loaded SavedModel).
        eager: ``call`` runs the model the way the user does (a Keras model, eagerly), which
            can differ from its trace: the parity reference is then ``call``, not the trace.
        signature: the SavedModel signature converted, for the record.
    """

    where: str
    call: Callable[..., Any]
    inputs: list[Declared] | None
    output_keys: list[str] | None = None
    keep: list[Any] = field(default_factory=list)
    eager: bool = False
    signature: str | None = None


def import_tf() -> tuple[Any, Any]:
    """Import tensorflow and keras (Keras 3 on the TensorFlow backend), quietly.

    TensorFlow logs from C++ while it loads, before its log level applies ("All log messages
    before absl::InitializeLog() is called are written to STDERR", oneDNN and CUDA notices):
    when the ``tensorflow`` logger is set to ERROR or above (the CLI does, without
    ``--debug``), file descriptor 2 goes to a scratch file for the import and comes back
    with the text only if the import fails.

    Raises:
        InputError: keras runs on another backend (KERAS_BACKEND), or tensorflow is missing.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    try:
        with stderr_kept_back(quiet_imports()):
            import keras
            import tensorflow as tf
    except ImportError as e:
        raise InputError(
            f"TensorFlow sources need tensorflow and keras ({e}). Install onnxpipe[tf]."
        ) from e
    if keras.backend.backend() != "tensorflow":
        raise InputError(
            f"keras runs on the {keras.backend.backend()!r} backend; converting Keras models "
            "needs the TensorFlow backend. Set KERAS_BACKEND=tensorflow and run again."
        )
    return tf, keras


def load_tf_source(
    source: str | object, unsafe_load: bool = False, signature: str | None = None
) -> TFSource:
    """Load ``source`` into a ``TFSource``; ``signature`` picks a SavedModel's signature.

    Raises:
        InputError: the path does not exist or is not a Keras/TensorFlow model, a Keras file
            needs ``--unsafe-load``, a SavedModel has no serving signature (or not the
            ``signature`` asked, or one was asked of something else), or a callable
            returned something other than a ``keras.Model`` / ``tf.function``.
    """
    tf, keras = import_tf()
    path = Path(source) if isinstance(source, str) and not is_callable_ref(source) else None
    if signature is not None and (path is None or not path.is_dir()):
        where = source.name if isinstance(source, Loaded) else source
        raise InputError(
            f"{where if isinstance(where, str) else 'the object passed to convert()'}: "
            f"--signature {signature} applies to a SavedModel directory only. Drop it, or "
            "pass the SavedModel directory."
        )
    if isinstance(source, Loaded):  # built from a SOURCE string: messages name that string
        return _from_object(source.obj, source.name, tf, keras)
    if not isinstance(source, str):
        return _from_object(source, "the object passed to convert()", tf, keras)
    if is_callable_ref(source):
        return _from_object(call_factory(source), source, tf, keras)
    path = Path(source)
    if path.is_dir():
        return _load_saved_model(path, tf, signature)
    if not path.is_file():
        raise InputError(
            f"{source}: no such file or directory. Pass a .keras or .h5 file, a SavedModel "
            "directory, or pkg.module:callable / path/file.py:callable returning a keras.Model."
        )
    suffix = path.suffix.lower()
    if suffix == ".keras":
        if not zipfile.is_zipfile(path):
            raise InputError(
                f"{path}: is not a Keras archive (a .keras file is a zip written by "
                "model.save('model.keras')). Save the model again, or pass the right file."
            )
        return from_keras_model(_load_keras(path, unsafe_load, keras), str(path))
    if suffix in (".h5", ".hdf5"):
        _check_h5(path)
        return from_keras_model(_load_keras(path, unsafe_load, keras), str(path))
    raise InputError(
        f"{path}: unknown TensorFlow model type {suffix or '(none)'}. Pass a .keras or .h5 "
        "file, or a SavedModel directory (model.export(dir) or tf.saved_model.save)."
    )


def _load_keras(path: Path, unsafe_load: bool, keras: Any) -> Any:
    if unsafe_load:
        logger.warning("%s: loading with safe_mode=False (--unsafe-load)", path)
    try:
        return keras.saving.load_model(str(path), compile=False, safe_mode=not unsafe_load)
    except ValueError as e:
        if "safe_mode" in str(e) or "Lambda" in str(e):
            raise InputError(
                f"{path}: holds a Lambda layer with Python code. {_UNSAFE_HINT}"
            ) from e
        raise InputError(_unreadable(path, e)) from e
    except (TypeError, KeyError, OSError, zipfile.BadZipFile, json.JSONDecodeError) as e:
        raise InputError(_unreadable(path, e)) from e


def _unreadable(path: Path, e: Exception) -> str:
    return (
        f"{path}: Keras could not load it ({type(e).__name__}: {str(e)[:240]}). If the model "
        "uses custom layers, pass path/file.py:callable that imports them and returns the "
        "model; otherwise save it again with model.save('model.keras')."
    )


def _check_h5(path: Path) -> None:
    try:
        import h5py
    except ImportError as e:
        raise InputError(f"{path}: reading .h5 models needs h5py; pip install h5py.") from e
    try:
        with h5py.File(path, "r") as f:
            has_config = "model_config" in f.attrs
    except OSError as e:
        raise InputError(
            f"{path}: is not an HDF5 file ({str(e)[:160]}). Pass a Keras .h5 model saved with "
            "model.save('model.h5'), or a .keras file."
        ) from e
    if not has_config:
        raise InputError(
            f"{path}: holds weights but no model architecture (saved with save_weights). Pass "
            "path/file.py:callable that builds the model and calls load_weights on this file."
        )


def _load_saved_model(path: Path, tf: Any, asked: str | None = None) -> TFSource:
    if not ((path / "saved_model.pb").exists() or (path / "saved_model.pbtxt").exists()):
        raise InputError(
            f"{path}: is a directory but not a SavedModel (no saved_model.pb inside). Pass the "
            "SavedModel directory itself, or a .keras / .h5 file."
        )
    try:
        loaded = tf.saved_model.load(str(path))
    except (tf.errors.OpError, OSError, ValueError) as e:
        raise InputError(
            f"{path}: TensorFlow could not load this SavedModel ({type(e).__name__}: "
            f"{str(e)[:240]})."
        ) from e
    signatures = dict(getattr(loaded, "signatures", {}) or {})
    found = ", ".join(sorted(signatures)) or "none"
    if asked is not None:
        if asked not in signatures:
            raise InputError(
                f"{path}: SavedModel has no signature {asked!r} (signatures found: {found}). "
                "Pass one of those to --signature."
            )
        name = asked
    elif "serving_default" in signatures:
        name = "serving_default"
    elif len(signatures) == 1:
        name = next(iter(signatures))
    elif signatures:
        raise InputError(
            f"{path}: SavedModel has several signatures and none is serving_default "
            f"(signatures found: {found}). Pick one with --signature NAME."
        )
    else:
        raise InputError(
            f"{path}: SavedModel has no serving signature (signatures found: none). "
            "Export it with a serving_default signature: keras_model.export(dir), or "
            "tf.saved_model.save(obj, dir, signatures=obj.__call__.get_concrete_function(spec))."
        )
    signature = signatures[name]
    _, kwargs_spec = signature.structured_input_signature
    keys = sorted(kwargs_spec)  # the flattening order of the signature's inputs
    declared = _clean_names(
        [(key, kwargs_spec[key].dtype.name, _dims(kwargs_spec[key].shape)) for key in keys]
    )
    logger.info("%s: using SavedModel signature %r", path, name)

    def call(*tensors: Any) -> Any:
        return signature(**dict(zip(keys, tensors, strict=True)))

    return TFSource(str(path), call, declared, None, keep=[loaded, signature], signature=name)


def _dims(shape: Any) -> tuple[int | None, ...] | None:
    if shape.rank is None:
        return None
    return tuple(shape.as_list())


def _from_object(obj: Any, where: str, tf: Any, keras: Any) -> TFSource:
    if isinstance(obj, keras.Model):
        return from_keras_model(obj, where)
    if hasattr(obj, "get_concrete_function") and callable(obj):
        signature = getattr(obj, "input_signature", None)
        declared = None
        call = obj
        if signature is not None:
            flat = tf.nest.flatten(signature)
            names = _arg_names(obj, len(flat))
            if any(isinstance(arg, dict | list | tuple) for arg in signature):
                # a dict (or nested) argument: inputs are its leaves, named by their keys
                paths = _leaf_paths(signature)
                names = [path.split("/")[-1] for path in paths]
                if len(set(names)) != len(names):
                    names = [path.replace("/", "_") for path in paths]

                def call(*tensors: Any) -> Any:
                    return obj(*tf.nest.pack_sequence_as(signature, list(tensors)))

            declared = [
                (spec.name or names[i], spec.dtype.name, _dims(spec.shape))
                for i, spec in enumerate(flat)
            ]
        return TFSource(where, call, declared)
    raise InputError(
        f"{where}: returned {type(obj).__module__}.{type(obj).__qualname__}, expected a "
        "keras.Model or a tf.function with an input_signature (or an nn.Module for PyTorch)."
    )


def _leaf_paths(structure: Any, prefix: str = "") -> list[str]:
    """``a/b`` paths of a nested structure's leaves, in ``tf.nest.flatten`` order."""
    if isinstance(structure, dict):
        items: list[tuple[str, Any]] = [(str(k), structure[k]) for k in sorted(structure)]
    elif isinstance(structure, list | tuple):
        items = [(str(i), v) for i, v in enumerate(structure)]
    else:
        return [prefix]
    return [p for key, v in items for p in _leaf_paths(v, f"{prefix}/{key}" if prefix else key)]


def _arg_names(fn: Any, count: int) -> list[str]:
    import inspect

    try:
        params = list(inspect.signature(fn.python_function).parameters)
    except (AttributeError, TypeError, ValueError):
        params = []
    params = [p for p in params if p != "self"]
    return params[:count] if len(params) >= count else [f"input_{i}" for i in range(count)]


def from_keras_model(model: Any, where: str) -> TFSource:
    """Wrap a ``keras.Model``; input names, dtypes and shapes come from its inputs when built."""
    import tensorflow as tf

    try:
        flat_inputs = list(model.inputs or [])
    except (AttributeError, ValueError):
        flat_inputs = []  # unbuilt or subclassed: the user must give --input
    structure: Any = None
    if flat_inputs:
        try:
            structure = model.input  # keeps a functional model's dict/list nesting
        except (AttributeError, ValueError):
            structure = flat_inputs  # Sequential: never called, but its inputs are known
    declared: list[Declared] | None = None
    if structure is not None:
        if isinstance(structure, dict):
            keys = sorted(structure)
            flat = [structure[k] for k in keys]
        else:
            flat = tf.nest.flatten(structure)
            keys = [t.name for t in flat]
        declared = [(key, str(t.dtype), tuple(t.shape)) for key, t in zip(keys, flat, strict=True)]
        declared = _clean_names(declared)

    def call(*tensors: Any) -> Any:
        args: Any
        if isinstance(structure, dict) or (structure is not None and len(tensors) > 1):
            args = tf.nest.pack_sequence_as(structure, list(tensors))
        elif len(tensors) == 1:
            args = tensors[0]
        else:
            args = list(tensors)
        return model(args, training=False)

    output_keys = getattr(model, "output_names", None)
    outputs = list(output_keys) if output_keys else None
    return TFSource(where, call, declared, outputs, [model], eager=True)


def _clean_names(declared: list[Declared]) -> list[Declared]:
    """Replace Keras's automatic names (``keras_tensor_12``) with ``input`` / ``input_i``."""
    names = [d[0] for d in declared]
    if all(_AUTO_NAME.match(n) for n in names) or len(set(names)) != len(names):
        fresh = ["input"] if len(names) == 1 else [f"input_{i}" for i in range(len(names))]
        return [(new, d[1], d[2]) for new, d in zip(fresh, declared, strict=True)]
    return declared
