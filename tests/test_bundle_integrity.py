"""What a bundle claims holds: edited or incomplete bundles are refused, derived parity is honest.

Also the bad-input edges of validate, bench, compare and package found by a bug sweep: each
gives exit 2 with the fix (or the right result), not an internal error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from tests.conftest import tree_hash


def _onnx_file(
    path: Path, outputs: tuple[str, ...] = ("y", "z"), batch: str | int = "batch"
) -> Path:
    """x [batch, 4] -> y = x W (4 -> 3), z = sum(x) per row: two outputs, in the order given."""
    w = np.arange(12, dtype=np.float32).reshape(4, 3) / 10
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["y"]),
        helper.make_node("ReduceSum", ["x", "axes"], ["z"], keepdims=0),
    ]
    shapes = {"y": [batch, 3], "z": [batch]}
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, shapes[n]) for n in outputs],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.fixture
def bundle(cli, tmp_path: Path, mlp_bundle: Path) -> Path:
    """A private copy of the converted MLP bundle, free to damage."""
    return Path(shutil.copytree(mlp_bundle, tmp_path / "b"))


def _edit_weights(model_file: Path) -> None:
    model = onnx.load(model_file)
    first = model.graph.initializer[0]
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first) * 2, first.name))
    onnx.save(model, model_file)


COMMANDS = {
    "validate": lambda b, t: ("validate", b),
    "bench": lambda b, t: ("bench", b, "--runs", "2"),
    "optimize": lambda b, t: ("optimize", b, "-o", t / "o"),
    "package": lambda b, t: ("package", b, "-o", t / "p", "--target", "mobile"),
    "compare": lambda b, t: ("compare", b, b, "--no-bench"),
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_an_edited_model_is_refused_by_every_command(cli, tmp_path, bundle, command):
    _edit_weights(bundle / "model.onnx")
    before = tree_hash(bundle)
    code, _, err = cli(*COMMANDS[command](bundle, tmp_path))
    assert code == 2, err
    assert "model.onnx: changed since onnxpipe wrote the bundle" in err
    assert "onnxpipe convert" in err  # the way out
    assert tree_hash(bundle) == before and not (tmp_path / "o").exists()
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("missing", ["model.onnx", "parity.npz"])
def test_an_incomplete_bundle_is_refused(cli, bundle, missing):
    (bundle / missing).unlink()
    code, _, err = cli("validate", bundle)
    assert code == 2 and f"incomplete: {missing} missing" in err


def test_the_card_says_what_dims_ids_and_parity_samples_are(cli, tmp_path, mlp_bundle):
    """No "any size works" for fixed shapes; ids bounded by their table; derived data named."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxpipe.card import render_card

    card = (mlp_bundle / "README.md").read_text()  # x: [batch, 64]
    assert "Symbolic dims (strings) are dynamic, within what the model" in card
    assert "generated ones at sizes of the symbolic dims the export never saw" in card
    fixed = helper.make_graph(
        [helper.make_node("Gather", ["t", "ids"], ["y"])], "g",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, [2, 3])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3, 4])],
        [numpy_helper.from_array(np.ones((7, 4), np.float32), "t")],
    )  # fmt: skip
    onnx.save(helper.make_model(fixed, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "f.onnx")  # fmt: skip
    assert cli("convert", tmp_path / "f.onnx", "-o", tmp_path / "f", "--no-bench")[0] == 0
    card = (tmp_path / "f" / "README.md").read_text()
    assert "Symbolic dims" not in card and "never saw" not in card
    assert "`ids` holds ids from 0 to 6: they index a table of 7 rows." in card
    code, _, err = cli("optimize", mlp_bundle, "-o", tmp_path / "o")
    assert code == 0, err
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["parity"]["reference"].endswith("on its stored samples plus generated ones")
    assert "never saw" not in render_card(manifest)


def test_a_derived_bundle_without_gate_says_not_gated(cli, tmp_path, mlp_bundle):
    out = tmp_path / "pruned"
    code, _, err = cli("prune", mlp_bundle, "-o", out, "--method", "magnitude", "--ratio", "0.9")
    assert code == 0, err
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["passed"] is None and parity["tolerance"] is None
    assert parity["cosine"] < 0.99  # 90% of the weights zeroed: it changed, and says by how much
    assert "| not gated |" in (out / "README.md").read_text()
    # the step's own CPU validation says so too (it ran before manifest.json was written)
    recorded = json.loads((out / "manifest.json").read_text())["validation"]["cpu"]
    assert recorded["reference"].startswith("stored outputs of this model on ORT CPU")
    code, out_text, err = cli("validate", out, "--json")
    cpu = json.loads(out_text)["cpu"]
    # parity.npz of a derived bundle holds that model's own outputs, and says so
    assert code == 0 and cpu["reference"].startswith("stored outputs of this model on ORT CPU")


def test_a_required_ep_is_validated_even_when_not_listed(cli, mlp_bundle, tmp_path):
    bundle = Path(shutil.copytree(mlp_bundle, tmp_path / "b"))
    code, out, _ = cli("validate", bundle, "--require", "cuda", "--json")
    results = json.loads(out)
    assert set(results) == {"cpu", "cuda"}
    if results["cuda"]["status"] == "unavailable":  # this machine: no CUDA
        assert code == 1
    else:
        assert code == (0 if results["cuda"]["status"] == "passed" else 1)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("validate", "{b}", "--atol", "-1"), "--atol -1.0: give a tolerance above 0"),
        (("validate", "{b}", "--atol", "nan"), "--atol nan"),
        (("bench", "{b}", "--threads", "-1"), "--threads '-1': -1 is below 0"),
        (("bench", "{b}", "--ep", "tensorrt"), "--ep tensorrt: TensorrtExecutionProvider"),
        (("optimize", "{b}", "-o", "{t}/o", "--transformer", "foo"), "'foo' is not one ORT"),
        (("optimize", "{b}", "-o", "{t}/o", "--num-heads", "4"), "only apply with transformer"),
        (("compare", "{b}", "{b}", "--no-bench", "--html", "{t}"), "is a directory"),
    ],
)
def test_bad_settings_are_exit_2(cli, bundle, tmp_path, args, message):
    pytest.importorskip("onnxruntime")
    if "tensorrt" in args[-1]:
        import onnxruntime as ort

        if "TensorrtExecutionProvider" in ort.get_available_providers():
            pytest.skip("this onnxruntime has TensorRT")
    before = tree_hash(bundle)
    filled = [a.format(b=bundle, t=tmp_path) for a in args]
    code, _, err = cli(*filled)
    assert code == 2 and message in err, err
    assert "Traceback" not in err and "pydantic" not in err
    assert tree_hash(bundle) == before


