"""ONNX files as input: the zoo models shipped inside onnx (opset 9) and external data."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.conftest import tree_hash
from tests.helpers import ort_run

LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
ZOO = sorted(p.stem.removeprefix("light_") for p in LIGHT.glob("light_*.onnx"))


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_onnx_zoo_models_become_bundles(name, cli, tmp_path):
    source = LIGHT / f"light_{name}.onnx"
    out = tmp_path / name
    code, _, err = cli("convert", source, "-o", out, "--no-bench")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"] | {"attempts": None, "path": None} == {
        "framework": "onnx",
        "exporter": "none",
        "fallback_reason": None,
        "notes": [],
        "attempts": None,
        "path": None,
    }
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] == 0.0
    assert manifest["model"]["opset"] == onnx.load(source).opset_import[0].version
    # Initializers listed as graph inputs (IR 3) are not user inputs.
    assert [i["name"] for i in manifest["inputs"]] == [
        i.name
        for i in onnx.load(source).graph.input
        if i.name not in {t.name for t in onnx.load(source).graph.initializer}
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["squeezenet", "shufflenet"])
def test_onnx_zoo_models_quantize_static(name, cli, tmp_path):
    # Opset 9, IR 3 (every weight also a graph input), weights from ConstantOfShape, fixed
    # batch 1: the quantizer needs opset 13 for per-channel scales and no weight inputs.
    bundle = tmp_path / name
    assert cli("convert", LIGHT / f"light_{name}.onnx", "-o", bundle, "--no-bench")[0] == 0
    spec = json.loads((bundle / "manifest.json").read_text())["inputs"][0]
    rng = np.random.default_rng(0)
    calib = rng.uniform(0, 1, (6, *spec["shape"][1:])).astype(np.float32)
    np.savez(tmp_path / "calib.npz", **{spec["name"]: calib})
    out = tmp_path / "int8"
    code, _, err = cli("quantize", bundle, "-o", out, "--mode", "static",
                       "--calib", tmp_path / "calib.npz")  # fmt: skip
    assert code == 0, err
    step = json.loads((out / "manifest.json").read_text())["steps"][-1]
    assert step["metrics"]["preprocess"]["opset"] == 13
    assert step["metrics"]["quantize_static"]["gptq_rounded_nodes"] > 20
    quantized = onnx.load(str(out / "model.onnx"))
    assert sum(n.op_type == "DequantizeLinear" for n in quantized.graph.node) > 20
    x = calib[:1]
    want = ort_run(bundle / "model.onnx", {spec["name"]: x})[0]
    got = ort_run(out / "model.onnx", {spec["name"]: x})[0]
    assert got.shape == want.shape and np.isfinite(got).all()


def test_onnx_zoo_pruning_points_to_optimize_and_works_after_it(cli, tmp_path):
    """The light zoo models compute every weight with ConstantOfShape: nothing to prune until
    ONNX Runtime's offline optimization folds them into initializers."""
    bundle = tmp_path / "squeezenet"
    assert cli("convert", LIGHT / "light_squeezenet.onnx", "-o", bundle, "--no-bench")[0] == 0
    for method in ("channels", "magnitude"):
        code, _, err = cli("prune", bundle, "-o", tmp_path / method, "--method", method,
                           "--ratio", "0.5")  # fmt: skip
        assert code == 2 and "ConstantOfShape" in err and "--level basic" in err, err
    folded = tmp_path / "folded"
    assert cli("optimize", bundle, "-o", folded, "--level", "basic")[0] == 0
    code, _, err = cli("prune", folded, "-o", tmp_path / "pruned", "--method", "channels",
                       "--ratio", "0.5")  # fmt: skip
    assert code == 0, err
    metrics = json.loads((tmp_path / "pruned" / "manifest.json").read_text())["steps"][-1]
    assert metrics["metrics"]["params_after"] < metrics["metrics"]["params_before"]


def test_onnx_zoo_int4_points_to_optimize_too(cli, tmp_path):
    bundle = tmp_path / "resnet50"
    assert cli("convert", LIGHT / "light_resnet50.onnx", "-o", bundle, "--no-bench")[0] == 0
    code, _, err = cli("quantize", bundle, "-o", tmp_path / "q", "--mode", "int4")
    assert code == 2 and "ConstantOfShape" in err and "--level basic" in err, err


