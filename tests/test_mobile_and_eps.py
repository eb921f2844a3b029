"""Execution providers, mobile packaging, the bench matrix and report.html (issue 6)."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from onnxpipe.modelio import sha256
from tests.conftest import model_ref, tree_hash
from tests.helpers import ort_run

IMAGE = "x:float32[batch,3,16,16]"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from onnxpipe.cli import main

    out = tmp_path_factory.mktemp("eps") / "gated"
    assert main(["convert", model_ref("gated"), "-o", str(out), "--input", IMAGE]) == 0
    return out


def test_package_mobile_with_fixed_shape(bundle, cli, tmp_path):
    before = tree_hash(bundle)
    out = tmp_path / "mobile"
    code, _, err = cli(
        "package", bundle, "-o", out, "--target", "mobile", "--fixed-shape", "x:1,3,16,16"
    )
    assert code == 0, err
    assert tree_hash(bundle) == before
    manifest = json.loads((out / "manifest.json").read_text())
    mobile = manifest["mobile"]
    assert mobile["ort_file"] == "mobile/model.ort" and (out / mobile["ort_file"]).is_file()
    assert (out / mobile["operators_config"]).read_text().count("ai.onnx;") >= 2
    assert mobile["fixed_shapes"] == {"x": [1, 3, 16, 16]}
    assert "hint" not in mobile and "dynamic_inputs" not in mobile
    for ep in ("nnapi", "coreml"):
        assert mobile[ep]["nodes_total"] > 0
        assert 0 <= mobile[ep]["nodes_supported"] <= mobile[ep]["nodes_total"]
        assert mobile[ep]["partitions"] >= 1
    assert manifest["validation"]["mobile"]["status"] == "passed"
    assert manifest["validation"]["mobile"]["max_abs_diff"] < 1e-4
    assert manifest["validation"]["mobile"]["samples"] >= 1  # what "passed" was measured on
    # The .ort model really runs and matches the .onnx one.
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    ort_out = ort.InferenceSession(
        str(out / "mobile" / "model.ort"), providers=["CPUExecutionProvider"]
    ).run(None, {"x": x})[0]
    np.testing.assert_allclose(ort_out, ort_run(out / "model.onnx", {"x": x})[0], atol=1e-5)
    assert "Mobile package" in (out / "report.html").read_text()
    card = (out / "README.md").read_text()  # the card a deployment team reads says it too
    assert "## Mobile package" in card and "mobile/model.ort" in card and "x [1, 3, 16, 16]" in card
    code, out_json, _ = cli("validate", out, "--ep", "cpu,mobile", "--json")
    results = json.loads(out_json)
    assert code == 0 and results["mobile"]["status"] == "passed"


def test_package_with_dynamic_shapes_says_why_nnapi_and_coreml_count_nothing(bundle, cli, tmp_path):
    """ORT's checker counts 0 NNAPI/CoreML nodes on a dynamic batch; the bundle says why."""
    out = tmp_path / "mobile"
    code, _, err = cli("package", bundle, "-o", out, "--target", "mobile")
    assert code == 0, err
    mobile = json.loads((out / "manifest.json").read_text())["mobile"]
    assert mobile["nnapi"]["nodes_supported"] == 0 and mobile["coreml"]["nodes_supported"] == 0
    assert mobile["dynamic_inputs"] == {"x": ["batch", 3, 16, 16]}
    assert "--fixed-shape x:1,3,16,16" in mobile["hint"]
    assert "--fixed-shape x:1,3,16,16" in (out / "report.html").read_text()


def test_package_keeps_ort_tools_info_lines_off_the_terminal(bundle, tmp_path):
    # ORT's tools reset their loggers to DEBUG on import; in-process capture hides that, so
    # this runs the real CLI
    import subprocess
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "onnxpipe", "package", str(bundle), "-o", str(tmp_path / "m"),
         "--target", "mobile"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "Created config" not in run.stderr and "INFO" not in run.stderr, run.stderr


