"""PyTorch -> ONNX: the dynamo exporter, with the TorchScript exporter as fallback.

``attempts`` loads the source once and yields one :class:`ExportAttempt` per exporter in the
order the config asks for; the pipeline checks parity on each and keeps the first that passes,
so an ``auto`` fallback is never shipped when it is wrong at other shapes.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from torch.utils import _pytree as pytree

from onnxpipe.converters.base import (
    ConversionResult,
    ConvertConfig,
    Dim,
    ExportAttempt,
    Feeds,
    InputSpec,
    example_sizes,
    in_declared_order,
    output_names_for,
    random_feeds,
)
from onnxpipe.converters.source import describe
from onnxpipe.converters.torch.export import (
    ExportFailed,
    call_args,
    export_dynamo,
    export_torchscript,
)
from onnxpipe.converters.torch.load import load_torch_source
from onnxpipe.errors import InputError

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {
    "float32",
    "float16",
    "float64",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "bool",
}


def attempts(source: str | object, config: ConvertConfig) -> Iterator[ExportAttempt]:
    """Load ``source`` and yield an export attempt per exporter (dynamo, then TorchScript).

    Raises:
        InputError: the source cannot be loaded, no input spec is known, or the model fails
            to run on example inputs built from the spec.
    """
    if not logging.getLogger("onnxpipe").isEnabledFor(logging.DEBUG):
        # torch configures its loggers on import; its exporter warnings are noise unless debugging.
        logging.getLogger("torch").setLevel(logging.ERROR)
    loaded = load_torch_source(source, unsafe_load=config.unsafe_load)
    specs = config.input_specs() or _specs_from_program(loaded)
    if not specs:
        raise InputError(
            f"{describe(source)}: a PyTorch model does not record its input shapes. Pass one "
            "--input per forward argument, e.g. --input input:float32[batch,3,224,224]."
        )
    declared = _positional_names(loaded)
    if declared is None:
        _check_keyword_names(loaded, specs, describe(source))
    specs = in_declared_order(specs, declared, describe(source))
    runnable = loaded.module() if isinstance(loaded, torch.export.ExportedProgram) else loaded
    specs, example, outputs, keys = _example_run(runnable, specs, source, config.data)
    output_names = output_names_for(len(outputs), keys, [s.name for s in specs])

    def reference(feeds: Feeds) -> list[np.ndarray]:
        return _run(runnable, specs, feeds, source)[0]

    exporters = ["dynamo", "torchscript"] if config.exporter == "auto" else [config.exporter]
    tensors = {k: torch.from_numpy(v) for k, v in example.items()}
    args, kwargs = call_args(runnable, specs, tensors)
    for name in exporters:
        if name == "dynamo" and isinstance(loaded, torch.jit.ScriptModule):
            yield ExportAttempt(
                exporter=name,
                error="the source is a TorchScript module, which "
                "the dynamo exporter does not take; use --exporter torchscript",
            )
            continue
        export = export_dynamo if name == "dynamo" else export_torchscript
        target = loaded if name == "dynamo" else runnable
        try:
            model = export(target, specs, args, kwargs, output_names, config.opset)
            kept = _check_signature(model, specs)
            made = model.opset_imports.get("")
            if config.opset is not None and made != config.opset:
                raise ExportFailed(
                    f"it wrote opset {made}, not the --opset {config.opset} asked", []
                )
        except ExportFailed as e:
            _eval_mode(runnable)
            logger.info("%s exporter failed: %s", name, e)
            yield ExportAttempt(exporter=name, error=str(e), unsupported_ops=e.ops)
            continue
        # Exporters toggle training mode while tracing; the reference must run in eval mode.
        _eval_mode(runnable)
        model.producer_name = "onnxpipe"
        yield ExportAttempt(
            exporter=name,
            result=ConversionResult(
                model=model,
                framework="torch",
                exporter=name,  # type: ignore[arg-type]
                inputs=kept,
                reference=reference,
                reference_name=f"torch {torch.__version__}",
            ),
        )


def _positional_names(model: Any) -> list[str] | None:
    """Input names of a model that takes its inputs by position only, in order, else None.

    An ExportedProgram's user inputs, a GraphModule's placeholders, a ScriptModule's forward
    schema. A plain nn.Module is called by keyword when the spec names are its parameters,
    so its parameter names only matter when some spec names are among them and some not
    (``key`` and ``foo`` for ``forward(query, key)``): that binding is unclear, exit 2.
    """
    if isinstance(model, torch.export.ExportedProgram):
        return list(model.graph_signature.user_inputs)
    if isinstance(model, torch.fx.GraphModule):
        return [n.name for n in model.graph.nodes if n.op == "placeholder"]
    if isinstance(model, torch.jit.ScriptModule):
        schema = getattr(model.forward, "schema", None)
        return [a.name for a in schema.arguments[1:]] if schema is not None else None
    return None


def _check_keyword_names(model: Any, specs: Sequence[InputSpec], where: str) -> None:
    """Refuse spec names of which some, not all, are ``forward`` parameters of ``model``."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError, AttributeError):
        return
    names = [s.name for s in specs]
    known = [n for n in names if n in params]
    if known and len(known) < len(names):
        raise InputError(
            f"{where}: the --input names {names} are partly forward's parameters {params} "
            f"({known}) and partly not, so it is unclear which input is which. Name every "
            "input after its forward parameter, or none of them."
        )


