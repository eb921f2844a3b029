"""Keras -> bundle through the CLI, and ``compare`` on Keras models and their PyTorch twins."""

import json

import numpy as np
import pytest
import torch

from tests.conftest import model_ref
from tests.helpers import graph_bundle

keras = pytest.importorskip("keras")
pytest.importorskip("tf2onnx")


def _trained_biases(model: "keras.Model") -> "keras.Model":
    """Non-zero biases, as after training (tf2onnx rightly drops an all-zero bias Add)."""
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if getattr(layer, "bias", None) is not None:
            layer.bias.assign(rng.standard_normal(layer.bias.shape).astype("float32") * 0.1)
    return model


def keras_mlp() -> "keras.Model":
    keras.utils.set_random_seed(0)
    inputs = keras.Input((64,), name="features")
    h = keras.layers.Dense(32, activation="relu")(inputs)
    outputs = keras.layers.Dense(10)(h)
    return _trained_biases(keras.Model(inputs, outputs))


def torch_twin_mlp(model: "keras.Model") -> torch.nn.Module:
    dense = [layer for layer in model.layers if isinstance(layer, keras.layers.Dense)]
    twin = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    with torch.no_grad():
        for linear, layer in zip([twin[0], twin[2]], dense, strict=True):
            kernel, bias = layer.get_weights()
            linear.weight.copy_(torch.from_numpy(kernel.T))
            linear.bias.copy_(torch.from_numpy(bias))
    return twin.eval()


def keras_cnn() -> "keras.Model":
    keras.utils.set_random_seed(1)
    inputs = keras.Input((16, 16, 3), name="image")
    h = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inputs)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return _trained_biases(keras.Model(inputs, keras.layers.Dense(5)(h)))


class TorchCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3)))


def torch_twin_cnn(model: "keras.Model") -> torch.nn.Module:
    conv, dense = model.layers[1], model.layers[3]
    twin = TorchCNN()
    with torch.no_grad():
        kernel, bias = conv.get_weights()
        twin.conv.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1)))
        twin.conv.bias.copy_(torch.from_numpy(bias))
        kernel, bias = dense.get_weights()
        twin.fc.weight.copy_(torch.from_numpy(kernel.T))
        twin.fc.bias.copy_(torch.from_numpy(bias))
    return twin.eval()


def _save_twins(tmp_path, kind):
    model = keras_mlp() if kind == "mlp" else keras_cnn()
    model.save(tmp_path / f"{kind}.keras")
    twin = torch_twin_mlp(model) if kind == "mlp" else torch_twin_cnn(model)
    spec = "x:float32[batch,64]" if kind == "mlp" else "x:float32[batch,3,16,16]"
    example = torch.randn(2, 64) if kind == "mlp" else torch.randn(2, 3, 16, 16)
    torch.jit.trace(twin, example).save(str(tmp_path / f"{kind}.pt"))
    return spec


def test_keras_file_becomes_a_bundle_with_keras_input_names(cli, tmp_path):
    _save_twins(tmp_path, "mlp")
    code, _, err = cli("convert", tmp_path / "mlp.keras", "-o", tmp_path / "k", "--no-bench")
    assert code == 0, err
    manifest = json.loads((tmp_path / "k" / "manifest.json").read_text())
    assert manifest["source"]["framework"] == "tf" and manifest["source"]["exporter"] == "tf2onnx"
    assert manifest["inputs"][0]["name"] == "features"
    assert manifest["inputs"][0]["shape"] == ["batch", 64]
    assert manifest["parity"]["passed"] and manifest["parity"]["max_abs_diff"] < 1e-4
    assert manifest["parity"]["reference"].startswith("tensorflow ")
    assert manifest["model"]["opset"] <= 18
    assert "tf2onnx" in manifest["versions"] and "torch" not in manifest["versions"]


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_compare_keras_and_pytorch_twins(kind, cli, tmp_path):
    spec = _save_twins(tmp_path, kind)
    for name, extra in ((f"{kind}.keras", []), (f"{kind}.pt", ["--input", spec])):
        code, _, err = cli(
            "convert",
            tmp_path / name,
            "-o",
            tmp_path / name.replace(".", "_"),
            "--no-bench",
            *extra,
        )
        assert code == 0, err
    page = tmp_path / "compare.html"
    code, out, err = cli(
        "compare", tmp_path / f"{kind}_keras", tmp_path / f"{kind}_pt", "--json", "--html", page
    )
    assert code == 0, err
    record = json.loads(out)
    assert set(record) >= {"a", "b", "outputs", "ops", "params", "latency_ms"}
    assert record["outputs"]["max_abs_diff"] <= 1e-4
    assert record["outputs"]["cosine"] > 0.99999 and record["outputs"]["top1_agreement"] == 1.0
    assert record["params"]["a"] == record["params"]["b"] > 0
    assert record["latency_ms"]["a"] > 0 and record["latency_ms"]["b"] > 0
    assert record["layout"] == ([None] if kind == "mlp" else ["nhwc->nchw"])
    assert "Conv" in record["ops"]["b"] if kind == "cnn" else "Gemm" in record["ops"]["b"]
    assert "<table>" in page.read_text() and f"{record['params']['a']:,}" in page.read_text()


