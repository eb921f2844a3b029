"""onnxpipe quantize: structure and numbers of every mode, the gate, and every bad input."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxpipe.cli import main
from tests.conftest import model_ref
from tests.helpers import matmul_model, ort_run

QUANT_MODELS = Path(__file__).parent / "fixtures" / "quant_models.py"
CNN_INPUT = "x:float32[batch,3,16,16]"


def _ops(bundle: Path) -> set[str]:
    return {n.op_type for n in onnx.load(str(bundle / "model.onnx")).graph.node}


@pytest.fixture(scope="module")
def cnn(tmp_path_factory):
    out = tmp_path_factory.mktemp("cnn") / "cnn"
    assert main(["convert", model_ref("gated"), "-o", str(out), "--input", CNN_INPUT,
                 "--no-bench"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    out = tmp_path_factory.mktemp("mlp") / "mlp"
    assert main(["convert", f"{QUANT_MODELS}:mlp", "-o", str(out), "--input",
                 "x:float32[batch,64]", "--no-bench"]) == 0  # fmt: skip
    return out


@pytest.fixture(scope="module")
def cnn_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    np.savez(d / "calib.npz", x=rng.normal(size=(32, 3, 16, 16)).astype(np.float32))
    np.savez(d / "eval.npz", x=rng.normal(size=(24, 3, 16, 16)).astype(np.float32))
    return d


def test_static_qdq_per_channel_is_close_to_float(cli, cnn, cnn_data, tmp_path):
    out = tmp_path / "q"
    code, _, err = cli("quantize", cnn, "-o", out, "--mode", "static", "--per-channel",
                       "--calib", cnn_data / "calib.npz", "--eval", cnn_data / "eval.npz",
                       "--gate", "cosine>=0.99")  # fmt: skip
    assert code == 0, err
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(out)
    manifest = json.loads((out / "manifest.json").read_text())
    step = manifest["steps"][-1]
    assert step["name"] == "quantize" and step["config"]["per_channel"] is True
    assert step["metrics"]["quantize_static"]["activation_type"] in ("uint8", "int8")
    x = np.load(cnn_data / "eval.npz")["x"][:8]
    want = ort_run(cnn / "model.onnx", {"x": x})[0]
    got = ort_run(out / "model.onnx", {"x": x})[0]
    cos = (want * got).sum(1) / np.linalg.norm(want, axis=1) / np.linalg.norm(got, axis=1)
    assert cos.min() > 0.98
    assert manifest["validation"]["cpu"]["status"] == "passed"


def test_static_defaults_per_channel_gptq_and_flags_turn_them_off(cli, cnn, cnn_data, tmp_path):
    configs = {}
    plain = ("--per-tensor", "--rounding", "nearest", "--no-empirical-bias")
    for name, flags in (("default", ()), ("plain", plain)):
        out = tmp_path / name
        code, _, err = cli("quantize", cnn, "-o", out, "--mode", "static",
                           "--calib", cnn_data / "calib.npz", *flags)  # fmt: skip
        assert code == 0, err
        step = json.loads((out / "manifest.json").read_text())["steps"][-1]
        static = step["metrics"]["quantize_static"]
        configs[name] = (step["config"]["per_channel"], step["config"]["rounding"],
                         static["gptq_rounded_nodes"], static["empirical_bias_nodes"])  # fmt: skip
        weight_scales = [
            n.inputs[1].const_value.numpy().size
            for n in ir.load(out / "model.onnx").graph
            if n.op_type == "DequantizeLinear" and n.inputs[0].const_value is not None
            and n.inputs[0].const_value.dtype == ir.DataType.INT8
        ]  # fmt: skip
        assert weight_scales and all((s > 1) == (name == "default") for s in weight_scales)
    assert configs["default"][:2] == (True, "gptq") and min(configs["default"][2:]) >= 1
    assert configs["plain"] == (False, "nearest", 0, 0)


def test_activation_type_flag_sets_the_types_and_rebuilds_an_s8s8_candidate(
    cli, cnn, cnn_data, tmp_path
):
    # Quantizing on x86 for an ARM device: S8S8 whatever this CPU is
    def types(bundle):
        return {
            n.inputs[2].const_value.dtype
            for n in ir.load(bundle / "model.onnx").graph
            if n.op_type == "QuantizeLinear"
        }

    out = tmp_path / "s8"
    code, _, err = cli("quantize", cnn, "-o", out, "--mode", "static", "--activation-type",
                       "int8", "--calib", cnn_data / "calib.npz")  # fmt: skip
    assert code == 0, err
    assert types(out) == {ir.DataType.INT8}
    step = json.loads((out / "manifest.json").read_text())["steps"][-1]
    assert step["metrics"]["quantize_static"]["activation_type"] == "int8"
    # --auto keeps the chosen type: every candidate is s8s8 and its flags say so
    auto = tmp_path / "auto"
    code, _, err = cli("quantize", cnn, "-o", auto, "--mode", "static", "--auto",
                       "--activation-type", "int8", "--calib", cnn_data / "calib.npz",
                       "--eval", cnn_data / "eval.npz", "--gate", "top1>=0.9")  # fmt: skip
    assert code == 0, err
    rows = json.loads((auto / "manifest.json").read_text())["steps"][-1]["metrics"]["auto"]
    assert all(" s8s8 " in r["config"] for r in rows["candidates"])
    assert all("--activation-type" in r["flags"] for r in rows["candidates"])
    assert types(auto) == {ir.DataType.INT8}
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "d", "--mode", "dynamic",
                       "--activation-type", "int8")  # fmt: skip
    assert code == 2 and "--activation-type applies to --mode static" in err


def test_static_qoperator_format(cli, cnn, cnn_data, tmp_path):
    out = tmp_path / "qop"
    code, _, err = cli("quantize", cnn, "-o", out, "--mode", "static", "--format", "qop",
                       "--calib", cnn_data / "calib.npz")  # fmt: skip
    assert code == 0, err
    assert "QLinearConv" in _ops(out)
    # GPTQ and the empirical bias correction apply to QDQ weights: recorded as not applied
    applied = json.loads((out / "manifest.json").read_text())["steps"][-1]["metrics"]
    static = applied["quantize_static"]
    assert static["rounding"] == "nearest" and static["gptq_rounded_nodes"] == 0
    assert static["empirical_bias"] is False


def test_auto_records_candidate_table(cli, cnn, cnn_data, tmp_path):
    out = tmp_path / "auto"
    code, _, err = cli("quantize", cnn, "-o", out, "--mode", "static", "--auto",
                       "--calib", cnn_data / "calib.npz", "--eval", cnn_data / "eval.npz",
                       "--gate", "top1>=0.9")  # fmt: skip
    assert code == 0, err
    step = json.loads((out / "manifest.json").read_text())["steps"][-1]
    rows = step["metrics"]["auto"]["candidates"]
    assert len(rows) >= 4 and sum(bool(r.get("chosen")) for r in rows) == 1
    chosen = next(r for r in rows if r.get("chosen"))
    assert chosen["passed"] and chosen["latency_ms"] > 0 and chosen["bytes"] > 0
    assert step["metrics"]["gate"]["top1"] >= 0.9
    # The row's flags rebuild the chosen model without the search (u8s8 is the default here).
    assert chosen["flags"] is not None
    again = tmp_path / "again"
    code, _, err = cli("quantize", cnn, "-o", again, "--mode", "static",
                       "--calib", cnn_data / "calib.npz", *chosen["flags"])  # fmt: skip
    assert code == 0, err
    x = np.load(cnn_data / "eval.npz")["x"]
    np.testing.assert_allclose(
        ort_run(again / "model.onnx", {"x": x})[0],
        ort_run(out / "model.onnx", {"x": x})[0],
        atol=1e-6,
    )


def test_image_directory_calibration(cli, cnn, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "q"
    spec = "resize=16,crop=16,mean=127,std=128"
    code, _, err = cli("quantize", cnn, "-o", out, "--mode", "static", "--calib", images,
                       "--eval", images, "--preprocess", spec)  # fmt: skip
    assert code == 0, err
    assert (
        json.loads((out / "manifest.json").read_text())["steps"][-1]["metrics"]["gate"]["samples"]
        == 6
    )


def test_gate_failure_exits_1_and_writes_no_bundle(cli, cnn, cnn_data, tmp_path):
    out = tmp_path / "q"
    calib = cnn_data / "calib.npz"
    code, stdout, err = cli("quantize", cnn, "-o", out, "--mode", "static", "--json",
                            "--calib", calib, "--gate", "max_abs<=1e-9")  # fmt: skip
    assert code == 1, err
    assert "max_abs" in err and not out.exists()
    assert "without --eval" in err  # no --eval: the message says what the samples were
    assert (tmp_path / "q.failed.json").exists()
    printed = json.loads(stdout)  # --json: the numbers on stdout too, for scripts
    assert printed["status"] == "gate_failed"
    assert printed == json.loads((tmp_path / "q.failed.json").read_text())  # the same record


def test_auto_reports_its_progress_candidate_by_candidate(cnn, cnn_data, tmp_path):
    from onnxpipe.errors import GateFailed  # noqa: PLC0415
    from onnxpipe.progress import reporting  # noqa: PLC0415
    from onnxpipe.quantize import quantize_bundle, settings_from  # noqa: PLC0415

    seen: list[tuple[str, int | None, int | None]] = []
    settings = settings_from(mode="static", calib=str(cnn_data / "calib.npz"), auto=True,
                             gates=("max_abs<=1e-9",))  # fmt: skip
    with reporting(lambda *a: seen.append(a)), pytest.raises(GateFailed) as failed:
        quantize_bundle(cnn, tmp_path / "q", settings, str(cnn_data / "eval.npz"))
    auto = failed.value.metrics["auto"]  # the float nodes of the candidate whose numbers show
    chosen = next(r for r in auto["candidates"] if r.get("chosen"))
    assert auto["kept_float_nodes"] == chosen.get("float_nodes", [])
    texts = [t for t, _, _ in seen]
    assert texts[0].startswith("candidate 1: qdq")
    counted = [(d, n) for t, d, n in seen if t.startswith("sensitivity of")]
    assert counted and [d for d, _ in counted] == list(range(len(counted)))
    assert {n for _, n in counted} == {len(counted)}
    assert any(t.startswith("profiling") for t in texts)
    assert any(t.startswith("timing") for t in texts)


def test_dynamic_on_mlp_uses_integer_matmul(cli, mlp, tmp_path):
    out = tmp_path / "dyn"
    code, _, err = cli("quantize", mlp, "-o", out, "--mode", "dynamic", "--gate", "cosine>=0.97")
    assert code == 0, err
    assert _ops(out) & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}


def test_dynamic_per_tensor_is_per_tensor(cli, mlp, tmp_path):
    """--mode dynamic --per-tensor shipped per-channel weights, recorded as per_channel false."""

    def weight_scales(bundle):
        model = onnx.load(str(bundle / "model.onnx"))
        return [int(np.prod(t.dims)) for t in model.graph.initializer if t.name.endswith("_scale")]

    per_channel, per_tensor = tmp_path / "pc", tmp_path / "pt"
    assert cli("quantize", mlp, "-o", per_channel, "--mode", "dynamic")[0] == 0
    assert cli("quantize", mlp, "-o", per_tensor, "--mode", "dynamic", "--per-tensor")[0] == 0
    assert max(weight_scales(per_channel)) > 1 and max(weight_scales(per_tensor)) == 1
    step = json.loads((per_tensor / "manifest.json").read_text())["steps"][-1]
    assert step["config"]["per_channel"] is False


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--mode", "dynamic", "--method", "entropy"], "--method applies"),
        (["--mode", "int4", "--format", "qop"], "--format applies"),
        (["--mode", "fp16", "--per-tensor"], "--per-tensor applies"),
        (["--mode", "fp16", "--calib", "x.npz"], "--calib applies"),
        # at their default values too: they would read as applied in the manifest
        (["--mode", "fp16", "--method", "minmax"], "--method applies"),
        (["--mode", "dynamic", "--format", "qdq"], "--format applies"),
        (["--mode", "fp16", "--rounding", "nearest"], "--rounding applies"),
        (["--mode", "dynamic", "--no-empirical-bias"], "--no-empirical-bias applies"),
        (["--mode", "int4", "--smooth-alpha", "0.7"], "--smooth-alpha applies"),
        (["--mode", "int4", "--rounding", "gptq"], "needs --calib"),
        # no folder of images to apply it to: it was ignored, exit 0
        (["--mode", "fp16", "--preprocess", "resize=8"], "would apply to nothing"),
    ],
)
def test_options_the_mode_ignores_are_refused(cli, mlp, tmp_path, flags, needle):
    code, _, err = cli("quantize", mlp, "-o", tmp_path / "q", *flags)
    assert code == 2 and needle in err and not (tmp_path / "q").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--format", "qop", "--rounding", "gptq"], "apply to --format qdq only"),
        (["--format", "qop", "--no-empirical-bias"], "apply to --format qdq only"),
        (["--auto", "--gate", "cosine>=0.9", "--method", "minmax"], "drop --method"),
        (["--auto", "--gate", "cosine>=0.9", "--per-tensor"], "drop --per-channel/--per-tensor"),
    ],
)
def test_static_options_its_format_or_search_ignores_are_refused(cli, cnn, cnn_data, tmp_path,
                                                                 flags, needle):  # fmt: skip
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static", "--calib",
                       cnn_data / "calib.npz", *flags)  # fmt: skip
    assert code == 2 and needle in err, err


def test_qoperator_records_the_rounding_it_applied(cli, cnn, cnn_data, tmp_path):
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static", "--calib",
                       cnn_data / "calib.npz", "--format", "qop")  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "q" / "manifest.json").read_text())["steps"][-1]["config"]
    assert config["rounding"] == "nearest" and config["empirical_bias"] is False


def test_the_manifest_records_only_the_settings_the_mode_used(cli, mlp, tmp_path):
    code, _, err = cli("quantize", mlp, "-o", tmp_path / "f", "--mode", "fp16")
    assert code == 0, err
    config = json.loads((tmp_path / "f" / "manifest.json").read_text())["steps"][-1]["config"]
    assert set(config) == {"mode", "exclude", "gates"}
    code, _, err = cli("quantize", mlp, "-o", tmp_path / "i", "--mode", "int4")
    assert code == 0, err
    config = json.loads((tmp_path / "i" / "manifest.json").read_text())["steps"][-1]["config"]
    assert config["rounding"] == "nearest" and "method" not in config  # no --calib: nearest


def test_dynamic_refuses_conv_heavy_model(cli, cnn, tmp_path):
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "d", "--mode", "dynamic")
    assert code == 2
    assert "Conv" in err and "--mode static" in err


def test_int4_rewrites_matmul_to_matmulnbits(cli, mlp, tmp_path):
    out = tmp_path / "int4"
    code, _, err = cli("quantize", mlp, "-o", out, "--mode", "int4", "--gate", "cosine>=0.98")
    assert code == 0, err
    assert "MatMulNBits" in _ops(out)


def test_int4_rewrites_a_gemm_classifier_head_too():
    # ORT's int4 quantizer skips Gemm; a Linear layer on 2-D input exports as Gemm(transB=1)
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    from onnxpipe.graphs.quantize_int4 import QuantizeInt4Pass  # noqa: PLC0415

    rng = np.random.default_rng(0)
    w = rng.standard_normal((16, 64)).astype(np.float32)
    b = rng.standard_normal(16).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="head", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    x = rng.standard_normal((4, 64)).astype(np.float32)
    graph_pass = QuantizeInt4Pass()
    result = graph_pass(model).model
    ops = [n.op_type for n in result.graph]
    assert "MatMulNBits" in ops and "Gemm" not in ops
    assert [o.name for o in result.graph.outputs] == ["y"]
    got = ort_run(result, {"x": x})[0]
    want = x @ w.T + b  # 4-bit weights, int8 activations: close, not exact
    cosine = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cosine > 0.99, cosine


def test_int4_quantizes_a_tied_head_read_through_a_transpose():
    """GPT-2's logits = h @ wte.T: the head becomes MatMulNBits, no float table is left."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    from onnxpipe.graphs.quantize_int4 import QuantizeInt4Pass  # noqa: PLC0415

    rng = np.random.default_rng(0)
    table = rng.standard_normal((100, 64)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["h"]),
         helper.make_node("Transpose", ["table"], ["head"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "head"], ["logits"], name="lm_head")], "g",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5, 100])],
        [numpy_helper.from_array(table, "table")],
    )  # fmt: skip
    model = ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    )
    graph_pass = QuantizeInt4Pass()
    result = graph_pass(model).model
    ops = [n.op_type for n in result.graph]
    assert "MatMulNBits" in ops and "Transpose" not in ops
    floats = [v.name for v in result.graph.initializers.values() if v.dtype == ir.DataType.FLOAT]
    assert all(result.graph.initializers[n].const_value.size < 100 * 64 for n in floats)
    assert graph_pass.metrics["transposed_weights_folded"] == 1
    ids = rng.integers(0, 100, (3, 5))
    got = ort_run(result, {"ids": ids})[0]
    want = table[ids] @ table.T
    cosine = (got * want).sum() / np.linalg.norm(got) / np.linalg.norm(want)
    assert cosine > 0.99, cosine


