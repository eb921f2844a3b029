"""The bundle's README.md card: what it tells a deployment team must hold when they act on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _run_card_snippet(bundle: Path) -> list[np.ndarray]:
    """The card's "Run it" snippet, pasted as it stands, run beside the bundle's model."""
    card = (bundle / "README.md").read_text()
    snippet = card.split("```python\n")[1].split("```")[0]
    snippet = snippet.replace('"model.onnx"', repr(str(bundle / "model.onnx")))
    namespace: dict = {}
    exec(compile(snippet, "card", "exec"), namespace)
    return namespace["outputs"]


def test_the_card_snippet_runs_a_model_with_free_image_sizes(cli, tmp_path):
    """A 5x5 conv on free height and width ran at 1x1 pixels in the card (ORT: invalid shape)."""
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 1, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 2, "oh", "ow"])],
        [numpy_helper.from_array(np.ones((2, 1, 5, 5), np.float32), "w")],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "conv.onnx")
    images = np.random.default_rng(0).random((4, 1, 12, 12), dtype=np.float32)
    np.savez(tmp_path / "images.npz", x=images)
    for name, flags in (("timed", ()), ("untimed", ("--no-bench",))):
        code, _, err = cli(
            "convert", tmp_path / "conv.onnx", "-o", tmp_path / name, "--data",
            tmp_path / "images.npz", *flags,
        )  # fmt: skip
        assert code == 0, err
        assert _run_card_snippet(tmp_path / name)[0].shape == (1, 2, 8, 8)  # at the data's 12x12


def test_the_mobile_hint_says_what_dynamic_shapes_did_to_the_counts(cli, tmp_path, mlp_bundle):
    """An fp16 MLP packaged with a dynamic batch: NNAPI 4/8, not the '0' the hint claimed."""
    half, packed = tmp_path / "half", tmp_path / "packed"
    assert cli("quantize", mlp_bundle, "-o", half, "--mode", "fp16")[0] == 0
    code, _, err = cli("package", half, "-o", packed, "--target", "mobile")
    assert code == 0, err
    mobile = json.loads((packed / "manifest.json").read_text())["mobile"]
    assert mobile["nnapi"]["nodes_supported"] > 0  # what it counts on a dynamic batch
    assert "are 0" not in mobile["hint"] and "leave out every node on a dynamic" in mobile["hint"]
    assert mobile["hint"] in (packed / "README.md").read_text()


def test_the_report_says_the_mobile_level_the_card_says():
    """report.html named neither the .ort file's ORT level nor the level note the card gives."""
    from onnxpipe.report import render_report

    mobile = {
        "ort_file": "mobile/model.ort", "operators_config": "mobile/required_operators.config",
        "fixed_shapes": {}, "optimization_level": "basic",
        "level_note": "level basic keeps the int8 model's QuantizeLinear/DequantizeLinear groups "
        "unfused: model.ort runs its layers in float",
    }  # fmt: skip
    manifest = {
        "model": {"file": "model.onnx", "opset": 17, "bytes": 10, "sha256": "0"},
        "inputs": [], "outputs": [], "mobile": mobile,
    }  # fmt: skip
    page = render_report(manifest)
    assert "ORT optimization level basic" in page
    assert "model.ort runs its layers in float" in page


def test_the_card_and_report_say_what_parity_left_out(cli, tmp_path):
    """A bare 'passed' in the card and report where the CLI said 'not compared: noise'."""
    from tests.helpers import graph_bundle

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"]),
         helper.make_node("RandomNormalLike", ["x"], ["noise"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4]),
         helper.make_tensor_value_info("noise", TensorProto.FLOAT, ["batch", 4])],
    )  # fmt: skip
    bundle = graph_bundle(cli, tmp_path, "noisy", graph)
    note = "not compared: noise (random: RandomNormalLike)"
    assert json.loads((bundle / "manifest.json").read_text())["parity"]["not_compared"]
    assert "Not compared: noise (random: RandomNormalLike)." in (bundle / "README.md").read_text()
    assert note in (bundle / "report.html").read_text()
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "zero"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(np.zeros(4, np.float32), "zero")],
    )  # fmt: skip
    bundle = graph_bundle(cli, tmp_path, "constant", graph)
    assert json.loads((bundle / "manifest.json").read_text())["parity"]["constant_reference"]
    for doc in ("README.md", "report.html"):
        assert "so agreeing with it proves little" in (bundle / doc).read_text()


