"""The CLI end to end: bundle contents, exit codes, bad input, validate/bench/run."""

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from onnxpipe.modelio import sha256
from tests.conftest import model_ref, tree_hash
from tests.fixtures import models
from tests.helpers import ort_run

IMAGE = "x:float32[batch,3,16,16]"
STABLE_KEYS = {
    "schema",
    "model",
    "inputs",
    "outputs",
    "source",
    "steps",
    "parity",
    "bench",
    "validation",
    "versions",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("b") / "gated"
    from onnxpipe.cli import main

    assert main(["convert", model_ref("gated"), "-o", str(out), "--input", IMAGE]) == 0
    return out


def test_bundle_holds_what_the_contract_says(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert STABLE_KEYS <= set(manifest)
    assert manifest["schema"] == "onnxpipe.manifest/1"
    assert manifest["model"]["sha256"] == sha256(bundle / "model.onnx")
    assert manifest["model"]["bytes"] == (bundle / "model.onnx").stat().st_size
    assert manifest["model"]["opset"] >= 17 and manifest["model"]["ir_version"] >= 8
    assert manifest["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 16, 16]}]
    assert manifest["outputs"][0]["shape"] == ["batch", 10]
    assert manifest["source"] | {"attempts": None} == {
        "framework": "torch",
        "exporter": "dynamo",
        "fallback_reason": None,
        "notes": [],
        "path": model_ref("gated"),
        "attempts": None,
    }
    parity = manifest["parity"]
    assert parity["passed"] and parity["samples"] >= 8 and parity["max_abs_diff"] < 1e-4
    assert parity["reference"].startswith("torch ") and parity["top1_agreement"] == 1.0
    assert 0.9999 < parity["cosine"] <= 1.0 + 1e-9
    bench = manifest["bench"]
    assert bench["ep"] == "cpu" and bench["batch"] == 1
    assert (
        0 < bench["latency_ms"]["p50"] <= bench["latency_ms"]["p90"] <= bench["latency_ms"]["p99"]
    )
    assert bench["throughput_per_s"] > 0 and bench["session_create_ms"] > 0
    assert 20 < bench["peak_rss_mb"] < 2000
    assert manifest["validation"]["cpu"]["status"] == "passed"
    assert [s["name"] for s in manifest["steps"]] == ["convert", "validate", "bench"]
    assert {"onnxpipe", "onnx", "onnxruntime", "torch", "python"} <= set(manifest["versions"])
    assert "tensorflow" not in manifest["versions"]
    assert not (bundle / "model.onnx.data").exists()
    assert (bundle / "report.html").read_text().startswith("<!doctype html>")
    assert not any(p.name.startswith(".") for p in bundle.parent.iterdir())


def test_bundle_permissions_follow_the_umask(bundle, cli):
    # A handoff bundle is read by other users (a model server, CI): temp-file modes (0700
    # dir, 0600 manifest) must not leak into it, nor into a manifest that validate rewrites.
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o777 & ~umask
    for path in bundle.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path.name
    (bundle / "manifest.json").chmod(0o640)
    assert cli("validate", bundle)[0] == 0
    assert stat.S_IMODE((bundle / "manifest.json").stat().st_mode) == 0o640
    (bundle / "manifest.json").chmod(0o666 & ~umask)


def test_bundle_model_matches_torch_at_unseen_batches(bundle):
    model = models.gated()
    for batch in (1, 6):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        got = ort_run(bundle / "model.onnx", {"x": x})[0]
        assert np.abs(want - got).max() < 1e-4


def test_model_card_has_io_table_snippet_and_numbers(bundle):
    card = (bundle / "README.md").read_text()
    assert "| input | `x` | float32 | [batch, 3, 16, 16] |" in card
    assert "ort.InferenceSession" in card and "p50 ms" in card and "max abs diff" in card
    snippet = card.split("```python\n")[1].split("```")[0]
    namespace: dict = {}
    exec(
        compile(snippet.replace('"model.onnx"', repr(str(bundle / "model.onnx"))), "card", "exec"),
        namespace,
    )
    assert namespace["outputs"][0].shape == (1, 10)


def test_validate_records_cpu_passed_and_cuda_unavailable(bundle, cli):
    code, out, _ = cli("validate", bundle, "--ep", "cpu,cuda", "--json")
    assert code == 0
    results = json.loads(out)
    assert results["cpu"]["status"] == "passed"
    assert results["cpu"]["reference"] == "stored source-framework outputs"
    assert (
        results["cuda"]["status"] == "unavailable"
        and "CUDAExecutionProvider" in results["cuda"]["reason"]
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["validation"]["cuda"]["status"] == "unavailable"
    code, _, err = cli("validate", bundle, "--ep", "cpu,cuda", "--require", "cuda")
    assert code == 1 and "cuda" in err
    assert err.count("validation failed") == 1, err  # once, not "validation failed: validation.."


def test_validate_on_user_data(bundle, cli, tmp_path):
    data = tmp_path / "data.npz"
    np.savez(data, x=np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32))
    code, out, _ = cli("validate", bundle, "--data", data, "--json")
    cpu = json.loads(out)["cpu"]
    # the data's reference is this CPU run: cpu counts the 8 stored samples only
    assert code == 0 and cpu["samples"] == 8 and "--data ran on cpu" in cpu["reference"]
    np.savez(data, x=np.zeros((5, 3, 8, 8), np.float32))
    code, _, err = cli("validate", bundle, "--data", data)
    assert code == 2 and "shape" in err and "data.npz" in err


def test_bench_matrix_json(bundle, cli):
    code, out, _ = cli("bench", bundle, "--batch", "1,4", "--runs", "10", "--json")
    assert code == 0
    records = json.loads(out)
    assert [r["batch"] for r in records] == [1, 4]
    assert all(
        set(r)
        >= {
            "ep",
            "batch",
            "threads",
            "latency_ms",
            "throughput_per_s",
            "session_create_ms",
            "peak_rss_mb",
        }
        for r in records
    )
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert len(manifest["bench_records"]) == 2


@pytest.mark.parametrize("args", [["--ep", "gpu"], ["--batch", "one"], ["--runs", "0"]])
def test_bench_bad_flags(bundle, cli, args):
    code, _, err = cli("bench", bundle, *args)
    assert code == 2 and "Traceback" not in err


def test_run_recipe(cli, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        f"source: {model_ref('gated')}\ninputs: ['{IMAGE}']\nsteps:\n"
        "  - convert: {exporter: torchscript}\n  - validate: {ep: cpu}\n"
        "  - bench: {batch: [2], runs: 5}\n"
    )
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["exporter"] == "torchscript"
    assert manifest["bench"]["batch"] == 2


def test_existing_out_is_refused_then_overwritten(bundle, cli, tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = cli("convert", model_ref("gated"), "-o", out, "--input", IMAGE, "--no-bench")
    assert code == 2 and "--overwrite" in err and (out / "keep.txt").read_text() == "mine"
    code, _, _ = cli(
        "convert", model_ref("gated"), "-o", out, "--input", IMAGE, "--no-bench", "--overwrite"
    )
    assert code == 0 and (out / "model.onnx").exists() and not (out / "keep.txt").exists()


def test_parity_failure_is_exit_1_with_numbers_and_no_bundle(cli, tmp_path):
    out = tmp_path / "out"
    code, _, err = cli(
        "convert", model_ref("batch_baked"), "-o", out, "--input", "x:float32[batch,4]"
    )
    assert code == 1 and "max abs diff" in err and "Traceback" not in err
    assert not out.exists()
    report = json.loads((tmp_path / "out.failed.json").read_text())
    assert report["failed_step"] == "convert" and report["metrics"]["parity"]["passed"] is False


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "model.onnx"
    path.write_bytes(b"\x00\xffthis is not a protobuf\x13" * 40)
    return path


def _small_onnx(tmp_path: Path) -> Path:
    import onnx  # noqa: PLC0415

    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 4])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["batch", 4])],
    )
    path = tmp_path / "small.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), path)
    return path


