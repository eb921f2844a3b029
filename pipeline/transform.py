"""Derive a new bundle from an existing one by an ONNX -> ONNX transform, behind a gate.

Used by every optimization command (optimize, quantize, prune). The input bundle is never
touched; the result is built in a temp dir and appears only if the gate holds. The step's
manifest record carries size, latency (before and after, measured in the same run) and the
gate metrics against the input model.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
from pydantic import BaseModel

from onnxpipe.atomic import atomic_dir
from onnxpipe.bench import BenchConfig, bench_model
from onnxpipe.bundle import (
    check_out_dir,
    input_paths,
    load_parity_samples,
    open_bundle,
    save_parity_samples,
    write_failure_report,
)
from onnxpipe.bundle_ops import bundle_inputs
from onnxpipe.converters.base import InputSpec
from onnxpipe.data import (
    Feeds,
    check_table_ids,
    data_sizes,
    load_data,
    parity_feeds,
    recorded_sizes,
    sized_like,
)
from onnxpipe.errors import GateFailed, InputError, PassError
from onnxpipe.gate import Gate, check_applicable, enforce, gate_metrics, output_drift
from onnxpipe.modelio import DATA_FILE, MODEL_FILE, random_outputs, save_model, sha256
from onnxpipe.recipe import finalize
from onnxpipe.runtime import ORT_ERRORS, SessionOptions, make_session
from onnxpipe.steps import Work
from onnxpipe.validate import validate_bundle

logger = logging.getLogger(__name__)

Outputs = list[np.ndarray]


@dataclass
class TransformContext:
    """What a transform may use: the input bundle, its specs and the eval feeds."""

    bundle: Path
    manifest: dict[str, Any]
    inputs: list[InputSpec]
    eval_feeds: list[Feeds]
    scratch: Path
    random: dict[str, str] = field(default_factory=dict)  # output -> the random op it depends on
    eval_source: str = "the bundle's samples"
    _reference: list[Outputs] | None = field(default=None, repr=False)
    _latest: dict[str, tuple[list[str], list[Outputs]]] = field(default_factory=dict, repr=False)

    def run(
        self,
        model: ir.Model | Path,
        feeds: Sequence[Feeds] | None = None,
        every: bool = False,
        keep: bool = True,
    ) -> list[Outputs]:
        """Outputs of ``model`` on ORT CPU for every eval feed (or for ``feeds``).

        Outputs that depend on a random op are left out (they differ on every run, so no
        gate can measure them) unless ``every``. Without ``keep`` each batch's outputs are
        dropped as soon as it ran (a check that the model runs; returns an empty list).
        The latest model's outputs on the eval feeds are kept: a step measures its result,
        then records it as parity samples, and ``optimize`` checks it first (one run, not 3).
        """
        path = model if isinstance(model, Path) else self.save(model, "candidate")
        key = _model_digest(path) if feeds is None and keep else ""
        if key and key in self._latest:
            names, outputs = self._latest[key]
        else:
            names, outputs = self._run_all(path, feeds or self.eval_feeds, keep)
            if key:
                self._latest = {key: (names, outputs)}
        if every:
            return outputs
        kept = [i for i, name in enumerate(names) if name not in self.random]
        return [[batch[i] for i in kept] for batch in outputs]

    def _run_all(
        self, path: Path, feeds: Sequence[Feeds], keep: bool
    ) -> tuple[list[str], list[Outputs]]:
        """The output names of the model at ``path`` and all its outputs on ``feeds``."""
        try:
            session = make_session(path, SessionOptions(ep="cpu"))
            names = [o.name for o in session.get_outputs()]
            outputs = []
            for feed in feeds:
                ran = list(session.run(names, dict(feed)))
                if keep:
                    outputs.append(ran)
            return names, outputs
        except ORT_ERRORS as e:
            raise InputError(f"{path}: ONNX Runtime cannot run the model: {e}") from e

    def reference(self) -> list[Outputs]:
        """Outputs of the input bundle's model on the eval feeds (computed once)."""
        if self._reference is None:
            self._reference = self.outputs_on(self.eval_feeds, self.eval_source)
        return self._reference

    def outputs_on(self, feeds: Sequence[Feeds], source: str, keep: bool = True) -> list[Outputs]:
        """The input bundle's model on user data ``source`` (``keep``: see :meth:`run`).

        Raises:
            InputError: ORT cannot run the model on it (e.g. token ids past the vocabulary),
                naming ``source``.
        """
        try:
            return self.run(self.bundle / MODEL_FILE, feeds, keep=keep)
        except InputError as e:
            raise InputError(
                f"{source}: the input model fails on this data ({e.__cause__ or e}). Check "
                "its values, e.g. token ids within the vocabulary, indices within range."
            ) from e

    def measure(self, model: ir.Model | Path) -> dict[str, Any]:
        """Gate metrics of ``model`` against the input model on the eval feeds."""
        return self._metrics(self.run(model))

    def _metrics(self, outputs: list[Outputs]) -> dict[str, Any]:
        masks = [f.get("attention_mask") for f in self.eval_feeds]
        return gate_metrics(self.reference(), outputs, masks)

    def drift(self, model: ir.Model) -> tuple[str, float, float, dict[str, Any]]:
        """The output of ``model`` that moved most from the input model's, for the eval feeds.

        Returns its name, how far it moved, the most a rewrite that keeps the math may move it
        (:data:`PRESERVED_RTOL` of its largest reference value, at least of 1) and the gate
        metrics. "Most" is relative to each output's limit.
        """
        outputs = self.run(self.save(model, "rewritten"))
        gate = self._metrics(outputs)
        names = [str(v.name) for v in model.graph.outputs if v.name not in self.random]
        found = [
            (name, moved, PRESERVED_RTOL * max(1.0, scale))
            for name, (moved, scale) in zip(
                names, output_drift(self.reference(), outputs), strict=True
            )
        ]
        name, moved, limit = max(found, key=lambda f: f[1] / f[2], default=("", 0.0, 1.0))
        return name, moved, limit, gate

    def save(self, model: ir.Model, name: str) -> Path:
        """Save ``model`` under the scratch dir (``name/model.onnx``) and return its path."""
        directory = self.scratch / name
        directory.mkdir(parents=True, exist_ok=True)
        return save_model(model, directory)[0]


