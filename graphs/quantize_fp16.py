"""Float16 weights and compute with float32 inputs/outputs kept, sensitive ops left float32.

ORT's float16 converter with ``keep_io_types`` (Cast at the edges, so callers keep feeding
float32) and a block list: ORT's own list plus ops whose range or accumulation overflows
float16 (exponent/normalisation ops and reductions).
"""

from __future__ import annotations

import logging

import onnx
import onnx_ir as ir
from pydantic import Field

from onnxpipe.graphs.base import GraphPass, PassConfig, copy_model, identity_output
from onnxpipe.graphs.cleanup import keep_interface
from onnxpipe.graphs.quant_exclude import split_exclude
from onnxpipe.graphs.quant_utils import from_proto, refuse_float16, refuse_quantized, to_proto

logger = logging.getLogger(__name__)

SENSITIVE_OPS = (
    "Exp",
    "Log",
    "Pow",
    "Softmax",
    "LogSoftmax",
    "ReduceSum",
    "ReduceSumSquare",
    "ReduceLogSumExp",
    "CumSum",
    "Erf",
    "LayerNormalization",
    "SimplifiedLayerNormalization",
)


class QuantizeFp16Config(PassConfig):
    """Settings of :class:`QuantizeFp16Pass`."""

    block_sensitive: bool = Field(default=True, description="keep overflow-prone ops in float32")
    exclude: tuple[str, ...] = Field(default=(), description="node names or op types kept float32")


class QuantizeFp16Pass(GraphPass[QuantizeFp16Config]):
    """Convert weights and compute to float16; graph inputs/outputs stay float32.

    Refuses a quantized model or one with float16 weights already.
    """

    name = "quantize_fp16"
    config_class = QuantizeFp16Config
    modifies_in_place = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Return the float16 model (a new object)."""
        from onnx_ir.passes.common import (  # noqa: PLC0415
            IdentityEliminationPass,
            LiftConstantsToInitializersPass,
        )
        from onnxruntime.transformers.float16 import (  # noqa: PLC0415
            DEFAULT_OP_BLOCK_LIST,
            convert_float_to_float16,
        )

        refuse_quantized(model, self.name)
        refuse_float16(model, self.name)
        nodes, op_types = split_exclude(model, self.config.exclude, self.name)
        blocked = set(DEFAULT_OP_BLOCK_LIST) | op_types
        if self.config.block_sensitive:
            blocked |= set(SENSITIVE_OPS)
        # weights held by Constant nodes or read through Identity reach a kept node as
        # initializers, which restore_float32_weights gives it in float32 (it read a float16
        # copy cast back: 2e-3 off)
        work = copy_model(model)
        interface = [v.name for v in work.graph.inputs], [v.name for v in work.graph.outputs]
        work = LiftConstantsToInitializersPass(lift_all_constants=True)(work).model
        work = IdentityEliminationPass()(work).model
        keep_interface(work, *interface)
        returned = _own_outputs(work.graph)
        proto = to_proto(work)
        if any(n.domain == "com.microsoft" for n in model.graph):
            proto = _typed(proto)
        proto = convert_float_to_float16(
            proto,
            keep_io_types=True,
            op_block_list=sorted(blocked),
            node_block_list=nodes,
        )
        result = from_proto(proto)
        for index, name in returned:  # inputs the model returns, float32 as they came
            result.graph.outputs.insert(
                index, next(v for v in result.graph.inputs if v.name == name)
            )
        # The converter appends its input/output Casts after the nodes that read them; ORT
        # runs that, the ONNX checker (and so `validate`) refuses it.
        result.graph.sort()
        for value in result.graph.initializers.values():
            # Weights of blocked ops (LayerNormalization) stay float32 while the converter's
            # value_info calls them float16: the ONNX checker refuses the mismatch.
            if value.const_value is not None:
                value.dtype = value.const_value.dtype
        restored = restore_float32_weights(result.graph, work.graph)
        dropped = restored + drop_round_trips(result.graph)
        kept = [n.name for n in model.graph if n.op_type in blocked or n.name in nodes]
        self.metrics = {"blocked_op_types": sorted(blocked & {n.op_type for n in model.graph}),
                        "float32_nodes": len(kept)}  # fmt: skip
        logger.info("quantize_fp16: %d nodes kept float32, %d Casts dropped", len(kept), dropped)
        return ir.passes.PassResult(result, modified=True)


def _own_outputs(graph: ir.Graph) -> list[tuple[int, str]]:
    """Give each output a node of its own for the converter's output Casts, in place.

    ``keep_io_types`` renames the node that produces an output and adds a Cast back to the
    output's name: an output that is an initializer or a graph input, or two outputs of one
    value, were then declared twice (a SerdeError, exit 3). An initializer output is read
    through an Identity (the initializer renamed); graph inputs returned as outputs are taken
    out and returned as (position, name), to put back after the conversion.
    """
    returned = []
    for index in reversed(range(len(graph.outputs))):
        if graph.outputs[index].is_graph_input():
            returned.append((index, str(graph.outputs.pop(index).name)))
    for index, value in enumerate(graph.outputs):
        if value.is_initializer() or value.producer() is None:
            name = str(value.name)
            value.name = f"{name}_value"
            graph.outputs[index] = identity_output(graph, value, name)
    return sorted(returned)


def _typed(proto: onnx.ModelProto) -> onnx.ModelProto:
    """``proto`` with the types of ONNX Runtime's fused ops' outputs (which carry none).

    The converter casts a kept-float32 node's inputs only where it knows they are float16:
    an ``Attention`` kept float32 after an untyped ``EmbedLayerNormalization`` read float16
    and ORT refused the model. ORT's symbolic shape inference knows its contrib ops.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference  # noqa: PLC0415

    try:
        typed = SymbolicShapeInference.infer_shapes(proto, auto_merge=True, guess_output_rank=True)
    except Exception as e:  # noqa: BLE001 - best effort: the converter runs without the types
        logger.warning("quantize_fp16: no types for the fused ops (%s)", e)
        return proto
    return typed if typed is not None else proto


