"""Error-compensating (GPTQ) int8 weight rounding and cost-aware float fallbacks."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.graphs import quant_rounding as qr
from onnxpipe.graphs.quantize_static import QuantizeStaticPass
from onnxpipe.node_cost import Profile, fallback_order
from tests.helpers import matmul_model, ort_run


def _model(nodes, inits, x_shape, opset=17) -> ir.Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


@pytest.mark.parametrize(
    ("shape", "attrs"),
    [
        ((6, 4, 3, 3), {"pads": [1, 1, 1, 1], "strides": [2, 2]}),
        ((8, 1, 3, 3), {"group": 8, "pads": [1, 0, 1, 0]}),  # depthwise
        ((6, 2, 3, 3), {"group": 2, "dilations": [2, 2], "pads": [2, 2, 2, 2]}),
        ((5, 8, 1, 1), {}),
    ],
)
def test_im2col_rows_times_weights_is_the_conv(shape, attrs):
    rng = np.random.default_rng(0)
    w = rng.normal(size=shape).astype(np.float32)
    channels = shape[1] * attrs.get("group", 1)
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv", **attrs)
    model = _model([node], [numpy_helper.from_array(w, "w")], [None, channels, 9, 9])
    x = rng.normal(size=(2, channels, 9, 9)).astype(np.float32)
    want = ort_run(model, {"x": x})[0]  # [n, o, oh, ow]
    conv = next(iter(model.graph))
    rows = qr._rows(conv, x)  # [g, n*oh*ow, k]
    groups = rows.shape[0]
    wg = w.reshape(groups, shape[0] // groups, -1)
    got = np.einsum("gpk,gok->gop", rows, wg).reshape(shape[0], *want.shape[:1], -1)
    got = got.reshape(shape[0], want.shape[0], *want.shape[2:]).transpose(1, 0, 2, 3)
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_gptq_rounding_lowers_output_error_and_keeps_limits_and_pairs():
    rng = np.random.default_rng(1)
    k = 32
    mix = rng.normal(size=(k, k))
    x = rng.normal(size=(4096, k)) @ mix  # correlated inputs: where compensation pays
    w = rng.normal(size=(16, k))
    w[:, 0] *= 8  # an outlier column makes the per-row scale coarse for the rest
    hessian = (x.T @ x / len(x))[None]

    def error(q, scale):
        return np.linalg.norm(x @ (w - q * scale[:, None]).T)

    scale = np.abs(w).max(1) / 127
    nearest = np.clip(np.round(w / scale[:, None]), -127, 127)
    gptq = qr.gptq_round(w, scale, np.zeros(16), hessian, (-127, 127), paired=False)
    assert error(gptq, scale) < error(nearest, scale) * 0.85
    assert np.abs(gptq).max() <= 127
    assert np.array_equal(gptq, np.round(gptq))
    # With a pair-safe scale (quant_weights), compensation must not break the int16 bound.
    a = np.abs(w)
    safe = np.maximum(a.max(1), (a[:, 0::2] + a[:, 1::2]).max(1)) / 127
    nearest = np.round(w / safe[:, None])
    paired = qr.gptq_round(w, safe, np.zeros(16), hessian, (-127, 127), paired=True)
    assert (np.abs(paired[:, 0::2]) + np.abs(paired[:, 1::2])).max() <= 128
    assert error(paired, safe) < error(nearest, safe) * 0.85


def test_gptq_keeps_pruned_zeros_zero_and_still_compensates():
    """A magnitude-pruned MLP at 50% zeros came out of static int8 at 47-48%: GPTQ spread
    rounding errors onto the zeros."""
    rng = np.random.default_rng(4)
    k = 32
    x = rng.normal(size=(4096, k)) @ rng.normal(size=(k, k))
    w = rng.normal(size=(16, k))
    w[np.abs(w) < np.median(np.abs(w))] = 0.0  # half the weights pruned
    hessian = (x.T @ x / len(x))[None]
    scale = np.abs(w).max(1) / 127
    for order in (None, qr.act_order(hessian)):
        gptq = qr.gptq_round(w, scale, np.zeros(16), hessian, (-127, 127), False, order)
        assert (gptq[w == 0] == 0).all()
        nearest = np.clip(np.round(w / scale[:, None]), -127, 127)
        error = [np.linalg.norm(x @ (w - q * scale[:, None]).T) for q in (gptq, nearest)]
        assert error[0] < error[1] * 0.9, error
    # an asymmetric int4 block: zero sits at the zero point, which stays exactly 0 as float
    zp = np.full(16, 8.0)
    q4 = qr.gptq_round(w, np.abs(w).max(1) / 7, zp, hessian, (0, 15), False)
    assert (q4[w == 0] == 8).all()


def test_static_pass_with_gptq_rounding_is_closer_to_float_on_ort():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(16, 24, 1, 1)).astype(np.float32)
    w[:, 0] *= 10
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    inits = [numpy_helper.from_array(w, "w"),
             numpy_helper.from_array(np.zeros(16, np.float32), "b")]  # fmt: skip
    model = _model(nodes, inits, [None, 24, 6, 6])
    mix = rng.normal(size=(24, 24)).astype(np.float32)

    def sample(n):
        z = rng.normal(size=(n, 6, 6, 24)).astype(np.float32) @ mix
        return np.ascontiguousarray(z.transpose(0, 3, 1, 2))

    calib, x = sample(32), sample(16)
    want = ort_run(model, {"x": x})[0]
    rows = x.transpose(0, 2, 3, 1).reshape(-1, 24)
    errors, weight_errors, passes = {}, {}, {}
    for rounding in ("nearest", "gptq"):
        passes[rounding] = QuantizeStaticPass(
            calibration=[{"x": calib}], per_channel=True, rounding=rounding
        )
        q = passes[rounding](model).model
        errors[rounding] = float(np.sqrt(((ort_run(q, {"x": x})[0] - want) ** 2).mean()))
        dq = next(n for n in q.graph if n.outputs[0].uses()[0].node.op_type == "Conv"
                  and n.outputs[0].uses()[0].idx == 1)  # fmt: skip
        ints, scale = (v.const_value.numpy() for v in dq.inputs[:2])
        w_q = ints.reshape(16, 24) * scale[:, None]
        weight_errors[rounding] = np.linalg.norm(rows @ (w.reshape(16, 24) - w_q).T)
    # on held-out inputs: the layer's output error from weights alone, and on ORT's kernels
    assert weight_errors["gptq"] < weight_errors["nearest"] * 0.8
    assert errors["gptq"] < errors["nearest"]
    assert passes["gptq"].metrics["gptq_rounded_nodes"] == 1
    assert passes["nearest"].metrics["gptq_rounded_nodes"] == 0


def test_gptq_build_is_the_same_with_a_fresh_or_a_filled_statistics_cache(tmp_path, monkeypatch):
    # --auto's candidates read the Hessians cached by the first; a rebuild from the recorded
    # flags computes them afresh: both must round with the same numbers (float32 was cached
    # while a fresh build used float64, and a rebuilt EfficientNet-Lite0 lost a crop of top-1)
    import onnxpipe.graphs.quantize_static as qs  # noqa: PLC0415

    used: list[dict[str, np.ndarray]] = []

    def spy(result, model, hessians, limits):
        used.append(dict(hessians))
        return qr.round_weights(result, model, hessians, limits)

    monkeypatch.setattr(qs, "round_weights", spy)
    rng = np.random.default_rng(3)
    w = rng.normal(size=(16, 8, 1, 1)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["y"], name="conv")]
    model = _model(nodes, [numpy_helper.from_array(w, "w")], [None, 8, 4, 4])
    calib = rng.normal(size=(8, 8, 4, 4)).astype(np.float32) / 3

    def weights(cache):
        q = QuantizeStaticPass(calibration=[{"x": calib}], calibration_cache=cache)(model).model
        return {n: v.const_value.numpy() for n, v in q.graph.initializers.items()}

    fresh = weights(None)
    weights(tmp_path / "calib.json")  # fills the cache
    cached = weights(tmp_path / "calib.json")
    assert (tmp_path / "calib.hessians.npz").is_file()
    (h_fresh,), (h_cached,) = used[0].values(), used[2].values()
    assert h_fresh.dtype == h_cached.dtype
    np.testing.assert_array_equal(h_fresh, h_cached)
    assert fresh.keys() == cached.keys()
    for name, array in fresh.items():
        np.testing.assert_array_equal(array, cached[name], err_msg=name)


def test_calibration_methods_share_the_float_statistics(tmp_path, monkeypatch):
    # ranges are cached per method; Hessians and means do not depend on it: computed once
    import onnxpipe.graphs.quantize_static as qs  # noqa: PLC0415

    computed: list[str] = []
    for name in ("input_hessians", "input_means", "sample_means"):
        real = getattr(qs, name)
        monkeypatch.setattr(
            qs, name, lambda *a, _real=real, _name=name: computed.append(_name) or _real(*a)
        )
    rng = np.random.default_rng(6)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["y"], name="conv")]
    inits = [numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(8, np.float32), "b")]  # fmt: skip
    model = _model(nodes, inits, [None, 8, 4, 4])
    calib = [{"x": rng.normal(size=(16, 8, 4, 4)).astype(np.float32)}]
    stats = tmp_path / "float-statistics.json"
    for method in ("minmax", "percentile"):
        QuantizeStaticPass(
            calibration=calib,
            calibration_cache=tmp_path / f"calib-{method}.json",
            statistics_cache=stats,
            method=method,
        )(model)
    assert sorted(computed) == ["input_hessians", "input_means", "sample_means"]
    assert (tmp_path / "calib-minmax.json").is_file()
    assert (tmp_path / "calib-percentile.json").is_file()


def _chain(kernels: dict[str, int], extra: int) -> ir.Model:
    """x -> a -> b -> c -> Add(big slice) -> y: k x k convs on 4x8x8 tensors (256 elements)."""
    inits = [numpy_helper.from_array(np.ones((4, 4, k, k), np.float32), f"w{n}")
             for n, k in kernels.items()]  # fmt: skip
    inits.append(numpy_helper.from_array(np.ones((1, 4, 8, 8 * extra), np.float32), "big"))
    inits += [numpy_helper.from_array(np.array(v, np.int64), n)
              for n, v in (("st", [0]), ("en", [8]), ("ax", [3]))]  # fmt: skip
    src = {"a": "x", "b": "t1", "c": "t2"}
    nodes = [
        helper.make_node("Conv", [src[n], f"w{n}"], [{"a": "t1", "b": "t2", "c": "t3"}[n]],
                         name=n, pads=[k // 2] * 4)
        for n, k in kernels.items()
    ]  # fmt: skip
    nodes += [
        helper.make_node("Slice", ["big", "st", "en", "ax"], ["bs"], name="slice"),
        helper.make_node("Add", ["t3", "bs"], ["y"], name="add"),
    ]
    return _model(nodes, inits, [1, 4, 8, 8])


def test_fallback_order_takes_units_float_runs_faster_first_and_counts_boundaries():
    # Weights are a negligible share of the model here (``big``): time decides.
    model = _chain({"a": 1, "b": 1, "c": 1}, extra=10000)
    units = [("a",), ("b",), ("c",)]
    damage = {("a",): 0.001, ("b",): 0.01, ("c",): 0.002}
    # a: float saves 0.2 ms; b and c cost 0.1 ms more in float. Q costs 1e-4 ms/element.
    float_ms = Profile({"a": 0.3, "b": 0.3, "c": 0.3}, 0.0)
    int8_ms = Profile({"a": 0.5, "b": 0.2, "c": 0.2}, 1e-4)
    order = fallback_order(model, units, damage, float_ms, int8_ms)
    assert [u for u, _ in order] == [("a",), ("b",), ("c",)]
    costs = dict(order)
    # a: -0.2 kernel, closes the input boundary (-256), opens its output one (+256)
    assert costs[("a",)] == pytest.approx(-0.2)
    # b after a: +0.1 kernel, closes t1 (-256), opens t2 (+256)
    assert costs[("b",)] == pytest.approx(0.1)
    # c last: +0.1, closes t2 and the dequantize before the float Add
    assert costs[("c",)] == pytest.approx(0.1 - 2 * 256e-4)


def test_fallback_order_weighs_the_size_float_weights_add():
    # b and c: same damage, same time; c holds most of the model's weights.
    model = _chain({"a": 1, "b": 1, "c": 15}, extra=1)
    units = [("c",), ("b",)]  # c first: a tie on time alone would pick it
    damage = {("b",): 0.01, ("c",): 0.01}
    same = Profile({"a": 0.2, "b": 0.2, "c": 0.2}, 1e-4)
    order = fallback_order(model, units, damage, same, same)
    assert [u for u, _ in order] == [("b",), ("c",)]


def test_profiles_attribute_fused_kernel_times_to_the_original_nodes(tmp_path):
    from onnxpipe.node_cost import profile, weight_owners

    rng = np.random.default_rng(4)
    nodes = [
        helper.make_node("Conv", ["x", "w0", "b0"], ["a"], name="c0", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w1", "b1"], ["y"], name="c1"),
    ]
    inits = [numpy_helper.from_array(rng.normal(size=s).astype(np.float32), n)
             for n, s in (("w0", (12, 3, 3, 3)), ("b0", (12,)), ("w1", (8, 12, 1, 1)),
                          ("b1", (8,)))]  # fmt: skip
    # 12 channels: ORT's NCHWc transformer pads the conv to its SIMD block and renames both
    # weight and bias (reorder_*), so the kernel is traced by the tensor it is named after
    model = _model(nodes, inits, [None, 3, 16, 16])
    feeds = {"x": rng.normal(size=(1, 3, 16, 16)).astype(np.float32)}
    int8 = QuantizeStaticPass(calibration=[{"x": feeds["x"]}])(model).model
    owners = weight_owners(model, {"c0", "c1", "relu"})
    assert owners == {"w0": "c0", "b0": "c0", "w1": "c1", "b1": "c1"}
    for name, m in (("float", model), ("int8", int8)):
        path = tmp_path / name / "model.onnx"
        path.parent.mkdir()
        ir.save(m, path)
        measured = profile(path, feeds, owners, tmp_path / f"profile-{name}")
        assert set(measured.node_ms) == {"c0", "c1"}  # Relu is fused into c0's kernel
        assert all(ms > 0 for ms in measured.node_ms.values())
        assert (measured.quantize_ms_per_element > 0) == (name == "int8")


def test_gptq_lazy_block_updates_equal_column_by_column(monkeypatch):
    rng = np.random.default_rng(5)
    x = rng.normal(size=(512, 40)) @ rng.normal(size=(40, 40))
    w, hessian = rng.normal(size=(6, 40)), (x.T @ x / 512)[None]
    scale = np.abs(w).max(1) / 127
    results = []
    for block in (40, 7):
        monkeypatch.setattr(qr, "BLOCK", block)
        results.append(qr.gptq_round(w, scale, np.zeros(6), hessian, (-127, 127), paired=True))
    np.testing.assert_array_equal(results[0], results[1])


def test_gptq_rounds_an_all_zero_row_with_scale_zero_to_zero():
    rng = np.random.default_rng(6)
    x = rng.normal(size=(256, 8))
    w = rng.normal(size=(3, 8))
    w[1] = 0.0
    scale = np.abs(w).max(1) / 127  # 0 for the zero row
    q = qr.gptq_round(w, scale, np.zeros(3), (x.T @ x / 256)[None], (-127, 127), paired=False)
    assert np.isfinite(q).all() and not q[1].any()


def _blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric 4-bit scale and zero point per block of ``block`` weights along K."""
    parts = w.reshape(w.shape[0], -1, block)
    lo, hi = np.minimum(parts.min(2), 0), np.maximum(parts.max(2), 0)
    scale = (hi - lo) / 15
    zero = np.clip(np.round(-lo / scale), 0, 15)
    return np.repeat(scale, block, 1), np.repeat(zero, block, 1)


