"""Validation of a bundle's model: the ONNX checker, then parity on each execution provider.

The reference is what the bundle stored (``parity.npz``): the source framework's outputs at
conversion, or, in a bundle an optimize/quantize/prune step made, that model's own outputs on
ORT CPU when it was written (its parity with the input model is in the manifest). User data
without stored outputs is compared with the model on ORT CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.bundle import MANIFEST, load_parity_samples, read_manifest
from onnxpipe.converters.base import InputSpec
from onnxpipe.data import check_table_ids, fitted, load_data, parity_feeds, samples_in
from onnxpipe.errors import InputError
from onnxpipe.modelio import MOBILE_MODEL, MODEL_FILE, random_outputs
from onnxpipe.parity import measure_parity, not_compared_note
from onnxpipe.runtime import (
    EP_PROVIDERS,
    ORT_ERRORS,
    ProviderUnavailable,
    SessionOptions,
    make_session,
)

logger = logging.getLogger(__name__)

# "mobile" is the bundle's ORT-format model (after `onnxpipe package`) run on ORT CPU.
VALID_EPS = (*EP_PROVIDERS, "mobile")


def parse_eps(text: str) -> list[str]:
    """``cpu,cuda`` -> ``["cpu", "cuda"]``.

    Raises:
        InputError: an EP name onnxpipe does not know.
    """
    eps = [e.strip().lower() for e in text.split(",") if e.strip()]
    unknown = [e for e in eps if e not in VALID_EPS]
    if unknown or not eps:
        raise InputError(
            f"--ep {text!r}: unknown execution provider(s) {unknown or '(none given)'}; "
            f"use a comma-separated list of {', '.join(VALID_EPS)}."
        )
    return eps


def check_model(path: Path) -> str | None:
    """The ONNX checker with full shape inference; the first error line, or None."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        return str(e).strip().splitlines()[0][:300]
    return None


