"""Decide the input specs of a TensorFlow source and trace it into one concrete function.

The specs come from ``--input`` when given, else from the model; unknown dims become symbols
(``batch`` on axis 0). With ``--nchw`` the ONNX side sees NCHW images while TensorFlow is
traced, and run as the reference, in its own NHWC layout.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from onnxpipe.converters.base import (
    DTYPES,
    Dim,
    InputSpec,
    example_sizes,
    in_declared_order,
    output_names_for,
    random_feeds,
)
from onnxpipe.converters.tensorflow.load import TFSource
from onnxpipe.errors import InputError

logger = logging.getLogger(__name__)

TO_NHWC = (0, 2, 3, 1)
TO_NCHW = (0, 3, 1, 2)
_NON_WORD = re.compile(r"\W")


@dataclass
class Traced:
    """A source traced for conversion.

    Attributes:
        function: the ``ConcreteFunction`` to convert; its first ``len(tf_specs)`` inputs are
            the model inputs, in ``tf_specs`` order.
        tf_specs: the inputs in TensorFlow layout, named with their ONNX names.
        output_names: ONNX output names, in ``function.outputs`` order.
        output_batched: per output, whether axis 0 is the dynamic batch axis.
        run: runs TensorFlow on arrays in ``tf_specs`` order; outputs in the same order.
    """

    function: Any
    tf_specs: list[InputSpec]
    output_names: list[str]
    output_batched: list[bool]
    run: Callable[[list[np.ndarray]], list[np.ndarray]]
    run_traced: Callable[[list[np.ndarray]], list[np.ndarray]] | None = None
    """The traced function, where ``run`` is the eager model: TensorFlow's other way to run it."""


def resolve_specs(
    src: TFSource, user: list[InputSpec], nchw: bool
) -> tuple[list[InputSpec], list[InputSpec]]:
    """Return (ONNX-facing specs, TensorFlow-layout specs) for ``src``.

    With ``nchw``, ``--input`` shapes are read as the ONNX (NCHW) shapes.

    Raises:
        InputError: the input shapes are unknown and no ``--input`` was given, the number of
            ``--input`` specs differs from the model's inputs, a dtype is unsupported, or
            ``--nchw`` is asked for a model with no rank-4 input.
    """
    if user:
        if src.inputs is not None and len(user) != len(src.inputs):
            raise InputError(
                f"{src.where}: the model has {len(src.inputs)} input(s) "
                f"({', '.join(d[0] for d in src.inputs)}) but {len(user)} --input spec(s) were "
                "given. Pass one --input per model input, in the model's order."
            )
        declared = [d[0] for d in src.inputs] if src.inputs is not None else None
        onnx_specs = in_declared_order(user, declared, src.where)
        if src.signature is not None and src.inputs is not None:
            _check_signature_dtypes(src, onnx_specs)
        tf_specs = [_permute(s, TO_NHWC) if nchw else s for s in onnx_specs]
        if nchw:
            _check_nchw_specs(src, onnx_specs, tf_specs)
    else:
        tf_specs = [_declared_spec(src, d) for d in _require_declared(src)]
        onnx_specs = [_permute(s, TO_NCHW) if nchw else s for s in tf_specs]
    if nchw and not any(len(s.shape) == 4 for s in tf_specs):
        raise InputError(
            f"{src.where}: --nchw transposes rank-4 image inputs, but the model has none "
            f"({', '.join(str(s) for s in onnx_specs)}). Drop --nchw."
        )
    return onnx_specs, tf_specs


def _check_nchw_specs(src: TFSource, given: list[InputSpec], moved: list[InputSpec]) -> None:
    """Refuse NHWC ``--input`` shapes given with ``--nchw``, which reads them as NCHW.

    TensorFlow then rejected the transposed shape ([batch, 16, 3, 16]) with a message about
    a shape the user never wrote.
    """
    for spec, tf_spec, (_, _, shape) in zip(given, moved, src.inputs or [], strict=False):
        if shape is None or len(shape) != 4 or len(spec.shape) != 4:
            continue
        if _fits_dims(spec.shape, shape) and not _fits_dims(tf_spec.shape, shape):
            nchw = ",".join(str(d) for d in _permute(spec, TO_NCHW).shape)
            raise InputError(
                f"{src.where}: --input {spec}: with --nchw, --input gives the ONNX model's "
                f"NCHW shape, and this one is the Keras model's NHWC. Give "
                f"{spec.name}:{spec.dtype}[{nchw}], or drop --nchw."
            )