def test_nchw_keras_needs_no_transpose_against_pytorch(cli, tmp_path):
    spec = _save_twins(tmp_path, "cnn")
    assert (
        cli("convert", tmp_path / "cnn.keras", "-o", tmp_path / "k", "--nchw", "--no-bench")[0] == 0
    )
    assert (
        cli("convert", tmp_path / "cnn.pt", "-o", tmp_path / "t", "--input", spec, "--no-bench")[0]
        == 0
    )
    code, out, _ = cli("compare", tmp_path / "k", tmp_path / "t", "--json", "--no-bench")
    record = json.loads(out)
    assert code == 0 and record["layout"] == [None]
    assert record["inputs"]["a"][0]["shape"] == ["batch", 3, 16, 16]
    assert record["outputs"]["max_abs_diff"] <= 1e-4


def test_compare_refuses_mismatched_models(cli, tmp_path):
    _save_twins(tmp_path, "mlp")
    spec = _save_twins(tmp_path, "cnn")
    cli("convert", tmp_path / "mlp.keras", "-o", tmp_path / "a", "--no-bench")
    cli("convert", tmp_path / "cnn.pt", "-o", tmp_path / "b", "--input", spec, "--no-bench")
    code, _, err = cli("compare", tmp_path / "a", tmp_path / "b")
    assert code == 2 and "rank" in err


