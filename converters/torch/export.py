"""The two PyTorch exporters behind one call: dynamo (torch.export) and TorchScript."""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnx_ir as ir
import torch

from onnxpipe.converters.base import InputSpec

logger = logging.getLogger(__name__)

TORCHSCRIPT_DEFAULT_OPSET = 17
_OP_PATTERNS = (
    re.compile(r"OpOverload\(op='([\w.]+)'"),
    re.compile(r"operator '([\w:.]+)'"),
    # Not "While executing %view_4 ... target=torch.ops.aten.view": the node a failure hit.
    re.compile(r"(?<!target=)torch\.ops\.([\w]+\.[\w]+)"),
)


class ExportFailed(Exception):
    """An exporter could not produce a model; carries a one-line reason and the ops it named."""

    def __init__(self, reason: str, ops: list[str]) -> None:
        super().__init__(reason)
        self.ops = ops


def call_args(
    model: Any, specs: Sequence[InputSpec], tensors: dict[str, torch.Tensor]
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Positional args, or keyword args when every spec name is a parameter of ``forward``.

    Keyword passing lets ``--input input_ids:... --input attention_mask:...`` reach a
    transformers model whatever the order of its forward parameters.
    """
    names = [s.name for s in specs]
    if isinstance(
        model, (torch.export.ExportedProgram, torch.fx.GraphModule, torch.jit.ScriptModule)
    ):
        # Graphs from torch.export take their user inputs positionally; so does TorchScript,
        # whose exporter cannot trace a wrapper around a scripted module.
        return tuple(tensors[n] for n in names), {}
    forward = getattr(model, "forward", None)
    try:
        params = inspect.signature(forward).parameters if forward else {}
    except (TypeError, ValueError):
        params = {}
    if params and all(n in params for n in names):
        return (), {n: tensors[n] for n in names}
    return tuple(tensors[n] for n in names), {}


class KeywordAdapter(torch.nn.Module):
    """Calls ``model(**{name: tensor})`` from positional tensors, in ``names`` order."""

    def __init__(self, model: torch.nn.Module, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names
        # The exporter restores the wrapper's mode afterwards, recursively: a wrapper left in
        # training mode would switch the user's model (BatchNorm, Dropout) to training.
        self.train(model.training)

    def forward(self, *tensors: torch.Tensor) -> Any:
        """The wrapped model's outputs for positional ``tensors``."""
        return self.model(**dict(zip(self.names, tensors, strict=True)))


def _dim_objects(specs: Sequence[InputSpec]) -> dict[str, Any]:
    return {sym: torch.export.Dim(sym) for spec in specs for sym in spec.symbols}


def export_dynamo(
    model: Any,
    specs: Sequence[InputSpec],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output_names: list[str],
    opset: int | None,
) -> ir.Model:
    """Export with ``torch.onnx.export(dynamo=True)``; symbols become named dynamic dims."""
    dims = _dim_objects(specs)
    per_input = {
        s.name: ({i: dims[d] for i, d in enumerate(s.shape) if isinstance(d, str)} or None)
        for s in specs
    }
    dynamic_shapes: Any
    if isinstance(model, torch.export.ExportedProgram):
        dynamic_shapes = None
    elif kwargs:
        dynamic_shapes = per_input
    else:
        dynamic_shapes = tuple(per_input[s.name] for s in specs)
    # A failed torch.export dumps the whole FX graph on stderr; the failure is summarized.
    debug = logging.getLogger("onnxpipe").isEnabledFor(logging.DEBUG)
    quiet = contextlib.nullcontext() if debug else contextlib.redirect_stderr(io.StringIO())
    try:
        with quiet:
            program = torch.onnx.export(
                model,
                args,
                kwargs=kwargs or None,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                input_names=[s.name for s in specs],
                output_names=output_names,
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except (
        torch.onnx.errors.OnnxExporterError,
        RuntimeError,
        AssertionError,
        ValueError,
        TypeError,
        NotImplementedError,
    ) as e:  # the exporter's failures come in all of these
        raise ExportFailed(summarize_error(e), unsupported_ops(e)) from e
    if program is None:
        raise ExportFailed("torch.onnx.export returned no program", [])
    if isinstance(model, torch.export.ExportedProgram):
        _rename_symbols(program.model, specs)
    return program.model


def _rename_symbols(model: ir.Model, specs: Sequence[InputSpec]) -> None:
    """Name an exported program's dims (torch's ``s77``) after the specs' symbols, everywhere."""
    names: dict[str, str] = {}
    by_name = {s.name: s for s in specs}
    for value in model.graph.inputs:
        spec = by_name.get(value.name or "")
        for want, got in zip(spec.shape if spec else (), value.shape or (), strict=False):
            if isinstance(want, str) and isinstance(got, ir.SymbolicDim) and got.value:
                names.setdefault(got.value, want)
    if not names:
        return
    values = [*model.graph.inputs, *(o for node in model.graph for o in node.outputs)]
    for value in values:
        if value.shape is not None and any(
            isinstance(d, ir.SymbolicDim) and d.value in names for d in value.shape
        ):
            value.shape = ir.Shape(
                [
                    names[d.value] if isinstance(d, ir.SymbolicDim) and d.value in names else d
                    for d in value.shape
                ]
            )


def export_torchscript(
    model: Any,
    specs: Sequence[InputSpec],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    output_names: list[str],
    opset: int | None,
) -> ir.Model:
    """Export with the TorchScript exporter (``dynamo=False``) through a temporary file.

    Keyword inputs go through :class:`KeywordAdapter`: the TorchScript exporter binds a
    trailing kwargs dict against ``forward``'s full signature and trips on models such as
    transformers' (``got multiple values for argument 'use_cache'``).
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if kwargs:
        model = KeywordAdapter(model, list(kwargs))
        args = tuple(kwargs.values())
    export_args: tuple[Any, ...] = args
    dynamic_axes = {
        s.name: {i: d for i, d in enumerate(s.shape) if isinstance(d, str)}
        for s in specs
        if s.symbols
    }
    with tempfile.TemporaryDirectory(prefix="onnxpipe-ts-") as tmp:
        path = Path(tmp) / "model.onnx"
        try:
            torch.onnx.export(
                model,
                export_args,
                str(path),
                dynamo=False,
                input_names=[s.name for s in specs],
                output_names=output_names,
                dynamic_axes=dynamic_axes or None,
                opset_version=opset or TORCHSCRIPT_DEFAULT_OPSET,
            )
        except (
            torch.onnx.errors.OnnxExporterError,
            RuntimeError,
            AssertionError,
            ValueError,
            TypeError,
            NotImplementedError,
        ) as e:
            raise ExportFailed(summarize_error(e), unsupported_ops(e)) from e
        model_ir = ir.load(path)
        # The temp dir goes away: pull any external data into memory first.
        model_ir = ir.external_data.load_to_model(model_ir)
    name_output_dims(model_ir, {d for s in specs for d in s.shape if isinstance(d, str)})
    return model_ir


def name_output_dims(model: ir.Model, symbols: set[str]) -> None:
    """Rename the output dims the TorchScript exporter names itself after the input symbols.

    Outputs come out as ``[LayerNormalizationoutput_dim_0, ..., 384]`` where they are
    ``[batch, seq, 384]``; ONNX Runtime's symbolic shape inference derives the input
    symbols. A dim is renamed only when the inference gives one of ``symbols`` for it; on
    an inference failure the exporter's names stay.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    loose = [
        (value, axis)
        for value in model.graph.outputs
        if value.shape is not None
        for axis, dim in enumerate(value.shape)
        if isinstance(dim, ir.SymbolicDim) and dim.value not in symbols
    ]
    if not loose or not symbols:
        return
    try:
        inferred = SymbolicShapeInference.infer_shapes(ir.to_proto(model), auto_merge=True)
    except Exception as e:  # noqa: BLE001 - any failure leaves the exporter's names
        logger.debug("output dims keep the exporter's names: %s", e)
        return
    shapes = {
        o.name: [d.dim_param for d in o.type.tensor_type.shape.dim] for o in inferred.graph.output
    }
    renamed = []
    for value, axis in loose:
        dims = shapes.get(value.name or "", [])
        new = dims[axis] if axis < len(dims) else ""
        if new in symbols:
            dims_now: list[Any] = list(value.shape)  # type: ignore[arg-type]
            renamed.append(f"{value.name}[{axis}]: {dims_now[axis]} -> {new}")
            dims_now[axis] = new
            value.shape = ir.Shape(dims_now)
    if renamed:
        logger.info("output dims named after the inputs: %s", "; ".join(renamed))


def unsupported_ops(error: BaseException) -> list[str]:
    """Op names an exporter error mentions as having no ONNX translation."""
    text = _error_text(error)
    found: list[str] = []
    for pattern in _OP_PATTERNS:
        for op in pattern.findall(text):
            if op not in found:
                found.append(op)
    return found


def summarize_error(error: BaseException) -> str:
    """One line for an exporter error: the root cause, not the exporter's boilerplate."""
    text = _error_text(error)
    marker = "## Exception summary"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("⬆")]
    first = lines[0] if lines else type(error).__name__
    first = re.sub(r"\x1b\[[0-9;]*m", "", first)
    return f"{type(error).__name__}: {first[:300]}"


def _error_text(error: BaseException) -> str:
    parts: list[str] = []
    seen: BaseException | None = error
    while seen is not None and len(parts) < 5:
        parts.append(str(seen))
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)
