"""Static int8 on what must stay float: index math before an integer Cast, sentinel masks."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.graphs.quant_sentinels import drop_sentinel_qdq
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


def _masked_attention() -> ir.Model:
    """``softmax(x * a + (1 - mask) * float32 min) * b``: a BERT/T5-style additive mask.

    Elementwise, not MatMul: ORT's u8s8 MatMul on x86 without VNNI saturates int16 pairs
    (0.4 off here), which this test is not about.
    """
    rng = np.random.default_rng(0)
    consts = {
        "one": np.array(1.0, np.float32),
        "fmin": np.array(np.finfo(np.float32).min, np.float32),
        "a": rng.uniform(0.5, 1.5, size=8).astype(np.float32),
        "b": rng.uniform(0.5, 1.5, size=8).astype(np.float32),
    }
    nodes = [
        helper.make_node("Cast", ["mask"], ["maskf"], to=TensorProto.FLOAT, name="maskf"),
        helper.make_node("Sub", ["one", "maskf"], ["inv"], name="inv"),
        helper.make_node("Mul", ["inv", "fmin"], ["ext"], name="ext"),
        helper.make_node("Mul", ["x", "a"], ["scores"], name="scores"),
        helper.make_node("Add", ["scores", "ext"], ["masked"], name="masked"),
        helper.make_node("Softmax", ["masked"], ["probs"], axis=-1, name="probs"),
        helper.make_node("Mul", ["probs", "b"], ["y"], name="y"),
    ]
    graph = helper.make_graph(
        nodes, "masked",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8]),
         helper.make_tensor_value_info("mask", TensorProto.INT64, ["n", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])],
        [numpy_helper.from_array(v, k) for k, v in consts.items()],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(proto)


def _masked_feeds(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    mask = (rng.random((n, 8)) < 0.7).astype(np.int64)
    mask[:, 0] = 1
    return {"x": rng.uniform(-2, 2, size=(n, 8)).astype(np.float32), "mask": mask}


def test_static_leaves_sentinel_masks_float():
    model = _masked_attention()
    rng = np.random.default_rng(1)
    calib = [_masked_feeds(rng, 64) for _ in range(4)]
    feeds = calib[0]  # inside the calibrated ranges: no clipping, only the mask's damage
    (want,) = ort_run(model, feeds)
    q = QuantizeStaticPass(calibration=calib)
    result = q(model).model
    (got,) = ort_run(result, feeds)
    # with the mask's range (-3.4e38) every score quantized to one step of 1.3e36, i.e. 0:
    # the softmax went uniform over the kept positions, y off by 0.72
    assert np.abs(got - want).max() < 0.1, np.abs(got - want).max()
    scales = [
        n.inputs[1].const_value.numpy() for n in result.graph if n.op_type == "QuantizeLinear"
    ]
    assert scales and all(np.isfinite(s).all() and s.max() < 1e28 for s in scales)
    assert q.metrics["float_sentinel_ranges"] == 2  # the mask and the masked scores
    assert q.metrics["quantize_nodes"] > 0


def test_drop_sentinel_qdq_keeps_a_graph_output_name():
    # an infinite scale (a -inf range) on a tensor that is also the graph's output
    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("QuantizeLinear", ["r", "s", "zp"], ["rq"], name="q"),
        helper.make_node("DequantizeLinear", ["rq", "s", "zp"], ["y"], name="dq"),
    ]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
        [numpy_helper.from_array(np.array(np.inf, np.float32), "s"),
         numpy_helper.from_array(np.array(0, np.uint8), "zp")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    assert drop_sentinel_qdq(model) == ["r"]
    assert [n.op_type for n in model.graph] == ["Relu", "Identity"]
    assert [v.name for v in model.graph.outputs] == ["y"]
    assert not model.graph.initializers  # scale and zero point went with the pair
    x = np.array([-1.0, 0.0, 2.5, 1e30], np.float32)
    np.testing.assert_array_equal(ort_run(model, {"x": x})[0], np.maximum(x, 0))