def test_int4_weights_get_zero_points_by_default():
    """Asymmetric blocks use all 16 levels on a weight that is not centred on zero."""
    from onnxpipe.graphs.quantize_int4 import QuantizeInt4Pass  # noqa: PLC0415

    rng = np.random.default_rng(1)
    w = rng.uniform(0.0, 1.0, size=(64, 32)).astype(np.float32)  # e.g. a post-ReLU projection
    model = matmul_model(w)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    errors = {}
    for symmetric in (False, True):
        result = QuantizeInt4Pass(symmetric=symmetric)(model).model
        (node,) = [n for n in result.graph if n.op_type == "MatMulNBits"]
        assert (len(node.inputs) > 3 and node.inputs[3] is not None) == (not symmetric)
        errors[symmetric] = float(np.abs(ort_run(result, {"x": x})[0] - x @ w).mean())
    assert errors[False] < 0.75 * errors[True], errors


BERT_INPUTS = ["--input", "input_ids:int64[batch,seq]",
               "--input", "attention_mask:int64[batch,seq]"]  # fmt: skip


@pytest.fixture(scope="module")
def bert_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT fixture converted once, shared read-only by the int4 tests."""
    bundle = tmp_path_factory.mktemp("bert") / "bert"
    args = ["convert", model_ref("tiny_bert"), "-o", str(bundle), *BERT_INPUTS, "--no-bench"]
    assert main(args) == 0
    return bundle


def _sentences(seed: int, count: int) -> dict[str, np.ndarray]:
    """Token batches with padding: lengths 3..12 in a sequence of 12."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 200, size=(count, 12))
    mask = (np.arange(12) < rng.integers(3, 13, size=(count, 1))).astype(np.int64)
    return {"input_ids": ids * mask, "attention_mask": mask}


