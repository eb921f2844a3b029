"""Edges of ``convert`` and ``compare`` a bug sweep found, each with the outcome a user expects."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import tree_hash


def _source(tmp_path: Path, body: str, name: str = "m.py") -> Path:
    path = tmp_path / name
    path.write_text("import torch\nimport torch.nn as nn\n\n" + textwrap.dedent(body))
    return path


def test_out_over_the_source_file_and_data_is_refused(cli, tmp_path):
    """-o naming the folder that holds model.py (and the --data file) must not replace it."""
    project = tmp_path / "proj"
    project.mkdir()
    source = _source(project, "def make():\n    return nn.Linear(8, 4)\n")
    data = project / "d.npz"
    np.savez(data, x=np.ones((2, 8), np.float32))
    before = tree_hash(project)
    code, _, err = cli(
        "convert", f"{source}:make", "-o", project, "--overwrite", "--input", "x:float32[batch,8]",
        "--data", data, "--no-bench",
    )  # fmt: skip
    assert code == 2 and "is (or contains, or is inside) the input" in err
    assert tree_hash(project) == before


def test_a_model_that_changes_its_input_in_place_converts(cli, tmp_path):
    source = _source(
        tmp_path,
        """
        class Scale(nn.Module):
            def forward(self, x):
                x.mul_(2)  # a preprocessing wrapper doing x /= 255 in place
                return x + 1

        def make():
            return Scale()
        """,
    )
    out = tmp_path / "b"
    code, _, err = cli("convert", f"{source}:make", "-o", out, "--input", "x:float32[batch,5]")
    assert code == 0, err
    stored = np.load(out / "parity.npz")
    for key in (k for k in stored.files if k.startswith("in")):
        out_key = "out" + key[2:].split("/")[0] + "/0"
        assert np.allclose(stored[out_key], stored[key] * 2 + 1)  # the inputs as fed, unchanged
    assert cli("validate", out)[0] == 0


def test_parity_runs_batch_1_when_the_first_input_is_static(cli, tmp_path):
    """A branch on batch == 1 that torch.export drops: caught although input 0 has no batch."""
    source = _source(
        tmp_path,
        """
        class M(nn.Module):
            def forward(self, temperature, x):
                if x.shape[0] == 1:
                    return x / temperature + 1.0
                return x / temperature

        def make():
            return M()
        """,
    )
    code, _, err = cli(
        "convert", f"{source}:make", "-o", tmp_path / "b", "--exporter", "dynamo",
        "--input", "temperature:float32[1]", "--input", "x:float32[batch,4]",
    )  # fmt: skip
    assert code == 1 and "does not match" in err and not (tmp_path / "b").exists()


def test_equal_infinities_agree(cli, tmp_path):
    """Masked logits (-inf where masked) match exactly; parity passes and JSON stays strict."""
    source = _source(
        tmp_path,
        """
        class Masked(nn.Module):
            def forward(self, x):
                return x.masked_fill(x < 0, float("-inf"))

        def make():
            return Masked()
        """,
    )
    out = tmp_path / "b"
    code, _, err = cli("convert", f"{source}:make", "-o", out, "--input", "x:float32[batch,6]")
    assert code == 0, err
    parity = json.loads((out / "manifest.json").read_text())["parity"]
    assert parity["passed"] and parity["max_abs_diff"] == 0.0


def test_a_parity_failure_report_is_strict_json(tmp_path):
    from onnxpipe.bundle import write_failure_report

    path = write_failure_report(
        tmp_path / "b", {"metrics": {"max_abs_diff": float("nan"), "x": -np.inf}}
    )
    text = Path(path).read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text)["metrics"] == {"max_abs_diff": "nan", "x": "-inf"}


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--opset", "6"), "--opset Input should be greater than or equal to 7"),
        (("--opset", "24"), "--opset Input should be less than or equal to 23"),
        (("--atol", "nan"), "--atol Input should be a finite number"),
        (("--atol", "inf"), "--atol Input should be a finite number"),  # parity passed at 969
    ],
)
def test_convert_settings_out_of_range_are_exit_2(cli, tmp_path, flags, message):
    source = _source(tmp_path, "def make():\n    return nn.Linear(8, 4)\n")
    code, _, err = cli(
        "convert", f"{source}:make", "-o", tmp_path / "b", "--input", "x:float32[b,8]", *flags
    )
    assert code == 2 and f"convert: {message}" in err and "pydantic" not in err


def test_messages_keep_their_colon_words(cli, tmp_path):
    """rich would print ``m.py:rocket`` as ``m.py🚀``: emoji codes stay text."""
    source = _source(tmp_path, "def rocket():\n    raise RuntimeError('no weights here')\n")
    code, _, err = cli(
        "convert", f"{source}:rocket", "-o", tmp_path / "b", "--input", "x:float32[b,8]"
    )
    assert code == 2 and f"{source}:rocket" in err.replace("\n", "")


def test_compare_refuses_models_with_other_outputs(cli, tmp_path):
    one = _source(tmp_path, "def make():\n    return nn.Linear(8, 4)\n", "one.py")
    two = _source(
        tmp_path,
        """
        class Two(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = nn.Linear(8, 4)

            def forward(self, x):
                return self.fc(x), x.sum(1)

        def make():
            return Two()
        """,
        "two.py",
    )
    for source, out in ((one, "a"), (two, "b")):
        assert (
            cli(
                "convert",
                f"{source}:make",
                "-o",
                tmp_path / out,
                "--input",
                "x:float32[b,8]",
                "--no-bench",
            )[0]
            == 0
        )
    for first, second in (("a", "b"), ("b", "a")):
        code, _, err = cli("compare", tmp_path / first, tmp_path / second, "--no-bench")
        assert code == 2 and "compare needs models with the same outputs" in err


def test_exported_program_inputs_bind_by_name(cli, tmp_path):
    """A .pt2 takes its inputs by position: specs named in another order are put in order."""
    import torch

    class QK(torch.nn.Module):
        def forward(self, query, key):
            return query * 2 + key

    path = tmp_path / "qk.pt2"
    example = (torch.ones(2, 3), torch.ones(2, 3))
    torch.export.save(torch.export.export(QK(), example), path)
    out = tmp_path / "b"
    code, _, err = cli(
        "convert", path, "-o", out, "--input", "key:float32[2,3]", "--input", "query:float32[2,3]"
    )
    assert code == 0, err
    import onnxruntime as ort

    q, k = np.ones((2, 3), np.float32), np.full((2, 3), 10, np.float32)
    got = ort.InferenceSession(str(out / "model.onnx")).run(None, {"query": q, "key": k})[0]
    assert np.allclose(got, q * 2 + k)


def test_exported_program_symbols_get_readable_names(cli, tmp_path):
    """torch saves its own symbols (s77); the manifest shows batch and one shared length."""
    import torch

    class Masked(torch.nn.Module):
        def forward(self, x, mask):
            return x * mask

    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    example = (torch.ones(2, 5), torch.ones(2, 5))
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq})
    path = tmp_path / "m.pt2"
    torch.export.save(torch.export.export(Masked(), example, dynamic_shapes=shapes), path)
    out = tmp_path / "b"
    code, _, err = cli("convert", path, "-o", out, "--no-bench")
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [i["shape"] for i in manifest["inputs"]] == [["batch", "x_dim1"], ["batch", "x_dim1"]]
    assert manifest["outputs"][0]["shape"] == ["batch", "x_dim1"]


def test_a_view_dynamo_cannot_trace_is_not_called_an_unsupported_op(cli, tmp_path):
    """T5's attention views a non-contiguous tensor at symbolic shapes: dynamo fails there."""
    pytest.importorskip("transformers")
    source = _source(
        tmp_path,
        """
        def make():
            from transformers import T5Config, T5EncoderModel

            config = T5Config(vocab_size=120, d_model=32, d_kv=16, d_ff=64, num_layers=2,
                              num_heads=2)
            return T5EncoderModel(config)
        """,
    )
    code, _, err = cli(
        "convert", f"{source}:make", "-o", tmp_path / "a", "--exporter", "dynamo",
        "--input", "input_ids:int64[batch,seq]", "--no-bench",
    )  # fmt: skip
    assert code == 2 and "--exporter torchscript" in err and "Unsupported op" not in err


def test_any_error_in_the_users_forward_is_bad_input(cli, tmp_path):
    source = _source(
        tmp_path,
        """
        class Broken(nn.Module):
            def forward(self, x):
                return self.missing(x)

        def make():
            return Broken()
        """,
    )
    code, _, err = cli("convert", f"{source}:make", "-o", tmp_path / "b", "--input",
                       "x:float32[batch,4]")  # fmt: skip
    assert code == 2 and "AttributeError: 'Broken' object has no attribute 'missing'" in err


def test_lstm_output_keeps_its_sequence_dim_symbolic(cli, tmp_path):
    """dynamo declares an LSTM's output [batch, 3, 16] (the traced length); it runs at any."""
    source = _source(
        tmp_path,
        """
        class Seq(nn.Module):
            def __init__(self):
                super().__init__()
                self.rnn = nn.LSTM(8, 16, batch_first=True)

            def forward(self, x):
                return self.rnn(x)[0]

        def make():
            torch.manual_seed(0)
            return Seq().eval()
        """,
    )
    out = tmp_path / "b"
    code, _, err = cli(
        "convert", f"{source}:make", "-o", out, "--input", "x:float32[batch,seq,8]",
        "--exporter", "dynamo", "--no-bench",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["outputs"][0]["shape"] == ["batch", "seq", 16]
    import onnx

    dims = onnx.load(out / "model.onnx").graph.output[0].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in dims] == ["batch", "seq", 16]


def test_opset_is_honoured_or_the_exporter_falls_back(cli, tmp_path):
    """dynamo writes opset 18+: --opset 13 falls back to TorchScript, saying why."""
    source = _source(
        tmp_path, "def make():\n    return nn.Sequential(nn.Linear(8, 4), nn.ReLU())\n"
    )
    out = tmp_path / "b"
    code, _, err = cli(
        "convert", f"{source}:make", "-o", out, "--input", "x:float32[b,8]", "--opset", "13",
        "--no-bench",
    )  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["opset"] == 13
    assert manifest["source"]["exporter"] == "torchscript"
    assert "not the --opset 13 asked" in manifest["source"]["fallback_reason"]


def test_an_onnx_file_is_converted_to_the_asked_opset(cli, tmp_path):
    import onnx
    from onnx import helper

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4])],
    )
    path = tmp_path / "relu13.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    out = tmp_path / "b"
    assert cli("convert", path, "-o", out, "--opset", "18", "--no-bench")[0] == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["opset"] == 18 and manifest["parity"]["passed"]
    assert "opset 13 converted to 18 (--opset)" in manifest["source"]["notes"]