def test_bench_leaves_out_an_ep_this_machine_lacks(cli, bundle, caplog):
    """--ep cpu,tensorrt on a CPU-only build: the CPU records, and a warning for TensorRT."""
    import onnxruntime as ort

    if "TensorrtExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has TensorRT")
    code, out, err = cli("bench", bundle, "--ep", "cpu,tensorrt", "--runs", "3", "--json")
    assert code == 0, err
    assert [r["ep"] for r in json.loads(out)] == ["cpu"]
    assert "--ep tensorrt not benched" in caplog.text
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["bench"]["ep"] == "cpu"


def test_compare_pairs_outputs_by_name(cli, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("convert", _onnx_file(tmp_path / "a.onnx"), "-o", a, "--no-bench")[0] == 0
    swapped = _onnx_file(tmp_path / "b.onnx", outputs=("z", "y"))
    assert cli("convert", swapped, "-o", b, "--no-bench")[0] == 0
    code, out, _ = cli("compare", a, b, "--no-bench", "--json")
    agreement = json.loads(out)["outputs"]
    assert code == 0 and agreement["errors"] == []
    assert agreement["max_abs_diff"] == 0.0 and agreement["cosine"] == pytest.approx(1.0)


def test_compare_feeds_what_both_models_take(cli, tmp_path):
    """A dynamic-batch model against its batch-1 export: compared at batch 1, either way round."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("convert", _onnx_file(tmp_path / "a.onnx"), "-o", a, "--no-bench")[0] == 0
    fixed = _onnx_file(tmp_path / "b.onnx", batch=1)
    assert cli("convert", fixed, "-o", b, "--no-bench")[0] == 0
    for first, second in ((a, b), (b, a)):
        code, out, err = cli("compare", first, second, "--no-bench", "--json")
        assert code == 0, err
        assert json.loads(out)["outputs"]["max_abs_diff"] == 0.0


def test_compare_data_against_a_fixed_batch_names_the_samples_saved(cli, tmp_path):
    """6 samples against a fixed batch of 4: one message naming (6, 4), either way round."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli("convert", _onnx_file(tmp_path / "a.onnx"), "-o", a, "--no-bench")[0] == 0
    fixed = _onnx_file(tmp_path / "b.onnx", batch=4)
    assert cli("convert", fixed, "-o", b, "--no-bench")[0] == 0
    code, out, _ = cli("compare", a, b, "--no-bench")  # the table: A is the reference
    assert code == 0 and "reference" in out and "max abs 0" in out
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((6, 4), np.float32))
    for first, second in ((a, b), (b, a)):
        code, _, err = cli("compare", first, second, "--no-bench", "--data", data)
        assert code == 2 and "holds 6 samples (x [6, 4])" in err and "fixed batch of 4" in err
    np.savez(data, x=np.ones((8, 4), np.float32))
    assert cli("compare", a, b, "--no-bench", "--data", data)[0] == 0