def test_int4_with_calib_rounds_by_gptq_closer_to_float(cli, bert_bundle, tmp_path):
    np.savez(tmp_path / "calib.npz", **_sentences(0, 64))
    held_out = _sentences(1, 16)
    want = ort_run(bert_bundle / "model.onnx", held_out)[0]
    real = held_out["attention_mask"].astype(bool)
    errors = {}
    for rounding in ("gptq", "nearest"):
        out = tmp_path / rounding
        # float embedding tables: in this tiny model their 4-bit error hides the MatMuls'
        code, _, err = cli("quantize", bert_bundle, "-o", out, "--mode", "int4",
                           "--exclude", "Gather", "--calib", tmp_path / "calib.npz",
                           "--rounding", rounding)  # fmt: skip
        assert code == 0, err
        metrics = json.loads((out / "manifest.json").read_text())["steps"][-1]["metrics"]
        int4 = metrics["quantize_int4"]
        assert int4["rounding"] == rounding
        expected = int4["matmulnbits_nodes"] if rounding == "gptq" else 0
        assert int4["matmulnbits_nodes"] > 0 and int4["gptq_rounded_nodes"] == expected
        got = ort_run(out / "model.onnx", held_out)[0]
        errors[rounding] = float(np.sqrt(((got - want)[real] ** 2).mean()))
    assert errors["gptq"] < errors["nearest"] * 0.7, errors  # measured 0.0018 vs 0.0039