def test_an_output_named_like_an_input_is_renamed(cli, tmp_path):
    source = _source(
        tmp_path,
        """
        class Same(nn.Module):
            def forward(self, x):
                return {"x": x * 2}

        def make():
            return Same()
        """,
    )
    out = tmp_path / "b"
    code, _, err = cli(
        "convert", f"{source}:make", "-o", out, "--input", "x:float32[b,4]", "--no-bench"
    )
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [o["name"] for o in manifest["outputs"]] == ["x_out"]


def test_a_float16_model_passes_parity_at_the_default_tolerance(cli, tmp_path):
    """Torch and ORT round float16 differently by an ulp; that is not a conversion error."""
    source = _source(
        tmp_path,
        """
        def make():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).half().eval()
        """,
    )
    code, _, err = cli(
        "convert",
        f"{source}:make",
        "-o",
        tmp_path / "b",
        "--input",
        "x:float16[b,16]",
        "--no-bench",
    )
    assert code == 0, err


def test_python_numbers_among_the_outputs_are_compared(cli, tmp_path):
    source = _source(
        tmp_path,
        """
        class M(nn.Module):
            def forward(self, x):
                return x.argmax(-1), x.shape[0]

        def make():
            return M()
        """,
    )
    out = tmp_path / "b"
    code, _, err = cli("convert", f"{source}:make", "-o", out, "--input", "x:float32[batch,4]")
    assert code == 0, err
    assert len(json.loads((out / "manifest.json").read_text())["outputs"]) == 2


