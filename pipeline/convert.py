"""The convert step: pick a converter, try its exporters, keep the first that proves parity.

``auto`` never ships a fallback export that is wrong at other shapes: every attempt is run
against the source framework at unseen shapes, and one that fails is not used.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxpipe.converters import get_converter
from onnxpipe.converters.base import ConversionResult, ConvertConfig, InputSpec, unnamed_dim
from onnxpipe.converters.source import (
    Loaded,
    call_factory,
    describe,
    detect_framework,
    framework_of_object,
)
from onnxpipe.errors import ConversionError, GateFailed, InputError, raise_if_interrupted
from onnxpipe.modelio import save_model
from onnxpipe.runtime import ORT_ERRORS
from onnxpipe.source_parity import check_parity, parity_advice

logger = logging.getLogger(__name__)

DEFAULT_ATOL = 1e-4


@dataclass
class Converted:
    """The chosen conversion, its parity record and what the other attempts did."""

    result: ConversionResult
    model_path: Path
    parity: dict[str, Any]
    samples: list[tuple[dict[str, np.ndarray], list[np.ndarray]]]
    attempts: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def resolve_source(source: str | object, framework: str) -> tuple[str, str | object]:
    """The framework to use and the source to hand it (a callable is called once here).

    A ``module:callable`` is built here to learn its framework, and handed on as
    :class:`Loaded` so the converter does not build it again and still names it in messages.
    """
    if not isinstance(source, str):
        found = framework_of_object(source)
        if found is None:
            raise InputError(
                f"convert() got a {type(source).__qualname__}; pass a torch.nn.Module, a "
                "keras.Model, a tf.function or a path."
            )
        return found, source
    if framework != "auto":
        return framework, source
    detected = detect_framework(source)
    if not Path(source).exists():
        model = call_factory(source)
        found = framework_of_object(model)
        if found is None:
            raise InputError(
                f"{source}: returned {type(model).__module__}.{type(model).__qualname__}, "
                "expected a torch.nn.Module or a keras.Model."
            )
        return found, Loaded(model, source)
    return detected, source


def convert(
    source: str | object,
    config: ConvertConfig,
    workdir: Path,
    framework: str = "auto",
    atol: float = DEFAULT_ATOL,
    data: str | None = None,
) -> Converted:
    """Convert ``source`` and prove parity; the model is saved under ``workdir``.

    Raises:
        ConversionError: no exporter could convert the model (names the ops where known).
        GateFailed: every converted model disagreed with the source framework.
    """
    started = time.perf_counter()
    if data is not None and config.data is None:
        config = config.model_copy(update={"data": data})
    framework, loaded = resolve_source(source, framework)
    source_name = describe(source)
    if config.signature is not None and framework != "tf":
        raise InputError(
            f"{source_name}: --signature {config.signature} picks a TensorFlow SavedModel "
            f"signature, and this source is {framework}, not TensorFlow. Drop --signature."
        )
    # options for one framework's converter, given for another, did nothing but were recorded
    if config.exporter != "auto" and framework != "torch":
        raise InputError(
            f"{source_name}: --exporter {config.exporter} picks the PyTorch exporter, and this "
            f"source is {framework}, not PyTorch. Drop --exporter."
        )
    if config.nchw and framework != "tf":
        raise InputError(
            f"{source_name}: --nchw turns a TensorFlow model's NHWC image inputs into NCHW, and "
            f"this source is {framework}, whose inputs are kept as they are. Drop --nchw."
        )
    tried: list[dict[str, Any]] = []
    failed_parity: list[tuple[dict[str, Any], str]] = []
    for attempt in get_converter(framework)(loaded, config):
        raise_if_interrupted()  # not a failed export: a Ctrl-C that the exporter swallowed
        record: dict[str, Any] = {"exporter": attempt.exporter}
        tried.append(record)
        if attempt.result is None:
            record.update(status="export_failed", error=attempt.error, ops=attempt.unsupported_ops)
            continue
        candidate_dir = workdir / f"attempt-{len(tried)}"
        candidate_dir.mkdir(parents=True, exist_ok=True)
        path = save_model(attempt.result.model, candidate_dir)[0]
        try:
            parity, samples = check_parity(attempt.result, path, atol, data, source_name)
        except ORT_ERRORS as e:  # an invalid graph (dynamo's opset down-conversion): next one
            error = f"ONNX Runtime cannot load the model it wrote: {str(e).splitlines()[0][:300]}"
            logger.info("%s exporter: %s", attempt.exporter, error)
            record.update(status="export_failed", error=error, ops=[])
            continue
        record.update(
            status="passed" if parity["passed"] else "parity_failed",
            max_abs_diff=parity["max_abs_diff"],
            errors=parity["errors"][:3],
        )
        if parity["passed"]:
            outputs = attempt.result.model.graph.outputs
            declared = [str(v.shape) for v in outputs]
            freed = free_output_dims(attempt.result.model, samples, attempt.result.inputs)
            if [str(v.shape) for v in outputs] != declared:  # save the model with the fix
                path = save_model(attempt.result.model, candidate_dir)[0]
            if freed:
                attempt.result.notes.append(freed)
            first_error = next((t for t in tried if t["status"] != "passed"), None)
            attempt.result.fallback_reason = _reason(first_error) if first_error else None
            return Converted(
                attempt.result, path, parity, samples, tried, time.perf_counter() - started
            )
        failed_parity.append((parity, attempt.exporter))
    if failed_parity:
        parity, exporter = failed_parity[0]
        raise GateFailed(
            f"{source_name}: the ONNX model does not match {framework} "
            f"(max abs diff {parity['max_abs_diff']}, tolerance atol={atol} scaled by output "
            f"magnitude{'; ' + parity['errors'][0] if parity['errors'] else ''}). "
            f"Tried: {_summary(tried)}. Nothing was written as a bundle. {parity_advice(parity)}",
            metrics={"parity": parity, "attempts": tried},
        )
    ops = sorted({op for t in tried for op in t.get("ops", [])})
    if any("Cache" in str(t.get("error")) for t in tried):  # transformers' DynamicCache
        advice = (
            "The model returns its key/value cache (a transformers Cache object), which no "
            "exporter takes: build it with use_cache=False (e.g. config.use_cache = False) or "
            "return only the tensors you need"
        )
    elif any("Cannot view a tensor" in str(t.get("error")) for t in tried):
        advice = (
            "torch.export cannot .view() a non-contiguous tensor at symbolic shapes (T5's "
            "attention does); the TorchScript exporter can: use --exporter torchscript (or "
            "auto), or .reshape() / .contiguous() there in the model"
        )
    elif ops:
        advice = (
            f"Unsupported op(s): {', '.join(ops)}. Replace them in the model with supported ones "
            "(or a different implementation of the same math)"
        )
    else:
        advice = "Rerun with --debug for the exporters' full logs, or try --exporter / --opset"
    raise ConversionError(
        f"{source_name}: no exporter could convert the model. Tried: {_summary(tried)}. {advice}."
    )


_PLACEHOLDER = re.compile(r"unk__\d+")
"""tf2onnx's name for an output dim it could not infer."""