def drop_round_trips(graph: ir.Graph) -> int:
    """Remove the converter's Casts that change nothing or only lose precision; return how many.

    Between two nodes kept float32 the converter rounds the tensor to float16 and back
    (``Cast(to=float16)`` then ``Cast(to=float32)``), and it casts float32 weights of kept
    nodes to float32: a model with every node excluded still differed from float32 by 3e-4.
    Each such Cast's readers get the float32 tensor itself; a float16 tensor cast to float32
    and back is read as it was. A graph output keeps its Cast (its name), fed the tensor.
    """
    dropped = 0
    for node in list(graph):
        same = _same_value(node)
        if same is None:
            continue
        out = node.outputs[0]
        if out.is_graph_output():
            if node.inputs[0] is not same:
                node.replace_input_with(0, same)
            continue
        out.replace_all_uses_with(same)
        graph.remove(node, safe=True)
        dropped += 1
    for node in reversed(list(graph)):  # casts whose readers were all rewired
        unread = not any(o.uses() or o.is_graph_output() for o in node.outputs)
        if node.op_type == "Cast" and unread:
            graph.remove(node, safe=True)
            dropped += 1
    return dropped


def _cast_to(node: ir.Node | None) -> ir.DataType | None:
    """The type a Cast node casts its input to; None for any other node."""
    if node is None or node.op_type != "Cast" or node.domain not in ("", "ai.onnx"):
        return None
    attr = node.attributes.get("to")
    return ir.DataType(attr.as_int()) if attr is not None and node.inputs[0] is not None else None


def _same_value(node: ir.Node) -> ir.Value | None:
    """The value a Cast's output equals exactly (float32 for a float32 result), else None."""
    to = _cast_to(node)
    src = node.inputs[0] if to is not None else None
    if src is None:
        return None
    if to == src.dtype and to == ir.DataType.FLOAT:
        return src
    producer = src.producer()
    if producer is None or _cast_to(producer) is None:
        return None
    origin = producer.inputs[0]
    if origin is None:
        return None
    if to == ir.DataType.FLOAT and src.dtype == ir.DataType.FLOAT16:
        return origin if origin.dtype == ir.DataType.FLOAT else None
    if to == ir.DataType.FLOAT16 and src.dtype == ir.DataType.FLOAT:
        return origin if origin.dtype == ir.DataType.FLOAT16 else None
    return None


def restore_float32_weights(graph: ir.Graph, original: ir.Graph) -> int:
    """Nodes kept float32 read their weights as the input model held them; return how many.

    A weight that converted nodes share with a kept one is stored once, in float16, and cast
    back for the kept node: ``x * w`` kept float32 was 1e-3 off, exactly ``x * fp16(w)``.
    The kept node gets the float32 original (the file holds both copies).
    """
    restored = 0
    for node in list(graph):
        source = node.inputs[0] if _cast_to(node) == ir.DataType.FLOAT else None
        if source is None:
            continue
        kept = original.initializers.get(source.name or "")
        if source.dtype != ir.DataType.FLOAT16 or kept is None or kept.const_value is None:
            continue
        if kept.dtype != ir.DataType.FLOAT or node.outputs[0].is_graph_output():
            continue
        name = f"{source.name}_float32"
        value = graph.initializers.get(name)
        if value is None:
            array = kept.const_value.numpy()
            value = ir.Value(name=name, const_value=ir.tensor(array, name=name))
            value.shape, value.dtype = ir.Shape(array.shape), ir.DataType.FLOAT
            graph.register_initializer(value)
        node.outputs[0].replace_all_uses_with(value)
        graph.remove(node, safe=True)
        restored += 1
    return restored
