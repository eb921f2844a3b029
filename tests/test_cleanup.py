"""Cleanup: the opset-9 zoo models inside the onnx package, folding, fusions, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxpipe.errors import InputError
from onnxpipe.graphs.cleanup import CleanupConfig, CleanupPass
from tests.conftest import model_ref
from tests.helpers import assert_close, ort_run

ZOO = sorted((Path(onnx.__file__).parent / "backend/test/data/light").glob("*.onnx"))


@pytest.mark.parametrize("path", ZOO, ids=lambda p: p.stem)
def test_zoo_models_fold_and_still_compute_the_same(path):
    model = ir.load(path)
    assert model.opset_imports[""] == 9
    assert any(n.op_type == "ConstantOfShape" for n in model.graph)
    (data,) = [v for v in model.graph.inputs if not v.is_initializer()]
    shape = [d if isinstance(d, int) else 1 for d in data.shape]
    x = np.random.default_rng(0).random(shape, dtype=np.float32)
    feeds = {data.name: x}
    ref = ort_run(path, feeds)
    graph_pass = CleanupPass(level="basic")
    result = graph_pass(model)
    assert result.model is not model
    cleaned = result.model
    assert not any(n.op_type in ("ConstantOfShape", "Identity") for n in cleaned.graph)
    assert [v.name for v in cleaned.graph.inputs] == [data.name]
    assert graph_pass.metrics["nodes_after"] < graph_pass.metrics["nodes_before"]
    assert set(cleaned.opset_imports) <= {"", "ai.onnx"}
    assert_close(ref, cleaned, feeds, atol=1e-3 * max(1.0, float(np.abs(ref[0]).max())))


def test_dedup_and_identity_removal_on_a_torch_model(tmp_path):
    from onnxpipe.cli import main

    out = tmp_path / "b"
    spec = "x:float32[batch,3,16,16]"
    assert main(["convert", model_ref("gated"), "-o", str(out), "--input", spec]) == 0
    model = ir.load(out / "model.onnx")
    first = next(iter(model.graph.initializers.values()))
    twin = ir.Value(name="twin", const_value=ir.tensor(first.const_value.numpy(), name="twin"))
    model.graph.register_initializer(twin)
    node = next(n for n in model.graph if first in n.inputs)
    node.replace_input_with(list(node.inputs).index(first), twin)
    ident = ir.node("Identity", [node.outputs[0]])
    model.graph.insert_after(node, ident)
    for use_node, index in list(node.outputs[0].uses()):
        if use_node is not ident:
            use_node.replace_input_with(index, ident.outputs[0])
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    ref = ort_run(model, {"x": x})
    cleaned = CleanupPass(level="none")(model).model
    assert not {first.name, "twin"} <= set(cleaned.graph.initializers)  # one copy left
    assert not any(n.op_type == "Identity" for n in cleaned.graph)
    assert_close(ref, cleaned, {"x": x}, atol=1e-5)


def test_transformer_fusions_need_a_type():
    with pytest.raises(InputError):
        CleanupPass(num_heads=4)
    with pytest.raises(InputError):
        CleanupPass(transformer="bert", num_heads=3, hidden_size=64)
    assert CleanupConfig(transformer="bert", num_heads=4, hidden_size=64).num_heads == 4


def test_bert_fusions_from_onnxruntime_transformers(cli, tmp_path):
    bundle = tmp_path / "bert"
    code, _, stderr = cli(
        "convert", model_ref("tiny_bert"), "-o", bundle, "--no-bench",
        "--input", "input_ids:int64[batch,seq]", "--input", "attention_mask:int64[batch,seq]",
    )  # fmt: skip
    assert code == 0, stderr
    model = ir.load(bundle / "model.onnx")
    rng = np.random.default_rng(0)
    feeds = {
        "input_ids": rng.integers(0, 200, (2, 7)).astype(np.int64),
        "attention_mask": np.ones((2, 7), np.int64),
    }
    ref = ort_run(model, feeds)
    graph_pass = CleanupPass(transformer="bert", num_heads=4, hidden_size=64)
    fused = graph_pass(model).model
    ops = graph_pass.metrics["ops_after"]
    assert any(op.startswith("com.microsoft::") for op in ops), ops
    assert graph_pass.metrics["nodes_after"] < graph_pass.metrics["nodes_before"]
    assert np.allclose(ort_run(fused, feeds)[0], ref[0], atol=1e-3)


def test_cli_optimize_writes_a_bundle(cli, tmp_path):
    bundle = tmp_path / "gated"
    spec = "x:float32[batch,3,16,16]"
    assert cli("convert", model_ref("gated"), "-o", bundle, "--input", spec, "--no-bench")[0] == 0
    code, stdout, stderr = cli("optimize", bundle, "-o", tmp_path / "opt", "--json")
    assert code == 0, stderr
    manifest = json.loads(stdout)
    step = manifest["steps"][-1]
    assert step["name"] == "optimize" and step["config"]["level"] == "basic"
    assert step["metrics"]["gate"]["max_abs"] < 1e-4
    assert manifest["validation"]["cpu"]["status"] == "passed"


def test_cli_optimize_bad_level_exits_2(cli, tmp_path):
    code, _, _ = cli("optimize", tmp_path, "-o", tmp_path / "o", "--level", "max")
    assert code == 2
