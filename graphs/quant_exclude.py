"""``--exclude`` for every quantization mode: node names and op types, as the user sees them.

ORT's pre-processing renames what it fuses (a MatMul and its Add become one Gemm named
``<MatMul's name>/MatMulAddFusion``), so names from the bundle are mapped onto what the
quantizer sees.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxpipe.errors import PassError


def split_exclude(
    model: ir.Model, exclude: Sequence[str], pass_name: str
) -> tuple[list[str], set[str]]:
    """Split ``exclude`` into node names and op types of ``model``; unknown entries raise.

    An entry that is both (ORT's pre-processing names a node ``Gather``) counts as both:
    ``--exclude Gather`` left every other Gather quantized. The pre-processing also fuses a
    MatMul and its Add into a Gemm named ``<MatMul's name>/MatMulAddFusion``: the MatMul's
    name, and the op type ``MatMul``, reach that Gemm (the names the user sees in the bundle).
    """
    names = {n.name for n in model.graph}
    ops = {n.op_type for n in model.graph}
    fused = {
        n.name.removesuffix(_FUSED): n.name
        for n in model.graph
        if n.name and n.name.endswith(_FUSED) and n.op_type == "Gemm"
    }
    known = names | ops | set(fused) | ({"MatMul"} if fused else set())
    unknown = [e for e in exclude if e not in known]
    if unknown:
        fusion = (
            " ORT's pre-processing fused each MatMul and its Add into one Gemm; exclude the "
            f"MatMul's name (e.g. {next(iter(fused))}), which covers its Add too."
            if fused
            else ""
        )
        raise PassError(
            f"{pass_name}: --exclude {', '.join(unknown)}: no node or op type of that name in "
            f"the model. Op types present: {', '.join(sorted(ops))}.{fusion}"
        )
    nodes = [e if e in names else fused[e] for e in exclude if e in names or e in fused]
    if "MatMul" in exclude:
        nodes += fused.values()
    return list(dict.fromkeys(nodes)), {e for e in exclude if e in ops}


_FUSED = "/MatMulAddFusion"
"""What ORT's MatMulAddFusion appends to the MatMul's name for the Gemm it makes."""


def fused_add_names(before: ir.Model, after: ir.Model, exclude: Sequence[str]) -> tuple[str, ...]:
    """``exclude`` with each Add that pre-processing fused away named by its MatMul instead.

    ``before`` and ``after`` are the model before and after ORT's pre-processing, which fuses
    a MatMul and the Add after it into one Gemm named ``<MatMul's name>/MatMulAddFusion``:
    the user sees the Add in the bundle, and excluding its MatMul keeps both float.
    """
    now = {n.name for n in after.graph}
    matmul_of = {}
    for node in before.graph:
        if node.op_type != "Add" or not node.name or node.name in now:
            continue
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type == "MatMul":
                if f"{producer.name}{_FUSED}" in now:
                    matmul_of[node.name] = producer.name or ""
    return tuple(dict.fromkeys(matmul_of.get(e, e) for e in exclude))


_INDEX_MATH = frozenset(
    {
        "Abs", "Add", "Ceil", "Clip", "Div", "Exp", "Floor", "Identity", "Log", "Max", "Min",
        "Mod", "Mul", "Neg", "Pow", "Reciprocal", "Round", "Sqrt", "Sub", "Where",
        # shape-only: they carry the float values on unchanged
        "Expand", "Flatten", "Reshape", "Squeeze", "Transpose", "Unsqueeze",
    }
)  # fmt: skip
"""Ops whose float output is the element-by-element (or moved) image of their float inputs."""

_INTEGER_TYPES = frozenset(
    {
        ir.DataType.INT8, ir.DataType.INT16, ir.DataType.INT32, ir.DataType.INT64,
        ir.DataType.UINT8, ir.DataType.UINT16, ir.DataType.UINT32, ir.DataType.UINT64,
    }
)  # fmt: skip


def float_index_math(model: ir.Model) -> list[str]:
    """Names of the nodes whose float math ends in a Cast to an integer type (index math).

    T5's relative-position buckets are computed in float (``log(pos / max_exact) / log(..)
    * n``) and cast to int64 to index an embedding table: quantized, they land in the wrong
    buckets (the -inf of ``log(0)`` gave those tensors an infinite scale, and the indices a
    Gather refused). The walk runs back from each float-to-integer Cast through elementwise
    and shape-only ops (float Casts too) and stops at anything else. Unnamed nodes it finds
    are named, so that ORT can exclude them.
    """
    found: dict[int, ir.Node] = {}
    stack = [
        n.inputs[0].producer()
        for n in model.graph
        if n.op_type == "Cast"
        and n.inputs[0] is not None
        and _dtype(n.inputs[0]) in _FLOATS
        and ir.DataType(n.attributes.get_int("to", 0)) in _INTEGER_TYPES
    ]
    while stack:
        node = stack.pop()
        if node is None or id(node) in found or not _float_math(node):
            continue
        found[id(node)] = node
        stack += [v.producer() for v in node.inputs if v is not None and _dtype(v) in _FLOATS]
    taken = {n.name for n in model.graph}
    for node in found.values():
        if not node.name:
            name = f"{node.op_type}_index_math"
            while name in taken:
                name += "_"
            node.name = name  # a name changes nothing it computes; ORT excludes by name
            taken.add(name)
    return sorted(node.name or "" for node in found.values())


_FLOATS = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16})


def _float_math(node: ir.Node) -> bool:
    """Whether ``node`` is elementwise or shape-only math with a float output."""
    if not node.outputs or _dtype(node.outputs[0]) not in _FLOATS:
        return False
    if node.op_type == "Cast":  # float to float: the walk goes on; from integers it stops
        return node.inputs[0] is not None and _dtype(node.inputs[0]) in _FLOATS
    return node.domain in ("", "ai.onnx") and node.op_type in _INDEX_MATH


def _dtype(value: ir.Value, depth: int = 0) -> ir.DataType | None:
    """``value``'s element type, followed back through Casts and elementwise ops if unset.

    A graph built by hand (or a pass) may carry no inferred types in between.
    """
    if value.dtype is not None or depth > 64:
        return value.dtype
    if value.const_value is not None:
        return value.const_value.dtype
    node = value.producer()
    if node is None or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Cast":
        return ir.DataType(node.attributes.get_int("to", 0))
    if node.op_type not in _INDEX_MATH:
        return None
    data = node.inputs[1:2] if node.op_type == "Where" else node.inputs[:1]
    return _dtype(data[0], depth + 1) if data and data[0] is not None else None