def test_int4_tables_and_matmuls_go_to_ort_format(cli, bert_bundle, tmp_path):
    # both are packed uint8 bytes (UINT4 tables were a .ort file ORT could not load)
    for flags in ([], ["--exclude", "Gather"]):
        int4, package = tmp_path / f"int4{len(flags)}", tmp_path / f"pkg{len(flags)}"
        assert cli("quantize", bert_bundle, "-o", int4, "--mode", "int4", *flags)[0] == 0
        model = onnx.load(int4 / "model.onnx")
        opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
        assert opset < 21  # the bundle's opset, not relabelled
        code, _, err = cli("package", int4, "-o", package, "--target", "mobile")
        assert code == 0, err


def test_int4_stores_embedding_tables_in_4_bits(cli, bert_bundle, tmp_path):
    bundle = bert_bundle
    sizes = {}
    for flag in ("embeddings", "no-embeddings"):
        out = tmp_path / flag
        step = {"embeddings": flag == "embeddings"}
        code, _, err = cli("quantize", bundle, "-o", out, "--mode", "int4",
                           "--gate", "cosine>=0.9", *([] if step["embeddings"] else
                           ["--exclude", "Gather"]))  # fmt: skip
        assert code == 0, err
        sizes[flag] = (out / "model.onnx").stat().st_size
        metrics = json.loads((out / "manifest.json").read_text())["steps"][-1]["metrics"]
        tables = metrics["quantize_int4"]["embedding_tables"]
        assert (tables >= 1) == step["embeddings"]
        assert ("GatherBlockQuantized" in _ops(out)) == step["embeddings"]
    # the 200x64 word, 512x64 position and 2x64 type tables are most of this tiny model
    assert sizes["embeddings"] < sizes["no-embeddings"] * 0.7
    # ORT reads a 4-bit table's ids unchecked: ids past it are bad data, not a pass
    bad = _sentences(1, 4)
    bad["input_ids"][0, 0] = 250  # the word table has 200 rows
    np.savez(tmp_path / "bad.npz", **bad)
    int4 = tmp_path / "embeddings"
    before = (int4 / "manifest.json").read_text()
    code, _, err = cli("validate", int4, "--data", tmp_path / "bad.npz")
    assert code == 2 and "4-bit table has 200 rows" in err, err
    assert (int4 / "manifest.json").read_text() == before
    code, _, err = cli("quantize", int4, "-o", tmp_path / "again", "--mode", "fp16",
                       "--eval", tmp_path / "bad.npz")  # fmt: skip
    assert code == 2 and "4-bit table has 200 rows" in err, err
    # compare ran them: two int4 bundles agreed (max abs 0) on what both read past the table
    code, _, err = cli("compare", int4, int4, "--data", tmp_path / "bad.npz", "--no-bench")
    assert code == 2 and "4-bit table has 200 rows" in err, err
    # and so did convert of the int4 model.onnx: its parity passed, both sides reading past it
    code, _, err = cli("convert", int4 / "model.onnx", "-o", tmp_path / "file", "--no-bench",
                       "--data", tmp_path / "bad.npz")  # fmt: skip
    assert code == 2 and "4-bit table has 200 rows" in err, err