def test_a_failed_dynamo_export_does_not_dump_its_graph(cli, tmp_path):
    """Data-dependent control flow: torch.export fails and prints the FX graph; not to users."""
    source = _source(
        tmp_path,
        """
        class Branch(nn.Module):
            def forward(self, x):
                if x.sum() > 0:
                    return x * 2
                return x

        def make():
            return Branch()
        """,
    )
    code, _, err = cli(
        "convert", f"{source}:make", "-o", tmp_path / "b", "--input", "x:float32[b,4]",
        "--exporter", "dynamo",
    )  # fmt: skip
    assert code == 2 and "no exporter could convert the model" in err
    assert "def forward(self" not in err and "torch.ops.aten" not in err


def test_misleading_source_messages_name_the_real_problem(cli, tmp_path):
    noise = tmp_path / "weights.pt"
    noise.write_bytes(bytes(range(7, 250)) * 2)  # not a zip, not a pickle
    code, _, err = cli("convert", noise, "-o", tmp_path / "b", "--input", "x:float32[b,8]")
    assert code == 2 and "not a PyTorch model file" in err and "--unsafe-load" not in err
    folder = tmp_path / "saved_model"
    folder.mkdir()
    code, _, err = cli(
        "convert", folder, "-o", tmp_path / "b", "--framework", "torch", "--input", "x:float32[b,8]"
    )
    assert code == 2 and "a directory (a TensorFlow SavedModel?)" in err