def _fits_dims(dims: tuple[Dim, ...], declared: tuple[int | None, ...]) -> bool:
    return all(
        not isinstance(d, int) or w is None or d == w for d, w in zip(dims, declared, strict=True)
    )


def _check_signature_dtypes(src: TFSource, specs: list[InputSpec]) -> None:
    """Refuse ``--input`` dtypes a SavedModel signature does not take.

    A signature runs on its own dtypes only: given others, tf2onnx failed on the call
    (exit 2 blaming a ``PartitionedCall`` op and the model's layers). A Keras model casts
    its inputs, so there a dtype may be overridden.
    """
    for spec, (name, dtype, _) in zip(specs, src.inputs or [], strict=False):
        if spec.dtype != dtype:
            raise InputError(
                f"{src.where}: --input {spec.name}: signature {src.signature!r} takes "
                f"{name} as {dtype}, not {spec.dtype}. Give {spec.name}:{dtype}[...], or "
                "export a signature with the dtype to convert."
            )


def _require_declared(src: TFSource) -> list[tuple[str, str, tuple[int | None, ...] | None]]:
    if src.inputs is None or any(shape is None for _, _, shape in src.inputs):
        raise InputError(
            f"{src.where}: the model does not declare its input shapes (an unbuilt or subclassed "
            "model, or a tf.function without input_signature). Pass --input for each input, "
            "e.g. --input input:float32[batch,224,224,3]."
        )
    return src.inputs


def _declared_spec(src: TFSource, declared: tuple[str, str, Any]) -> InputSpec:
    name, dtype, shape = declared
    if dtype not in DTYPES:
        raise InputError(
            f"{src.where}: input {name!r} has dtype {dtype}, which onnxpipe cannot feed. "
            f"Supported: {', '.join(DTYPES)}."
            + (
                " Move the string preprocessing (StringLookup, TextVectorization) out of the "
                "model and export from the integer ids."
                if dtype == "string"
                else ""
            )
        )
    stem = _NON_WORD.sub("_", name)
    dims: list[Dim] = [
        d if d is not None else ("batch" if i == 0 else f"{stem}_dim{i}")
        for i, d in enumerate(shape)
    ]
    return InputSpec(name, dtype, tuple(dims))


def _permute(spec: InputSpec, perm: tuple[int, ...]) -> InputSpec:
    if len(spec.shape) != 4:
        return spec
    return InputSpec(spec.name, spec.dtype, tuple(spec.shape[p] for p in perm))


