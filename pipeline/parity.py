"""Parity: per-output agreement between a reference and ONNX Runtime, as manifest numbers."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

Feeds = dict[str, np.ndarray]
Runner = Callable[[Feeds], list[np.ndarray]]


def unmatched_nonfinite(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """Where one side holds a NaN or infinity the other does not hold in that place."""
    special = ~np.isfinite(ref) | ~np.isfinite(got)
    same = (ref == got) | (np.isnan(ref) & np.isnan(got))
    return special & ~same


def tolerance_for(reference: np.ndarray, atol: float) -> float:
    """``atol`` scaled by the output's magnitude: float32 error grows with the values.

    Infinities do not count toward the magnitude. A float16 output cannot be closer than its
    rounding step: the tolerance is at least 4 units in the last place of float16 (4 x 9.8e-4,
    relative) whatever ``atol`` asks.
    """
    values = reference[np.isfinite(reference)] if reference.dtype.kind in "fc" else reference
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    floor = 4 * float(np.finfo(reference.dtype).eps) if reference.dtype.kind == "f" else 0.0
    return max(atol, floor) * max(1.0, peak)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    denom = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    if denom == 0.0:
        return 1.0 if np.array_equal(a64, b64) else 0.0
    return float(np.dot(a64, b64) / denom)


def _is_classifier(array: np.ndarray, outputs: int) -> bool:
    """A lone float output of class scores: ``[batch, classes]`` or ``[batch, classes, 1, 1]``.

    The second is what a CNN without its Flatten gives; the gate reads it the same way.
    """
    return (
        outputs == 1
        and array.ndim >= 2
        and array.shape[1] > 1
        and all(d == 1 for d in array.shape[2:])
        and array.dtype.kind == "f"
    )


def compare_outputs(
    reference: Sequence[np.ndarray],
    candidate: Sequence[np.ndarray],
    names: Sequence[str],
    atol: float,
) -> list[dict[str, Any]]:
    """Per-output numbers for one feed: max abs/rel diff, cosine, top-1 and the verdict."""
    if len(reference) != len(candidate):
        raise ValueError(f"{len(reference)} reference outputs vs {len(candidate)} ONNX outputs")
    rows = []
    for name, ref, got in zip(names, reference, candidate, strict=True):
        row: dict[str, Any] = {"output": name, "shape": list(got.shape)}
        if ref.shape != got.shape:
            row.update(passed=False, error=f"shape {list(ref.shape)} vs {list(got.shape)}")
            rows.append(row)
            continue
        ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
        # inf and NaN agree where both sides hold the same one (masked logits: -inf)
        special = ~np.isfinite(ref64) | ~np.isfinite(got64)
        finite = not bool(unmatched_nonfinite(ref64, got64).any())
        diff = np.abs(np.where(special, 0.0, ref64 - got64))
        tol = tolerance_for(ref, atol)
        max_abs = float(diff.max()) if diff.size else 0.0
        plain = ~special
        row.update(
            max_abs_diff=max_abs if finite else float("inf"),
            max_rel_diff=float(
                (diff / np.maximum(np.abs(np.where(special, 1.0, ref64)), 1e-6)).max()
            )
            if diff.size
            else 0.0,
            cosine=_cosine(ref64[plain], got64[plain]) if finite else 0.0,
            tolerance=tol,
            passed=bool(finite and max_abs <= tol),
        )
        if _is_classifier(ref, len(reference)):
            scores = ref.shape[:2]
            row["top1_agreement"] = float(
                np.mean(ref.reshape(scores).argmax(1) == got.reshape(scores).argmax(1))
            )
        rows.append(row)
    return rows


def measure_parity(
    reference: Runner,
    candidate: Runner,
    feeds_list: Sequence[Feeds],
    output_names: Sequence[str],
    atol: float,
    random: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Run both on every feed and fold the per-output rows into the manifest's ``parity``.

    A candidate that raises ``RuntimeError`` (for example ONNX Runtime refusing a shape the
    export froze) is a failed parity with the error recorded, not a crash. Outputs in
    ``random`` (output -> the random op it depends on, see ``modelio.random_outputs``) differ
    on every run: they are listed under ``not_compared`` (output -> op) instead of failing.
    """
    random = dict(random or {})
    worst: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    top1: list[float] = []
    first: dict[int, np.ndarray] = {}  # each output of the first sample
    varies, seen = False, 0
    for feeds in feeds_list:
        shapes = {k: list(v.shape) for k, v in feeds.items()}
        want = reference(feeds)
        varies = differs_from(want, first) or varies
        seen += len(want[0]) if want and np.ndim(want[0]) else 0
        try:
            got = candidate(feeds)
        except RuntimeError as e:
            errors.append(f"at {shapes}: {type(e).__name__}: {str(e)[:300]}")
            continue
        try:
            rows = compare_outputs(want, got, output_names, atol)
        except ValueError as e:
            errors.append(f"at {shapes}: {e}")
            continue
        for row in rows:
            if row["output"] in random:
                continue
            if "error" in row:
                errors.append(f"at {shapes}: output {row['output']}: {row['error']}")
                continue
            if "top1_agreement" in row:
                top1.append(row["top1_agreement"])
            prev = worst.get(row["output"])
            if prev is None or row["max_abs_diff"] > prev["max_abs_diff"]:
                worst[row["output"]] = {**row, "at": shapes}
    per_output = list(worst.values())
    compared = bool(per_output) or bool(random)
    passed = not errors and compared and all(r["passed"] for r in per_output)
    constant = not varies and seen > 1 and bool(per_output)
    return {
        "max_abs_diff": max((r["max_abs_diff"] for r in per_output), default=None),
        "max_rel_diff": max((r["max_rel_diff"] for r in per_output), default=None),
        "cosine": min((r["cosine"] for r in per_output), default=None),
        "top1_agreement": float(np.mean(top1)) if top1 else None,
        "tolerance": {"atol": atol, "scaled_by": "max(1, max|reference|) per output"},
        "passed": passed,
        "outputs": per_output,
        **({"not_compared": random} if random else {}),
        **({"constant_reference": True} if constant else {}),
        "errors": errors,
    }