def _example_run(
    runnable: Any, specs: list[InputSpec], source: str | object, data: str | None
) -> tuple[list[InputSpec], Feeds, list[np.ndarray], list[str] | None]:
    """Run the model once on the example the exporters trace: specs, feeds, outputs, keys.

    Generated values first; then ids below the smallest embedding table (ids 1..99 may be
    past it); then ids of 1 (``ids + 3`` into a table, ``one_hot(ids, 6)``); then the first
    batch of ``data``. Parity later generates ids below the limit the graph shows.

    Raises:
        InputError: the model fails on all of them (names the --data file when it failed).
    """
    tries = [specs]
    if any(s.integer for s in specs):
        rows = _embedding_rows(runnable)
        tries += [
            [replace(s, high=top) if s.integer else s for s in specs] for top in (rows, 2) if top
        ]
    refused: InputError | None = None
    for tried in tries:
        example = random_feeds(tried, example_sizes(tried))
        try:
            return tried, example, *_run(runnable, tried, example, source)
        except InputError as e:
            refused = refused or e
    assert refused is not None
    if data is None:
        if any(s.integer for s in specs):
            raise InputError(
                f"{refused} If the values matter (ids into a small table, one_hot), give real "
                "inputs with --data FILE.npz (one array per input, by name)."
            ) from refused
        raise refused
    from onnxpipe.data import load_data  # the pipeline's reader; it imports this package

    example = load_data(data, specs)[0]
    return specs, example, *_run(runnable, specs, example, source, data)


def _embedding_rows(model: Any) -> int | None:
    """Rows of the model's smallest embedding table, None without one (ids must stay below)."""
    if not isinstance(model, torch.nn.Module):
        return None
    rows = [
        m.num_embeddings
        for m in model.modules()
        if isinstance(m, torch.nn.Embedding | torch.nn.EmbeddingBag)
    ]
    return min(rows) if rows else None


def _eval_mode(model: Any) -> None:
    """Back to eval mode after an exporter toggled it (graphs from torch.export have no modes)."""
    if not isinstance(model, torch.fx.GraphModule):
        model.eval()


