"""Recipe steps that derive the bundle: ``optimize``, ``quantize``, ``prune`` and ``package``.

Each runs the same code as its command (``onnxpipe quantize`` ...), gate included, on the
bundle being built, and takes over the derived bundle's model, step record, parity,
validation and bench. A recipe entry holds the command's options by their long names::

    - quantize: {mode: static, calib: calib/, preprocess: "resize=256,crop=224,...",
                 eval: eval/, auto: true, gate: "top1>=0.97"}
    - prune: {method: channels, ratio: 0.3, eval: eval/, gate: "top1>=0.9"}
    - optimize: {level: extended}
    - package: {target: mobile, fixed_shape: ["input:1,3,224,224"]}

``package`` packs the model as it stands, so it comes after every step that changes it.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError, ValidationError

from onnxpipe.errors import GateFailed, InputError
from onnxpipe.modelio import MODEL_FILE
from onnxpipe.steps import StepConfig, Work

Derive = Callable[[Path, Path], dict[str, Any]]
# What finalize() writes afresh for the recipe's bundle; the rest of a manifest carries over.
_DESCRIBED = ("schema", "model", "inputs", "outputs")


GATE_FORMS = (
    "a quoted METRIC>=VALUE or METRIC<=VALUE, or a list of them, e.g. gate: 'top1>=0.98' or "
    "gate: ['cosine>=0.995', 'max_abs<=1e-3'] (METRIC one of top1, cosine (>=), max_abs, kl (<=))"
)
"""The forms a recipe's ``gate`` takes, for messages."""


def _located(key: str, text: str, value: Any = None, packed: bool = True) -> ValidationError:
    """A refusal of the setting ``key``, located at it, which a ValueError would not be.

    pydantic places a validator's ValueError at the validated field (``settings``); messages
    name ``steps[N].STEP.KEY`` from this location. ``packed``: raised before the settings
    are packed (a model validator); a validator of ``settings`` is located in it already.
    """
    error = PydanticCustomError("setting", "{text}", {"text": text})
    loc = ("settings", key) if packed else (key,)
    return ValidationError.from_exception_data(
        "settings", [{"type": error, "loc": loc, "input": value}]
    )


def _gates(value: Any) -> Any:
    """``gate: "top1>=0.9"`` or ``gate: [..]`` in a recipe, as the settings' ``gates`` tuple.

    Raises:
        ValueError: both ``gate`` and ``gates``, or a gate that is no text (``gate: 0.99``
            read as 'gates Input should be a valid tuple', naming neither the recipe's field
            nor the forms it takes).
        InputError: a gate text that does not parse (refused with the recipe, not after
            convert ran).
    """
    from onnxpipe.gate import Gate  # noqa: PLC0415

    keys = [k for k in ("gate", "gates") if isinstance(value, dict) and k in value]
    if not keys:
        return value
    if len(keys) == 2:
        raise ValueError("gate and gates both set the step's gates; keep one of them")
    value = dict(value)
    gate = value.pop(keys[0])
    gates = [gate] if isinstance(gate, str) else gate
    if not isinstance(gates, list | tuple) or not all(isinstance(g, str) for g in gates):
        number = isinstance(gate, int | float) and not isinstance(gate, bool)
        bare = "is a bare number, which names no metric" if number else "is not a gate"
        text = f"{gate!r} {bare}: write {GATE_FORMS}"
        raise _located(keys[0], text, gate)
    for text in gates:
        Gate.parse(text, keys[0])
    value["gates"] = gates
    return value


