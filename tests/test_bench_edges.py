"""bench and package on the edges a bug sweep found: which dim is the batch, what a fixed batch
times, bounded warmup and threads, graphs ORT folds away, unrecorded mobile files and manifest
index limits. Each on a hand-built graph of a few nodes."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from tests.conftest import tree_hash


def _save(path: Path, nodes, inputs, outputs, initializers=()) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def _bundle(cli, tmp_path: Path, name: str, *graph) -> Path:
    out = tmp_path / name
    code, _, err = cli("convert", _save(tmp_path / f"{name}.onnx", *graph), "-o", out, "--no-bench")
    assert code == 0, err
    return out


def _tensor(name: str, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def _fixed(cli, tmp_path: Path, batch: int = 4) -> Path:
    """x [batch, 3] -> Relu: an ONNX file exported at a fixed batch."""
    relu = [helper.make_node("Relu", ["x"], ["y"])]
    return _bundle(
        cli, tmp_path, "fixed", relu, [_tensor("x", [batch, 3])], [_tensor("y", [batch, 3])]
    )


@pytest.mark.parametrize("first", [[], [1, 4]], ids=["scalar", "fixed"])
def test_bench_takes_the_batch_from_the_batched_input(cli, tmp_path, first):
    """A scalar or fixed [1, 4] first input: the worker read axis 0 of the first feed, so the
    batch-4 record said batch 1 (and a quarter of its throughput)."""
    bundle = _bundle(
        cli, tmp_path, "b", [helper.make_node("Mul", ["x", "s"], ["y"])],
        [_tensor("s", first), _tensor("x", ["N", 4])], [_tensor("y", ["N", 4])],
    )  # fmt: skip
    code, out, err = cli("bench", bundle, "--batch", "1,4", "--runs", "3", "--json")
    assert code == 0, err
    records = json.loads(out)
    assert [r["batch"] for r in records] == [1, 4]
    assert [r["shapes"]["x"][0] for r in records] == [1, 4]
    four = records[1]
    assert four["throughput_per_s"] == pytest.approx(4000 / np.median(four["samples_ms"]), rel=0.2)


def test_bench_gives_one_record_per_key_and_times_a_fixed_batch_once(cli, tmp_path, caplog):
    bundle = _fixed(cli, tmp_path)
    caplog.set_level(logging.WARNING)
    code, out, err = cli("bench", bundle, "--batch", "1,4", "--runs", "3", "--json")
    assert code == 0, err
    assert [r["batch"] for r in json.loads(out)] == [4]  # was two batch-4 records
    assert "takes batch 4 only" in caplog.text and "not 1" in caplog.text
    code, out, err = cli("bench", bundle, "--batch", "4,4", "--threads", "1,1", "--ep", "cpu,cpu",
                         "--runs", "3", "--json")  # fmt: skip
    assert code == 0, err
    assert [(r["ep"], r["batch"], r["threads"]) for r in json.loads(out)] == [("cpu", 4, 1)]


def test_the_fixed_batch_hint_of_an_onnx_source_is_one_convert_takes(cli, tmp_path):
    """'convert again with --input name:float32[batch,...]' is refused for an ONNX file whose
    batch is fixed ('contradicts the model's [4, 3]'): the model must be exported again."""
    bundle = _fixed(cli, tmp_path)
    code, _, err = cli("bench", bundle, "--batch", "8", "--runs", "3")
    assert code == 2 and "--batch 8" in err and "re-export the model" in err, err
    assert "convert again" not in err
    code, _, err = cli("convert", tmp_path / "fixed.onnx", "-o", tmp_path / "again", "--input",
                       "x:float32[batch,3]")  # fmt: skip
    assert code == 2 and "contradicts" in err  # what the old hint led to


@pytest.mark.parametrize("threads", ["3000000000", "99999999999999999999", "5000"])
def test_bench_refuses_thread_counts_past_its_maximum_up_front(cli, tmp_path, threads):
    from onnxpipe.bench import MAX_THREADS

    bundle = _fixed(cli, tmp_path)
    before = tree_hash(bundle)
    code, _, err = cli("bench", bundle, "--threads", f"1,{threads}", "--runs", "3")
    assert code == 2 and f"--threads {threads}" in err and f"at most {MAX_THREADS}" in err, err
    assert tree_hash(bundle) == before
    assert MAX_THREADS >= 64


def test_warmup_stops_at_the_time_limit_and_says_how_many_ran(cli, tmp_path):
    from onnxpipe.benchworker import run

    bundle = _fixed(cli, tmp_path)
    request = {"model": str(bundle / "model.onnx"), "inputs": [
        {"name": "x", "dtype": "float32", "shape": [4, 3]}], "ep": "cpu", "batch": 4,
        "threads": 1, "runs": 3, "warmup": 10**7, "max_seconds": 0.2}  # fmt: skip
    record = run(request)
    assert 0 < record["warmup_runs"] < 10**7 and record["runs"] == 3


def test_a_worker_past_its_time_is_exit_2_naming_runs_and_warmup(cli, tmp_path, monkeypatch):
    bundle = _fixed(cli, tmp_path)

    def slow(*args, **kwargs):
        raise subprocess.TimeoutExpired(args[0], kwargs["timeout"])

    monkeypatch.setattr("onnxpipe.bench.subprocess.run", slow)
    code, _, err = cli("bench", bundle, "--warmup", "80000")
    assert code == 2 and "--runs" in err and "--warmup" in err and "Traceback" not in err, err


def test_only_a_failure_about_shapes_blames_the_dynamic_dims(cli, tmp_path, monkeypatch):
    bundle = _bundle(
        cli, tmp_path, "seq", [helper.make_node("Relu", ["x"], ["y"])],
        [_tensor("x", ["batch", "seq"])], [_tensor("y", ["batch", "seq"])],
    )  # fmt: skip
    failed = subprocess.CompletedProcess([], 1, "", "MemoryError: std::bad_alloc")
    monkeypatch.setattr("onnxpipe.bench.subprocess.run", lambda *a, **k: failed)
    code, _, err = cli("bench", bundle, "--runs", "3")
    assert code == 3 and "bad_alloc" in err and "dynamic dims" not in err and "--size" not in err
    from onnxpipe.benchworker import RUN_FAILED_EXIT

    shape = "run failed: InvalidArgument: [ONNXRuntimeError] : 2 : Got invalid dimensions"
    failed = subprocess.CompletedProcess([], RUN_FAILED_EXIT, "", shape)
    code, _, err = cli("bench", bundle, "--runs", "3")
    assert code == 2 and "dynamic dims at seq=8" in err and "--size seq=N" in err, err


def _shape_of_fixed_input(cli, tmp_path) -> Path:
    """Shape -> Cast of a fixed [2, 4] input: ORT folds it all into a constant."""
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]  # fmt: skip
    return _bundle(cli, tmp_path, "shp", nodes, [_tensor("x", [2, 4])], [_tensor("y", [2])])