def test_gptq_rounds_int4_blocks_to_lower_output_error_in_range():
    from sklearn.datasets import load_digits  # noqa: PLC0415

    x = load_digits().data / 16.0  # real, correlated inputs: 1797 images x 64 pixels
    rng = np.random.default_rng(3)
    w = rng.normal(size=(24, 64))
    scale, zero = _blocks(w, 16)
    hessian = (x.T @ x / len(x))[None]

    def error(q):
        return np.linalg.norm(x @ (w - (q - zero) * scale).T)

    nearest = np.clip(np.round(w / scale) + zero, 0, 15)
    gptq = qr.gptq_round(w, scale, zero, hessian, (0, 15), paired=False)
    ordered = qr.gptq_round(w, scale, zero, hessian, (0, 15), False, qr.act_order(hessian))
    for q in (gptq, ordered):
        assert q.min() >= 0 and q.max() <= 15 and np.array_equal(q, np.round(q))
        assert error(q) < error(nearest) * 0.7, (error(q), error(nearest))
    # uncorrelated inputs leave nothing to compensate: GPTQ is rounding to nearest
    diagonal = np.diag(np.diag(hessian[0]))[None]
    assert np.array_equal(qr.gptq_round(w, scale, zero, diagonal, (0, 15), False), nearest)
    with pytest.raises(ValueError, match="pairs"):
        qr.gptq_round(w, scale, zero, hessian, (0, 15), True, qr.act_order(hessian))