def _not_saved_model(tmp_path: Path) -> Path:
    path = tmp_path / "some_dir"
    path.mkdir()
    (path / "variables.txt").write_text("x")
    return path


BAD_INPUTS = {
    "garbage onnx": (_garbage, [], "not a readable ONNX model"),
    "missing file": (lambda t: t / "nope.onnx", [], "no such file"),
    "not a SavedModel": (_not_saved_model, [], "not a SavedModel"),
    "wrong return type": (
        lambda t: model_ref("not_a_model"),
        ["--input", IMAGE],
        "expected a torch",
    ),
    "factory raises": (lambda t: model_ref("raises"), ["--input", IMAGE], "cannot build"),
    "bad spec": (lambda t: model_ref("gated"), ["--input", "x:float32[batch,3,,16]"], "--input"),
    "unknown dtype": (lambda t: model_ref("gated"), ["--input", "x:complex[1]"], "unknown dtype"),
    "unsupported op": (
        lambda t: model_ref("unsupported"),
        ["--input", "x:float32[batch,4]"],
        "special_zeta",
    ),
    "--signature on torch": (
        lambda t: model_ref("gated"),
        ["--input", IMAGE, "--signature", "serving_default"],
        "Drop --signature",
    ),
    "huge --input": (  # numpy was asked for terabytes: MemoryError, exit 3
        lambda t: model_ref("gated"),
        ["--input", "x:float32[99999999999,3,16,16]"],
        "more than onnxpipe generates",
    ),
    # options of another framework's converter: recorded as applied, with no effect
    "--nchw on torch": (lambda t: model_ref("gated"), ["--input", IMAGE, "--nchw"], "Drop --nchw"),
    "--exporter on onnx": (_small_onnx, ["--exporter", "torchscript"], "Drop --exporter"),
    "unknown file type": (
        lambda t: (t / "m.bin").write_bytes(b"x") and t / "m.bin",
        [],
        "unknown model file type",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_exit_2_named_no_traceback_no_bundle(case, cli, tmp_path):
    make, extra, expected = BAD_INPUTS[case]
    source = make(tmp_path)
    before = tree_hash(source) if isinstance(source, Path) and source.exists() else None
    out = tmp_path / "out"
    code, stdout, err = cli("convert", source, "-o", out, *extra)
    assert code == 2, err
    assert expected in err and "Traceback" not in err + stdout
    name = source.name if isinstance(source, Path) else source
    assert str(name) in err or "--input" in err
    assert not out.exists() and not (tmp_path / "out.failed.json").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    if before is not None:
        assert tree_hash(source) == before


def test_bad_input_as_a_user_sees_it(tmp_path):
    """A real process: exit code 2, one paragraph on stderr, nothing on stdout."""
    garbage = _garbage(tmp_path)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "onnxpipe",
            "convert",
            str(garbage),
            "-o",
            str(tmp_path / "out"),
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert str(garbage) in proc.stderr.replace("\n", "")


def test_sigterm_mid_run_cleans_up_like_ctrl_c(cli, mlp_bundle, tmp_path, monkeypatch):
    """A killed run (timeout, CI) left its scratch dir behind: 476 MB for a ResNet-50."""
    import signal  # noqa: PLC0415
    import tempfile  # noqa: PLC0415

    import onnxpipe.errors as errors  # noqa: PLC0415
    import onnxpipe.quantize as quantize  # noqa: PLC0415

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    real = quantize._calibration

    def killed(*args, **kwargs):
        found = real(*args, **kwargs)
        assert any(scratch.iterdir())  # the run's scratch dir exists at this point
        os.kill(os.getpid(), signal.SIGTERM)
        return found

    monkeypatch.setattr(quantize, "_calibration", killed)
    np.savez(tmp_path / "calib.npz", x=np.ones((4, 64), np.float32))
    code, _, err = cli("quantize", mlp_bundle, "-o", tmp_path / "q", "--mode", "static",
                       "--calib", tmp_path / "calib.npz")  # fmt: skip
    assert code == 143 and "terminated; nothing was written" in err, err
    assert not list(scratch.iterdir()) and not (tmp_path / "q").exists()
    assert signal.getsignal(signal.SIGTERM) is not errors._on_signal  # restored
    assert signal.getsignal(signal.SIGINT) is not errors._on_signal


def test_a_ctrl_c_the_exporter_swallowed_still_stops_the_run(cli, tmp_path):
    """A Ctrl-C landing while torch imports torch._dynamo lazily turns into AttributeError in
    torch's own except clause: the run fell back to TorchScript and wrote its bundle."""
    source = tmp_path / "net.py"
    source.write_text(
        "import signal\n"
        "import torch\n"
        "from onnxpipe.errors import signal_received\n\n"
        "class Net(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        if torch.compiler.is_compiling():  # the dynamo attempt, as torch loses it\n"
        "            signal_received(signal.SIGINT)\n"
        "            raise AttributeError(\"module 'torch._dynamo' has no attribute 'exc'\")\n"
        "        return x * 2\n\n"
        "def make():\n"
        "    return Net()\n"
    )
    out = tmp_path / "out"
    code, _, err = cli("convert", f"{source}:make", "-o", out, "--input", "x:float32[batch,4]")
    assert code == 130 and "interrupted; nothing was written" in err, err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_an_output_that_cannot_be_created_is_exit_2_before_any_work(cli, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("a file where -o needs a directory")
    code, _, err = cli("convert", model_ref("gated"), "-o", blocker / "sub" / "out",
                       "--input", IMAGE)  # fmt: skip
    # it named neither the file in the way nor the fix: "cannot be written (File exists)"
    assert code == 2 and f"{blocker} is a file, not a folder" in err.replace("\n", ""), err
    assert "Traceback" not in err and blocker.read_text().startswith("a file")
    # probing a new -o several directories deep leaves no directories behind
    from onnxpipe.bundle import check_out_dir  # noqa: PLC0415

    check_out_dir(tmp_path / "x" / "y" / "out", overwrite=False)
    assert not (tmp_path / "x").exists()


def test_usage_errors_are_exit_2(cli, tmp_path, mlp_bundle):
    code, _, err = cli("convert")
    assert code == 2 and "--help" in err
    code, _, err = cli("validate", "/nonexistent/bundle")
    assert code == 2 and "not an onnxpipe bundle (no such folder)" in err
    # a bundle's model.onnx for the bundle: "not an onnxpipe bundle (no manifest.json)"
    code, _, err = cli("validate", mlp_bundle / "model.onnx")
    assert code == 2 and f"inside the bundle {mlp_bundle}; pass" in err.replace("\n", ""), err
    # convert's own steps are not the user's: no "step 1 (convert):" as from a recipe
    code, _, err = cli("convert", tmp_path / "model.pt", "-o", tmp_path / "out")
    assert code == 2 and err.startswith(f"onnxpipe: error: {tmp_path / 'model.pt'}"), err


def test_import_onnxpipe_pulls_in_no_framework():
    code = (
        "import sys, onnxpipe, onnxpipe.cli, onnxpipe.converters, onnxpipe.graphs; "
        "bad = [m for m in ('torch', 'tensorflow', 'keras') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_onnx_checker_failure_is_reported(tmp_path, cli):
    model = onnx.helper.make_model(
        onnx.helper.make_graph(
            [
                onnx.helper.make_node("Relu", ["x"], ["y"]),
                onnx.helper.make_node("Relu", ["x"], ["y"]),
            ],
            "dup",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
        )
    )
    path = tmp_path / "dup.onnx"
    onnx.save(model, path)
    code, _, err = cli("convert", path, "-o", tmp_path / "out")
    assert code == 2 and "checker" in err and "dup.onnx" in err


def _step_row(step: str, metrics: dict, size: int) -> str:
    """The summary table's text for a bundle whose last step recorded ``metrics``."""
    import io  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415

    from onnxpipe.tables import summary_table  # noqa: PLC0415

    manifest = {
        "model": {"file": "model.onnx", "bytes": size, "opset": 9, "sha256": "0" * 64},
        "inputs": [], "outputs": [],
        "steps": [{"name": "convert", "metrics": {}}, {"name": step, "metrics": metrics}],
    }  # fmt: skip
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(summary_table(manifest, Path("out")))
    return console.export_text()


def test_step_row_says_larger_when_the_model_grew():
    """Quantizing a model whose weights are computed in the graph stores them: larger."""
    metrics = {"size_ratio": 0.25, "speedup": 2.0, "p50_ms_before": 20.0, "p50_ms_after": 10.0}
    text = _step_row("quantize", metrics, 4_000_000)
    assert "quantize: 4.00x larger, 2.00x the speed" in text


def test_step_row_does_not_compare_speeds_too_fast_to_time():
    metrics = {"size_ratio": 1.0, "speedup": 0.41, "p50_ms_before": 0.02, "p50_ms_after": 0.05}
    text = _step_row("optimize", metrics, 9_000)
    assert "speed not compared" in text and "0.41x" not in text


def test_an_error_paragraph_starts_the_stderr_of_a_run_without_a_terminal(tmp_path):
    """No progress bar (nor the blank line its exit leaves) when stderr is a file or a pipe."""
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "onnxpipe", "convert", str(tmp_path / "missing.keras"), "-o",
         str(tmp_path / "o")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.startswith("onnxpipe: error:"), done.stderr


def test_without_onnx_runtime_every_command_names_the_extra(cli, tmp_path, monkeypatch):
    """onnxruntime comes from the cpu or the gpu extra (never both): missing, it is exit 2."""
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "onnxruntime" else real(name, *a),
    )
    code, _, err = cli("validate", tmp_path / "b")
    assert code == 2 and "pip install 'onnxpipe[cpu]'" in err and "'onnxpipe[gpu]'" in err


def test_the_runtime_comes_from_one_extra_and_the_constraints_pin_both():
    """A GPU install swaps the runtime (CONTRACT): onnxruntime is no core dependency."""
    import tomllib
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("onnxruntime") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert extras["cpu"] == ["onnxruntime>=1.20"] and extras["gpu"] == ["onnxruntime-gpu>=1.20"]
    assert "cpu" in extras["demo"][0] and "cpu" in extras["all"][0]  # the README's commands
    pins = (root / "constraints.txt").read_text().splitlines()
    assert any(p.startswith("onnxruntime==") for p in pins)
    assert any(p.startswith("onnxruntime-gpu==") for p in pins)


def test_a_usage_error_names_onnxpipe_once(cli):
    code, _, err = cli("convert", "m.onnx", "-o", "x", "--no-such-flag")
    assert code == 2 and err.count("onnxpipe:") == 1 and "unrecognized arguments" in err, err
    assert "See 'onnxpipe" in err


def test_out_that_is_a_link_or_the_working_folder_is_exit_2_before_any_work(
    cli, tmp_path, monkeypatch
):
    """A dangling link failed after the whole run (exit 3); a link to a folder was replaced by
    a folder and left behind as .OUT.old-PID; -o . failed after the run ('busy')."""
    (tmp_path / "target").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "target")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for out in ("linked", "dangling"):
        code, _, err = cli("convert", model_ref("gated"), "-o", tmp_path / out, "--input", IMAGE,
                           "--overwrite")  # fmt: skip
        assert code == 2 and "is a symbolic link" in err, err
        assert (tmp_path / out).is_symlink()
    project = tmp_path / "project"
    project.mkdir()
    (project / "main.py").write_text("print('mine')")
    monkeypatch.chdir(project)
    for out in (".", "", ".."):
        code, _, err = cli("convert", model_ref("gated"), "-o", out, "--input", IMAGE,
                           "--overwrite")  # fmt: skip
        assert code == 2 and "the current directory" in err, err
    assert (project / "main.py").read_text() == "print('mine')"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "linked", "project",
                                                          "target"]  # fmt: skip


def test_what_appears_at_out_during_a_run_is_kept_without_overwrite(tmp_path):
    """The emptiness check ran only at the start: a file made meanwhile was deleted (exit 0)."""
    from onnxpipe.atomic import atomic_dir  # noqa: PLC0415
    from onnxpipe.errors import InputError  # noqa: PLC0415

    out = tmp_path / "out"
    with pytest.raises(InputError, match="appeared"):
        with atomic_dir(out) as tmp:
            (tmp / "model.onnx").write_text("new")
            out.mkdir()
            (out / "notes.txt").write_text("mine")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # the temp bundle went too
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "model.onnx").write_text("new")
    assert [p.name for p in out.iterdir()] == ["model.onnx"]
    # a file replaced with --overwrite leaves nothing behind (it stayed as .out.old-PID)
    other = tmp_path / "other"
    with atomic_dir(other, overwrite=True) as tmp:
        (tmp / "model.onnx").write_text("new")
        other.write_text("a file")
    assert other.is_dir() and sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
    # a link that appears is never replaced (a dangling one: exit 3 after the run)
    with pytest.raises(InputError, match="became a symbolic link"):
        with atomic_dir(tmp_path / "link", overwrite=True) as tmp:
            (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "other", "out"]


