"""TensorFlow / Keras -> ONNX converter: every SOURCE route, bad inputs, keras.applications."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")

from onnxpipe.converters.base import ConversionResult, ConvertConfig  # noqa: E402
from onnxpipe.converters.tensorflow import MAX_OPSET, convert  # noqa: E402
from onnxpipe.errors import ConversionError, InputError  # noqa: E402
from tests.helpers import ort_run  # noqa: E402

RNG = np.random.default_rng(0)
BATCHES = (1, 3, 5)  # every export traces batch as None; these sizes were never seen


def feeds_for(result: ConversionResult, batch: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in result.inputs:
        dims = [batch if d == "batch" else (d if isinstance(d, int) else 7) for d in spec.shape]
        feeds[spec.name] = (RNG.standard_normal(dims) * scale).astype(spec.dtype)
    return feeds


def parity(result: ConversionResult, batches=BATCHES, scale: float = 1.0) -> tuple[float, float]:
    """(worst max-abs diff ORT vs TensorFlow, largest |output|) over ``batches``."""
    worst = magnitude = 0.0
    for batch in batches:
        feeds = feeds_for(result, batch, scale)
        want = result.reference(feeds)
        got = ort_run(result.model, feeds)
        assert len(want) == len(got)
        for w, g in zip(want, got, strict=True):
            assert w.shape == g.shape and w.shape[0] == batch
            worst = max(worst, float(np.max(np.abs(w.astype(np.float64) - g))))
            magnitude = max(magnitude, float(np.max(np.abs(w))))
    assert magnitude > 0.0  # an all-zero output would make any parity claim empty
    return worst, magnitude


def max_parity(result: ConversionResult, batches=BATCHES, scale: float = 1.0) -> float:
    """Worst max-abs difference ORT vs TensorFlow over ``batches``, shapes checked."""
    return parity(result, batches, scale)[0]


def assert_scaled_parity(result: ConversionResult, scale: float = 1.0) -> tuple[float, float]:
    """Parity <= 1e-4 absolute, and <= 1e-4 of the output magnitude.

    Random-weight networks give logits anywhere from 1e-11 (MobileNetV2) to ~10 (ConvNeXt);
    an absolute bound alone is empty for the first, so the bound is scaled with the largest
    |output|: ``diff <= 1e-4 * max|ref|`` (float32 round-off through ~100 layers measures
    about 1e-6 of it here), and never above 1e-4 * max(1, max|ref|).
    """
    diff, magnitude = parity(result, scale=scale)
    assert diff <= 1e-4 * max(1.0, magnitude), (diff, magnitude)
    assert diff <= 1e-4 * magnitude, (diff, magnitude)
    return diff, magnitude


def two_input_model():
    a = keras.Input((8,), name="features")
    b = keras.Input((4,), name="extra")
    x = keras.layers.Concatenate()([keras.layers.Dense(16, activation="relu")(a), b])
    y = keras.layers.Dense(3, name="score")(x)
    aux = keras.layers.Dense(2, activation="softmax", name="aux")(x)
    return keras.Model([a, b], [y, aux])


def image_model(size: int = 16):
    inp = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu")(inp)
    x = keras.layers.BatchNormalization()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inp, keras.layers.Dense(5, name="logits")(x))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --- routes -------------------------------------------------------------------------------


def test_two_input_keras_file_keeps_names_and_parity(tmp_path):
    path = tmp_path / "two.keras"
    two_input_model().save(path)
    before = sha(path)
    result = convert(str(path), ConvertConfig())
    assert [s.name for s in result.inputs] == ["features", "extra"]
    specs = [str(s) for s in result.inputs]
    assert specs == ["features:float32[batch,8]", "extra:float32[batch,4]"]
    assert [v.name for v in result.model.graph.inputs] == ["features", "extra"]
    assert [v.name for v in result.model.graph.outputs] == ["score", "aux"]
    assert str(result.model.graph.outputs[0].shape[0]) == "batch"
    assert (result.framework, result.exporter) == ("tf", "tf2onnx")
    assert result.reference_name == f"tensorflow {tf.__version__}"
    assert result.model.opset_imports[""] == MAX_OPSET
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    assert max_parity(result) <= 1e-5
    assert sha(path) == before  # the user's file is only read


def test_int_tokens_lstm_with_dynamic_sequence():
    tokens = keras.Input((None,), dtype="int32", name="tokens")
    x = keras.layers.Embedding(50, 8)(tokens)
    model = keras.Model(tokens, keras.layers.Dense(2)(keras.layers.LSTM(6)(x)))
    result = convert(model, ConvertConfig())
    assert [str(s) for s in result.inputs] == ["tokens:int32[batch,tokens_dim1]"]
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
    for batch, length in ((1, 3), (4, 17)):
        feeds = {"tokens": RNG.integers(0, 50, (batch, length)).astype("int32")}
        want = result.reference(feeds)[0]
        assert want.shape == (batch, 2)
        assert np.max(np.abs(ort_run(result.model, feeds)[0] - want)) <= 1e-5


def test_legacy_h5(tmp_path):
    path = tmp_path / "two.h5"
    two_input_model().save(path)
    result = convert(str(path), ConvertConfig(opset=13))
    assert [s.name for s in result.inputs] == ["features", "extra"]
    assert result.model.opset_imports[""] == 13
    assert max_parity(result) <= 1e-5


def test_saved_model_from_keras_applications_export(tmp_path):
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(64, 64, 3), alpha=0.35, classifier_activation=None
    )
    model.export(str(tmp_path / "sm"), verbose=False)
    result = convert(str(tmp_path / "sm"), ConvertConfig())
    assert len(result.inputs) == 1 and result.inputs[0].shape == ("batch", 64, 64, 3)
    assert [s.name for s in result.inputs] == ["input"]  # Keras's keras_tensor_N, cleaned
    assert [v.name for v in result.model.graph.outputs] == ["output_0"]
    assert_scaled_parity(result)


def test_saved_model_two_inputs_keeps_signature_names(tmp_path):
    two_input_model().export(str(tmp_path / "sm"), verbose=False)
    result = convert(str(tmp_path / "sm"), ConvertConfig())
    assert sorted(s.name for s in result.inputs) == ["extra", "features"]
    assert max_parity(result) <= 1e-5


def test_callable_from_python_file(tmp_path):
    (tmp_path / "make_model.py").write_text(
        "import keras\n"
        "def make():\n"
        "    inp = keras.Input((6,), name='x')\n"
        "    return keras.Model(inp, keras.layers.Dense(2, activation='tanh')(inp))\n"
    )
    result = convert(f"{tmp_path / 'make_model.py'}:make", ConvertConfig())
    assert [str(s) for s in result.inputs] == ["x:float32[batch,6]"]
    assert max_parity(result) <= 1e-6


def test_in_memory_sequential_gets_clean_names():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    result = convert(model, ConvertConfig())
    assert [s.name for s in result.inputs] == ["input"]  # not keras_tensor_N
    assert [v.name for v in result.model.graph.outputs] == ["output"]
    assert max_parity(result) <= 1e-6


def test_tf_function_with_signature():
    weights = tf.constant(RNG.standard_normal((5, 2)).astype("float32"))

    @tf.function(input_signature=[tf.TensorSpec((None, 5), tf.float32, name="tokens")])
    def fn(tokens):
        return {"y": tf.nn.relu(tokens @ weights), "norm": tf.reduce_sum(tokens * tokens, -1)}

    result = convert(fn, ConvertConfig())
    assert [s.name for s in result.inputs] == ["tokens"]
    assert [v.name for v in result.model.graph.outputs] == ["norm", "y"]  # dict keys, sorted
    assert max_parity(result) <= 1e-5


def test_unknown_spatial_dims_get_symbols_and_input_override(tmp_path):
    inp = keras.Input((None, None, 3), name="img")
    x = keras.layers.Conv2D(4, 3, padding="same")(inp)
    model = keras.Model(inp, keras.layers.GlobalMaxPooling2D()(x))
    result = convert(model, ConvertConfig())
    assert [str(s) for s in result.inputs] == ["img:float32[batch,img_dim1,img_dim2,3]"]
    shape = result.model.graph.inputs[0].shape
    assert [str(d) for d in shape] == ["batch", "img_dim1", "img_dim2", "3"]
    assert max_parity(result) <= 1e-5

    fixed = convert(model, ConvertConfig(inputs=("pixels:float32[batch,12,20,3]",)))
    assert [str(s) for s in fixed.inputs] == ["pixels:float32[batch,12,20,3]"]
    assert fixed.model.graph.inputs[0].name == "pixels"
    assert max_parity(fixed) <= 1e-5


def test_nchw_inputs_and_reference():
    result = convert(image_model(16), ConvertConfig(nchw=True))
    assert [str(s) for s in result.inputs] == ["image:float32[batch,3,16,16]"]
    assert [str(d) for d in result.model.graph.inputs[0].shape] == ["batch", "3", "16", "16"]
    assert max_parity(result) <= 1e-5


def test_digits_accuracy_is_kept(tmp_path):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype("float32")
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.3, random_state=0, stratify=digits.target
    )
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((64,), name="pixels"),
            keras.layers.Dense(64, activation="relu"),
            keras.layers.Dropout(0.1),
            keras.layers.Dense(10, activation="softmax", name="probs"),
        ]
    )
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x_train, y_train, epochs=30, batch_size=64, verbose=0)
    model.save(tmp_path / "digits.keras")

    result = convert(str(tmp_path / "digits.keras"), ConvertConfig())
    tf_pred = np.argmax(model.predict(x_test, verbose=0), axis=1)
    onnx_pred = np.argmax(ort_run(result.model, {"pixels": x_test})[0], axis=1)
    tf_acc = float(np.mean(tf_pred == y_test))
    assert tf_acc > 0.9
    assert float(np.mean(onnx_pred == y_test)) == tf_acc
    assert np.array_equal(onnx_pred, tf_pred)


# --- bad input ----------------------------------------------------------------------------


def test_not_a_keras_file(tmp_path):
    path = tmp_path / "broken.keras"
    path.write_text("definitely not a zip")
    with pytest.raises(InputError, match="is not a Keras archive") as info:
        convert(str(path), ConvertConfig())
    assert str(path) in str(info.value)
    assert path.read_text() == "definitely not a zip"


def test_damaged_keras_zip(tmp_path):
    import zipfile

    path = tmp_path / "damaged.keras"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("hello.txt", "no config here")
    with pytest.raises(InputError) as info:
        convert(str(path), ConvertConfig())
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_lambda_layer_needs_unsafe_load(tmp_path, suffix):
    path = tmp_path / f"lam{suffix}"
    inp = keras.Input((4,), name="x")
    keras.Model(inp, keras.layers.Lambda(lambda t: t * 2.0 + 1.0)(inp)).save(path)
    with pytest.raises(InputError, match="--unsafe-load") as info:
        convert(str(path), ConvertConfig())
    assert str(path) in str(info.value)
    result = convert(str(path), ConvertConfig(unsafe_load=True))
    feeds = {"x": np.ones((2, 4), "float32")}
    assert np.allclose(ort_run(result.model, feeds)[0], 3.0)


def test_h5_with_weights_only(tmp_path):
    path = tmp_path / "only.weights.h5"
    two_input_model().save_weights(path)
    with pytest.raises(InputError, match="weights but no model architecture") as info:
        convert(str(path), ConvertConfig())
    assert str(path) in str(info.value)


def test_saved_model_without_serving_signature(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(2.0)
    module.f = tf.function(lambda x: x * module.v)
    module.f.get_concrete_function(tf.TensorSpec((None,), tf.float32))
    tf.saved_model.save(module, str(tmp_path / "nosig"))
    with pytest.raises(InputError, match="no serving signature") as info:
        convert(str(tmp_path / "nosig"), ConvertConfig())
    assert str(tmp_path / "nosig") in str(info.value)


def test_saved_model_signature_is_picked_by_name(tmp_path):
    module = tf.Module()
    module.v = tf.Variable(2.0)
    double = tf.function(lambda x: {"y": x * module.v}, input_signature=[tf.TensorSpec((None, 3))])
    shift = tf.function(lambda x: {"y": x + module.v}, input_signature=[tf.TensorSpec((None, 3))])
    path = tmp_path / "two"
    tf.saved_model.save(module, str(path), signatures={"double": double, "shift": shift})
    with pytest.raises(InputError, match="--signature NAME") as info:
        convert(str(path), ConvertConfig())
    assert "double, shift" in str(info.value)
    feeds = {"x": np.full((2, 3), 5.0, "float32")}
    assert np.allclose(
        ort_run(convert(str(path), ConvertConfig(signature="shift")).model, feeds), 7
    )
    assert np.allclose(
        ort_run(convert(str(path), ConvertConfig(signature="double")).model, feeds), 10
    )
    with pytest.raises(InputError, match="no signature 'triple'"):
        convert(str(path), ConvertConfig(signature="triple"))
    keras_file = tmp_path / "m.keras"
    two_input_model().save(keras_file)
    with pytest.raises(InputError, match="SavedModel directory only") as info:
        convert(str(keras_file), ConvertConfig(signature="shift"))
    assert str(keras_file) in str(info.value)


def test_directory_that_is_not_a_saved_model(tmp_path):
    with pytest.raises(InputError, match="not a SavedModel") as info:
        convert(str(tmp_path), ConvertConfig())
    assert str(tmp_path) in str(info.value)


def test_missing_path_and_wrong_suffix(tmp_path):
    with pytest.raises(InputError, match="no such file") as info:
        convert(str(tmp_path / "nope.keras"), ConvertConfig())
    assert "nope.keras" in str(info.value)
    other = tmp_path / "model.bin"
    other.write_bytes(b"\0")
    with pytest.raises(InputError, match="unknown TensorFlow model type") as info:
        convert(str(other), ConvertConfig())
    assert str(other) in str(info.value)


class Unbuilt(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, x):
        return self.dense(x) * 2.0


def test_unknown_input_shapes_need_input_flag(tmp_path):
    (tmp_path / "sub.py").write_text(
        "import keras\n"
        "class Net(keras.Model):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.dense = keras.layers.Dense(3)\n"
        "    def call(self, x):\n"
        "        return self.dense(x)\n"
        "def make():\n"
        "    return Net()\n"
    )
    ref = f"{tmp_path / 'sub.py'}:make"
    with pytest.raises(InputError, match="--input") as info:
        convert(ref, ConvertConfig())
    assert ref in str(info.value)
    with pytest.raises(InputError, match="--input"):
        convert(Unbuilt(), ConvertConfig())
    result = convert(Unbuilt(), ConvertConfig(inputs=("x:float32[batch,5]",)))
    assert [str(s) for s in result.inputs] == ["x:float32[batch,5]"]
    assert max_parity(result) <= 1e-6


def test_unsupported_ops_are_named(tmp_path):
    @tf.function(input_signature=[tf.TensorSpec((None, 4), tf.float32)])
    def fn(x):
        return tf.math.lgamma(tf.abs(x) + 1.0) + tf.math.digamma(tf.abs(x) + 1.0)

    with pytest.raises(ConversionError, match="Digamma, Lgamma") as info:
        convert(fn, ConvertConfig())
    assert "the object passed to convert()" in str(info.value)

    (tmp_path / "odd.py").write_text(
        "import keras, tensorflow as tf\n"
        "class Gamma(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return tf.math.lgamma(x)\n"
        "def make():\n"
        "    inp = keras.Input((3,), name='x')\n"
        "    return keras.Model(inp, Gamma()(inp))\n"
    )
    ref = f"{tmp_path / 'odd.py'}:make"
    with pytest.raises(ConversionError, match="Lgamma") as info:
        convert(ref, ConvertConfig())
    assert ref in str(info.value)


def test_opset_above_tf2onnx_limit(tmp_path):
    path = tmp_path / "m.keras"
    two_input_model().save(path)
    with pytest.raises(InputError, match=f"above {MAX_OPSET}") as info:
        convert(str(path), ConvertConfig(opset=MAX_OPSET + 1))
    assert str(path) in str(info.value)


def test_callable_returning_wrong_type_and_input_count(tmp_path):
    (tmp_path / "bad.py").write_text("def make():\n    return 42\n")
    ref = f"{tmp_path / 'bad.py'}:make"
    with pytest.raises(InputError, match="expected a keras.Model") as info:
        convert(ref, ConvertConfig())
    assert ref in str(info.value)
    with pytest.raises(InputError, match="has 2 input"):
        convert(two_input_model(), ConvertConfig(inputs=("a:float32[batch,8]",)))
    with pytest.raises(InputError, match="--nchw"):
        convert(two_input_model(), ConvertConfig(nchw=True))


def test_cli_convert_keeps_tensorflow_load_noise_off_stderr(tmp_path):
    """TensorFlow's C++ load-time notices (absl, oneDNN, CUDA) stay out of a user's terminal,
    and come back with --debug."""
    image_model().save(tmp_path / "m.keras")
    args = [sys.executable, "-m", "onnxpipe", "convert", str(tmp_path / "m.keras"), "--no-bench"]
    quiet = subprocess.run(
        [*args, "-o", str(tmp_path / "a"), "--json"], capture_output=True, text=True
    )
    assert quiet.returncode == 0, quiet.stderr
    assert "absl::InitializeLog" not in quiet.stderr and "oneDNN" not in quiet.stderr
    debug = subprocess.run(
        [*args, "-o", str(tmp_path / "b"), "--debug"], capture_output=True, text=True
    )
    assert debug.returncode == 0 and "absl::InitializeLog" in debug.stderr
    # a user's file that imports keras itself, before onnxpipe imports TensorFlow
    net = tmp_path / "net.py"
    net.write_text(
        "import keras\n\n\ndef make():\n"
        "    return keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)])\n"
    )
    own = subprocess.run(
        [sys.executable, "-m", "onnxpipe", "convert", f"{net}:make", "-o", str(tmp_path / "c"),
         "--no-bench", "--json"], capture_output=True, text=True,
    )  # fmt: skip
    assert own.returncode == 0, own.stderr
    assert "absl::InitializeLog" not in own.stderr and "oneDNN" not in own.stderr


def test_import_does_not_pull_tensorflow():
    code = (
        "import sys, onnxpipe, onnxpipe.converters.tensorflow\n"
        "assert 'tensorflow' not in sys.modules and 'keras' not in sys.modules, 'imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- keras.applications sweep -------------------------------------------------------------

# (name, input size, feed scale); models with built-in preprocessing take 0..255 pixels.
APPLICATIONS = [
    ("MobileNetV2", 64, 1.0),
    ("ResNet50", 64, 1.0),
    ("EfficientNetB0", 64, 100.0),
    ("EfficientNetV2B0", 64, 100.0),
    ("ConvNeXtTiny", 64, 100.0),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size", "scale"), APPLICATIONS)
def test_keras_applications_sweep(name, size, scale):
    keras.utils.set_random_seed(0)
    model = getattr(keras.applications, name)(
        weights=None, input_shape=(size, size, 3), classifier_activation=None
    )
    started = time.perf_counter()
    result = convert(model, ConvertConfig())
    seconds = time.perf_counter() - started
    assert [str(s) for s in result.inputs] == [f"input:float32[batch,{size},{size},3]"]
    diff, magnitude = assert_scaled_parity(result, scale)
    print(f"{name}: convert {seconds:.1f}s, max|logit| {magnitude:.3g}, max abs diff {diff:.3g}")


def test_input_specs_bind_by_name_in_any_order():
    """``--input b ... --input a ...`` for a model taking (a, b): b still feeds b."""
    a = keras.Input((4,), name="a")
    b = keras.Input((4,), name="b")
    model = keras.Model([a, b], keras.layers.Dense(3)(a) * 2.0 + b[:, :3])
    result = convert(model, ConvertConfig(inputs=("b:float32[batch,4]", "a:float32[batch,4]")))
    assert [v.name for v in result.model.graph.inputs] == ["a", "b"]  # the model's order
    feeds = {"a": RNG.standard_normal((3, 4)).astype(np.float32)}
    feeds["b"] = RNG.standard_normal((3, 4)).astype(np.float32) * 10
    want = model({"a": feeds["a"], "b": feeds["b"]}).numpy()
    assert np.allclose(ort_run(result.model, feeds)[0], want, atol=1e-5)
    with pytest.raises(InputError, match="match some of the model's inputs"):
        convert(model, ConvertConfig(inputs=("b:float32[batch,4]", "c:float32[batch,4]")))


def _convert_lines(cli, tmp_path: Path, model_lines: str) -> tuple[int, str, Path]:
    """Convert ``def make(): <model_lines>`` from a file through the CLI: (code, stderr, out)."""
    source = tmp_path / "km.py"
    lines = textwrap.dedent(model_lines).strip().splitlines()
    body = "".join(f"    {line}\n" for line in lines)
    source.write_text(f"import keras\nimport tensorflow as tf\ndef make():\n{body}")
    out = tmp_path / "b"
    code, _, err = cli("convert", f"{source}:make", "-o", out, "--no-bench")
    return code, err, out


def _converted_manifest(cli, tmp_path: Path, model_lines: str) -> dict:
    """Convert ``def make(): <model_lines>`` from a file through the CLI; its manifest."""
    code, err, out = _convert_lines(cli, tmp_path, model_lines)
    assert code == 0, err
    return json.loads((out / "manifest.json").read_text())


def test_parity_runs_the_keras_model_as_the_user_does(cli, tmp_path):
    """TimeDistributed traced with a None time axis maps over the batch: eager Keras shows it."""
    code, err, out = _convert_lines(
        cli,
        tmp_path,
        """
        x = keras.Input((None, 4))
        return keras.Model(x, keras.layers.TimeDistributed(keras.layers.Dense(3))(x))
        """,
    )
    assert code == 1 and "not a tolerance question" in err and not out.exists()


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (  # a stateful RNN assigns its state when called: exit 3 before
            """
            x = keras.Input((10, 4), batch_size=2)
            return keras.Model(x, keras.layers.LSTM(5, stateful=True)(x))
            """,
            "stateful=False",
        ),
        (  # Keras 3 lowers a float argmax through Bitcast
            """
            x = keras.Input((4,))
            return keras.Model(x, keras.ops.argmax(keras.layers.Dense(5)(x), axis=-1))
            """,
            "use tf.math.argmax",
        ),
        (  # bilinear UpSampling2D cannot be traced with unknown height and width
            """
            x = keras.Input((None, None, 3))
            up = keras.layers.UpSampling2D(2, interpolation="bilinear")
            return keras.Model(x, up(keras.layers.Conv2D(4, 3, padding="same")(x)))
            """,
            "--input input:float32[batch,224,224,3]",
        ),
        (  # the real cause follows Keras's first line
            """
            x = keras.Input((None, None, 3))
            a = keras.layers.Conv2D(4, 3, padding="same")(x)
            b = keras.layers.Conv2D(8, 3, strides=2, padding="same")(a)
            return keras.Model(x, keras.layers.Concatenate()([a, keras.layers.UpSampling2D(2)(b)]))
            """,
            "ConcatOp : Dimension 1 in both shapes must be equal",
        ),
    ],
)
def test_keras_models_onnx_cannot_hold_say_why(cli, tmp_path, lines, message):
    code, err, out = _convert_lines(cli, tmp_path, lines)
    assert code == 2 and message in err and not out.exists(), err
    assert "Traceback" not in err


def test_a_tf_function_taking_a_dict_converts_with_its_keys_as_names(tmp_path):
    import tensorflow as tf

    w = tf.constant(np.arange(12, dtype=np.float32).reshape(4, 3))
    spec = tf.TensorSpec([None, 4], tf.float32)

    @tf.function(input_signature=[{"b": spec, "a": spec}])
    def f(d):
        return d["a"] @ w - 2.0 * (d["b"] @ w)

    result = convert(f, ConvertConfig())
    assert [s.name for s in result.inputs] == ["a", "b"]
    a, b = np.ones((2, 4), np.float32), np.full((2, 4), 3, np.float32)
    np.testing.assert_allclose(ort_run(result.model, {"a": a, "b": b})[0], a @ w - 2 * (b @ w))


def test_an_output_dim_that_never_changes_is_its_size(cli, tmp_path):
    """tf2onnx names MultiHeadAttention's feature dim unk__N; it is always 8."""
    manifest = _converted_manifest(
        cli,
        tmp_path,
        """
        x = keras.Input((None, 8), name="x")
        return keras.Model(x, keras.layers.MultiHeadAttention(num_heads=2, key_dim=4)(x, x))
        """,
    )
    assert manifest["outputs"][0]["shape"] == ["batch", "x_dim1", 8]


