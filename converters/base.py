"""What every converter takes and returns: input specs, settings and the conversion result.

A converter turns a framework model into an ``onnx_ir`` model plus a *reference*: a callable
that runs the source framework on the same feeds, so the pipeline can prove parity.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from onnxpipe.errors import InputError

if TYPE_CHECKING:
    import onnx_ir as ir

Dim = int | str
Feeds = Mapping[str, np.ndarray]
Reference = Callable[[Feeds], list[np.ndarray]]

DTYPES: dict[str, np.dtype] = {
    name: np.dtype(name)
    for name in (
        "float32",
        "float16",
        "float64",
        "int8",
        "uint8",
        "int16",
        "int32",
        "int64",
        "bool",
    )
}
_SPEC_RE = re.compile(r"^\s*([A-Za-z_][\w.:/-]*?)\s*:\s*([a-z0-9]+)\s*\[([^\]]*)\]\s*$")
_SYMBOL_RE = re.compile(r"^[A-Za-z_]\w*$")


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype name and shape (ints, or symbols for dynamic axes)."""

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    high: int | None = None
    """For integer ids: the rows of the tables they index (generated values stay below it)."""

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """Parse ``name:dtype[d0,d1,...]``, e.g. ``input:float32[batch,3,224,224]``.

        Raises:
            InputError: the text does not parse, names an unknown dtype or a bad dim.
        """
        match = _SPEC_RE.match(text)
        if not match:
            raise InputError(
                f"--input {text!r} does not parse. Write name:dtype[dims], e.g. "
                "input:float32[batch,3,224,224] (dims are ints or symbols such as batch, seq)."
            )
        name, dtype, dims_text = match.groups()
        if dtype not in DTYPES:
            raise InputError(
                f"--input {text!r}: unknown dtype {dtype!r}. Use one of: {', '.join(DTYPES)}."
            )
        dims: list[Dim] = []
        for raw in (d.strip() for d in dims_text.split(",")) if dims_text.strip() else ():
            if raw.isdigit() and 0 < int(raw) <= MAX_DIM:
                dims.append(int(raw))
            elif _SYMBOL_RE.match(raw):
                dims.append(raw)
            else:
                raise InputError(
                    f"--input {text!r}: dim {raw!r} is neither a positive int (at most "
                    f"{MAX_DIM}, ONNX's int64) nor a symbol name."
                )
        return cls(name=name, dtype=dtype, shape=tuple(dims))

    def __str__(self) -> str:
        return f"{self.name}:{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    @property
    def integer(self) -> bool:
        """Integer dtype: ids, which may index a table (see ``high``)."""
        return np.dtype(self.dtype).kind in "iu"

    @property
    def symbols(self) -> list[str]:
        """The symbolic (dynamic) dims, in order."""
        return [d for d in self.shape if isinstance(d, str)]

    @classmethod
    def from_json(cls, entry: Mapping[str, Any]) -> InputSpec:
        """The spec :meth:`to_json` wrote."""
        return cls(entry["name"], entry["dtype"], tuple(entry["shape"]), entry.get("index_limit"))

    def to_json(self) -> dict[str, Any]:
        """The manifest form ``{name, dtype, shape}`` (+ ``index_limit`` for table ids)."""
        entry = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        return entry | ({"index_limit": self.high} if self.high is not None else {})


