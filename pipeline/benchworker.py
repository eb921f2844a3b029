"""Benchmark worker, run in a fresh process so peak RSS and threads are the model's own.

Usage (internal): ``python -m onnxpipe.benchworker REQUEST.json``; prints one JSON record.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxpipe.converters.base import InputSpec, random_feeds
from onnxpipe.runtime import (
    ORT_ERRORS,
    UNAVAILABLE_EXIT,
    ProviderUnavailable,
    SessionOptions,
    make_session,
)

DEFAULT_SIZE = 8
"""What dynamic dims other than the batch are timed at, unless sizes say otherwise."""
RUN_FAILED_EXIT = 5
"""A worker's exit status when the session was made but running it failed (stderr: why)."""
WORKER_TIMEOUT_S = 600
"""How long the parent waits for one worker: session creation plus warmup and timed runs,
each of those two stopping after ``max_seconds``."""


def batch_symbols(specs: list[InputSpec]) -> set[str]:
    """The symbols ``--batch`` sets: those on axis 0 of an input."""
    return {spec.shape[0] for spec in specs if spec.shape and isinstance(spec.shape[0], str)}


def batch_input(specs: list[InputSpec]) -> InputSpec | None:
    """The input whose axis 0 is the batch (the one ``--batch`` sizes), or None.

    The first input with a batch symbol there, else the first that is not a scalar (a
    fixed-batch model's batch): a scalar or a fixed ``[1, 4]`` first input is not batched
    when a later one is ``[N, 4]``.
    """
    symbols = batch_symbols(specs)
    shaped = [spec for spec in specs if spec.shape]
    return next((s for s in shaped if s.shape[0] in symbols), shaped[0] if shaped else None)


def feed_sizes(specs: list[InputSpec], batch: int, given: dict[str, int]) -> dict[str, int]:
    """The size of each symbol at ``batch``, with ``given`` sizes (``--size SYMBOL=N``).

    The batch sets the symbols on axis 0 only; a fixed-batch model keeps its batch and its
    other symbols (sequence lengths) their usual size.
    """
    batch_axes = batch_symbols(specs)
    return {
        sym: (batch if sym in batch_axes else int(given.get(sym, DEFAULT_SIZE)))
        for spec in specs
        for sym in spec.symbols
    }


def run(request: dict) -> dict:
    """Time ``runs`` inferences after ``warmup``; latency percentiles, throughput, RSS."""
    specs = [InputSpec.from_json(s) for s in request["inputs"]]
    sizes = feed_sizes(specs, int(request["batch"]), request.get("sizes") or {})
    feeds = random_feeds(specs, sizes, seed=0)
    if request.get("feeds"):  # given inputs (e.g. a real sentence) instead of random ones
        with np.load(request["feeds"]) as given:
            feeds = {name: given[name] for name in given.files}
    start = time.perf_counter()
    session = make_session(
        Path(request["model"]), SessionOptions(ep=request["ep"], threads=request["threads"])
    )
    create_ms = (time.perf_counter() - start) * 1000
    try:
        warmed, times = _timed_runs(session, feeds, request)
    except ORT_ERRORS as e:  # the model, at these feeds: not a crash of ours
        raise RunFailed(f"{type(e).__name__}: {str(e).strip()}") from e
    lat = np.asarray(times)
    lead = batch_input(specs)
    if lead is not None and lead.name in feeds:
        real_batch = int(feeds[lead.name].shape[0])
    else:  # given feeds without specs: their first batched array
        arrays = [a for a in feeds.values() if a.ndim]
        real_batch = int(arrays[0].shape[0]) if arrays else 1
    return {
        "ep": request["ep"],
        "batch": real_batch,
        "threads": request["threads"] or None,
        "runs": len(times),
        "warmup_runs": warmed,
        "latency_ms": {
            "p50": float(np.percentile(lat, 50)),
            "p90": float(np.percentile(lat, 90)),
            "p99": float(np.percentile(lat, 99)),
            "mean": float(lat.mean()),
        },
        "throughput_per_s": float(real_batch * 1000.0 / np.median(lat)),
        "session_create_ms": create_ms,
        "peak_rss_mb": peak_rss_mb(),
        "shapes": {name: list(array.shape) for name, array in feeds.items()},
        # At most 200 per-run timings, evenly spaced, for the report's distribution plot.
        "samples_ms": [round(float(t), 4) for t in lat[:: max(1, len(lat) // 200)][:200]],
    }


def _timed_runs(
    session: ort.InferenceSession, feeds: dict[str, np.ndarray], request: dict
) -> tuple[int, list[float]]:
    """Warmup runs done and the timed runs' latencies (ms).

    Each phase stops at ``max_seconds`` (the timed one after at least 10 runs): warmup had no
    limit, and ``--warmup 80000`` ran until the parent gave up after 10 minutes.
    """
    max_seconds = request.get("max_seconds", 60)
    deadline = time.perf_counter() + max_seconds
    warmed = 0
    while warmed < request["warmup"] and time.perf_counter() < deadline:
        session.run(None, feeds)
        warmed += 1
    times: list[float] = []
    deadline = time.perf_counter() + max_seconds
    for _ in range(request["runs"]):
        t0 = time.perf_counter()
        session.run(None, feeds)
        times.append((time.perf_counter() - t0) * 1000)
        if time.perf_counter() > deadline and len(times) >= 10:
            break
    return warmed, times


class RunFailed(Exception):
    """The session was made, but running it on the benchmark's feeds failed."""


def peak_rss_mb() -> float:
    """This process's peak resident set, in MB.

    ``VmHWM`` belongs to this process image; ``ru_maxrss`` is inherited across fork+exec on
    Linux and would report the (torch-laden) parent's peak instead.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    # Elsewhere (macOS: bytes) the rusage figure is the best there is.
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


if __name__ == "__main__":
    try:
        print(json.dumps(run(json.loads(Path(sys.argv[1]).read_text()))))
    except ProviderUnavailable as e:
        print(f"unavailable: {e}", file=sys.stderr)
        sys.exit(UNAVAILABLE_EXIT)
    except RunFailed as e:  # the parent tells a size the model cannot take from other failures
        print(f"run failed: {e}", file=sys.stderr)
        sys.exit(RUN_FAILED_EXIT)