def test_package_of_a_graph_ort_folds_to_no_nodes(cli, tmp_path):
    """partitions() divided by the optimized graph's node count: ZeroDivisionError, exit 3."""
    out = tmp_path / "pkg"
    code, _, err = cli("package", _shape_of_fixed_input(cli, tmp_path), "-o", out, "--target",
                       "mobile")  # fmt: skip
    assert code == 0, err
    mobile = json.loads((out / "manifest.json").read_text())["mobile"]
    for ep in ("nnapi", "coreml"):
        assert mobile[ep]["nodes_total"] == 0 and mobile[ep]["partitions"] == 0
        assert mobile[ep]["suitability"] == "none" and "no nodes" in mobile[ep]["reason"]
    assert cli("validate", out, "--ep", "mobile")[0] == 0


def test_an_unrecorded_mobile_model_is_refused(cli, tmp_path):
    """Another bundle's mobile/ folder copied in was timed by bench --ep mobile and recorded."""
    packaged = tmp_path / "pkg"
    assert cli("package", _shape_of_fixed_input(cli, tmp_path), "-o", packaged, "--target",
               "mobile")[0] == 0  # fmt: skip
    bundle = _fixed(cli, tmp_path, batch=2)
    shutil.copytree(packaged / "mobile", bundle / "mobile")
    before = tree_hash(bundle)
    for args in (("bench", bundle, "--ep", "mobile", "--runs", "3"),
                 ("validate", bundle, "--ep", "mobile")):  # fmt: skip
        code, _, err = cli(*args)
        assert code == 2 and "mobile/model.ort is not recorded in the manifest" in err, err
        assert "run package again" in err
    assert tree_hash(bundle) == before
    (packaged / "mobile" / "model.ort").write_bytes(b"other")  # recorded, but changed
    code, _, err = cli("bench", packaged, "--ep", "mobile", "--runs", "3")
    assert code == 2 and "changed since onnxpipe wrote the bundle" in err


