"""The PyTorch converter on models built in code: exporters, fallback, loading, refusals."""

from pathlib import Path

import numpy as np
import pytest
import torch

from onnxpipe.convert import convert
from onnxpipe.converters import torch as torch_converter
from onnxpipe.converters.base import ConvertConfig, ExportAttempt
from onnxpipe.converters.torch.export import ExportFailed
from onnxpipe.errors import ConversionError, GateFailed, InputError
from tests.conftest import model_ref
from tests.fixtures import models
from tests.helpers import assert_close

IMAGE = ("x:float32[batch,3,16,16]",)


def first_result(source, config):
    attempt: ExportAttempt = next(iter(torch_converter.attempts(source, config)))
    assert attempt.result is not None, attempt.error
    return attempt.result


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_exporters_match_torch_at_unseen_batch_sizes(exporter):
    result = first_result(model_ref("gated"), ConvertConfig(inputs=IMAGE, exporter=exporter))
    assert result.exporter == exporter
    assert [v.name for v in result.model.graph.inputs] == ["x"]
    model = models.gated()
    for batch in (1, 3, 5):
        x = np.random.default_rng(batch).standard_normal((batch, 3, 16, 16)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x)).numpy()
        assert_close([want], result.model, {"x": x}, atol=1e-4)


def test_dict_outputs_keep_their_names_and_kwargs_reach_forward():
    specs = ("attention_mask:int64[batch,seq]", "input_ids:int64[batch,seq]")  # not forward order
    result = first_result(model_ref("two_inputs"), ConvertConfig(inputs=specs))
    assert [v.name for v in result.model.graph.outputs] == ["pooled", "tokens"]
    assert [v.name for v in result.model.graph.inputs] == ["attention_mask", "input_ids"]
    dims = [d.value for d in result.model.graph.inputs[1].shape]
    assert dims == ["batch", "seq"]
    ids = np.random.default_rng(0).integers(0, 100, (3, 9))
    mask = np.ones((3, 9), dtype=np.int64)
    mask[:, 6:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    assert_close(result.reference(feeds), result.model, feeds, atol=1e-5)


def test_torchscript_and_exported_program_files(tmp_path):
    model = models.gated()
    example = torch.randn(2, 3, 16, 16)
    torch.jit.trace(model, example).save(str(tmp_path / "model.pt"))
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(tmp_path / "model.pt2"))
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    ts = convert(str(tmp_path / "model.pt"), ConvertConfig(inputs=IMAGE), tmp_path / "w").result
    assert ts.exporter == "torchscript" and "TorchScript module" in ts.fallback_reason
    assert_close([want], ts.model, {"x": x})
    # The .pt2 records its own input spec: no --input needed.
    ep = first_result(str(tmp_path / "model.pt2"), ConvertConfig())
    assert ep.inputs[0].shape[1:] == (3, 16, 16) and isinstance(ep.inputs[0].shape[0], str)
    name = ep.inputs[0].name
    assert_close([want], ep.model, {name: x})


def test_a_scripted_module_in_memory_converts(tmp_path):
    """torch.jit.script(model) from a factory or the API, not only torch.jit.load's."""
    model = models.gated()
    scripted = torch.jit.script(model)
    x = np.random.default_rng(2).standard_normal((3, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    done = convert(scripted, ConvertConfig(inputs=IMAGE), tmp_path / "w").result
    assert done.exporter == "torchscript"
    assert_close([want], done.model, {"x": x})


def test_state_dict_file_is_refused_with_what_to_pass(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(models.gated().state_dict(), path)
    before = path.read_bytes()
    with pytest.raises(InputError, match="state_dict") as info:
        list(torch_converter.attempts(str(path), ConvertConfig(inputs=IMAGE)))
    assert str(path) in str(info.value) and "file.py:make" in str(info.value)
    assert path.read_bytes() == before


def test_pickled_module_needs_unsafe_load(tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(models.gated(), path)
    with pytest.raises(InputError, match="--unsafe-load"):
        list(torch_converter.attempts(str(path), ConvertConfig(inputs=IMAGE)))
    result = first_result(str(path), ConvertConfig(inputs=IMAGE, unsafe_load=True))
    x = np.ones((2, 3, 16, 16), np.float32)
    assert_close(result.reference({"x": x}), result.model, {"x": x})


def test_auto_falls_back_to_torchscript_and_says_why(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise ExportFailed("DispatchError: No ONNX function found for aten.fancy", ["aten.fancy"])

    monkeypatch.setattr(torch_converter, "export_dynamo", broken)
    done = convert(model_ref("gated"), ConvertConfig(inputs=IMAGE), tmp_path)
    assert done.result.exporter == "torchscript"
    assert "dynamo export failed" in done.result.fallback_reason
    assert "aten.fancy" in done.result.fallback_reason
    assert done.parity["passed"] and done.parity["samples"] >= 8


def test_fallback_that_is_wrong_at_other_shapes_is_never_shipped(tmp_path):
    # dynamo freezes the batch (the model reads it as a Python float); TorchScript bakes it
    # in as the constant 2. Both are wrong at batch 3: the gate must fail with numbers.
    with pytest.raises(GateFailed) as info:
        convert(model_ref("batch_baked"), ConvertConfig(inputs=("x:float32[batch,4]",)), tmp_path)
    attempts = info.value.metrics["attempts"]
    assert [a["exporter"] for a in attempts] == ["dynamo", "torchscript"]
    assert attempts[0]["status"] == "export_failed" and "static" in attempts[0]["error"]
    assert attempts[1]["status"] == "parity_failed" and attempts[1]["max_abs_diff"] > 0.1
    assert info.value.metrics["parity"]["passed"] is False


def test_unsupported_op_names_the_op(tmp_path):
    with pytest.raises(ConversionError, match="special_zeta") as info:
        convert(model_ref("unsupported"), ConvertConfig(inputs=("x:float32[batch,4]",)), tmp_path)
    assert "models.py:unsupported" in str(info.value)


def test_missing_input_spec_says_to_pass_input(tmp_path):
    with pytest.raises(InputError, match="--input"):
        convert(model_ref("gated"), ConvertConfig(), tmp_path)


def test_spec_that_does_not_fit_the_model(tmp_path):
    with pytest.raises(InputError, match="failed on inputs"):
        convert(model_ref("gated"), ConvertConfig(inputs=("x:float32[batch,5,16,16]",)), tmp_path)


def test_python_api_takes_a_module_object(tmp_path):
    done = convert(models.gated(), ConvertConfig(inputs=IMAGE), tmp_path)
    assert done.result.framework == "torch" and done.parity["passed"]
    assert Path(done.model_path).is_file()


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_leaves_the_model_in_eval_mode(exporter, tmp_path):
    model = models.gated()
    done = convert(model, ConvertConfig(inputs=IMAGE, exporter=exporter), tmp_path)
    assert not any(m.training for m in model.modules())
    assert done.parity["passed"], done.parity
