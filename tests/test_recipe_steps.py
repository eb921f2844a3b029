"""Recipes with optimize, quantize and prune steps: one gated bundle, every step recorded."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from tests.conftest import model_ref
from tests.helpers import ort_run

MLP = "x:float32[batch,64]"


@pytest.fixture
def eval_npz(tmp_path):
    """16 random MLP inputs as an ``.npz``; returns (path, array)."""
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x)
    return tmp_path / "eval.npz", x


def _recipe(tmp_path, steps: str, source: str = model_ref("mlp"), spec: str = MLP):
    """A recipe file of ``steps`` (YAML list lines) on the test MLP by default."""
    path = tmp_path / "recipe.yaml"
    path.write_text(f"source: {source}\ninputs: ['{spec}']\nsteps:\n{steps}")
    return path


def test_convert_optimize_prune_quantize_in_one_recipe(cli, tmp_path, eval_npz):
    data, x = eval_npz
    recipe = _recipe(
        tmp_path,
        "  - convert\n  - optimize: {level: basic}\n"
        f"  - prune: {{method: lowrank, ratio: 0.3, eval: {data}, "
        "gate: 'cosine>=0.9'}\n"
        f"  - quantize: {{mode: dynamic, eval: {data}, gate: 'cosine>=0.98'}}\n"
        "  - validate: {ep: cpu}\n",
    )
    out = tmp_path / "out"
    code, _, err = cli("run", recipe, "-o", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    names = [s["name"] for s in manifest["steps"]]
    assert names == ["convert", "optimize", "prune_lowrank", "quantize", "validate"]
    prune = manifest["steps"][2]["metrics"]
    assert prune["params_after"] < prune["params_before"]
    assert manifest["steps"][3]["metrics"]["gate"]["cosine"] >= 0.98
    assert manifest["validation"]["cpu"]["status"] == "passed"
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeMatMul"}, ops
    # The manifest describes the final model, and the parity record is the last step's.
    assert manifest["model"]["bytes"] == (out / "model.onnx").stat().st_size
    assert manifest["parity"]["tolerance"] == ["cosine>=0.98"]
    # measured against the model the recipe had built so far, not a bundle the user has
    reference = "the recipe's model before its quantize step"
    assert manifest["parity"]["reference"].startswith(reference)
    assert reference in (out / "README.md").read_text()
    # The gated search's tables reach the report.
    page = (out / "report.html").read_text()
    assert "prune_lowrank: sensitivity" in page and "prune_lowrank: search steps" in page
    (y,) = ort_run(out / "model.onnx", {"x": x})
    assert y.shape == (16, 10)


def test_recipe_that_is_not_utf8_or_a_directory_is_exit_2(cli, tmp_path):
    latin = tmp_path / "latin1.yaml"
    latin.write_bytes(b"source: m.py:make\xff\nsteps:\n  - convert\n")
    code, _, err = cli("run", latin, "-o", tmp_path / "out")
    assert code == 2 and "UTF-8" in err and str(latin) in err
    folder = tmp_path / "dir.yaml"
    folder.mkdir()
    code, _, err = cli("run", folder, "-o", tmp_path / "out")
    assert code == 2 and "is a directory" in err


def test_recipe_takes_the_commands_spellings_of_options(tmp_path):
    """README: steps take the command's long options; --per-tensor, --no-empirical-bias and
    hyphens are spelled as the command spells them."""
    from onnxpipe.errors import InputError
    from onnxpipe.recipe import load_recipe

    np.savez(tmp_path / "c.npz", x=np.ones((8, 64), np.float32))  # a missing one is refused
    recipe = _recipe(
        tmp_path,
        "  - convert\n  - quantize: {mode: static, calib: c.npz, per_tensor: true, "
        "no_empirical_bias: true, activation-type: int8}\n"
        "  - validate: {ep: [CPU]}\n",
    )
    steps = load_recipe(recipe)
    settings = steps[1].settings  # type: ignore[attr-defined]
    assert settings["per_channel"] is False and settings["empirical_bias"] is False
    assert settings["activation_type"] == "int8"
    assert steps[2].ep == ("cpu",)  # type: ignore[attr-defined]
    clash = _recipe(tmp_path, "  - convert\n  - quantize: {mode: dynamic, per_tensor: true, "
                    "per_channel: true}\n")  # fmt: skip
    with pytest.raises(InputError, match="both set per_channel"):
        load_recipe(clash)


def test_failed_gate_in_a_recipe_is_exit_1_and_writes_nothing(cli, tmp_path, eval_npz):
    data, _ = eval_npz
    recipe = _recipe(
        tmp_path,
        f"  - convert\n  - prune: {{method: lowrank, ratio: 0.9, eval: {data}, "
        "gate: 'max_abs<=1e-7'}\n",
    )
    out = tmp_path / "out"
    code, _, err = cli("run", recipe, "-o", out)
    assert code == 1 and "step 2 (prune)" in err and "Traceback" not in err
    assert not out.exists()
    report = json.loads((tmp_path / "out.failed.json").read_text())
    assert report["failed_step"] == "prune" and report["status"] == "gate_failed"
    assert "parity_samples" not in report  # the convert step's parity.npz was never written
    # The message names the recipe's report, not the step's own, deleted with its temp dir.
    assert "onnxpipe-prune-" not in err and str(tmp_path / "out.failed.json") in err
    # The report keeps the step's measurements (search tables, gate), as the command's does.
    assert {"best", "sensitivity"} <= set(report["metrics"]) or "gates" in report["metrics"].get(
        "gate", {}
    )


@pytest.mark.parametrize(
    ("step", "needle"),
    [
        ("quantize: {mode: static}", "--calib"),
        ("quantize: {mode: dynamic, colour: red}", "colour"),
        ("prune: {method: channels, ratio: 1.5}", "ratio"),
        ("prune: {method: fold, ratio: 0.5}", "method"),
        ("optimize: {level: maximal}", "level"),
        ("package: {target: watch}", "target"),
        ("package: {fixed_shape: 'x:1,64'}", "fixed_shape"),
        ("package: {}\n  - quantize: {mode: dynamic}", "before 'quantize'"),
        ("bench: [1, 4]", "takes a mapping"),
        ("bench: 5", "takes a mapping"),
        ("validate: {ep: [CPU, gpu]}", "gpu"),
        ("quantize: {mode: fp16}\n  - convert", "may only be the first step"),
        # refused by the later step only once convert and quantize had run
        (
            "quantize: {mode: dynamic}\n  - prune: {method: magnitude, ratio: 0.5}",
            "step 'prune' comes after 'quantize' (mode dynamic)",
        ),
        (
            "quantize: {mode: fp16}\n  - quantize: {mode: dynamic}",
            "step 'quantize' comes after 'quantize' (mode fp16)",
        ),
        # refused by the command's own check (CPU-fused ops) only once convert and optimize ran
        (
            "optimize: {level: extended}\n  - quantize: {mode: dynamic}",
            "step 'quantize' comes after 'optimize' (level extended), whose fusions are ONNX",
        ),
        (
            "optimize: {level: all}\n  - optimize: {level: basic}\n"
            "  - prune: {method: magnitude, ratio: 0.5}",
            "step 'prune' comes after 'optimize' (level all)",
        ),
        # bench: exit 2 once convert had run, saying 'onnxpipe package the recipe's bundle';
        # validate: 'mobile: unavailable', exit 0
        ("bench: {ep: mobile}\n  - package: {target: mobile}", "step 'bench' has ep mobile"),
        ("validate: {ep: 'cpu,mobile'}", "no 'package' step comes before it"),
        # exit 1 after convert, naming the recipe's temp folder
        ("validate: {require: mobile}\n  - package: {}", "step 'validate' has ep mobile"),
        # a gate that does not parse: exit 2 once convert had run, the recipe unnamed
        ("quantize: {mode: dynamic, gate: 'top1>0.9'}", "'top1>0.9' does not parse"),
        ("prune: {method: magnitude, ratio: 0.5, gate: ['cos>=0.9']}", "'cos>=0.9' does not"),
        ("quantize: {mode: dynamic, gate: 5}", "steps[1].quantize.gate: 5 is a bare number"),
        # refused by the quantize command only once convert had run
        ("quantize: {mode: dynamic, smooth_alpha: 0.5}", "smoothing needs activation"),
        ("quantize: {mode: fp16, preprocess: 'resize=8'}", "it would apply to nothing"),
    ],
)
def test_bad_step_settings_are_exit_2_before_any_work(cli, tmp_path, step, needle):
    recipe = _recipe(tmp_path, f"  - convert\n  - {step}\n")
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 2 and needle in err and "Traceback" not in err
    assert str(recipe) in err  # the message names the recipe it is about
    assert not (tmp_path / "out").exists()


def test_prune_after_fp16_runs(cli, tmp_path):
    """Prune takes an fp16 model, so the step-order check lets it follow quantize fp16."""
    recipe = _recipe(tmp_path, "  - convert\n  - quantize: {mode: fp16}\n"
                     "  - prune: {method: magnitude, ratio: 0.5}\n")  # fmt: skip
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [s["name"] for s in manifest["steps"]][-2:] == ["quantize", "prune_magnitude"]


def test_package_step_writes_the_mobile_package_of_the_final_model(cli, tmp_path, eval_npz):
    data, x = eval_npz
    recipe = _recipe(
        tmp_path,
        f"  - convert\n  - quantize: {{mode: dynamic, eval: {data}}}\n"
        "  - package: {target: mobile, fixed_shape: ['x:1,64']}\n"
        "  - validate: {ep: 'cpu,mobile'}\n",
    )
    out = tmp_path / "out"
    code, _, err = cli("run", recipe, "-o", out)
    assert code == 0, err
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["name"] for s in manifest["steps"]] == ["convert", "quantize", "package", "validate"]
    assert manifest["mobile"]["fixed_shapes"] == {"x": [1, 64]}
    assert manifest["validation"]["mobile"]["status"] == "passed"
    import onnxruntime as ort  # noqa: PLC0415

    mobile = ort.InferenceSession(
        str(out / "mobile" / "model.ort"), providers=["CPUExecutionProvider"]
    )
    types = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert types & {"MatMulInteger", "DynamicQuantizeMatMul"}, (
        types
    )  # the quantized model was packed
    np.testing.assert_allclose(
        mobile.run(None, {"x": x[:1]})[0], ort_run(out / "model.onnx", {"x": x[:1]})[0], atol=1e-4
    )


def test_recipe_paths_are_found_beside_the_recipe(cli, tmp_path, monkeypatch):
    """A recipe kept beside its model and data runs from any working directory."""

    project = tmp_path / "project"
    project.mkdir()
    models_file = model_ref("mlp").rpartition(":")[0]
    (project / "net.py").write_text(Path(models_file).read_text())
    np.savez(project / "data.npz", x=np.ones((4, 64), np.float32))
    recipe = project / "r.yaml"
    recipe.write_text(
        "source: net.py:mlp\ninputs: ['x:float32[batch,64]']\ndata: data.npz\nsteps:\n  - convert\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 0, err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["source"]["path"] == f"{project / 'net.py'}:mlp"
    # found in neither place: both are named (it said "no such Python file" for one of them)
    for missing in ("sub/missing.npz", "nodata"):  # a bare name is a path too
        recipe.write_text(recipe.read_text().replace("data.npz", missing))
        code, _, err = cli("run", recipe, "-o", tmp_path / "out2")
        assert code == 2 and str(elsewhere) in err and str(project) in err, err
        recipe.write_text(recipe.read_text().replace(missing, "data.npz"))
    # a module reference imports from beside the recipe too (it needed the working directory)
    (project / "nets").mkdir()
    (project / "net.py").rename(project / "nets" / "mlps.py")
    recipe.write_text(recipe.read_text().replace("net.py:mlp", "nets.mlps:mlp"))
    code, _, err = cli("run", recipe, "-o", tmp_path / "out3")
    assert code == 0, err
    assert str(project) not in sys.path  # the recipe's folder was on the path for its run only


def test_the_shipped_example_recipe_resolves_from_any_working_directory(tmp_path, monkeypatch):
    from onnxpipe.recipe import load_recipe

    monkeypatch.chdir(tmp_path)
    recipe = Path(__file__).parents[1] / "examples" / "recipe.yaml"
    (convert, *_) = load_recipe(recipe)
    assert convert.source == f"{recipe.parent / 'efficientnet_lite0.py'}:make"


def test_a_refusal_inside_a_recipe_names_the_recipes_model_not_a_scratch_copy(cli, tmp_path):
    recipe = _recipe(
        tmp_path,
        "  - convert\n  - quantize: {mode: dynamic}\n",  # refused: the model is all Conv
        source=model_ref("gated"),
        spec="x:float32[batch,3,16,16]",
    )
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 2 and "step 2 (quantize)" in err and "the recipe's model" in err, err
    assert "onnxpipe-quantize-" not in err


def test_recipe_steps_take_the_cli_spellings_of_no_bench_and_size(tmp_path):
    from onnxpipe.errors import InputError
    from onnxpipe.recipe import load_recipe

    recipe = _recipe(tmp_path, "  - convert: {no_bench: true}\n  - bench: {size: ['seq=16']}\n")
    convert, bench = load_recipe(recipe)
    assert bench.size == {"seq": 16} and "no_bench" not in convert.model_dump()
    wrong = _recipe(tmp_path, "  - convert: {no_bench: false}\n")
    with pytest.raises(InputError, match="add '- bench' after convert to time it"):
        load_recipe(wrong)
    unknown = _recipe(tmp_path, "  - convert: {bogus: 1}\n")
    with pytest.raises(InputError, match="bogus is not a setting of it"):
        load_recipe(unknown)


def test_recipe_keys_and_settings_are_checked_before_any_step_runs(tmp_path):
    """A top-level typo was blamed on convert; bench's threads were checked after convert ran;
    an empty source was read as the working directory ("is a directory, not a SavedModel")."""
    from onnxpipe.errors import InputError
    from onnxpipe.recipe import load_recipe

    typo = _recipe(tmp_path, "  - convert\n")
    typo.write_text("foo: 1\nno_bench: true\n" + typo.read_text())
    with pytest.raises(InputError, match="unknown top-level key 'foo'.*go under their step"):
        load_recipe(typo)
    threads = _recipe(tmp_path, "  - convert\n  - bench: {threads: [2, -1]}\n")
    with pytest.raises(InputError, match=r"steps\[1\]\.bench\.threads\[1\]: Input"):
        load_recipe(threads)
    many = _recipe(tmp_path, "  - convert\n  - bench: {threads: [100000]}\n")
    with pytest.raises(InputError, match=r"threads\[0\]: Input should be less than or equal"):
        load_recipe(many)  # 100000 threads took 16 GB before convert's result was benched
    for setting in ("batch: []", "threads: []", "batch: [true]"):  # StopIteration; batch 1
        odd = _recipe(tmp_path, f"  - convert\n  - bench: {{{setting}}}\n")
        with pytest.raises(InputError, match=r"steps\[1\]\.bench\.(batch|threads)"):
            load_recipe(odd)
    empty = _recipe(tmp_path, "  - convert\n", source="' '")
    with pytest.raises(InputError, match="source is empty: give the model"):
        load_recipe(empty)


def test_an_empty_source_on_the_command_line_is_named(cli, tmp_path):
    code, _, err = cli("convert", "", "-o", tmp_path / "out", "--no-bench")
    assert code == 2 and "SOURCE is empty" in err, err
    assert not (tmp_path / "out").exists()


def test_a_step_refusal_names_the_recipes_model_not_its_scratch_copy(cli, tmp_path):
    recipe = _recipe(tmp_path, "  - convert\n  - bench: {size: [seq=16], runs: 2}\n")
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 2 and "step 2 (bench), after convert: the recipe's model:" in err, err
    assert ".ro.tmp" not in err and not (tmp_path / "out").exists()
    # the recipe's field, not the command's flag ('--size seq: no input has ...')
    assert "size seq: no input has a dynamic dim" in err and "--size" not in err, err


@pytest.mark.parametrize("gate", ["0.99", "[0.99]", "{top1: 0.99}"])
def test_a_gate_that_is_no_text_names_the_gate_field_and_its_forms(tmp_path, gate):
    """``gate: 0.99`` said 'quantize: gates Input should be a valid tuple'."""
    from onnxpipe.errors import InputError
    from onnxpipe.recipe import load_recipe

    recipe = _recipe(tmp_path, f"  - convert\n  - quantize: {{mode: dynamic, gate: {gate}}}\n")
    with pytest.raises(InputError) as caught:
        load_recipe(recipe)
    message = str(caught.value)
    assert f"{recipe}: steps[1].quantize.gate: " in message, message
    assert "gates" not in message and "gate: 'top1>=0.98'" in message, message
    if gate == "0.99":
        assert "0.99 is a bare number, which names no metric" in message


@pytest.mark.parametrize(
    ("top", "step", "named"),
    [
        # pydantic's own names: 'quantize: calib_method', 'settings[energy]', 'gates', 'settings'
        ("", "quantize: {mode: dynamic, calib_method: entropy}", "steps[1].quantize.calib_method "),
        ("", "quantize: {mode: dynamic, per-channel: maybe}", "steps[1].quantize.per-channel: "),
        ("", "quantize: {mode: dynamic, per_tensor: maybe}", "steps[1].quantize: per_tensor "),
        ("", "prune: {method: magnitude, ratio: 0.5, energy: 3}", "steps[1].prune.energy: "),
        ("", "prune: {method: magnitude, ratio: 2}", "steps[1].prune: ratio 2.0: "),
        ("", "optimize: {num-heads: -1}", "steps[1].optimize.num-heads: "),
        ("", "optimize: {lvl: 1}", "steps[1].optimize.lvl "),
        ("", "quantize: {mode: dynamic, gate: 'top1>0.9'}", "steps[1].quantize: gate 'top1>0.9'"),
        ("", "quantize: {mode: dynamic, gate: [5]}", "steps[1].quantize.gate: [5] is not a"),
        ("", "bench: {threads: [1, -1]}", "steps[1].bench.threads[1]: "),
        ("", "validate: {atol: 0}", "steps[1].validate.atol: "),
        ("", "nosuch: {}", "steps[1].nosuch: unknown step"),
        ("opset: 3\n", "validate", ": opset: Input should be"),  # top-level: convert's
    ],
)
def test_invalid_settings_name_the_field_as_the_recipe_writes_it(tmp_path, top, step, named):
    from onnxpipe.errors import InputError
    from onnxpipe.recipe import load_recipe

    recipe = _recipe(tmp_path, f"  - convert\n  - {step}\n")
    recipe.write_text(top + recipe.read_text())
    with pytest.raises(InputError) as caught:
        load_recipe(recipe)
    message = str(caught.value)
    assert message.startswith(f"{recipe}: ") and named in message, message
    for internal in ("settings", "gates", "--ratio", "--gate"):
        assert internal not in message.removeprefix(str(recipe)), message


def test_a_bench_step_at_sizes_the_model_cannot_take_names_its_size_field(
    cli, tmp_path, monkeypatch
):
    """It said 'Bench at sizes it takes: --size seq=N (size: in a recipe; ...)'."""
    import subprocess

    from onnx import TensorProto, helper

    from onnxpipe.benchworker import RUN_FAILED_EXIT

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq"])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq"])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")  # fmt: skip
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: m.onnx\nsteps:\n  - convert\n  - bench: {size: {seq: 3}, runs: 2}\n")
    shape = "run failed: InvalidArgument: [ONNXRuntimeError] : 2 : Got invalid dimensions"
    failed = subprocess.CompletedProcess([], RUN_FAILED_EXIT, "", shape)
    monkeypatch.setattr("onnxpipe.bench.subprocess.run", lambda *a, **k: failed)
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 2 and "dynamic dims at seq=3" in err, err
    assert "the bench step's size: {seq: N}" in err and "--size" not in err, err


@pytest.mark.parametrize(
    ("fixed", "says"),
    [
        # all four said 'settings fixed_shape is a list of NAME:DIMS', with no example of theirs
        ("'x:1,64'", "'x:1,64' is not a list of quoted NAME:DIMS texts"),
        ("[x:1,64]", "YAML reads [x:1,64] as the two entries 'x:1' and 64"),
        ("{x: [1, 64]}", "{'x': [1, 64]} is not a list"),
        ("[x: [1, 64]]", "[{'x': [1, 64]}] is not a list"),
    ],
)
def test_a_package_fixed_shape_in_the_wrong_form_shows_the_right_one(tmp_path, fixed, says):
    from onnxpipe.errors import InputError
    from onnxpipe.recipe import load_recipe

    recipe = _recipe(tmp_path, f"  - convert\n  - package: {{fixed_shape: {fixed}}}\n")
    with pytest.raises(InputError) as caught:
        load_recipe(recipe)
    message = str(caught.value)
    assert f"{recipe}: steps[1].package.fixed_shape: " in message and says in message, message
    assert message.endswith("write fixed_shape: ['x:1,64'].") and "settings" not in message


def test_a_package_fixed_shape_that_does_not_parse_is_refused_before_any_work(cli, tmp_path):
    """'x=1,64' was exit 2 only after convert ran, naming the CLI's --fixed-shape."""
    recipe = _recipe(tmp_path, "  - convert\n  - package: {fixed_shape: ['x:1,64', 'x=1,64']}\n")
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 2 and f"{recipe}: steps[1].package.fixed_shape: 'x=1,64' is not" in err, err
    assert "--fixed-shape" not in err and "after convert" not in err
    assert "write fixed_shape: ['input:1,3,224,224']" in err


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (
            "steps:\n  - convert\n  - bench: {batch: [1, 4], runs: 3\n",
            "line 4, column 1: not valid YAML: expected ',' or '}', but got '<stream end>' "
            "(while parsing a flow mapping that starts at line 3, column 12)",
        ),
        ("source: m.py:x\n  steps: 1\n", "line 2, column 8: not valid YAML: mapping values"),
        ("a: \x01\n", "not valid YAML: unacceptable character #x0001"),
    ],
)
def test_a_yaml_syntax_error_is_one_line_naming_where(cli, tmp_path, text, says):
    """It was PyYAML's six-line dump: '<unicode string>', the source lines and a caret."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    code, out, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 2 and f"{recipe}: {says}" in err, err
    assert err.strip().count("\n") == 0 and "<unicode string>" not in err and "^" not in err
    assert not out and not (tmp_path / "out").exists()


def test_a_recipe_given_by_a_relative_path_names_its_files_in_full(cli, tmp_path, monkeypatch):
    """'beside the recipe (.)' and 'project/bad.npz': the recipe's folder as the user typed it."""
    project = tmp_path / "project"
    project.mkdir()
    np.savez(project / "bad.npz", y=np.ones((4, 64), np.float32))  # no input named y
    monkeypatch.chdir(project)
    recipe = Path("r.yaml")
    recipe.write_text(
        f"source: {model_ref('mlp')}\ninputs: ['{MLP}']\nsteps:\n  - convert\n"
        "  - quantize: {mode: static, calib: sub/missing.npz}\n"
    )
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    missing = project / "sub" / "missing.npz"
    assert code == 2 and f"steps[1].quantize.calib 'sub/missing.npz': {missing} does" in err, err
    monkeypatch.chdir(tmp_path)
    recipe = Path("project/r.yaml")
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 2 and f"neither {tmp_path / 'sub' / 'missing.npz'} (from the working " in err
    assert f"nor {missing} (beside the recipe)" in err, err
    # a file found beside the recipe is named in full by the step that reads it
    recipe.write_text(recipe.read_text().replace("sub/missing.npz", "bad.npz"))
    code, _, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 2 and str(project / "bad.npz") in err, err


def test_the_run_summary_lists_every_bench_configuration(cli, tmp_path):
    """It showed 'cpu batch 1' only, and a second bench step replaced the first's records."""
    recipe = _recipe(
        tmp_path,
        "  - convert\n  - bench: {batch: [1, 2], runs: 2, warmup: 0}\n"
        "  - bench: {batch: [2], threads: [1], runs: 2, warmup: 0}\n",
    )
    code, out, err = cli("run", recipe, "-o", tmp_path / "out")
    assert code == 0, err
    for config in ("batch 1, threads default:", "batch 2, threads default:", "batch 2, threads 1:"):
        assert f"cpu {config} p50" in out, out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    timed = [(r["batch"], r["threads"]) for r in manifest["bench_records"]]
    assert timed == [(1, None), (2, None), (2, 1)]  # None: ORT's default
    assert "| cpu | 1 | default |" in (tmp_path / "out" / "README.md").read_text()
