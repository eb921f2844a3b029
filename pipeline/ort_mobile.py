"""ORT's mobile tools, called as libraries, for :mod:`onnxpipe.mobile`'s packaging.

``--fixed-shape`` parsing for ``make_input_shape_fixed``, the checks that a model can go into
an ORT mobile build (operator domains, tensor types), the optimization ``--level``, the
conversion to ORT format with its reduced-build operator config
(``convert_onnx_models_to_ort``), and the NNAPI/CoreML partition analysis of the mobile
usability checker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import onnx

from onnxpipe.converters.base import MAX_DIM, InputSpec
from onnxpipe.errors import InputError
from onnxpipe.modelio import MOBILE_MODEL
from onnxpipe.runtime import ORT_ERRORS

logger = logging.getLogger(__name__)

MOBILE_DIR, ORT_FILE = MOBILE_MODEL.split("/")
CONFIG_FILE = "required_operators.config"
LEVELS = ("auto", "basic", "extended", "all")
"""``auto``: ``extended`` for a static int8 (QDQ) model, else ``basic``."""
ORT_CONVERT_ERRORS: tuple[type[Exception], ...] = (*ORT_ERRORS, FileNotFoundError)
# Domains an ORT mobile (full or reduced) build has kernels for.
MOBILE_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft"}
FIXED_SHAPE_RE = re.compile(r"^(.+):\[?([0-9,\s]+)\]?$")
"""``NAME:DIMS`` of ``--fixed-shape`` (a recipe's ``fixed_shape`` entry); a name may hold ':'
(tf2onnx's ``input:0``)."""
_EXAMPLE = "['input:1,3,224,224']"


def fixed_shape_problem(value: object) -> str | None:
    """What is wrong with a recipe's ``fixed_shape``, a list of quoted ``NAME:DIMS``, or None.

    The answer shows the right form, with the user's own shapes where they can be read:
    ``'x:1,64'`` (one text), ``{x: [1, 64]}``, and ``[x:1,64]``, which YAML reads as the
    two entries ``'x:1'`` and ``64``, were all refused as 'a list of NAME:DIMS'; an entry
    that does not parse (``x=1,64``) only once the steps before package had run.
    """
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        bad = next((v for v in value if not FIXED_SHAPE_RE.match(v.strip())), None)
        if bad is None:
            return None
        return f"{bad!r} is not NAME:DIMS: write fixed_shape: {_EXAMPLE}"
    texts: list[str] = []
    for item in value if isinstance(value, list) else [value]:
        if isinstance(item, dict):  # {x: [1, 64]} or [x: [1, 64]]
            texts += [f"{k}:{','.join(map(str, v if isinstance(v, list) else [v]))}"
                      for k, v in item.items()]  # fmt: skip
    if isinstance(value, str):
        texts = [value]
    elif isinstance(value, list) and value and isinstance(value[0], str):
        if all(isinstance(v, int) for v in value[1:]):  # [x:1,64] read as 'x:1', 64
            texts = [",".join(map(str, value))]
    good = bool(texts) and all(FIXED_SHAPE_RE.match(t) for t in texts)
    example = repr(texts) if good else _EXAMPLE
    unquoted = ""
    if isinstance(value, list) and any(isinstance(v, int) for v in value):
        unquoted = " (unquoted, YAML reads [x:1,64] as the two entries 'x:1' and 64)"
    return (
        f"{value!r} is not a list of quoted NAME:DIMS texts{unquoted}: write fixed_shape: {example}"
    )


def parse_fixed_shapes(texts: Sequence[str], inputs: Sequence[InputSpec]) -> dict[str, list[int]]:
    """``NAME:DIMS`` (``input:1,3,224,224`` or ``input:[1,3,224,224]``) checked against inputs.

    Inputs that share a symbolic dim (``input_ids`` and ``attention_mask`` share ``seq``) must
    agree on it; an input not named whose symbolic dims the named ones all fix is fixed too.

    Raises:
        InputError: the text does not parse, names no input, or has the wrong rank or a dim
            that contradicts a static one; two values for one input or one shared dim; an
            input not named that shares some, not all, of its symbolic dims.
    """
    by_name = {s.name: s for s in inputs}
    fixed: dict[str, list[int]] = {}
    for text in texts:
        match = FIXED_SHAPE_RE.match(text.strip())
        if not match:
            raise InputError(f"--fixed-shape {text!r}: write NAME:DIMS, e.g. input:1,3,224,224.")
        name, dims_text = match.group(1), match.group(2)
        spec = by_name.get(name)
        if spec is None:
            raise InputError(
                f"--fixed-shape {text!r}: the model has no input {name!r}; its inputs are "
                f"{', '.join(by_name)}."
            )
        dims = [int(d) for d in dims_text.replace(" ", "").split(",") if d]
        if len(dims) != len(spec.shape) or any(not 1 <= d <= MAX_DIM for d in dims):
            raise InputError(
                f"--fixed-shape {text!r}: {name} has shape {list(spec.shape)} (rank "
                f"{len(spec.shape)}); give {len(spec.shape)} positive dims (at most {MAX_DIM})."
            )
        clash = [
            f"axis {i} is {a}, not {d}"
            for i, (a, d) in enumerate(zip(spec.shape, dims, strict=True))
            if isinstance(a, int) and a != d
        ]
        if clash:  # it listed "[(64, 65)]", which read as a dim of 64 x 65
            raise InputError(
                f"--fixed-shape {text!r}: {name} has shape {list(spec.shape)}, whose fixed "
                f"sizes cannot change ({'; '.join(clash)}). Fix only its symbolic dims."
            )
        if name in fixed and fixed[name] != dims:
            raise InputError(f"--fixed-shape: {name} is given twice ({fixed[name]} and {dims}).")
        fixed[name] = dims
    return _complete_shared(fixed, inputs)


def _complete_shared(
    fixed: dict[str, list[int]], inputs: Sequence[InputSpec]
) -> dict[str, list[int]]:
    """Check the shared symbolic dims of ``fixed`` and fix the inputs they fix entirely."""
    values: dict[str, tuple[int, str]] = {}
    for spec in inputs:
        for dim, size in zip(spec.shape, fixed.get(spec.name, ()), strict=False):
            if isinstance(dim, str) and values.setdefault(dim, (size, spec.name))[0] != size:
                first, where = values[dim]
                raise InputError(
                    f"--fixed-shape: {where} and {spec.name} share dim {dim!r} but are given "
                    f"{first} and {size} for it; give both the same size."
                )
    completed = dict(fixed)
    for spec in inputs:
        symbols = [d for d in spec.shape if isinstance(d, str)]
        if spec.name in fixed or not any(d in values for d in symbols):
            continue
        if not all(d in values for d in symbols):
            raise InputError(
                f"--fixed-shape: {spec.name} {list(spec.shape)} shares "
                f"{[d for d in symbols if d in values]} with the inputs you fixed; fix it too "
                f"(--fixed-shape {spec.name}:...)."
            )
        completed[spec.name] = [d if isinstance(d, int) else values[d][0] for d in spec.shape]
    return completed


def check_mobile_ops(model: onnx.ModelProto, where: Path) -> None:
    """Refuse ops from domains no ORT mobile build has kernels for.

    Raises:
        InputError: naming the ops and what to do.
    """
    foreign = sorted(
        {
            f"{n.domain}::{n.op_type}"
            for n in _all_nodes(model.graph)
            if n.domain not in MOBILE_DOMAINS
        }
    )
    if any(op.startswith("com.microsoft.nchwc::") for op in foreign):
        raise InputError(
            f"{where}: holds {', '.join(foreign)}, the x86 CPU layout ops of optimize --level "
            "all, which no ORT mobile build has kernels for. Package the bundle from before that "
            "optimize (package applies ORT's own optimizations for the device), or optimize at "
            "--level basic or extended."
        )
    if foreign:
        raise InputError(
            f"{where}: uses custom-domain op(s) {', '.join(foreign)}, which no ORT mobile build "
            "has kernels for. Replace them with standard ONNX ops before packaging, or build ORT "
            "mobile with your custom-op library."
        )


def check_mobile_tensors(model: onnx.ModelProto, where: Path) -> None:
    """Refuse 4-bit tensors, which the ORT format cannot store.

    ORT writes the .ort file, then cannot load it ("Unsupported tensor data type"); the
    4-bit tensors come from ``quantize --mode int4``'s embedding tables of odd width (even
    ones are stored as uint8 bytes).

    Raises:
        InputError: naming the tensors and the fix.
    """
    four_bit = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)
    found = sorted(t.name for t in model.graph.initializer if t.data_type in four_bit)
    if found:
        shown = ", ".join(found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        raise InputError(
            f"{where}: holds 4-bit tensors ({shown}), which the ORT format cannot store. "
            "For mobile, quantize with --mode int4 --exclude Gather (embedding tables stay "
            "float; MatMulNBits weights are packed bytes and convert), or --mode dynamic."
        )


def _all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            for sub in attr.graphs:
                yield from _all_nodes(sub)


@contextlib.contextmanager
def _optimization_level(level: str) -> Iterator[None]:
    # convert_onnx_models_to_ort reads its level from this variable only.
    key = "ORT_CONVERT_ONNX_MODELS_TO_ORT_OPTIMIZATION_LEVEL"
    old = os.environ.get(key)
    os.environ[key] = level
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def resolve_level(level: str, model: onnx.ModelProto) -> tuple[str, str | None]:
    """The ORT level ``level`` means for ``model``, and a note when the choice matters.

    ORT-format conversion saves the graph as optimized at that level (its "Fixed" style). At
    ``basic`` the QuantizeLinear/DequantizeLinear pairs around an int8 model's layers stay
    unfused, so every layer runs in float between them: a static int8 CNN packaged at basic
    ran at fp32 speed (11.4 ms, against 2.5 ms at ``extended``, where they become QLinearConv,
    which ORT's CPU EP and NNAPI both run).
    """
    # Static QDQ quantizes activations with QuantizeLinear; dynamic int8 has none (only a
    # DequantizeLinear on quantized embedding tables) and keeps its kernels at basic.
    has_qdq = any(node.op_type == "QuantizeLinear" for node in _all_nodes(model.graph))
    if level == "auto":
        chosen = "extended" if has_qdq else "basic"
        note = (
            "level extended (auto): the int8 QDQ groups are fused into int8 kernels "
            "(QLinearConv, ...); at basic they would run in float"
            if has_qdq
            else None
        )
        return chosen, note
    if level == "basic" and has_qdq:
        note = (
            "level basic keeps the int8 model's QuantizeLinear/DequantizeLinear groups unfused: "
            "model.ort runs its layers in float. Package with --level extended (or the default, "
            "auto) to keep the int8 kernels"
        )
        logger.warning("%s", note)
        return level, note
    return level, None


def to_ort_format(
    model_path: Path, out_dir: Path, level: str
) -> tuple[Path, Path, dict[str, dict[str, Any]]]:
    """Convert to ``out_dir/model.ort`` + ``required_operators.config`` (ARM target).

    Also returns the NNAPI/CoreML partition analysis (:func:`partitions`) of the graph the
    ``.ort`` file holds: the model as ORT optimized it at ``level``, which can differ from the
    input (constants folded, Dropout removed, fused kernels NNAPI lacks).

    Raises:
        InputError: ORT cannot convert the model (it names the reason).
    """
    from onnxruntime.tools import convert_onnx_models_to_ort as converter  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="onnxpipe-ort-") as tmp, _optimization_level(level):
        try:
            converter.convert_onnx_models_to_ort(
                model_path,
                output_dir=Path(tmp),
                optimization_styles=[converter.OptimizationStyle.Fixed],
                target_platform="arm",
                save_optimized_onnx_model=True,
            )
        except ORT_CONVERT_ERRORS as e:
            raise InputError(
                f"{model_path}: ORT could not convert the model to ORT format: "
                f"{str(e).splitlines()[0][:300]}"
            ) from e
        ort_files = list(Path(tmp).glob("*.ort"))
        configs = list(Path(tmp).glob("*.config"))
        optimized = list(Path(tmp).glob("*.optimized.onnx"))
        if len(ort_files) != 1 or len(configs) != 1:
            raise InputError(f"{model_path}: ORT produced no ORT-format model; see --debug.")
        analysis = partitions(optimized[0] if len(optimized) == 1 else model_path)
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.move(str(ort_files[0]), out_dir / ORT_FILE)
        shutil.move(str(configs[0]), out_dir / CONFIG_FILE)
    text = (out_dir / CONFIG_FILE).read_text()
    # The generated header names our temp dir; say what the config is for instead.
    lines = [ln for ln in text.splitlines() if not ln.startswith("#")]
    (out_dir / CONFIG_FILE).write_text(
        "# Operators required by model.ort (onnxpipe package --target mobile).\n"
        "# Build ORT with --include_ops_by_config required_operators.config\n"
        + "\n".join(lines)
        + "\n"
    )
    return out_dir / ORT_FILE, out_dir / CONFIG_FILE, analysis


def partitions(model_path: Path) -> dict[str, dict[str, Any]]:
    """NNAPI and CoreML (ML Program) partition analysis from ORT's usability checker."""
    from onnxruntime.tools.mobile_helpers import usability_checker as checker  # noqa: PLC0415

    shaped = checker.ModelProtoWithShapeInfo(model_path).model_with_shape_info
    checks = {
        "nnapi": lambda: checker.check_nnapi_partitions(shaped, True),
        "coreml": lambda: checker.check_coreml_partitions(
            shaped, True, "coreml_supported_mlprogram_ops.md"
        ),
    }
    results: dict[str, dict[str, Any]] = {}
    for ep, check in checks.items():
        try:
            info = check()
        except ValueError as e:  # a graph the checker cannot analyse (missing shape info)
            results[ep] = {
                "partitions": None, "nodes_supported": None, "nodes_total": len(shaped.graph.node),
                "unsupported_ops": [], "suitability": "unknown",
                "reason": f"ORT's usability checker could not analyse the graph: {e}",
            }  # fmt: skip
            continue
        results[ep] = {
            "partitions": info.num_partitions,
            "nodes_supported": info.num_supported_nodes,
            "nodes_total": info.num_nodes,
            "unsupported_ops": sorted(info.unsupported_ops),
        }
        if info.num_nodes == 0:  # ORT folded it all (Shape of a fixed input): suitability()
            results[ep]["suitability"] = "none"  # divides by the node count
            results[ep]["reason"] = (
                "the optimized graph has no nodes (ORT folded the model into constants): "
                "nothing runs on the EP"
            )
        else:
            results[ep]["suitability"] = info.suitability().name.lower()
    return results