class DerivedStep(StepConfig):
    """Base: ``settings`` are the command's options, ``eval`` its ``--eval`` DATA."""

    own: ClassVar[tuple[str, ...]] = ("eval",)
    settings: dict[str, Any] = Field(default_factory=dict, description="the command's options")
    eval: str | None = Field(default=None, description="eval DATA for the gate")

    @model_validator(mode="before")
    @classmethod
    def _pack(cls, value: Any) -> Any:
        """A flat recipe entry: the step's own keys stay, the rest go to ``settings``."""
        if not isinstance(value, dict) or "settings" in value:
            return value
        value = _gates(value)
        own = {k: v for k, v in value.items() if k in cls.own}
        return {**own, "settings": {k: v for k, v in value.items() if k not in cls.own}}

    @field_validator("settings")
    @classmethod
    def _gates_parse(cls, value: dict[str, Any]) -> dict[str, Any]:
        """A gate that does not parse is refused with the recipe, not after convert ran."""
        from onnxpipe.gate import Gate  # noqa: PLC0415

        gates = value.get("gates") or ()
        for gate in gates if isinstance(gates, list | tuple) else [gates]:
            if isinstance(gate, str):  # other types: the step's own settings say what is wrong
                Gate.parse(gate, "gate")
        return value

    def derive(self) -> Derive:
        """``(bundle, out) -> manifest``: the command's bundle function with these settings."""
        raise NotImplementedError(type(self).__name__)

    def run(self, work: Work) -> None:
        """Run the command on ``work``'s model and take over the derived bundle."""
        from onnxpipe.recipe import finalize  # noqa: PLC0415 - recipe imports the steps
        from onnxpipe.transform import INPUT_MODEL  # noqa: PLC0415 - it imports recipe

        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix=f"onnxpipe-{self.name}-") as tmp:
            src, out = Path(tmp) / "in", Path(tmp) / "out"
            shutil.copytree(work.dir, src)
            finalize(Work(dir=src, manifest=dict(work.manifest), inputs=work.inputs))
            try:
                manifest = self.derive()(src, out)
            except GateFailed as e:
                # The command's message names its report in this temp dir, about to vanish;
                # the recipe writes its own report from these metrics.
                raise GateFailed(str(e.__cause__ or e), e.metrics) from e
            except InputError as e:  # a refusal names the model: the recipe's, not this copy
                raise type(e)(as_recipes(str(e), src)) from e
            parity = manifest.get("parity") or {}
            if isinstance(parity.get("reference"), str):  # not a bundle the user has
                before = f"the recipe's model before its {self.name} step"
                parity["reference"] = parity["reference"].replace(INPUT_MODEL, before, 1)
            for item in work.dir.iterdir():
                shutil.rmtree(item) if item.is_dir() else item.unlink()
            for item in out.iterdir():
                shutil.move(str(item), work.dir / item.name)
        work.manifest = {k: v for k, v in manifest.items() if k not in _DESCRIBED}
        work.manifest["steps"][-1]["recipe_seconds"] = round(time.perf_counter() - started, 3)


def as_recipes(text: str, scratch: Path) -> str:
    """``text`` naming the recipe's model and bundle where it names a step's ``scratch`` copy."""
    text = text.replace(str(scratch / MODEL_FILE), "the recipe's model")
    return text.replace(str(scratch), "the recipe's bundle")


class QuantizeStep(DerivedStep):
    """``quantize``: static/dynamic int8, int4 or fp16, gated (see ``onnxpipe quantize``)."""

    name: ClassVar[str] = "quantize"
    own: ClassVar[tuple[str, ...]] = ("eval", "preprocess")
    preprocess: str | None = Field(default=None, description="image preprocessing SPEC")

    @field_validator("settings")
    @classmethod
    def _valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        from onnxpipe.quantize import QuantizeSettings  # noqa: PLC0415

        # as settings_from does, but its ValidationError keeps where each error is
        QuantizeSettings(**{k: v for k, v in value.items() if v is not None})
        return value

    @model_validator(mode="after")
    def _applies(self) -> QuantizeStep:
        """Options the command refuses only once it has its model, refused with the recipe.

        ``smooth_alpha`` with no data to smooth on and ``preprocess`` with no image folder
        were exit 2 only after convert (and the steps before) had run.
        """
        from onnxpipe.quantize import (  # noqa: PLC0415
            settings_from,
            with_preprocess_all,
            without_statistics,
        )

        with_preprocess_all(self.preprocess, self.settings.get("calib"), self.eval)
        without_statistics(settings_from(**self.settings), self.eval is not None)
        return self

    def derive(self) -> Derive:
        """``quantize_bundle`` with these settings and ``preprocess`` on calib/eval images."""
        from onnxpipe.quantize import (  # noqa: PLC0415
            quantize_bundle,
            settings_from,
            with_preprocess_all,
        )

        calib, data = with_preprocess_all(self.preprocess, self.settings.get("calib"), self.eval)
        settings = settings_from(**{**self.settings, "calib": calib})
        return lambda bundle, out: quantize_bundle(bundle, out, settings, data)