def _position_tables_model(width: int = 64, opset: int = 21) -> onnx.ModelProto:
    """Word ids from the input, positions from a Range (GPT-2) and a Slice of constants (BERT)."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(0)
    table = lambda name, rows: numpy_helper.from_array(  # noqa: E731
        rng.normal(size=(rows, width)).astype(np.float32), name
    )
    consts = [
        table("words", 100), table("ranged", 16), table("sliced", 32),
        numpy_helper.from_array(rng.normal(size=(width, 64)).astype(np.float32), "w"),
        numpy_helper.from_array(np.arange(32, dtype=np.int64)[None], "position_ids"),
        numpy_helper.from_array(np.array(0, np.int64), "zero"),
        numpy_helper.from_array(np.array(1, np.int64), "one"),
        numpy_helper.from_array(np.array([0], np.int64), "zeros"),
        numpy_helper.from_array(np.array([1], np.int64), "ones"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Gather", ["words", "ids"], ["w_e"], name="word_gather"),
        helper.make_node("Shape", ["ids"], ["shape"]),
        helper.make_node("Gather", ["shape", "one"], ["seq"]),
        helper.make_node("Range", ["zero", "seq", "one"], ["range"]),
        helper.make_node("Gather", ["ranged", "range"], ["r_e"], name="range_gather"),
        helper.make_node("Unsqueeze", ["seq", "zeros"], ["seq1"]),
        helper.make_node("Slice", ["position_ids", "zeros", "seq1", "ones"], ["pos"]),
        helper.make_node("Gather", ["sliced", "pos"], ["s_e"], name="slice_gather"),
        helper.make_node("Add", ["w_e", "r_e"], ["a"]),
        helper.make_node("Add", ["a", "s_e"], ["b"]),
        helper.make_node("MatMul", ["b", "w"], ["y"], name="proj"),
    ]
    graph = helper.make_graph(
        nodes, "positions",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 64])],
        consts,
    )  # fmt: skip
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10 if opset > 20 else 8
    )


def test_int4_keeps_a_table_float_whose_computed_ids_may_pass_it(tmp_path):
    """GPT-2's positions come from a Range: run past the context, a float Gather fails, where
    ORT's 4-bit table read other memory and the model answered. Ids sliced from constants in
    range (BERT's position ids) and ids from the input (checked by onnxpipe) stay 4-bit."""
    from onnxpipe.graphs.quantize_int4 import QuantizeInt4Pass  # noqa: PLC0415

    graph_pass = QuantizeInt4Pass()
    result = graph_pass(ir.from_proto(_position_tables_model())).model
    kinds = {n.name: n.op_type for n in result.graph if "_gather" in n.name}
    assert kinds == {  # ORT names a quantized node <name>_Q4
        "word_gather_Q4": "GatherBlockQuantized",
        "slice_gather_Q4": "GatherBlockQuantized",
        "range_gather": "Gather",
    }
    assert list(graph_pass.metrics["embedding_tables_float"]) == ["range_gather"]
    assert graph_pass.metrics["embedding_tables"] == 2
    path = tmp_path / "int4.onnx"
    ir.save(result, path)
    ids = np.ones((1, 16), np.int64)
    assert ort_run(path, {"ids": ids})[0].shape == (1, 16, 64)
    # 20 positions, 16 rows: the float Gather fails (or ORT's Gather-to-Slice fusion clamps it
    # and the Add after it fails); the 4-bit table answered
    with pytest.raises(Exception, match="ONNXRuntimeError"):
        ort_run(path, {"ids": np.ones((1, 20), np.int64)})


@pytest.mark.parametrize("symmetric", [False, True])
def test_int4_tables_are_bytes_and_the_model_keeps_its_opset(tmp_path, monkeypatch, symmetric):
    """ORT's UINT4/INT4 tables read 5x slower than the same values as uint8 bytes (bits=4) and
    need opset 21, whose conversion left MiniLM 0.12 ms slower; bytes give the same outputs."""
    from onnxpipe.graphs import int4_tables, quantize_int4  # noqa: PLC0415

    def run(proto: onnx.ModelProto, packed: bool) -> tuple[ir.Model, np.ndarray]:
        if not packed:
            monkeypatch.setattr(quantize_int4, "byte_packed_tables", lambda model: 0)
        result = quantize_int4.QuantizeInt4Pass(symmetric=symmetric)(ir.from_proto(proto)).model
        monkeypatch.undo()
        ir.save(result, tmp_path / "m.onnx")
        return result, ort_run(tmp_path / "m.onnx", {"ids": ids})[0]

    ids = np.arange(24, dtype=np.int64).reshape(2, 12) * 3
    packed, got = run(_position_tables_model(64, opset=18), packed=True)
    tables = [n for n in packed.graph if n.op_type == "GatherBlockQuantized"]
    assert len(tables) == 2 and packed.opset_imports[""] == 18 and packed.ir_version == 8
    assert all(n.inputs[0].dtype == ir.DataType.UINT8 for n in tables)
    assert all(n.attributes["bits"].value == 4 for n in tables)
    assert got.shape == (2, 12, 64)
    unpacked, want = run(_position_tables_model(64, opset=21), packed=False)
    assert {n.inputs[0].dtype for n in unpacked.graph if n.op_type == "GatherBlockQuantized"} == {
        ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    }
    np.testing.assert_array_equal(got, want)
    assert int4_tables.byte_packed_tables(unpacked) == 2  # the same values, as bytes
    ir.save(unpacked, tmp_path / "m.onnx")
    np.testing.assert_array_equal(ort_run(tmp_path / "m.onnx", {"ids": ids})[0], want)
    # a table of odd width cannot fill whole bytes: 4-bit tensors at a proper opset 21
    odd, _ = run(_position_tables_model(33, opset=18), packed=True)
    assert odd.opset_imports[""] == 21
    assert {n.inputs[0].dtype for n in odd.graph if n.op_type == "GatherBlockQuantized"} == {
        ir.DataType.INT4 if symmetric else ir.DataType.UINT4
    }


def _gather_model(axis: int) -> onnx.ModelProto:
    """Opset 13: one table read by two Gathers (along ``axis``), and a MatMul."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["a"], axis=axis, name="first"),
        helper.make_node("Gather", ["table", "ids"], ["b"], axis=axis, name="second"),
        helper.make_node("Add", ["a", "b"], ["y"]),
        helper.make_node("MatMul", ["x", "w"], ["z"], name="proj"),
    ]
    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        nodes, "shared",
        [value("ids", TensorProto.INT64, [2, 3]), value("x", TensorProto.FLOAT, [2, 64])],
        [value("y", TensorProto.FLOAT, [2, 3, 64] if axis == 0 else [64, 2, 3]),
         value("z", TensorProto.FLOAT, [2, 16])],
        [numpy_helper.from_array(rng.normal(size=(64, 64)).astype(np.float32), "table"),
         numpy_helper.from_array(rng.normal(size=(64, 16)).astype(np.float32), "w")],
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


@pytest.mark.parametrize("axis", [0, 1])
def test_int4_tables_shared_or_gathered_along_columns(tmp_path, axis):
    """A table two Gathers share was packed once but counted twice: the opset stayed
    relabelled 21 unconverted (ReduceMean's axes then refused); uint8 tables cannot be
    gathered along axis 1 (ORT: 'gather_axis must be 0'): those keep UINT4 at opset 21."""
    from onnxpipe.graphs.quantize_int4 import QuantizeInt4Pass  # noqa: PLC0415

    result = QuantizeInt4Pass()(ir.from_proto(_gather_model(axis))).model
    tables = [n for n in result.graph if n.op_type == "GatherBlockQuantized"]
    assert len(tables) == 2
    if axis == 0:
        assert result.opset_imports[""] == 13
        assert all(n.attributes["bits"].value == 4 for n in tables)
        assert tables[0].inputs[0] is tables[1].inputs[0]  # still one table
    else:
        assert result.opset_imports[""] == 21
        assert {n.inputs[0].dtype for n in tables} == {ir.DataType.UINT4}
    ir.save(result, tmp_path / "m.onnx")
    feeds = {"ids": np.array([[0, 5, 63], [1, 2, 3]], np.int64), "x": np.ones((2, 64), np.float32)}
    got = ort_run(tmp_path / "m.onnx", feeds)[0]
    ir.save(ir.from_proto(_gather_model(axis)), tmp_path / "f.onnx")
    want = ort_run(tmp_path / "f.onnx", feeds)[0]
    assert got.shape == want.shape and np.abs(got - want).max() < 0.2 * np.abs(want).max()


def test_odd_width_int4_tables_are_refused_for_mobile(cli, tmp_path):
    """ORT writes a .ort file with 4-bit tensors, then cannot load it (exit 3 before)."""
    onnx.save(_position_tables_model(33, opset=18), tmp_path / "odd.onnx")
    bundle, int4, package = tmp_path / "b", tmp_path / "q", tmp_path / "p"
    code, _, err = cli("convert", tmp_path / "odd.onnx", "-o", bundle, "--no-bench",
                       "--input", "ids:int64[batch,seq]")  # fmt: skip
    assert code == 0, err
    assert cli("quantize", bundle, "-o", int4, "--mode", "int4")[0] == 0
    code, _, err = cli("package", int4, "-o", package, "--target", "mobile")
    assert code == 2 and "4-bit tensors" in err and "--exclude Gather" in err, err
    assert not package.exists()


def test_fp16_keeps_outputs_that_share_a_value_or_are_not_computed(tmp_path):
    """Outputs [y, Identity(y) -> z], an initializer output and a returned input: the
    converter's output Casts declared them twice (SerdeError, exit 3)."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    from onnxpipe.graphs.quantize_fp16 import QuantizeFp16Pass  # noqa: PLC0415

    value = helper.make_tensor_value_info
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"]), helper.make_node("Identity", ["y"], ["z"])],
        "shared",
        [value("x", TensorProto.FLOAT, ["N", 4])],
        [value("y", TensorProto.FLOAT, ["N", 4]), value("z", TensorProto.FLOAT, ["N", 4]),
         value("W", TensorProto.FLOAT, [4, 4]), value("x", TensorProto.FLOAT, ["N", 4])],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "W")],
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    result = QuantizeFp16Pass()(ir.from_proto(proto)).model
    assert [v.name for v in result.graph.outputs] == ["y", "z", "W", "x"]
    ir.save(result, tmp_path / "m.onnx")
    x = np.array([[1, 2, 3, 4]], np.float32)
    y, z, w, same = ort_run(tmp_path / "m.onnx", {"x": x})
    assert all(a.dtype == np.float32 for a in (y, z, w, same))
    np.testing.assert_array_equal(y, 2 * x)
    np.testing.assert_array_equal(z, y)
    np.testing.assert_array_equal(w, np.eye(4) * 2)
    np.testing.assert_array_equal(same, x)