class ConvertConfig(BaseModel):
    """Settings shared by every converter (one CLI ``convert`` call)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    inputs: tuple[str, ...] = Field(
        default=(), description="Input specs name:dtype[dims]; symbols become dynamic axes."
    )
    opset: int | None = Field(
        default=None, ge=7, le=23, description="Target ONNX opset; None lets the exporter choose."
    )
    exporter: Literal["auto", "dynamo", "torchscript"] = Field(
        default="auto", description="PyTorch exporter; auto tries dynamo, then TorchScript."
    )
    nchw: bool = Field(default=False, description="Emit NCHW image inputs (TensorFlow sources).")
    unsafe_load: bool = Field(
        default=False, description="Allow full-pickle loading (torch.load, Keras lambda layers)."
    )
    signature: str | None = Field(
        default=None,
        min_length=1,
        description="SavedModel signature to convert; None = serving_default or the only one.",
    )
    data: str | None = Field(
        default=None,
        description="Real inputs (--data); a PyTorch model that refuses generated values "
        "(ids past a small table, one_hot) is exported on their first batch.",
    )

    def input_specs(self) -> list[InputSpec]:
        """The parsed ``inputs``."""
        return [InputSpec.parse(text) for text in self.inputs]


@dataclass
class ConversionResult:
    """A converted model and the means to check it against its source."""

    model: ir.Model
    framework: Literal["torch", "tf", "onnx"]
    exporter: Literal["dynamo", "torchscript", "tf2onnx", "none"]
    inputs: list[InputSpec]
    reference: Reference
    reference_name: str
    fallback_reason: str | None = None
    notes: list[str] = field(default_factory=list)
    alternate: Reference | None = None
    """The source run another way it runs (TensorFlow's trace of an eager Keras model): how
    much the two differ is the source's own noise, a floor for the parity tolerance."""


def output_names_for(
    count: int, keys: Sequence[str] | None = None, inputs: Sequence[str] = ()
) -> list[str]:
    """Output names: the source's own keys when it has them, else ``output`` / ``output_i``.

    A name an input already has gets ``_out`` (an ONNX graph cannot define a name twice:
    ``return {"x": ...}`` for input ``x``).
    """
    if keys and len(keys) == count and len(set(keys)) == count:
        names = [str(k) for k in keys]
    else:
        names = ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    taken = set(inputs)
    renamed = []
    for name in names:
        while name in taken:
            name += "_out"
        taken.add(name)
        renamed.append(name)
    return renamed


def in_declared_order(
    specs: Sequence[InputSpec], declared: Sequence[str] | None, where: str
) -> list[InputSpec]:
    """``specs`` in the model's input order when their names are the model's, in another order.

    Models that take inputs by position would otherwise bind ``--input mask ... --input ids``
    to the wrong inputs, and parity could not tell (the reference binds them the same way).
    Names that are not the model's keep their order (they rename its inputs).

    Raises:
        InputError: some names are the model's and some are not, so the binding is unclear.
    """
    if not declared:
        return list(specs)
    names = [s.name for s in specs]
    if names == list(declared)[: len(names)] or not set(names) & set(declared):
        return list(specs)
    if set(names) == set(declared) and len(names) == len(declared):
        by_name = {s.name: s for s in specs}
        return [by_name[n] for n in declared]
    raise InputError(
        f"{where}: the --input names {names} match some of the model's inputs {list(declared)} "
        "but not in their order. Name every input as the model does (any order), or give "
        "them in the model's order."
    )


def fixed_batch(specs: Sequence[InputSpec]) -> int | None:
    """The batch every input fixes on axis 0 (the onnx zoo's 1), or None when any is free."""
    firsts = {s.shape[0] if s.shape and isinstance(s.shape[0], int) else None for s in specs}
    size = firsts.pop() if len(firsts) == 1 else None
    return size if size is not None and size > 0 else None


def example_sizes(specs: Sequence[InputSpec], offset: int = 0) -> dict[str, int]:
    """Distinct sizes >= 2 for every symbol, avoiding the static dims of the specs.

    The dynamo exporter freezes a dynamic dim whose example size is 1, and may tie two
    symbols that share a size, so each symbol gets its own size >= 2. ``offset`` shifts to
    other sizes (parity runs at shapes the export never saw).
    """
    static = {d for spec in specs for d in spec.shape if isinstance(d, int)}
    sizes: dict[str, int] = {}
    candidate = 2 + offset
    for spec in specs:
        for sym in spec.symbols:
            if sym in sizes:
                continue
            while candidate in static or candidate in sizes.values():
                candidate += 1
            sizes[sym] = candidate
            candidate += 1
    return sizes


def unnamed_dim(name: str | None, axis: int) -> str:
    """The symbol onnxpipe gives a free dim a model left unnamed: ``<name>_d<axis>``."""
    return f"{name}_d{axis}".replace(".", "_").replace(":", "_")


MAX_DIM = 2**63 - 1
"""The largest dim ONNX can declare (int64)."""

MAX_SAMPLE_BYTES = 2 << 30
"""The largest array onnxpipe generates for one input (2 GiB)."""


def check_sample_bytes(spec: InputSpec, shape: Sequence[int]) -> None:
    """InputError when a generated ``shape`` sample of ``spec`` would exceed 2 GiB.

    A batch of 99999999999 asked numpy for 2.9 TiB: a MemoryError, exit 3.
    """
    size = math.prod(shape) * DTYPES[spec.dtype].itemsize
    if size > MAX_SAMPLE_BYTES:
        raise InputError(
            f"input {spec.name!r} at {list(shape)} would be {size / 2**30:,.1f} GiB of "
            f"{spec.dtype}, more than onnxpipe generates for one input (2 GiB). Give smaller "
            "sizes (the dims of --input or --fixed-shape, --batch, --size)."
        )


def random_input(spec: InputSpec, sizes: Mapping[str, int], rng: np.random.Generator) -> np.ndarray:
    """A plausible random array for one input: normal floats, small ids, all-ones masks.

    Ids stay below ``spec.high`` where the model says how many rows their tables have.
    """
    shape = tuple(sizes[d] if isinstance(d, str) else d for d in spec.shape)
    check_sample_bytes(spec, shape)
    dtype = DTYPES[spec.dtype]
    lowered = spec.name.lower()
    if dtype.kind == "f":
        return rng.standard_normal(shape).astype(dtype)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if "mask" in lowered:
        return np.ones(shape, dtype=dtype)
    if "type" in lowered or "segment" in lowered or "position" in lowered:
        return np.zeros(shape, dtype=dtype)
    if spec.high is not None:
        return rng.integers(min(1, spec.high - 1), spec.high, shape).astype(dtype)
    return rng.integers(1, 100, shape).astype(dtype)


def random_feeds(
    specs: Sequence[InputSpec], sizes: Mapping[str, int], seed: int = 0
) -> dict[str, np.ndarray]:
    """One feed dict for ``specs`` with symbols set to ``sizes``."""
    rng = np.random.default_rng(seed)
    return {spec.name: random_input(spec, sizes, rng) for spec in specs}


@dataclass
class ExportAttempt:
    """One exporter's try: a result, or the reason it failed (naming the op where known)."""

    exporter: str
    result: ConversionResult | None = None
    error: str | None = None
    unsupported_ops: list[str] = field(default_factory=list)
