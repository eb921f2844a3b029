"""Empirical bias correction: output mean shifts measured on calibration data, run by ORT."""

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.graphs.empirical_bias import measured_tensors
from onnxpipe.graphs.quantize_static import QuantizeStaticPass
from tests.helpers import ort_run

C = 8


def _two_convs(rng: np.random.Generator) -> ir.Model:
    """x -> Conv -> Relu -> Conv -> y, positive 1x1 weights so rounding shifts add up."""
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2"),
    ]
    inits = [
        numpy_helper.from_array(rng.uniform(0.5, 1, (C, C, 1, 1)).astype(np.float32) / C, name)
        for name in ("w1", "w2")
    ] + [numpy_helper.from_array(np.zeros(C, np.float32), name) for name in ("b1", "b2")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _inputs(rng: np.random.Generator, n: int) -> np.ndarray:
    # Mostly tiny positive values and one outlier per image: the int8 step (6/255) is
    # coarse next to them, so rounding them to the grid shifts their mean (not noise).
    x = rng.exponential(0.01, (n, C, 8, 8)).astype(np.float32)
    x[:, :, 0, 0] = 6.0
    return x


def test_empirical_correction_removes_the_mean_shift_of_quantized_activations():
    rng = np.random.default_rng(0)
    model = _two_convs(rng)
    calib, x = _inputs(rng, 16), _inputs(rng, 32)  # measured on other samples
    want = ort_run(model, {"x": x})[0]
    shifts, counts = {}, {}
    for empirical in (False, True):
        q = QuantizeStaticPass(calibration=[{"x": calib}], empirical_bias=empirical)
        got = ort_run(q(model).model, {"x": x})[0]
        shifts[empirical] = float(np.abs((got - want).mean((0, 2, 3))).max())
        counts[empirical] = q.metrics["empirical_bias_nodes"]
    # analytic (weight) bias correction ran in both; only the measured one sees activations
    assert counts == {False: 0, True: 2}
    assert shifts[True] < shifts[False] / 1.8, shifts


def test_measured_tensors_pair_each_layer_with_its_float_tensor():
    rng = np.random.default_rng(1)
    model = _two_convs(rng)
    q = QuantizeStaticPass(calibration=[{"x": _inputs(rng, 4)}], empirical_bias=False)
    targets = measured_tensors(q(model).model, model)
    # conv1's Relu is folded into its Q/DQ pair: compared with the float Relu output "r";
    # conv2's output is the graph output "y", which the quantizer's last DQ produces
    assert [(t.node.name, t.reference) for t in targets] == [("conv1", "r"), ("conv2", "y")]
    assert all(t.scale.shape == (C,) for t in targets)  # per-channel bias scales


def test_a_layer_feeding_a_float_node_is_measured_after_its_q_dq_pair():
    # conv1 + Relu feed conv2 (kept in float: its own DequantizeLinear) and conv3 (int8), so
    # conv1's Q has two DQs. Its raw output carries the Relu's name (folded) but is the
    # unclipped pre-activation: measured there, the "shift" was the Relu itself (on
    # EfficientNet-Lite0 with 36 float nodes, top-1 0.95 -> 0.12).
    rng = np.random.default_rng(2)
    weights = {f"w{i}": rng.normal(0, 0.5, (C, C, 1, 1)).astype(np.float32) for i in (1, 2, 3)}
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["a"], name="conv1"),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2", "b2"], ["c2"], name="conv2"),
        helper.make_node("Conv", ["r", "w3", "b3"], ["c3"], name="conv3"),
        helper.make_node("Add", ["c2", "c3"], ["y"], name="add"),
    ]
    inits = [numpy_helper.from_array(w, k) for k, w in weights.items()] + [
        numpy_helper.from_array(np.full(C, -0.5, np.float32), f"b{i}") for i in (1, 2, 3)
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, C, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits,
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    calib = rng.normal(0, 1, (16, C, 8, 8)).astype(np.float32)
    x = rng.normal(0, 1, (16, C, 8, 8)).astype(np.float32)
    want = ort_run(model, {"x": x})[0]
    errors = {}
    for empirical in (False, True):
        q = QuantizeStaticPass(
            calibration=[{"x": calib}], exclude=("conv2",), empirical_bias=empirical
        )(model).model
        if not empirical:
            conv1 = next(t for t in measured_tensors(q, model) if t.node.name == "conv1")
            assert conv1.reference == "r" and conv1.quantized != "r"
        errors[empirical] = float(np.abs(ort_run(q, {"x": x})[0] - want).mean())
    assert errors[True] <= errors[False] * 1.1, errors
