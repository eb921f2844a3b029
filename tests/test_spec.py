import numpy as np
import pytest

from onnxpipe.converters.base import InputSpec, example_sizes, random_feeds
from onnxpipe.converters.source import is_callable_ref
from onnxpipe.data import parity_feeds, samples_in
from onnxpipe.errors import InputError


def test_parse_spec_with_symbols():
    spec = InputSpec.parse("input:float32[batch,3,224,224]")
    assert spec == InputSpec("input", "float32", ("batch", 3, 224, 224))
    assert spec.symbols == ["batch"]
    assert str(spec) == "input:float32[batch,3,224,224]"


def test_parse_scalar_and_dotted_names():
    assert InputSpec.parse("scale:float32[]").shape == ()
    assert InputSpec.parse("serving.x:int64[batch,seq]").name == "serving.x"


@pytest.mark.parametrize(
    "text",
    [
        "input",
        "input:float32",
        "input:float99[1]",
        "input:float32[0,3]",
        "input:float32[b-1]",
        "input:float32[[b]",
        ":float32[1]",
    ],
)
def test_bad_specs_are_input_errors(text):
    with pytest.raises(InputError, match="--input"):
        InputSpec.parse(text)


def test_example_sizes_are_distinct_and_avoid_one_and_static_dims():
    specs = [InputSpec.parse("a:float32[batch,2,seq]"), InputSpec.parse("b:int64[batch,seq,3]")]
    sizes = example_sizes(specs)
    assert set(sizes) == {"batch", "seq"}
    assert len(set(sizes.values())) == 2
    assert all(v >= 2 and v not in (2, 3) for v in sizes.values())


def test_parity_feeds_use_unseen_shapes_and_enough_samples():
    specs = [
        InputSpec.parse("ids:int64[batch,seq]"),
        InputSpec.parse("attention_mask:int64[batch,seq]"),
    ]
    export = example_sizes(specs)
    runs = parity_feeds(specs)
    assert samples_in(runs) >= 8
    batches = {r["ids"].shape[0] for r in runs}
    seqs = {r["ids"].shape[1] for r in runs}
    assert export["batch"] not in batches and 1 in batches
    assert export["seq"] not in seqs
    assert all((r["attention_mask"] == 1).all() for r in runs)
    assert all(r["ids"].dtype == np.int64 for r in runs)


def test_static_model_still_gets_eight_samples():
    runs = parity_feeds([InputSpec.parse("x:float32[1,4]")])
    assert samples_in(runs) == 8
    assert not np.array_equal(runs[0]["x"], runs[1]["x"])


def test_random_feeds_are_deterministic():
    specs = [InputSpec.parse("x:float32[batch,4]")]
    a = random_feeds(specs, {"batch": 3}, seed=5)["x"]
    b = random_feeds(specs, {"batch": 3}, seed=5)["x"]
    assert a.shape == (3, 4) and np.array_equal(a, b)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pkg.module:make", True),
        ("path/to/file.py:make", True),
        ("file.py:Model.build", True),
        ("model.onnx", False),
        ("no_colon", False),
        ("pkg:1bad", False),
    ],
)
def test_callable_refs(text, expected):
    assert is_callable_ref(text) is expected


def test_data_callables_yield_tensors_and_their_errors_are_named(tmp_path):
    """A generator raising while iterated was exit 3, torch tensors were told to .astype(), and
    a data callable that raised was told to 'return the model'."""
    import pytest
    import torch

    from onnxpipe.data import load_data
    from onnxpipe.errors import InputError

    (tmp_path / "feeds.py").write_text(
        "import numpy as np\n"
        "import torch\n\n"
        "def tensors():\n"
        "    return [{'x': torch.ones(2, 4, requires_grad=True)}]\n\n"
        "def broken():\n"
        "    yield {'x': np.ones((2, 4), np.float32)}\n"
        "    raise RuntimeError('camera disconnected')\n\n"
        "def raises():\n"
        "    raise OSError('no dataset here')\n"
    )
    specs = [InputSpec("x", "float32", ("batch", 4))]
    feeds = load_data(f"{tmp_path / 'feeds.py'}:tensors", specs)
    assert isinstance(feeds[0]["x"], np.ndarray) and feeds[0]["x"].dtype == np.float32
    assert torch.is_tensor(torch.ones(1))  # torch is what the tensors came from
    with pytest.raises(InputError, match="while producing samples: camera disconnected"):
        load_data(f"{tmp_path / 'feeds.py'}:broken", specs)
    with pytest.raises(InputError, match="return an iterable of feed dicts") as info:
        load_data(f"{tmp_path / 'feeds.py'}:raises", specs)
    assert "the model" not in str(info.value)


def test_data_folder_and_file_messages_say_what_is_wrong(tmp_path):
    import pytest
    from PIL import Image

    from onnxpipe.data import load_data
    from onnxpipe.errors import InputError

    specs = [InputSpec("x", "float32", ("batch", 3, 8, 8))]
    np.savez(tmp_path / "empty.npz")
    with pytest.raises(InputError, match="holds no arrays"):
        load_data(str(tmp_path / "empty.npz"), specs)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    np.savez(mixed / "a.npz", x=np.ones((2, 3, 8, 8), np.float32))
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(mixed / "p.png")
    with pytest.raises(InputError, match="both images and"):
        load_data(str(mixed), specs)
    arrays = tmp_path / "arrays"
    arrays.mkdir()
    np.save(arrays / "x.npy", np.ones((2, 3, 8, 8), np.float32))
    with pytest.raises(InputError, match="holds arrays, not images"):
        load_data(f"{arrays}?crop=8", specs)


def test_an_endless_data_callable_is_exit_2_not_the_machines_memory(
    cli, mlp_bundle, tmp_path, monkeypatch
):
    """A loader that cycles forever was read until the kernel killed onnxpipe (24 GiB in a
    minute): now reading stops at a number of feed dicts or bytes, with exit 2."""
    import onnxpipe.data

    (tmp_path / "loader.py").write_text(
        "import numpy as np\n\n"
        "def endless():\n"
        "    while True:\n"
        "        yield {'x': np.zeros((8, 64), np.float32)}\n"
    )
    before = (mlp_bundle / "manifest.json").read_bytes()
    code, _, err = cli("validate", mlp_bundle, "--data", f"{tmp_path / 'loader.py'}:endless")
    assert code == 2 and "endless generator" in err and "loader.py:endless" in err, err
    monkeypatch.setattr(onnxpipe.data, "MAX_CALLABLE_BYTES", 1 << 20)
    code, _, err = cli("validate", mlp_bundle, "--data", f"{tmp_path / 'loader.py'}:endless")
    assert code == 2 and "(513, " in err and "islice" in err, err  # 513 feeds of 2 KiB
    assert (mlp_bundle / "manifest.json").read_bytes() == before
