"""Magnitude pruning: exact sparsity per layer or globally, honest notes, bad input."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxpipe.graphs.prune_magnitude import PruneMagnitudePass, prunable_weights
from tests.conftest import model_ref
from tests.helpers import ort_run


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_sparsity_is_exact_and_outputs_match_a_numpy_reference(mlp_bundle, scope):
    model = ir.load(mlp_bundle / "model.onnx")
    weights = {
        v.name: v.const_value.numpy() for v in prunable_weights(model, ("Gemm", "MatMul"), 16)
    }
    graph_pass = PruneMagnitudePass(ratio=0.5, scope=scope)
    graph_pass(model)
    pruned = {
        v.name: v.const_value.numpy() for v in prunable_weights(model, ("Gemm", "MatMul"), 16)
    }
    assert set(pruned) == set(weights) and len(pruned) == 3
    total = sum(w.size for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in pruned.values())
    assert abs(zeros / total - 0.5) < 1e-3
    assert graph_pass.metrics["sparsity"] == pytest.approx(zeros / total)
    if scope == "layer":
        assert all(abs(float((w == 0).mean()) - 0.5) < 1e-3 for w in pruned.values())
    for name, w in weights.items():  # kept weights are untouched, dropped ones the smallest
        kept = pruned[name] != 0
        assert np.array_equal(pruned[name][kept], w[kept])
    assert "no speedup" in graph_pass.metrics["note"]
    assert graph_pass.metrics["zipped_bytes_after"] < graph_pass.metrics["zipped_bytes_before"]
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    (out,) = ort_run(model, {"x": x})
    assert out.shape == (3, 10)


def test_cli_magnitude_reports_zipped_size_and_no_speedup_claim(cli, mlp_bundle, tmp_path):
    out = tmp_path / "sparse"
    code, stdout, stderr = cli(
        "prune", mlp_bundle, "-o", out, "--method", "magnitude", "--ratio", "0.5", "--json"
    )
    assert code == 0, stderr
    metrics = json.loads(stdout)["steps"][-1]["metrics"]
    assert metrics["sparsity"] >= 0.49
    assert metrics["zipped_bytes_after"] < metrics["zipped_bytes_before"]
    assert "zipped_bytes_before" not in metrics["pass"]  # one "before": the step's input
    assert "no speedup" in metrics["note"]


@pytest.mark.parametrize("ratio", ["0", "1", "1.5", "-0.2", "nan"])
def test_ratio_outside_open_interval_exits_2(cli, mlp_bundle, tmp_path, ratio):
    code, _, stderr = cli(
        "prune", mlp_bundle, "-o", tmp_path / "o", "--method", "magnitude", "--ratio", ratio
    )
    assert code == 2 and "--ratio" in stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--method", "channels", "--multiple-of", "0"], "prune: --multiple-of Input should be"),
        (["--method", "lowrank", "--energy", "2"], "--energy Input should be less than or equal"),
        # an option the method ignores was recorded in the step's config as if it applied
        (["--method", "channels", "--energy", "0.9"], "--energy applies to --method lowrank"),
        (["--method", "channels", "--scope", "global"], "--scope applies to --method magnitude"),
        (["--method", "magnitude", "--multiple-of", "8"], "--multiple-of applies to --method ch"),
        (["--method", "lowrank", "--energy", "0.5", "--gate", "cosine>=0.9"], "without --gate"),
    ],
)
def test_settings_out_of_range_exit_2_in_one_line(cli, mlp_bundle, tmp_path, flags, needle):
    # --multiple-of 0 was an internal error (exit 3), --energy 2 a pydantic dump with a link
    code, _, stderr = cli("prune", mlp_bundle, "-o", tmp_path / "o", "--ratio", "0.3", *flags)
    assert code == 2 and needle in stderr, stderr
    assert "errors.pydantic.dev" not in stderr and "Traceback" not in stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def weightless_bundle(tmp_path_factory):
    from onnxpipe.cli import main

    out = tmp_path_factory.mktemp("ew") / "ew"
    spec = "x:float32[batch,8]"
    assert main(["convert", model_ref("elementwise"), "-o", str(out), "--input", spec]) == 0
    return out


@pytest.mark.parametrize("method", ["magnitude", "channels", "lowrank"])
def test_nothing_prunable_exits_2_saying_so(cli, weightless_bundle, tmp_path, method):
    code, _, stderr = cli(
        "prune", weightless_bundle, "-o", tmp_path / "o", "--method", method, "--ratio", "0.5"
    )
    assert code == 2
    assert "nothing to" in stderr and not (tmp_path / "o").exists()


@pytest.mark.parametrize("method", ["magnitude", "lowrank"])
def test_a_ratio_that_changes_nothing_is_exit_2(cli, mlp_bundle, tmp_path, method):
    """--ratio 1e-6 zeroed nothing (lowrank 0.01 factored nothing), and wrote the model as
    it was with exit 0, as channels already refused."""
    ratio = "0.000001" if method == "magnitude" else "0.01"
    code, _, stderr = cli("prune", mlp_bundle, "-o", tmp_path / "o", "--method", method,
                          "--ratio", ratio)  # fmt: skip
    assert code == 2 and "nothing to" in stderr and "Raise --ratio" in stderr, stderr
    assert not (tmp_path / "o").exists()