def test_a_module_in_the_working_directory_is_importable(cli, tmp_path, monkeypatch):
    """``pkg.nets:make`` from the project folder, as ``python -m`` would find it."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    _source(package, "def make():\n    return nn.Linear(8, 4)\n", "nets.py")
    monkeypatch.chdir(tmp_path)
    code, _, err = cli(
        "convert", "pkg.nets:make", "-o", tmp_path / "b", "--input", "x:float32[b,8]", "--no-bench"
    )
    assert code == 0, err


def test_a_transformers_cache_output_points_to_use_cache(cli, tmp_path):
    pytest.importorskip("transformers")
    source = _source(
        tmp_path,
        """
        from transformers import GPT2Config, GPT2Model

        def make():
            config = GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32)
            return GPT2Model(config).eval()
        """,
    )
    code, _, err = cli(
        "convert", f"{source}:make", "-o", tmp_path / "b", "--input", "input_ids:int64[b,seq]"
    )
    assert code == 2 and "use_cache=False" in err.replace("\n", "")


def test_spec_names_partly_forwards_parameters_are_refused(cli, tmp_path):
    """``key`` and ``foo`` for forward(query, key): bound by position, key would feed query."""
    source = _source(
        tmp_path,
        """
        class QK(nn.Module):
            def forward(self, query, key):
                return query * 2 + key

        def make():
            return QK()
        """,
    )
    code, _, err = cli(
        "convert", f"{source}:make", "-o", tmp_path / "b",
        "--input", "key:float32[b,3]", "--input", "foo:float32[b,3]",
    )  # fmt: skip
    assert code == 2 and "partly forward's parameters" in err


def test_parity_rests_on_data_when_ort_cannot_run_the_generated_sizes(tmp_path, caplog):
    """An image model ORT cannot run at the 5x6 pixels generated for free dims, say."""
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from onnxpipe.converters.base import ConversionResult, InputSpec
    from onnxpipe.source_parity import check_parity
    from tests.helpers import ort_run

    w = np.random.default_rng(0).standard_normal((2, 3, 7, 7)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])],  # 7x7 valid: needs 7 pixels or more
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "oh", "ow"])],
        [numpy_helper.from_array(w, "w")],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    path = tmp_path / "model.onnx"
    ir.save(model, path)

    def framework(feeds):  # a framework that runs any size (zeros where the conv has none)
        x = feeds["x"]
        if min(x.shape[2:]) < 7:
            return [np.zeros((len(x), 2, 0, 0), np.float32)]
        return ort_run(model, feeds)

    spec = InputSpec("x", "float32", ("batch", 3, "h", "w"))
    result = ConversionResult(model, "onnx", "none", [spec], framework, "test framework")
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype("f4"))
    parity, _ = check_parity(result, path, 1e-4, str(data))
    assert parity["passed"] and parity["samples"] == 4
    assert "ONNX Runtime cannot run the generated samples" in caplog.text
    parity, _ = check_parity(result, path, 1e-4, None)  # without data: a failure, not advice
    assert not parity["passed"] and parity["errors"]


def test_the_tolerance_is_no_tighter_than_the_sources_own_noise(tmp_path, caplog):
    """A source whose batched run differs from its one-at-a-time run by 3e-4 passes at 1e-4."""
    import onnx_ir as ir
    from onnx import TensorProto, helper

    from onnxpipe.converters.base import ConversionResult, InputSpec
    from onnxpipe.source_parity import check_parity

    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    path = tmp_path / "model.onnx"
    ir.save(model, path)
    spec = InputSpec("x", "float32", ("batch", 4))

    def noisy(feeds):  # batched kernels round differently: 3e-4 off when batched
        x = feeds["x"]
        return [2 * x + np.float32(3e-4 if len(x) > 1 else 0)]

    result = ConversionResult(model, "onnx", "none", [spec], noisy, "noisy framework")
    parity, _ = check_parity(result, path, 1e-4, None)
    tolerance = parity["tolerance"]  # noise relative to the output's magnitude, as atol is
    assert parity["passed"] and 5e-5 < tolerance["source_noise"] <= 3e-4
    assert tolerance["atol"] == pytest.approx(2 * tolerance["source_noise"])
    assert "differs from itself" in caplog.text

    def off(feeds):  # off by 3e-4 at every batch size: no noise, a real difference
        return [2 * feeds["x"] + np.float32(3e-4)]

    result = ConversionResult(model, "onnx", "none", [spec], off, "framework")
    parity, _ = check_parity(result, path, 1e-4, None)
    assert not parity["passed"] and "source_noise" not in parity["tolerance"]


def test_validate_holds_stored_outputs_to_the_measured_noise():
    from onnxpipe.validate import source_tolerance

    noisy = {"parity": {"tolerance": {"atol": 2.4e-4, "source_noise": 1.2e-4}}}
    assert source_tolerance(noisy, 1e-4) == pytest.approx(2.4e-4)
    assert source_tolerance(noisy, 1e-3) == 1e-3  # never tighter than asked
    assert source_tolerance({"parity": {"tolerance": {"atol": 1e-4}}}, 1e-4) == 1e-4


@pytest.mark.parametrize(("module", "extra"), [("tensorflow", "tf"), ("torch", "torch")])
def test_user_code_that_needs_a_missing_framework_names_the_extra(
    cli, tmp_path, monkeypatch, module, extra
):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed
    at_import = tmp_path / "top.py"
    at_import.write_text(f"import {module}\n\ndef make():\n    return None\n")
    inside = tmp_path / "inside.py"
    inside.write_text(f"def make():\n    import {module}\n    return {module}\n")
    for ref in (f"{at_import}:make", f"{inside}:make"):
        code, _, err = cli("convert", ref, "-o", tmp_path / "o", "--input", "x:float32[2,3]")
        assert code == 2 and f"pip install 'onnxpipe[{extra}]'" in err, err
        assert "Fix the file" not in err and "must build" not in err


def test_onnxpipe_s_own_factory_message_is_not_wrapped(monkeypatch):
    from onnxpipe.converters.source import call_factory
    from onnxpipe.errors import InputError

    def factory():
        raise InputError("the demo needs its packages. Install them with: pip install x")

    monkeypatch.setattr("onnxpipe.converters.source.load_callable", lambda ref: factory)
    with pytest.raises(InputError) as caught:
        call_factory("onnxpipe.demo:efficientnet_lite0")
    assert str(caught.value) == "the demo needs its packages. Install them with: pip install x"


def test_an_exporter_that_writes_an_invalid_graph_falls_back(cli, tmp_path):
    """Dynamo down-converts to opset 17 keeping Split's opset-18 num_outputs: ORT refuses it."""
    source = _source(
        tmp_path,
        """
        class M(nn.Module):
            def __init__(self):
                super().__init__()
                self.l = nn.Linear(12, 6)

            def forward(self, x):
                a, b, c = torch.split(self.l(x), 2, dim=-1)
                return a * b + c

        def make():
            torch.manual_seed(0)
            return M().eval()
        """,
    )
    out = tmp_path / "o"
    code, _, err = cli("convert", f"{source}:make", "-o", out, "--opset", "17",
                       "--input", "x:float32[batch,12]", "--no-bench")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["source"]["exporter"] == "torchscript" and manifest["model"]["opset"] == 17
    assert "cannot load the model it wrote" in manifest["source"]["fallback_reason"]
    assert manifest["parity"]["passed"] is True


