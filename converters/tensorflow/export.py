"""Freeze a traced TensorFlow function and convert it with tf2onnx.

Three fixes over ``tf2onnx.convert.from_function``, each found on keras.applications:

* Captured constant tensors (EfficientNet's and ConvNeXt's Normalization mean/variance) are
  non-resource captures, which freezing leaves as Placeholders and tf2onnx turns into graph
  inputs. They are folded into Const nodes from their captured values.
* Keras runs grouped convolutions (ConvNeXt's depthwise Conv2D with ``groups``) inside a
  ``tf.function(jit_compile=True)``; grappler never inlines XLA-marked functions, so tf2onnx
  met an opaque ``StatefulPartitionedCall``. The XLA marks are dropped before inlining.
* ``tf.nn.gelu(approximate=False)`` lowers to ``Erfc``, which tf2onnx has no handler for; it
  becomes ``1 - Erf(x)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

from onnxpipe.converters.tensorflow.trace import Traced
from onnxpipe.errors import ConversionError

logger = logging.getLogger(__name__)

MAX_OPSET = 18  # the newest opset tf2onnx 1.17 knows
_XLA_ATTRS = ("_XlaMustCompile", "_noinline")
_KNOWN_DOMAINS = ("", "ai.onnx", "ai.onnx.ml", "com.microsoft")


def freeze(traced: Traced) -> tuple[Any, list[str], list[str]]:
    """Freeze variables and captured constants into a GraphDef ready for tf2onnx.

    Returns:
        The GraphDef, its model input tensor names and its output tensor names.
    """
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2,
    )

    function = traced.function
    count = len(traced.tf_specs)
    captured = {
        tensor.name.split(":")[0]: value
        for tensor, value in zip(function.inputs[count:], function.captured_inputs, strict=False)
        if tensor.dtype != tf.resource
    }
    frozen = convert_variables_to_constants_v2(
        function, lower_control_flow=False, aggressive_inlining=True
    )
    graph_def = frozen.graph.as_graph_def(add_shapes=True)
    folded = 0
    for node in graph_def.node:
        if node.op == "Placeholder" and node.name in captured:
            _to_const(node, np.asarray(captured[node.name]), tf)
            folded += 1
        _drop_xla_marks(node)
    for fdef in graph_def.library.function:
        for key in _XLA_ATTRS:
            if key in fdef.attr:
                del fdef.attr[key]
        for node in fdef.node_def:
            _drop_xla_marks(node)
    if folded:
        logger.info("folded %d captured constant(s) into the graph", folded)
    inputs = [t.name for t in frozen.inputs[:count]]
    outputs = [t.name for t in frozen.outputs]
    return graph_def, inputs, outputs


def _to_const(node: Any, value: np.ndarray, tf: Any) -> None:
    kept = {k: node.attr[k] for k in ("dtype", "_output_shapes") if k in node.attr}
    node.op = "Const"
    node.ClearField("attr")
    for key, attr in kept.items():
        node.attr[key].CopyFrom(attr)
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(value))


def _drop_xla_marks(node: Any) -> None:
    for key in _XLA_ATTRS:
        if key in node.attr:
            del node.attr[key]


def _erfc_handler(ctx: Any, node: Any, name: str, args: Any) -> Any:
    """tf2onnx handler: ``Erfc(x)`` -> ``1 - Erf(x)``."""
    from tf2onnx import utils

    node.type = "Erf"
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(node.input[0]))
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
    sub = ctx.insert_new_node_on_output("Sub", node.output[0], name=utils.make_name(node.name))
    ctx.replace_inputs(sub, [one.output[0], node.output[0]])
    return sub


def convert_traced(
    traced: Traced, onnx_names: Sequence[str], nchw: Sequence[bool], opset: int, where: str
) -> onnx.ModelProto:
    """Convert ``traced`` to an ONNX ModelProto with the given input and output names.

    Raises:
        ConversionError: tf2onnx failed, or left TensorFlow ops it cannot convert (named).
    """
    import tensorflow as tf
    import tf2onnx

    if not logging.getLogger("onnxpipe").isEnabledFor(logging.DEBUG):
        # tf2onnx logs its failures with their tracebacks; the error below says what failed
        logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)
    try:
        graph_def, tf_inputs, tf_outputs = freeze(traced)
    except (ValueError, TypeError, tf.errors.OpError) as e:
        raise ConversionError(
            f"{where}: the model's variables cannot be frozen into constants "
            f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). A model that updates its "
            "variables when called (a stateful RNN, a layer that assigns in call) has no ONNX "
            "form: rebuild it stateless (stateful=False) and feed the state as inputs."
        ) from e
    rename = dict(zip(tf_inputs, onnx_names, strict=True))
    rename.update(zip(tf_outputs, traced.output_names, strict=True))
    as_nchw = [name for name, flag in zip(tf_inputs, nchw, strict=True) if flag]
    try:
        proto, _ = tf2onnx.convert.from_graph_def(
            graph_def,
            name="onnxpipe",
            input_names=tf_inputs,
            output_names=tf_outputs,
            opset=opset,
            custom_op_handlers={"Erfc": (_erfc_handler, [])},
            inputs_as_nchw=as_nchw or None,
            tensors_to_rename=rename,
        )
    except (
        ValueError,
        TypeError,
        KeyError,
        NotImplementedError,
        AssertionError,
        tf.errors.OpError,
    ) as e:
        raise ConversionError(
            f"{where}: tf2onnx could not convert the model ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300] if str(e) else ''}). Try another --opset (<= "
            f"{MAX_OPSET}), or simplify the layers around the failing op."
        ) from e
    unsupported = unsupported_ops(proto.graph)
    if unsupported:
        known = [_OP_ADVICE[op] for op in unsupported if op in _OP_ADVICE]
        advice = (
            " ".join(dict.fromkeys(known))
            if known
            else "Replace the layers that use them with other Keras layers, or try another "
            f"--opset (<= {MAX_OPSET}); ops missing in tf2onnx cannot be exported to ONNX by "
            "onnxpipe."
        )
        raise ConversionError(
            f"{where}: tf2onnx cannot convert these TensorFlow op(s): "
            f"{', '.join(unsupported)}. {advice}"
        )
    return proto


_LOOKUP = (
    "Preprocessing layers with tables (StringLookup, IntegerLookup, Hashing, TextVectorization) "
    "have no ONNX form here: run them outside the exported model (tf.data or the client) and "
    "export from the first numeric layer."
)
_OP_ADVICE = {
    "Bitcast": "Keras 3 computes keras.ops.argmax/argmin on floats through Bitcast (its -0.0 "
    "test), which tf2onnx cannot convert: use tf.math.argmax in the model, or take the argmax "
    "of the exported outputs.",
    "Bucketize": "Discretization (Bucketize) has no ONNX form here: bucket the values outside "
    "the exported model and export from the first numeric layer.",
    **dict.fromkeys(
        ("LookupTableFindV2", "LookupTableSizeV2", "HashTableV2", "MutableHashTableV2",
         "StringToHashBucketFast", "StaticRegexReplace", "StringLower", "StringSplitV2"),
        _LOOKUP,
    ),
}  # fmt: skip


def unsupported_ops(graph: onnx.GraphProto) -> list[str]:
    """The op types left in ``graph`` (and its subgraphs) that no known ONNX domain defines."""
    found: set[str] = set()
    for node in graph.node:
        if node.domain not in _KNOWN_DOMAINS:
            found.add(f"{node.domain}.{node.op_type}")
        elif node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            found.add(node.op_type)
        for attr in node.attribute:
            for sub in [attr.g] if attr.HasField("g") else list(attr.graphs):
                found.update(unsupported_ops(sub))
    return sorted(found)