def test_external_data_input_is_read_and_reinlined(cli, tmp_path):
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((64, 32)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 32])],
        [numpy_helper.from_array(weight, "w")],
    )
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
        src / "mm.onnx",
        save_as_external_data=True,
        location="mm.onnx.data",
        size_threshold=0,
    )
    assert (src / "mm.onnx.data").stat().st_size == weight.nbytes
    before = tree_hash(src)
    code, _, err = cli("convert", src / "mm.onnx", "-o", tmp_path / "out", "--no-bench")
    assert code == 0, err
    assert tree_hash(src) == before
    out = tmp_path / "out"
    assert not (out / "model.onnx.data").exists()  # small enough to live inline
    x = rng.standard_normal((3, 64)).astype(np.float32)
    np.testing.assert_allclose(
        ort_run(out / "model.onnx", {"x": x})[0], x @ weight, rtol=1e-5, atol=1e-5
    )


def test_shape_constants_in_external_data_are_loaded_in_memory(cli, tmp_path):
    # ORT refuses to load this file (Reshape's shape is external); the model itself is fine
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["r"]),
         helper.make_node("Slice", ["r", "start", "end"], ["y"])], "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 6])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2, 3])],
        [numpy_helper.from_array(np.array([-1, 2, 3], np.int64), "shape"),
         numpy_helper.from_array(np.array([0], np.int64), "start"),
         numpy_helper.from_array(np.array([1], np.int64), "end")],
    )  # fmt: skip
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              src / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="w.bin", size_threshold=0)  # fmt: skip
    code, _, err = cli("convert", src / "m.onnx", "-o", tmp_path / "out", "--no-bench")
    assert code == 0, err
    x = np.arange(12, dtype=np.float32).reshape(2, 6)
    got = ort_run(tmp_path / "out" / "model.onnx", {"x": x})[0]
    np.testing.assert_array_equal(got, x.reshape(-1, 2, 3)[:1])


def test_missing_external_data_is_named(cli, tmp_path):
    weight = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "mm",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
        [weight],
    )
    onnx.save(
        helper.make_model(graph),
        tmp_path / "mm.onnx",
        save_as_external_data=True,
        location="mm.onnx.data",
        size_threshold=0,
    )
    data = (tmp_path / "mm.onnx.data").read_bytes()
    (tmp_path / "mm.onnx.data").unlink()
    code, _, err = cli("convert", tmp_path / "mm.onnx", "-o", tmp_path / "out")
    assert code == 2 and "mm.onnx" in err and "Traceback" not in err
    assert "Keep mm.onnx.data next to mm.onnx" in err.replace("\n", " "), err  # the user's files
    assert not (tmp_path / "out").exists()
    # a short data file (a copy cut off) blamed the .onnx: "a complete .onnx export"
    (tmp_path / "mm.onnx.data").write_bytes(data[:100])
    code, _, err = cli("convert", tmp_path / "mm.onnx", "-o", tmp_path / "out")
    err = err.replace("\n", " ")
    assert code == 2 and "external data (mm.onnx.data) cannot be read" in err, err
    assert "complete .onnx export" not in err and not (tmp_path / "out").exists()


