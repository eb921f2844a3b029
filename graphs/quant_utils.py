"""What the quantization passes share: ModelProto edges, refusal checks, CPU features.

ORT's quantization tools take ``ModelProto`` objects or file paths; the passes keep the model
as an ``onnx_ir`` model and cross over here, in a temp dir, only for the ORT call.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import tempfile
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxpipe.errors import PassError

logger = logging.getLogger(__name__)

Feeds = Mapping[str, np.ndarray]

QUANT_OPS = frozenset(
    {
        "QuantizeLinear",
        "DequantizeLinear",
        "DynamicQuantizeLinear",
        "QLinearConv",
        "QLinearMatMul",
        "MatMulInteger",
        "ConvInteger",
        "MatMulNBits",
        "DynamicQuantizeMatMul",
        "QAttention",
        "QLinearAdd",
        "QGemm",
    }
)
"""Ops whose presence means a model was quantized already."""


def quantized_nodes(model: ir.Model) -> list[str]:
    """``op_type`` of every quantization node in the main graph (empty for a float model)."""
    return [node.op_type for node in model.graph if node.op_type in QUANT_OPS]


def refuse_quantized(
    model: ir.Model,
    pass_name: str,
    fix: str = "Quantize the float bundle this one was derived from instead.",
) -> None:
    """Raise :class:`PassError` when ``model`` already holds quantization nodes.

    Quantizing twice compounds the rounding error and ORT's tools mis-handle existing
    Q/DQ pairs, so the fix is to start again from the float bundle (``fix`` says how).
    """
    found = quantized_nodes(model)
    if found:
        ops = ", ".join(sorted(set(found)))
        raise PassError(
            f"{pass_name}: the model is already quantized ({len(found)} nodes: {ops}). {fix}"
        )


def refuse_float16(model: ir.Model, pass_name: str) -> None:
    """Raise :class:`PassError` when the weights are float16 already (an fp16 bundle)."""
    for value in model.graph.initializers.values():
        if value.dtype == ir.DataType.FLOAT16:
            raise PassError(
                f"{pass_name}: the model already holds float16 weights ({value.name!r}). "
                "Start from the float32 bundle (a Keras mixed_float16 model: convert it built "
                "under the float32 policy)."
            )


# ORT's CPU fusions (optimize --level extended/all): Conv/Gemm with their activation, and the
# NCHWc-layout kernels. Quantizers and pruning passes look for Conv/Gemm/MatMul and would pass
# these by silently (static int8: the convs stay float) or fail inside ORT (NCHWc reorders).
_CPU_FUSED = frozenset({"FusedConv", "FusedGemm"})


def refuse_cpu_fused(model: ir.Model, pass_name: str, verb: str) -> None:
    """Raise :class:`PassError` when ``model`` holds ORT's CPU-fused or NCHWc ops.

    ``verb`` names what to do first ("Quantize", "Prune").
    """
    found = Counter(
        f"{node.domain}:{node.op_type}"
        for node in model.graph.all_nodes()
        if node.domain == "com.microsoft.nchwc"
        or (node.domain == "com.microsoft" and node.op_type in _CPU_FUSED)
    )
    if found:
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(found.items()))
        raise PassError(
            f"{pass_name}: the model holds ONNX Runtime's CPU-fused ops ({ops}) from optimize "
            f"--level extended or all, which {pass_name.split()[0]} cannot see through. {verb} "
            "the bundle this one was optimized from, then optimize the result (or optimize at "
            "--level basic)."
        )


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """The model as a ``ModelProto`` (weights inline)."""
    return ir.serde.serialize_model(model)


def fixed_batch(model: ir.Model) -> int | None:
    """The batch size every input of ``model`` fixes on axis 0, or None when it is free.

    A model exported at a fixed batch (the onnx zoo's ``[1, 3, 224, 224]``, or 4) runs
    only at that batch: calibration and sensitivity feeds are grouped to it (:func:`regroup`).
    """
    dims = [
        v.shape[0] if isinstance(v.shape[0], int) else None
        for v in model.graph.inputs
        if v.shape is not None and len(v.shape) and v.const_value is None
    ]
    batches = set(dims)
    return batches.pop() if len(batches) == 1 and None not in batches and dims else None


def regroup(feeds: Sequence[Feeds], batch: int | None) -> list[dict[str, np.ndarray]]:
    """``feeds`` as batches of exactly ``batch`` samples (a remainder is left out).

    ``feeds`` as they are when ``batch`` is None (the model takes any batch).
    """
    if batch is None or not feeds:
        return [dict(f) for f in feeds]
    stacked = {k: np.concatenate([f[k] for f in feeds]) for k in feeds[0]}
    total = len(next(iter(stacked.values())))
    return [
        {k: v[i : i + batch] for k, v in stacked.items()}
        for i in range(0, total - batch + 1, batch)
    ]


def first_samples(
    feeds: Sequence[Feeds], samples: int, batch: int | None = None
) -> list[dict[str, np.ndarray]]:
    """The leading batches of ``feeds`` cut to ``samples`` samples in all.

    With a fixed ``batch``, whole batches of it (at least one).
    """
    if batch is not None:
        grouped = regroup(feeds, batch)
        return grouped[: max(1, samples // batch)]
    out: list[dict[str, np.ndarray]] = []
    seen = 0
    for feed in feeds:
        if seen >= samples:
            break
        cut = {k: v[: samples - seen] for k, v in feed.items()}
        seen += len(next(iter(cut.values())))
        out.append(cut)
    return out


def tap_session(model: ir.Model | onnx.ModelProto, tensors: Sequence[str]) -> Any:
    """An ORT CPU session on ``model`` that also returns the intermediate ``tensors``.

    ``model`` is left as it is (a ``ModelProto`` is copied before outputs are added).
    """
    import onnxruntime as ort  # noqa: PLC0415

    if isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    else:
        proto = to_proto(model)
    present = {o.name for o in proto.graph.output}
    for name in tensors:
        if name not in present:
            proto.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(
        proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )


def token_rows(value: np.ndarray, mask: np.ndarray | None, axis: int = -1) -> np.ndarray:
    """``value`` as ``[rows, channels]`` (channels on ``axis``), padded tokens left out.

    Padding is dropped where ``mask`` (a feed's ``attention_mask``) has the leading
    ``[batch, seq]`` shape of a 3-D ``value`` whose channels are last: a transformer's
    padded positions carry no real input, yet as many rows as real tokens in short sentences.
    """
    rows = np.moveaxis(value, axis, -1).reshape(-1, value.shape[axis])
    last = axis % value.ndim == value.ndim - 1
    if mask is not None and last and value.ndim == 3 and value.shape[:2] == mask.shape:
        rows = rows[mask.reshape(-1).astype(bool)]
    return rows


def load_arrays(path: Path | None) -> dict[str, np.ndarray]:
    """Arrays saved by :func:`save_arrays` (empty when ``path`` is None or absent)."""
    if path is None or not path.is_file():
        return {}
    with np.load(path) as stored:
        names = [str(n) for n in stored["names"]]
        return {name: stored[f"a{i}"] for i, name in enumerate(names)}


def save_arrays(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Store arrays by name, as they are.

    Names go in an index array: tensor and node names may hold characters zip members cannot.
    """
    names = list(arrays)
    stored = {f"a{i}": arrays[n] for i, n in enumerate(names)}
    np.savez(path, names=np.array(names), **stored)  # type: ignore[arg-type]


def from_proto(proto: onnx.ModelProto) -> ir.Model:
    """An ``onnx_ir`` model from a ``ModelProto``."""
    return ir.serde.deserialize_model(proto)


@contextlib.contextmanager
def scratch_dir() -> Iterator[Path]:
    """A temp dir for ORT's file-based tools, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="onnxpipe-quant-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def working_directory(path: Path) -> Iterator[None]:
    """Run ORT tools from ``path``: some write beside the current directory.

    ORT's symbolic shape inference, when it gives up, saves ``sym_shape_infer_temp.onnx`` and
    uuid-named external-data files into the current directory; it must not be the user's.
    onnxpipe runs one pass at a time, so changing the process's directory here is safe.
    """
    old = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def plain_initializers(proto: onnx.ModelProto) -> None:
    """Drop initializers from the graph inputs, in place (IR 4 or newer where needed).

    Old exporters list every weight as a graph input too (IR 3; the onnx zoo models do).
    ORT's optimizer folds or shares some of them but keeps the input, which then becomes a
    required feed: quantization tools fail on it and an ORT-format model asks for it. A user
    overriding weights at run time is not a use an optimized or mobile model serves.
    """
    constants = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in constants]
    if len(inputs) != len(proto.graph.input):
        del proto.graph.input[:]
        proto.graph.input.extend(inputs)
        proto.ir_version = max(proto.ir_version, 4)  # IR 3 required initializers as inputs


def save_for_ort(model: ir.Model, path: Path) -> Path:
    """Save ``model`` where an ORT tool reads it, weights external when over 2 GB.

    Weight graph inputs are saved as plain initializers (:func:`plain_initializers`).
    """
    proto = to_proto(model)
    plain_initializers(proto)
    large = proto.ByteSize() > 1_800_000_000
    onnx.save_model(proto, str(path), save_as_external_data=large)
    return path


def load_from_ort(path: Path) -> ir.Model:
    """Load a file an ORT tool wrote, its external data pulled into memory."""
    return ir.external_data.load_to_model(ir.load(path))


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (Linux ``/proc/cpuinfo``; empty elsewhere).

    Read once: channel pruning asks for every group of every candidate it builds.
    """
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def has_vnni() -> bool:
    """Whether int8 dot products accumulate without int16 saturation (AVX-VNNI / AVX512-VNNI).

    Without VNNI, ORT's U8S8 kernels on x86 sum pairs of u8*s8 products in int16
    (VPMADDUBSW), which saturates on large activations times large weights.
    """
    flags = cpu_flags()
    return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & flags)


def is_x86() -> bool:
    """Whether this is an x86-64 CPU (ARM prefers symmetric int8 activations)."""
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


class FeedsReader:
    """ORT's ``CalibrationDataReader`` protocol over a list of feed dicts, one sample at a time.

    A model fixed at a ``batch`` takes that many at a time. Single samples keep the
    calibration model's memory flat for any batch size the user gave.
    """

    def __init__(self, feeds: Sequence[Feeds], batch: int | None = None) -> None:
        if batch is not None and batch > 1:  # a model fixed at that batch takes no other
            self._samples = regroup(feeds, batch)
        else:
            self._samples = [
                {k: v[i : i + 1] for k, v in f.items()} for f in feeds for i in range(_count(f))
            ]
        self._index = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next sample or None at the end."""
        if self._index >= len(self._samples):
            return None
        self._index += 1
        return self._samples[self._index - 1]

    def rewind(self) -> None:
        """Start again from the first sample."""
        self._index = 0

    def __len__(self) -> int:
        return len(self._samples)


def _count(feeds: Feeds) -> int:
    first = next(iter(feeds.values()))
    return int(first.shape[0]) if first.ndim else 1
