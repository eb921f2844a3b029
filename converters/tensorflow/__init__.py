"""TensorFlow / Keras -> ONNX through tf2onnx, with TensorFlow itself as the parity reference.

Sources: ``.keras``, legacy ``.h5``, a SavedModel directory (``model.export()`` output too),
``pkg.module:callable`` / ``path/file.py:callable`` returning a ``keras.Model``, or, from
Python, a ``keras.Model`` or a ``tf.function`` with an input signature. TensorFlow is
imported only when ``convert`` runs.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpipe.converters.base import ConversionResult, ConvertConfig, Feeds, InputSpec
from onnxpipe.converters.source import Loaded, describe
from onnxpipe.converters.tensorflow.export import MAX_OPSET, convert_traced
from onnxpipe.converters.tensorflow.load import load_tf_source
from onnxpipe.converters.tensorflow.trace import resolve_specs, share_unknown_dims, trace
from onnxpipe.errors import InputError

logger = logging.getLogger(__name__)

__all__ = ["MAX_OPSET", "convert"]


def convert(source: str | object, config: ConvertConfig) -> ConversionResult:
    """Convert a TensorFlow/Keras ``source`` to ONNX with tf2onnx.

    Input names, dtypes and shapes come from ``config.inputs`` when given, else from the
    model (Keras input names are kept; axis 0 becomes the dynamic ``batch`` axis, other
    unknown dims get their own symbols). With ``config.nchw`` rank-4 inputs are NCHW on the
    ONNX side and the returned specs and reference take NCHW feeds.

    Raises:
        InputError: the source cannot be loaded (not a model, needs ``--unsafe-load``, no
            serving signature), its input shapes are unknown and no ``--input`` was given,
            or ``config.opset`` is above what tf2onnx supports.
        ConversionError: tf2onnx failed or met TensorFlow ops it cannot convert.
    """
    where = (
        describe(source) if isinstance(source, str | Loaded) else "the object passed to convert()"
    )
    opset = _opset(config.opset, str(where))
    user_specs = config.input_specs()
    started = time.perf_counter()
    src = load_tf_source(source, config.unsafe_load, config.signature)
    onnx_specs, tf_specs = resolve_specs(src, user_specs, config.nchw)
    traced = trace(src, tf_specs)
    shared = None
    if not user_specs:
        onnx_specs, tf_specs, shared = share_unknown_dims(traced, onnx_specs)
    nchw = [config.nchw and len(s.shape) == 4 for s in tf_specs]
    proto = convert_traced(traced, [s.name for s in onnx_specs], nchw, opset, src.where)
    model = ir.serde.deserialize_model(proto)
    _set_io_shapes(model, onnx_specs, traced.output_batched)
    import tensorflow as tf
    import tf2onnx

    logger.info(
        "%s: converted with tf2onnx %s (opset %d) in %.1fs",
        src.where,
        tf2onnx.__version__,
        opset,
        time.perf_counter() - started,
    )
    notes = [f"tf2onnx {tf2onnx.__version__}, opset {opset}"]
    if src.signature is not None:
        notes.append(f"SavedModel signature {src.signature!r}")
    if config.nchw:
        notes.append("rank-4 inputs transposed to NCHW (--nchw)")
    if shared:
        notes.append(shared)
    return ConversionResult(
        model=model,
        framework="tf",
        exporter="tf2onnx",
        inputs=onnx_specs,
        reference=_reference(traced.run, onnx_specs, nchw, keep=src.keep),
        reference_name=f"tensorflow {tf.__version__}",
        notes=notes,
        alternate=(
            _reference(traced.run_traced, onnx_specs, nchw, keep=src.keep)
            if traced.run_traced is not None
            else None
        ),
    )


def _opset(requested: int | None, where: str) -> int:
    if requested is None:
        return MAX_OPSET
    if requested > MAX_OPSET:
        raise InputError(
            f"{where}: --opset {requested} is above {MAX_OPSET}, the newest opset tf2onnx "
            f"supports. Pass --opset {MAX_OPSET} or lower (or leave it out)."
        )
    return requested


def _set_io_shapes(model: ir.Model, specs: list[InputSpec], batched: list[bool]) -> None:
    """Name dynamic dims by the specs' symbols; a dynamic axis 0 of an output is ``batch``."""
    by_name = {s.name: s for s in specs}
    for value in model.graph.inputs:
        spec = by_name.get(value.name or "")
        if spec is not None:
            value.shape = ir.Shape(list(spec.shape))
    for value, is_batched in zip(model.graph.outputs, batched, strict=False):
        if is_batched and value.shape is not None and len(value.shape) > 0:
            dims: list[Any] = list(value.shape)
            if not isinstance(dims[0], int):
                dims[0] = "batch"
                value.shape = ir.Shape(dims)


def _reference(run: Any, specs: list[InputSpec], nchw: list[bool], keep: list[Any]) -> Any:
    """TensorFlow on ONNX-layout feeds: NCHW feeds are transposed back to NHWC first."""

    def reference(feeds: Feeds) -> list[np.ndarray]:
        _ = keep  # holds the loaded model alive for as long as the reference is
        missing = [s.name for s in specs if s.name not in feeds]
        if missing:
            raise InputError(f"reference: feeds lack input(s) {', '.join(missing)}.")
        arrays = []
        for spec, flag in zip(specs, nchw, strict=True):
            array = np.asarray(feeds[spec.name], dtype=spec.dtype)
            arrays.append(np.transpose(array, (0, 2, 3, 1)) if flag else array)
        return run(arrays)

    return reference