def test_fp16_keeps_float32_io(cli, mlp, tmp_path):
    out = tmp_path / "fp16"
    code, _, err = cli("quantize", mlp, "-o", out, "--mode", "fp16", "--gate", "cosine>=0.999")
    assert code == 0, err
    model = onnx.load(str(out / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    onnx.checker.check_model(model)  # the converter's Casts come out in topological order
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["validation"]["cpu"]["status"] == "passed"
    x = np.random.default_rng(0).normal(size=(4, 64)).astype(np.float32)
    want = ort_run(mlp / "model.onnx", {"x": x})[0]
    np.testing.assert_allclose(ort_run(out / "model.onnx", {"x": x})[0], want, atol=2e-2)
    # nodes kept float32 read float32: between two of them the converter rounded the tensor
    # to float16 and back (every node excluded: 3e-4 off, 1.01x larger)
    matmuls = [n.name for n in onnx.load(str(mlp / "model.onnx")).graph.node
               if n.op_type == "MatMul"]  # fmt: skip
    kept = tmp_path / "kept"
    code, _, err = cli("quantize", mlp, "-o", kept, "--mode", "fp16", "--exclude", "Relu",
                       "--exclude", matmuls[0], "--exclude", matmuls[1])  # fmt: skip
    assert code == 0, err
    model = onnx.load(str(kept / "model.onnx"))
    # one Cast into the float16 MatMul, one out of it: none between the nodes kept
    assert [n.op_type for n in model.graph.node].count("Cast") <= 2
    assert sorted(i.data_type for i in model.graph.initializer) == [
        onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16]  # fmt: skip
    np.testing.assert_allclose(ort_run(kept / "model.onnx", {"x": x})[0], want, atol=2e-2)
    # every node excluded: nothing would change (3 Casts added, 1.01x larger), so exit 2
    code, _, err = cli("quantize", mlp, "-o", tmp_path / "all", "--mode", "fp16", "--exclude",
                       "Relu", "--exclude", "MatMul")  # fmt: skip
    assert code == 2 and "nothing to quantize" in err, err
    assert not (tmp_path / "all").exists()


def test_fp16_keeps_a_shared_weight_float32_for_the_node_kept(cli, tmp_path):
    """A weight shared with a converted node was stored in float16 and cast back for the
    node kept float32: its output was exactly x * fp16(w), 1e-3 off."""
    source = tmp_path / "shared.py"
    source.write_text(
        "import torch\n\n"
        "class M(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        torch.manual_seed(0)\n"
        "        self.w = torch.nn.Parameter(torch.randn(8))\n\n"
        "    def forward(self, x):\n"
        "        return x * self.w, torch.tanh(x) * self.w\n\n"
        "def make():\n"
        "    return M().eval()\n"
    )
    bundle, out = tmp_path / "b", tmp_path / "h"
    code, _, err = cli("convert", f"{source}:make", "-o", bundle, "--input", "x:float32[batch,8]",
                       "--no-bench")  # fmt: skip
    assert code == 0, err
    first = next(n.name for n in onnx.load(str(bundle / "model.onnx")).graph.node)
    code, _, err = cli("quantize", bundle, "-o", out, "--mode", "fp16", "--exclude", first)
    assert code == 0, err
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    want = ort_run(bundle / "model.onnx", {"x": x})
    got = ort_run(out / "model.onnx", {"x": x})
    np.testing.assert_array_equal(got[0], want[0])  # the node kept float32: exact
    np.testing.assert_allclose(got[1], want[1], atol=5e-3)  # the converted one: float16


def test_fp16_keeps_weights_from_constants_and_identities_float32(cli, tmp_path):
    """A weight held by a Constant node, or read through an Identity, reached a kept node
    as a float16 copy cast back (2e-3 off)."""
    from onnx import helper, numpy_helper  # noqa: PLC0415

    w = np.random.default_rng(0).normal(size=(16, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Constant", [], ["wc"], "cst", value=numpy_helper.from_array(w)),
        helper.make_node("MatMul", ["x", "wc"], ["ya"], "mm_kept"),
        helper.make_node("Relu", ["x"], ["r"], "relu"),
        helper.make_node("MatMul", ["r", "wc"], ["yb"], "mm_conv"),
        helper.make_node("Identity", ["wc"], ["wi"], "idn"),
        helper.make_node("MatMul", ["x", "wi"], ["yc"], "mm_ident_kept"),
    ]
    out = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["n", 16]) for n in "abc"]
    for value, name in zip(out, ("ya", "yb", "yc"), strict=True):
        value.name = name
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 16])], out
    )
    source = tmp_path / "cst.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    bundle, half = tmp_path / "b", tmp_path / "h"
    assert cli("convert", source, "-o", bundle, "--no-bench")[0] == 0
    code, _, err = cli("quantize", bundle, "-o", half, "--mode", "fp16", "--exclude", "mm_kept",
                       "--exclude", "mm_ident_kept")  # fmt: skip
    assert code == 0, err
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    want = ort_run(bundle / "model.onnx", {"x": x})
    got = ort_run(half / "model.onnx", {"x": x})
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[2], want[2])
    assert not np.array_equal(got[1], want[1])  # the converted MatMul: float16


def test_already_quantized_model_is_refused(cli, mlp, tmp_path):
    first = tmp_path / "dyn"
    assert cli("quantize", mlp, "-o", first, "--mode", "dynamic")[0] == 0
    code, _, err = cli("quantize", first, "-o", tmp_path / "again", "--mode", "dynamic")
    assert code == 2 and "already quantized" in err


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda d: np.savez(d / "bad.npz", y=np.zeros((2, 3, 16, 16), np.float32)), "'y'"),
        (lambda d: np.savez(d / "bad.npz", x=np.zeros((2, 3, 8, 8), np.float32)), "shape"),
        (lambda d: np.savez(d / "bad.npz", x=np.zeros((2, 3, 16, 16), np.float64)), "float64"),
        (lambda d: np.savez(d / "bad.npz", x=np.full((2, 3, 16, 16), np.nan, np.float32)), "NaN"),
    ],
)
def test_mismatched_calibration_data_exits_2(cli, cnn, tmp_path, make, needle):
    make(tmp_path)
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static",
                       "--calib", tmp_path / "bad.npz")  # fmt: skip
    assert code == 2 and needle in err and "bad.npz" in err