def _two_inputs_sharing_seq(path: Path) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Mul", ["ids", "mask"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("ids", onnx.TensorProto.FLOAT, ["batch", "seq"]),
            helper.make_tensor_value_info("mask", onnx.TensorProto.FLOAT, ["batch", "seq"]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", "seq"])],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_fixed_shape_follows_shared_dims(cli, tmp_path):
    bundle = tmp_path / "b"
    assert cli("convert", _two_inputs_sharing_seq(tmp_path / "m.onnx"), "-o", bundle)[0] == 0
    out = tmp_path / "p"
    code, _, err = cli(
        "package", bundle, "-o", out, "--target", "mobile", "--fixed-shape", "ids:1,16"
    )
    assert code == 0, err
    mobile = json.loads((out / "manifest.json").read_text())["mobile"]
    assert mobile["fixed_shapes"] == {"ids": [1, 16], "mask": [1, 16]}  # mask shares batch, seq
    code, _, err = cli(
        "package", bundle, "-o", tmp_path / "q", "--target", "mobile",
        "--fixed-shape", "ids:1,16", "--fixed-shape", "mask:1,8",
    )  # fmt: skip
    assert code == 2 and "share dim 'seq' but are given 16 and 8" in err
    code, _, err = cli(
        "package", bundle, "-o", tmp_path / "q", "--target", "mobile",
        "--fixed-shape", "ids:1,16", "--fixed-shape", "ids:2,16",
    )  # fmt: skip
    assert code == 2 and "ids is given twice" in err and not (tmp_path / "q").exists()


def test_fixed_shape_names_may_hold_a_colon():
    from onnxpipe.converters.base import InputSpec
    from onnxpipe.ort_mobile import parse_fixed_shapes

    spec = InputSpec("input:0", "float32", ("batch", 3))
    assert parse_fixed_shapes(["input:0:2,3"], [spec]) == {"input:0": [2, 3]}


def test_generated_ids_stay_inside_a_small_table(cli, tmp_path):
    """Ids into a 10-row embedding: generated samples stay below 10 everywhere they are made."""
    from tests.conftest import model_ref

    out = tmp_path / "b"
    code, _, err = cli(
        "convert", model_ref("small_vocab"), "-o", out, "--input", "ids:int64[batch,seq]"
    )
    assert code == 0, err  # parity, validate and bench all ran on generated ids
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["index_limit"] == 10
    ids = [v for k, v in np.load(out / "parity.npz").items() if k.startswith("in")]
    assert ids and all(a.max() < 10 and a.min() >= 0 for a in ids)
    assert cli("bench", out, "--batch", "1,8", "--runs", "3")[0] == 0
    assert cli("optimize", out, "-o", tmp_path / "o")[0] == 0


_INDEXING = """
import torch
import torch.nn as nn


class Shifted(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Embedding(10, 4)

    def forward(self, ids):
        return self.table(ids + 3)  # ids 0..6 only


class Rows(nn.Module):
    def __init__(self):
        super().__init__()
        self.rows = nn.Parameter(torch.randn(5, 4))

    def forward(self, ids):
        return self.rows[ids]


class OneHot(nn.Module):
    def forward(self, ids):
        return nn.functional.one_hot(ids, 6).float()
"""


@pytest.mark.parametrize(("name", "limit"), [("Shifted", 7), ("Rows", 5)])
def test_ids_shifted_or_indexing_a_parameter_stay_inside_the_table(cli, tmp_path, name, limit):
    """``table(ids + 3)`` and ``param[ids]`` convert without --data; later runs stay in range."""
    (tmp_path / "idx.py").write_text(_INDEXING)
    out = tmp_path / "b"
    code, _, err = cli(
        "convert", f"{tmp_path / 'idx.py'}:{name}", "-o", out, "--input", "ids:int64[batch,seq]"
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["inputs"][0]["index_limit"] == limit
    assert cli("bench", out, "--batch", "1,8", "--runs", "3")[0] == 0


def test_a_model_refusing_generated_ids_is_exported_on_the_data(cli, tmp_path):
    """one_hot(ids, 6) leaves no table in the graph: generated ids fail; --data converts it."""
    (tmp_path / "idx.py").write_text(_INDEXING)
    source = f"{tmp_path / 'idx.py'}:OneHot"
    code, _, err = cli("convert", source, "-o", tmp_path / "a", "--input", "ids:int64[batch]")
    assert code == 2 and "--data" in err and not (tmp_path / "a").exists()
    data = tmp_path / "ids.npz"
    np.savez(data, ids=np.arange(8, dtype=np.int64) % 6)
    out = tmp_path / "b"
    code, _, err = cli("convert", source, "-o", out, "--input", "ids:int64[batch]", "--data", data)
    assert code == 0, err
    assert json.loads((out / "manifest.json").read_text())["parity"]["passed"] is True
    np.savez(data, ids=np.full(8, 9, dtype=np.int64))
    code, _, err = cli("convert", source, "-o", tmp_path / "c", "--input", "ids:int64[batch]",
                       "--data", data)  # fmt: skip
    assert code == 2 and "ids.npz" in err


def test_a_model_that_cannot_run_generated_samples_asks_for_data(cli, tmp_path):
    """A shape tensor as input (onnx's test_expand_shape_model1): random values cannot run."""
    graph = helper.make_graph(
        [helper.make_node("Expand", ["x", "shape"], ["y"])],
        "g",
        [
            helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [3, 1]),
            helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [2]),
        ],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [3, "n"])],
    )
    path = tmp_path / "expand.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, _, err = cli("convert", path, "-o", tmp_path / "b")
    assert code == 2 and "cannot run the sample inputs onnxpipe generated" in err
    assert "--data" in err and not (tmp_path / "b").exists()
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((3, 1), np.float32), shape=np.array([3, 4], np.int64))
    code, _, err = cli("convert", path, "-o", tmp_path / "b", "--data", data, "--no-bench")
    assert code == 0, err  # parity on the given data alone