def test_small_vocab_keras_embedding_gets_ids_in_range(cli, tmp_path):
    """Keras 3 wraps the ids in index arithmetic before the Gather; the limit is still found."""
    manifest = _converted_manifest(
        cli,
        tmp_path,
        """
        x = keras.Input((None,), dtype='int32', name='tokens')
        e = keras.layers.Embedding(10, 8)(x)
        return keras.Model(x, keras.layers.GlobalAveragePooling1D()(e))
        """,
    )
    assert manifest["inputs"][0]["index_limit"] == 10


def test_inputs_that_must_share_a_length_get_one_symbol(cli, tmp_path):
    """ids, token types and a mask, each Input((None,)): parity feeds them one length."""
    manifest = _converted_manifest(
        cli,
        tmp_path,
        """
        ids = keras.Input((None,), dtype='int32', name='input_ids')
        types = keras.Input((None,), dtype='int32', name='token_type_ids')
        mask = keras.Input((None,), dtype='float32', name='mask')
        e = keras.layers.Embedding(30, 4)(ids) + keras.layers.Embedding(2, 4)(types)
        return keras.Model([ids, types, mask], e * keras.ops.expand_dims(mask, -1))
        """,
    )
    assert [i["shape"] for i in manifest["inputs"]] == [["batch", "seq"]] * 3
    assert [i.get("index_limit") for i in manifest["inputs"]] == [30, 2, None]
    assert manifest["outputs"][0]["shape"] == ["batch", "seq", 4]


