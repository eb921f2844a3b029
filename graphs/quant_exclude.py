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
