import json
from pathlib import Path

import numpy as np
import pytest

from onnxpipe.errors import GateFailed, InputError
from onnxpipe.gate import Gate, check_applicable, enforce, gate_metrics


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
    "text",
    [
        "top1>0.9",
        "top1<=0.9",
        "acc>=0.9",
        "top1>=1.5",
        "top1>=-0.5",
        "cosine>=-2",
        "cosine>=x",
        "max_abs>=1",
    ],
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


def test_an_all_zero_output_fails_a_cosine_gate_unless_the_reference_is_zero_too():
    # an fp16 model whose tiny logits underflowed to 0 scored cosine 1.0 and passed
    ref = np.full((2, 4), 5e-8)
    zero = np.zeros((2, 4))
    metrics = gate_metrics([[ref]], [[zero]])
    assert metrics["cosine"] == 0.0
    with pytest.raises(GateFailed, match="cosine"):
        enforce([Gate.parse("cosine>=0.999")], metrics, "quantize")
    assert gate_metrics([[zero]], [[zero]])["cosine"] == 1.0


def test_embeddings_have_no_top1_and_a_top1_gate_is_bad_input():
    ref = np.random.default_rng(0).standard_normal((4, 8, 16))
    metrics = gate_metrics([[ref]], [[ref * 1.01]])
    assert metrics["top1"] is None and metrics["cosine"] == pytest.approx(1.0)
    with pytest.raises(GateFailed):
        enforce([Gate.parse("top1>=0.5")], metrics, "prune")
    with pytest.raises(InputError, match="4x8x16.*cosine"):
        check_applicable([Gate.parse("top1>=0.5")], [[ref]])
    check_applicable([Gate.parse("cosine>=0.5")], [[ref]])


def test_classifier_scores_shaped_n_c_1_1_have_top1():
    ref = np.random.default_rng(0).standard_normal((4, 10, 1, 1))
    got = ref.copy()
    got[0, :, 0, 0] = got[0, ::-1, 0, 0]  # one sample's scores reversed: its argmax moves
    metrics = gate_metrics([[ref]], [[got]])
    assert metrics["top1"] == 0.75 and metrics["kl"] > 0
    check_applicable([Gate.parse("top1>=0.5")], [[ref]])
    # parity (convert's table and the manifest) reads such scores as the gate does
    from onnxpipe.parity import compare_outputs

    (row,) = compare_outputs([ref.astype(np.float32)], [got.astype(np.float32)], ["y"], 1e-4)
    assert row["top1_agreement"] == 0.75
    (row,) = compare_outputs([ref[:, :, :1, :1].repeat(2, 2)], [ref.repeat(2, 2)], ["y"], 1e-4)
    assert "top1_agreement" not in row  # [N, C, 2, 1] is a map, not class scores


def test_cli_top1_gate_on_an_embedding_model_exits_2_before_searching(cli, tmp_path):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3, 4])], [w],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "m.onnx")  # fmt: skip
    assert cli("convert", tmp_path / "m.onnx", "-o", tmp_path / "b", "--no-bench")[0] == 0
    code, _, err = cli("quantize", tmp_path / "b", "-o", tmp_path / "q", "--mode", "dynamic",
                       "--gate", "top1>=0.9")  # fmt: skip
    assert code == 2 and "top1 needs class scores" in err and "cosine" in err, err
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.failed.json").exists()


def test_eval_batches_of_different_sequence_lengths():
    rng = np.random.default_rng(1)
    ref = [[rng.standard_normal((2, 5, 8))], [rng.standard_normal((3, 9, 8))]]
    got = [[r[0] * 1.001] for r in ref]
    masks = [np.ones((2, 5)), np.ones((3, 9))]
    metrics = gate_metrics(ref, got, masks)
    assert metrics["samples"] == 5 and metrics["cosine"] == pytest.approx(1.0)
    assert metrics["top1"] is None


def test_padded_tokens_count_in_neither_cosine_nor_max_abs():
    """A quantized encoder's outputs at padding mean nothing: only real tokens are measured."""
    rng = np.random.default_rng(2)
    ref = rng.standard_normal((2, 6, 8))
    got = ref + 0.01
    got[0, 4:] = -ref[0, 4:] + 5.0  # the padded tail of sentence 0 is far off
    mask = np.ones((2, 6))
    mask[0, 4:] = 0
    metrics = gate_metrics([[ref]], [[got]], [mask])
    assert metrics["max_abs"] == pytest.approx(0.01) and metrics["cosine"] > 0.999
    unmasked = gate_metrics([[ref]], [[got]])
    assert unmasked["max_abs"] > 5.0 and unmasked["cosine"] < 0.9