def test_token_inputs_of_different_lengths_exit_2_naming_the_dim(cli, bert_bundle, tmp_path):
    np.savez(tmp_path / "bad.npz", input_ids=np.ones((4, 24), np.int64),
             attention_mask=np.ones((4, 10), np.int64))  # fmt: skip
    code, _, err = cli("quantize", bert_bundle, "-o", tmp_path / "q", "--mode", "int4",
                       "--calib", tmp_path / "bad.npz")  # fmt: skip
    assert code == 2 and "'seq' is 24 in 'input_ids' but 10 in 'attention_mask'" in err, err
    assert "bad.npz" in err and not (tmp_path / "q").exists()


def test_token_ids_past_the_vocabulary_exit_2_naming_the_data(cli, bert_bundle, tmp_path):
    tokens = _sentences(0, 8)
    np.savez(tmp_path / "oov.npz", **{**tokens, "input_ids": tokens["input_ids"] + 5000})
    for mode in ("int4", "dynamic"):
        code, _, err = cli("quantize", bert_bundle, "-o", tmp_path / mode, "--mode", mode,
                           "--calib", tmp_path / "oov.npz")  # fmt: skip
        assert code == 2 and "oov.npz: the input model fails on this data" in err, err
    # as --eval data too: named, exit 2
    code, _, err = cli("quantize", bert_bundle, "-o", tmp_path / "e", "--mode", "int4",
                       "--eval", tmp_path / "oov.npz")  # fmt: skip
    assert code == 2 and "oov.npz: the input model fails" in err, err


def test_a_folder_of_per_sample_npy_files_names_the_file_and_the_fix(cli, cnn, tmp_path):
    folder = tmp_path / "samples"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros((2, 3, 16, 16), np.float32))  # a batch: fine
    np.save(folder / "b.npy", np.zeros((3, 16, 16), np.float32))  # one sample, no batch axis
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static",
                       "--calib", folder)  # fmt: skip
    assert code == 2 and "b.npy" in err and "array[None]" in err, err


def test_empty_dir_unreadable_image_and_bad_gate_exit_2(cli, cnn, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static", "--calib", empty)
    assert code == 2 and "empty" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cat.jpg").write_bytes(b"not an image")
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static",
                       "--calib", broken, "--preprocess", "crop=16")  # fmt: skip
    assert code == 2 and "cat.jpg" in err
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static",
                       "--calib", empty, "--gate", "top1=0.9")  # fmt: skip
    assert code == 2 and "does not parse" in err
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static")
    assert code == 2 and "--calib" in err


def test_a_bundle_given_as_data_is_named_as_one(cli, cnn, tmp_path):
    """A bundle folder as --calib/--eval read its parity.npz (inputs and outputs at several
    shapes): exit 2 'cnn/parity.npz: arrays have different sample counts [1, 3, 4]'."""
    for flag in ("--calib", "--eval"):
        calib = [] if flag == "--calib" else ["--calib", cnn]
        code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static", flag, cnn,
                           *calib)  # fmt: skip
        assert code == 2 and f"{cnn}: is an onnxpipe bundle, not data" in err, err
        assert "parity.npz" not in err and not (tmp_path / "q").exists()
    code, _, err = cli("prune", cnn, "-o", tmp_path / "p", "--method", "channels", "--ratio",
                       "0.5", "--eval", cnn)  # fmt: skip
    assert code == 2 and "is an onnxpipe bundle, not data" in err, err


def test_distribution_calibration_is_refused_for_int8(cli, cnn, tmp_path):
    """ORT's Distribution calibrator is for float8: int8 models came out wrecked, exit 0."""
    from onnxpipe.errors import PassError
    from onnxpipe.graphs.quantize_static import QuantizeStaticPass

    x = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)
    np.savez(tmp_path / "calib.npz", x=x)
    code, _, err = cli("quantize", cnn, "-o", tmp_path / "q", "--mode", "static",
                       "--calib", tmp_path / "calib.npz", "--method", "distribution")  # fmt: skip
    assert code == 2 and "float8" in err and "minmax, percentile or entropy" in err
    assert not (tmp_path / "q").exists()
    with pytest.raises(PassError, match="float8"):
        QuantizeStaticPass(calibration=[{"x": x}], method="distribution")(
            ir.load(cnn / "model.onnx")
        )


def test_ort_tools_run_outside_the_users_directory(cli, mlp, tmp_path, monkeypatch):
    # ORT's symbolic shape inference drops files into the current directory when it gives
    # up; quantizing must leave the user's directory as it was.
    from onnxpipe.graphs.quant_utils import working_directory

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    with pytest.raises(RuntimeError), working_directory(tmp_path):
        assert Path.cwd() == tmp_path
        raise RuntimeError("tool failed")
    assert Path.cwd() == cwd
    code, _, err = cli("quantize", mlp, "-o", tmp_path / "q", "--mode", "dynamic")
    assert code == 0, err
    assert list(cwd.iterdir()) == []


@pytest.mark.parametrize("method", ["magnitude", "channels", "lowrank"])
def test_pruning_a_quantized_bundle_says_prune_the_float_one(cli, mlp, tmp_path, method):
    first = tmp_path / "dyn"
    assert cli("quantize", mlp, "-o", first, "--mode", "dynamic")[0] == 0
    code, _, err = cli("prune", first, "-o", tmp_path / "p", "--method", method, "--ratio", "0.3")
    assert code == 2, err
    assert "already quantized" in err and "Prune the float bundle" in err
    assert "Traceback" not in err and not (tmp_path / "p").exists()


@pytest.mark.parametrize("level", ["extended", "all"])
def test_ort_fused_cpu_ops_are_refused_by_quantize_and_prune(cli, cnn, cnn_data, tmp_path, level):
    """FusedConv / NCHWc ops hide the convs: static int8 kept them float, NCHWc was exit 3."""
    optimized = tmp_path / "opt"
    assert cli("optimize", cnn, "-o", optimized, "--level", level)[0] == 0
    steps = [
        ("quantize", optimized, "-o", tmp_path / "q", "--mode", "static",
         "--calib", cnn_data / "calib.npz"),
        ("prune", optimized, "-o", tmp_path / "p", "--method", "channels", "--ratio", "0.5"),
    ]  # fmt: skip
    for args in steps:
        code, _, err = cli(*args)
        assert code == 2 and "CPU-fused ops" in err and "opt/model.onnx" in err, err
        assert "optimized from, then optimize the result" in err


def test_sixteen_bit_grayscale_images_load_as_the_same_picture(tmp_path):
    """Pillow's convert('L') clips 16-bit samples: a 16-bit PNG photo became a white frame."""
    from PIL import Image

    from onnxpipe.converters.base import InputSpec
    from onnxpipe.images import ImageSpec, load_images

    gray = np.random.default_rng(0).integers(0, 256, (16, 16)).astype(np.uint8)
    for depth, array in (("8", gray), ("16", gray.astype(np.uint16) * 257)):
        folder = tmp_path / depth
        folder.mkdir()
        Image.fromarray(array).save(folder / "photo.png")
    spec = [InputSpec("x", "float32", ("batch", 1, 16, 16))]
    eight = load_images(tmp_path / "8", ImageSpec(crop=16), spec, 1)[0]["x"]
    sixteen = load_images(tmp_path / "16", ImageSpec(crop=16), spec, 1)[0]["x"]
    assert Image.open(tmp_path / "16" / "photo.png").mode.startswith("I")
    np.testing.assert_array_equal(sixteen, eight)
    assert sixteen.min() < 50 and sixteen.max() > 200  # the picture, not a white frame


