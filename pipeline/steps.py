"""Recipe steps: each is a frozen config plus ``run(work)``; a recipe runs them in order.

Steps build a bundle in a temp dir (:class:`Work`); the recipe renames it into place only
after the last step, so a failed step leaves nothing behind. A failure names the step that
failed and the steps that ran before it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator

from onnxpipe.bench import MAX_THREADS, BenchConfig, bench_model, parse_sizes
from onnxpipe.bundle import save_parity_samples, versions
from onnxpipe.converters.base import ConvertConfig, InputSpec
from onnxpipe.data import data_sizes, load_data
from onnxpipe.errors import GateFailed, InputError, invalid_settings
from onnxpipe.modelio import DATA_FILE, MODEL_FILE
from onnxpipe.validate import parse_eps, source_tolerance, validate_bundle

logger = logging.getLogger(__name__)


@dataclass
class Work:
    """The bundle being built: its directory, manifest so far and input specs."""

    dir: Path
    manifest: dict[str, Any] = field(default_factory=dict)
    inputs: list[InputSpec] = field(default_factory=list)
    sizes: tuple[tuple[str, int], ...] = ()
    """Sizes the user's --data gives dynamic dims other than the batch: what bench times at."""
    data: str | None = None
    """convert's --data: bench times on it (a model may refuse generated values)."""

    def record_step(self, name: str, config: BaseModel, seconds: float, metrics: dict) -> None:
        """Append ``{name, config, seconds, metrics}`` to the manifest's ``steps``."""
        self.manifest.setdefault("steps", []).append(
            {
                "name": name,
                "config": config.model_dump(mode="json"),
                "seconds": round(seconds, 3),
                "metrics": metrics,
            }
        )


Atol = Annotated[
    float, Field(gt=0, allow_inf_nan=False, description="Parity tolerance, scaled by magnitude.")
]
"""A parity tolerance: finite and above 0 (``--atol inf`` passed parity at max abs 969)."""