def test_validate_mobile_without_package_is_unavailable(bundle, cli):
    code, out, _ = cli("validate", bundle, "--ep", "mobile,xnnpack,nnapi,coreml", "--json")
    results = json.loads(out)
    assert code == 0
    assert results["mobile"]["status"] == "unavailable" and "package" in results["mobile"]["reason"]
    for ep in ("xnnpack", "nnapi", "coreml"):
        assert results[ep]["status"] == "unavailable"
        # onnxruntime-gpu has none of these; the reason says where they do exist.
        assert "onnxruntime-gpu" not in results[ep]["reason"]
    assert "Android" in results["nnapi"]["reason"] and "macOS" in results["coreml"]["reason"]


@pytest.mark.parametrize(
    ("shape", "expected"),
    [
        ("y:1,3,16,16", "no input 'y'"),
        ("x:1,3,16", "rank"),
        ("x:1,4,16,16", "cannot change (axis 1 is 3, not 4)"),  # was "[(3, 4)]"
        ("x", "NAME:DIMS"),
    ],
)
def test_bad_fixed_shape(bundle, cli, tmp_path, shape, expected):
    code, _, err = cli(
        "package", bundle, "-o", tmp_path / "m", "--target", "mobile", "--fixed-shape", shape
    )
    assert code == 2 and expected in err and not (tmp_path / "m").exists()


def test_custom_domain_op_cannot_be_packaged(cli, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("FancyOp", ["x"], ["y"], domain="com.example")],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    bundle = tmp_path / "b"
    bundle.mkdir()
    onnx.save(model, bundle / "model.onnx")
    (bundle / "manifest.json").write_text(
        json.dumps(
            {
                "schema": "onnxpipe.manifest/1",
                "model": {"file": "model.onnx", "sha256": sha256(bundle / "model.onnx")},
                "inputs": [{"name": "x", "dtype": "float32", "shape": [1, 4]}],
                "outputs": [{"name": "y", "dtype": "float32", "shape": [1, 4]}],
                "steps": [],
            }
        )
    )
    code, _, err = cli("package", bundle, "-o", tmp_path / "m", "--target", "mobile")
    assert code == 2 and "com.example::FancyOp" in err and not (tmp_path / "m").exists()


def test_unknown_ep_is_exit_2(bundle, cli):
    code, _, err = cli("validate", bundle, "--ep", "cpu,npu")
    assert code == 2 and "npu" in err


def test_report_has_plots_and_tables(bundle):
    page = (bundle / "report.html").read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and "<circle" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")  # no network
    assert "Validation per execution provider" in page and "Latency" in page


@pytest.mark.gpu
def test_cuda_validation_on_a_gpu_machine(bundle, cli):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA device")
    code, out, _ = cli("validate", bundle, "--ep", "cuda", "--require", "cuda", "--json")
    results = json.loads(out)
    assert code == 0 and results["cuda"]["status"] == "passed"
    assert results["cuda"]["providers"][0] == "CUDAExecutionProvider"


def test_package_ir3_model_with_weight_inputs(cli, tmp_path):
    # The onnx zoo layout (IR 3: every initializer is also a graph input) with two identical
    # shape initializers: ORT's optimizer shares them and then wanted one as a required feed.
    def shape(name):
        return helper.make_tensor(name, onnx.TensorProto.INT64, [2], [4, 4])

    half = helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.5])
    graph = helper.make_graph(
        [
            helper.make_node("ConstantOfShape", ["w1_shape"], ["w1"], value=half),
            helper.make_node("ConstantOfShape", ["w2_shape"], ["w2"], value=half),
            helper.make_node("MatMul", ["x", "w1"], ["h"]),
            helper.make_node("MatMul", ["h", "w2"], ["y"]),
        ],
        "zoo_like",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 4]),
            helper.make_tensor_value_info("w1_shape", onnx.TensorProto.INT64, [2]),
            helper.make_tensor_value_info("w2_shape", onnx.TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 4])],
        [shape("w1_shape"), shape("w2_shape")],
    )
    source = tmp_path / "zoo.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)], ir_version=3),
              source)  # fmt: skip
    bundle = tmp_path / "b"
    assert cli("convert", source, "-o", bundle, "--no-bench")[0] == 0
    out = tmp_path / "m"
    code, _, err = cli("package", bundle, "-o", out, "--target", "mobile")
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["validation"]["mobile"]["status"] == (
        "passed"
    )
    session = ort.InferenceSession(str(out / "mobile" / "model.ort"))
    assert [i.name for i in session.get_inputs()] == ["x"]
    x = np.ones((1, 4), np.float32)
    np.testing.assert_allclose(session.run(None, {"x": x})[0], np.full((1, 4), 4.0), rtol=1e-6)


