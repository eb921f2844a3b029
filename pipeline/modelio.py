"""Write and describe ONNX model files: external data only where the model needs it."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxpipe.converters.base import unnamed_dim
from onnxpipe.graphs.base import ID_PASS, attr_int

logger = logging.getLogger(__name__)

MODEL_FILE = "model.onnx"
DATA_FILE = "model.onnx.data"
MOBILE_MODEL = "mobile/model.ort"
# A protobuf cannot exceed 2 GiB; leave room for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of the model's initializers (all subgraphs)."""
    total = 0
    for graph in (model.graph, *model.graph.subgraphs()):
        for value in graph.initializers.values():
            if value.const_value is not None:
                total += value.const_value.nbytes
    return total


def save_model(model: ir.Model, directory: Path) -> list[Path]:
    """Save ``model`` as ``directory/model.onnx`` (+ ``model.onnx.data`` when over 1.8 GB).

    Returns:
        The files written.
    """
    path = directory / MODEL_FILE
    if initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD:
        ir.save(model, path, external_data=DATA_FILE)
        logger.info("saved %s with external data %s", path, DATA_FILE)
        return [path, directory / DATA_FILE]
    ir.save(model, path)
    return [path]


def sha256(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def describe_model(directory: Path) -> dict[str, Any]:
    """The manifest's ``model`` section for the model files in ``directory``."""
    path = directory / MODEL_FILE
    proto = ir.load(path)
    files = [path] + ([directory / DATA_FILE] if (directory / DATA_FILE).exists() else [])
    info: dict[str, Any] = {
        "file": MODEL_FILE,
        "sha256": sha256(path),
        "bytes": sum(f.stat().st_size for f in files),
        "opset": proto.opset_imports.get("", None),
        "ir_version": proto.ir_version,
    }
    if len(files) > 1:
        info["external_data"] = {"file": DATA_FILE, "sha256": sha256(files[1])}
    return info


# Ops that pass integer ids on to the Gather that uses them: reshapes and casts, and the
# index arithmetic exporters write around it (Keras 3 maps negative ids: where(i < 0, i + n, i)).
_ID_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Where", "Max", "Min", "Clip", "Mod", "Abs"})


def index_limit(value: ir.Value) -> int | None:
    """Rows of the smallest constant table that integer input ``value`` indexes, else None.

    Follows Casts, reshapes and index arithmetic to every Gather (or GatherND: ``param[ids]``)
    that takes the ids as indices of a constant (an embedding); other uses (Shape, masks) do
    not bound the values.
    A constant added on the way (``ids + 3``) lowers the limit by as much; a Where takes the
    ids back unshifted (Keras 3's where(i < 0, i + n, i) leaves valid ids as they are).
    """
    limits: list[int] = []
    pending: list[tuple[ir.Value, int]] = [(value, 0)]
    seen: set[int] = set()
    while pending:
        current, offset = pending.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        for use in current.uses():
            node = use.node
            if (node.op_type in ID_PASS and use.idx == 0) or node.op_type in _ID_ARITHMETIC:
                pending.append((node.outputs[0], offset + _shift(node, use.idx)))
            elif node.op_type in ("Gather", "GatherBlockQuantized") and use.idx == 1:
                table = node.inputs[0]
                shape = table.shape if table is not None and table.const_value is not None else None
                key = "gather_axis" if node.op_type == "GatherBlockQuantized" else "axis"
                axis = attr_int(node, key, 0)
                if shape is not None and isinstance(rows := shape[axis], int) and rows > offset:
                    limits.append(rows - offset)
            elif node.op_type == "GatherND" and use.idx == 1:
                found = _gather_nd_rows(node)  # param[idx]: indices [..., k] into k dims
                if found is not None and found > offset:
                    limits.append(found - offset)
    return min(limits) if limits else None


def unchecked_tables(model_path: Path) -> dict[str, int]:
    """Input name -> rows of a 4-bit table (GatherBlockQuantized) it indexes directly.

    ORT's GatherBlockQuantized does not check its indices: an id past the table reads other
    memory instead of failing, so such data must be refused before it runs (an int4
    bundle validated on ids 600 of a 500-row table 'passed'). Only ids that reach the table
    through casts and reshapes count; index arithmetic may bring others into range.
    """
    model = ir.load(model_path)
    found: dict[str, int] = {}
    for value in model.graph.inputs:
        pending, rows = [value], list[int]()
        while pending:
            for use in pending.pop().uses():
                node = use.node
                if node.op_type in ID_PASS and use.idx == 0:
                    pending.append(node.outputs[0])
                elif node.op_type == "GatherBlockQuantized" and use.idx == 1:
                    table = node.inputs[0]
                    axis = attr_int(node, "gather_axis", 0)
                    shape = table.shape if table is not None else None
                    if shape is not None and isinstance(count := shape[axis], int):
                        rows.append(count)
        if rows and value.name:
            found[value.name] = min(rows)
    return found


def _gather_nd_rows(node: ir.Node) -> int | None:
    """The smallest of the dims a GatherND's index tuples address in its constant data."""
    data, indices = node.inputs[0], node.inputs[1]
    if data is None or data.const_value is None or data.shape is None:
        return None
    if indices is None or indices.shape is None or not indices.shape.rank():
        return None
    width = indices.shape[-1]
    batch = attr_int(node, "batch_dims", 0)
    if not isinstance(width, int) or batch + width > data.shape.rank():
        return None
    dims = [data.shape[batch + i] for i in range(width)]
    sizes = [d for d in dims if isinstance(d, int) and d > 0]
    return min(sizes) if sizes and len(sizes) == len(dims) else None


def _shift(node: ir.Node, idx: int) -> int:
    """What ``node`` adds to the ids arriving at input ``idx``: ``ids + 3`` is 3, a Where resets."""
    if node.op_type == "Where":
        return 0 if idx == 0 else -_where_offset(node, idx)
    if node.op_type not in ("Add", "Sub") or len(node.inputs) != 2:
        return 0
    other = _int_scalar(node.inputs[1 - idx])
    if other is None or (node.op_type == "Sub" and idx == 1):
        return 0
    return other if node.op_type == "Add" else -other


def _where_offset(node: ir.Node, idx: int) -> int:
    """The offset the ids carried into a Where branch, so that the Where's output has none.

    The branch value was produced from the ids by a constant ``Add``/``Sub`` (or came as is);
    undoing it here leaves ids that reach a Gather through the Where unshifted.
    """
    branch = node.inputs[idx]
    producer = branch.producer() if branch is not None else None
    if producer is None or producer.op_type not in ("Add", "Sub"):
        return 0
    for i, operand in enumerate(producer.inputs[:2]):
        if operand is not None and _int_scalar(operand) is None:
            return _shift(producer, i)
    return 0


def _int_scalar(value: ir.Value | None) -> int | None:
    """The integer a one-element constant (initializer or Constant node) holds, else None."""
    if value is None:
        return None
    tensor = value.const_value
    producer = value.producer()
    if tensor is None and producer is not None and producer.op_type == "Constant":
        attr = producer.attributes.get("value")
        tensor = attr.value if attr is not None else None
    if tensor is None:
        return None
    array = tensor.numpy()
    if array.size != 1 or array.dtype.kind not in "iu":
        return None
    return int(array.reshape(-1)[0])


def io_signature(model: ir.Model) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The manifest's ``inputs`` and ``outputs``: ``{name, dtype, shape}``, symbols as strings.

    An integer input that indexes embedding tables also gets ``index_limit`` (:func:`index_limit`),
    so the samples onnxpipe generates for it later stay in range.
    """
    initializers = set(model.graph.initializers)

    def entry(value: ir.Value) -> dict[str, Any]:
        dtype = value.dtype.numpy().name if value.dtype is not None else None
        shape: list[int | str] = []
        for axis, dim in enumerate(value.shape or ()):
            # an unnamed free dim gets a symbol: the contract's dims are ints or symbols
            shape.append(
                dim if isinstance(dim, int) else (dim.value or unnamed_dim(value.name, axis))
            )
        return {"name": value.name, "dtype": dtype, "shape": shape}

    inputs = []
    for value in model.graph.inputs:
        if value.name in initializers:
            continue
        limit = index_limit(value) if value.dtype is not None and value.dtype.is_integer() else None
        inputs.append(entry(value) | ({"index_limit": limit} if limit else {}))
    return inputs, [entry(v) for v in model.graph.outputs]


# Ops whose outputs change from run to run (and between runtimes): no parity is possible.
RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
     "Bernoulli"}
)  # fmt: skip


def random_outputs(model: ir.Model | Path) -> dict[str, str]:
    """Graph outputs that depend on a random op, mapped to that op's type.

    Two runs of such an output differ (ORT reseeds per session, a framework has its own
    generator), so parity and gates must leave it out rather than fail on it.
    """
    if isinstance(model, Path):
        model = ir.load(model)
    tainted: dict[str, str] = {}
    changed = True
    while changed:  # graphs are usually sorted: one or two sweeps
        changed = False
        for node in model.graph:
            origin = _random_origin(node, tainted)
            for out in node.outputs if origin else ():
                if out.name and out.name not in tainted:
                    tainted[out.name] = origin
                    changed = True
    return {v.name: tainted[v.name] for v in model.graph.outputs if v.name in tainted}


def _random_origin(node: ir.Node, tainted: dict[str, str]) -> str:
    """The random op that ``node``'s outputs depend on, or ''."""
    inner: list[ir.Node] = []
    for attr in node.attributes.values():
        if attr.type == ir.AttributeType.GRAPH:
            inner += ir.traversal.RecursiveGraphIterator(attr.value)
        elif attr.type == ir.AttributeType.GRAPHS:
            for graph in attr.value:
                inner += ir.traversal.RecursiveGraphIterator(graph)
    for each in (node, *inner):  # a subgraph's nodes may read values captured from outside
        if each.op_type in RANDOM_OPS and each.domain in ("", "ai.onnx"):
            return each.op_type
        for value in each.inputs:
            if value is not None and value.name in tainted:
                return tainted[value.name]
    return ""
