"""ONNX passthrough: read a ``model.onnx`` (external data allowed) into the same path.

The reference is ONNX Runtime on the user's original file, so parity proves that what the
bundle holds (re-saved, external data re-homed) computes what the input computed.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnxruntime as ort
from google.protobuf.message import DecodeError

from onnxpipe.converters.base import (
    DTYPES,
    ConversionResult,
    ConvertConfig,
    ExportAttempt,
    Feeds,
    InputSpec,
    unnamed_dim,
)
from onnxpipe.errors import InputError
from onnxpipe.runtime import ORT_ERRORS, ort_options

logger = logging.getLogger(__name__)


def load_onnx(path: Path) -> ir.Model:
    """Load an ONNX file with its external data into memory.

    Raises:
        InputError: the file is not an ONNX model, has no graph, or its external data is missing.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such file.")
    try:
        model = ir.load(path)
    except (DecodeError, ValueError, RuntimeError) as e:
        raise InputError(
            f"{path}: not a readable ONNX model ({type(e).__name__}: {str(e)[:160]}). Check that "
            "the file is a complete .onnx export (not truncated, not another format)."
        ) from e
    try:
        return ir.external_data.load_to_model(model)
    except (ValueError, RuntimeError) as e:
        # the .onnx read fine: its message blamed it ("complete .onnx export") for a short
        # or misplaced external data file
        files = sorted(
            {
                str(v.const_value.location)
                for v in model.graph.initializers.values()
                if isinstance(v.const_value, ir.ExternalTensor)
            }
        )
        raise InputError(
            f"{path}: its external data ({', '.join(files) or 'beside it'}) cannot be read "
            f"({type(e).__name__}: {str(e)[:200]}). Copy the data file(s) again, complete and "
            f"next to {path.name}, as the exporter wrote them."
        ) from e
    except FileNotFoundError as e:
        raise InputError(
            f"{path}: its external data file is missing ({e.filename}). Keep "
            f"{Path(e.filename or path.name + '.data').name} next to {path.name}, where the "
            "model refers to it, as the exporter wrote them."
        ) from e


def signature(
    model: ir.Model, path: Path | str = "model", overrides: Mapping[str, InputSpec] | None = None
) -> list[InputSpec]:
    """Input specs of an ONNX graph; unnamed dynamic dims get a symbol ``<input>_d<axis>``.

    ``overrides`` (``--input`` specs by name) replace an input's spec where they fit it.

    Initializers listed as graph inputs (IR < 4 models) are not inputs a user feeds.

    Raises:
        InputError: an input or output that is not a numeric or bool tensor (a sequence, map
            or optional; strings), which onnxpipe cannot feed or compare.
    """
    for kind, values in (("input", model.graph.inputs), ("output", model.graph.outputs)):
        for value in values:
            if value.type is not None and not isinstance(value.type, ir.TensorType):
                raise InputError(
                    f"{path}: {kind} {value.name!r} is a {value.type}, not a tensor; onnxpipe "
                    "handles models whose inputs and outputs are tensors. Wrap the model so "
                    "the sequence is built (or split) inside it, then convert that."
                )
    specs = []
    # a symbol --input names or fixes on one input does so on every input sharing it
    # (x and y both [batch, 8] with --input x:float32[2,8] got y at another batch: exit 2)
    renamed = _renamed_symbols(model, overrides or {}, path)
    for value in model.graph.inputs:
        if value.const_value is not None or value.name in model.graph.initializers:
            continue
        if overrides and value.name in overrides:
            specs.append(_bound(Path(path), value, overrides[value.name or ""]))
            continue
        if value.dtype is None:
            raise InputError(
                f"{path}: input {value.name!r} has no element type; pass --input for it."
            )
        dtype = np.dtype(value.dtype.numpy()).name
        if dtype not in DTYPES:
            raise InputError(
                f"{path}: input {value.name!r} has dtype {value.dtype.name.lower()}, which "
                f"onnxpipe cannot feed (it feeds {', '.join(DTYPES)}). Keep string processing "
                "(a tokenizer) outside the model and feed its numeric result."
            )
        dims: list[int | str] = []
        for axis, dim in enumerate(value.shape or ()):
            if isinstance(dim, int) and dim > 0:
                dims.append(dim)
            elif isinstance(dim, ir.SymbolicDim) and dim.value in renamed:
                dims.append(renamed[dim.value])
            elif isinstance(dim, ir.SymbolicDim) and dim.value and dim.value.isidentifier():
                dims.append(dim.value)
            else:
                dims.append(unnamed_dim(value.name, axis))
        specs.append(InputSpec(value.name or "", dtype, tuple(dims)))
    return specs


