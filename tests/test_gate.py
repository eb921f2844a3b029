import numpy as np
import pytest

from onnxpipe.errors import GateFailed, InputError
from onnxpipe.gate import Gate, enforce, gate_metrics


@pytest.mark.parametrize(
    ("text", "gate"),
    [
        ("top1>=0.98", Gate("top1", ">=", 0.98)),
        ("cosine >= 0.995", Gate("cosine", ">=", 0.995)),
        ("max_abs<=1e-3", Gate("max_abs", "<=", 1e-3)),
        ("kl<=0.04", Gate("kl", "<=", 0.04)),
    ],
)
def test_parse(text, gate):
    assert Gate.parse(text) == gate


@pytest.mark.parametrize(
    "text", ["top1>0.9", "top1<=0.9", "acc>=0.9", "top1>=1.5", "cosine>=x", "max_abs>=1"]
)
def test_bad_gates(text):
    with pytest.raises(InputError, match="--gate"):
        Gate.parse(text)


def test_metrics_on_known_numbers():
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [1.0, 2.0, 0.0]])
    got = ref.copy()
    got[3] = [2.5, 2.0, 0.0]  # one argmax flips
    metrics = gate_metrics([[ref[:2]], [ref[2:]]], [[got[:2]], [got[2:]]])
    assert metrics["samples"] == 4
    assert metrics["top1"] == 0.75
    assert metrics["max_abs"] == pytest.approx(1.5)
    assert 0.9 < metrics["cosine"] < 1.0 and metrics["kl"] > 0
    enforce([Gate.parse("top1>=0.75"), Gate.parse("max_abs<=1.5")], metrics, "quantize")
    with pytest.raises(GateFailed, match="top1=0.75") as info:
        enforce([Gate.parse("top1>=0.9")], metrics, "quantize")
    assert info.value.metrics["top1"] == 0.75


def test_embeddings_have_no_top1_and_gate_on_it_fails():
    ref = np.random.default_rng(0).standard_normal((4, 8, 16))
    metrics = gate_metrics([[ref]], [[ref * 1.01]])
    assert metrics["top1"] is None and metrics["cosine"] == pytest.approx(1.0)
    with pytest.raises(GateFailed):
        enforce([Gate.parse("top1>=0.5")], metrics, "prune")


def test_eval_batches_of_different_sequence_lengths():
    rng = np.random.default_rng(1)
    ref = [[rng.standard_normal((2, 5, 8))], [rng.standard_normal((3, 9, 8))]]
    got = [[r[0] * 1.001] for r in ref]
    masks = [np.ones((2, 5)), np.ones((3, 9))]
    metrics = gate_metrics(ref, got, masks)
    assert metrics["samples"] == 5 and metrics["cosine"] == pytest.approx(1.0)
    assert metrics["top1"] is None