def test_bench_fixed_batch_model_measures_what_it_says(cli, tmp_path):
    # Batch fixed to 1, sequence dynamic (a transformer exported at batch 1): --batch must not
    # set the sequence length, and a batch the model cannot take is refused, not relabelled.
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "seq",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, "seq"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, "seq"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "seq.onnx")  # fmt: skip
    bundle = tmp_path / "b"
    assert cli("convert", tmp_path / "seq.onnx", "-o", bundle, "--no-bench")[0] == 0
    code, out, err = cli("bench", bundle, "--batch", "1", "--runs", "3", "--json")
    assert code == 0, err
    (record,) = json.loads(out)
    assert record["batch"] == 1 and record["shapes"] == {"x": [1, 8]}
    code, out, err = cli("bench", bundle, "--batch", "1,4", "--runs", "3", "--json")
    assert code == 2 and out == "" and "--batch 4" in err and "x" in err


def test_side_by_side_timing_runs_each_model_alone_on_the_given_feeds(bundle, tmp_path):
    from onnxpipe.bench import _run_worker, isolated_ms

    x = np.zeros((3, 3, 16, 16), np.float32)  # batch 3: the worker's random feeds are batch 1
    ms = isolated_ms({"a": bundle / "model.onnx", "b": bundle / "model.onnx"}, {"x": x},
                     runs=5, repeats=2)  # fmt: skip
    assert set(ms) == {"a", "b"} and all(len(v) == 2 and min(v) > 0 for v in ms.values())
    np.savez(tmp_path / "f.npz", x=x)
    record = _run_worker({"model": str(bundle / "model.onnx"), "inputs": [], "ep": "cpu",
                          "feeds": str(tmp_path / "f.npz"), "batch": 1, "threads": 0,
                          "runs": 3, "warmup": 1})  # fmt: skip
    assert record["shapes"] == {"x": [3, 3, 16, 16]} and record["batch"] == 3


def test_package_parity_failure_writes_the_report_and_no_bundle(bundle, cli, tmp_path, monkeypatch):
    import onnxpipe.mobile as mobile

    real = mobile._run
    monkeypatch.setattr(mobile, "_run", lambda s, f: [o + 1.0 for o in real(s, f)])  # a bad .ort
    code, _, err = cli("package", bundle, "-o", tmp_path / "m", "--target", "mobile")
    assert code == 1 and "disagrees" in err, err
    report = json.loads((tmp_path / "m.failed.json").read_text())
    assert report["failed_step"] == "package"
    assert report["metrics"]["parity"]["max_abs_diff"] >= 1.0
    assert not (tmp_path / "m").exists()


