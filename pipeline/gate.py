"""The accuracy gate shared by every optimization step: ``--gate top1>=0.98`` and friends.

A gate compares a candidate model's outputs with its reference's (the step's input model) on
the same eval feeds. Metrics:

- ``cosine``: mean over samples of the cosine between flattened per-sample outputs, for the
  worst output (a detector's box head counts as much as its class scores); ``cosine_min``
  is the lowest single sample of any output.
- ``max_abs``: largest absolute difference over every output.
- ``top1``: share of samples whose argmax agrees, on the first output (class scores,
  ``[batch, classes]``).
- ``kl``: mean KL(softmax(reference) || softmax(candidate)) per sample, first output; of
  the outputs themselves when they already are probabilities (a model ending in Softmax),
  summed Bernoulli KL for scores in [0, 1] that are not a distribution (Sigmoid outputs).

Infinities both outputs hold in the same place (masked logits) count as equal.
"""

from __future__ import annotations

import logging
import math
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from onnxpipe.errors import GateFailed, InputError
from onnxpipe.parity import differs_from, unmatched_nonfinite

logger = logging.getLogger(__name__)

Outputs = list[np.ndarray]
_GATE_RE = re.compile(r"^\s*(top1|cosine|max_abs|kl)\s*(>=|<=)\s*([0-9.eE+-]+)\s*$")
_DIRECTION = {"top1": ">=", "cosine": ">=", "max_abs": "<=", "kl": "<="}
_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class Gate:
    """One threshold on one metric, e.g. ``top1 >= 0.98``."""

    metric: str
    op: str
    value: float

    @classmethod
    def parse(cls, text: str, flag: str = "--gate") -> Gate:
        """Parse ``METRIC>=VALUE`` / ``METRIC<=VALUE``; messages call it ``flag``.

        ``flag`` is ``--gate`` on the command line, ``gate`` in a recipe.

        Raises:
            InputError: unknown metric, wrong direction for the metric, or a bad number.
        """
        match = _GATE_RE.match(text)
        if not match:
            raise InputError(
                f"{flag} {text!r} does not parse. Write METRIC>=VALUE or METRIC<=VALUE with "
                f"METRIC one of top1, cosine (>=), max_abs, kl (<=), e.g. {flag} top1>=0.98."
            )
        metric, op, raw = match.groups()
        try:
            value = float(raw)
        except ValueError as e:
            raise InputError(f"{flag} {text!r}: {raw!r} is not a number.") from e
        example = 0.98 if _DIRECTION[metric] == ">=" else 1e-3
        if op != _DIRECTION[metric] or not math.isfinite(value):
            raise InputError(
                f"{flag} {text!r}: {metric} is bounded with {_DIRECTION[metric]} "
                f"(e.g. {metric}{_DIRECTION[metric]}{example})."
            )
        if metric in ("max_abs", "kl") and value < 0:
            raise InputError(
                f"{flag} {text!r}: {metric} is never negative; give a bound >= 0, e.g. "
                f"{metric}<={example}."
            )
        low = {"top1": 0.0, "cosine": -1.0}.get(metric)
        if low is not None and not low <= value <= 1.0:
            raise InputError(
                f"{flag} {text!r}: {metric} lies between {low:g} and 1, e.g. {metric}>=0.98."
            )
        return cls(metric, op, value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def passes(self, metrics: dict[str, Any]) -> bool:
        """Whether ``metrics`` meet the threshold (a metric that cannot be measured fails)."""
        measured = metrics.get(self.metric)
        return measured is not None and _OPS[self.op](float(measured), self.value)


def primary(gates: Sequence[Gate]) -> tuple[str, bool]:
    """The metric that decides between variants, and whether higher is better.

    The first gate's metric, else cosine.
    """
    if not gates:
        return "cosine", True
    return gates[0].metric, gates[0].op == ">="


def _kl(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Per-sample KL(reference || candidate) of ``[batch, classes]`` scores.

    Logits: of their softmax. Rows that already are a distribution (a model ending in
    Softmax): of the rows. Scores in [0, 1] that are not one (multi-label Sigmoid outputs):
    the sum over classes of each class's Bernoulli KL; their softmax is near uniform, and a
    broken int8 multi-label model scored 0.11 where this is 7.9.
    """
    if _probabilities(ref):
        p, q = ref, np.maximum(got, 0.0)
    elif ref.size and ref.min() >= 0 and ref.max() <= 1:
        p, q = np.clip(ref, 1e-12, 1 - 1e-12), np.clip(got, 1e-12, 1 - 1e-12)
        return (p * np.log(p / q) + (1 - p) * np.log((1 - p) / (1 - q))).sum(1)
    else:
        p, q = _softmax(ref), _softmax(got)
    log_ratio = np.log(np.maximum(p, 1e-12)) - np.log(np.maximum(q, 1e-12))
    return (p * log_ratio).sum(1)


def _probabilities(x: np.ndarray) -> bool:
    """Rows that are already a distribution (non-negative, summing to 1): softmax outputs."""
    return bool(x.size) and bool(x.min() >= 0) and bool(np.abs(x.sum(1) - 1).max() < 1e-3)


def _finite_pair(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both outputs in float64, with the infinities and NaNs they share set to 0.

    An infinity on one side only stays, and fails cosine and max_abs as it should; a NaN on
    one side becomes an infinity, which fails them too (an fp16 model whose every output
    was NaN scored max_abs 0: Python's max() skips NaN).
    """
    ref, got = ref.astype(np.float64), got.astype(np.float64)
    shared = (np.isinf(ref) & (ref == got)) | (np.isnan(ref) & np.isnan(got))
    if shared.any():
        ref, got = np.where(shared, 0.0, ref), np.where(shared, 0.0, got)
    if np.isnan(ref).any() or np.isnan(got).any():
        ref, got = np.where(np.isnan(ref), np.inf, ref), np.where(np.isnan(got), np.inf, got)
    return ref, got


def _shared_bounded(ref: np.ndarray, got: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The infinities both hold in one place as +-1e30, for the softmax.

    A shared +inf logit made it inf - inf (kl inf, a failed gate) where both put all mass
    on that class.
    """
    shared = np.isinf(ref) & (ref == got)
    if not shared.any():
        return ref, got
    bounded = np.where(ref > 0, 1e30, -1e30)
    return np.where(shared, bounded, ref), np.where(shared, bounded, got)


def _broken_rows(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Rows (samples) where one side holds a NaN or infinity the other does not."""
    return np.asarray(unmatched_nonfinite(ref, got).reshape(len(ref), -1).any(1))


def _softmax(x: np.ndarray) -> np.ndarray:
    z = x - x.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def gate_metrics(
    reference: Sequence[Outputs],
    candidate: Sequence[Outputs],
    masks: Sequence[np.ndarray | None] | None = None,
) -> dict[str, Any]:
    """Every gate metric for paired output lists (one entry per eval batch).

    ``masks`` (one ``[batch, seq]`` array per eval batch, e.g. the attention mask) restrict
    ``cosine`` and ``max_abs`` on ``[batch, seq, ...]`` outputs to real tokens: padded
    positions carry no meaning and would otherwise dominate the error.
    """
    # Per-sample numbers are computed batch by batch: eval batches may differ in shape
    # (other sequence lengths), so raw outputs cannot be concatenated.
    count = len(reference[0]) if reference else 0
    cosines: list[list[np.ndarray]] = [[] for _ in range(count)]
    # one value per sample ([batch, 1], a regressor): a per-sample cosine is only the sign
    # of the product, so those outputs are compared as one vector over all samples
    scalars: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    agree: list[np.ndarray] = []
    kls: list[np.ndarray] = []
    max_abs = 0.0
    for index, (ref_out, got_out) in enumerate(zip(reference, candidate, strict=True)):
        mask = masks[index] if masks else None
        for j, (ref_j, got_j) in enumerate(zip(ref_out, got_out, strict=True)):
            ref, got = _per_sample(ref_j, got_j, mask)
            if ref.size:  # padding is 0 on both sides, so only real tokens count
                max_abs = max(max_abs, float(np.max(np.abs(np.subtract(*_finite_pair(ref, got))))))
            flat_ref, flat_got = _finite_pair(ref.reshape(len(ref), -1), got.reshape(len(got), -1))
            if flat_ref.shape[1] == 1:
                scalars.setdefault(j, []).append((flat_ref.ravel(), flat_got.ravel()))
            cosines[j].append(_cosine_rows(flat_ref, flat_got))
            if j:
                continue
            if ref.ndim > 2 and all(d == 1 for d in ref.shape[2:]):  # [N, C, 1, 1] classifiers
                ref, got = ref.reshape(ref.shape[:2]), got.reshape(got.shape[:2])
            if ref.ndim == 2 and ref.shape[1] > 1:
                broken = _broken_rows(ref, got)  # argmax took a NaN row's first class
                agree.append((ref.argmax(1) == got.argmax(1)) & ~broken)
                with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                    kl = _kl(*_shared_bounded(ref, got))
                kls.append(np.where(broken | ~np.isfinite(kl), np.inf, kl))
    per_output = [np.concatenate(c) for c in cosines]
    for j, pairs in scalars.items():
        a, b = (np.concatenate(side)[None] for side in zip(*pairs, strict=True))
        per_output[j] = np.full(a.shape[1], _cosine_rows(a, b)[0])
    metrics: dict[str, Any] = {
        "samples": len(per_output[0]),
        "cosine": min(float(c.mean()) for c in per_output),
        "cosine_min": min(float(c.min()) for c in per_output),
        "max_abs": max_abs,
        "top1": None,
        "kl": None,
    }
    if agree and len(agree) == len(cosines[0]):
        metrics["top1"] = float(np.concatenate(agree).mean())
        metrics["kl"] = float(np.concatenate(kls).mean())
    if metrics["samples"] > 1 and _constant(reference):
        metrics["constant_reference"] = True
    return metrics


def _constant(reference: Sequence[Outputs]) -> bool:
    """Whether every sample's outputs equal the first sample's (an untrained model's 0.1s).

    A random-init Keras MobileNetV2 gave 0.1 per class for every image: a gated quantize of
    it read "top1 1, cosine 1, passed", which agreeing with such a reference always gives.
    """
    first: dict[int, np.ndarray] = {}
    return not any(differs_from(outputs, first) for outputs in reference)


def output_drift(
    reference: Sequence[Outputs], candidate: Sequence[Outputs]
) -> list[tuple[float, float]]:
    """Per output: the largest absolute difference and the largest finite reference value.

    For a rewrite that must keep the math: every position counts (padding too), and each
    output is judged at its own scale, so a small output's change is not hidden by a large
    output beside it. NaN/inf on one side only is an infinite difference (:func:`_finite_pair`).
    """
    count = len(reference[0]) if reference else 0
    moved, scale = [0.0] * count, [0.0] * count
    for ref_out, got_out in zip(reference, candidate, strict=True):
        for j, (ref_j, got_j) in enumerate(zip(ref_out, got_out, strict=True)):
            if not ref_j.size or ref_j.dtype.kind not in "biuf":
                continue
            ref, got = _finite_pair(ref_j, got_j)
            moved[j] = max(moved[j], float(np.max(np.abs(ref - got))))
            finite = ref_j[np.isfinite(ref_j)] if ref_j.dtype.kind == "f" else ref_j
            if finite.size:
                scale[j] = max(scale[j], float(np.max(np.abs(finite.astype(np.float64)))))
    return list(zip(moved, scale, strict=True))


def _cosine_rows(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Cosine of each row pair of two ``[rows, values]`` arrays (finite, from _finite_pair)."""
    ref_norm = np.linalg.norm(ref, axis=1)
    got_norm = np.linalg.norm(got, axis=1)
    norms = ref_norm * got_norm
    # a zero output agrees only with a zero reference (an all-zero fp16 underflow fails)
    both_zero = np.where((ref_norm == 0) & (got_norm == 0), 1.0, 0.0)
    with np.errstate(invalid="ignore", over="ignore"):
        products = (ref * got).sum(1) / np.maximum(norms, 1e-300)
    finite = np.isfinite(products)  # an infinity on one side: no agreement
    cosine = np.where(norms > 0, np.where(finite, products, 0.0), both_zero)
    return np.where(np.isfinite(norms), cosine, 0.0)


def _per_sample(
    ref_out: np.ndarray, got_out: np.ndarray, mask: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """One output of both models in float64 with samples on axis 0, padding masked out.

    Raises:
        ValueError: the two outputs differ in shape.
    """
    ref, got = ref_out.astype(np.float64), got_out.astype(np.float64)
    if ref.ndim == 0:  # a scalar output: one sample of one value
        ref, got = ref.reshape(1), got.reshape(1)
    if ref.shape != got.shape:
        raise ValueError(f"output shapes differ: {ref.shape} vs {got.shape}")
    if mask is not None and ref.ndim >= 3 and np.shape(mask) == ref.shape[:2]:
        keep = np.asarray(mask).reshape(ref.shape[:2] + (1,) * (ref.ndim - 2))
        ref, got = ref * keep, got * keep
    return ref, got


def check_applicable(gates: Sequence[Gate], reference: Sequence[Outputs]) -> None:
    """InputError for a gate whose metric the model's outputs do not have.

    ``top1`` and ``kl`` need class scores (``[batch, classes]``) as the first output; on
    anything else they cannot be measured, which is a wrong gate, not a failed one. A cosine
    gate on outputs of one value per sample (a regressor) is refused too.
    """
    metrics = gate_metrics(reference, reference)
    single = reference and all(
        np.size(out) == len(np.atleast_1d(out)) for batch in reference for out in batch
    )
    for gate in gates:
        if gate.metric == "cosine" and single:
            shape = "x".join(map(str, np.shape(reference[0][0])))
            raise InputError(
                f"--gate {gate}: the model's outputs hold one value per sample ({shape}), where "
                "cosine measures little (two unrelated positive outputs score near 1). Gate on "
                "max_abs instead, e.g. --gate max_abs<=0.01."
            )
        if metrics.get(gate.metric) is None:
            shape = "x".join(map(str, np.shape(reference[0][0]))) if reference else "?"
            # one value per sample: cosine is refused above, so point to max_abs alone
            instead = "max_abs instead, e.g. --gate max_abs<=0.01" if single else (
                "cosine or max_abs instead, e.g. --gate cosine>=0.99")  # fmt: skip
            raise InputError(
                f"--gate {gate}: {gate.metric} needs class scores [batch, classes] as the "
                f"first output, and this model's is {shape}. Gate on {instead}."
            )


def enforce(
    gates: Sequence[Gate], metrics: dict[str, Any], step: str, source: str | None = None
) -> None:
    """Raise :class:`GateFailed` with the numbers when any gate is not met.

    ``source`` names where the eval samples came from when no --eval data was given.
    """
    failed = [g for g in gates if not g.passes(metrics)]
    if failed:
        shown = ", ".join(
            f"{g.metric}={_fmt(metrics.get(g.metric), g.value)} (needs {g.metric}{g.op}{g.value!r})"
            for g in failed
        )
        where = f" ({source})" if source else ""
        raise GateFailed(
            f"{step}: accuracy gate failed: {shown} on {metrics.get('samples')} eval "
            f"samples{where}.",
            metrics={"gate": [str(g) for g in gates], **metrics},
        )


def _fmt(value: Any, other: Any = None) -> str:
    """``value`` in 4 significant digits, or as many as it takes to differ from ``other``."""
    if value is None:
        return "n/a"
    for digits in range(4, 16):
        text = f"{value:.{digits}g}"
        if other is None or text != f"{other:.{digits}g}":
            return text
    return f"{value:.16g}"
