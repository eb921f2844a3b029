"""Recipes: a YAML list of steps run in order into one bundle, which appears only when done.

```yaml
source: path/file.py:make
inputs: ["input:float32[batch,3,224,224]"]
steps:
  - convert: {exporter: auto}
  - validate: {ep: cpu}
  - bench: {batch: [1, 4], runs: 50}
```

``optimize``, ``quantize`` and ``prune`` steps (:mod:`onnxpipe.derived_steps`) take their
command's options and gates.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from onnxpipe.atomic import atomic_dir, write_json_atomic
from onnxpipe.bundle import (
    MANIFEST,
    PARITY_FILE,
    SCHEMA,
    check_out_dir,
    input_paths,
    write_failure_report,
)
from onnxpipe.card import write_docs
from onnxpipe.converters.source import importable_from, named_path
from onnxpipe.derived_steps import MODEL_CHANGING, as_recipes
from onnxpipe.errors import GateFailed, InputError, OnnxPipeError
from onnxpipe.modelio import MODEL_FILE, describe_model, io_signature, sha256
from onnxpipe.steps import ConvertStep, StepConfig, Work, make_step

logger = logging.getLogger(__name__)

Progress = Callable[[int, int, str], None]


# Recipe settings that name files: a relative one is found from the working directory, else
# from the recipe's own folder (a recipe kept beside its model and data).
PATH_KEYS = frozenset({"source", "data", "calib", "eval"})


def _beside(recipe: Path, value: Any, key: str) -> Any:
    """``value`` pointing into the recipe's folder when it is not found from the working dir.

    ``key`` is where the recipe sets it (``steps[1].quantize.calib``), for the message.

    A path found in neither place is an InputError naming both (a module reference such as
    ``package.module:make`` is left to the import: see :func:`modules_beside`).
    """
    if not isinstance(value, str) or not value.strip():  # blank: the step says what it is
        return value
    target, rest = named_path(value)
    if not target or Path(target).is_absolute() or Path(target).exists():
        return value
    # resolved: a recipe given as a relative path (r.yaml) has the folder '.', which named
    # nothing in a message, and its later errors would name the file relative to the cwd
    moved = recipe.resolve().parent / target
    if moved.exists():
        return str(moved) + rest
    # a path, as a module reference (package.module:make) names no file: target is empty
    here = Path.cwd() / target
    where = f"neither {here} (from the working directory) nor {moved} (beside the recipe) exists"
    if here.resolve() == moved:
        where = f"{moved} does not exist (the working directory is the recipe's folder)"
    raise InputError(f"{recipe}: {key} {value!r}: {where}. Give a path from one of them.")


def modules_beside(recipe: Path) -> contextlib.AbstractContextManager[None]:
    """Module references (``pkg.module:make``) import from the working dir, else the recipe's.

    For the recipe's run only: a recipe kept beside its code runs from anywhere, as one beside
    its files does.
    """
    return importable_from(Path.cwd(), recipe.resolve().parent)


_NEGATIONS = {
    "per_tensor": "per_channel",
    "no_empirical_bias": "empirical_bias",
    "no_cleanup": "cleanup",
}
"""The CLI's flags that switch a setting off (``--per-tensor``), by the setting they switch."""


def _cli_spellings(settings: dict[str, Any], where: str) -> tuple[dict[str, Any], dict[str, str]]:
    """A step's settings as the commands' long options may also spell them; and the spellings.

    ``activation-type`` is ``activation_type``; a flag that turns a setting off
    (``no_empirical_bias: true``, ``per_tensor: true``) is that setting, false. The second
    dict maps each setting to the key the recipe wrote for it, for messages.

    Raises:
        InputError: two spellings of one setting (``per_tensor`` and ``per_channel``).
    """
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in settings.items():
        name = str(key).replace("-", "_")
        positive = _NEGATIONS.get(name)
        if positive is not None and not isinstance(value, bool):
            raise InputError(f"{where}: {key} {value!r}: give true or false.")
        if positive is not None:
            name, value = positive, not value
        if name in out:
            raise InputError(
                f"{where}: {spelled[name]!r} and {key!r} both set {name}; keep one of them."
            )
        out[name], spelled[name] = value, str(key)
    return out, spelled


def _placer(at: str, names: dict[str, str]) -> Callable[[Sequence[object]], str]:
    """Where a setting sits in the recipe (``steps[2].quantize.per-tensor``), for messages.

    From pydantic's location of an error in the step ``at``; ``names`` maps settings to the
    place the recipe wrote them (a top-level ``source``, a step's ``per-channel``). A derived
    step keeps its command's options under ``settings``, which the recipe never writes.
    """

    def place(loc: Sequence[object]) -> str:
        parts = [str(part) for part in loc]
        if parts[:1] == ["settings"]:
            parts = parts[1:]
        if not parts:
            return at
        head = names.get(parts[0], f"{at}.{parts[0]}")
        return head + "".join(f"[{part}]" for part in parts[1:])

    return place