@pytest.mark.parametrize("batch", [1, 4])
def test_static_auto_on_a_model_fixed_at_a_batch(cli, cnn_data, tmp_path, batch):
    """Calibration fed one sample at a time (a batch-4 model: exit 3) and the fallback search
    stacked 24 samples into one batch (a batch-1 zoo model: exit 2 naming a deleted file)."""
    fixed = tmp_path / "fixed"
    assert cli("convert", model_ref("gated"), "-o", fixed, "--input",
               f"x:float32[{batch},3,16,16]", "--no-bench")[0] == 0  # fmt: skip
    out = tmp_path / "q"
    code, stdout, err = cli("quantize", fixed, "-o", out, "--mode", "static", "--calib",
                            cnn_data / "calib.npz", "--eval", cnn_data / "eval.npz", "--auto",
                            "--gate", "cosine>=0.9999995", "--json")  # fmt: skip
    assert code in (0, 1), err  # passed, or no candidate reached the gate: numbers reported
    assert stdout, (code, err)
    record = json.loads(stdout)
    auto = (record.get("metrics") or record["steps"][-1]["metrics"])["auto"]
    assert auto["sensitivity"] and auto["kept_float_nodes"]  # the fallback search ran


def test_before_after_latency_is_timed_at_the_eval_data_sizes(cli, cnn_data, tmp_path):
    """A model with free height and width was timed at 8x8 pixels, its --eval at 16x16."""
    free = tmp_path / "free"
    assert cli("convert", model_ref("gated"), "-o", free, "--input",
               "x:float32[batch,3,h,w]", "--no-bench")[0] == 0  # fmt: skip
    out = tmp_path / "q"
    code, _, err = cli("quantize", free, "-o", out, "--mode", "static", "--calib",
                       cnn_data / "calib.npz", "--eval", cnn_data / "eval.npz")  # fmt: skip
    assert code == 0, err
    bench = json.loads((out / "manifest.json").read_text())["bench"]
    assert bench["shapes"]["x"] == [1, 3, 16, 16], bench["shapes"]


def test_exclude_reaches_a_matmul_that_preprocessing_fused_into_gemm(cli, tmp_path):
    """ORT fuses MatMul + Add into a Gemm named '<MatMul>/MatMulAddFusion' before quantizing."""
    import onnx
    from onnx import helper, numpy_helper

    rng = np.random.default_rng(0)
    shapes = {"w1": (8, 16), "b1": (16,), "w2": (16, 4), "b2": (4,)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in shapes.items()]  # fmt: skip
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["m1"], name="dense1/MatMul"),
            helper.make_node("Add", ["m1", "b1"], ["a1"], name="dense1/Add"),
            helper.make_node("Relu", ["a1"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["m2"], name="dense2/MatMul"),
            helper.make_node("Add", ["m2", "b2"], ["y"], name="dense2/Add"),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
        inits,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "mlp.onnx")  # fmt: skip
    assert cli("convert", tmp_path / "mlp.onnx", "-o", tmp_path / "b", "--no-bench")[0] == 0
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((16, 8)).astype(np.float32))

    def quantized_inputs(*exclude):
        out = tmp_path / ("q" + "".join(c for c in "-".join(exclude) if c.isalnum()))
        flags = [f for e in exclude for f in ("--exclude", e)]
        code, _, err = cli("quantize", tmp_path / "b", "-o", out, "--mode", "static",
                           "--calib", tmp_path / "c.npz", *flags)  # fmt: skip
        assert code == 0, err
        model = onnx.load(out / "model.onnx")
        made = {o: n for n in model.graph.node for o in n.output}
        return {
            n.name.split("/")[0]
            for n in model.graph.node
            if n.op_type == "Gemm" and made.get(n.input[0], n).op_type == "DequantizeLinear"
        }

    assert quantized_inputs() == {"dense1", "dense2"}
    assert quantized_inputs("dense1/MatMul") == {"dense2"}
    code, _, err = cli("quantize", tmp_path / "b", "-o", tmp_path / "qm", "--mode", "static",
                       "--calib", tmp_path / "c.npz", "--exclude", "MatMul")  # fmt: skip
    assert code == 2 and "nothing to quantize" in err, err  # both fused Gemms excluded
    assert quantized_inputs("dense1/Add") == {"dense2"}  # the Add is fused with its MatMul
    code, _, err = cli("quantize", tmp_path / "b", "-o", tmp_path / "qa", "--mode", "static",
                       "--calib", tmp_path / "c.npz", "--exclude", "dense1/Ad")  # fmt: skip
    assert code == 2 and "exclude the MatMul's name (e.g. dense1/MatMul)" in err, err


def test_dynamic_and_int4_exclusions_of_gemm_and_matmul_hold(cli, mlp, mlp_bundle, tmp_path):
    """ORT's dynamic quantizer renames each Gemm '<name>_MatMul' before reading exclusions."""
    import onnx

    model = onnx.load(mlp_bundle / "model.onnx")  # nn.Linear layers: Gemm nodes
    gemms = [n.name for n in model.graph.node if n.op_type == "Gemm"]
    assert len(gemms) >= 2

    def integer_nodes(*flags):
        out = tmp_path / f"d{len(list(tmp_path.iterdir()))}"
        code, _, err = cli("quantize", mlp_bundle, "-o", out, "--mode", "dynamic", *flags)
        assert code == 0, err
        ops = [n.op_type for n in onnx.load(out / "model.onnx").graph.node]
        step = json.loads((out / "manifest.json").read_text())["steps"][-1]["metrics"]
        return ops.count("MatMulInteger"), step["quantize_dynamic"]["excluded_nodes"]

    assert integer_nodes()[0] == len(gemms)
    assert integer_nodes("--exclude", gemms[0]) == (len(gemms) - 1, [gemms[0]])
    # every Gemm excluded: the float model came back as a "quantize" step, exit 0
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).normal(size=(8, 64)).astype("f4"))
    for mode, data in (("dynamic", []), ("static", ["--calib", tmp_path / "c.npz"])):
        code, _, err = cli("quantize", mlp_bundle, "-o", tmp_path / mode, "--mode", mode,
                           "--exclude", "Gemm", *data)  # fmt: skip
        assert code == 2 and "nothing to quantize: with --exclude Gemm" in err, err
        assert not (tmp_path / mode).exists()
    code, _, err = cli("quantize", mlp, "-o", tmp_path / "i", "--mode", "int4", "--exclude",
                       "MatMul")  # fmt: skip
    assert code == 2 and "leaves nothing to quantize" in err