def test_one_value_per_sample_is_compared_over_the_samples_and_refused_as_a_cosine_gate():
    """A regressor's [N, 1]: per sample, cosine is only the sign of the product (always 1)."""
    from onnxpipe.errors import InputError

    rng = np.random.default_rng(3)
    ref = rng.uniform(0.5, 2.0, (8, 1))
    flat = np.full((8, 1), 0.74)  # a pruned model that outputs one constant
    metrics = gate_metrics([[ref]], [[flat]])
    want = float((ref * flat).sum() / (np.linalg.norm(ref) * np.linalg.norm(flat)))
    assert metrics["cosine"] == pytest.approx(want) and metrics["cosine"] < 0.99
    assert gate_metrics([[ref]], [[ref]])["cosine"] == pytest.approx(1.0)
    with pytest.raises(InputError, match="one value per sample"):
        check_applicable([Gate.parse("cosine>=0.99")], [[ref]])
    check_applicable([Gate.parse("max_abs<=0.1")], [[ref]])  # the gate that measures it
    # top1/kl pointed to cosine, the gate refused just above
    for text in ("top1>=0.99", "kl<=0.01"):
        with pytest.raises(InputError, match="needs class scores") as refused:
            check_applicable([Gate.parse(text)], [[ref]])
        assert "Gate on max_abs instead" in str(refused.value) and "cosine" not in str(
            refused.value
        )


def test_cosine_holds_on_every_output():
    """A detector's box head counts as much as its class scores: the worst output decides."""
    rng = np.random.default_rng(0)
    scores, boxes = rng.standard_normal((6, 10)), rng.standard_normal((6, 4))
    damaged = boxes.copy()
    damaged[:, 0] = -damaged[:, 0]  # one coordinate flipped: the box head is off
    metrics = gate_metrics([[scores, boxes]], [[scores, damaged]])
    per_sample = (boxes * damaged).sum(1) / (np.linalg.norm(boxes, axis=1) ** 2)
    assert metrics["cosine"] == pytest.approx(per_sample.mean())
    assert metrics["cosine_min"] == pytest.approx(per_sample.min())
    assert metrics["top1"] == 1.0  # the class scores are untouched
    with pytest.raises(GateFailed, match="cosine"):
        enforce([Gate.parse("cosine>=0.99")], metrics, "prune")


def test_a_failed_gate_shows_enough_digits_to_see_the_miss():
    with pytest.raises(GateFailed, match=r"cosine=0\.99998 \(needs cosine>=0\.9999999\)"):
        enforce([Gate.parse("cosine>=0.9999999")], {"cosine": 0.99997868, "samples": 4}, "q")


def test_kl_of_probabilities_is_taken_on_them_not_on_their_softmax():
    """The softmax of probabilities is near uniform: a broken int8 classifier ending in Softmax
    scored kl 0.084 (true 2.87) and passed kl<=0.1."""
    p = np.array([[0.9, 0.05, 0.05], [0.1, 0.8, 0.1]])
    q = np.array([[0.1, 0.45, 0.45], [0.1, 0.8, 0.1]])
    true_kl = float((p * np.log(p / q)).sum(1).mean())
    metrics = gate_metrics([[p]], [[q]])
    assert metrics["kl"] == pytest.approx(true_kl) and true_kl > 0.8
    zeroed = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # int8 zeroed the small classes
    assert gate_metrics([[p]], [[zeroed]])["kl"] > 3
    sig = np.array([[0.9, 0.8, 0.1], [0.2, 0.7, 0.6]])  # multi-label Sigmoid scores
    broken = np.array([[0.1, 0.2, 0.9], [0.2, 0.7, 0.6]])
    bernoulli = float(
        (sig * np.log(sig / broken) + (1 - sig) * np.log((1 - sig) / (1 - broken))).sum(1).mean()
    )
    assert gate_metrics([[sig]], [[broken]])["kl"] == pytest.approx(bernoulli) and bernoulli > 2
    logits = np.log(p)  # logits keep the softmax: the same number
    assert gate_metrics([[logits]], [[np.log(q)]])["kl"] == pytest.approx(true_kl)