def free_output_dims(
    model: ir.Model,
    samples: Sequence[tuple[dict[str, np.ndarray], list[np.ndarray]]],
    specs: Sequence[InputSpec],
) -> str | None:
    """Make symbolic the output dims an exporter declared static but that vary between runs.

    The dynamo exporter declares an LSTM's output ``[batch, 3, hidden]`` when it traced a
    sequence of 3, though the model runs at any length (ORT then warns on every run). A dim
    whose size follows an input symbol in every sample gets that symbol's name; so does an
    output dim the exporter named itself (tf2onnx's ``unk__82``), and one of those that never
    changed across the samples becomes its size. Returns a note naming the changes to static
    dims, or None when every declared dim held.
    """
    changed = []
    symbols = {d for spec in specs for d in spec.shape if isinstance(d, str)}
    for index, value in enumerate(model.graph.outputs):
        dims: list[int | str | ir.SymbolicDim] = list(value.shape or ())
        for axis, dim in enumerate(dims):
            seen = {outs[index].shape[axis] for _, outs in samples if outs[index].ndim > axis}
            if isinstance(dim, ir.SymbolicDim) and dim.value not in symbols:
                name = _symbol_for(axis, index, samples, specs) if len(seen) > 1 else None
                if name is not None:  # an exporter's own name for an input's dim
                    dims[axis] = name
                    value.shape = ir.Shape(dims)
                elif len(seen) == 1 and _PLACEHOLDER.fullmatch(str(dim.value or "")):
                    # tf2onnx's unk__443 for a dim that never changed (an attention's features)
                    dims[axis] = seen.pop()
                    value.shape = ir.Shape(dims)
                continue
            if not isinstance(dim, int) or seen <= {dim}:
                continue
            dims[axis] = _symbol_for(axis, index, samples, specs) or unnamed_dim(value.name, axis)
            changed.append(f"{value.name}[{axis}] {dim} -> {dims[axis]}")
            value.shape = ir.Shape(dims)
    if not changed:
        return None
    return (
        "the exporter declared output dims static that vary with the inputs; made symbolic: "
        + ", ".join(changed)
    )


def _symbol_for(
    axis: int,
    index: int,
    samples: Sequence[tuple[dict[str, np.ndarray], list[np.ndarray]]],
    specs: Sequence[InputSpec],
) -> str | None:
    """The input symbol whose size equals output ``index``'s dim ``axis`` in every sample."""
    for spec in specs:
        for position, symbol in enumerate(spec.shape):
            if isinstance(symbol, str) and all(
                spec.name in feeds and feeds[spec.name].shape[position] == outs[index].shape[axis]
                for feeds, outs in samples
            ):
                return symbol
    return None


def _reason(record: dict[str, Any]) -> str:
    if record["status"] == "export_failed":
        return f"{record['exporter']} export failed: {record['error']}"
    return (
        f"{record['exporter']} export disagreed with the source: max abs diff "
        f"{record['max_abs_diff']} {'; '.join(record['errors'])}".strip()
    )


def _summary(tried: Sequence[dict[str, Any]]) -> str:
    return "; ".join(f"{t['exporter']}: {t.get('error') or t['status']}" for t in tried)