def test_parameter_count_counts_quantized_weights_not_their_scales():
    # An int8 or int4 model has the parameters of its float original: the integer weights
    # count, the scales and zero points that dequantize them do not.
    import onnx
    import onnx_ir as ir
    from onnx import helper, numpy_helper

    from onnxpipe.compare import parameter_count

    def model(nodes, inits, domain_opset=()):
        graph = helper.make_graph(
            nodes,
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 64])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 8])],
            [numpy_helper.from_array(v, k) for k, v in inits.items()],
        )
        opsets = [helper.make_opsetid("", 21), *domain_opset]
        return ir.from_proto(helper.make_model(graph, opset_imports=opsets))

    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    bias = np.ones(8, np.float32)
    fp32 = model(
        [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
        {"w": w, "b": bias},
    )
    qdq = model(
        [
            helper.make_node("DequantizeLinear", ["wq", "s", "zp"], ["w"], axis=1),
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            # A quantized embedding table (dynamic mode): rows gathered, then dequantized.
            helper.make_node("Gather", ["tq", "ids"], ["rows"]),
            helper.make_node("DequantizeLinear", ["rows", "ts", "tzp"], ["b"]),
            helper.make_node("Add", ["h", "b"], ["y"]),
        ],
        {"wq": w.astype(np.int8), "s": np.ones(8, np.float32), "zp": np.zeros(8, np.int8),
         "tq": np.zeros((10, 8), np.uint8), "ids": np.array(3, np.int64),
         "ts": np.array(1.0, np.float32), "tzp": np.array(0, np.uint8)},
    )  # fmt: skip
    int4 = model(
        [
            helper.make_node("MatMulNBits", ["x", "B", "scales", "", "", "b"], ["y"],
                             domain="com.microsoft", K=64, N=8, bits=4, block_size=32),
        ],
        {"B": np.zeros((8, 2, 16), np.uint8), "scales": np.ones(16, np.float32), "b": bias},
        (helper.make_opsetid("com.microsoft", 1),),
    )  # fmt: skip
    assert parameter_count(fp32) == 64 * 8 + 8
    assert parameter_count(qdq) == 64 * 8 + 10 * 8
    assert parameter_count(int4) == 64 * 8 + 8


def test_compare_matches_inputs_by_name_in_any_order(cli, tmp_path):
    # A Keras model saved as .keras keeps its input order; its SavedModel export lists the
    # same inputs sorted by name. Same model, same names: compare pairs them by name.
    import onnx
    from onnx import helper, numpy_helper

    def bundle(name, order, extra_width=4):
        w = numpy_helper.from_array(np.full((8, 3), 0.5, np.float32), "w")
        specs = {
            "feat": helper.make_tensor_value_info("feat", onnx.TensorProto.FLOAT, ["n", 8]),
            "extra": helper.make_tensor_value_info("extra", onnx.TensorProto.FLOAT,
                                                   ["n", extra_width]),
        }  # fmt: skip
        graph = helper.make_graph(
            [
                helper.make_node("MatMul", ["feat", "w"], ["h"]),
                helper.make_node("ReduceSum", ["extra"], ["s"], keepdims=1),
                helper.make_node("Add", ["h", "s"], ["y"]),
            ],
            name,
            [specs[k] for k in order],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 3])],
            [w],
        )
        return graph_bundle(cli, tmp_path, name, graph)

    a = bundle("a", ["feat", "extra"])
    b = bundle("b", ["extra", "feat"])
    code, out, err = cli("compare", a, b, "--json", "--no-bench")
    assert code == 0, err
    assert json.loads(out)["outputs"]["max_abs_diff"] < 1e-5
    # Same names, shapes that cannot match: bad input (exit 2), not an internal error.
    c = bundle("c", ["feat", "extra"], extra_width=5)
    code, _, err = cli("compare", a, c, "--no-bench")
    assert code == 2 and "extra" in err


def test_compare_measures_real_tokens_as_the_gates_do(cli, tmp_path):
    """With an attention_mask, padded positions count in neither cosine nor max abs diff."""
    import onnx
    from onnx import helper, numpy_helper

    from onnxpipe.gate import gate_metrics

    def bundle(name, scale):
        w = numpy_helper.from_array(np.full((4, 3), scale, np.float32), "w")
        ids = helper.make_tensor_value_info("input_ids", onnx.TensorProto.INT64, ["b", "s"])
        mask = helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["b", "s"])
        table = numpy_helper.from_array(np.arange(40, dtype=np.float32).reshape(10, 4), "t")
        graph = helper.make_graph(
            [
                helper.make_node("Gather", ["t", "input_ids"], ["e"]),
                helper.make_node("MatMul", ["e", "w"], ["h"]),
                helper.make_node("Cast", ["attention_mask"], ["m"], to=1),
                helper.make_node("Unsqueeze", ["m", "ax"], ["m3"]),
                # the padded positions of "b" are shifted by 100: garbage where nothing reads
                helper.make_node("Sub", ["one", "m3"], ["pad"]),
                helper.make_node("Mul", ["pad", "shift"], ["off"]),
                helper.make_node("Add", ["h", "off"], ["y"]),
            ],
            name,
            [ids, mask],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", "s", 3])],
            [w, table, numpy_helper.from_array(np.array([2], np.int64), "ax"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(100.0 if name == "b" else 0.0, np.float32),
                                     "shift")],
        )  # fmt: skip
        return graph_bundle(cli, tmp_path, name, graph)

    a, b = bundle("a", 0.5), bundle("b", 0.501)
    ids = np.array([[1, 2, 3, 4], [5, 6, 0, 0]], np.int64)
    mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0]], np.int64)
    np.savez(tmp_path / "d.npz", input_ids=ids, attention_mask=mask)
    code, out, err = cli("compare", a, b, "--data", tmp_path / "d.npz", "--json", "--no-bench")
    assert code == 0, err
    got = json.loads(out)["outputs"]
    e = np.arange(40, dtype=np.float32).reshape(10, 4)[ids]
    ref, cand = e @ np.full((4, 3), 0.5), e @ np.full((4, 3), 0.501)
    want = gate_metrics([[ref]], [[cand]], [mask])
    assert got["max_abs_diff"] == pytest.approx(want["max_abs"], rel=1e-4)
    assert got["cosine"] == pytest.approx(want["cosine"], abs=1e-6)
    assert got["max_abs_diff"] < 1.0 and got["cosine"] > 0.9999  # padding would be 100 off