def test_unsafe_load_finds_the_model_class_beside_the_file(cli, tmp_path, monkeypatch):
    """A torch.save(model) file unpickles with its model.py importable, as module:callable."""
    import subprocess
    import sys

    (tmp_path / "saved_net_mod.py").write_text(
        "import torch\n\nclass Net(torch.nn.Module):\n    def __init__(self):\n"
        "        super().__init__()\n        self.l = torch.nn.Linear(4, 2)\n\n"
        "    def forward(self, x):\n        return self.l(x)\n"
    )
    save = "import torch, saved_net_mod; torch.save(saved_net_mod.Net().eval(), 'full.pth')"
    subprocess.run([sys.executable, "-c", save], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    try:
        code, _, err = cli("convert", "full.pth", "-o", "o", "--unsafe-load",
                           "--input", "x:float32[batch,4]", "--no-bench")  # fmt: skip
    finally:
        sys.modules.pop("saved_net_mod", None)
    assert code == 0, err
    assert str(tmp_path) not in sys.path  # only while unpickling


def test_freed_output_dims_are_named_like_every_unnamed_dim():
    """A freed output dim no input symbol explains gets the symbol unnamed dims get elsewhere."""
    import onnx_ir as ir

    from onnxpipe.convert import free_output_dims
    from onnxpipe.converters.base import InputSpec

    out = ir.Value(name="pool.out:0", shape=ir.Shape([3]), type=ir.TensorType(ir.DataType.FLOAT))
    graph = ir.Graph(inputs=[], outputs=[out], nodes=[], opset_imports={"": 18})
    model = ir.Model(graph, ir_version=10)
    samples = [({"x": np.zeros((n, 2), np.float32)}, [np.zeros(2 * n, np.float32)]) for n in (2, 3)]
    note = free_output_dims(model, samples, [InputSpec("x", "float32", ("batch", 2))])
    assert note is not None and "pool.out:0[0] 3 -> pool_out_0_d0" in note
    assert [str(d) for d in model.graph.outputs[0].shape] == ["pool_out_0_d0"]


def test_a_saved_models_graph_file_points_to_its_directory(cli, tmp_path):
    """SOURCE saved_model.pb was 'unknown model file type .pb'; the directory is the model."""
    folder = tmp_path / "exported"
    folder.mkdir()
    (folder / "saved_model.pb").write_bytes(b"\0")
    code, _, err = cli("convert", folder / "saved_model.pb", "-o", tmp_path / "out")
    err = err.replace("\n", "")
    assert code == 2 and f"SavedModel {folder.resolve()}; pass that directory" in err, err
