"""The graph-pass contract: a frozen config plus one ``call(model)``, on ``onnx_ir`` models.

Passes subclass :class:`GraphPass`, which is an ``onnx_ir.passes.PassBase``: its ``__call__``
checks every pass's contract once (the result is a ``PassResult``; an in-place pass returns the
same model object, a functional one a new object). Here it also turns a pass's failure into a
:class:`~onnxpipe.errors.PassError` that names the pass.

Built-in passes are listed in :data:`PASSES` as ``name -> "module:Class"`` and imported on
first use; third-party passes come through the ``onnxpipe.passes`` entry-point group.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Sequence
from importlib import metadata
from typing import Any, ClassVar, Generic, TypeVar

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel, ConfigDict

from onnxpipe.errors import InputError, OnnxPipeError, PassError, invalid_settings

logger = logging.getLogger(__name__)

PASSES: dict[str, str] = {
    "quantize_preprocess": "onnxpipe.graphs.quantize_preprocess:QuantizePreprocessPass",
    "quantize_static": "onnxpipe.graphs.quantize_static:QuantizeStaticPass",
    "quantize_dynamic": "onnxpipe.graphs.quantize_dynamic:QuantizeDynamicPass",
    "quantize_int4": "onnxpipe.graphs.quantize_int4:QuantizeInt4Pass",
    "quantize_fp16": "onnxpipe.graphs.quantize_fp16:QuantizeFp16Pass",
    "cleanup": "onnxpipe.graphs.cleanup:CleanupPass",
    "prune_magnitude": "onnxpipe.graphs.prune_magnitude:PruneMagnitudePass",
    "prune_channels": "onnxpipe.graphs.prune_channels:PruneChannelsPass",
    "lowrank": "onnxpipe.graphs.lowrank:LowRankPass",
}
"""Built-in passes, ``name -> "onnxpipe.graphs.<module>:<Class>"``; filled as passes land."""


def ort_graph_level(name: str) -> Any:
    """ONNX Runtime's ``GraphOptimizationLevel`` for ``none``/``basic``/``extended``/``all``."""
    import onnxruntime as ort  # noqa: PLC0415 - graph passes need not load ORT

    levels = ort.GraphOptimizationLevel
    return {
        "none": levels.ORT_DISABLE_ALL,
        "basic": levels.ORT_ENABLE_BASIC,
        "extended": levels.ORT_ENABLE_EXTENDED,
        "all": levels.ORT_ENABLE_ALL,
    }[name]


ENTRY_POINT_GROUP = "onnxpipe.passes"


class PassConfig(BaseModel):
    """Base of every pass's settings: frozen, no unknown keys, JSON-serialisable."""

    model_config = ConfigDict(frozen=True, extra="forbid")


ConfigT = TypeVar("ConfigT", bound=PassConfig)


class GraphPass(ir.passes.PassBase, Generic[ConfigT]):
    """An ONNX -> ONNX pass configured by a frozen :class:`PassConfig`.

    Subclasses set ``name``, ``config_class``, ``modifies_in_place`` and implement ``call``,
    returning ``ir.passes.PassResult``; they may put numbers for the manifest in
    ``self.metrics``.
    """

    name: ClassVar[str]
    config_class: ClassVar[type[PassConfig]]
    modifies_in_place: ClassVar[bool] = True

    def __init__(self, config: ConfigT | None = None, **settings: Any) -> None:
        if config is None:
            try:
                config = self.config_class(**settings)  # type: ignore[assignment]
            except ValueError as e:  # pydantic's ValidationError
                raise invalid_settings(f"pass {self.name!r}: invalid settings", e) from e
        self.config: ConfigT = config  # type: ignore[assignment]
        self.metrics: dict[str, Any] = {}

    @property
    def in_place(self) -> bool:
        """Whether ``call`` edits and returns the input model object."""
        return self.modifies_in_place

    @property
    def changes_input(self) -> bool:
        """Whether the input model is changed (true exactly for in-place passes)."""
        return self.modifies_in_place

    def __call__(self, model_or_result: ir.Model | ir.passes.PassResult, /) -> ir.passes.PassResult:
        """Run the pass with ir-py's contract checks; failures become :class:`PassError`."""
        try:
            return super().__call__(model_or_result)
        except OnnxPipeError:
            raise
        except ir.passes.PassError as e:
            raise PassError(f"pass {self.name!r} broke its contract: {e}") from e
        except (ir.passes.PreconditionError, ir.passes.PostconditionError) as e:
            raise PassError(f"pass {self.name!r}: {e}") from e


def constant(value: ir.Value | None) -> np.ndarray | None:
    """The array of a constant value (an initializer), None for a computed one."""
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


def computed_weights_hint(model: ir.Model, op_types: Sequence[str]) -> str:
    """Why layers of ``op_types`` offer no weight to compress, when their weights are computed.

    The onnx zoo's light models build every weight with ConstantOfShape; ONNX Runtime's
    offline optimization folds such subgraphs into initializers. Empty when no such layer.
    """
    computed = [
        n
        for n in model.graph
        if n.op_type in op_types
        and len(n.inputs) > 1
        and n.inputs[1] is not None
        and constant(n.inputs[1]) is None
        and _from_constants(n.inputs[1])
    ]
    if not computed:
        return ""
    makers = sorted({n.inputs[1].producer().op_type for n in computed})  # type: ignore[union-attr]
    count = f"{len(computed)} {'/'.join(sorted({n.op_type for n in computed}))} node"
    return (
        f" The weights of {count}{'s' if len(computed) > 1 else ''} "
        f"are computed in the graph ({', '.join(makers)}), not stored: run `onnxpipe "
        "optimize BUNDLE -o OUT --level basic` first (ONNX Runtime folds them into "
        "initializers), then compress OUT."
    )