def test_a_scalar_input_model_runs_through_every_command(cli, tmp_path):
    """x: float32[] (a 0-d input) -> y = 2x: convert, --data, bench, optimize and the card."""
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [])],
    )
    path = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.array(1.5, np.float32))
    bundle = tmp_path / "b"
    code, _, err = cli("convert", path, "-o", bundle, "--data", data)
    assert code == 0, err  # with bench, on a 0-d feed
    assert cli("optimize", bundle, "-o", tmp_path / "o")[0] == 0  # its gate metrics
    card = (bundle / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(
        compile(snippet.replace('"model.onnx"', repr(str(bundle / "model.onnx"))), "card", "exec"),
        namespace,
    )
    assert namespace["outputs"][0].shape == ()


def test_non_tensor_io_is_refused_naming_the_file(cli, tmp_path):
    graph = helper.make_graph(
        [helper.make_node("SplitToSequence", ["x"], ["s"], axis=0)],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_sequence_value_info("s", onnx.TensorProto.FLOAT, None)],
    )
    path = tmp_path / "seq.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    code, _, err = cli("convert", path, "-o", tmp_path / "b")
    assert code == 2 and f"{path}: output 's' is a Sequence" in err and "not a tensor" in err


def test_package_survives_a_graph_the_partition_checker_cannot_read(cli, tmp_path):
    """A RandomNormalLike output: ORT's usability checker raises; the .ort is still made."""
    graph = helper.make_graph(
        [
            helper.make_node("RandomNormalLike", ["x"], ["r"]),
            helper.make_node("Relu", ["x"], ["y"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [
            helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("r", onnx.TensorProto.FLOAT, ["batch", 4]),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    path = tmp_path / "rand.onnx"
    onnx.save(model, path)
    assert cli("convert", path, "-o", tmp_path / "b", "--no-bench")[0] == 0
    code, _, err = cli("package", tmp_path / "b", "-o", tmp_path / "p", "--target", "mobile")
    assert code == 0, err
    mobile = json.loads((tmp_path / "p" / "manifest.json").read_text())["mobile"]
    assert (tmp_path / "p" / "mobile" / "model.ort").is_file()
    for ep in ("nnapi", "coreml"):
        if mobile[ep]["partitions"] is None:  # this ORT's checker cannot read the graph
            assert "usability checker could not analyse" in mobile[ep]["reason"]


def test_a_swapped_ort_file_is_refused(cli, tmp_path, mlp_bundle):
    out = tmp_path / "p"
    assert cli("package", mlp_bundle, "-o", out, "--target", "mobile")[0] == 0
    (out / "mobile" / "model.ort").write_bytes(b"not the packaged model")
    code, _, err = cli("validate", out, "--ep", "mobile")
    assert code == 2 and "mobile/model.ort: changed since onnxpipe wrote the bundle" in err


def test_a_data_rank_error_shows_the_shape_as_saved(tmp_path):
    from onnxpipe.converters.base import InputSpec
    from onnxpipe.data import load_data
    from onnxpipe.errors import InputError

    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones(16, np.float32))
    with pytest.raises(InputError, match=r"'x' has shape \[16\], the model takes \['batch', 16\]"):
        load_data(str(data), [InputSpec("x", "float32", ("batch", 16))])


def test_an_ort_file_of_another_model_fails_mobile_validation(cli, tmp_path, mlp_bundle):
    """A bundle without the .ort hash (older manifests): the foreign .ort still fails, exit 1."""
    out, other = tmp_path / "p", tmp_path / "other"
    assert cli("package", mlp_bundle, "-o", out, "--target", "mobile")[0] == 0
    assert (
        cli("convert", _two_inputs_sharing_seq(tmp_path / "m.onnx"), "-o", tmp_path / "b")[0] == 0
    )
    assert cli("package", tmp_path / "b", "-o", other, "--target", "mobile")[0] == 0
    shutil.copy(other / "mobile" / "model.ort", out / "mobile" / "model.ort")
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["mobile"]["ort_sha256"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    code, text, _ = cli("validate", out, "--ep", "mobile", "--json")
    result = json.loads(text)["mobile"]
    assert code == 1 and result["status"] == "failed" and "was not made from it" in result["reason"]


def test_input_paths_finds_sources_data_and_image_folders(tmp_path):
    from onnxpipe.bundle import input_paths

    (tmp_path / "net.py").write_text("")
    (tmp_path / "photos").mkdir()
    found = input_paths(
        f"{tmp_path / 'net.py'}:make", [f"{tmp_path / 'photos'}?resize=256,crop=224"], "cpu", None
    )
    assert found == (tmp_path / "net.py", tmp_path / "photos")


def test_a_recipe_steps_data_is_protected_from_out(tmp_path):
    """A recipe's quantize calib folder was replaced by the bundle (exit 0)."""
    from onnxpipe.bundle import input_paths
    from onnxpipe.recipe import load_recipe

    (tmp_path / "calib").mkdir()
    (tmp_path / "m.onnx").write_bytes(b"")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: m.onnx\nsteps:\n  - convert\n  - quantize: {mode: static, "
                      "calib: calib}\n")  # fmt: skip
    assert tmp_path / "calib" in input_paths(*load_recipe(recipe))


def test_a_module_reference_protects_its_package_from_out(cli, tmp_path, monkeypatch):
    """``convert mypkg.mod:make -o mypkg --overwrite`` replaced the package with the bundle."""
    package = tmp_path / "mypkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mod.py").write_text(
        "import torch.nn as nn\n\ndef make():\n    return nn.Linear(4, 2)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = cli("convert", "mypkg.mod:make", "-o", "mypkg", "--overwrite",
                       "--input", "x:float32[batch,4]")  # fmt: skip
    assert code == 2 and "is (or contains, or is inside) the input" in err, err
    assert sorted(p.name for p in package.iterdir()) == ["__init__.py", "mod.py"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        (lambda m: m["model"].pop("sha256"), "model.sha256"),
        (lambda m: m.pop("inputs"), "inputs"),
        (lambda m: m.update(model="model.onnx"), "model"),
        (lambda m: m.pop("steps"), "steps"),
        (lambda m: m["model"].update(bytes="12"), "model.bytes"),
        (lambda m: m.update(parity="x"), "parity"),
        (lambda m: m.update(steps=[1]), "steps"),
        (lambda m: m.update(validation=[1]), "validation"),
        (lambda m: m["model"].update(external_data="x"), "model.external_data"),
        (lambda m: m["steps"][0].update(metrics="x"), "steps[0].metrics"),
        (lambda m: m["parity"].update(cosine="x"), "parity.cosine"),
        (lambda m: m.update(bench_records=[{"ep": "cpu"}]), "bench_records[0].latency_ms"),
        (lambda m: m.update(mobile={"ort_file": 5}), "mobile.ort_file"),
        (lambda m: m.update(validation={"cpu": {"status": 5}}), "validation.cpu.status"),
    ],
)
def test_a_damaged_manifest_is_exit_2(cli, bundle, change, needle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    before = tree_hash(bundle)
    for args in (("validate", bundle), ("bench", bundle, "--runs", "2")):
        code, _, err = cli(*args)
        assert code == 2 and needle in err and "the manifest is damaged" in err, err
        assert "literal[" not in err  # a union branch's name is no manifest key
    assert tree_hash(bundle) == before  # validate rewrote the manifest, then crashed (exit 3)


@pytest.mark.parametrize(
    ("text", "needle"),
    [(b"[]", "JSON array"), (b"null", "JSON null"), (b'"x"', "JSON string"),
     (b"\xff\xfe{}", "not valid JSON")],
)  # fmt: skip
def test_a_manifest_that_is_no_json_object_is_exit_2(cli, bundle, tmp_path, text, needle):
    (bundle / "manifest.json").write_bytes(text)
    for command in COMMANDS.values():
        code, _, err = cli(*command(bundle, tmp_path))
        assert code == 2 and needle in err and "damaged" in err, err


def test_a_file_that_cannot_be_read_is_exit_2_naming_it(cli, bundle, monkeypatch):
    """Another user's bundle (mode 000): validate, compare and quantize were exit 3."""
    import onnxpipe.bundle as bundle_module

    def denied(*_: object, **__: object) -> None:
        raise PermissionError(13, "Permission denied", str(bundle / "manifest.json"))

    monkeypatch.setattr(bundle_module.json, "loads", denied)
    code, _, err = cli("validate", bundle)
    assert code == 2 and f"{bundle / 'manifest.json'}: Permission denied" in err, err


def test_a_read_only_bundle_is_exit_2_before_validate_or_bench_work(cli, bundle, monkeypatch):
    """Both ran fully, then failed with exit 3 writing the manifest; the numbers were lost."""
    import onnxpipe.bundle_checks as checks

    def denied(**_: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(checks.tempfile, "mkstemp", denied)
    ran = []
    monkeypatch.setattr("onnxpipe.bundle_ops.validate_bundle", lambda *a: ran.append(a))
    monkeypatch.setattr("onnxpipe.bundle_ops.bench_model", lambda *a: ran.append(a))
    for command in ("validate", "bench"):
        code, _, err = cli(command, bundle)
        assert code == 2 and "cannot be written (Permission denied)" in err, err
        assert "records its results" in err and "cp -r" in err
    assert not ran


@pytest.mark.parametrize(
    "change",
    [
        lambda m: m["inputs"][0].update(name="renamed"),
        lambda m: m["inputs"][0].update(shape=["batch", 32]),
        lambda m: m["outputs"][0].update(dtype="float16"),
    ],
)
def test_a_manifest_signature_other_than_the_models_is_exit_2(cli, bundle, change):
    """validate passed such a bundle; bench and package were exit 3."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    for args in (("validate", bundle), ("bench", bundle, "--runs", "2")):
        code, _, err = cli(*args)
        assert code == 2 and "are not those of model.onnx" in err, err


def test_edited_or_damaged_parity_samples_are_exit_2(cli, bundle):
    """Edited reference outputs made validate blame the model (exit 1, written into the
    manifest); a truncated parity.npz was exit 3 in every command."""
    assert json.loads((bundle / "manifest.json").read_text())["parity_samples"]["sha256"]
    original = (bundle / "parity.npz").read_bytes()
    arrays = dict(np.load(bundle / "parity.npz"))
    key = next(k for k in arrays if k.startswith("out"))
    arrays[key] = arrays[key] + 1.0
    np.savez(bundle / "parity.npz", **arrays)
    code, _, err = cli("validate", bundle)
    assert code == 2 and "parity.npz: changed since onnxpipe wrote the bundle" in err
    (bundle / "parity.npz").write_bytes(original[: len(original) // 2])
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest.pop("parity_samples")  # a bundle written before the hash was recorded
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = cli("validate", bundle)
    assert code == 2 and "stored parity samples are damaged" in err, err


def test_a_packaged_bundle_without_its_operators_config_is_exit_2(cli, bundle, tmp_path):
    out = tmp_path / "pkg"
    assert cli("package", bundle, "-o", out, "--target", "mobile")[0] == 0
    (out / "mobile" / "required_operators.config").unlink()
    code, _, err = cli("validate", out, "--ep", "cpu,mobile")
    assert code == 2 and "required_operators.config missing" in err


def test_unrecorded_external_data_is_refused(cli, bundle):
    (bundle / "model.onnx.data").write_bytes(b"\0" * 64)
    code, _, err = cli("bench", bundle, "--runs", "2")
    assert code == 2 and "model.onnx.data, which its manifest does not record" in err


def test_recipe_and_compared_bundles_are_not_overwritten(cli, tmp_path, mlp_bundle):
    folder = tmp_path / "rdir"
    folder.mkdir()
    recipe = folder / "r.yaml"
    # a module reference: a missing file would be refused first, as found nowhere
    recipe.write_text("source: nowhere:make\nsteps:\n  - convert\n")
    code, _, err = cli("run", recipe, "-o", folder, "--overwrite")
    assert code == 2 and "is (or contains, or is inside) the input" in err and recipe.exists()
    before = tree_hash(mlp_bundle)
    page = mlp_bundle / "manifest.json"
    code, _, err = cli("compare", mlp_bundle, mlp_bundle, "--no-bench", "--html", page)
    assert code == 2 and "inside the compared bundle" in err and tree_hash(mlp_bundle) == before
    data = tmp_path / "data.npz"
    np.savez(data, x=np.ones((2, 64), np.float32))
    kept = data.read_bytes()
    code, _, err = cli(
        "compare", mlp_bundle, mlp_bundle, "--no-bench", "--data", data, "--html", data
    )
    assert code == 2 and "--data input" in err and data.read_bytes() == kept


def test_index_limits_reach_package_compare_and_derived_bundles(cli, tmp_path):
    from tests.conftest import model_ref

    out = tmp_path / "b"
    spec = "ids:int64[batch,seq]"
    assert (
        cli("convert", model_ref("small_vocab"), "-o", out, "--input", spec, "--no-bench")[0] == 0
    )
    code, _, err = cli("package", out, "-o", tmp_path / "p", "--target", "mobile")
    assert code == 0, err
    assert cli("compare", out, out, "--no-bench")[0] == 0
    code, _, err = cli("quantize", out, "-o", tmp_path / "q", "--mode", "fp16")
    assert code == 0, err
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["inputs"][0]["index_limit"] == 10


def test_data_the_model_cannot_run_is_bad_input_and_changes_nothing(cli, tmp_path):
    """Ids past the embedding table: exit 2 naming the data, the bundle's record untouched."""
    from tests.conftest import model_ref

    out = tmp_path / "b"
    spec = "ids:int64[batch,seq]"
    assert (
        cli("convert", model_ref("small_vocab"), "-o", out, "--input", spec, "--no-bench")[0] == 0
    )
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=np.full((2, 3), 12, np.int64))  # the table has 10 rows
    before = tree_hash(out)
    code, _, err = cli("validate", out, "--data", bad)
    assert code == 2 and "bad.npz" in err and "cannot run this data" in err, err
    assert tree_hash(out) == before  # validation.cpu stays passed
    # the dynamic path reads --eval for its statistics before any gate measured it
    code, _, err = cli("quantize", out, "-o", tmp_path / "q", "--mode", "dynamic", "--eval", bad)
    assert code == 2 and "bad.npz" in err and "fails on this data" in err, err
    assert not (tmp_path / "q").exists() and tree_hash(out) == before


def test_a_successful_run_removes_an_earlier_failed_report(cli, tmp_path, mlp_bundle):
    """OUT.failed.json of an earlier failed run stayed beside the bundle that now stands."""
    out = tmp_path / "o"
    (tmp_path / "o.failed.json").write_text('{"failed_step": "optimize"}')
    code, _, err = cli("optimize", mlp_bundle, "-o", out)
    assert code == 0, err
    assert not (tmp_path / "o.failed.json").exists()


def test_a_folder_at_the_failed_report_path_is_left_as_it_is(cli, tmp_path, mlp_bundle):
    """OUT.failed.json as a user's folder was exit 3 (gate failed; bundle written): now kept."""
    out = tmp_path / "q"
    folder = tmp_path / "q.failed.json"
    (folder / "keep").mkdir(parents=True)
    code, _, err = cli("quantize", mlp_bundle, "-o", out, "--mode", "fp16",
                       "--gate", "max_abs<=1e-12")  # fmt: skip
    assert code == 1 and "max_abs" in err and "is not a file, left as it is" in err, err
    assert not out.exists() and (folder / "keep").is_dir()
    code, _, err = cli("optimize", mlp_bundle, "-o", out)
    assert code == 0, err
    assert (folder / "keep").is_dir()


def test_validate_cpu_with_data_does_not_count_its_own_run_as_source_parity(
    cli, tmp_path, mlp_bundle
):
    """--data's reference is the CPU run: on cpu it was counted as 'source-framework' parity."""
    bundle = tmp_path / "b"
    shutil.copytree(mlp_bundle, bundle)
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32))
    code, stdout, err = cli("validate", bundle, "--ep", "cpu", "--json")
    assert code == 0, err
    plain = json.loads(stdout)["cpu"]
    code, stdout, err = cli("validate", bundle, "--ep", "cpu", "--data", data, "--json")
    assert code == 0, err
    cpu = json.loads(stdout)["cpu"]
    assert cpu["samples"] == plain["samples"]  # the stored samples only
    assert "--data ran on cpu" in cpu["reference"], cpu


def test_a_batch_too_large_to_generate_is_exit_2(cli, mlp_bundle):
    """bench --batch 99999999999 asked numpy for 23 TiB in its worker: exit 3."""
    code, _, err = cli("bench", mlp_bundle, "--batch", "99999999999")
    assert code == 2 and "more than onnxpipe generates for one input" in err, err