def _renamed_symbols(
    model: ir.Model, overrides: Mapping[str, InputSpec], path: Path | str
) -> dict[str, int | str]:
    """The file's symbols that ``--input`` specs fix or rename, with what they became.

    Raises:
        InputError: two specs give one symbol of the file two sizes or names (``a[n,4]`` and
            ``b[n,4]`` fixed to 2 and 3: ORT refused the model as "no exporter could convert").
    """
    renamed: dict[str, int | str] = {}
    by: dict[str, str] = {}
    for value in model.graph.inputs:
        given = overrides.get(value.name or "")
        if given is None or value.shape is None or len(value.shape) != len(given.shape):
            continue
        for dim, new in zip(value.shape, given.shape, strict=True):
            if not isinstance(dim, ir.SymbolicDim) or not dim.value:
                continue
            if renamed.setdefault(dim.value, new) != new:
                raise InputError(
                    f"{path}: --input {by[dim.value]} makes the model's dim {dim.value!r} "
                    f"{renamed[dim.value]}, --input {given.name} makes it {new}; the inputs "
                    f"share that dim, so give it the same size or name in both."
                )
            by.setdefault(dim.value, given.name)
    return renamed


def _bound(path: Path, value: ir.Value, given: InputSpec) -> InputSpec:
    """``given`` (an ``--input`` spec) for the model's input ``value``, or InputError.

    The spec's dtype and dims must not contradict what the model declares: a fixed size
    stays that size (a symbol there too: the graph's ops were built for it), a free one may
    be fixed or named.
    """
    declared = np.dtype(value.dtype.numpy()).name if value.dtype is not None else None
    if declared is not None and declared != given.dtype:
        raise InputError(
            f"{path}: --input {given.name}: the model's input is {declared}, not {given.dtype}. "
            f"Give {given.name}:{declared}[...]."
        )
    dims = list(value.shape or ()) if value.shape is not None else None
    if dims is not None and (
        len(dims) != len(given.shape)
        or any(isinstance(d, int) and d != g for d, g in zip(dims, given.shape, strict=False))
    ):
        shown = [d if isinstance(d, int) else (str(d.value) if d.value else "?") for d in dims]
        raise InputError(
            f"{path}: --input {given.name}: shape {list(given.shape)} contradicts the model's "
            f"{shown}. Keep its fixed sizes; a free dim may be fixed or named."
        )
    return given


def bind_inputs(model: ir.Model, specs: list[InputSpec], given: Collection[str] = ()) -> None:
    """The model's inputs declared as ``specs`` say: every dim named or sized, dtypes set.

    The manifest's signature is the specs': a free dim the file left unnamed (``[None, 4]``)
    was ``null`` in it, and an ``--input`` that named or fixed dims changed only the samples.
    """
    by_name = {s.name: s for s in specs}
    changed = False
    for value in model.graph.inputs:
        spec = by_name.get(value.name or "")
        if spec is None:
            continue
        value.dtype = ir.DataType.from_numpy(np.dtype(spec.dtype))
        if value.shape is not None or spec.name in given:  # an unknown rank stays unknown
            before = list(value.shape or ())
            value.shape = ir.Shape(list(spec.shape))
            changed |= before != list(value.shape)
    if changed:
        _reinfer_shapes(model)


def _reinfer_shapes(model: ir.Model) -> None:
    """Output and inner shapes inferred again from the inputs ``--input`` fixed or named.

    Left as the file declared them they contradicted the inputs (``[batch, 3, h, None]``
    for an output of an input fixed to ``[batch, 3, 16, 16]``). Where ONNX cannot infer a
    shape (custom ops) the declared one stays.
    """
    declared = {v: v.shape for v in model.graph.outputs}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for out in node.outputs:
            out.shape = None
    from onnx_ir.passes.common import ShapeInferencePass  # noqa: PLC0415

    try:
        inferred = ShapeInferencePass(strict_mode=False)(model).model
    except Exception as e:  # noqa: BLE001 - best effort: parity checks the model either way
        logger.info("shape inference after --input failed: %s", e)
        inferred = model
    if inferred is not model:  # the pass may build a new model: take its shapes by name
        shapes = {
            out.name: out.shape
            for node in ir.traversal.RecursiveGraphIterator(inferred.graph)
            for out in node.outputs
        }
        for node in ir.traversal.RecursiveGraphIterator(model.graph):
            for out in node.outputs:
                out.shape = shapes.get(out.name)
    symbols = {
        d.value for v in model.graph.inputs for d in v.shape or () if isinstance(d, ir.SymbolicDim)
    }
    for value, shape in declared.items():
        if value.shape is None and shape is not None:  # not inferred (a custom op's output)
            # its sizes stay; a symbol no input has any more is left unnamed (the manifest
            # names it <output>_d<axis>), not kept as the file's stale one
            value.shape = ir.Shape(
                [d if isinstance(d, int) or d.value in symbols else None for d in shape]
            )