def _model_digest(path: Path) -> str:
    """sha256 of the model file and its external data file, if any."""
    data = path.parent / DATA_FILE
    return sha256(path) + (sha256(data) if data.exists() else "")


PRESERVED_RTOL = 1e-4
"""A rewrite that keeps the math (cleanup, fusions) moves outputs by float rounding only.

Measured: ORT's attention fusion of a 2-layer BERT moved them 8e-7; given 8 heads for its 4,
0.16 (the fused Attention splits the hidden size into the wrong heads).
"""


Transform = Callable[[ir.Model, TransformContext], tuple[ir.Model, dict[str, Any]]]


def load_bundle_model(bundle: Path) -> ir.Model:
    """The bundle's model with its external data in memory."""
    return ir.external_data.load_to_model(ir.load(bundle / MODEL_FILE))


GENERATED_NOTE = (
    "without --eval: the bundle's stored samples and generated random inputs, on which a "
    "model can fail a gate it holds on real data; give --eval DATA"
)


def eval_feeds(bundle: Path, inputs: Sequence[InputSpec], data: str | None) -> list[Feeds]:
    """``--eval`` data when given, else the bundle's stored samples plus generated ones."""
    if data:
        return load_data(data, inputs)
    stored = [feeds for feeds, _ in load_parity_samples(bundle)]
    return stored + parity_feeds(sized_like(inputs, stored))