def test_input_hessians_leave_padded_tokens_out():
    rng = np.random.default_rng(4)
    w = rng.normal(size=(8, 4)).astype(np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, None, 8])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [None, None])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "m")]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
         helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT)],
        "g", [x, mask], outs, [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    tokens = rng.normal(size=(2, 5, 8)).astype(np.float32)
    attention = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], np.int64)
    tokens[attention == 0] = 100.0  # padding that would dominate H if it were counted
    feeds = [{"x": tokens, "attention_mask": attention}]
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    (h,) = qr.input_hessians(model, feeds, matmuls).values()
    real = tokens[attention == 1]
    np.testing.assert_allclose(h[0], real.T @ real / len(real), rtol=1e-5)


def _digits_matmul() -> tuple[ir.Model, np.ndarray, np.ndarray]:
    """A 64 -> 32 MatMul, and real inputs for it: digit images, calibration and held out."""
    from sklearn.datasets import load_digits  # noqa: PLC0415

    x = (load_digits().data / 16.0).astype(np.float32)
    w = np.random.default_rng(5).normal(size=(64, 32)).astype(np.float32)
    model = matmul_model(w)
    return model, x[:900], x[900:]


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_pass_with_calibration_rounds_by_gptq_closer_to_float_on_ort(symmetric):
    from onnxpipe.graphs.quantize_int4 import QuantizeInt4Pass, _pack, _unpack  # noqa: PLC0415

    model, calib, held_out = _digits_matmul()
    want = ort_run(model, {"x": held_out})[0]
    errors, passes = {}, {}
    for rounding in ("gptq", "nearest"):
        # symmetric: no zero points (8 implied) and negative scales (ORT maps the largest
        # magnitude to -8); measured 0.135 vs 0.276, asymmetric 0.125 vs 0.261
        passes[rounding] = QuantizeInt4Pass(
            rounding=rounding, block_size=16, symmetric=symmetric, calibration=[{"x": calib}]
        )
        result = passes[rounding](model).model
        assert [n.op_type for n in result.graph] == ["MatMulNBits"]
        got = ort_run(result, {"x": held_out})[0]
        errors[rounding] = float(np.sqrt(((got - want) ** 2).mean()))
    # held-out images, ORT's MatMulNBits kernel (int8 activations included)
    assert errors["gptq"] < errors["nearest"] * 0.75, errors
    assert passes["gptq"].metrics["gptq_rounded_nodes"] == 1
    assert passes["gptq"].metrics["rounding"] == "gptq"
    assert passes["nearest"].metrics["gptq_rounded_nodes"] == 0
    # no calibration data: to nearest, and the metrics say so
    plain = QuantizeInt4Pass(block_size=16)
    plain(model)
    assert plain.metrics["rounding"] == "nearest"
    assert plain.metrics["gptq_rounded_nodes"] == 0
    packed = np.arange(256, dtype=np.uint8).reshape(4, 64)
    assert np.array_equal(_pack(_unpack(packed)), packed)