def _noisy_model(path: Path, deterministic_output: bool) -> Path:
    """x @ w plus RandomNormalLike noise as output y; with ``deterministic_output`` also Relu z."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(4, 8)).astype("f"), "w")
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["m"]),
        helper.make_node("RandomNormalLike", ["m"], ["noise"], scale=0.1),
        helper.make_node("Add", ["m", "noise"], ["y"]),
    ]
    outputs = [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 8])]
    if deterministic_output:
        nodes.append(helper.make_node("Relu", ["m"], ["z"]))
        outputs.append(helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["b", 8]))
    graph = helper.make_graph(
        nodes,
        "noisy",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])],
        outputs,
        [weight],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_random_outputs_are_left_out_of_parity_and_gates(cli, tmp_path):
    model = _noisy_model(tmp_path / "noisy.onnx", deterministic_output=True)
    bundle = tmp_path / "b"
    code, out, err = cli("convert", model, "-o", bundle, "--no-bench")
    assert code == 0, err
    assert "not compared: y (random: RandomNormalLike)" in out
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["parity"]["not_compared"] == {"y": "RandomNormalLike"}
    assert [r["output"] for r in manifest["parity"]["outputs"]] == ["z"]
    # validate runs a new session: y differs from the stored outputs, z must still match
    code, out, err = cli("validate", bundle)
    assert code == 0, err
    record = json.loads((bundle / "manifest.json").read_text())["validation"]["cpu"]
    assert record["status"] == "passed" and record["not_compared"] == {"y": "RandomNormalLike"}
    code, _, err = cli(
        "quantize", bundle, "-o", tmp_path / "fp16", "--mode", "fp16", "--gate", "cosine>=0.999"
    )
    assert code == 0, err
    derived = json.loads((tmp_path / "fp16" / "manifest.json").read_text())
    assert derived["steps"][-1]["metrics"]["gate"]["cosine"] >= 0.999  # measured on z alone
    assert derived["parity"]["not_compared"] == {"y": "RandomNormalLike"}
    code, out, err = cli("compare", bundle, bundle, "--json")
    assert code == 0, err
    agreement = json.loads(out)["outputs"]
    assert agreement["not_compared"] == {"y": "RandomNormalLike"}
    assert agreement["max_abs_diff"] == 0.0  # z, the model against itself


def test_model_with_only_random_outputs_cannot_be_gated(cli, tmp_path):
    model = _noisy_model(tmp_path / "noisy.onnx", deterministic_output=False)
    assert cli("convert", model, "-o", tmp_path / "b", "--no-bench")[0] == 0
    code, _, err = cli("quantize", tmp_path / "b", "-o", tmp_path / "q", "--mode", "fp16")
    assert code == 2 and "every output depends on a random op (RandomNormalLike)" in err
    assert not (tmp_path / "q").exists()


def test_unsorted_graph_is_sorted_and_other_checker_faults_refused(cli, tmp_path):
    # Graph editors append nodes out of order: ORT runs it, the ONNX checker does not.
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])
    y = helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4])
    nodes = [helper.make_node("Relu", ["m"], ["y"]), helper.make_node("Neg", ["x"], ["m"])]
    unsorted = helper.make_model(
        helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)]
    )
    onnx.save(unsorted, tmp_path / "unsorted.onnx")
    code, _, err = cli("convert", tmp_path / "unsorted.onnx", "-o", tmp_path / "b", "--no-bench")
    assert code == 0, err
    model = onnx.load(str(tmp_path / "b" / "model.onnx"))
    onnx.checker.check_model(model)
    assert [n.op_type for n in model.graph.node] == ["Neg", "Relu"]
    # the fix reaches the handoff documents, not only the log
    note = "nodes sorted into topological order"
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert any(note in n for n in manifest["source"]["notes"])
    assert note in (tmp_path / "b" / "README.md").read_text().lower()
    assert note in (tmp_path / "b" / "report.html").read_text()
    feeds = {"x": np.array([[-1.0, 2.0, -3.0, 4.0]], np.float32)}
    np.testing.assert_array_equal(ort_run(tmp_path / "b" / "model.onnx", feeds)[0], [[1, 0, 3, 0]])
    # a node reading a tensor nobody produces is not a matter of order
    broken = helper.make_graph([helper.make_node("Relu", ["nowhere"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(broken), tmp_path / "broken.onnx")
    code, _, err = cli("convert", tmp_path / "broken.onnx", "-o", tmp_path / "c", "--no-bench")
    assert code == 2 and "fails the ONNX checker" in err and "broken.onnx" in err


def _matmul(path: Path, shape: list) -> Path:
    w = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(4, 3) / 10, "w")
    x = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g", [x],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 3])], [w],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, path)
    return path


def test_input_specs_are_the_models_own(cli, tmp_path):
    """The manifest's signature is the model's: an unnamed free dim was null in it, and an
    --input that named or fixed dims changed only the samples."""
    unnamed = _matmul(tmp_path / "unnamed.onnx", [None, 4])
    code, stdout, err = cli("convert", unnamed, "-o", tmp_path / "a", "--no-bench", "--json")
    assert code == 0, err
    assert json.loads(stdout)["inputs"][0]["shape"] == ["x_d0", 4]
    declared = onnx.load(tmp_path / "a" / "model.onnx").graph.input[0].type.tensor_type.shape
    assert [d.dim_param or d.dim_value for d in declared.dim] == ["x_d0", 4]
    code, stdout, err = cli("convert", unnamed, "-o", tmp_path / "b", "--no-bench", "--json",
                            "--input", "x:float32[n,4]")  # fmt: skip
    assert code == 0 and json.loads(stdout)["inputs"][0]["shape"] == ["n", 4], err
    # the outputs follow the inputs (they kept the file's shapes: null or stale symbols)
    code, stdout, err = cli("convert", unnamed, "-o", tmp_path / "e", "--no-bench", "--json",
                            "--input", "x:float32[2,4]")  # fmt: skip
    assert code == 0 and json.loads(stdout)["outputs"][0]["shape"] == [2, 3], err
    # a symbol fixed on one input is fixed on every input sharing it (y kept another batch)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "y"], ["z"])], "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, ["batch", 8]) for n in "xy"],
        [helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, ["batch", 8])],
    )  # fmt: skip
    shared = tmp_path / "shared.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), shared)
    code, stdout, err = cli("convert", shared, "-o", tmp_path / "s", "--no-bench", "--json",
                            "--input", "x:float32[2,8]")  # fmt: skip
    assert code == 0, err
    record = json.loads(stdout)
    assert [i["shape"] for i in record["inputs"]] == [[2, 8], [2, 8]]
    assert record["outputs"][0]["shape"] == [2, 8]
    # ... so two --input specs may not give it two sizes (ORT refused the model it wrote,
    # reported as "no exporter could convert the model")
    for other in ("y:float32[3,8]", "y:float32[batch,8]"):
        code, _, err = cli("convert", shared, "-o", tmp_path / "t", "--input", "x:float32[2,8]",
                           "--input", other)  # fmt: skip
        assert code == 2 and "share that dim" in err and "exporter" not in err, err
    code, _, err = cli("convert", shared, "-o", tmp_path / "t", "--no-bench",
                       "--input", "x:float32[2,8]", "--input", "y:float32[2,8]")  # fmt: skip
    assert code == 0, err
    # what the model fixes cannot be given otherwise, a symbol included
    fixed = _matmul(tmp_path / "fixed.onnx", [1, 4])
    code, _, err = cli("convert", fixed, "-o", tmp_path / "d", "--input", "x:float32[batch,4]")
    assert code == 2 and "contradicts" in err, err
    for spec, needle in (("x:float32[n,5]", "contradicts"), ("x:int64[n,4]", "not int64")):
        code, _, err = cli("convert", unnamed, "-o", tmp_path / "d", "--input", spec)
        assert code == 2 and needle in err and not (tmp_path / "d").exists(), err


def test_parity_says_when_the_reference_never_varies(cli, tmp_path):
    """A random-init Keras MobileNetV3Small outputs 0.1 for every class of every image: parity
    read 'max abs 0, top-1 1, passed' as proof of the conversion."""
    for name, op, constant in (("flat", "Mul", True), ("live", "Add", False)):
        nodes = [
            helper.make_node(op, ["x", "zero"], ["h"]),
            helper.make_node("Softmax", ["h"], ["y"]),
        ]
        zero = numpy_helper.from_array(np.zeros(4, np.float32), "zero")
        graph = helper.make_graph(
            nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 4])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 4])], [zero],
        )  # fmt: skip
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
                  tmp_path / f"{name}.onnx")  # fmt: skip
        code, out, err = cli(
            "convert", tmp_path / f"{name}.onnx", "-o", tmp_path / name, "--no-bench"
        )
        assert code == 0, err
        parity = json.loads((tmp_path / name / "manifest.json").read_text())["parity"]
        assert parity["passed"] and parity.get("constant_reference", False) is constant
        assert ("same outputs for every sample" in " ".join(out.split())) is constant