def test_prune_and_compare_count_the_same_parameters(cli, tmp_path):
    # prune counted every initializer (int64 shape constants too), compare the weights only:
    # the same BERT bundle was 457,491 parameters in one and 456,451 in the other
    bundle, pruned = tmp_path / "bert", tmp_path / "pruned"
    code, _, err = cli("convert", model_ref("tiny_bert"), "-o", bundle, "--no-bench",
                       "--input", "input_ids:int64[batch,seq]",
                       "--input", "attention_mask:int64[batch,seq]")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("prune", bundle, "-o", pruned, "--method", "channels", "--ratio", "0.5")
    assert code == 0, err
    step = json.loads((pruned / "manifest.json").read_text())["steps"][-1]["metrics"]
    code, out, err = cli("compare", bundle, pruned, "--json", "--no-bench")
    assert code == 0, err
    params = json.loads(out)["params"]
    assert (params["a"], params["b"]) == (step["params_before"], step["params_after"])
    assert params["b"] < params["a"]


def test_nhwc_output_with_as_many_channels_as_its_width_is_moved_back(cli, tmp_path):
    """[N, 8, 8, 8] has the same shape in both layouts: the inputs' layout decides."""
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(
        np.random.default_rng(0).standard_normal((8, 3, 3, 3)).astype(np.float32), "w"
    )

    def save(name, nhwc):
        shape = ["n", 8, 8, 3] if nhwc else ["n", 3, 8, 8]
        nodes = [helper.make_node("Conv", ["xc" if nhwc else "x", "w"], ["yc" if nhwc else "y"],
                                  pads=[1, 1, 1, 1])]  # fmt: skip
        if nhwc:
            nodes = [helper.make_node("Transpose", ["x"], ["xc"], perm=[0, 3, 1, 2]), *nodes,
                     helper.make_node("Transpose", ["yc"], ["y"], perm=[0, 2, 3, 1])]  # fmt: skip
        graph = helper.make_graph(
            nodes, name, [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, shape)],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8, 8, 8])], [w],
        )  # fmt: skip
        graph_bundle(cli, tmp_path, name, graph)

    save("nchw", False)
    save("nhwc", True)
    code, out, err = cli("compare", tmp_path / "nchw", tmp_path / "nhwc", "--json", "--no-bench")
    assert code == 0, err
    record = json.loads(out)
    assert record["layout"] == ["nchw->nhwc"]
    assert record["outputs"]["max_abs_diff"] < 1e-4 and record["outputs"]["cosine"] > 0.9999


def test_layout_with_symbolic_spatial_dims_is_found():
    """Symbols fit any size: [batch, h, w, 3] against [batch, 3, h, w] was taken as is."""
    from onnxpipe.compare import NHWC_TO_NCHW, layout_map
    from onnxpipe.converters.base import InputSpec

    nhwc = InputSpec("img", "float32", ("batch", "img_dim1", "img_dim2", 3))
    nchw = InputSpec("img", "float32", ("batch", 3, "img_dim1", "img_dim2"))
    assert layout_map(nhwc, nchw) == NHWC_TO_NCHW
    assert layout_map(nchw, nchw) is None
    other_names = InputSpec("img", "float32", ("n", 3, "h", "w"))
    assert layout_map(nhwc, other_names) == NHWC_TO_NCHW  # the channel count decides
    square = InputSpec("x", "float32", ("batch", 8, 8, 8))
    assert layout_map(square, square) is None