def _yaml_problem(error: yaml.YAMLError) -> str:
    """PyYAML's error as one line: where, what, and the construct it was in.

    Its own text is a multi-line dump quoting ``<unicode string>`` and the source lines with
    a caret; the position it names first is where parsing stopped (the end of the file, for
    an unclosed ``{``), so the construct's start is named as well.
    """
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    context, start = getattr(error, "context", None), getattr(error, "context_mark", None)
    within = ""
    if context and start is not None:
        within = f" ({context} that starts at line {start.line + 1}, column {start.column + 1})"
    elif context:
        within = f" ({context})"
    return f"{where}not valid YAML: {problem}{within}. Fix the recipe there."


def load_recipe(path: Path) -> list[StepConfig]:
    """Parse a recipe file into steps; top-level ``source``/``inputs``/... go to ``convert``.

    Raises:
        InputError: the file is missing, not YAML, or describes unknown or invalid steps.
    """
    if path.is_dir():
        raise InputError(f"{path}: is a directory; pass the recipe's .yaml file.")
    if not path.is_file():
        raise InputError(f"{path}: no such recipe file.")
    try:
        doc = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(
            f"{path}: is not UTF-8 text ({e.reason}); save the recipe as UTF-8."
        ) from e
    except yaml.YAMLError as e:
        raise InputError(f"{path}: {_yaml_problem(e)}") from e
    if not isinstance(doc, dict) or not isinstance(doc.get("steps"), list):
        raise InputError(f"{path}: a recipe is a mapping with a 'steps' list (see README).")
    shared, top = _cli_spellings({k: v for k, v in doc.items() if k != "steps"}, str(path))
    unknown = [k for k in shared if k not in ConvertStep.model_fields and k != "no_bench"]
    if unknown:
        raise InputError(
            f"{path}: unknown top-level key {unknown[0]!r}: the top level holds 'steps' and "
            f"convert's settings ({', '.join(ConvertStep.model_fields)}); other steps' "
            "settings go under their step."
        )
    steps: list[StepConfig] = []
    for i, entry in enumerate(doc["steps"]):
        if isinstance(entry, str):
            entry = {entry: {}}
        if not isinstance(entry, dict) or len(entry) != 1:
            raise InputError(f"{path}: each step is 'name' or 'name: {{settings}}', got {entry!r}.")
        ((name, settings),) = entry.items()
        if settings is not None and not isinstance(settings, dict):
            raise InputError(
                f"{path}: step {name!r} takes a mapping of settings ('{name}: {{key: value}}'), "
                f"got {settings!r}."
            )
        at = f"steps[{i}].{name}"
        settings, spelled = _cli_spellings(dict(settings or {}), f"{path}: {at}")
        written = {k: f"{at}.{v}" for k, v in spelled.items()}
        if "gate" in written:  # the derived steps' gates
            written.setdefault("gates", written["gate"])
        if name == "convert":
            settings = {**shared, **settings}
            written = {**top, **written}
            # a recipe's convert never times (a bench step does): the CLI's --no-bench holds
            if (no_bench := settings.pop("no_bench", True)) is not True:
                raise InputError(
                    f"{path}: step 'convert': no_bench {no_bench!r}: a recipe times the model in "
                    "a bench step; drop no_bench and add '- bench' after convert to time it."
                )
        settings = {
            k: _beside(path, v, written.get(k, f"{at}.{k}")) if k in PATH_KEYS else v
            for k, v in settings.items()
        }
        steps.append(make_step(name, settings, str(path), _placer(at, written)))
    if not steps or not isinstance(steps[0], ConvertStep):
        raise InputError(f"{path}: the first step must be 'convert' (it creates the model).")
    if any(isinstance(step, ConvertStep) for step in steps[1:]):
        raise InputError(
            f"{path}: 'convert' may only be the first step: a second one would replace the model "
            "while the records of the steps before it stayed. Make a recipe per model."
        )
    names = [step.name for step in steps]
    if "package" in names:
        later = [n for n in names[names.index("package") :] if n in MODEL_CHANGING]
        if later:
            raise InputError(
                f"{path}: step 'package' comes before {', '.join(repr(n) for n in later)}, "
                "which would change the model after it was packed. Move 'package' after them."
            )
    _check_order(path, steps)
    _check_mobile(path, steps)
    return steps


def _check_mobile(path: Path, steps: Sequence[StepConfig]) -> None:
    """Refuse ``ep: mobile`` in a validate or bench step no package step comes before.

    ``mobile`` runs ``mobile/model.ort``, which only ``package`` writes: a bench step before
    it ran convert, then was exit 2 telling the user to run ``onnxpipe package the recipe's
    bundle -o OUT``; a validate step recorded ``mobile: unavailable`` and went on, or with
    ``require: mobile`` was exit 1 naming the recipe's temp folder.
    """
    packaged = False
    for step in steps:
        packaged = packaged or step.name == "package"
        asked = {*getattr(step, "ep", ()), *getattr(step, "require", ())}
        if not packaged and "mobile" in asked:
            raise InputError(
                f"{path}: step '{step.name}' has ep mobile, which runs mobile/model.ort, but no "
                "'package' step comes before it to write that file. Put "
                "'- package: {target: mobile}' before it, or drop mobile from it."
            )