@pytest.mark.parametrize(("limit", "needle"), [
    ("abc", "inputs[0].index_limit missing or of the wrong type"),
    (0, "inputs[0].index_limit missing or of the wrong type"),
    (1000000, "inputs[0].index_limit is 1000000, but ids indexes a table of 50 rows"),
])  # fmt: skip
def test_a_damaged_index_limit_is_exit_2_before_any_run(cli, tmp_path, limit, needle):
    """1000000 on a 50-row table crashed package (ORT Gather out of range) and optimize."""
    table = numpy_helper.from_array(np.ones((50, 4), np.float32), "table")
    bundle = _bundle(
        cli, tmp_path, "emb", [helper.make_node("Gather", ["table", "ids"], ["y"])],
        [_tensor("ids", ["batch", "seq"], TensorProto.INT64)], [_tensor("y", ["batch", "seq", 4])],
        [table],
    )  # fmt: skip
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["inputs"][0]["index_limit"] == 50
    manifest["inputs"][0]["index_limit"] = limit
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    for args in (
        ("package", bundle, "-o", tmp_path / "p", "--target", "mobile"),
        ("optimize", bundle, "-o", tmp_path / "o"),
        ("bench", bundle, "--runs", "2"),
    ):
        code, _, err = cli(*args)
        assert code == 2 and needle in err and "Traceback" not in err, err


def _two_symbols(cli, tmp_path: Path, *convert_args: str) -> Path:
    """x [batch, seq] -> Relu, z [batch, hid] -> Relu: two dynamic dims besides the batch."""
    nodes = [helper.make_node("Relu", ["x"], ["y"]), helper.make_node("Relu", ["z"], ["w"])]
    graph = helper.make_graph(
        nodes, "g", [_tensor("x", ["batch", "seq"]), _tensor("z", ["batch", "hid"])],
        [_tensor("y", ["batch", "seq"]), _tensor("w", ["batch", "hid"])],
    )  # fmt: skip
    source = tmp_path / "two.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    out = tmp_path / "two"
    code, _, err = cli("convert", source, "-o", out, "--no-bench", *convert_args)
    assert code == 0, err
    return out