def test_a_bundle_that_stood_at_out_survives_a_failed_or_interrupted_swap(tmp_path, monkeypatch):
    """Replacing is two renames (OUT aside, the new one in): a failure or SIGTERM between them
    left no OUT, the old bundle hidden as .OUT.old-PID, and 'nothing was written'."""
    import signal  # noqa: PLC0415

    from onnxpipe import atomic  # noqa: PLC0415
    from onnxpipe.errors import Terminated  # noqa: PLC0415

    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text("old")
    rename = os.rename

    def failing(src, dst):
        if ".tmp-" in str(src):
            raise OSError(39, "Directory not empty")
        rename(src, dst)

    monkeypatch.setattr(atomic.os, "rename", failing)
    with pytest.raises(OSError, match="not empty"):
        with atomic.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "manifest.json").write_text("new")
    assert (out / "manifest.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]

    def interrupted(src, dst):  # SIGTERM right after OUT was moved aside
        rename(src, dst)
        if ".old-" in str(dst):
            signal.raise_signal(signal.SIGTERM)

    def on_term(signum, frame):
        raise Terminated

    monkeypatch.setattr(atomic.os, "rename", interrupted)
    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        with pytest.raises(Terminated):
            with atomic.atomic_dir(out, overwrite=True) as tmp:
                (tmp / "manifest.json").write_text("new")
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert (out / "manifest.json").read_text() == "new"  # complete: the signal waited
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_signal_ignored_by_the_caller_stays_ignored():
    """`onnxpipe ... &` in a script inherits SIGINT ignored; onnxpipe made it fatal again."""
    import signal  # noqa: PLC0415

    from onnxpipe.errors import terminate_cleanly  # noqa: PLC0415

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        previous = terminate_cleanly()
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
        assert signal.SIGINT not in previous and signal.SIGTERM in previous
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    finally:
        signal.signal(signal.SIGINT, before)


def test_the_console_script_and_python_m_keep_exit_codes_and_output(tmp_path, mlp_bundle):
    """run() leaves by os._exit after main(): the codes and the flushed output must survive."""
    import shutil  # noqa: PLC0415

    bundle = Path(shutil.copytree(mlp_bundle, tmp_path / "b"))
    script = Path(sys.executable).parent / "onnxpipe"
    for command in ([str(script)], [sys.executable, "-m", "onnxpipe"]):
        done = subprocess.run([*command, "validate", str(tmp_path / "none")],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 2 and "not an onnxpipe bundle" in done.stderr, done
        done = subprocess.run([*command, "validate", str(bundle), "--json"],
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["cpu"]["status"] == "passed"  # all of it, flushed


def test_a_reader_that_goes_away_or_a_closed_stdout_keeps_the_exit_code(tmp_path, mlp_bundle):
    """| true: rich exited 1 (a failed gate's code), --json 3; >&-: exit 1 with a traceback."""
    import shutil  # noqa: PLC0415

    bundle = Path(shutil.copytree(mlp_bundle, tmp_path / "b"))
    script = Path(sys.executable).parent / "onnxpipe"
    for flags in ([], ["--json"]):
        done = subprocess.run(
            f"'{script}' validate '{bundle}' {' '.join(flags)} | true; echo ${{PIPESTATUS[0]}}",
            shell=True, executable="/bin/bash", capture_output=True, text=True,
        )  # fmt: skip
        assert done.stdout.strip() in ("0", "141"), done  # 0 when the output fit the pipe
        assert "internal error" not in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(f"'{script}' validate '{bundle}' >&-", shell=True, capture_output=True,
                          text=True)  # fmt: skip
    assert done.returncode == 0 and "Traceback" not in done.stderr, done


def test_data_the_model_cannot_run_is_one_paragraph_without_onnx_runtimes_log(cli, tmp_path):
    """Ids past a 5-row table: ORT's own log line ('[E:onnxruntime:...] Non-zero status code
    ...') came ahead of the exit 2 message; it shows with --debug only."""
    from onnx import helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Gather", ["w", "ids"], ["y"])],
        "table",
        [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 2])],
        [numpy_helper.from_array(np.ones((5, 2), np.float32), "w")],
    )
    source = tmp_path / "table.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), source)
    bundle = tmp_path / "bundle"
    assert cli("convert", source, "-o", bundle, "--no-bench")[0] == 0
    np.savez(tmp_path / "ids.npz", ids=np.array([1, 9], np.int64))
    data = str(tmp_path / "ids.npz")
    for args, debug in (
        (["validate", str(bundle), "--data", data], []),
        (["validate", str(bundle), "--data", data], ["--debug"]),
        (["convert", str(source), "-o", str(tmp_path / "again"), "--data", data], []),
    ):
        done = subprocess.run([sys.executable, "-m", "onnxpipe", *args, *debug],
                              capture_output=True, text=True, check=False)  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert ("E:onnxruntime" in done.stderr) == bool(debug), done.stderr
        assert debug or done.stderr.startswith("onnxpipe: error:"), done.stderr
