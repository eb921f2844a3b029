"""The accuracy gate shared by every optimization step: ``--gate top1>=0.98`` and friends.

A gate compares a candidate model's outputs with its reference's (the step's input model) on
the same eval feeds. Metrics, all on the first output unless said otherwise:

- ``top1``: share of samples whose argmax agrees (classifiers: 2-D outputs).
- ``cosine``: mean over samples of the cosine between flattened per-sample outputs.
- ``max_abs``: largest absolute difference over every output.
- ``kl``: mean KL(softmax(reference) || softmax(candidate)) per sample (classifiers).
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
    def parse(cls, text: str) -> Gate:
        """Parse ``METRIC>=VALUE`` / ``METRIC<=VALUE``.

        Raises:
            InputError: unknown metric, wrong direction for the metric, or a bad number.
        """
        match = _GATE_RE.match(text)
        if not match:
            raise InputError(
                f"--gate {text!r} does not parse. Write METRIC>=VALUE or METRIC<=VALUE with "
                "METRIC one of top1, cosine (>=), max_abs, kl (<=), e.g. --gate top1>=0.98."
            )
        metric, op, raw = match.groups()
        try:
            value = float(raw)
        except ValueError as e:
            raise InputError(f"--gate {text!r}: {raw!r} is not a number.") from e
        if op != _DIRECTION[metric] or not math.isfinite(value):
            example = 0.98 if _DIRECTION[metric] == ">=" else 1e-3
            raise InputError(
                f"--gate {text!r}: {metric} is bounded with {_DIRECTION[metric]} "
                f"(e.g. {metric}{_DIRECTION[metric]}{example})."
            )
        if metric in ("top1", "cosine") and not -1.0 <= value <= 1.0:
            raise InputError(f"--gate {text!r}: {metric} lies in [0, 1] (cosine in [-1, 1]).")
        return cls(metric, op, value)

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"

    def passes(self, metrics: dict[str, Any]) -> bool:
        """Whether ``metrics`` meet the threshold (a metric that cannot be measured fails)."""
        measured = metrics.get(self.metric)
        return measured is not None and _OPS[self.op](float(measured), self.value)


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
    ``cosine`` on ``[batch, seq, ...]`` outputs to real tokens: padded positions carry no
    meaning and would otherwise dominate the error.
    """
    first_ref = np.concatenate([r[0].astype(np.float64) for r in reference])
    first_got = np.concatenate([c[0].astype(np.float64) for c in candidate])
    if masks and all(m is not None for m in masks):
        mask = np.concatenate([np.asarray(m) for m in masks if m is not None])
        if first_ref.ndim >= 3 and mask.shape == first_ref.shape[:2]:
            keep = mask.reshape(mask.shape + (1,) * (first_ref.ndim - 2)).astype(np.float64)
            first_ref, first_got = first_ref * keep, first_got * keep
    if first_ref.shape != first_got.shape:
        raise ValueError(f"output shapes differ: {first_ref.shape} vs {first_got.shape}")
    flat_ref = first_ref.reshape(len(first_ref), -1)
    flat_got = first_got.reshape(len(first_got), -1)
    norms = np.linalg.norm(flat_ref, axis=1) * np.linalg.norm(flat_got, axis=1)
    cosines = np.where(norms > 0, (flat_ref * flat_got).sum(1) / np.maximum(norms, 1e-300), 1.0)
    max_abs = max(
        float(np.max(np.abs(r.astype(np.float64) - c.astype(np.float64)))) if r.size else 0.0
        for ref, got in zip(reference, candidate, strict=True)
        for r, c in zip(ref, got, strict=True)
    )
    metrics: dict[str, Any] = {
        "samples": len(first_ref),
        "cosine": float(cosines.mean()),
        "cosine_min": float(cosines.min()),
        "max_abs": max_abs,
        "top1": None,
        "kl": None,
    }
    if first_ref.ndim == 2 and first_ref.shape[1] > 1:
        metrics["top1"] = float(np.mean(first_ref.argmax(1) == first_got.argmax(1)))
        p, q = _softmax(first_ref), _softmax(first_got)
        kl = (p * (np.log(np.maximum(p, 1e-12)) - np.log(np.maximum(q, 1e-12)))).sum(1)
        metrics["kl"] = float(kl.mean())
    return metrics


def enforce(gates: Sequence[Gate], metrics: dict[str, Any], step: str) -> None:
    """Raise :class:`GateFailed` with the numbers when any gate is not met."""
    failed = [g for g in gates if not g.passes(metrics)]
    if failed:
        shown = ", ".join(f"{g.metric}={_fmt(metrics.get(g.metric))} (needs {g})" for g in failed)
        raise GateFailed(
            f"{step}: accuracy gate failed: {shown} on {metrics.get('samples')} eval samples.",
            metrics={"gate": [str(g) for g in gates], **metrics},
        )


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.4g}"