@pytest.mark.parametrize(
    ("first_passing", "tried", "found"),
    [
        (5, [1, 2, 3, 4, 6, 5], 5),  # grows 1, 2, 3, 4, 6, then bisects back to 5
        (10, [1, 2, 3, 4, 6, 9, 14, 11, 10], 10),
        (1, [1], 1),
        (40, [1, 2, 3, 4, 6, 9, 14, 21], None),  # nothing up to the limit (24) passes
    ],
)
def test_fewest_passing_grows_then_bisects_to_the_fewest_float_units(first_passing, tried, found):
    from onnxpipe.quant_fallback import fewest_passing  # noqa: PLC0415

    calls: list[int] = []

    def passes(count: int) -> bool:
        calls.append(count)
        return count >= first_passing

    assert fewest_passing(24, passes) == found
    assert calls == tried


def test_int4_gptq_statistics_shared_per_input_and_batched_to_a_memory_budget(monkeypatch):
    import onnxpipe.graphs.quantize_int4 as int4  # noqa: PLC0415

    rng = np.random.default_rng(6)
    # q and k read x (one statistic), o reads their sum: a transformer's shape in miniature
    inits = [numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), n)
             for n in ("wq", "wk", "wo")]  # fmt: skip
    nodes = [helper.make_node("MatMul", ["x", "wq"], ["q"], name="q"),
             helper.make_node("MatMul", ["x", "wk"], ["k"], name="k"),
             helper.make_node("Add", ["q", "k"], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "wo"], ["y"], name="o")]  # fmt: skip
    model = _model(nodes, inits, ["n", 64])
    x = rng.normal(size=(256, 64)).astype(np.float32) @ rng.normal(size=(64, 64)).astype("f")
    matmuls = [n for n in model.graph if n.op_type == "MatMul"]
    h = qr.input_hessians(model, [{"x": x}], matmuls)
    assert h["q"] is h["k"] and h["o"] is not h["q"]
    results = []
    for budget in (1 << 30, 1):  # all at once; one MatMul per pass over the data
        monkeypatch.setattr(int4, "HESSIAN_BYTES", budget)
        if budget == 1:
            assert [len(b) for b in int4._within_budget(matmuls)] == [1, 1, 1]
        else:
            assert [len(b) for b in int4._within_budget(matmuls)] == [3]
        result = int4.QuantizeInt4Pass(block_size=16, calibration=[{"x": x}])(model).model
        assert sum(n.op_type == "MatMulNBits" for n in result.graph) == 3
        results.append(ort_run(result, {"x": x[:8]})[0])
    np.testing.assert_array_equal(results[0], results[1])
