"""Static int8 on what must stay float: index math before an integer Cast, sentinel masks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.graphs.quantize_static import QuantizeStaticPass
from tests.helpers import ort_run

BUCKETS = 64


def _bucket_model() -> ir.Model:
    """T5's relative-position buckets in small: float log/div/mul on positions, Cast to int64.

    ``y = table[bucket] + x @ w``, ``bucket = int64(log(pos / 2) / log(64) * 32)`` (both
    outputs): the MatMul gives the quantizer something to quantize.
    """
    rng = np.random.default_rng(0)
    consts = {
        "two": np.array(2.0, np.float32),
        "log64": np.array(np.log(64.0), np.float32),
        "half": np.array(BUCKETS / 2, np.float32),
        "table": rng.normal(size=(BUCKETS, 8)).astype(np.float32),
        "w": rng.normal(scale=0.3, size=(8, 8)).astype(np.float32),
    }
    nodes = [
        helper.make_node("Cast", ["pos"], ["posf"], to=TensorProto.FLOAT, name="to_float"),
        helper.make_node("Div", ["posf", "two"], ["ratio"], name="ratio"),
        helper.make_node("Log", ["ratio"], ["log"], name="log"),
        helper.make_node("Div", ["log", "log64"], ["scaled"], name="scaled"),
        helper.make_node("Mul", ["scaled", "half"], ["bucketf"], name="bucketf"),
        helper.make_node("Cast", ["bucketf"], ["bucket"], to=TensorProto.INT64, name="bucket"),
        helper.make_node("Gather", ["table", "bucket"], ["bias"], name="bias"),
        helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"),
        helper.make_node("Add", ["xw", "bias"], ["y"], name="add"),
    ]
    graph = helper.make_graph(
        nodes, "buckets",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
         helper.make_tensor_value_info("pos", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8]),
         helper.make_tensor_value_info("bucket", TensorProto.INT64, ["n"])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def _bucket_feeds(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    # positions 2..4095: buckets 0..63
    return {
        "x": rng.uniform(-1, 1, size=(n, 8)).astype(np.float32),
        "pos": rng.integers(2, 4096, size=n).astype(np.int64),
    }


def test_static_keeps_float_index_math_before_an_integer_cast_float():
    model = _bucket_model()
    rng = np.random.default_rng(1)
    calib = [_bucket_feeds(rng, 64) for _ in range(4)]
    feeds = _bucket_feeds(rng, 256)
    _, buckets = ort_run(model, feeds)
    q = QuantizeStaticPass(calibration=calib)
    result = q(model).model
    _, got_buckets = ort_run(result, feeds)
    # quantized, the bucket math put 8 of 256 positions in a neighbouring bucket
    np.testing.assert_array_equal(got_buckets, buckets)
    assert q.metrics["float_index_math"] == ["bucketf", "log", "ratio", "scaled"]
    assert q.metrics["excluded_nodes"] == []
    assert q.metrics["quantize_nodes"] > 0  # the MatMul is still int8
    readers = {u.node.name for n in result.graph if n.op_type == "DequantizeLinear"
               for u in n.outputs[0].uses()}  # fmt: skip
    assert "mm" in readers and not readers & {"bucketf", "log", "ratio", "scaled"}