def test_latency_is_timed_at_the_shapes_compared(cli, tmp_path):
    """A dynamic model was timed at 8x8 beside a fixed one at 32x32 (75x 'faster')."""
    for name, spec in (("dyn", "x:float32[batch,3,h,w]"), ("fixed", "x:float32[batch,3,32,32]")):
        code, _, err = cli("convert", model_ref("gated"), "-o", tmp_path / name, "--input", spec,
                           "--no-bench")  # fmt: skip
        assert code == 0, err
    code, stdout, err = cli("compare", tmp_path / "dyn", tmp_path / "fixed", "--json")
    assert code == 0, err
    record = json.loads(stdout)
    assert record["latency_shapes"] == {"a": {"x": [1, 3, 32, 32]}, "b": {"x": [1, 3, 32, 32]}}
    assert record["outputs"]["max_abs_diff"] == 0.0
    # a model fixed at batch 4: both timed at 4 (a free batch at 1 beside it read 4x faster)
    spec = "x:float32[4,3,32,32]"
    code, _, err = cli("convert", model_ref("gated"), "-o", tmp_path / "b4", "--input", spec,
                       "--no-bench")  # fmt: skip
    assert code == 0, err
    code, stdout, err = cli("compare", tmp_path / "dyn", tmp_path / "b4", "--json")
    assert code == 0, err
    record = json.loads(stdout)
    assert record["latency_batch"] == 4
    assert record["latency_shapes"] == {"a": {"x": [4, 3, 32, 32]}, "b": {"x": [4, 3, 32, 32]}}


def test_latency_batch_is_the_batch_inputs_not_another_fixed_input(cli, tmp_path):
    """s[2, 4] beside x[N, 4]: compare timed x at batch 2 (s's axis 0), where bench says 1."""
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", ["x", "b"], ["y"]), helper.make_node("Neg", ["s"], ["t"])]
    shapes = {"s": [2, 4], "x": ["N", 4], "y": ["N", 4], "t": [2, 4]}
    tensors = {k: helper.make_tensor_value_info(k, TensorProto.FLOAT, v) for k, v in shapes.items()}
    bias = helper.make_tensor("b", TensorProto.FLOAT, [4], [0.5] * 4)
    graph = helper.make_graph(nodes, "g", [tensors["s"], tensors["x"]], [tensors["y"],
                              tensors["t"]], [bias])  # fmt: skip
    a = graph_bundle(cli, tmp_path, "a", graph)
    code, stdout, err = cli("compare", a, a, "--json")
    assert code == 0, err
    record = json.loads(stdout)
    assert record["latency_batch"] == 1
    assert record["latency_shapes"]["a"] == {"s": [2, 4], "x": [1, 4]}
    assert record["latency_shapes"]["b"] == record["latency_shapes"]["a"]


def test_inputs_of_another_rank_and_a_bundle_as_html_say_what_to_do(cli, tmp_path, mlp_bundle):
    """'input x has rank 4, x 2.' named neither bundle; --html BUNDLE suggested a page inside
    the bundle, which is refused."""
    image = tmp_path / "image"
    code, _, err = cli("convert", model_ref("gated"), "-o", image, "--input",
                       "x:float32[batch,3,16,16]", "--no-bench")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("compare", image, mlp_bundle, "--no-bench")
    assert code == 2 and str(image) in err and str(mlp_bundle) in err and "ranks differ" in err
    code, _, err = cli("compare", image, image, "--html", image)
    assert code == 2 and "e.g. compare.html" in err, err


def test_generated_ids_fit_the_smaller_table_of_the_two(cli, tmp_path):
    """A with a 50-row table against B with its first 30 rows: ids came from A's table alone,
    B could not look them up and compare was exit 2 asking for --data."""
    import onnx
    from onnx import helper, numpy_helper

    table = np.random.default_rng(0).standard_normal((50, 4)).astype(np.float32)

    def bundle(name, rows):
        graph = helper.make_graph(
            [helper.make_node("Gather", ["w", "ids"], ["y"])],
            name,
            [helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["n", "seq"])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", "seq", 4])],
            [numpy_helper.from_array(table[:rows], "w")],
        )
        return graph_bundle(cli, tmp_path, name, graph)

    a, b = bundle("a", 50), bundle("b", 30)
    for first, second in ((a, b), (b, a)):
        code, out, err = cli("compare", first, second, "--json", "--no-bench")
        assert code == 0, err
        assert json.loads(out)["outputs"]["max_abs_diff"] == 0.0