def _check_order(path: Path, steps: Sequence[StepConfig]) -> None:
    """Refuse a quantize or prune step whose input model the command would refuse.

    A recipe 'quantize, prune' ran convert and quantize (minutes with ``auto``) before prune
    said 'the model is already quantized' (exit 2); quantize after fp16 did the same. Prune
    takes an fp16 model. After ``optimize`` at level extended or all, the model holds ONNX
    Runtime's CPU-fused ops (FusedConv, FusedGemm; all: the NCHWc layout), which both
    commands refuse: the recipe ran convert and optimize first.
    """
    mode: str | None = None
    fused: str | None = None
    for step in steps:
        if fused and step.name in ("quantize", "prune"):
            raise InputError(
                f"{path}: step '{step.name}' comes after 'optimize' (level {fused}), whose "
                "fusions are ONNX Runtime-only ops (FusedConv, FusedGemm"
                f"{', the NCHWc layout' if fused == 'all' else ''}) that {step.name} cannot see "
                f"through: onnxpipe {step.name} refuses such a model. Move '{step.name}' "
                "before that optimize step (optimize the result), or optimize at level basic."
            )
        if mode and step.name in ("quantize", "prune") and (step.name, mode) != ("prune", "fp16"):
            raise InputError(
                f"{path}: step '{step.name}' comes after 'quantize' (mode {mode}), whose model "
                f"it refuses as already quantized. Move '{step.name}' before that step (prune "
                "first, then quantize once)."
            )
        settings = getattr(step, "settings", {})
        if step.name == "quantize":
            mode = mode or str(settings.get("mode"))
        if step.name == "optimize" and settings.get("level") in ("extended", "all"):
            fused = fused if fused == "all" else settings["level"]


def run_steps(
    steps: Sequence[StepConfig],
    out: Path,
    overwrite: bool = False,
    progress: Progress | None = None,
    source_object: object | None = None,
    title: str | None = None,
    protect: Sequence[Path] = (),
    name_steps: bool = True,
) -> dict[str, Any]:
    """Run ``steps`` into a new bundle at ``out``; return its manifest.

    ``out`` may not replace ``protect`` (the recipe file) or any path the steps name. With
    ``name_steps`` an error says which step failed (a recipe's; not ``onnxpipe convert``'s).

    On a failed gate nothing is written at ``out``; the numbers go to ``<out>.failed.json``.
    """
    check_out_dir(out, overwrite, (*protect, *input_paths(*steps)))
    done: list[str] = []
    with atomic_dir(out, overwrite) as tmp:
        work = Work(dir=tmp)
        for i, step in enumerate(steps):
            if progress:
                progress(i, len(steps), step.name)
            try:
                if isinstance(step, ConvertStep):
                    step.run(work, source_object)
                else:
                    step.run(work)
            except OnnxPipeError as e:
                where = f"step {i + 1} ({step.name})" + (
                    f", after {', '.join(done)}" if done else ""
                )
                where = f"{where}: " if name_steps else ""
                if isinstance(e, GateFailed):
                    record = {
                        # the steps so far; no parity_samples: no parity.npz was written
                        **{k: v for k, v in work.manifest.items() if k != "parity_samples"},
                        "failed_step": step.name,
                        "error": str(e),
                        "metrics": e.metrics,
                    }
                    report = write_failure_report(out, record)
                    raise GateFailed(f"{where}{e} Numbers: {report}", e.metrics, record) from e
                # a message names the scratch copy the steps work in: the recipe's model it is
                raise type(e)(f"{where}{as_recipes(str(e), work.dir)}") from e
            done.append(step.name)
        if progress:
            progress(len(steps), len(steps), "bundle")
        manifest = finalize(work, title)
    return manifest


def finalize(work: Work, title: str | None = None) -> dict[str, Any]:
    """Describe the model files, write manifest.json, the README.md card and report.html."""
    import onnx_ir as ir  # noqa: PLC0415 - only needed once the model exists

    inputs, outputs = io_signature(ir.load(work.dir / MODEL_FILE))
    known = {s.name: s.high for s in work.inputs if s.high is not None}
    for entry in inputs:  # a quantized table (GatherBlockQuantized) keeps its input's limit
        if "index_limit" not in entry and entry["name"] in known:
            entry["index_limit"] = known[entry["name"]]
    manifest = {
        "schema": SCHEMA,
        "model": describe_model(work.dir),
        "inputs": inputs,
        "outputs": outputs,
        **work.manifest,
    }
    if title:
        manifest["title"] = title
    if (work.dir / PARITY_FILE).is_file():  # validate reads its outputs as the reference
        manifest["parity_samples"] = {"file": PARITY_FILE, "sha256": sha256(work.dir / PARITY_FILE)}
    write_json_atomic(work.dir / MANIFEST, manifest)
    write_docs(work.dir, manifest)
    return manifest