class PruneStep(DerivedStep):
    """``prune``: magnitude, structured channels or low-rank, gated (see ``onnxpipe prune``)."""

    name: ClassVar[str] = "prune"

    @field_validator("settings")
    @classmethod
    def _valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        from onnxpipe.prune_settings import PruneSettings, check_ratio  # noqa: PLC0415

        check_ratio(PruneSettings(**value).ratio, "ratio")
        return value

    def derive(self) -> Derive:
        """``prune_bundle`` with these settings."""
        from onnxpipe.compress import prune_bundle  # noqa: PLC0415
        from onnxpipe.prune_settings import PruneSettings  # noqa: PLC0415

        settings = PruneSettings(**self.settings)
        return lambda bundle, out: prune_bundle(bundle, out, settings, self.eval)


class OptimizeStep(DerivedStep):
    """``optimize``: the cleanup pass (see ``onnxpipe optimize``)."""

    name: ClassVar[str] = "optimize"
    own: ClassVar[tuple[str, ...]] = ()

    @field_validator("settings")
    @classmethod
    def _valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        from onnxpipe.graphs.cleanup import CleanupConfig  # noqa: PLC0415

        CleanupConfig(**{"fold_constants": True, **value})
        return value

    def derive(self) -> Derive:
        """``optimize_bundle`` with these settings."""
        from onnxpipe.graphs.cleanup import CleanupConfig  # noqa: PLC0415
        from onnxpipe.optimize import optimize_bundle  # noqa: PLC0415

        config = CleanupConfig(**{"fold_constants": True, **self.settings})
        return lambda bundle, out: optimize_bundle(bundle, out, config)


class PackageStep(DerivedStep):
    """``package``: the mobile ORT-format package (see ``onnxpipe package``)."""

    name: ClassVar[str] = "package"
    own: ClassVar[tuple[str, ...]] = ()

    @field_validator("settings")
    @classmethod
    def _valid(cls, value: dict[str, Any]) -> dict[str, Any]:
        """Each setting checked, its error located at it (``steps[3].package.fixed_shape``)."""
        from onnxpipe.ort_mobile import LEVELS, fixed_shape_problem  # noqa: PLC0415

        unknown = sorted(set(value) - {"target", "fixed_shape", "level"})
        if unknown:
            takes = "is not a setting of it: package takes target, fixed_shape and level"
            raise _located(unknown[0], takes, value[unknown[0]], packed=False)
        if value.get("target", "mobile") != "mobile":
            raise _located(
                "target", f"{value['target']!r}: the only target is 'mobile'", packed=False
            )
        if value.get("level", "auto") not in LEVELS:
            raise _located(
                "level", f"{value['level']!r}: use one of {', '.join(LEVELS)}", packed=False
            )
        problem = fixed_shape_problem(value.get("fixed_shape", []))
        if problem:
            raise _located("fixed_shape", problem, packed=False)
        return value

    def derive(self) -> Derive:
        """``package_mobile`` with these settings."""
        from onnxpipe.mobile import package_mobile  # noqa: PLC0415

        shapes = tuple(self.settings.get("fixed_shape", ()))
        level = self.settings.get("level", "auto")
        return lambda bundle, out: package_mobile(bundle, out, shapes, level)


DERIVED_STEPS: dict[str, type[StepConfig]] = {
    "optimize": OptimizeStep,
    "quantize": QuantizeStep,
    "prune": PruneStep,
    "package": PackageStep,
}
MODEL_CHANGING = ("optimize", "quantize", "prune")
"""Steps after which an earlier ``package`` would describe a model the bundle no longer has."""