def test_inputs_of_independent_lengths_keep_their_symbols(cli, tmp_path):
    manifest = _converted_manifest(
        cli,
        tmp_path,
        """
        a = keras.Input((None,), name='a')
        b = keras.Input((None,), name='b')
        return keras.Model([a, b], keras.ops.mean(a, 1) + keras.ops.mean(b, 1))
        """,
    )
    assert [i["shape"] for i in manifest["inputs"]] == [["batch", "a_dim1"], ["batch", "b_dim1"]]


def test_output_dims_take_the_input_symbols_names(cli, tmp_path):
    """tf2onnx names a dynamic output dim unk__N; the manifest shows the input's symbol."""
    manifest = _converted_manifest(
        cli,
        tmp_path,
        """
        x = keras.Input((None, 4), name='x')
        return keras.Model(x, keras.layers.Dense(3)(x))
        """,
    )
    assert manifest["inputs"][0]["shape"] == ["batch", "x_dim1", 4]
    assert manifest["outputs"][0]["shape"] == ["batch", "x_dim1", 3]


def test_package_at_a_size_the_model_cannot_take_names_the_bundle(cli, tmp_path):
    """A U-Net needs even sizes: the error names the bundle and the --fixed-shape, no temp path."""
    source = tmp_path / "unet.py"
    source.write_text(
        textwrap.dedent(
            """
            import keras

            def make():
                x = keras.Input((None, None, 3))
                a = keras.layers.Conv2D(4, 3, padding="same")(x)
                b = keras.layers.Conv2D(8, 3, strides=2, padding="same")(a)
                up = keras.layers.UpSampling2D(2)(b)
                return keras.Model(x, keras.layers.Concatenate()([a, up]))
            """
        )
    )
    data = tmp_path / "d.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((2, 16, 24, 3)).astype("f4"))
    bundle = tmp_path / "b"
    code, _, err = cli("convert", f"{source}:make", "-o", bundle, "--data", data, "--no-bench",
                       "--input", "input:float32[batch,h,w,3]")  # fmt: skip
    assert code == 0, err
    code, _, err = cli("package", bundle, "-o", tmp_path / "pk", "--target", "mobile",
                       "--fixed-shape", "input:1,15,23,3")  # fmt: skip
    assert code == 2 and f"{bundle / 'model.onnx'}:" in err and "input:1,15,23,3" in err
    assert "onnxpipe-mobile-" not in err


