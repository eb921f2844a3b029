"""Deriving bundles: the gate decides, the input is untouched, the numbers are recorded."""

import json

import numpy as np
import onnx_ir as ir
import pytest

from onnxpipe.cli import main
from onnxpipe.errors import GateFailed
from onnxpipe.gate import Gate
from onnxpipe.graphs.base import PassConfig
from onnxpipe.modelio import sha256
from onnxpipe.transform import derive_bundle
from tests.conftest import model_ref, tree_hash


def scale_weights(factor: float):
    def transform(model: ir.Model, ctx):
        for value in model.graph.initializers.values():
            array = value.const_value.numpy()
            if array.dtype == np.float32 and array.ndim >= 2:
                value.const_value = ir.tensor(array * factor)
        return model, {"factor": factor}

    return transform


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    out = tmp_path_factory.mktemp("src") / "gated"
    assert (
        main(
            [
                "convert",
                model_ref("gated"),
                "-o",
                str(out),
                "--input",
                "x:float32[batch,3,16,16]",
                "--no-bench",
            ]
        )
        == 0
    )
    return out


def test_derived_bundle_records_gate_size_and_latency(source, tmp_path):
    before = tree_hash(source)
    manifest = derive_bundle(
        source,
        tmp_path / "out",
        "scale",
        PassConfig(),
        scale_weights(1.001),
        [Gate.parse("top1>=0.99")],
        bench_runs=5,
    )
    assert tree_hash(source) == before
    out = tmp_path / "out"
    assert manifest["model"]["sha256"] == sha256(out / "model.onnx")
    step = manifest["steps"][-1]
    assert [s["name"] for s in manifest["steps"]] == ["convert", "validate", "scale"]
    assert step["metrics"]["factor"] == 1.001
    assert step["metrics"]["gate"]["top1"] == 1.0 and step["metrics"]["gate"]["samples"] >= 8
    assert step["metrics"]["speedup"] > 0 and step["metrics"]["bytes_after"] > 0
    assert manifest["parity"]["passed"] and manifest["parity"]["tolerance"] == ["top1>=0.99"]
    assert manifest["validation"]["cpu"]["status"] == "passed"
    assert manifest["source"]["framework"] == "torch"
    assert json.loads((out / "manifest.json").read_text()) == manifest


def test_failed_gate_writes_nothing_but_the_numbers(source, tmp_path):
    with pytest.raises(GateFailed, match="top1="):
        derive_bundle(
            source,
            tmp_path / "out",
            "scale",
            PassConfig(),
            scale_weights(-1.0),
            [Gate.parse("top1>=0.9")],
            bench_runs=5,
        )
    assert not (tmp_path / "out").exists()
    report = json.loads((tmp_path / "out.failed.json").read_text())
    assert report["metrics"]["gate"]["top1"] < 0.9


def test_gate_failed_inside_the_transform_writes_the_numbers_too(source, tmp_path):
    # A gated search (prune --gate) fails inside the transform, before the final gate check.
    def search(model: ir.Model, ctx):
        raise GateFailed("no setting meets top1>=0.9", metrics={"best": {"top1": 0.5}})

    with pytest.raises(GateFailed, match=r"Nothing was written at .*out\.failed\.json"):
        derive_bundle(source, tmp_path / "out", "search", PassConfig(), search, bench_runs=5)
    assert not (tmp_path / "out").exists()
    report = json.loads((tmp_path / "out.failed.json").read_text())
    assert report["failed_step"] == "search" and report["metrics"]["best"]["top1"] == 0.5


def test_result_that_fails_validation_is_not_written(source, tmp_path):
    # ORT runs a graph whose nodes are out of order, the ONNX checker refuses it (the fp16
    # converter's Casts once did this): the step must fail, not hand off a broken bundle.
    def unsort(model: ir.Model, ctx):
        first = next(iter(model.graph))
        model.graph.remove(first)
        model.graph.append(first)
        return model, {}

    with pytest.raises(GateFailed, match="fails validation on cpu.*topologically sorted"):
        derive_bundle(source, tmp_path / "out", "unsort", PassConfig(), unsort, bench_runs=5)
    assert not (tmp_path / "out").exists()
    report = json.loads((tmp_path / "out.failed.json").read_text())
    assert report["failed_step"] == "unsort" and "topologically" in report["error"]


def test_the_result_runs_on_the_eval_data_once(source, tmp_path, monkeypatch):
    # optimize checks its result's drift, the gate measures it, the bundle records its
    # outputs as parity samples: the same model on the same feeds, run once (it was thrice).
    import onnxpipe.transform as transform

    opened: list[str] = []
    make_session = transform.make_session

    def counting(path, options):
        opened.append(sha256(path))
        return make_session(path, options)

    def check_then_scale(model: ir.Model, ctx):
        model, _ = scale_weights(1.001)(model, ctx)
        assert 0 < ctx.drift(model)[1] < 0.1
        return model, {}

    monkeypatch.setattr(transform, "make_session", counting)
    derive_bundle(source, tmp_path / "out", "scale", PassConfig(), check_then_scale, bench_runs=5)
    result = sha256(tmp_path / "out" / "model.onnx")
    assert opened.count(result) == 1 and opened.count(sha256(source / "model.onnx")) == 1