def validate_bundle(
    bundle: Path,
    eps: Sequence[str],
    inputs: Sequence[Any],
    data: str | None = None,
    atol: float = 1e-4,
    require: Sequence[str] = (),
    manifest: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """``validation.<ep>`` records: passed / failed / unavailable, with the reason and numbers.

    A ``require``d EP is validated too, whether or not ``eps`` lists it. ``manifest`` says
    what the stored samples are (a step's record before manifest.json is written); else
    the bundle's manifest.json is read.
    """
    eps = list(dict.fromkeys([*eps, *require]))
    model = bundle / MODEL_FILE
    checker_error = check_model(model)
    if checker_error:
        reason = f"ONNX checker: {checker_error}"
        return {ep: {"status": "failed", "reason": reason} for ep in eps}
    pairs = load_parity_samples(bundle)
    if manifest is None and (bundle / MANIFEST).is_file():
        manifest = read_manifest(bundle)
    reference_name = _stored_reference(manifest or {}) if pairs else "onnxruntime cpu"
    stored = len(pairs)
    extra = load_data(data, inputs) if data else ([] if pairs else parity_feeds(inputs))
    if data:
        check_table_ids(extra, model, data)
    if extra:
        try:
            cpu = make_session(model, SessionOptions(ep="cpu"))
            pairs += [(feeds, list(cpu.run(None, feeds))) for feeds in extra]
        except ORT_ERRORS as e:
            first = str(e).splitlines()[0]
            if data:  # the user's data, not the model, is what failed: nothing is recorded
                raise InputError(
                    f"{data}: the bundle's model cannot run this data on CPU ({first[:300]}). "
                    "Check its values, e.g. token ids within the vocabulary and sequences "
                    "within the model's maximum length."
                ) from e
            reason = f"cpu reference run: {first}"
            return {ep: {"status": "failed", "reason": reason} for ep in eps}
    by_id = {id(feeds): outs for feeds, outs in pairs}
    feeds_list = [feeds for feeds, _ in pairs]
    # --data has no source outputs: its reference is the CPU run, which it cannot test
    if data and stored:
        sources = {
            "cpu": f"{reference_name} (--data ran on cpu: it is the other EPs' reference)",
            "other": f"{reference_name}; --data samples: onnxruntime cpu",
        }
    elif data:
        sources = {
            "cpu": "onnxruntime cpu itself (--data holds no reference outputs: the model ran it)",
            "other": "onnxruntime cpu",
        }
    else:
        sources = {"cpu": reference_name, "other": reference_name}
    random = random_outputs(model)
    results: dict[str, dict[str, Any]] = {}
    for ep in eps:
        ep_feeds, expected, repeated = feeds_list, by_id, 0
        source = sources["cpu" if ep == "cpu" else "other"]
        if ep == "cpu" and data and stored:  # the data's reference is this very run
            ep_feeds = feeds_list[:stored]
        try:
            if ep == "mobile":
                session, ep_feeds, expected, source, repeated = _mobile_session(
                    bundle, feeds_list, data, stored
                )
            else:
                session = make_session(model, SessionOptions(ep=ep))
        except ProviderUnavailable as e:
            results[ep] = {"status": "unavailable", "reason": str(e)}
            continue
        except ORT_ERRORS as e:
            results[ep] = {"status": "failed", "reason": f"session: {str(e).splitlines()[0]}"}
            continue

        def candidate(feeds: dict[str, np.ndarray], _s: Any = session) -> list[np.ndarray]:
            try:
                return list(_s.run(None, feeds))
            except ORT_ERRORS as e:
                raise RuntimeError(str(e).splitlines()[0]) from e

        def reference(
            feeds: dict[str, np.ndarray], _e: dict[int, list[np.ndarray]] = expected
        ) -> list[np.ndarray]:
            return _e[id(feeds)]

        names = [o.name for o in session.get_outputs()]
        parity = measure_parity(reference, candidate, ep_feeds, names, atol, random)
        results[ep] = {
            "status": "passed" if parity["passed"] else "failed",
            "reason": _why(parity) if not parity["passed"] else not_compared_note(parity),
            "providers": session.get_providers(),
            "reference": source,
            "samples": samples_in(ep_feeds) - repeated,
            "max_abs_diff": parity["max_abs_diff"],
            "cosine": parity["cosine"],
            "top1_agreement": parity["top1_agreement"],
            **({"not_compared": parity["not_compared"]} if "not_compared" in parity else {}),
        }
    return results


def source_tolerance(manifest: dict[str, Any], atol: float) -> float:
    """``atol``, or twice the source's own noise where convert measured it (no tighter).

    Stored outputs of a source that differs from itself by 1.1e-4 cannot be matched to 1e-4.
    """
    parity = manifest.get("parity")
    tolerance = parity.get("tolerance") if isinstance(parity, dict) else None
    noise = tolerance.get("source_noise") if isinstance(tolerance, dict) else None
    return max(atol, 2 * float(noise)) if isinstance(noise, int | float) else atol


def _stored_reference(manifest: dict[str, Any]) -> str:
    """What ``parity.npz`` holds: the source's outputs, or a derived model's own (ORT CPU)."""
    record = {"convert", "validate", "bench", "package"}  # steps that keep the model
    steps = [s.get("name") for s in manifest.get("steps", []) if s.get("name") not in record]
    if "source_parity" in (manifest.get("parity") or {}) and steps:
        return f"stored outputs of this model on ORT CPU (written by onnxpipe {steps[-1]})"
    return "stored source-framework outputs"


def _mobile_session(
    bundle: Path, feeds_list: list[dict[str, np.ndarray]], data: str | None = None, stored: int = 0
) -> tuple[Any, list[dict[str, np.ndarray]], dict[int, list[np.ndarray]], str, int]:
    """The ``.ort`` model's session, fitting feeds, expected outputs, source, repeated samples.

    Repeated samples: how many the feeds hold twice to fill a fixed batch (not counted).

    The feeds are those that fit the ORT model's (possibly fixed) shapes; expected outputs
    are keyed by the feeds' ``id``. The reference is ``model.onnx`` on ORT CPU at the
    optimization level the ORT file was made with: other levels fuse other kernels, and on
    int8 or float16 models those differ by far more than a conversion error (MiniLM dynamic
    int8: max abs 1.39, cosine 0.9989).
    When none of the shared feeds fit, feeds are generated at the ORT model's shapes.

    Raises:
        InputError: a ``data`` batch (the feeds after the ``stored`` ones) does not fit the
            package's fixed shapes: it was left out and the EP passed on generated samples.
    """
    path = bundle / MOBILE_MODEL
    if not path.is_file():
        raise ProviderUnavailable(
            f"no {MOBILE_MODEL} in this bundle; create it with onnxpipe package {bundle} -o OUT "
            "--target mobile"
        )
    session = make_session(path, SessionOptions(ep="cpu"))
    shapes = {i.name: i.shape for i in session.get_inputs()}
    if set(shapes) != {name for feeds in feeds_list[:1] for name in feeds}:
        raise RuntimeError(  # a failed validation (not an unavailable EP)
            f"{MOBILE_MODEL} takes inputs {sorted(shapes)}, not this bundle's model's "
            f"{sorted(feeds_list[0]) if feeds_list else []}: it was not made from it. Package "
            f"again: onnxpipe package {bundle} -o OUT --target mobile"
        )
    recorded = read_manifest(bundle) if (bundle / MANIFEST).is_file() else {}
    fitting, repeated = [], 0
    for index, part in enumerate(feeds_list):
        if (cut := fitted(part, shapes)) is not None:
            fitting += cut[0]
            repeated += cut[1]
        elif data and index >= stored:
            given = ", ".join(f"{k}{list(v.shape)}" for k, v in part.items())
            fixed = ", ".join(f"{k}{list(d)}" for k, d in shapes.items())
            raise InputError(
                f"{data}: samples at {given} do not fit {bundle / MOBILE_MODEL}, packaged with "
                f"the fixed shapes {fixed} (a batch other than the fixed one is regrouped). "
                "Give --data at those shapes, or package again with --fixed-shape at the "
                "shapes to validate."
            )
    if not fitting:
        limits = {e["name"]: e.get("index_limit") for e in recorded.get("inputs", [])}
        specs = [
            InputSpec(
                i.name,
                np.dtype(_ORT_TYPES.get(i.type, "float32")).name,
                tuple(d if isinstance(d, int) else f"{i.name}_{n}" for n, d in enumerate(i.shape)),
                limits.get(i.name),  # ids stay inside their embedding table, as in package
            )
            for i in session.get_inputs()
        ]
        fitting, repeated = parity_feeds(specs), 0
    level = recorded.get("mobile", {}).get("optimization_level", "basic")
    cpu = make_session(bundle / MODEL_FILE, SessionOptions(ep="cpu", level=level))
    expected = {id(feeds): list(cpu.run(None, feeds)) for feeds in fitting}
    return session, fitting, expected, f"{MODEL_FILE} on ORT CPU at level {level}", repeated


_ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(float16)": "float16",
    "tensor(double)": "float64",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


def _why(parity: dict[str, Any]) -> str:
    if parity["errors"]:
        return parity["errors"][0]
    worst = max(parity["outputs"], key=lambda r: r["max_abs_diff"] / max(r["tolerance"], 1e-30))
    return (
        f"output {worst['output']}: max abs diff {worst['max_abs_diff']:.3g} > tolerance "
        f"{worst['tolerance']:.3g}"
    )