class StepConfig(BaseModel):
    """Base of every step's settings: frozen, no unknown keys, JSON-serialisable."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    name: ClassVar[str]

    def run(self, work: Work) -> None:
        """Apply the step to the bundle being built."""
        raise NotImplementedError(type(self).__name__)


class ConvertStep(StepConfig):
    """Convert a framework model (or ONNX file) and prove parity against its source."""

    name: ClassVar[str] = "convert"
    source: str = Field(description="SOURCE: module:callable, file.py:callable or a model path.")
    framework: Literal["auto", "torch", "tf", "onnx"] = Field(
        default="auto", description="Source framework; auto detects it."
    )
    inputs: tuple[str, ...] = Field(default=(), description="Input specs name:dtype[dims].")
    opset: int | None = Field(
        default=None, ge=7, le=23, description="Target opset; None = exporter default."
    )
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        default="auto", description="PyTorch exporter; auto = dynamo, then TorchScript."
    )
    nchw: bool = Field(default=False, description="NCHW image inputs for TensorFlow models.")
    atol: Atol = 1e-4
    data: str | None = Field(default=None, description="User DATA for parity, besides generated.")
    unsafe_load: bool = Field(default=False, description="Allow full-pickle loading.")
    signature: str | None = Field(
        default=None, min_length=1, description="TensorFlow SavedModel signature to convert."
    )

    @field_validator("source")
    @classmethod
    def _named(cls, value: str) -> str:
        """An empty source read as the working directory ("is a directory, not a SavedModel")."""
        if not value.strip():
            raise ValueError(
                "is empty: give the model, as module:callable, file.py:callable or a model path"
            )
        return value

    def run(self, work: Work, source_object: object | None = None) -> None:
        """Convert into ``work.dir`` and fill the model, I/O, source and parity records.

        Args:
            work: the bundle being built.
            source_object: an in-memory model (Python API) to use instead of ``source``.
        """
        from onnxpipe.convert import convert  # noqa: PLC0415 - pulls in the converter registry

        config = ConvertConfig(
            inputs=self.inputs,
            opset=self.opset,
            exporter=self.exporter,
            nchw=self.nchw,
            unsafe_load=self.unsafe_load,
            signature=self.signature,
        )
        with tempfile.TemporaryDirectory(prefix="onnxpipe-convert-") as tmp:
            done = convert(
                source_object if source_object is not None else self.source,
                config,
                Path(tmp),
                self.framework,
                self.atol,
                self.data,
            )
            for name in (MODEL_FILE, DATA_FILE):
                if (done.model_path.parent / name).exists():
                    shutil.move(str(done.model_path.parent / name), work.dir / name)
        kept = save_parity_samples(
            work.dir, [f for f, _ in done.samples], [o for _, o in done.samples]
        )
        result = done.result
        work.inputs = result.inputs
        work.manifest["source"] = {
            "framework": result.framework,
            "exporter": result.exporter,
            "fallback_reason": result.fallback_reason,
            "notes": list(result.notes),
            "path": self.source,
            "attempts": done.attempts,
        }
        if self.data:  # real sizes (224x224 photos): what later timing uses, not 8x8 pixels
            work.data = self.data
            work.sizes = data_sizes(result.inputs, load_data(self.data, result.inputs))
            if work.sizes:
                work.manifest["source"]["data_sizes"] = dict(work.sizes)
        work.manifest["parity"] = {**done.parity, "stored_samples": kept}
        work.manifest["versions"] = versions(result.framework)
        work.record_step(
            self.name,
            self,
            done.seconds,
            {
                "exporter": result.exporter,
                "max_abs_diff": done.parity["max_abs_diff"],
                "passed": done.parity["passed"],
            },
        )


def _eps(value: Any) -> Any:
    """``cpu,cuda`` or ``[cpu, cuda]`` in a recipe: checked EP names (others left to pydantic)."""
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    return tuple(parse_eps(value)) if isinstance(value, str) else value


class ValidateStep(StepConfig):
    """Checker and parity on each EP; ``unavailable`` EPs fail only when required."""

    name: ClassVar[str] = "validate"
    ep: tuple[str, ...] = Field(default=("cpu",), description="EPs to validate on.")
    require: tuple[str, ...] = Field(default=(), description="EPs whose absence is a failure.")
    data: str | None = Field(default=None, description="User DATA for parity.")
    atol: Atol = 1e-4

    @field_validator("ep", "require", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _eps(value)

    def run(self, work: Work) -> None:
        """Fill ``validation.<ep>``; raise :class:`GateFailed` on a failed or required EP."""
        started = time.perf_counter()
        atol = source_tolerance(work.manifest, self.atol)
        results = validate_bundle(
            work.dir, self.ep, work.inputs, self.data, atol, self.require, work.manifest
        )
        work.manifest.setdefault("validation", {}).update(results)
        work.record_step(
            self.name,
            self,
            time.perf_counter() - started,
            {ep: r["status"] for ep, r in results.items()},
        )
        raise_on_failed_validation(results, self.require)


def raise_on_failed_validation(
    results: dict[str, dict[str, Any]], require: tuple[str, ...]
) -> None:
    """Raise :class:`GateFailed` for failed EPs, and for ``unavailable`` ones in ``require``."""
    bad = {
        ep: r
        for ep, r in results.items()
        if r["status"] == "failed" or (r["status"] == "unavailable" and ep in require)
    }
    if bad:
        detail = "; ".join(f"{ep}: {r['status']} ({r['reason']})" for ep, r in bad.items())
        raise GateFailed(f"validation failed: {detail}", metrics={"validation": results})


class BenchStep(StepConfig):
    """Latency on ORT: p50/p90/p99, throughput, session-create time, peak RSS."""

    name: ClassVar[str] = "bench"
    ep: tuple[str, ...] = Field(default=("cpu",), description="EPs to time.")
    batch: tuple[Annotated[int, Field(strict=True, ge=1)], ...] = Field(
        default=(1,), min_length=1, description="Batch sizes (first symbolic dim)."
    )
    threads: tuple[Annotated[int, Field(strict=True, ge=0, le=MAX_THREADS)], ...] = Field(
        default=(0,),
        min_length=1,
        description="intra-op threads; 0 = ORT default (see bench.MAX_THREADS).",
    )
    runs: int = Field(default=50, ge=1, description="Timed runs per configuration.")
    warmup: int = Field(default=5, ge=0, description="Untimed runs first.")
    size: dict[str, PositiveInt] = Field(
        default_factory=dict,
        description="Sizes of dynamic dims other than the batch (default 8), e.g. {seq: 128}.",
    )
    data: str | None = Field(
        default=None,
        description="DATA to time on instead of generated values (default: convert's --data).",
    )

    @field_validator("ep", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _eps(value)

    @field_validator("size", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        """The CLI's spelling too: ``[seq=16]`` (or ``seq=16``) as ``{seq: 16}``."""
        texts = [value] if isinstance(value, str) else value
        if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
            return value
        try:
            return dict(parse_sizes(texts))
        except ValueError as e:
            raise ValueError(
                f"{value!r}: write {{SYMBOL: N}} or [SYMBOL=N] with N >= 1, e.g. size: "
                "{seq: 128} or size: [seq=128]"
            ) from e

    def run(self, work: Work) -> None:
        """Fill ``bench`` (the first record) and ``bench_records`` (earlier steps' too)."""
        started = time.perf_counter()
        config = BenchConfig(
            eps=self.ep,
            batches=self.batch,
            threads=self.threads,
            runs=self.runs,
            warmup=self.warmup,
            sizes=tuple(self.size.items()),
            recorded=work.sizes,
            data=self.data or (None if self.size else work.data),
            recipe=bool(self.size),  # given in a recipe: its messages say size, not --size
        )
        records = bench_model(work.dir / MODEL_FILE, [s.to_json() for s in work.inputs], config)
        work.manifest["bench"] = records[0]
        # an earlier bench step's records time this model too (a step that changes the model
        # drops them): a recipe's 'bench cpu' then 'bench mobile' kept only the second
        new = {_config_key(r) for r in records}
        earlier = [r for r in work.manifest.get("bench_records", []) if _config_key(r) not in new]
        work.manifest["bench_records"] = earlier + records
        work.record_step(
            self.name,
            self,
            time.perf_counter() - started,
            {"p50_ms": records[0]["latency_ms"]["p50"]},
        )