def derive_bundle(
    bundle: Path,
    out: Path,
    step_name: str,
    step_config: BaseModel,
    transform: Transform,
    gates: Sequence[Gate] = (),
    eval_data: str | None = None,
    overwrite: bool = False,
    bench_runs: int = 30,
) -> dict[str, Any]:
    """Apply ``transform`` to ``bundle``'s model and write the result as bundle ``out``.

    Raises:
        InputError: ``bundle`` is not a bundle, ``out`` is taken, or the data does not fit.
        GateFailed: the result misses a gate; nothing is written at ``out`` and the numbers
            go to ``<out>.failed.json``.
    """
    manifest = open_bundle(bundle)
    check_out_dir(out, overwrite, protect=(bundle, *input_paths(step_config, eval_data)))
    inputs = bundle_inputs(manifest)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="onnxpipe-derive-") as scratch:
        ctx = TransformContext(
            bundle, manifest, inputs, eval_feeds(bundle, inputs, eval_data), Path(scratch),
            _measurable_outputs(bundle / MODEL_FILE, step_name),
            eval_data or "the bundle's samples",
        )  # fmt: skip
        if gates or eval_data:  # --eval data the input model cannot run is bad input, up front
            if eval_data:
                check_table_ids(ctx.eval_feeds, bundle / MODEL_FILE, eval_data)
            reference = ctx.reference()
            if gates:  # as is a gate the outputs cannot measure, before any search
                check_applicable(gates, reference)
        metrics: dict[str, Any] = {}
        try:
            # A gated search inside the transform fails here too, before the final check.
            model, metrics = transform(load_bundle_model(bundle), ctx)
            candidate = ctx.save(model, "result")
            gate = ctx.measure(candidate)
            metrics["gate"] = {"gates": [str(g) for g in gates], **gate}
            _require_finite(gate, step_name)
            enforce(gates, gate, step_name, None if eval_data else GENERATED_NOTE)
            sizes = (
                data_sizes(inputs, ctx.eval_feeds)
                if eval_data
                else recorded_sizes(inputs, manifest)
            )
            metrics.update(_before_after(bundle / MODEL_FILE, candidate, inputs, bench_runs, sizes))
            with atomic_dir(out, overwrite) as tmp:
                save_model(model, tmp)
                outputs = ctx.run(tmp / MODEL_FILE, every=True)
                save_parity_samples(tmp, ctx.eval_feeds, outputs)
                work = Work(dir=tmp, manifest=_carry(manifest), inputs=inputs)
                work.manifest["parity"] = _parity_record(
                    manifest, gate, gates, ctx.random, eval_data
                )
                work.record_step(step_name, step_config, time.perf_counter() - started, metrics)
                work.manifest["validation"] = validate_bundle(
                    tmp, ["cpu"], inputs, manifest=work.manifest
                )
                _require_valid(work.manifest["validation"]["cpu"], step_name)
                work.manifest["bench"] = metrics.pop("_bench_after")
                result = finalize(work)
        except PassError as e:  # the step refused this model: say which bundle holds it
            raise PassError(f"{bundle / MODEL_FILE}: {e}") from e
        except GateFailed as e:
            numbers = metrics or e.metrics
            record = {
                "failed_step": step_name,
                "error": str(e),
                "config": step_config.model_dump(mode="json"),
                "metrics": numbers,
            }
            report = write_failure_report(out, record)
            raise GateFailed(
                f"{e} Nothing was written at {out}; numbers: {report}", numbers, record
            ) from e
    return result


def _require_finite(gate: dict[str, Any], step_name: str) -> None:
    """GateFailed when the result has NaN or infinite outputs where the input model has not.

    Gated or not, that model is broken: an fp16 SqueezeNet whose every output was NaN
    (activations of 9e9 past float16's 65504) was written with exit 0.
    """
    if math.isinf(gate["max_abs"]):
        raise GateFailed(
            f"{step_name}: the result outputs NaN or infinity where the input model's outputs "
            f"are finite (on {gate['samples']} samples): it is broken. With float16, values "
            "past 65504 overflow: keep the ops that produce them in float32 (--exclude).",
            gate,
        )