def test_bench_sizes_a_dynamic_dim_as_asked(cli, tmp_path):
    """An image model with free height and width is timed at --size, not 8x8 pixels."""
    from onnx import TensorProto, helper, numpy_helper

    w = np.ones((2, 3, 3, 3), np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "h", "w"])],
        [numpy_helper.from_array(w, "w")],
    )
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    bundle = tmp_path / "b"
    assert cli("convert", path, "-o", bundle, "--no-bench")[0] == 0
    code, out, err = cli("bench", bundle, "--runs", "3", "--size", "h=64", "--size", "w=48",
                         "--json")  # fmt: skip
    assert code == 0, err
    assert json.loads(out)[0]["shapes"]["x"] == [1, 3, 64, 48]
    for bad, message in (("q=4", "no input has a dynamic dim"), ("batch=2", "--batch"),
                         ("h=0", "SYMBOL=N")):  # fmt: skip
        code, _, err = cli("bench", bundle, "--runs", "3", "--size", bad)
        assert code == 2 and message in err, err


def _ops_in_config(package) -> str:
    return (package / "mobile" / "required_operators.config").read_text()


def test_static_int8_keeps_its_int8_kernels_in_the_mobile_package(bundle, cli, tmp_path, caplog):
    """At ORT's basic level the QDQ pairs stay unfused and model.ort runs in float (the bundle
    claimed int8): the default level (auto) is extended for a QDQ model, basic warns."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "calib.npz", x=rng.normal(size=(16, 3, 16, 16)).astype(np.float32))
    int8 = tmp_path / "int8"
    assert cli("quantize", bundle, "-o", int8, "--mode", "static", "--calib",
               tmp_path / "calib.npz")[0] == 0  # fmt: skip
    auto = tmp_path / "auto"
    code, _, err = cli("package", int8, "-o", auto, "--target", "mobile", "--fixed-shape",
                       "x:1,3,16,16")  # fmt: skip
    assert code == 0, err
    mobile = json.loads((auto / "manifest.json").read_text())["mobile"]
    assert mobile["optimization_level"] == "extended" and "auto" in mobile["level_note"]
    assert "QLinearConv" in _ops_in_config(auto)
    ort_ops = {n for line in mobile["operators"] for n in line.split(";")[-1].split(",")}
    assert "QLinearConv" in ort_ops and "Conv" not in ort_ops
    basic = tmp_path / "basic"
    code, _, err = cli("package", int8, "-o", basic, "--target", "mobile", "--level", "basic")
    assert code == 0, err
    assert "QLinearConv" not in _ops_in_config(basic)
    assert "runs its layers in float" in caplog.text
    assert (
        "--level extended"
        in json.loads((basic / "manifest.json").read_text())["mobile"]["level_note"]
    )
    plain = tmp_path / "plain"  # a float model stays at basic, portable to NNAPI/CoreML
    assert cli("package", bundle, "-o", plain, "--target", "mobile")[0] == 0
    plain_mobile = json.loads((plain / "manifest.json").read_text())["mobile"]
    assert plain_mobile["optimization_level"] == "basic" and "level_note" not in plain_mobile


def test_partition_analysis_is_of_the_graph_model_ort_holds(bundle, cli, tmp_path):
    """At --level extended Conv+Relu become com.microsoft FusedConv, which NNAPI lacks: the
    analysis must count the optimized graph, not the bundle's model."""
    out = tmp_path / "ext"
    code, _, err = cli("package", bundle, "-o", out, "--target", "mobile", "--fixed-shape",
                       "x:1,3,16,16", "--level", "extended")  # fmt: skip
    assert code == 0, err
    mobile = json.loads((out / "manifest.json").read_text())["mobile"]
    assert "FusedConv" in _ops_in_config(out)
    assert "com.microsoft:FusedConv" in mobile["nnapi"]["unsupported_ops"]
    assert mobile["nnapi"]["nodes_supported"] < mobile["nnapi"]["nodes_total"]
    bundle_nodes = len(onnx.load(str(bundle / "model.onnx")).graph.node)
    assert mobile["nnapi"]["nodes_total"] < bundle_nodes  # fused: fewer nodes than the input


