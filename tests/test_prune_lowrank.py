"""Low-rank factoring: exact at full rank, smaller and gated at lower rank."""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxpipe.errors import PassError
from onnxpipe.graphs.lowrank import LowRankPass, factorable, input_covariances
from tests.helpers import assert_close, ort_run

X = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)


def _params(model: ir.Model) -> int:
    return sum(v.const_value.size for v in model.graph.initializers.values())


def test_factoring_a_rank_32_weight_at_rank_32_is_exact(mlp_bundle):
    model = ir.load(mlp_bundle / "model.onnx")
    names = [w.name for _, w in factorable(model, 16384)]
    assert names == ["0.weight", "2.weight"]  # the 256x10 head is too small
    weight = model.graph.initializers["2.weight"]
    rng = np.random.default_rng(1)
    low = (rng.standard_normal((256, 32)) @ rng.standard_normal((32, 256)) / 16).astype("f4")
    weight.const_value = ir.tensor(low, name="2.weight")
    ref = ort_run(model, {"x": X})
    graph_pass = LowRankPass(ranks={"2.weight": 32, "0.weight": 64})
    graph_pass(model)
    assert set(graph_pass.metrics["layers"]) == {"2.weight"}
    assert "0.weight" in graph_pass.metrics["skipped"]  # 64 x (64 + 256) is not smaller
    assert graph_pass.metrics["layers"]["2.weight"]["energy"] == pytest.approx(1.0)
    assert "2.weight" not in model.graph.initializers
    assert_close(ref, model, {"x": X}, atol=1e-3)


def test_ratio_sets_rank_and_shrinks(mlp_bundle):
    model = ir.load(mlp_bundle / "model.onnx")
    before = _params(model)
    graph_pass = LowRankPass(ratio=0.5)
    graph_pass(model)
    layers = graph_pass.metrics["layers"]
    big = next(v for v in layers.values() if v["shape"] == [256, 256])
    assert big["rank"] == 64 and big["params_after"] <= 0.5 * big["params_before"]
    assert _params(model) < before
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMul") + ops.count("Gemm") == 3 + len(layers)
    (out,) = ort_run(model, {"x": X})
    assert out.shape == (5, 10)


def test_activation_aware_factoring_has_less_output_error_on_unseen_inputs(mlp_bundle):
    # Inputs that live mostly in a few directions: plain SVD spends rank on directions the
    # data never excites; whitening by the inputs' second moments does not.
    model = ir.load(mlp_bundle / "model.onnx")
    rng = np.random.default_rng(2)
    basis = rng.standard_normal((8, 64))

    def sample(n):
        return (rng.standard_normal((n, 8)) @ basis + 0.05 * rng.standard_normal((n, 64))).astype(
            "f4"
        )

    tune, unseen = sample(256), sample(64)
    ref = ort_run(model, {"x": unseen})[0]
    covariances = input_covariances(model, [{"x": tune[:128]}, {"x": tune[128:]}])
    assert sorted(c.shape for c in covariances.values()) == [(64, 64), (256, 256)]
    np.testing.assert_allclose(covariances["x"], tune.T.astype("f8") @ tune / 256, rtol=1e-4)
    errors, passes = {}, {}
    for aware in (False, True):
        factored = ir.load(mlp_bundle / "model.onnx")
        passes[aware] = LowRankPass(
            ranks={"0.weight": 8}, covariances=covariances if aware else None
        )
        passes[aware](factored)
        errors[aware] = float(np.abs(ort_run(factored, {"x": unseen})[0] - ref).mean())
    assert passes[True].metrics["layers"]["0.weight"]["activation_aware"]
    assert not passes[False].metrics["layers"]["0.weight"]["activation_aware"]
    assert errors[True] < errors[False] / 3


def test_factoring_is_skipped_when_not_smaller(mlp_bundle):
    model = ir.load(mlp_bundle / "model.onnx")
    # the model as it was is no result (it was written with exit 0): each weight says why
    with pytest.raises(PassError, match="nothing to factor") as caught:
        LowRankPass(energy=1.0)(model)
    assert "0.weight: rank 64 would not save enough" in str(caught.value)
    assert "2.weight" in str(caught.value)


def test_cli_lowrank_with_gate(cli, mlp_bundle, tmp_path):
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((32, 64)).astype("f4"))
    out = tmp_path / "lr"
    code, stdout, stderr = cli(
        "prune", mlp_bundle, "-o", out, "--method", "lowrank", "--ratio", "0.5",
        "--eval", data, "--gate", "cosine>=0.8", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    metrics = json.loads(stdout)["steps"][-1]["metrics"]
    assert metrics["params_after"] < metrics["params_before"]
    assert metrics["gate"]["cosine"] >= 0.8 and metrics["search"]["steps"]
    # real eval data in 4 batches: statistics from one half are gated on the other
    assert metrics["criterion"] == "activation-aware svd"
    assert metrics["search"]["cross_fitted"] is True
    assert all(layer["activation_aware"] for layer in metrics["pass"]["layers"].values())


def test_gate_that_limits_the_cut_says_so(cli, mlp_bundle, tmp_path):
    """A gated EfficientNet-Lite0 at --ratio 0.3 came back 0.5% smaller, and nothing said the
    gate, not the ratio, had decided."""
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((32, 64)).astype("f4"))
    flags = ("--method", "lowrank", "--ratio", "0.5", "--eval", data)
    code, _, stderr = cli(
        "prune", mlp_bundle, "-o", tmp_path / "a", *flags, "--gate", "cosine>=0.9"
    )
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "a" / "manifest.json").read_text())["steps"][-1]["metrics"]
    assert metrics["ratios"] == {"2.weight": 0.25}  # one of two layers, at half the ratio
    note = metrics["note"]
    assert "let 1 of 2 layers be cut, 0 at --ratio 0.5 and 1 at 0.25" in note
    assert "cosine>=0.9" in note and "searched as" not in note  # no margin on cosine
    assert "note: the gate cosine>=0.9" in " ".join(stderr.split())
    code, _, stderr = cli(
        "prune", mlp_bundle, "-o", tmp_path / "b", *flags, "--gate", "cosine>=0.5"
    )
    assert code == 0, stderr
    metrics = json.loads((tmp_path / "b" / "manifest.json").read_text())["steps"][-1]["metrics"]
    assert set(metrics["ratios"].values()) == {0.5} and "note" not in metrics
    code, _, stderr = cli("prune", mlp_bundle, "-o", tmp_path / "c", *flags, "--gate", "top1>=0.99")
    assert code == 1 and "top1>=0.99 (searched as top1>=1: one standard error)" in " ".join(
        stderr.split()
    ), stderr


def test_energy_is_a_floor_under_the_ratio(cli, mlp_bundle, tmp_path):
    """--energy 0.3 with --ratio 0.5 and 0.9 wrote one model while recording two ratios."""
    params = {}
    for ratio in ("0.5", "0.9"):
        flags = ["--method", "lowrank", "--ratio", ratio, "--energy", "0.3", "--json"]
        code, stdout, err = cli("prune", mlp_bundle, "-o", tmp_path / ratio, *flags)
        assert code == 0, err
        step = json.loads(stdout)["steps"][-1]
        params[ratio] = step["metrics"]["params_after"]
        for layer in step["metrics"]["pass"]["layers"].values():
            assert layer["energy"] >= 0.3 - 1e-9  # the floor holds
    assert params["0.9"] < params["0.5"]
