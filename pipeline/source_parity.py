"""Parity of a converted model with its source framework, as the convert step takes it.

The candidate ONNX model runs on ONNX Runtime CPU against the source on generated samples at
shapes the export never saw, plus the user's ``--data``. When parity fails on numbers alone,
the source's own noise (a batch against one sample at a time; a Keras model eagerly against
its trace) sets the floor of the tolerance, up to ``NOISE_CAP`` times atol.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.converters.base import ConversionResult
from onnxpipe.data import check_table_ids, load_data, parity_feeds, samples_in
from onnxpipe.errors import InputError
from onnxpipe.modelio import index_limit, random_outputs
from onnxpipe.parity import measure_parity
from onnxpipe.runtime import ORT_ERRORS, SessionOptions, make_session

logger = logging.getLogger(__name__)


def check_parity(
    result: ConversionResult,
    model_path: Path,
    atol: float,
    data: str | None,
    source_name: str = "the source model",
) -> tuple[dict[str, Any], list[tuple[dict[str, np.ndarray], list[np.ndarray]]]]:
    """Parity as :func:`_parity_checked`, at a tolerance no tighter than the source's own noise.

    A deep float32 model differs from itself by more than 1e-4 run as a batch and one sample
    at a time (EfficientNetV2B0 in TensorFlow: 1.1e-4 on its softmax). When parity fails on
    numbers alone, that noise is measured on every parity feed, and parity is taken again at
    twice the largest (when it is up to ``NOISE_CAP`` times atol), recorded under
    ``tolerance.source_noise``.
    """
    parity, samples = _parity_checked(result, model_path, atol, data, source_name)
    if parity["passed"] or parity["errors"] or not samples:
        return parity, samples
    noise = max(_source_noise(result, feeds) for feeds, _ in samples)
    if 2 * noise <= atol or noise > NOISE_CAP * atol:
        # above the cap it is no rounding noise: a model whose outputs depend on the batch
        return parity, samples
    logger.warning(
        "parity at atol %.3g: %s differs from itself by %.3g (a batch against one sample at a "
        "time, or eager against traced), so the tolerance is twice that",
        atol, result.reference_name, noise,
    )  # fmt: skip
    parity, samples = _parity_checked(result, model_path, 2 * noise, data, source_name)
    parity["tolerance"]["source_noise"] = noise
    parity["tolerance"]["asked_atol"] = atol
    return parity, samples


NOISE_CAP = 10
"""Source noise counts up to this many times atol; beyond, the source computes otherwise."""


def _source_noise(result: ConversionResult, feeds: dict[str, np.ndarray]) -> float:
    """Largest difference of the source with itself, relative to max(1, max|output|).

    ``feeds`` run as one batch against one sample at a time, and against the source's other
    way to run (``result.alternate``: a Keras model's trace); 0 when neither applies.
    """
    whole = result.reference(feeds)
    others = [result.alternate(feeds)] if result.alternate is not None else []
    sizes = {len(v) if v.ndim else 0 for v in feeds.values()}
    if len(sizes) == 1 and (n := sizes.pop()) >= 2:
        try:
            parts = [
                result.reference({k: v[i : i + 1] for k, v in feeds.items()}) for i in range(n)
            ]
            others.append(
                [np.concatenate([np.asarray(p[j]) for p in parts]) for j in range(len(whole))]
            )
        except Exception as e:  # noqa: BLE001 - the user's model (a fixed batch) may refuse
            logger.debug("no batch-composition noise for this feed: %s", e)
    return max((_largest_difference(whole, other) for other in others), default=0.0)


def _largest_difference(outputs: Sequence[Any], others: Sequence[Any]) -> float:
    """Largest difference of float outputs, each relative to max(1, max|output|)."""
    worst = 0.0
    for out, other in zip(outputs, others, strict=False):
        alone = np.asarray(other)
        if np.asarray(out).dtype.kind != "f" or alone.shape != np.shape(out):
            continue
        ref = np.asarray(out, dtype=np.float64)
        if not np.isfinite(ref).all():
            continue
        scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
        worst = max(worst, float(np.abs(ref - alone).max(initial=0.0)) / scale)
    return worst


def _parity_checked(
    result: ConversionResult,
    model_path: Path,
    atol: float,
    data: str | None,
    source_name: str = "the source model",
) -> tuple[dict[str, Any], list[tuple[dict[str, np.ndarray], list[np.ndarray]]]]:
    """Parity of the saved ONNX model against ``result.reference`` on generated + user data.

    Generated integer ids stay below the rows of the tables they index (``index_limit``).
    When the source cannot run the generated samples (ids that mean something else, a shape
    tensor as input), parity rests on ``data`` alone, or, without data, the user is asked
    for some.

    Raises:
        InputError: the source cannot run the generated samples and no ``data`` was given.
    """
    limits = {v.name: index_limit(v) for v in result.model.graph.inputs}
    result.inputs = [replace(s, high=limits.get(s.name)) if s.integer else s for s in result.inputs]
    generated = parity_feeds(result.inputs)
    user = load_data(data, result.inputs) if data else []
    if data:  # an int4 ONNX source: both sides read past a 4-bit table and "agreed"
        check_table_ids(user, model_path, data)
    try:
        ort_refused: list[str] = []
        parity, samples = _parity_on(
            result, model_path, atol, generated + user, {id(f) for f in generated}, data,
            ort_refused,
        )  # fmt: skip
        if user and ort_refused and len(ort_refused) == len(parity["errors"]):
            # an image model at the 5x6 pixels generated for its free dims, say: the user's
            # own inputs decide
            logger.warning(
                "parity on --data only: ONNX Runtime cannot run the generated samples (%s)",
                ort_refused[0],
            )
            return _parity_on(result, model_path, atol, user, set(), data)
        return parity, samples
    except _SourceRefused as e:
        if not user:
            specs = ", ".join(str(s) for s in result.inputs)
            raise InputError(
                f"{source_name}: the source model cannot run the sample inputs onnxpipe "
                f"generated for parity from the input specs {specs} ({e}). If a spec is wrong, "
                "fix it with --input; if the values matter (ids, shapes as inputs), give real "
                "inputs with --data FILE.npz (one array per input, by name)."
            ) from e
        logger.warning("parity on --data only: the source refused generated samples (%s)", e)
        return _parity_on(result, model_path, atol, user, set(), data)


def parity_advice(parity: dict[str, Any]) -> str:
    """What to do about a failed parity: a tolerance only helps when numbers differ."""
    if not parity["errors"]:
        return (
            "If that difference is acceptable for this model (float16 weights, a different "
            "algorithm), raise --atol."
        )
    return (
        "That is not a tolerance question: the ONNX model gives other output shapes, or "
        "ONNX Runtime cannot run it at some generated shapes (a Keras layer may trace "
        "differently with unknown dims, as TimeDistributed over a None time axis does). Fix "
        "those dims with --input at the sizes you deploy, or give --data at real sizes."
    )


def _first_line(error: BaseException, limit: int = 200) -> str:
    """The line of ``error``'s message that says what failed, cut under ``limit``.

    The first line, except after TensorFlow's "Graph execution error:" and Keras's
    "Exception encountered when calling X.call().", whose cause follows (``ConcatOp :
    Dimension 1 in both shapes must be equal ...``), behind a traceback or a kernel name.
    """
    text = re.sub(r"\x1b\[[0-9;]*m|\{\{function_node [^}]*\}\}\s*", "", str(error))
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    line = lines[0] if lines else ""
    if line.startswith(("Graph execution error", "Exception encountered when calling")):
        causes = [
            ln
            for ln in lines[1:]
            if not ln[0].isspace() and not ln.startswith(("Detected at node", "Arguments received"))
        ]
        line = f"{line.removesuffix(':')} {causes[0]}" if causes else line
    return line if len(line) <= limit else line[:limit].rsplit(" ", 1)[0] + " ..."


class _SourceRefused(Exception):
    """The source model raised on a generated sample."""


def _parity_on(
    result: ConversionResult,
    model_path: Path,
    atol: float,
    feeds_list: list[dict[str, np.ndarray]],
    generated: set[int],
    data: str | None = None,
    ort_refused: list[str] | None = None,
) -> tuple[dict[str, Any], list[tuple[dict[str, np.ndarray], list[np.ndarray]]]]:
    """Parity on ``feeds_list``; ORT's failures on generated feeds are added to ``ort_refused``."""
    session = make_session(model_path, SessionOptions(ep="cpu"))
    names = [o.name for o in session.get_outputs()]
    samples: list[tuple[dict[str, np.ndarray], list[np.ndarray]]] = []

    def reference(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            outs = result.reference(feeds)
        except Exception as e:  # the user's model, in its framework: any error type
            shapes = {k: list(v.shape) for k, v in feeds.items()}
            cause = e.__cause__ if isinstance(e, InputError) and e.__cause__ else e  # not advice
            what = f"at {shapes}: {type(cause).__name__}: {_first_line(cause)}"
            if id(feeds) in generated:
                raise _SourceRefused(what) from e
            raise InputError(
                f"{data}: the source model cannot run these --data inputs ({what}). Give inputs "
                "it runs."
            ) from e
        samples.append((feeds, outs))
        return outs

    def candidate(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        try:
            return list(session.run(None, feeds))
        except ORT_ERRORS as e:
            if ort_refused is not None and id(feeds) in generated:
                shapes = {k: list(v.shape) for k, v in feeds.items()}
                ort_refused.append(f"at {shapes}: {str(e).splitlines()[0][:200]}")
            raise RuntimeError(str(e).splitlines()[0]) from e

    random = random_outputs(model_path)
    parity = measure_parity(reference, candidate, feeds_list, names, atol, random)
    parity.update(reference=result.reference_name, samples=samples_in(feeds_list))
    return parity, samples
