"""SmoothQuant before dynamic int8: same float function, smaller int8 error on outliers."""

import json

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from onnxpipe.graphs.quantize_dynamic import QuantizeDynamicPass
from onnxpipe.graphs.smooth_quant import smooth_model
from tests.helpers import ort_run


def _matmul_model(rng) -> ir.Model:
    """x[.., 64] -> MatMul(64x48) -> Relu -> MatMul(48x32), weights of one scale."""
    w1 = rng.normal(size=(64, 48)).astype(np.float32) / 8
    w2 = rng.normal(size=(48, 32)).astype(np.float32) / 7
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
        helper.make_node("Relu", ["h"], ["r"], name="relu"),
        helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 5, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")]
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _inputs(rng, n):
    x = rng.normal(size=(n, 5, 64)).astype(np.float32)
    x[..., 3] *= 40  # one outlier channel, as in transformer activations
    return x


def test_smoothing_keeps_the_float_function(tmp_path):
    rng = np.random.default_rng(0)
    model = _matmul_model(rng)
    src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
    ir.save(model, src)
    done = smooth_model(src, out, [{"x": _inputs(rng, 16)}], alpha=0.7)
    assert done["smoothed_nodes"] == 2
    smoothed = onnx.load(str(out))
    assert [n.op_type for n in smoothed.graph.node] == ["Mul", "MatMul", "Relu", "Mul", "MatMul"]
    x = _inputs(rng, 4)
    np.testing.assert_allclose(
        ort_run(out, {"x": x})[0], ort_run(src, {"x": x})[0], rtol=1e-4, atol=1e-4
    )


def _attention_model(rng, qkv_sizes: list[int] | None) -> onnx.ModelProto:
    """x[1, 6, 32] -> com.microsoft Attention (4 heads) -> MatMul(v x 24), as optimize fuses."""
    q, k, v = qkv_sizes or (32, 32, 32)
    attrs = {"num_heads": 4, **({"qkv_hidden_sizes": qkv_sizes} if qkv_sizes else {})}
    nodes = [
        helper.make_node("Attention", ["x", "wqkv", "bqkv"], ["a"], name="att",
                         domain="com.microsoft", **attrs),
        helper.make_node("MatMul", ["a", "wo"], ["y"], name="out"),
    ]  # fmt: skip
    inits = [
        numpy_helper.from_array(rng.normal(size=(32, q + k + v)).astype(np.float32) / 6, "wqkv"),
        numpy_helper.from_array(rng.normal(size=(q + k + v,)).astype(np.float32), "bqkv"),
        numpy_helper.from_array(rng.normal(size=(v, 24)).astype(np.float32) / 5, "wo"),
    ]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 32])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 24])
    graph = helper.make_graph(nodes, "g", [x], [y], inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def test_smoothing_behind_attention_goes_into_the_v_columns(tmp_path):
    """The MatMul reading a fused Attention is smoothed without a Mul, same float function."""
    rng = np.random.default_rng(2)
    for sizes in (None, [32, 32, 16]):
        src, out = tmp_path / "in.onnx", tmp_path / "out.onnx"
        onnx.save(_attention_model(rng, sizes), src)
        x = rng.normal(size=(1, 6, 32)).astype(np.float32)
        x[..., 5] *= 30
        done = smooth_model(src, out, [{"x": x}], alpha=0.7)
        assert done["smoothed_nodes"] == 2 and done["folded_into_attention"] == 1, sizes
        smoothed = onnx.load(str(out))
        assert [n.op_type for n in smoothed.graph.node] == ["Mul", "Attention", "MatMul"]
        # no Mul before "out": only the rescaled V columns and bias keep the function
        np.testing.assert_allclose(
            ort_run(out, {"x": x})[0], ort_run(src, {"x": x})[0], rtol=1e-4, atol=1e-4
        )


def _dense_model(rng, trans_b: int) -> onnx.ModelProto:
    """x[batch, 64] -> Dense -> Relu -> Dense, as tf2onnx writes Keras ``Dense`` layers.

    With ``trans_b`` 0 each layer is MatMul + Add (cleanup fuses them into a Gemm); with 1 it
    is a Gemm with ``transB=1`` weights ([out, in]).
    """
    w1 = rng.normal(size=(64, 48)).astype(np.float32) / 8
    w2 = rng.normal(size=(48, 32)).astype(np.float32) / 7
    inits = [numpy_helper.from_array(w.T.copy() if trans_b else w, f"w{i}")
             for i, w in enumerate((w1, w2))]  # fmt: skip
    inits += [numpy_helper.from_array(np.full(n, 0.1, np.float32), f"b{i}")
              for i, n in enumerate((48, 32))]  # fmt: skip

    def dense(i: int, x: str, y: str) -> list[onnx.NodeProto]:
        if trans_b:
            return [helper.make_node("Gemm", [x, f"w{i}", f"b{i}"], [y], transB=1)]
        return [helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]),
                helper.make_node("Add", [f"m{i}", f"b{i}"], [y])]  # fmt: skip

    nodes = [*dense(0, "x", "h"), helper.make_node("Relu", ["h"], ["r"]), *dense(1, "r", "y")]
    graph = helper.make_graph(
        nodes,
        "dense",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 32])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_smoothing_keeps_the_float_function_of_gemm(tmp_path):
    """Gemm inputs are smoothed too, with transB=1 weights scaled by column."""
    from onnxpipe.graphs.cleanup import CleanupPass

    rng = np.random.default_rng(3)
    x = rng.normal(size=(16, 64)).astype(np.float32)
    x[:, 3] *= 40
    for trans_b in (0, 1):
        src, out = tmp_path / f"in{trans_b}.onnx", tmp_path / f"out{trans_b}.onnx"
        ir.save(CleanupPass()(ir.serde.deserialize_model(_dense_model(rng, trans_b))).model, src)
        assert [n.op_type for n in onnx.load(str(src)).graph.node] == ["Gemm", "Relu", "Gemm"]
        done = smooth_model(src, out, [{"x": x}], alpha=0.7)
        assert done["smoothed_nodes"] == 2, trans_b
        np.testing.assert_allclose(
            ort_run(out, {"x": x})[0], ort_run(src, {"x": x})[0], rtol=1e-4, atol=1e-4
        )