def _require_valid(record: dict[str, Any], step_name: str) -> None:
    """GateFailed when the result fails ``validate`` on the CPU (a broken model is no result)."""
    if record["status"] == "failed":
        raise GateFailed(
            f"{step_name}: the result fails validation on cpu ({record['reason']}).", record
        )


def _measurable_outputs(model: Path, step_name: str) -> dict[str, str]:
    """The model's random outputs (see ``random_outputs``); InputError when all are."""
    loaded = ir.load(model)
    random = random_outputs(loaded)
    if random and len(random) == len(loaded.graph.outputs):
        ops = ", ".join(sorted(set(random.values())))
        raise InputError(
            f"{model}: every output depends on a random op ({ops}), so {step_name} cannot be "
            "measured against the input model. Feed the noise as a model input instead "
            "(export with the random tensor as an argument), then run it again."
        )
    return random


INPUT_MODEL = "input bundle model"
"""What a derived bundle's parity is measured against (a recipe names its own model instead)."""


def _carry(manifest: dict[str, Any]) -> dict[str, Any]:
    """What a derived bundle inherits: source, versions and the steps so far."""
    keep = ("title", "source", "versions", "steps")
    return {k: manifest[k] for k in keep if k in manifest} | {"steps": list(manifest["steps"])}


def _parity_record(
    manifest: dict[str, Any],
    gate: dict[str, Any],
    gates: Sequence[Gate],
    random: dict[str, str],
    eval_data: str | None,
) -> dict:
    data = f"--eval {eval_data}" if eval_data else "its stored samples plus generated ones"
    return {
        "reference": f"{INPUT_MODEL} (sha256 {manifest['model']['sha256'][:12]}) on {data}",
        "samples": gate["samples"],
        "max_abs_diff": gate["max_abs"],
        "max_rel_diff": None,
        "cosine": gate["cosine"],
        "top1_agreement": gate["top1"],
        "kl": gate["kl"],
        "tolerance": [str(g) for g in gates] or None,
        "passed": all(g.passes(gate) for g in gates) if gates else None,
        **({"not_compared": random} if random else {}),
        **({"constant_reference": True} if gate.get("constant_reference") else {}),
        "source_parity": manifest.get("parity"),
    }


def _before_after(
    before: Path,
    after: Path,
    inputs: Sequence[InputSpec],
    runs: int,
    sizes: tuple[tuple[str, int], ...] = (),
) -> dict:
    """Size and batch-1 CPU latency of both models, measured back to back.

    Dynamic dims other than the batch are timed at ``sizes`` (the --eval data's), else at
    the benchmark's default.

    The input model is timed before and after the output model (A B A), each in a fresh
    process, and its two medians averaged: load drifting on a shared machine during the
    three runs then hits both sides alike instead of showing as a speed ratio.
    """
    specs = [s.to_json() for s in inputs]
    config = BenchConfig(runs=runs, warmup=5, sizes=sizes)
    first = bench_model(before, specs, config)[0]
    second = bench_model(after, specs, config)[0]
    again = bench_model(before, specs, config)[0]
    p50_before = (first["latency_ms"]["p50"] + again["latency_ms"]["p50"]) / 2
    size_before = sum(p.stat().st_size for p in before.parent.glob("model.onnx*"))
    size_after = sum(p.stat().st_size for p in after.parent.glob("model.onnx*"))
    return {
        "bytes_before": size_before,
        "bytes_after": size_after,
        "size_ratio": size_before / max(size_after, 1),
        "p50_ms_before": p50_before,
        "p50_ms_after": second["latency_ms"]["p50"],
        "speedup": p50_before / second["latency_ms"]["p50"],
        "_bench_after": second,
    }