def test_packaging_again_forgets_the_old_packages_timing(cli, tmp_path, mlp_bundle):
    """Packaged again at batch 2, the card kept the batch-1 model.ort's 'mobile | 1' row."""
    first, second = tmp_path / "first", tmp_path / "second"
    assert cli("package", mlp_bundle, "-o", first, "--target", "mobile",
               "--fixed-shape", "x:1,64")[0] == 0  # fmt: skip
    assert cli("bench", first, "--ep", "cpu,mobile", "--runs", "5")[0] == 0
    code, _, err = cli("package", first, "-o", second, "--target", "mobile",
                       "--fixed-shape", "x:2,64")  # fmt: skip
    assert code == 0, err
    manifest = json.loads((second / "manifest.json").read_text())
    assert [r["ep"] for r in manifest["bench_records"]] == ["cpu"]
    assert manifest["bench"]["ep"] == "cpu"
    assert "| mobile | 1 |" not in (second / "README.md").read_text()
    assert cli("bench", second, "--ep", "mobile", "--runs", "5")[0] == 0
    assert "| mobile | 2 |" in (second / "README.md").read_text()


def test_the_report_prints_shapes_as_the_card_does():
    """report.html showed "['batch', 1, 8, 8]" and "{'input': [1, 1, 8, 8]}" (Python reprs)."""
    from onnxpipe.card import render_card
    from onnxpipe.report import render_report

    mobile = {"ort_file": "mobile/model.ort", "operators_config": "ops.config",
              "fixed_shapes": {"input": [1, 1, 8, 8]}, "optimization_level": "basic"}  # fmt: skip
    manifest = {
        "model": {"file": "model.onnx", "opset": 17, "ir_version": 8, "bytes": 10, "sha256": "0"},
        "inputs": [{"name": "input", "dtype": "float32", "shape": ["batch", 1, 8, 8]}],
        "outputs": [], "mobile": mobile,
    }  # fmt: skip
    page, card = render_report(manifest), render_card(manifest)
    assert "<td>[batch, 1, 8, 8]</td>" in page and "| [batch, 1, 8, 8] |" in card
    assert "fixed shapes input [1, 1, 8, 8]," in page and "input [1, 1, 8, 8]." in card
    assert "&#x27;" not in page.split("<details>")[0]  # no quoted Python strings


def test_the_card_keeps_the_note_the_step_printed(cli, tmp_path, mlp_bundle):
    """prune --method magnitude printed 'expect no speedup' on the terminal only, not the card."""
    out = tmp_path / "sparse"
    code, _, err = cli("prune", mlp_bundle, "-o", out, "--method", "magnitude", "--ratio", "0.5")
    assert code == 0 and "note: unstructured sparsity" in err
    card = (out / "README.md").read_text()
    assert "Note from prune_magnitude: unstructured sparsity" in card
    assert "expect no speedup" in card and "..\n" not in card


def test_the_card_and_report_say_what_passed_was_judged_at():
    """The card and report said 'passed' without the atol, or that convert had relaxed it."""
    from onnxpipe.card import render_card
    from onnxpipe.report import render_report
    from onnxpipe.tables import summary_table

    def manifest(tolerance):
        return {
            "model": {"file": "model.onnx", "opset": 17, "ir_version": 8, "bytes": 10,
                      "sha256": "0"},
            "inputs": [], "outputs": [],
            "parity": {"reference": "torch", "samples": 4, "max_abs_diff": 2e-4,
                       "max_rel_diff": 1e-3, "cosine": 1.0, "top1_agreement": 1.0,
                       "passed": True, "tolerance": tolerance},
        }  # fmt: skip

    relaxed = manifest({"atol": 4e-4, "asked_atol": 1e-4, "source_noise": 2e-4})
    card, page = render_card(relaxed), render_report(relaxed)
    for doc in (card, page):
        assert "judged at atol 0.0004" in doc.lower()
        assert "tolerance relaxed from the atol 0.0001 asked to 0.0004" in doc.lower()
        assert "differs from itself by 0.0002" in doc
    from rich.console import Console

    console = Console(width=400, record=True)
    console.print(summary_table(relaxed, Path("out")))
    assert "tolerance relaxed from the atol 0.0001 asked to 0.0004" in console.export_text()
    gated = render_card(manifest(["top1>=0.97"]))
    assert "Judged at gates top1>=0.97." in gated and "relaxed" not in gated
    plain = render_report(manifest({"atol": 1e-4}))
    assert "judged at atol 0.0001, scaled by max(1, max|reference|)" in plain