def attempts(source: str | object, config: ConvertConfig) -> Iterator[ExportAttempt]:
    """Yield the one passthrough attempt for an ONNX file (``--input`` overrides shapes)."""
    if not isinstance(source, str):
        raise InputError("an ONNX source must be a path to a .onnx file")
    path = Path(source)
    model = load_onnx(path)
    notes = _check(path, model)
    overrides = {s.name: s for s in config.input_specs()}
    specs = signature(model, path, overrides)
    unknown = set(overrides) - {s.name for s in specs}
    if unknown:
        raise InputError(
            f"{path}: --input names {sorted(unknown)} are not inputs of the model; its inputs "
            f"are {[s.name for s in specs]}."
        )
    bind_inputs(model, specs, overrides)
    session = _reference_session(path, model)
    if config.opset is not None and model.opset_imports.get("") != config.opset:
        notes.append(f"opset {model.opset_imports.get('')} converted to {config.opset} (--opset)")
        model = _to_opset(path, model, config.opset)

    def reference(feeds: Feeds) -> list[np.ndarray]:
        return list(session.run(None, dict(feeds)))

    yield ExportAttempt(
        exporter="none",
        result=ConversionResult(
            model=model,
            framework="onnx",
            exporter="none",
            inputs=specs,
            reference=reference,
            reference_name=f"onnxruntime {ort.__version__} on {path.name}",
            notes=notes,
        ),
    )


def _to_opset(path: Path, model: ir.Model, opset: int) -> ir.Model:
    """``model`` at ``opset`` by ONNX's version converter; parity then checks the result.

    Raises:
        InputError: the converter cannot take the model to that opset.
    """
    proto = ir.serde.serialize_model(model)
    try:
        converted = onnx.version_converter.convert_version(proto, opset)
    except Exception as e:  # the converter raises RuntimeError, ValueError or its own errors
        raise InputError(
            f"{path}: ONNX's version converter cannot take this model from opset "
            f"{model.opset_imports.get('')} to --opset {opset} ({str(e).splitlines()[0][:200]}). "
            "Leave --opset out to keep the file's own opset."
        ) from e
    return ir.serde.deserialize_model(converted)


def _reference_session(path: Path, model: ir.Model) -> ort.InferenceSession:
    """An ORT CPU session on the user's file, or on ``model`` (loaded) if ORT cannot load it.

    ORT cannot load a file whose shape-defining constants (a Slice's starts) sit in external
    data (``onnx.save(..., size_threshold=0)``), though the same model in memory runs.

    Raises:
        InputError: ORT cannot load the model either way.
    """
    providers = ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), ort_options(), providers=providers)
    except ORT_ERRORS as e:
        first = e
    proto = ir.serde.serialize_model(model)
    if proto.ByteSize() < 2**31 - 1:
        try:
            session = ort.InferenceSession(
                proto.SerializeToString(), ort_options(), providers=providers
            )
        except ORT_ERRORS:
            pass
        else:
            logger.info("%s: ORT loads it only with its external data in memory", path)
            return session
    raise InputError(
        f"{path}: ONNX Runtime cannot load the model: {str(first).splitlines()[0][:300]}"
    ) from first


def _check(path: Path, model: ir.Model) -> list[str]:
    """Run the ONNX checker; sort a graph whose only fault is node order (in place).

    Graph editors often append nodes out of order; ORT runs such graphs, the checker (and so
    ``validate``) does not, and sorting loses nothing. Returns what was repaired.

    Raises:
        InputError: the model fails the checker for any other reason.
    """
    try:
        onnx.checker.check_model(str(path))
        return []
    except onnx.checker.ValidationError as e:
        error = e
    if "topologically sorted" in str(error):
        model.graph.sort()
        try:
            onnx.checker.check_model(ir.serde.serialize_model(model))
            sorted_ok = True
        except onnx.checker.ValidationError as e:
            error, sorted_ok = e, False
        except ValueError:  # over 2 GB as one protobuf: sorting only reordered the nodes
            sorted_ok = True
        if sorted_ok:
            logger.warning("%s: nodes were out of topological order; sorted them", path)
            return ["nodes sorted into topological order"]
    raise InputError(
        f"{path}: fails the ONNX checker ({str(error).splitlines()[0][:200]}). Re-export the "
        "model; onnxpipe will not pass on an invalid graph."
    ) from error
