"""Feeds for parity and benchmarks: generated at unseen shapes, or read from user DATA.

DATA is a ``.npz`` (one array per input name, samples on axis 0), a directory of ``.npy`` /
``.npz`` files, a directory of images with a preprocessing spec (``DIR?resize=256,crop=224,
mean=127,std=128,layout=nchw``, see :mod:`onnxpipe.images`), or ``module:callable`` yielding
feed dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.bundle import MANIFEST, NPZ_ERRORS, read_npz, unreadable_numpy
from onnxpipe.converters.base import InputSpec, example_sizes, fixed_batch, random_feeds
from onnxpipe.converters.source import call_factory, is_callable_ref
from onnxpipe.errors import InputError
from onnxpipe.graphs.quant_utils import regroup
from onnxpipe.images import image_files, load_images, split_image_data
from onnxpipe.modelio import unchecked_tables

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]


def parity_feeds(specs: Sequence[InputSpec], min_samples: int = 8, seed: int = 1) -> list[Feeds]:
    """Generated feeds at shapes the export never saw, totalling >= ``min_samples`` samples.

    The export used :func:`example_sizes` (offset 0). Here the batch (the first symbol on axis
    0 of any input, else the first input's first symbol) runs at 3, 1 and 4, and other
    symbols at other unseen sizes, because exporters fail silently exactly there.
    """
    leading = [s.shape[0] for s in specs if s.shape and isinstance(s.shape[0], str)]
    first = leading[0] if leading else next((s.symbols[0] for s in specs if s.symbols), None)
    runs: list[Feeds] = []
    total = 0
    for i in range(max(min_samples, 3)):
        sizes = example_sizes(specs, offset=1 + i)
        if first is not None:
            sizes[first] = (3, 1, 4, 2, 5)[i % 5]
        feeds = random_feeds(specs, sizes, seed=seed + i)
        runs.append(feeds)
        lead = next(iter(feeds.values())) if feeds else np.zeros(1)
        total += int(lead.shape[0]) if lead.ndim else 1
        if total >= min_samples and len(runs) >= 3:
            break
    return runs


def samples_in(feeds_list: Iterable[Feeds]) -> int:
    """Samples across feed dicts: the leading dim of the first input of each."""
    total = 0
    for feeds in feeds_list:
        first = next(iter(feeds.values()), None)
        total += int(first.shape[0]) if first is not None and first.ndim else 1
    return total


def load_data(data: str, specs: Sequence[InputSpec], batch: int = 8) -> list[Feeds]:
    """Read user DATA as feed dicts checked against ``specs`` (names, dtypes, ranks, dims).

    Raises:
        InputError: the data is missing, empty, or does not match the model's inputs.
    """
    # A model whose inputs all have a fixed first dim (zoo models: 1) takes samples that many
    # at a time.
    batch = fixed_batch(specs) or batch
    if is_callable_ref(data):
        feeds_list = _from_callable(data)
    else:
        data, image_spec = split_image_data(data)
        path = Path(data)
        if not path.exists():
            raise InputError(f"{data}: no such file or directory (expected .npz or a directory).")
        if path.is_dir() and (path / MANIFEST).is_file():
            raise InputError(  # its parity.npz mixes inputs and outputs at several shapes
                f"{data}: is an onnxpipe bundle, not data. Give a .npz with one array per "
                "input (samples on axis 0), a folder of .npy/.npz or of images; given no data, "
                "onnxpipe runs the bundle's stored samples itself."
            )
        files = (
            [path]
            if path.is_file()
            else sorted(p for p in path.iterdir() if p.suffix in (".npz", ".npy"))
        )
        if path.is_dir() and files and image_files(path):
            raise InputError(
                f"{data}: holds both images and .npz/.npy arrays; only one kind would be read. "
                "Keep one kind in the folder."
            )
        if path.is_dir() and (image_spec is not None or (not files and image_files(path))):
            if image_spec is None:
                raise InputError(
                    f"{data}: holds images but no preprocessing spec. Give one with the "
                    f"folder, e.g. '{data}?resize=256,crop=224,mean=127,std=128,layout=nchw' "
                    "(quantize also takes it as --preprocess SPEC)."
                )
            feeds_list = load_images(path, image_spec, specs, batch)
        elif not files:
            raise InputError(
                f"{data}: no .npz, .npy or image files inside. Put one array per input, or "
                "images plus --preprocess."
            )
        else:
            feeds_list = []
            for file in files:  # checked per file, so that a message names the file
                read = _read_file(file, specs, batch)
                for feeds in read:
                    _check(feeds, specs, str(file))
                feeds_list += read
    if not feeds_list:
        raise InputError(f"{data}: holds no samples.")
    for feeds in feeds_list:
        _check(feeds, specs, data)
    return feeds_list


def _read_file(path: Path, specs: Sequence[InputSpec], batch: int) -> list[Feeds]:
    if path.suffix != ".npy":
        arrays = read_npz(path)
    elif len(specs) != 1:
        raise InputError(
            f"{path}: a .npy holds one array but the model has {len(specs)} inputs; use a .npz "
            "with one array per input name."
        )
    else:
        try:
            arrays = {specs[0].name: np.load(path, allow_pickle=False)}
        except NPZ_ERRORS as e:
            raise unreadable_numpy(path, e) from e
    if not arrays:
        raise InputError(f"{path}: holds no arrays; save one per input name with np.savez.")
    count = {len(a) if a.ndim else 1 for a in arrays.values()}
    scalar = any(a.ndim == 0 for a in arrays.values())
    if (len(count) != 1 or scalar) and _one_feed(arrays, specs):
        return [arrays]  # inputs without a sample axis (a scalar, a shape): one run as they are
    if scalar:
        raise InputError(
            f"{path}: holds 0-d arrays, but not every input is 0-d; put samples on axis 0."
        )
    for spec in specs:  # ranks on the arrays as saved, before they are cut into batches
        array = arrays.get(spec.name)
        if array is not None and array.ndim != len(spec.shape):
            raise InputError(
                f"{path}: {spec.name!r} has shape {list(array.shape)}, the model takes "
                f"{list(spec.shape)} with samples on axis 0, so the array needs rank "
                f"{len(spec.shape)}"
                + (
                    " (one sample without the batch axis: save it as array[None])."
                    if array.ndim == len(spec.shape) - 1
                    else "."
                )
            )
    if len(count) != 1:
        raise InputError(
            f"{path}: arrays have different sample counts {sorted(count)} on axis 0; give every "
            "input as many samples."
        )
    n = count.pop()
    if n % batch and fixed_batch(specs) == batch:
        shapes = ", ".join(f"{k} {list(a.shape)}" for k, a in arrays.items())
        raise InputError(
            f"{path}: holds {n} samples ({shapes}), but the model takes a fixed batch of "
            f"{batch}; give a multiple of {batch} samples."
        )
    return [{k: a[i : i + batch] for k, a in arrays.items()} for i in range(0, n, batch)]


MAX_CALLABLE_BYTES = 4 << 30
MAX_CALLABLE_FEEDS = 100_000


def _from_callable(data: str) -> list[Feeds]:
    """The feed dicts a DATA callable yields, up to ``MAX_CALLABLE_BYTES`` and ``_FEEDS``.

    An endless generator (a training loader that cycles) was read until the kernel killed
    the process: a minute and the machine's 24 GiB for a feed of 64 floats.

    Raises:
        InputError: the callable yields no dicts, raises, or yields more than the budget.
    """
    produced = call_factory(data, "return an iterable of feed dicts {input name: array}")
    feeds_list: list[Feeds] = []
    held = 0
    try:
        for item in produced:
            feeds_list.append({k: _as_array(v, data, k) for k, v in dict(item).items()})
            held += sum(v.nbytes for v in feeds_list[-1].values())
            if held > MAX_CALLABLE_BYTES or len(feeds_list) > MAX_CALLABLE_FEEDS:
                raise InputError(
                    f"{data}: yielded more than {MAX_CALLABLE_FEEDS} feed dicts or "
                    f"{MAX_CALLABLE_BYTES >> 30} GiB of samples ({len(feeds_list)}, "
                    f"{held / 2**30:.1f} GiB) and was stopped: an endless generator? "
                    "Yield a finite set, e.g. itertools.islice(loader, 64)."
                )
    except InputError:
        raise
    except (TypeError, ValueError) as e:
        raise InputError(f"{data}: must return an iterable of feed dicts ({e}).") from e
    except Exception as e:  # noqa: BLE001 - the user's generator may raise anything
        raise InputError(
            f"{data}: raised {type(e).__name__} while producing samples: {e}. Fix the callable."
        ) from e
    return feeds_list


def _as_array(value: Any, data: str, name: str) -> np.ndarray:
    """A DATA callable's value as a numpy array: lists and torch/TF tensors are converted."""
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # a torch tensor that may require grad
        value = value.detach().cpu()
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as e:
        raise InputError(
            f"{data}: {name!r} is a {type(value).__name__}, not an array ({e}). Yield numpy arrays."
        ) from e


def _one_feed(arrays: Mapping[str, np.ndarray], specs: Sequence[InputSpec]) -> bool:
    """Whether ``arrays`` are one run as they are: each has its input's rank and static dims."""
    by_name = {s.name: s for s in specs}
    return set(arrays) == set(by_name) and all(_fits(a, by_name[k]) for k, a in arrays.items())


def _fits(array: np.ndarray, spec: InputSpec) -> bool:
    """``array`` has ``spec``'s rank and its static dims."""
    return array.ndim == len(spec.shape) and all(
        not isinstance(d, int) or d == n for d, n in zip(spec.shape, array.shape, strict=True)
    )


def check_table_ids(feeds_list: Sequence[Feeds], model: Path, where: str) -> None:
    """Refuse ids past a 4-bit table of ``model``, which ORT would read unchecked.

    Raises:
        InputError: naming the data ``where``, the input and the table's rows.
    """
    tables = unchecked_tables(model)
    for feeds in feeds_list:
        for name, rows in tables.items():
            ids = feeds.get(name)
            if ids is not None and ids.size and (int(ids.max()) >= rows or int(ids.min()) < 0):
                raise InputError(
                    f"{where}: {name!r} holds ids from {int(ids.min())} to {int(ids.max())}, but "
                    f"the model's 4-bit table has {rows} rows (ids 0 to {rows - 1}); ONNX "
                    "Runtime does not check them there and would read wrong rows. Encode the "
                    "data with the model's own tokenizer or vocabulary."
                )


def _check(feeds: Feeds, specs: Sequence[InputSpec], where: str) -> None:
    names = {s.name for s in specs}
    if set(feeds) != names:
        raise InputError(
            f"{where}: data has arrays {sorted(feeds)} but the model's inputs are "
            f"{sorted(names)}. Name each array after its input."
        )
    for spec in specs:
        array = feeds[spec.name]
        if array.dtype != np.dtype(spec.dtype):
            raise InputError(
                f"{where}: {spec.name!r} is {array.dtype}, the model takes {spec.dtype}. "
                f"Convert it with .astype('{spec.dtype}')."
            )
        if not _fits(array, spec):
            hint = (
                " It looks like one sample without the batch axis: save it as array[None]."
                if array.ndim == len(spec.shape) - 1
                else ""
            )
            raise InputError(
                f"{where}: {spec.name!r} has shape {list(array.shape)}, the model takes "
                f"{list(spec.shape)} (samples on axis 0).{hint}"
            )
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            bad = int(array.size - np.isfinite(array).sum())
            raise InputError(
                f"{where}: {spec.name!r} holds {bad} NaN or infinite values of {array.size}: "
                "outputs and calibration ranges computed from them mean nothing. Fix or drop "
                "those samples."
            )
    _check_shared_dims(feeds, specs, where)


def _check_shared_dims(feeds: Feeds, specs: Sequence[InputSpec], where: str) -> None:
    """Inputs that share a symbolic dim (``seq`` of ``input_ids`` and ``attention_mask``) agree."""
    seen: dict[str, tuple[int, str]] = {}
    for spec in specs:
        for dim, size in zip(spec.shape, feeds[spec.name].shape, strict=False):
            if not isinstance(dim, str):
                continue
            first = seen.setdefault(dim, (int(size), spec.name))
            if first[0] != size:
                raise InputError(
                    f"{where}: dimension {dim!r} is {first[0]} in {first[1]!r} but {size} in "
                    f"{spec.name!r}; inputs that share it must agree (pad them to one length)."
                )


def data_sizes(inputs: Sequence[InputSpec], feeds: Sequence[Feeds]) -> tuple[tuple[str, int], ...]:
    """The sizes the first of ``feeds`` gives the inputs' dynamic dims other than the batch.

    An image model with free height and width was timed at the benchmark's default 8x8
    pixels (0.008 ms) while its --eval photos were 224x224 (0.2 ms).
    """
    first = feeds[0] if feeds else {}
    return _symbol_sizes(inputs, {name: array.shape for name, array in first.items()})


def _symbol_sizes(
    inputs: Sequence[InputSpec], shapes: Mapping[str, Sequence[int]]
) -> tuple[tuple[str, int], ...]:
    """The sizes ``shapes`` (by input name) give the inputs' symbols on axes other than 0."""
    sizes: dict[str, int] = {}
    for spec in inputs:
        shape = shapes.get(spec.name)
        if shape is None or len(shape) != len(spec.shape):
            continue
        for axis, dim in enumerate(spec.shape):
            if axis and isinstance(dim, str):
                sizes.setdefault(dim, int(shape[axis]))
    return tuple(sizes.items())


def sized_like(inputs: Sequence[InputSpec], feeds: Sequence[Feeds]) -> list[InputSpec]:
    """``inputs`` with their dynamic dims other than the batch fixed at ``feeds``' sizes.

    Generated samples at other sizes may be ones the model cannot run (a 9x9 kernel at 8x8
    pixels): stored samples are sizes it ran at.
    """
    sizes = dict(data_sizes(inputs, feeds))
    return [
        replace(
            spec,
            shape=tuple(
                sizes.get(d, d) if k and isinstance(d, str) else d for k, d in enumerate(spec.shape)
            ),
        )
        for spec in inputs
    ]


def recorded_sizes(
    inputs: Sequence[InputSpec], manifest: Mapping[str, Any]
) -> tuple[tuple[str, int], ...]:
    """Sizes for the dynamic dims but the batch: where the bundle was last timed.

    ``bench.shapes``, else the sizes of convert's --data (``source.data_sizes``). A model
    that does not run at the benchmark's default 8 was converted and timed at its --data
    sizes; later commands time it there too.
    """
    bench, source = manifest.get("bench"), manifest.get("source")
    shapes = bench.get("shapes") if isinstance(bench, Mapping) else None
    if not isinstance(shapes, Mapping):  # not timed yet: the sizes of convert's --data
        given = source.get("data_sizes") if isinstance(source, Mapping) else None
        if not isinstance(given, Mapping):
            return ()
        return tuple((k, int(v)) for k, v in given.items() if isinstance(v, int))
    return _symbol_sizes(
        inputs,
        {
            k: v
            for k, v in shapes.items()
            if isinstance(v, list) and all(isinstance(d, int) for d in v)
        },
    )


def fitted(
    feeds: dict[str, np.ndarray], shapes: Mapping[str, Sequence[Any]]
) -> tuple[list[dict[str, np.ndarray]], int] | None:
    """``feeds`` cut into the fixed batch of an ORT model packaged with one, if they fit.

    ``shapes``: the package's input shapes (an int dim is fixed, others free; inputs not
    named are free). Stored and ``--data`` samples come 8 to a batch; a model packaged at
    batch 1 takes them one at a time. A remainder (3 samples at batch 2) is filled up with
    the first samples again, so every sample runs (they were left out, and the samples
    counted were fewer); how many were repeated comes back too. None when the batches do
    not fit the other fixed dims.
    """
    fixed = {shapes[k][0] for k, v in feeds.items() if k in shapes and shapes[k] and v.ndim}
    batch = next(iter(fixed)) if len(fixed) == 1 else None
    sizes = {v.shape[0] for v in feeds.values() if v.ndim}
    batches, short = [feeds], 0
    if isinstance(batch, int) and batch >= 1 and len(sizes) == 1 and (size := sizes.pop()) != batch:
        short = -size % batch
        if short:  # the last batch filled up with the first samples again (they were left out)
            feeds = {
                k: np.concatenate([v, np.resize(v, (short, *v.shape[1:]))])
                for k, v in feeds.items()
            }
        batches = regroup([feeds], batch)
    fits = all(
        len(shapes[k]) == v.ndim
        and all(not isinstance(d, int) or d == n for d, n in zip(shapes[k], v.shape, strict=True))
        for part in batches
        for k, v in part.items()
        if k in shapes
    )
    return (batches, short) if fits else None