def _from_constants(value: ir.Value, budget: int = 16) -> bool:
    """Whether ``value`` is computed from constants alone (within ``budget`` nodes)."""
    stack, seen = [value], 0
    while stack:
        current = stack.pop()
        if constant(current) is not None:
            continue
        producer = current.producer()
        seen += 1
        if producer is None or seen > budget:
            return False  # a graph input, or too deep to tell
        stack.extend(v for v in producer.inputs if v is not None)
    return True


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as an initializer named ``name`` (``_`` appended until unused)."""
    while name in graph.initializers:
        name += "_"
    value = ir.Value(
        name=name,
        shape=ir.Shape(array.shape),
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


def identity_output(graph: ir.Graph, value: ir.Value, name: str) -> ir.Value:
    """Append ``Identity(value)`` whose output is named ``name`` (typed as ``value``)."""
    node = ir.node("Identity", [value], name=f"{name}_output")
    out = node.outputs[0]
    out.name, out.type, out.shape = name, value.type, value.shape
    graph.append(node)
    return out


ID_PASS = frozenset({"Cast", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
"""Ops that hand integer ids on unchanged: ids from an input through them are the input's own,
which onnxpipe checks against an embedding table before it runs data."""


def attr_int(node: ir.Node, name: str, default: int) -> int:
    """An integer attribute of ``node``, or ``default``."""
    attr = node.attributes.get(name)
    return int(attr.as_int()) if attr is not None else default


def copy_model(model: ir.Model) -> ir.Model:
    """A deep copy of ``model`` whose weights are all in memory.

    Weights kept as external data are read from their files: a serialize/deserialize copy
    alone keeps only their relative location and fails when it later reads them.
    """
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(model))
    for name, value in model.graph.initializers.items():
        if isinstance(value.const_value, ir.ExternalTensor):
            copy.graph.initializers[name].const_value = ir.tensor(
                value.const_value.numpy(), name=name
            )
    return copy


def get_pass(name: str) -> type[GraphPass[Any]]:
    """The pass class registered as ``name`` (built-in or entry point).

    Raises:
        InputError: no pass has that name.
    """
    target = PASSES.get(name)
    if target is None:
        for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
            if entry.name == name:
                target = entry.value
                break
    if target is None:
        known = sorted(PASSES) + [e.name for e in metadata.entry_points(group=ENTRY_POINT_GROUP)]
        raise InputError(f"unknown pass {name!r}; known passes: {', '.join(known) or '(none)'}.")
    module_name, _, attr = target.partition(":")
    cls: type[GraphPass[Any]] = getattr(importlib.import_module(module_name), attr)
    return cls


def run_passes(passes: Sequence[GraphPass[Any]], model: ir.Model) -> ir.Model:
    """Apply ``passes`` in order; a failure names the pass and the passes that ran before it."""
    done: list[str] = []
    for index, graph_pass in enumerate(passes, start=1):
        try:
            model = graph_pass(model).model
        except OnnxPipeError as e:
            before = f", after {', '.join(done)}" if done else ""
            raise type(e)(f"pass {index} ({graph_pass.name}){before}: {e}") from e
        done.append(graph_pass.name)
    return model


# Inputs of quantized ops that hold quantization metadata (scales, zero points, group
# indices), not weights: an int8 or int4 model keeps the parameters of its float original.
_QUANT_METADATA: dict[str, tuple[int, ...]] = {
    "QuantizeLinear": (1, 2),
    "DequantizeLinear": (1, 2),
    "MatMulInteger": (2, 3),
    "ConvInteger": (2, 3),
    "QLinearConv": (1, 2, 4, 5, 6, 7),
    "QLinearMatMul": (1, 2, 4, 5, 6, 7),
    "QGemm": (1, 2, 4, 5, 7, 8),
    "MatMulNBits": (2, 3, 4),
}


def parameter_count(model: ir.Model) -> int:
    """Elements of the weights, counted alike for a float model and its quantized copies.

    Float initializers, Constant tensors with > 1 element, and quantized weights (their
    integer elements; MatMulNBits' packed ``K x N``), without the scales and zero points
    that dequantize them.
    """
    metadata: set[str] = set()
    quantized: dict[str, int] = {}
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        meta = _QUANT_METADATA.get(node.op_type)
        if meta is None:
            continue
        for i, value in enumerate(node.inputs):
            producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type == "Gather" and i == 0:
                value = producer.inputs[0]  # a quantized embedding table, rows dequantized
            if value is None or not value.is_initializer():
                continue
            if i in meta:
                metadata.add(value.name or "")
            elif node.op_type == "MatMulNBits" and i == 1:
                quantized[value.name or ""] = attr_int(node, "K", 0) * attr_int(node, "N", 0)
            elif value.const_value is not None:
                quantized[value.name or ""] = value.const_value.size
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for name, value in graph.initializers.items():
            tensor = value.const_value
            if name in metadata or tensor is None:
                continue
            if name in quantized:
                total += quantized[name]
            elif tensor.dtype.is_floating_point():
                total += tensor.size
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Constant" and node.domain == "" and "value" in node.attributes:
            tensor = node.attributes["value"].as_tensor()
            if tensor.dtype.is_floating_point() and tensor.size > 1:
                total += tensor.size
    return total