def test_validate_mobile_runs_the_data_at_a_fixed_batch_and_ids_in_their_table(cli, tmp_path):
    """--data comes 8 to a batch and is run one sample at a time on a batch-1 package; the
    generated ids stay inside the 10-row table (they used to index past it: exit 1)."""
    src = tmp_path / "vocab"
    assert cli("convert", model_ref("small_vocab"), "-o", src, "--input",
               "ids:int64[batch,seq]", "--no-bench")[0] == 0  # fmt: skip
    out = tmp_path / "pkg"
    code, _, err = cli("package", src, "-o", out, "--target", "mobile", "--fixed-shape",
                       "ids:1,5")  # fmt: skip
    assert code == 0, err
    code, stdout, err = cli("validate", out, "--ep", "mobile", "--json")
    assert code == 0 and json.loads(stdout)["mobile"]["status"] == "passed", err
    ids = np.random.default_rng(0).integers(0, 10, (16, 5))
    np.savez(tmp_path / "ids.npz", ids=ids)
    code, stdout, err = cli("validate", out, "--ep", "mobile", "--data", tmp_path / "ids.npz",
                            "--json")  # fmt: skip
    result = json.loads(stdout)["mobile"]
    assert code == 0 and result["status"] == "passed", err
    assert result["samples"] >= 16  # the 16 of --data (and the stored batch-1 sample)
    # at batch 2, 3 samples run as 2 batches (they were left out, the samples counted less)
    two = tmp_path / "pkg2"
    code, _, err = cli("package", src, "-o", two, "--target", "mobile", "--fixed-shape", "ids:2,5")
    assert code == 0, err
    code, stdout, err = cli("validate", two, "--ep", "mobile", "--json")
    stored = json.loads(stdout)["mobile"]["samples"]
    np.savez(tmp_path / "three.npz", ids=ids[:3])
    code, stdout, err = cli("validate", two, "--ep", "mobile", "--data", tmp_path / "three.npz",
                            "--json")  # fmt: skip
    assert code == 0 and json.loads(stdout)["mobile"]["samples"] == stored + 3, stdout


def test_validate_mobile_refuses_data_the_fixed_shapes_cannot_take(cli, tmp_path):
    """Ids at length 9 on a package fixed at length 5 were left out, and validation.mobile
    passed on 8 generated samples instead: now exit 2 naming the data and the fixed shapes,
    with nothing recorded."""
    src = tmp_path / "vocab"
    assert cli("convert", model_ref("small_vocab"), "-o", src, "--input",
               "ids:int64[batch,seq]", "--no-bench")[0] == 0  # fmt: skip
    out = tmp_path / "pkg"
    code, _, err = cli("package", src, "-o", out, "--target", "mobile", "--fixed-shape", "ids:2,5")
    assert code == 0, err
    manifest = (out / "manifest.json").read_bytes()
    np.savez(tmp_path / "long.npz", ids=np.random.default_rng(0).integers(0, 10, (6, 9)))
    code, _, err = cli("validate", out, "--ep", "cpu,mobile", "--data", tmp_path / "long.npz")
    assert code == 2, err
    assert "long.npz" in err and "ids[2, 5]" in err and "--fixed-shape" in err
    assert (out / "manifest.json").read_bytes() == manifest


def test_a_model_too_small_at_the_default_size_is_timed_at_the_data_sizes(cli, tmp_path):
    """convert of an image model with free height and width and --data (224x224 photos) was
    exit 3: its bench ran at 8x8 pixels, which its kernels do not fit."""
    source = tmp_path / "wide.py"
    source.write_text(
        "import torch\n\n"
        "def make():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 9), torch.nn.Flatten(2)).eval()\n"
    )
    np.savez(tmp_path / "data.npz", x=np.random.default_rng(0).random((4, 3, 16, 16), np.float32))
    out = tmp_path / "b"
    code, _, err = cli("convert", f"{source}:make", "-o", out, "--input", "x:float32[batch,3,h,w]",
                       "--data", tmp_path / "data.npz")  # fmt: skip
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["bench"]["shapes"]["x"] == [1, 3, 16, 16]
    # later commands time it where it was timed, not at 8x8, and evaluate at sizes it runs
    code, stdout, err = cli("bench", out, "--runs", "2", "--json")
    assert code == 0 and json.loads(stdout)[0]["shapes"]["x"] == [1, 3, 16, 16], err
    for args in (("quantize", out, "-o", tmp_path / "fp16", "--mode", "fp16"),
                 ("optimize", out, "-o", tmp_path / "opt")):  # fmt: skip
        code, _, err = cli(*args)
        assert code == 0, err
    code, _, err = cli("bench", out, "--runs", "2", "--size", "h=8", "--size", "w=8")
    assert code == 2 and "h=8, w=8" in err and "--size h=N" in err and "Traceback" not in err


