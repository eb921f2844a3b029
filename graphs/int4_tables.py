"""Embedding tables in int4 mode: which Gathers may become 4-bit, and the opset they need.

ORT's ``GatherBlockQuantized`` stores a table in 4-bit blocks but does not check its ids, so a
table is quantized only where its ids are known to stay inside it (see
:func:`unbounded_tables`). Tables are stored as uint8 bytes (:func:`byte_packed_tables`), so
the model keeps its opset; only a table of odd width keeps UINT4 tensors, which need opset 21
(:func:`at_opset_21`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir

from onnxpipe.graphs.base import ID_PASS, attr_int


def embedding_tables(model: ir.Model, keep: set[str]) -> int:
    """Gather nodes reading a constant 2-D table (embeddings), not named in ``keep``."""
    return len(_tables(model, keep))


def byte_packable(model: ir.Model, keep: set[str]) -> bool:
    """Whether every embedding table can be uint8 bytes (:func:`byte_packed_tables`).

    ORT reads uint8 tables gathered along axis 0 and blocked along their rows, whose 4-bit
    values fill whole bytes (an even width). Then the model keeps its opset; otherwise ORT's
    UINT4 tensors stay, which need opset 21 (:func:`at_opset_21`).
    """
    return all(width % 2 == 0 and axis == 0 for width, axis in _tables(model, keep))


def _tables(model: ir.Model, keep: set[str]) -> list[tuple[int, int]]:
    """(width, gather axis) of each Gather reading a constant 2-D table, not in ``keep``."""
    return [
        (int(node.inputs[0].const_value.shape.numpy()[1]), attr_int(node, "axis", 0))  # type: ignore[union-attr]
        for node in model.graph
        if node.op_type == "Gather"
        and node.name not in keep
        and node.inputs[0] is not None
        and node.inputs[0].const_value is not None
        and len(node.inputs[0].const_value.shape) == 2
    ]


_SAME_VALUES = ID_PASS | {"Slice", "Expand", "Tile", "Transpose", "Gather", "GatherElements",
                          "GatherND"}  # fmt: skip
"""Ops whose output holds only values of their first input."""


def unbounded_tables(model: ir.Model, keep: set[str]) -> dict[str, str]:
    """Embedding Gathers to keep float: name -> why. Named here if they had no name.

    ORT's GatherBlockQuantized does not check its ids: one past the table reads other memory
    and the model runs on, where a float Gather fails (a GPT-2 whose positions come from a
    Range, run past its context, returned numbers instead of an error). Ids from a graph input
    are checked by onnxpipe before it runs data and stated on the model card; ids taken from
    constants (BERT's position ids, sliced) are in range or not by their values. Any other
    computed ids keep their table float.
    """
    found: dict[str, str] = {}
    for index, node in enumerate(model.graph):
        if node.op_type != "Gather" or node.name in keep or len(node.inputs) != 2:
            continue
        table, ids = node.inputs
        if table is None or ids is None or table.const_value is None:
            continue
        if len(table.const_value.shape) != 2:
            continue
        rows = table.const_value.numpy().shape[attr_int(node, "axis", 0)]
        bounds = _id_bounds(ids)
        if bounds == "input" or (isinstance(bounds, tuple) and _within(bounds, rows)):
            continue
        node.name = node.name or f"gather_{index}"
        found[node.name] = (
            f"its ids are computed in the graph and may pass its {rows} rows (e.g. positions "
            "past the context), which a 4-bit table would not check"
        )
    return found


def _id_bounds(value: ir.Value, depth: int = 0) -> tuple[int, int] | str | None:
    """(min, max) the ids in ``value`` can take, "input" for a graph input's, None if unknown."""
    if value.is_graph_input():
        return "input"
    if value.const_value is not None:
        return _int_range(value.const_value.numpy())
    node = value.producer()
    if node is None or depth > 32:
        return None
    if node.op_type in ("Constant", "ConstantOfShape"):
        attr = next((a for k, a in node.attributes.items() if k.startswith("value")), None)
        if attr is None:  # ConstantOfShape's default fill
            return (0, 0) if node.op_type == "ConstantOfShape" else None
        value = attr.value
        array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        return _int_range(array)
    sources = node.inputs if node.op_type == "Concat" else node.inputs[:1]
    if node.op_type not in _SAME_VALUES and node.op_type != "Concat":
        return None
    found = [_id_bounds(v, depth + 1) if v is not None else None for v in sources]
    if found == ["input"] and node.op_type in ID_PASS:  # as onnxpipe's data checks follow them
        return "input"
    if not found or any(not isinstance(b, tuple) for b in found):
        return None
    low, high = zip(*found, strict=True)  # type: ignore[misc]
    return min(low), max(high)


def _within(bounds: tuple[int, int], rows: int) -> bool:
    """Whether ids from ``bounds[0]`` to ``bounds[1]`` all index a table of ``rows`` rows."""
    return -rows <= bounds[0] and bounds[1] < rows


def _int_range(array: np.ndarray) -> tuple[int, int] | None:
    """(min, max) of an integer array; None when empty or not integers."""
    if not array.size or array.dtype.kind not in "iub":
        return None
    return int(array.min()), int(array.max())


def at_opset_21(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, str | None]:
    """``proto`` converted to opset 21, which int4 tables need, or unchanged and the reason.

    ORT's quantizer would only relabel an older model as opset 21 (and warn that the result
    may be invalid: Reduce* and Split changed meaning at 18); the ONNX version converter
    rewrites the ops that changed.
    """
    version = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 21)
    if version >= 21:
        return proto, None
    try:
        converted = onnx.version_converter.convert_version(proto, 21)
        onnx.checker.check_model(converted)
    except Exception as e:  # noqa: BLE001 - the converter raises many kinds; tables stay float
        return proto, f"opset {version} -> 21 conversion failed ({type(e).__name__}: {e})"[:300]
    return converted, None