def test_saved_model_signature_dtype_given_otherwise_says_which(cli, tmp_path):
    """--input k:int64 for a signature taking int32 was exit 2 blaming tf2onnx and a
    'PartitionedCall' op; now it names the input and the signature's dtype."""
    module = tf.Module()
    module.v = tf.Variable(tf.ones((4,)))
    scale = tf.function(
        lambda q, k: {"out": q * module.v * tf.cast(k[:, None], tf.float32)},
        input_signature=[tf.TensorSpec((None, 4), tf.float32, name="q"),
                         tf.TensorSpec((None,), tf.int32, name="k")],
    )  # fmt: skip
    path = tmp_path / "sm"
    tf.saved_model.save(module, str(path), signatures={"serving_default": scale})
    out = tmp_path / "out"
    code, _, err = cli("convert", path, "-o", out, "--no-bench",
                       "--input", "q:float32[batch,4]", "--input", "k:int64[batch]")  # fmt: skip
    assert code == 2 and "k as int32, not int64" in err and "PartitionedCall" not in err, err
    assert not out.exists()
    code, _, err = cli("convert", path, "-o", out, "--no-bench",
                       "--input", "q:float32[batch,4]", "--input", "k:int32[batch]")  # fmt: skip
    assert code == 0, err


def test_nhwc_input_spec_with_nchw_says_to_give_the_nchw_shape(cli, tmp_path):
    """--nchw reads --input as the ONNX model's NCHW shape: an NHWC spec was moved to
    [batch, 16, 3, 16] and TensorFlow's rejection named that shape, not the user's."""
    inputs = keras.Input((16, 16, 3), name="image")
    keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs)).save(tmp_path / "cnn.keras")
    out = tmp_path / "out"
    code, _, err = cli("convert", tmp_path / "cnn.keras", "-o", out, "--no-bench", "--nchw",
                       "--input", "image:float32[batch,16,16,3]")  # fmt: skip
    err = err.replace("\n", " ")
    assert code == 2 and "Give image:float32[batch,3,16,16], or drop --nchw" in err, err
    assert not out.exists()
    code, _, err = cli("convert", tmp_path / "cnn.keras", "-o", out, "--no-bench", "--nchw",
                       "--input", "image:float32[batch,3,16,16]")  # fmt: skip
    assert code == 0, err