def _fast_manifest() -> dict:
    """A bundle timed in microseconds: p50 4.1 us, 243,902 samples/s."""
    record = {"ep": "cpu", "batch": 1, "threads": None, "runs": 50,
              "latency_ms": {"p50": 0.0041, "p90": 0.00523, "p99": 0.0127},
              "throughput_per_s": 243902.43, "session_create_ms": 0.374, "peak_rss_mb": 118.2,
              "samples_ms": [0.0041, 0.0043, 0.0052, 0.0127]}  # fmt: skip
    return {
        "model": {"file": "m.onnx", "opset": 17, "ir_version": 8, "bytes": 123456, "sha256": "0"},
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 4]}],
        "outputs": [], "bench": record, "bench_records": [record],
    }  # fmt: skip


def test_latency_shows_three_significant_figures_everywhere():
    """.2f ms printed a 4 us model as 0.00 ms in the card, report and tables, and its
    throughput 243902.4 was cut to '24390…' in the CLI table's column."""
    from rich.console import Console

    from onnxpipe.card import render_card, sig3
    from onnxpipe.report import render_report
    from onnxpipe.tables import bench_table, summary_table

    assert [sig3(v) for v in (0.0041, 0.0123456, 9.996, 12.345, 123.4, 60419.3, 1e-7, 2.0)] == [
        "0.00410", "0.0123", "10.0", "12.3", "123", "60400", "0.000000100", "2.00",
    ]  # fmt: skip
    manifest = _fast_manifest()
    card, page = render_card(manifest), render_report(manifest)
    assert "| cpu | 1 | default | 0.00410 | 0.00523 | 0.0127 | 244000 | 0.374 | 118 |" in card
    assert "<td>0.00410</td><td>0.00523</td><td>0.0127</td><td>244000</td><td>0.374</td>" in page
    console = Console(width=100, record=True)
    console.print(bench_table(manifest["bench_records"]))
    console.print(summary_table(manifest, Path("b")))
    shown = console.export_text()
    assert "0.00410" in shown and "244000" in shown and "…" not in shown, shown
    assert "p50 0.00410 ms, p90 0.00523, p99 0.0127" in shown
    assert "0.00 ms" not in shown and "| 0.00 |" not in card


def test_the_latency_plot_ticks_step_by_1_2_or_5():
    """Ticks were fifths of 1.05x the slowest run labelled .1f (0.0, 2.7, 5.4, 8.1 ms), and
    every tick of a model timed in microseconds read 0.0."""
    import re

    from onnxpipe.report import latency_plot, nice_ticks

    assert nice_ticks(8.5) == [0, 2, 4, 6, 8, 10]
    assert nice_ticks(27.3) == [0, 10, 20, 30]
    assert nice_ticks(0.0133) == [0, 0.005, 0.01, 0.015]
    for record, labels in (
        (_fast_manifest()["bench"], ["0.000", "0.005", "0.010", "0.015"]),
        ({**_fast_manifest()["bench"], "samples_ms": [2.0, 7.7, 8.1]}, ["0", "2", "4", "6", "8",
                                                                          "10"]),
    ):  # fmt: skip
        svg = latency_plot([record])
        assert re.findall(r'text-anchor="middle">([0-9.]+)</text>', svg) == labels