CONSTANT_NOTE = (
    "the reference gives the same outputs for every sample (an untrained or saturated model?), "
    "so agreeing with it proves little; check with a trained model or real --data"
)


def differs_from(outputs: Sequence[Any], first: dict[int, np.ndarray]) -> bool:
    """Whether any sample's ``outputs`` differ from the first sample's (kept in ``first``).

    A random-init Keras MobileNetV3Small outputs 0.1 for every class of every image: its
    parity read "max abs 0, top-1 1, passed" as if the conversion had been proven.
    """
    differs = False
    for i, value in enumerate(outputs):
        array = np.asarray(value)
        if array.ndim == 0 or array.shape[0] == 0:
            continue
        base = first.setdefault(i, array[:1])
        if array.shape[1:] != base.shape[1:] or not np.array_equal(
            array, np.broadcast_to(base, array.shape), equal_nan=array.dtype.kind == "f"
        ):
            differs = True
    return differs


def parity_notes(record: dict[str, Any]) -> list[str]:
    """What a bare ``passed`` would hide: outputs left out, a constant reference, a relaxed atol."""
    notes = (not_compared_note(record), constant_note(record), relaxed_note(record))
    return [n for n in notes if n]


def tolerance_text(record: dict[str, Any]) -> str | None:
    """What a parity record's ``passed`` was judged against: its atol or its gates."""
    tolerance = record.get("tolerance")
    if isinstance(tolerance, list) and tolerance:
        return "gates " + ", ".join(tolerance)
    if isinstance(tolerance, dict) and isinstance(tolerance.get("atol"), int | float):
        return f"atol {tolerance['atol']:.3g}, scaled by max(1, max|reference|) per output"
    return None


def relaxed_note(record: dict[str, Any]) -> str | None:
    """The tolerance when convert relaxed atol to twice the source model's own noise."""
    tolerance = record.get("tolerance")
    if not isinstance(tolerance, dict) or "source_noise" not in tolerance:
        return None
    return (
        f"tolerance relaxed from the atol {tolerance.get('asked_atol', 0):.3g} asked to "
        f"{tolerance['atol']:.3g}: the source model differs from itself by "
        f"{tolerance['source_noise']:.3g} "
        "(a batch against one sample at a time, or eager against traced), and no export can "
        "be held closer than that"
    )


def constant_note(record: dict[str, Any]) -> str | None:
    """:data:`CONSTANT_NOTE` when a parity record's reference never varied."""
    return CONSTANT_NOTE if record.get("constant_reference") else None


def not_compared_note(record: dict[str, Any]) -> str | None:
    """'not compared: <outputs> (random: <ops>)' when a parity record left random outputs out."""
    left_out: dict[str, str] = record.get("not_compared") or {}
    if not left_out:
        return None
    ops = ", ".join(sorted(set(left_out.values())))
    return f"not compared: {', '.join(left_out)} (random: {ops})"


def verdict(record: dict[str, Any]) -> str:
    """``passed``, ``failed``, or ``not gated`` for a derived bundle made without ``--gate``."""
    passed = record.get("passed")
    return "not gated" if passed is None else ("passed" if passed else "failed")