def byte_packed_tables(model: ir.Model) -> int:
    """Store GatherBlockQuantized tables as uint8 bytes (two 4-bit values each); returns how many.

    ORT's quantizer writes the table and its zero points as UINT4/INT4 tensors, for which
    ORT's CPU kernel reads every value through its 4-bit element type: on all-MiniLM-L6-v2 its
    3 lookups of 12 tokens took 110 us of a 2.5 ms run, against 9 us for the same table as
    uint8 bytes with ``bits=4`` (the form ORT also accepts; values and outputs are the same).
    Signed values (symmetric tables, no zero points) move to unsigned with the default zero
    point of uint8 data, 8. In place, in ``model``.
    """
    done, packed = 0, set()
    for node in model.graph:
        data = node.inputs[0] if node.op_type == "GatherBlockQuantized" else None
        if data is not None and data in packed:  # a table two lookups share: packed once
            node.attributes["bits"] = ir.AttrInt64("bits", 4)
            done += 1
            continue
        tensor = data.const_value if data is not None else None
        if data is None or tensor is None:
            continue
        if tensor.dtype not in (ir.DataType.UINT4, ir.DataType.INT4):
            continue
        values = tensor.numpy()
        if (
            attr_int(node, "quantize_axis", 1) != values.ndim - 1
            or attr_int(node, "gather_axis", 0) != 0
            or values.shape[-1] % 2
        ):
            continue  # uint8 tables: gathered along rows, blocked along them, whole bytes
        zeros = node.inputs[3] if len(node.inputs) > 3 else None
        zero_tensor = zeros.const_value if zeros is not None else None
        if zeros is not None and (zero_tensor is None or zero_tensor.dtype != tensor.dtype):
            continue
        shift = 8 if tensor.dtype == ir.DataType.INT4 else 0
        _set_bytes(data, _bytes(values, shift))
        if zeros is not None and zero_tensor is not None and zeros not in packed:
            _set_bytes(zeros, _bytes(zero_tensor.numpy(), shift))
            packed.add(zeros)
        packed.add(data)
        node.attributes["bits"] = ir.AttrInt64("bits", 4)
        done += 1
    return done


def _set_bytes(value: ir.Value, packed: np.ndarray) -> None:
    value.const_value = ir.tensor(packed, name=value.name)
    value.dtype, value.shape = ir.DataType.UINT8, ir.Shape(packed.shape)


def _bytes(values: np.ndarray, shift: int) -> np.ndarray:
    """4-bit ``values`` [..., n] (plus ``shift``) as uint8 [..., ceil(n / 2)], low nibble first."""
    q = values.astype(np.int16) + shift
    if q.shape[-1] % 2:
        q = np.concatenate([q, np.zeros((*q.shape[:-1], 1), q.dtype)], axis=-1)
    pairs = q.astype(np.uint8).reshape(*q.shape[:-1], -1, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).astype(np.uint8)