def test_smoothing_lowers_dynamic_int8_error_on_outlier_channels():
    rng = np.random.default_rng(1)
    model = _matmul_model(rng)
    stats, x = _inputs(rng, 32), _inputs(rng, 16)
    want = ort_run(model, {"x": x})[0]
    errors = {}
    for name, statistics in (("plain", ()), ("smoothed", [{"x": stats}])):
        graph_pass = QuantizeDynamicPass(statistics=statistics, fuse_transformer=False)
        got = ort_run(graph_pass(model).model, {"x": x})[0]
        errors[name] = float(np.sqrt(((got - want) ** 2).mean()))
        assert graph_pass.metrics["smoothing"]["smoothed_nodes"] == (2 if statistics else 0)
    assert errors["smoothed"] < errors["plain"] * 0.7, errors


def test_dynamic_cli_smooths_with_calib_statistics_and_records_them(cli, tmp_path):
    from onnxpipe.cli import main
    from tests.test_quantize import QUANT_MODELS

    mlp = tmp_path / "mlp"
    assert main(["convert", f"{QUANT_MODELS}:mlp", "-o", str(mlp), "--input",
                 "x:float32[batch,64]", "--no-bench"]) == 0  # fmt: skip
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(32, 64)).astype(np.float32))
    calib = ("--calib", tmp_path / "calib.npz")
    seen = {}
    for name, flags in (("calib", calib), ("none", ()), ("off", (*calib, "--smooth-alpha", "0"))):
        code, _, err = cli("quantize", mlp, "-o", tmp_path / name, "--mode", "dynamic", *flags)
        assert code == 0, err
        step = json.loads((tmp_path / name / "manifest.json").read_text())["steps"][-1]
        smoothing = step["metrics"]["quantize_dynamic"]["smoothing"]
        seen[name] = (smoothing["statistics"], smoothing["smoothed_nodes"] > 0)
        # the step records what ran: no data to smooth on is smoothing off
        assert step["config"]["smooth_alpha"] == (0.7 if name == "calib" else 0.0)
        if name == "calib":  # measured against plain dynamic int8; kept only if not worse
            assert smoothing["kept"] == (smoothing["smoothed"] >= smoothing["plain"])
            assert smoothing["compared_on"] == "cosine"
            # no --eval: compared on the calibration data, not the bundle's generated samples
            assert smoothing["compared_data"] == "calib"
    assert seen == {"calib": ("calib", True), "none": (None, False), "off": ("calib", False)}
    # a strength with nothing to smooth on would do nothing
    code, _, err = cli("quantize", mlp, "-o", tmp_path / "idle", "--mode", "dynamic",
                       "--smooth-alpha", "0.5")  # fmt: skip
    assert code == 2 and "--calib DATA" in err and not (tmp_path / "idle").exists(), err


def test_dynamic_cli_on_a_keras_style_dense_stack(cli, tmp_path):
    """MatMul + Add layers become Gemm in cleanup; smoothing statistics then target Gemm.

    It used to ask ORT for no tensor at all, got every graph output back and failed with an
    internal error.
    """
    rng = np.random.default_rng(4)
    onnx.save(_dense_model(rng, 0), tmp_path / "dense.onnx")
    x = rng.normal(size=(32, 64)).astype(np.float32)
    x[:, 3] *= 40
    np.savez(tmp_path / "eval.npz", x=x)
    code, _, err = cli("convert", tmp_path / "dense.onnx", "-o", tmp_path / "b", "--no-bench")
    assert code == 0, err
    code, _, err = cli("quantize", tmp_path / "b", "-o", tmp_path / "q", "--mode", "dynamic",
                       "--eval", tmp_path / "eval.npz")  # fmt: skip
    assert code == 0, err
    step = json.loads((tmp_path / "q" / "manifest.json").read_text())["steps"][-1]
    metrics = step["metrics"]["quantize_dynamic"]
    assert metrics["smoothing"]["smoothed_nodes"] == 2
    assert metrics["smoothing"]["compared_data"] == "eval"  # the data the user gave
    assert metrics["integer_nodes"] == 2