def _config_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """What one bench record timed: EP, batch, threads and input shapes."""
    shapes = sorted((k, tuple(v)) for k, v in (record.get("shapes") or {}).items())
    return record["ep"], record["batch"], record.get("threads"), tuple(shapes)


STEPS: dict[str, type[StepConfig]] = {
    "convert": ConvertStep,
    "validate": ValidateStep,
    "bench": BenchStep,
}


def make_step(
    name: str,
    settings: dict[str, Any],
    where: str = "",
    place: Callable[[Sequence[object]], str] | None = None,
) -> StepConfig:
    """Build a step from its recipe entry.

    ``where`` (the recipe file) starts each message; ``place`` names a field as the recipe
    spells it (see :func:`~onnxpipe.errors.invalid_settings`).

    Raises:
        InputError: unknown step name or invalid settings.
    """
    from onnxpipe.derived_steps import DERIVED_STEPS  # noqa: PLC0415 - they import this module

    steps = {**STEPS, **DERIVED_STEPS}
    at = f"{where}: " if where else ""
    if place is not None:
        at += f"{place(())}: "
    if name not in steps:
        raise InputError(f"{at}unknown step {name!r}; steps are: {', '.join(steps)}.")
    try:
        return steps[name](**settings)
    except ValueError as e:  # pydantic's ValidationError is a ValueError
        what = where or f"step {name!r}: invalid settings"
        raise invalid_settings(what, e, place=place) from e
    except InputError as e:  # a validator's own refusal: a gate, a ratio, a data path
        raise InputError(f"{at}{e}") from e