def _edit_manifest(bundle: Path, change) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    change(manifest)
    (bundle / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("size", [0, -3, 2.5, "x", True], ids=str)
@pytest.mark.parametrize("key", ["bench.shapes", "source.data_sizes"])
def test_a_recorded_size_that_is_no_size_is_exit_2_naming_the_manifest(cli, tmp_path, size, key):
    """-3 crashed the benchmark worker (exit 3), 0 timed empty tensors, and 2.5, "x" and true
    were timed at 8, 8 and 1 without a word."""
    data = tmp_path / "d.npz"
    np.savez(data, x=np.ones((2, 6), np.float32), z=np.ones((2, 5), np.float32))
    bundle = _two_symbols(cli, tmp_path, "--data", data)
    assert cli("bench", bundle, "--runs", "2")[0] == 0

    def damage(manifest):
        if key == "bench.shapes":
            manifest["bench"]["shapes"]["x"][1] = size
        else:
            manifest["source"]["data_sizes"]["seq"] = size

    _edit_manifest(bundle, damage)
    before = tree_hash(bundle)
    where = "bench.shapes.x[1]" if key == "bench.shapes" else "source.data_sizes.seq"
    for args in (("bench", bundle, "--runs", "2"), ("validate", bundle)):
        code, _, err = cli(*args)
        assert code == 2 and "Traceback" not in err, err
        assert f"{bundle / 'manifest.json'}: {where}, the recorded size of dim 'seq'" in err
        assert f"is {json.dumps(size)}; a size must be an integer >= 1" in err
    assert tree_hash(bundle) == before


def _shapes(out: str) -> list[dict]:
    return [r["shapes"] for r in json.loads(out)]


def test_size_overrides_the_recorded_sizes_of_the_symbols_it_names_only(cli, tmp_path):
    """--size seq=4 on a bundle timed at seq=16, hid=5 timed hid at 8: the recorded sizes were
    dropped whole as soon as one --size was given."""
    bundle = _two_symbols(cli, tmp_path)
    code, out, err = cli("bench", bundle, "--runs", "2", "--size", "seq=16", "--size", "hid=5",
                         "--json")  # fmt: skip
    assert code == 0, err
    assert _shapes(out) == [{"x": [1, 16], "z": [1, 5]}]
    code, out, err = cli("bench", bundle, "--runs", "2", "--size", "seq=4", "--json")
    assert code == 0, err
    assert _shapes(out) == [{"x": [1, 4], "z": [1, 5]}]
    code, out, err = cli("bench", bundle, "--runs", "2", "--json")  # the last timed sizes
    assert code == 0 and _shapes(out) == [{"x": [1, 4], "z": [1, 5]}], err


def test_size_on_a_fixed_shape_package_is_ignored_with_a_warning(cli, tmp_path, caplog):
    bundle = _two_symbols(cli, tmp_path)
    packaged = tmp_path / "pkg"
    code, _, err = cli("package", bundle, "-o", packaged, "--target", "mobile",
                       "--fixed-shape", "x:1,16", "--fixed-shape", "z:1,5")  # fmt: skip
    assert code == 0, err
    caplog.set_level(logging.WARNING)
    code, out, err = cli("bench", packaged, "--ep", "mobile", "--size", "seq=4", "--runs", "2",
                         "--json")  # fmt: skip
    assert code == 0, err
    assert _shapes(out) == [{"x": [1, 16], "z": [1, 5]}]
    assert "--size seq=4 ignored: mobile/model.ort has fixed shapes" in caplog.text
    caplog.clear()
    code, out, err = cli("bench", packaged, "--ep", "mobile", "--runs", "2", "--json")
    assert code == 0 and "ignored" not in caplog.text, err


@pytest.mark.parametrize(("args", "needle"), [
    (("--batch", "1,0"), "--batch '1,0': 0 is below 1"),
    (("--batch=-2",), "--batch '-2': -2 is below 1"),
    (("--threads", "2,-1"), "--threads '2,-1': -1 is below 0"),
    (("--runs", "0"), "argument --runs: '0': must be >= 1"),
    (("--runs", "abc"), "argument --runs: 'abc' is not an integer"),
    (("--warmup=-1",), "argument --warmup: '-1': must be >= 0"),
    (("--size", "seq=0"), "--size 'seq=0'"),
])  # fmt: skip
def test_bench_flag_errors_name_the_flag_and_the_value(cli, tmp_path, args, needle):
    """Each of these read 'bench: --runs and every --batch must be >= 1, --warmup >= 0.',
    whichever flag was wrong and with no value."""
    bundle = _fixed(cli, tmp_path)
    code, _, err = cli("bench", bundle, *args)
    assert code == 2 and needle in err and "--runs and every --batch" not in err, err


def test_bench_config_names_the_flag_it_refuses():
    from onnxpipe.bench import BenchConfig
    from onnxpipe.errors import InputError

    refused = (
        ({"runs": 0}, "--runs 0"),
        ({"warmup": -1}, "--warmup -1"),
        ({"batches": (4, 0)}, "--batch 0"),
        ({"threads": (-2,)}, "--threads -2"),
    )
    for kwargs, needle in refused:
        with pytest.raises(InputError, match=needle):
            BenchConfig(**kwargs)


def _gather_elements(tmp_path: Path) -> tuple[Path, Path]:
    """y = GatherElements(x [batch, 4], ids [batch, 2], axis=1): ids index another input, so
    no index_limit bounds them and bench's random ids (1 to 99) overrun x's 4 columns."""
    graph = helper.make_graph(
        [helper.make_node("GatherElements", ["x", "ids"], ["y"], axis=1)], "g",
        [_tensor("x", ["batch", 4]), _tensor("ids", ["batch", 2], TensorProto.INT64)],
        [_tensor("y", ["batch", 2])],
    )  # fmt: skip
    source = tmp_path / "ge.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    data = tmp_path / "ge.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.random((3, 4), np.float32), ids=rng.integers(0, 4, (3, 2)))
    return source, data


def test_generated_values_a_model_refuses_are_exit_2_asking_for_data(cli, tmp_path):
    """convert --data of such a model was exit 3 ('internal error: benchmark ... failed: ...
    Out of range value in index tensor'), and so was every bench of the bundle."""
    source, data = _gather_elements(tmp_path)
    bundle = tmp_path / "ge"
    code, _, err = cli("convert", source, "-o", bundle, "--data", data)  # bench on the data
    assert code == 0, err
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["bench"]["shapes"] == {"x": [1, 4], "ids": [1, 2]}
    before = tree_hash(bundle)
    code, _, err = cli("bench", bundle, "--runs", "2")
    assert code == 2 and "Traceback" not in err and "internal error" not in err, err
    assert "generated input values are out of the model's range" in err
    assert "pass --data DATA" in err and "Out of range value in index tensor" in err
    assert tree_hash(bundle) == before
    code, out, err = cli("bench", bundle, "--runs", "2", "--batch", "1,5", "--data", data,
                         "--json")  # fmt: skip
    assert code == 0, err
    records = json.loads(out)
    assert [(r["batch"], r["shapes"]["ids"]) for r in records] == [(1, [1, 2]), (5, [5, 2])]
    code, _, err = cli("bench", bundle, "--data", data, "--size", "seq=3")
    assert code == 2 and "--size and --data" in err, err