def trace(src: TFSource, tf_specs: list[InputSpec]) -> Traced:
    """Trace ``src`` on ``tf_specs`` (symbols become ``None`` dims) into a ``Traced``.

    Raises:
        InputError: TensorFlow rejects the inputs while tracing (wrong rank, dtype or count).
    """
    import tensorflow as tf

    signature = [
        tf.TensorSpec(
            [None if isinstance(d, str) else d for d in spec.shape],
            tf.as_dtype(spec.dtype),
            name=f"onnxpipe_input_{i}",
        )
        for i, spec in enumerate(tf_specs)
    ]
    seen: dict[str, list[str] | None] = {}

    def flat_call(*tensors: Any) -> list[Any]:
        out = src.call(*tensors)
        if isinstance(out, dict):
            seen["keys"] = [str(k) for k in sorted(out)]
            return [out[k] for k in sorted(out)]
        seen["keys"] = None
        return list(tf.nest.flatten(out))

    function = tf.function(flat_call, input_signature=signature, autograph=False)
    try:
        concrete = function.get_concrete_function()
    except (ValueError, TypeError, tf.errors.OpError) as e:
        free = [s for s in tf_specs if any(isinstance(d, str) for d in s.shape[1:])]
        unknown = (
            "; or the model cannot be traced with those dims unknown (bilinear UpSampling2D "
            "cannot): fix them with --input, e.g. "
            f"--input {free[0].name}:{free[0].dtype}[{','.join(_fixed(free[0].shape))}]"
            if free
            else ""
        )
        raise InputError(
            f"{src.where}: TensorFlow rejected the inputs "
            f"{', '.join(str(s) for s in tf_specs)} while tracing ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:240]}). Check --input: count, dtype, rank and layout"
            f"{unknown}."
        ) from e
    count = len(concrete.outputs)
    keys = seen.get("keys") or src.output_keys
    names = output_names_for(count, keys, [s.name for s in tf_specs])
    all_batched = all(s.shape and s.shape[0] == "batch" for s in tf_specs)
    batched = [bool(all_batched and t.shape.rank and t.shape[0] is None) for t in concrete.outputs]
    dtypes = [tf.as_dtype(s.dtype) for s in tf_specs]

    def run(arrays: list[np.ndarray], traced: bool = False) -> list[np.ndarray]:
        tensors = [tf.convert_to_tensor(a, dtype=d) for a, d in zip(arrays, dtypes, strict=True)]
        # A Keras model runs eagerly, as the user runs it: its trace with unknown dims can
        # compute something else (Keras 3's TimeDistributed maps over the batch axis then),
        # and a reference that is the converted trace itself would never show it.
        outputs = flat_call(*tensors) if src.eager and not traced else function(*tensors)
        return [np.asarray(o) for o in outputs]

    def run_traced(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return run(arrays, traced=True)

    logger.debug("%s: traced %d input(s), outputs %s", src.where, len(tf_specs), names)
    return Traced(concrete, tf_specs, names, batched, run, run_traced if src.eager else None)


def _fixed(shape: tuple[Dim, ...]) -> list[str]:
    """``shape`` as an example spec: batch stays, other symbols become a typical size."""
    return [str(d) if isinstance(d, int) or i == 0 else "224" for i, d in enumerate(shape)]


def share_unknown_dims(
    traced: Traced, onnx_specs: list[InputSpec]
) -> tuple[list[InputSpec], list[InputSpec], str | None]:
    """One symbol for the unknown dims the model's inputs must share; (onnx, tf specs, note).

    Each declared ``None`` dim gets its own symbol (``input_ids_dim1``, ``mask_dim1``), so
    parity would feed those inputs different lengths. When the model fails on that, but runs
    once the symbols on the same axis are one (``seq``), the inputs share that length and the
    specs say so; otherwise they are left as they are.
    """
    tf_specs = traced.tf_specs
    groups: dict[int, list[str]] = {}
    for spec in tf_specs:
        for axis, dim in enumerate(spec.shape):
            if axis and isinstance(dim, str) and dim not in groups.setdefault(axis, []):
                groups[axis].append(dim)
    shared = {axis: symbols for axis, symbols in groups.items() if len(symbols) > 1}
    if not shared or _runs(traced, tf_specs):
        return onnx_specs, tf_specs, None
    taken = {d for s in tf_specs for d in s.symbols}
    rename: dict[str, str] = {}
    for axis, symbols in shared.items():
        name = "seq" if axis == 1 and "seq" not in taken else f"dim{axis}"
        while name in taken:
            name += "_"
        taken.add(name)
        rename |= dict.fromkeys(symbols, name)

    def renamed(specs: list[InputSpec]) -> list[InputSpec]:
        return [replace(s, shape=tuple(rename.get(str(d), d) for d in s.shape)) for s in specs]

    if not _runs(traced, renamed(tf_specs)):
        return onnx_specs, tf_specs, None
    note = "; ".join(
        f"{', '.join(symbols)} are one dim, {rename[symbols[0]]!r} (the model fails when they "
        "differ)"
        for symbols in shared.values()
    )
    logger.info("%s", note)
    return renamed(onnx_specs), renamed(tf_specs), note


def _runs(traced: Traced, specs: list[InputSpec]) -> bool:
    """Whether TensorFlow runs ``specs`` at distinct symbol sizes (ids of 1 fit any table)."""
    probe = [replace(s, high=2) if s.integer else s for s in specs]
    feeds = random_feeds(probe, example_sizes(probe))
    try:
        traced.run([feeds[s.name] for s in probe])
    except Exception:  # noqa: BLE001 - the user's model, in its framework, may raise anything
        return False
    return True