def test_infinities_in_the_same_place_are_equal():
    """Masked logits (-inf) in both models: cosine and max_abs read the finite values."""
    ref = np.array([[1.0, -np.inf, 2.0], [0.5, 1.0, -np.inf]])
    got = ref + np.array([[1e-4, 0.0, 0.0], [0.0, -1e-4, 0.0]])
    metrics = gate_metrics([[ref]], [[got]])
    assert metrics["max_abs"] == pytest.approx(1e-4) and metrics["cosine"] > 0.999999
    assert metrics["top1"] == 1.0 and np.isfinite(metrics["kl"])
    moved = got.copy()
    moved[0, 1] = 0.0  # an infinity on one side only fails
    one_sided = gate_metrics([[ref]], [[moved]])
    assert one_sided["max_abs"] == np.inf and one_sided["cosine_min"] == 0.0
    # a +inf both hold: the softmax took inf - inf (kl inf, every kl gate failed)
    plus = np.array([[1.0, np.inf, 2.0], [0.5, 1.0, 3.0]])
    shared = gate_metrics([[plus]], [[plus + np.array([[1e-4, 0, 0], [0, 0, 1e-4]])]])
    assert shared["top1"] == 1.0 and shared["kl"] < 1e-6


def test_nan_outputs_fail_every_metric():
    """An fp16 model whose every output was NaN scored max_abs 0 and top-1 1 (argmax of a
    NaN row is class 0, as was the reference's) and passed both gates."""
    ref = np.array([[3.0, 1.0, 0.5], [2.0, 0.1, 0.3]])
    got = np.full_like(ref, np.nan)
    metrics = gate_metrics([[ref]], [[got]])
    assert metrics["max_abs"] == np.inf and metrics["cosine"] == 0.0
    assert metrics["top1"] == 0.0 and metrics["kl"] == np.inf
    one = ref.copy()
    one[1, 2] = np.nan  # one NaN: that sample disagrees, the other still agrees
    partly = gate_metrics([[ref]], [[one]])
    assert partly["top1"] == 0.5 and partly["max_abs"] == np.inf
    both = gate_metrics([[got]], [[got]])  # NaN in both, in the same places: equal
    assert both["max_abs"] == 0.0


def test_a_result_with_nan_outputs_is_no_result(cli, tmp_path):
    """Gated or not, outputs that overflow float16 fail the step (exit 1): the zoo's
    SqueezeNet with its Convs kept float32 passes activations of 9e9 through float16
    Casts, and every output was NaN (written with exit 0, max_abs 0 under its gate)."""
    import onnx  # noqa: PLC0415

    zoo = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"
    bundle = tmp_path / "sq"
    code, _, err = cli("convert", zoo / "light_squeezenet.onnx", "-o", bundle, "--no-bench")
    assert code == 0, err
    for gate in ((), ("--gate", "max_abs<=1e-3")):
        code, _, err = cli("quantize", bundle, "-o", tmp_path / "h", "--mode", "fp16",
                           "--exclude", "Conv", *gate)  # fmt: skip
        assert code == 1 and not (tmp_path / "h").exists(), err
        assert "NaN or infinity" in err, err


@pytest.mark.parametrize("text", ["max_abs<=-1", "kl<=-0.5"])
def test_a_negative_bound_that_can_never_hold_is_refused(text):
    with pytest.raises(InputError, match="never negative"):
        Gate.parse(text)


def test_a_derived_bundle_flags_a_reference_that_never_varies(cli, tmp_path):
    """A random-init Keras MobileNetV2 outputs 0.1 per class for every image: its gated
    quantize read 'top1 1, cosine 1, passed' with nothing to say the gate proved nothing."""
    import onnx  # noqa: PLC0415
    from onnx import helper, numpy_helper  # noqa: PLC0415

    weight = numpy_helper.from_array(np.zeros((8, 4), np.float32), "w")  # a dead layer
    bias = numpy_helper.from_array(np.arange(4, dtype=np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["m"]), helper.make_node("Add", ["m", "b"], ["y"])],
        "dead",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])],
        [weight, bias],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "dead.onnx")  # fmt: skip
    assert cli("convert", tmp_path / "dead.onnx", "-o", tmp_path / "b", "--no-bench")[0] == 0
    code, out, err = cli("quantize", tmp_path / "b", "-o", tmp_path / "q", "--mode", "fp16",
                         "--gate", "top1>=0.99", "--json")  # fmt: skip
    assert code == 0, err
    manifest = json.loads(out)
    assert manifest["parity"]["constant_reference"] is True
    assert manifest["steps"][-1]["metrics"]["gate"]["constant_reference"] is True
    rng = np.random.default_rng(0)
    varied = [[rng.standard_normal((4, 3))], [rng.standard_normal((4, 3))]]
    assert "constant_reference" not in gate_metrics(varied, varied)
