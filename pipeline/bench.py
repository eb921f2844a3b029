"""Latency benchmarks on ONNX Runtime: each configuration in its own fresh process.

A fresh process per (ep, batch, threads) keeps peak RSS honest (the model's, not torch's) and
stops one run's thread pool or arena from colouring the next.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from onnxpipe.bench_data import OUT_OF_RANGE, data_feeds, out_of_range_error
from onnxpipe.benchworker import (
    DEFAULT_SIZE,
    RUN_FAILED_EXIT,
    WORKER_TIMEOUT_S,
    batch_input,
    batch_symbols,
    feed_sizes,
)
from onnxpipe.converters.base import InputSpec, check_sample_bytes
from onnxpipe.errors import InputError, OnnxPipeError
from onnxpipe.modelio import MOBILE_MODEL
from onnxpipe.runtime import (
    UNAVAILABLE_EXIT,
    ProviderUnavailable,
    SessionOptions,
    check_provider,
    make_session,
)

logger = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)
MAX_THREADS = max(64, 4 * (os.cpu_count() or 1))
"""The most ``--threads`` bench takes. ORT starts one OS thread per intra-op thread: past the
cores they only take turns, and thousands make the session itself the benchmark (5000 took
107 s to create; 3e9 is refused by ORT's SessionOptions). Four per core still times an
oversubscribed pool; 64 at least, so a recipe's matrix for a larger machine runs on a small one.
"""


@dataclass(frozen=True)
class BenchConfig:
    """One benchmark matrix: EPs x batch sizes x thread counts, ``runs`` timed after ``warmup``."""

    eps: tuple[str, ...] = ("cpu",)
    batches: tuple[int, ...] = (1,)
    threads: tuple[int, ...] = (0,)
    runs: int = 50
    warmup: int = 5
    max_seconds: float = 60.0
    sizes: tuple[tuple[str, int], ...] = ()
    """Sizes of dynamic dims other than the batch (default 8): (symbol, size) pairs."""
    recorded: tuple[tuple[str, int], ...] = ()
    """Sizes for the symbols ``sizes`` leaves out: where the bundle was last timed, or its
    data's. ``--size seq=4`` replaced them all, so a recorded ``hid=5`` went back to 8."""
    data: str | None = None
    """DATA to time on (its first samples, repeated to each batch) instead of generated values."""
    recipe: bool = False
    """Messages name a recipe's bench settings (``size``), not the command's flags (``--size``)."""

    @property
    def all_sizes(self) -> dict[str, int]:
        """The size of each symbol given or recorded; a given one wins."""
        return {**dict(self.recorded), **dict(self.sizes)}

    def __post_init__(self) -> None:
        # One record per (ep, batch, threads), as the contract says: --batch 1,1 timed twice.
        for key in ("eps", "batches", "threads"):
            object.__setattr__(self, key, tuple(dict.fromkeys(getattr(self, key))))
        low = next((b for b in self.batches if b < 1), None)
        floors = (
            ("--runs", self.runs, 1),
            ("--warmup", self.warmup, 0),
            ("--batch", low, 1),
            ("--threads", min(self.threads), 0),
        )
        for flag, value, minimum in floors:
            if value is not None and value < minimum:
                raise InputError(f"bench: {flag} {value}: must be >= {minimum}.")
        too_many = next((t for t in self.threads if t > MAX_THREADS), None)
        if too_many is not None:
            raise InputError(
                f"bench: --threads {too_many}: at most {MAX_THREADS} here (four per core of "
                f"this machine's {os.cpu_count()}, 64 at least): past the cores threads only "
                "take turns, and thousands take minutes to start. Give --threads 0 (ORT's "
                f"default) or at most {MAX_THREADS}."
            )


def bench_model(
    model: Path,
    inputs: Sequence[dict[str, Any]],
    config: BenchConfig,
    framework: str | None = None,
) -> list[dict[str, Any]]:
    """One record per (ep, batch, threads), with the manifest ``bench`` keys.

    An EP this machine lacks is left out with a warning, unless it lacks them all. A model
    with a fixed batch is timed at that batch for batch 1 and refused for other batches; a
    mobile package fixed at a batch is timed at it, with a warning naming the batches asked
    for that it cannot take. ``framework`` (the bundle's ``source.framework``) picks the hint
    for a batch the model cannot take.

    Raises:
        InputError: a batch size the model's fixed batch dim cannot take, or no EP asked for
            is available here.
    """
    _check_batches(model, inputs, config.batches, framework)
    if config.data and config.sizes:
        raise InputError(
            "bench: --size and --data: the data's arrays set the sizes; give one of them."
        )
    _check_sizes(model, inputs, config.sizes, "size" if config.recipe else "--size")
    if not config.data:
        _check_bytes(inputs, config)
    missing: dict[str, str] = {}
    for ep in config.eps:  # before any timing: an EP this ORT build lacks is not benched
        try:
            if ep == "mobile":  # the packaged model.ort, on the CPU EP as validate runs it
                if not (model.parent / MOBILE_MODEL).is_file():
                    raise ProviderUnavailable(
                        f"no {MOBILE_MODEL} in this bundle; create it with onnxpipe package "
                        f"{model.parent} -o OUT --target mobile"
                    )
                continue
            check_provider(ep)
        except ProviderUnavailable as e:
            missing[ep] = str(e)
    records = []
    with tempfile.TemporaryDirectory(prefix="onnxpipe-bench-") as tmp:
        for ep in (ep for ep in config.eps if ep not in missing):
            records += _bench_ep(model, inputs, config, ep, Path(tmp), missing)
    if not records:
        ep, reason = next(iter(missing.items()))
        raise InputError(f"--ep {ep}: {reason}. Bench on an EP this machine has.")
    for ep, reason in missing.items():
        logger.warning("--ep %s not benched: %s", ep, reason)
    return records


def _bench_ep(
    model: Path,
    inputs: Sequence[dict[str, Any]],
    config: BenchConfig,
    ep: str,
    tmp: Path,
    missing: dict[str, str],
) -> list[dict[str, Any]]:
    """The records of one EP; none, with the reason in ``missing``, where it fell back."""
    target, specs = model, inputs
    if ep == "mobile":
        target = model.parent / MOBILE_MODEL
        specs = _ort_inputs(target, inputs)
        _warn_fixed(specs, config.sizes)
    records = []
    try:
        for batch in _timed_batches(target, specs, config.batches, ep):
            feeds = None
            if config.data:  # the data's first samples at this batch, fitted to ``specs``
                feeds = tmp / f"{ep}-{batch}.npz"
                np.savez(feeds, **data_feeds(config.data, specs, batch))  # type: ignore[arg-type]
            for threads in config.threads:
                request = {
                    "model": str(target),
                    "inputs": specs,
                    "ep": "cpu" if ep == "mobile" else ep,
                    "batch": batch,
                    "threads": threads,
                    "runs": config.runs,
                    "warmup": config.warmup,
                    "max_seconds": config.max_seconds,
                    "sizes": config.all_sizes,
                    **({"feeds": str(feeds)} if feeds else {}),
                }
                records.append({**_run_worker(request, config.recipe), "ep": ep})
    except _Unavailable as e:  # listed by ORT, but its session fell back to CPU
        missing[ep] = str(e)
        return []
    return records


_SHAPE_WORDS = re.compile(r"shape|dimension|\bdims?\b|broadcast|kernel|pad", re.IGNORECASE)
"""What ORT's message says when a run failed on its inputs' sizes (Conv: 'Invalid input
shape', Reshape: 'requested shape', Add: 'cannot broadcast'); other failures are the model's."""


class _Unavailable(Exception):
    """The bench worker found its EP unavailable (the session fell back to another)."""


def isolated_ms(
    models: Mapping[K, Path], feeds: Mapping[str, np.ndarray], runs: int = 100, repeats: int = 3
) -> dict[K, list[float]]:
    """Median batch latency (ms) per model and turn, each timed alone in a fresh process.

    The models take turns ``repeats`` times (A B C, C B A, ...), so a ratio taken turn by turn
    compares neighbours in time and load drifts hit both alike (on this shared 2-core machine
    the same model's process medians differ by up to 20%). Timed in one process instead, the
    idle sessions' spinning threads took the cores from the running one: on 2 cores the
    same fp32 EfficientNet-Lite0 measured 10-19 ms beside other sessions and 6.1 ms alone.
    """
    order = list(models)
    medians: dict[K, list[float]] = {key: [] for key in order}
    with tempfile.TemporaryDirectory(prefix="onnxpipe-timing-") as tmp:
        path = Path(tmp) / "feeds.npz"
        np.savez(path, **dict(feeds))  # type: ignore[arg-type]
        for turn in range(repeats):
            for key in order if turn % 2 == 0 else reversed(order):
                request = {
                    "model": str(models[key]), "inputs": [], "feeds": str(path), "ep": "cpu",
                    "batch": 1, "threads": 0, "runs": runs, "warmup": 10, "max_seconds": 60,
                }  # fmt: skip
                medians[key].append(_run_worker(request)["latency_ms"]["p50"])
    return medians


def _specs(inputs: Sequence[dict[str, Any]]) -> list[InputSpec]:
    return [InputSpec.from_json(s) for s in inputs]


def _fixed_batch(inputs: Sequence[dict[str, Any]]) -> int | None:
    """The batch a model without a batch symbol takes (the worker's batch input's axis 0)."""
    specs = _specs(inputs)
    lead = batch_input(specs)
    return None if lead is None or batch_symbols(specs) else int(lead.shape[0])


def _timed_batches(
    model: Path, inputs: Sequence[dict[str, Any]], batches: tuple[int, ...], ep: str
) -> tuple[int, ...]:
    """``batches``, or a fixed-batch model's one batch, with a warning for those left out.

    Each batch asked for became a record of the fixed batch (--batch 1,4: two batch-4 records).
    """
    fixed = _fixed_batch(inputs)
    if fixed is None:
        return batches
    if set(batches) != {fixed}:
        signature = ", ".join(f"{s['name']}{s['shape']}" for s in inputs)
        logger.warning(
            "--ep %s: %s takes batch %d only (%s); timed at that batch, not %s",
            ep, model.name if ep != "mobile" else MOBILE_MODEL, fixed, signature,
            ",".join(str(b) for b in batches if b != fixed),
        )  # fmt: skip
    return (fixed,)


def _check_batches(
    model: Path, inputs: Sequence[dict[str, Any]], batches: Sequence[int], framework: str | None
) -> None:
    fixed = _fixed_batch(inputs)
    wrong = [b for b in batches if b not in (1, fixed)]  # 1: the model's own batch
    if fixed is None or not wrong:
        return
    signature = ", ".join(f"{s['name']}{s['shape']}" for s in inputs)
    if framework == "onnx":  # convert keeps an ONNX file's fixed dims ("contradicts the model's")
        fix = (
            "re-export the model from its framework with a dynamic batch dim (torch.onnx.export "
            "dynamic_shapes or dynamic_axes, tf2onnx with a None batch in its input signature) "
            "and convert that file, or convert the framework model itself with --input "
            "name:float32[batch,...]; ONNX Runtime's tools can fix a dim, not free one."
        )
    else:
        fix = "convert again with a symbolic batch dim (e.g. --input name:float32[batch,...])."
    raise InputError(
        f"{model}: --batch {wrong[0]} cannot run: the batch dim is fixed at {fixed} "
        f"({signature}). Bench at --batch {fixed}, or {fix}"
    )


def parse_sizes(texts: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``SYMBOL=N`` texts (``--size seq=128``, a recipe's ``size: [seq=128]``) as pairs.

    Raises:
        ValueError: carrying the first text that is not ``SYMBOL=N`` with ``N >= 1``.
    """
    pairs = []
    for text in texts:
        symbol, _, size = text.partition("=")
        if not symbol.strip() or not size.strip().isdigit() or int(size) < 1:
            raise ValueError(text)
        pairs.append((symbol.strip(), int(size)))
    return tuple(pairs)


def _ort_inputs(path: Path, inputs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``inputs`` as the ORT-format model at ``path`` takes them (its shapes may be fixed)."""
    session = make_session(path, SessionOptions(ep="cpu"))
    shapes = {i.name: i.shape for i in session.get_inputs()}
    return [
        {
            **spec,
            "shape": [
                d if isinstance(d, int) else spec["shape"][k]
                for k, d in enumerate(shapes.get(spec["name"], spec["shape"]))
            ],
        }
        for spec in inputs
    ]


def _warn_fixed(specs: Sequence[dict[str, Any]], sizes: Sequence[tuple[str, int]]) -> None:
    """Warn that the ``--size`` symbols the packaged model fixed are not timed at that size."""
    free = {d for s in specs for d in s["shape"] if isinstance(d, str)}
    fixed = [f"{symbol}={size}" for symbol, size in sizes if symbol not in free]
    if fixed:
        shapes = ", ".join(f"{s['name']}{s['shape']}" for s in specs)
        logger.warning(
            "--ep mobile: --size %s ignored: %s has fixed shapes (%s); package again with "
            "other --fixed-shape dims to time other sizes",
            " --size ".join(fixed), MOBILE_MODEL, shapes,
        )  # fmt: skip


def _check_bytes(inputs: Sequence[dict[str, Any]], config: BenchConfig) -> None:
    """InputError before a worker asks numpy for terabytes (a MemoryError there: exit 3)."""
    specs = _specs(inputs)
    for batch in config.batches:
        sizes = feed_sizes(specs, batch, config.all_sizes)
        for spec in specs:
            check_sample_bytes(spec, [sizes[d] if isinstance(d, str) else d for d in spec.shape])


def _check_sizes(
    model: Path, inputs: Sequence[dict[str, Any]], sizes: Sequence[tuple[str, int]], flag: str
) -> None:
    """InputError for a ``--size`` symbol the model's inputs do not have, or its batch.

    ``flag`` is what the user gave the sizes as (``--size``, a recipe's ``size``).
    """
    symbols = [d for s in inputs for d in s["shape"][1:] if isinstance(d, str)]
    batch = {s["shape"][0] for s in inputs if s["shape"] and isinstance(s["shape"][0], str)}
    for symbol, _ in sizes:
        if symbol in batch:
            batch_flag = flag.replace("size", "batch")
            raise InputError(f"{flag} {symbol}: that is the batch dim; set it with {batch_flag}.")
        if symbol not in symbols:
            known = ", ".join(dict.fromkeys(symbols)) or "none"
            raise InputError(
                f"{model}: {flag} {symbol}: no input has a dynamic dim of that name (the "
                f"model's: {known})."
            )


def _run_worker(request: dict[str, Any], recipe: bool = False) -> dict[str, Any]:
    """One benchmark in its own process; ``recipe``: messages name the recipe's settings."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(request, f)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "onnxpipe.benchworker", f.name],
            capture_output=True,
            text=True,
            timeout=WORKER_TIMEOUT_S,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )
    except subprocess.TimeoutExpired as e:
        raise InputError(
            f"{request['model']}: one benchmark (batch {request['batch']}, threads "
            f"{request['threads'] or 'default'}) ran past {WORKER_TIMEOUT_S} s: --warmup and "
            f"--runs stop after {request.get('max_seconds', 60)} s each, but a run started is "
            "finished and up to 10 are timed, and this model's runs are that slow here. Give a "
            "smaller --runs and --warmup, or a smaller --batch or --size."
        ) from e
    finally:
        os.unlink(f.name)
    if proc.returncode == UNAVAILABLE_EXIT:
        raise _Unavailable(proc.stderr.strip().removeprefix("unavailable: "))
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
        symbols = list(
            dict.fromkeys(
                d for s in request["inputs"] for d in s["shape"][1:] if isinstance(d, str)
            )
        )
        run_failed = proc.returncode == RUN_FAILED_EXIT
        if run_failed and not request.get("feeds") and OUT_OF_RANGE.search(tail[0]):
            raise out_of_range_error(request["model"], tail[0].removeprefix("run failed: "))
        about_shapes = run_failed and _SHAPE_WORDS.search(tail[0])
        if symbols and about_shapes:  # an image model at 8x8 pixels: the size is wrong
            at = ", ".join(f"{d}={request['sizes'].get(d, DEFAULT_SIZE)}" for d in symbols)
            fix = (
                f"the bench step's size: {{{symbols[0]}: N}} (convert takes them from data)"
                if recipe
                else f"--size {symbols[0]}=N (size: in a recipe; convert takes them from --data)"
            )
            raise InputError(
                f"{request['model']}: ONNX Runtime cannot run the model with its dynamic dims "
                f"at {at} ({tail[0][:200]}). Bench at sizes it takes: {fix}."
            )
        raise OnnxPipeError(f"benchmark of {request['model']} on {request['ep']} failed: {tail[0]}")
    record: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return record