def test_bench_times_the_packaged_ort_model(bundle, cli, tmp_path, caplog):
    """--ep mobile was refused ('Bench on an EP this machine has'), so the shipped .ort model
    was never timed, though validate runs it here."""
    out = tmp_path / "pkg"
    assert cli("package", bundle, "-o", out, "--target", "mobile", "--fixed-shape",
               "x:1,3,16,16")[0] == 0  # fmt: skip
    code, stdout, err = cli("bench", out, "--ep", "cpu,mobile", "--batch", "1,2", "--runs", "3",
                            "--json")  # fmt: skip
    assert code == 0, err
    records = json.loads(stdout)
    mobile = [r for r in records if r["ep"] == "mobile"]
    assert len(mobile) == 1 and mobile[0]["shapes"]["x"] == [1, 3, 16, 16]  # its fixed batch
    assert {r["batch"] for r in records if r["ep"] == "cpu"} == {1, 2}
    assert "takes batch 1 only" in caplog.text  # batch 2 was asked: said, not dropped silently
    code, _, err = cli("bench", bundle, "--ep", "mobile", "--runs", "3")
    assert code == 2 and "onnxpipe package" in err


def test_package_of_an_optimize_level_all_bundle_says_what_to_package_instead(tmp_path):
    from onnx import TensorProto, helper

    from onnxpipe.errors import InputError
    from onnxpipe.ort_mobile import check_mobile_ops

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16, 4, 4])
    graph = helper.make_graph(
        [helper.make_node("ReorderInput", ["x"], ["y"], domain="com.microsoft.nchwc")],
        "g", [x], [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )  # fmt: skip
    model = helper.make_model(graph)
    with pytest.raises(InputError) as caught:
        check_mobile_ops(model, tmp_path / "b" / "model.onnx")
    message = str(caught.value)
    assert "optimize --level all" in message and "from before that optimize" in message


def test_the_fixed_shape_hint_uses_batch_1_and_the_timed_sizes():
    from onnxpipe.mobile import _fixed_example

    assert _fixed_example(["batch", 3, 224, 224], {}) == "1,3,224,224"
    assert _fixed_example(["batch", "seq"], {"seq": 128}) == "1,128"  # not a 1-token sequence
    assert _fixed_example(["batch", "seq"], {}) == "1,8"  # the benchmark's default size


def test_package_proves_the_ort_model_on_the_stored_samples_at_its_fixed_batch(
    cli, mlp_bundle, tmp_path
):
    """The stored samples (batches of 3, 1 and 4) did not fit a package at batch 2, so the
    .ort model was proven on 8 generated samples only (a derived bundle's eval data, 8 to a
    batch, never fitted batch 1); they are now cut into the fixed batch, as validate does."""
    stored = sum(len(a) for k, a in np.load(mlp_bundle / "parity.npz").items() if k[:2] == "in")
    out = tmp_path / "pkg"
    code, _, err = cli("package", mlp_bundle, "-o", out, "--target", "mobile",
                       "--fixed-shape", "x:2,64")  # fmt: skip
    assert code == 0, err
    mobile = json.loads((out / "manifest.json").read_text())["validation"]["mobile"]
    assert mobile["status"] == "passed" and mobile["samples"] == stored + 8, (stored, mobile)
