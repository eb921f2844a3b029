"""Mobile packaging: ORT format model, reduced-build operator config, NNAPI/CoreML analysis.

``onnxpipe package BUNDLE -o OUT --target mobile`` writes a copy of the bundle with
``mobile/model.ort`` and ``mobile/required_operators.config``, after proving that the ``.ort``
model computes what the ``.onnx`` one does. ORT's own tools do the work, called as libraries:
``make_input_shape_fixed`` (``--fixed-shape``), ``convert_onnx_models_to_ort`` and the mobile
usability checker's partition analysis, wrapped in :mod:`onnxpipe.ort_mobile`.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxpipe.atomic import atomic_dir, write_json_atomic
from onnxpipe.benchworker import DEFAULT_SIZE
from onnxpipe.bundle import (
    MANIFEST,
    PARITY_FILE,
    check_out_dir,
    load_parity_samples,
    open_bundle,
    write_failure_report,
)
from onnxpipe.bundle_ops import bundle_inputs
from onnxpipe.card import write_docs
from onnxpipe.converters.base import InputSpec
from onnxpipe.data import fitted, parity_feeds, recorded_sizes, samples_in, sized_like
from onnxpipe.errors import GateFailed, InputError
from onnxpipe.graphs.quant_utils import plain_initializers
from onnxpipe.modelio import MODEL_FILE, random_outputs, sha256
from onnxpipe.ort_mobile import (
    CONFIG_FILE,
    LEVELS,
    MOBILE_DIR,
    ORT_FILE,
    check_mobile_ops,
    check_mobile_tensors,
    parse_fixed_shapes,
    resolve_level,
    to_ort_format,
)
from onnxpipe.parity import measure_parity
from onnxpipe.runtime import ORT_ERRORS

logger = logging.getLogger(__name__)


def _dynamic_counts(analysis: dict[str, Any]) -> str:
    """What dynamic inputs did to the NNAPI/CoreML counts, as the counts show it.

    ORT's checker leaves out the nodes on dynamic shapes: on a plain float CNN that is every
    node, but an fp16 MLP kept 4 of 8 and an int8 CNN at level basic 6 of 20 on NNAPI.
    """
    counts = [(analysis.get(ep) or {}).get("nodes_supported") for ep in ("nnapi", "coreml")]
    if not any(counts):
        return "the counts are 0 for that reason"
    return "the counts leave out every node on a dynamic shape"


def package_mobile(
    bundle: Path,
    out: Path,
    fixed_shapes: Sequence[str] = (),
    level: str = "auto",
    overwrite: bool = False,
    atol: float = 1e-4,
) -> dict[str, Any]:
    """Write ``out``: the bundle plus ``mobile/``; manifest ``mobile`` and ``validation.mobile``.

    Raises:
        InputError: bad ``--fixed-shape``, ops no mobile build has, ORT conversion failure.
        GateFailed: the ``.ort`` model disagrees with the ``.onnx`` one.
    """
    from onnxruntime.tools.onnx_model_utils import (  # noqa: PLC0415
        fix_output_shapes,
        make_input_shape_fixed,
    )

    from onnxpipe.runtime import SessionOptions, make_session  # noqa: PLC0415

    if level not in LEVELS:
        raise InputError(f"--level {level!r}: use one of {', '.join(LEVELS)}.")
    started = time.perf_counter()
    manifest = open_bundle(bundle)
    check_out_dir(out, overwrite, protect=(bundle,))
    inputs = bundle_inputs(manifest)
    fixed = parse_fixed_shapes(fixed_shapes, inputs)
    model = onnx.load(str(bundle / MODEL_FILE))
    check_mobile_ops(model, bundle / MODEL_FILE)
    check_mobile_tensors(model, bundle / MODEL_FILE)
    level, level_note = resolve_level(level, model)
    with tempfile.TemporaryDirectory(prefix="onnxpipe-mobile-") as scratch:
        source = Path(scratch) / MODEL_FILE
        plain_initializers(model)
        if fixed:
            for name, dims in fixed.items():
                make_input_shape_fixed(model.graph, name, dims)
            fix_output_shapes(model)
        onnx.save(model, str(source))
        with atomic_dir(out, overwrite) as tmp:
            for item in bundle.iterdir():
                if item.is_file():
                    shutil.copy2(item, tmp / item.name)
            try:
                ort_path, config_path, analysis = to_ort_format(source, tmp / MOBILE_DIR, level)
            except InputError as e:  # name the bundle, not the scratch copy
                reason = str(e).removeprefix(f"{source}: ")
                hint = (
                    f" The model may not run at --fixed-shape {' '.join(fixed_shapes)}: give "
                    "sizes it takes (those it was converted or validated at)."
                    if fixed
                    else ""
                )
                raise InputError(f"{bundle / MODEL_FILE}: {reason.rstrip('.')}.{hint}") from e
            feeds, repeated = _mobile_feeds(bundle, inputs, fixed)
            reference = make_session(source, SessionOptions(level=level))
            mobile = make_session(ort_path, SessionOptions())
            names = [o.name for o in reference.get_outputs()]
            parity = measure_parity(
                lambda f: list(reference.run(None, f)),
                lambda f: _run(mobile, f),
                feeds,
                names,
                atol,
                random_outputs(source),
            )
            validation = {
                "status": "passed" if parity["passed"] else "failed",
                "reason": None if parity["passed"] else (parity["errors"] or ["max abs diff"])[0],
                "reference": "model.onnx on ORT CPU",
                "samples": samples_in(feeds) - repeated,  # those that fit the packaged shapes
                "max_abs_diff": parity["max_abs_diff"],
                "cosine": parity["cosine"],
            }
            if not parity["passed"]:
                message = (
                    f"{ort_path.name} disagrees with {MODEL_FILE}: "
                    f"{validation['reason']} (max abs {parity['max_abs_diff']})."
                )
                config = {"target": "mobile", "fixed_shapes": fixed, "level": level}
                record = {"failed_step": "package", "error": message, "config": config,
                          "metrics": {"parity": parity}}  # fmt: skip
                report = write_failure_report(out, record)
                raise GateFailed(
                    f"{message} Nothing was written at {out}; numbers: {report}",
                    metrics={"parity": parity},
                    report=record,
                )
            # the bundle's input specs, less those --fixed-shape fixed
            dynamic = {s.name: list(s.shape) for s in inputs if s.symbols and s.name not in fixed}
            sizes = dict(recorded_sizes(inputs, manifest))
            section = {
                "ort_file": f"{MOBILE_DIR}/{ORT_FILE}",
                "operators_config": f"{MOBILE_DIR}/{CONFIG_FILE}",
                "fixed_shapes": fixed,
                "optimization_level": level,
                "ort_bytes": ort_path.stat().st_size,
                "ort_sha256": sha256(ort_path),
                "operators_config_sha256": sha256(config_path),
                "operators": [
                    ln
                    for ln in config_path.read_text().splitlines()
                    if ln and not ln.startswith("#")
                ],
                **analysis,
            }
            if level_note:
                section["level_note"] = level_note
            if dynamic:
                section["dynamic_inputs"] = dynamic
                section["hint"] = (
                    f"NNAPI and CoreML take fixed input shapes only ({_dynamic_counts(analysis)}):"
                    " package with "
                    + " ".join(
                        f"--fixed-shape {n}:{_fixed_example(d, sizes)}" for n, d in dynamic.items()
                    )
                )
            manifest["mobile"] = section
            _drop_mobile_timings(manifest)
            manifest.setdefault("validation", {})["mobile"] = validation
            manifest.setdefault("steps", []).append(
                {
                    "name": "package",
                    "config": {"target": "mobile", "fixed_shapes": fixed, "level": level},
                    "seconds": round(time.perf_counter() - started, 3),
                    "metrics": {
                        "max_abs_diff": parity["max_abs_diff"],
                        **{f"{ep}_partitions": a["partitions"] for ep, a in analysis.items()},
                    },
                }
            )
            write_json_atomic(tmp / MANIFEST, manifest)
            write_docs(tmp, manifest)
    return manifest


def _drop_mobile_timings(manifest: dict[str, Any]) -> None:
    """Forget ``bench --ep mobile`` records: they timed the ``model.ort`` this one replaces.

    A packaged bundle packaged again at batch 2 kept its batch-1 package's timing in the card.
    """
    records = [r for r in manifest.get("bench_records") or [] if r.get("ep") != "mobile"]
    if "bench_records" in manifest:
        manifest["bench_records"] = records
        if not records:
            del manifest["bench_records"]
    if (manifest.get("bench") or {}).get("ep") == "mobile":
        if records:
            manifest["bench"] = records[0]
        else:
            del manifest["bench"]


def _fixed_example(dims: Sequence[int | str], sizes: dict[str, int]) -> str:
    """``1,3,224,224`` for ``[batch, 3, 224, 224]``; ``1,128`` for ``[batch, seq]``.

    The batch is 1; another symbolic dim takes the size the bundle was timed at
    (:func:`~onnxpipe.data.recorded_sizes`), else the benchmark's 8: a sequence of 1 token
    is no example to follow.
    """
    return ",".join(
        str(d) if isinstance(d, int) else "1" if i == 0 else str(sizes.get(d, DEFAULT_SIZE))
        for i, d in enumerate(dims)
    )


def _run(session: Any, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    try:
        return list(session.run(None, feeds))
    except ORT_ERRORS as e:
        raise RuntimeError(str(e).splitlines()[0]) from e


def _mobile_feeds(
    bundle: Path, inputs: Sequence[InputSpec], fixed: dict[str, list[int]]
) -> tuple[list[dict[str, np.ndarray]], int]:
    """Stored samples that fit the fixed shapes, plus generated ones at those shapes.

    Stored samples are cut into a fixed batch, as ``validate --ep mobile`` does: a derived
    bundle stores its eval data 8 to a batch, and packaged at batch 1 its .ort model was
    proven on 8 generated samples only. The count of samples repeated to fill up the last
    batch comes back too.
    """
    specs = [replace(s, shape=tuple(fixed.get(s.name, s.shape))) for s in inputs]
    stored = (
        [feeds for feeds, _ in load_parity_samples(bundle)]
        if (bundle / PARITY_FILE).exists()
        else []
    )
    fits, repeated = [], 0
    for feeds in stored:
        if (cut := fitted(feeds, fixed)) is not None:
            fits += cut[0]
            repeated += cut[1]
    return fits + parity_feeds(sized_like(specs, stored)), repeated