def _run(
    model: Any,
    specs: Sequence[InputSpec],
    feeds: Feeds,
    source: str | object,
    data: str | None = None,
) -> tuple[list[np.ndarray], list[str] | None]:
    """Run the PyTorch model on numpy feeds; flat numpy outputs and the output keys if a dict.

    ``data`` names the --data file the feeds came from, for the message when the model fails.
    """
    missing = [s.name for s in specs if s.name not in feeds]
    if missing:
        # Inputs the exported graph dropped as unused still need a value in PyTorch.
        feeds = {
            **random_feeds([s for s in specs if s.name in missing], example_sizes(specs)),
            **feeds,
        }
    # A copy: a model that changes its input in place must not change the feed ORT runs next.
    tensors = {k: torch.from_numpy(np.array(v, copy=True, order="C")) for k, v in feeds.items()}
    args, kwargs = call_args(model, specs, tensors)
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - the user's forward may raise anything
        shapes = ", ".join(f"{k}{tuple(v.shape)}" for k, v in tensors.items())
        failed = f"({type(e).__name__}: {str(e)[:200]})"
        if data is not None:
            raise InputError(
                f"{data}: {describe(source)} failed on the first batch of these --data inputs "
                f"{shapes} {failed}. Give inputs the model runs."
            ) from e
        raise InputError(
            f"{describe(source)}: the model failed on inputs {shapes} {failed}. Check that "
            "--input matches the forward arguments in order, dtype and shape."
        ) from e
    keys = list(out.keys()) if isinstance(out, dict) else None
    # Python numbers among the outputs (x.shape[0]) are exported as 0-d tensors too.
    leaves = [x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor | int | float)]
    return [
        x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x) for x in leaves
    ], keys


def _specs_from_program(loaded: Any) -> list[InputSpec]:
    """Input specs recorded in an ExportedProgram (user inputs, symbolic dims as symbols).

    A saved program keeps torch's own symbol names (``s77``), not the ``Dim`` names: a
    symbol first seen on axis 0 is called ``batch``, others ``<input>_dim<axis>``, and inputs
    that share a symbol share the name.
    """
    if not isinstance(loaded, torch.export.ExportedProgram):
        return []
    user_inputs = set(loaded.graph_signature.user_inputs)
    specs = []
    names: dict[str, str] = {}
    for node in loaded.graph.nodes:
        if node.op != "placeholder" or node.name not in user_inputs:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        dtype = str(val.dtype).removeprefix("torch.")
        if dtype not in _TORCH_DTYPES:
            return []
        dims: list[Dim] = []
        for axis, dim in enumerate(val.shape):
            if isinstance(dim, int):
                dims.append(int(dim))
                continue
            text = str(dim)
            if text not in names:
                wanted = "batch" if axis == 0 else f"{node.name}_dim{axis}"
                names[text] = _symbol(wanted if wanted not in names.values() else text)
            dims.append(names[text])
        specs.append(InputSpec(node.name, dtype, tuple(dims)))
    return specs


def _symbol(text: str) -> str:
    return text if text.isidentifier() else "d_" + "".join(c if c.isalnum() else "_" for c in text)


def _check_signature(model: ir.Model, specs: Sequence[InputSpec]) -> list[InputSpec]:
    """Specs of the inputs the graph kept; refuse a graph that froze a dynamic dim."""
    by_name = {s.name: s for s in specs}
    kept = []
    for value in model.graph.inputs:
        spec = by_name.get(value.name or "")
        if spec is None:
            raise ExportFailed(f"exported graph has unexpected input {value.name!r}", [])
        if value.shape is not None:
            for axis, (want, got) in enumerate(zip(spec.shape, value.shape, strict=False)):
                if isinstance(want, str) and isinstance(got, int):
                    raise ExportFailed(
                        f"the exporter made dim {axis} ({want!r}) of input {spec.name!r} static "
                        f"({got}); the model specializes on that size",
                        [],
                    )
        kept.append(spec)
    dropped = [s.name for s in specs if s not in kept]
    if dropped:
        logger.info("exported graph dropped unused inputs %s", dropped)
    return kept
