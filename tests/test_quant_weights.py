"""Saturation-safe int8 weight ranges and bias correction, on tiny graphs run by ORT's kernels."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.graphs.quant_utils import has_vnni, is_x86
from onnxpipe.graphs.quant_weights import saturation_safe_ranges
from onnxpipe.graphs.quantize_static import QuantizeStaticPass
from tests.helpers import ort_run


def _conv_model(weight: np.ndarray, group: int = 1, gemm: np.ndarray | None = None) -> ir.Model:
    out_ch = weight.shape[0]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv", group=group)]
    bias = np.zeros(out_ch, np.float32)
    inits = [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
    output = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    if gemm is not None:
        nodes += [
            helper.make_node("Flatten", ["y"], ["f"], name="flatten"),
            helper.make_node("Gemm", ["f", "g", "gb"], ["z"], name="gemm", transB=1),
        ]
        inits += [numpy_helper.from_array(gemm, "g"),
                  numpy_helper.from_array(np.zeros(gemm.shape[0], np.float32), "gb")]  # fmt: skip
        output = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, weight.shape[1] * group, 4, 4])
    graph = helper.make_graph(nodes, "g", [x], [output], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def test_ranges_bound_neighbouring_pairs_and_leave_depthwise_alone():
    w = np.zeros((2, 4, 1, 1), np.float32)
    w[0, :, 0, 0] = [1.0, 1.0, 0.1, 0.1]  # the two largest are neighbours: 7 bits
    w[1, :, 0, 0] = [1.0, 0.1, 1.0, 0.1]  # they are not: the plain 8-bit range
    gemm = np.ones((3, 2 * 16), np.float32)
    ranges = saturation_safe_ranges(_conv_model(w, gemm=gemm))
    assert ranges["w"][0] == 0
    np.testing.assert_allclose(ranges["w"][1], [2.0, 1.1], rtol=1e-6)
    assert ranges["g"] == (0, [2.0, 2.0, 2.0])
    depthwise = _conv_model(np.ones((4, 1, 3, 3), np.float32), group=4)
    assert saturation_safe_ranges(depthwise) == {}
    spatial = _conv_model(np.ones((2, 3, 3, 3), np.float32))  # k order unknown: 7 bits
    np.testing.assert_allclose(saturation_safe_ranges(spatial)["w"][1], [127 / 64] * 2)


def _quantize(model: ir.Model, calib: np.ndarray, **settings) -> ir.Model:
    feeds = [{"x": calib}]
    return QuantizeStaticPass(calibration=feeds, per_channel=True, **settings)(model).model


def test_saturation_safe_weights_run_exactly_on_int8_kernels():
    # Large activations times neighbouring full-scale weights overflow int16 in U8S8 GEMMs
    # without VNNI; the bounded ranges must give the float result on any CPU.
    rng = np.random.default_rng(0)
    w = rng.uniform(0.8, 1.0, (8, 64, 1, 1)).astype(np.float32)
    model = _conv_model(w)
    calib = rng.uniform(4, 6, (16, 64, 4, 4)).astype(np.float32)
    x = rng.uniform(4, 6, (4, 64, 4, 4)).astype(np.float32)
    want = ort_run(model, {"x": x})[0]
    safe = _quantize(
        model, calib, saturation_safe=True, bias_correction=False, empirical_bias=False
    )
    error = np.abs(ort_run(safe, {"x": x})[0] - want).max() / np.abs(want).max()
    assert error < 0.01
    plain = _quantize(
        model, calib, saturation_safe=False, bias_correction=False, empirical_bias=False
    )
    plain_error = np.abs(ort_run(plain, {"x": x})[0] - want).max() / np.abs(want).max()
    if is_x86() and not has_vnni():
        assert plain_error > 0.2  # saturated
    elif is_x86():
        # VNNI sums u8*s8 products in int32: full 8-bit weights are exact, so the default
        # (saturation_safe unset) leaves them unbounded there
        assert plain_error < 0.01
        default = QuantizeStaticPass(calibration=[{"x": calib}], per_channel=True)
        default(model)
        assert default.metrics["vnni"] and not default.metrics["saturation_safe_weights"]


def test_bias_correction_removes_the_mean_shift_of_rounded_weights():
    # Depthwise 3x3: one full-scale weight and eight that all round up by 0.4 steps, so the
    # rounded channel sums 3.2 steps too much; inputs average 3, so outputs shift by ~0.075.
    step = 1 / 127
    w = np.full((16, 1, 3, 3), 0.6 * step, np.float32)
    w[:, 0, 1, 1] = 1.0
    model = _conv_model(w, group=16)
    rng = np.random.default_rng(1)
    calib = rng.uniform(0, 6, (32, 16, 4, 4)).astype(np.float32)
    x = rng.uniform(0, 6, (32, 16, 4, 4)).astype(np.float32)
    want = ort_run(model, {"x": x})[0]
    shifts = {}
    for corrected in (False, True):
        q = _quantize(
            model, calib, bias_correction=corrected, rounding="nearest", empirical_bias=False
        )
        shifts[corrected] = float(np.abs((ort_run(q, {"x": x})[0] - want).mean((0, 2, 3))).max())
    assert shifts[False] > 0.05
    assert shifts[True] < shifts[False] / 4


@pytest.mark.parametrize("per_channel", [True, False])
def test_bias_correction_metrics_count_the_corrected_nodes(per_channel):
    rng = np.random.default_rng(2)
    model = _conv_model(rng.normal(size=(4, 3, 1, 1)).astype(np.float32))
    feeds = [{"x": rng.normal(size=(8, 3, 4, 4)).astype(np.float32)}]
    q = QuantizeStaticPass(calibration=feeds, per_channel=per_channel, saturation_safe=True)
    q(model)
    assert q.metrics["bias_corrected_nodes"] == 1
    assert q.metrics["saturation_safe_weights"] is True


def test_fallback_units_keep_a_conv_with_the_activation_it_feeds_alone():
    from onnxpipe.quant_fallback import fallback_units

    w = numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["a"], name="c1"),
        helper.make_node("Clip", ["a"], ["b"], name="clip1"),
        helper.make_node("Conv", ["b", "w"], ["c"], name="c2"),  # two consumers: no unit
        helper.make_node("Relu", ["c"], ["d"], name="relu2"),
        helper.make_node("Add", ["c", "d"], ["y"], name="add"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w]))
    model = ir.serde.deserialize_model(proto)
    units = fallback_units(model, {"Conv", "Clip", "Relu"}, set())
    assert units == [("c1", "clip1"), ("c2",), ("relu2",)]
    assert fallback_units(model, {"Conv", "Clip", "Relu"}, {"clip1"})[0] == ("c1",)


def test_nodes_kept_in_float_stay_float_under_ort_optimizations(tmp_path):
    # Between quantized neighbours, ORT would quantize a float Conv's weights per tensor at
    # session start (WeightBiasQuantization) and fuse it into a QLinearConv.
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    nodes, inits = [], []
    for i, (src, dst) in enumerate([("x", "a"), ("a", "c"), ("c", "y")]):
        nodes.append(helper.make_node("Conv", [src, f"w{i}", f"b{i}"], [dst], name=f"c{i}"))
        w, b = rng.normal(size=(4, 4, 1, 1)), rng.normal(size=4)
        inits += [numpy_helper.from_array(w.astype(np.float32), f"w{i}"),
                  numpy_helper.from_array(b.astype(np.float32), f"b{i}")]  # fmt: skip
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4, 4, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    proto = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model = ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))
    feeds = {"x": rng.normal(size=(8, 4, 4, 4)).astype(np.float32)}
    graph_pass = QuantizeStaticPass(calibration=[feeds], per_channel=True, exclude=("c1",))
    quantized = ir.serde.serialize_model(graph_pass(model).model).SerializeToString()
    assert graph_pass.metrics["float_weight_nodes"] == ["c1"]
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    real = ort.InferenceSession(quantized, options, providers=["CPUExecutionProvider"])
    ops = [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]
    assert ops.count("QLinearConv") == 2 and ops.count("Conv") == 1, ops
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    simulated = ort.InferenceSession(quantized, options, providers=["CPUExecutionProvider"])
    want = simulated.run(None, feeds)[0]
    np.testing.assert_allclose(real.run(None, feeds)[0], want, atol=0.02 * np.abs(want).max())


def test_integer_limits_follow_the_saturation_safe_layout():
    from onnxpipe.graphs.quant_weights import integer_limits

    def conv(shape, group=1):
        return next(iter(_conv_model(np.ones(shape, np.float32), group=group).graph))

    pointwise, spatial = conv((4, 8, 1, 1)), conv((4, 8, 3, 3))
    depthwise = conv((8, 1, 3, 3), group=8)
    assert integer_limits(pointwise, (4, 8, 1, 1), True, False) == ((-127, 127), True)
    assert integer_limits(spatial, (4, 8, 3, 3), True, False) == ((-64, 64), False)
    assert integer_limits(depthwise, (8, 1, 3, 3), True, False) == ((-127, 127), False)
    assert integer_limits(spatial, (4, 8, 3, 3), False, False) == ((-127, 127), False)
    assert integer_limits(pointwise, (4, 8, 1, 1), True, True) == ((-64, 64), False)


@pytest.mark.parametrize("reshaped", [False, True])
def test_a_final_softmax_stays_float(reshaped):
    """ORT's fixed 1/256 softmax scale zeroes a 1000-class model's small probabilities; a
    Reshape after the Softmax (EfficientNet's [N, 1000, 1, 1] head) leaves it final."""
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((1000, 32)) * 0.1).astype(np.float32)
    nodes = [
        helper.make_node("Gemm", ["x", "w"], ["logits"], name="fc", transB=1),
        helper.make_node(
            "Softmax", ["logits"], ["p" if reshaped else "prob"], name="softmax", axis=1
        ),
    ]
    out_shape: list = ["n", 1000]
    if reshaped:
        nodes.append(helper.make_node("Reshape", ["p", "shape"], ["prob"]))  # unnamed, as the
        # opset upgrade of the zoo's SqueezeNet writes it
        out_shape = ["n", 1000, 1, 1]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, out_shape)],
        [numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([-1, 1000, 1, 1], np.int64), "shape")],
    )  # fmt: skip
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = rng.standard_normal((16, 32)).astype(np.float32)
    q = QuantizeStaticPass(calibration=[{"x": x}], empirical_bias=False)
    result = q(model).model
    expected = ["softmax", "Reshape_float_output_1"] if reshaped else ["softmax"]
    assert q.metrics["float_output_softmax"] == expected
    softmax = next(n for n in result.graph if n.op_type == "Softmax")
    assert all(u.node.op_type != "QuantizeLinear" for u in softmax.outputs[0].uses())
    got, want = ort_run(result, {"x": x})[0], ort_run(model, {"x": x})[0]
    assert (got > 0).all()  # every class keeps its probability
    assert np.abs(got - want).max() < 2e-4


def test_an_exclude_entry_that_names_a_node_and_an_op_type_excludes_both():
    """ORT's pre-processing names a BERT node 'Gather': --exclude Gather kept only that one."""
    from onnxpipe.graphs.quant_exclude import split_exclude

    table = numpy_helper.from_array(np.ones((10, 4), np.float32), "table")
    graph = helper.make_graph(
        [
            helper.make_node("Gather", ["table", "ids"], ["a"], name="Gather"),
            helper.make_node("Gather", ["table", "ids"], ["b"], name="Gather_1"),
            helper.make_node("Add", ["a", "b"], ["y"], name="add"),
        ],
        "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        [table],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    nodes, op_types = split_exclude(model, ["Gather", "add"], "quantize")
    assert nodes == ["Gather", "add"] and op_types == {"Gather"}