def test_outputs_that_cannot_be_paired_are_named_once(cli, tmp_path):
    """A's [n, 1] output paired by position with B's [n, 3]: the record listed 'shape [3, 1]
    vs [3, 3]' once per feed, naming no output."""
    import onnx
    from onnx import helper, numpy_helper

    def bundle(name, widths):
        outputs = [f"{name}{i}" for i in range(len(widths))]
        graph = helper.make_graph(
            [helper.make_node("MatMul", ["x", f"w{i}"], [o]) for i, o in enumerate(outputs)],
            name,
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])],
            [helper.make_tensor_value_info(o, onnx.TensorProto.FLOAT, ["n", w])
             for o, w in zip(outputs, widths, strict=True)],
            [numpy_helper.from_array(np.ones((4, w), np.float32), f"w{i}")
             for i, w in enumerate(widths)],
        )  # fmt: skip
        return graph_bundle(cli, tmp_path, name, graph)

    page = tmp_path / "compare.html"
    code, out, err = cli("compare", bundle("a", [1, 3]), bundle("b", [3, 3]), "--json",
                         "--no-bench", "--html", page)  # fmt: skip
    assert code == 0, err
    record = json.loads(out)["outputs"]
    assert record["errors"] == ["output a0: shape [3, 1] vs [3, 3]"]
    assert record["max_abs_diff"] == 0.0  # a1 against b1
    # names differ, so outputs met by position: the record and the table say which with which
    assert json.loads(out)["paired_by_position"] == {"a0": "b0", "a1": "b1"}
    code, table, err = cli("compare", tmp_path / "a", tmp_path / "b", "--no-bench")
    assert code == 0 and "a0 ~ b0, a1 ~ b1" in table, err
    # the page showed the numbers alone, as if every output agreed
    assert "not compared: output a0: shape [3, 1] vs [3, 3]" in page.read_text()
    assert "paired by position: a0 ~ b0, a1 ~ b1" in page.read_text()


def test_a_nchw_bundle_keeps_its_keras_outputs_layout(cli, tmp_path):
    """--nchw transposes the inputs only: against the Keras model as converted (NHWC), its
    [N, 8, 8, 8] output was moved all the same (cosine 0.06 for one model); against an NCHW
    twin it was not moved at all."""
    import onnx
    from onnx import helper, numpy_helper

    keras.utils.set_random_seed(2)
    inputs = keras.Input((8, 8, 3), name="image")
    conv = keras.layers.Conv2D(8, 3, padding="same", use_bias=False)
    keras.Model(inputs, conv(inputs)).save(tmp_path / "map.keras")
    weight = np.transpose(conv.get_weights()[0], (3, 2, 0, 1))  # HWIO -> OIHW
    graph = helper.make_graph(
        [helper.make_node("Conv", ["image", "w"], ["y"], pads=[1, 1, 1, 1])], "twin",
        [helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 8, 8, 8])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")],
    )  # fmt: skip
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              tmp_path / "twin.onnx")  # fmt: skip
    for name, source, flags in (("nhwc", "map.keras", []), ("nchw", "map.keras", ["--nchw"]),
                                ("twin", "twin.onnx", [])):  # fmt: skip
        out = tmp_path / name
        code, _, err = cli("convert", tmp_path / source, "-o", out, "--no-bench", *flags)
        assert code == 0, err
    for a, b in (("nhwc", "nchw"), ("nchw", "nhwc"), ("nchw", "twin"), ("twin", "nchw")):
        code, out, err = cli("compare", tmp_path / a, tmp_path / b, "--json", "--no-bench")
        assert code == 0, err
        outputs = json.loads(out)["outputs"]
        assert outputs["max_abs_diff"] < 1e-4 and outputs["cosine"] > 0.9999, (a, b, outputs)
