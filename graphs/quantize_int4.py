"""Int4 weight-only quantization: MatMul with constant weights -> MatMulNBits (ORT contrib).

Weights are stored as 4-bit blocks (``block_size`` values share a scale), activations stay
float; the CPU kernel dequantizes on the fly. Suited to large MatMul weights (transformers).
ORT's quantizer skips Gemm (with an error in its log), so a plain Gemm with a constant weight
(a classifier head) is first rewritten as MatMul + Add; Conv is left alone. Embedding tables
(Gather on a constant 2-D table) become GatherBlockQuantized, blocked along the hidden axis: on
all-MiniLM-L6-v2 the word embeddings are half the parameters, so with them the file is 6.3x
smaller than fp32 instead of 1.66x, at pooled cosine 0.9675 instead of 0.9714 (symmetric
weights; asymmetric, the default, 0.9746 and 0.9765).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import Field

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import (
    GraphPass,
    PassConfig,
    attr_int,
    computed_weights_hint,
    copy_model,
    new_initializer,
)
from onnxpipe.graphs.int4_tables import (
    at_opset_21,
    byte_packable,
    byte_packed_tables,
    embedding_tables,
    unbounded_tables,
)
from onnxpipe.graphs.quant_exclude import split_exclude
from onnxpipe.graphs.quant_rounding import act_order, gptq_round, input_hessians
from onnxpipe.graphs.quant_utils import Feeds, from_proto, refuse_quantized, to_proto

logger = logging.getLogger(__name__)


class QuantizeInt4Config(PassConfig):
    """Settings of :class:`QuantizeInt4Pass`."""

    block_size: int = Field(default=32, ge=16, description="weights sharing one scale (power of 2)")
    symmetric: bool = Field(
        default=False,
        description="symmetric 4-bit weights, no zero points. Off: a block's 16 levels then "
        "span its own min..max instead of -max..max, which on all-MiniLM-L6-v2 raised pooled "
        "cosine from 0.9678 to 0.9746 for 2.5% more bytes (6.37x -> 6.21x smaller) at the "
        "same speed",
    )
    accuracy_level: int = Field(
        default=4,
        ge=0,
        le=4,
        description="MatMulNBits compute type: 4 = int8 activations (fastest)",
    )
    embeddings: bool = Field(
        default=True, description="also store Gather embedding tables in 4 bits"
    )
    exclude: tuple[str, ...] = Field(default=(), description="node names kept in float")
    rounding: Literal["gptq", "nearest"] = Field(
        default="gptq",
        description="4-bit values of MatMul weights: error-compensating (GPTQ with act-order, on "
        "the calibration feeds; to nearest without them) or to nearest",
    )


HESSIAN_SAMPLES = 256
"""Calibration samples (sentences: every real token is a row) the GPTQ statistics use."""
Unpacked = tuple[np.ndarray, np.ndarray, np.ndarray]
"""A MatMulNBits' 4-bit values [N, blocks x block_size], scales and zero points [N, blocks]."""
HESSIAN_BYTES = 1 << 30
"""GPTQ statistics (float64 ``K x K`` per MatMul input) held at once; more take more passes."""


class QuantizeInt4Pass(GraphPass[QuantizeInt4Config]):
    """Rewrite MatMuls with constant 2-D weights into MatMulNBits.

    Refuses a quantized model and a model with no MatMul on constant weights (nothing to do).
    ``calibration`` feeds (samples like the real inputs) make ``rounding="gptq"`` apply.
    """

    name = "quantize_int4"
    config_class = QuantizeInt4Config
    modifies_in_place = False

    def __init__(
        self,
        config: QuantizeInt4Config | None = None,
        *,
        calibration: Sequence[Feeds] = (),
        **settings: Any,
    ) -> None:
        super().__init__(config, **settings)
        self.calibration = list(calibration)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Return the model with 4-bit MatMul weights (a new object)."""
        from onnxruntime.quantization.matmul_nbits_quantizer import (  # noqa: PLC0415
            MatMulNBitsQuantizer,
        )

        refuse_quantized(model, self.name)
        cfg = self.config
        if cfg.block_size & (cfg.block_size - 1):
            raise PassError(f"{self.name}: block_size {cfg.block_size} is not a power of 2.")
        nodes, op_types = split_exclude(model, cfg.exclude, self.name)
        if "MatMul" in op_types:  # ORT's quantizer takes an empty op list as 'all of them'
            raise PassError(
                f"{self.name}: --exclude MatMul leaves nothing to quantize: int4 is weight-only "
                "for MatMul. Exclude single MatMul nodes by name instead."
            )
        wanted = {"MatMul"} - op_types
        model = copy_model(model)
        if "Gemm" not in op_types:
            _gemm_as_matmul(model, set(nodes))
        folded = _fold_weight_transposes(model, set(nodes))
        float_tables: dict[str, str] = {}
        if cfg.embeddings and "Gather" not in op_types:
            float_tables = unbounded_tables(model, set(nodes))
            nodes = [*nodes, *float_tables]
        proto, skipped = to_proto(model), None
        versions = (_opset(proto), proto.ir_version)
        tables_wanted = cfg.embeddings and "Gather" not in op_types
        tables_wanted = tables_wanted and embedding_tables(model, set(nodes)) > 0
        packed = tables_wanted and byte_packable(model, set(nodes))
        if tables_wanted and not packed:  # UINT4 tables: a proper opset 21
            proto, skipped = at_opset_21(proto)
        wanted |= {"Gather"} if tables_wanted and not skipped else set()
        quantizer = MatMulNBitsQuantizer(
            proto,
            block_size=cfg.block_size,
            is_symmetric=cfg.symmetric,
            accuracy_level=cfg.accuracy_level,
            nodes_to_exclude=nodes,
            op_types_to_quantize=tuple(sorted(wanted)),
            quant_axes=(("MatMul", 0), ("Gather", 1)),  # embeddings: blocks along hidden
        )
        with _relabel_unannounced(packed):
            quantizer.process()
        result = from_proto(quantizer.model.model)
        done = sum(1 for n in result.graph if n.op_type == "MatMulNBits")
        tables = sum(1 for n in result.graph if n.op_type == "GatherBlockQuantized")
        if packed and byte_packed_tables(result) == tables:
            _restore_versions(result, *versions)
        if not done:
            hint = computed_weights_hint(model, ("MatMul", "Gemm"))
            raise PassError(
                f"{self.name}: no MatMul with a constant 2-D weight to quantize. int4 is "
                f"weight-only for MatMul (transformers); use --mode static for CNNs.{hint}"
            )
        gptq = cfg.rounding == "gptq" and bool(self.calibration)
        rounded = _gptq_round(result, model, self.calibration) if gptq else []
        self.metrics = {
            "matmulnbits_nodes": done,
            "rounding": "gptq" if gptq else "nearest",
            "gptq_rounded_nodes": len(rounded),
            "embedding_tables": tables,
            **({"transposed_weights_folded": folded} if folded else {}),
            **({"embeddings_skipped": skipped} if skipped else {}),
            **({"embedding_tables_float": float_tables} if float_tables else {}),
            "block_size": cfg.block_size,
        }
        logger.info("quantize_int4: %d MatMul -> MatMulNBits, %d embedding tables", done, tables)
        return ir.passes.PassResult(result, modified=True)


def _opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


@contextlib.contextmanager
def _relabel_unannounced(packed: bool) -> Iterator[None]:
    """Silence ORT's relabelling warning when the tables will be bytes and labels restored.

    ORT says it forces opset 21 "but the generated model may not be a valid model": true of
    UINT4 tables, not once :func:`byte_packed_tables` and :func:`_restore_versions` ran.
    """
    quantizer_log = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quantizer_log.level
    if packed:
        quantizer_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        quantizer_log.setLevel(level)


def _restore_versions(result: ir.Model, opset: int, ir_version: int) -> None:
    """Give ``result`` back the opset and IR version of the model ORT quantized.

    ORT's quantizer relabels a model with 4-bit tables as opset 21 / IR 10 (UINT4 tensors
    need them) without converting its ops; once the tables are uint8 bytes, nothing needs
    them, nor :func:`at_opset_21`'s conversion: on the converted all-MiniLM-L6-v2 (with the
    converter's shape annotations) ORT fused Add + LayerNormalization into
    SkipLayerNormalization, 0.12 ms slower per run (batch 1, 12 tokens, 1 thread).
    """
    for domain in ("", "ai.onnx"):
        if domain in result.opset_imports:
            result.opset_imports[domain] = opset
    result.ir_version = ir_version


def _gptq_round(result: ir.Model, model: ir.Model, feeds: Sequence[Feeds]) -> list[str]:
    """GPTQ-round the 4-bit weights of ``result``'s MatMulNBits, in place; returns the nodes.

    ``model`` is the float model ORT quantized (MatMuls matched by weight name: ORT stores
    ``W`` as ``W_Q4``); a weight that several MatMuls share, or whose zero points are not
    packed uint8, keeps ORT's rounding.
    """
    floats: dict[str, ir.Node] = {}
    for i, node in enumerate(model.graph):
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        if weight is not None and weight.const_value is not None and len(weight.uses()) == 1:
            node.name = f"{node.name}#{i}"  # unique keys for the statistics (a copy's names)
            floats[weight.name or ""] = node
    # weight name -> the MatMulNBits and its unpacked values, scales and zero points
    targets: dict[str, tuple[ir.Node, Unpacked]] = {}
    for node in result.graph:
        stored = node.inputs[1] if node.op_type == "MatMulNBits" else None
        name = (stored.name or "").removesuffix(f"_Q{attr_int(node, 'bits', 4)}") if stored else ""
        unpacked = _unpacked(node) if name in floats else None
        if unpacked is not None:
            targets[name] = (node, unpacked)
    if not targets:
        return []
    quantized = {floats[name].name or "": target for name, target in targets.items()}
    for batch in _within_budget([floats[name] for name in targets]):
        hessians = input_hessians(model, feeds, batch, HESSIAN_SAMPLES)
        for matmul in batch:
            key = matmul.name or ""
            _round_one(*quantized[key], matmul, hessians[key])
    logger.info("quantize_int4: GPTQ rounding on %d MatMuls", len(targets))
    return [node.name or "" for node, _ in targets.values()]


def _within_budget(nodes: list[ir.Node]) -> list[list[ir.Node]]:
    """``nodes`` in runs whose distinct inputs' statistics fit :data:`HESSIAN_BYTES`."""
    batches: list[list[ir.Node]] = [[]]
    held: set[str] = set()
    used = 0
    for node in nodes:
        name = (node.inputs[0].name if node.inputs[0] is not None else None) or ""
        k = int(node.inputs[1].const_value.shape[0])  # type: ignore[union-attr, arg-type]
        cost = 0 if name in held else 8 * k * k
        if batches[-1] and used + cost > HESSIAN_BYTES:
            batches.append([])
            held, used, cost = set(), 0, 8 * k * k
        batches[-1].append(node)
        held.add(name)
        used += cost
    return batches


def _round_one(node: ir.Node, unpacked: Unpacked, matmul: ir.Node, h: np.ndarray) -> None:
    """GPTQ-round MatMulNBits ``node`` from its float ``matmul`` and input statistic ``h``.

    ``unpacked`` is ``node``'s :data:`Unpacked`, read once when the targets were chosen.
    """
    q, scale, zero = unpacked
    k, block = attr_int(node, "K", 0), attr_int(node, "block_size", 32)
    w = matmul.inputs[1].const_value.numpy().T  # type: ignore[union-attr]
    scales, zeros = (np.repeat(a, block, axis=1)[:, :k] for a in (scale, zero))
    top = (1 << attr_int(node, "bits", 4)) - 1
    q[:, :k] = gptq_round(w, scales, zeros, h, (0, top), False, act_order(h))
    stored = node.inputs[1]
    assert stored is not None and stored.const_value is not None
    packed = _pack(q).reshape(stored.const_value.shape.numpy())
    stored.const_value = ir.tensor(packed, name=stored.name)


def _unpacked(node: ir.Node) -> Unpacked | None:
    """A 4-bit MatMulNBits' values [N, blocks x block_size], scales and zero points [N, blocks].

    None when it is not 4-bit or its zero points are not packed uint8 (absent: 8).
    """
    stored, scales = node.inputs[1], node.inputs[2]
    zeros = node.inputs[3] if len(node.inputs) > 3 else None
    if attr_int(node, "bits", 4) != 4 or stored is None or scales is None:
        return None
    if stored.const_value is None or scales.const_value is None:
        return None
    n = attr_int(node, "N", 0)
    scale = scales.const_value.numpy().astype(np.float64).reshape(n, -1)
    if zeros is None:
        zero = np.full(scale.shape, 8.0)
    elif zeros.const_value is None or zeros.const_value.dtype != ir.DataType.UINT8:
        return None
    else:
        zero = _unpack(zeros.const_value.numpy().reshape(n, -1))[:, : scale.shape[1]]
    return _unpack(stored.const_value.numpy().reshape(n, -1)), scale, zero.astype(np.float64)


def _unpack(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., m] -> [..., 2m] 4-bit values as float64, low nibble first (MatMulNBits)."""
    pairs = np.stack([packed & 15, packed >> 4], axis=-1)
    return pairs.reshape(*packed.shape[:-1], -1).astype(np.float64)


def _pack(values: np.ndarray) -> np.ndarray:
    """The inverse of :func:`_unpack`: [..., 2m] values in 0..15 -> uint8 [..., m]."""
    q = values.astype(np.uint8).reshape(*values.shape[:-1], -1, 2)
    return (q[..., 0] | (q[..., 1] << 4)).astype(np.uint8)


def _gemm_as_matmul(model: ir.Model, keep: set[str]) -> None:
    """Rewrite plain Gemm nodes on a constant 2-D weight as MatMul (+ Add), in place.

    Plain: no transA, alpha = beta = 1. Nodes named in ``keep`` stay.
    """
    for node in list(model.graph):
        weight = node.inputs[1] if node.op_type == "Gemm" and len(node.inputs) > 1 else None
        if weight is None or weight.const_value is None or node.name in keep:
            continue
        attrs = {k: a.value for k, a in node.attributes.items()}
        plain = attrs.get("alpha", 1.0) == 1.0 and attrs.get("beta", 1.0) == 1.0
        array = weight.const_value.numpy()
        if attrs.get("transA", 0) or not plain or array.ndim != 2 or len(weight.uses()) != 1:
            continue
        if attr_int(node, "transB", 0):
            weight.const_value = ir.tensor(np.ascontiguousarray(array.T), name=weight.name)
            weight.shape = ir.Shape(array.T.shape)
        matmul = ir.node("MatMul", [node.inputs[0], weight], name=f"{node.name}.matmul")
        model.graph.insert_before(node, matmul)
        result = matmul.outputs[0]
        bias = node.inputs[2] if len(node.inputs) > 2 else None
        if bias is not None:
            add = ir.node("Add", [result, bias], name=f"{node.name}.bias")
            model.graph.insert_before(node, add)
            result = add.outputs[0]
        old = node.outputs[0]
        result.shape = old.shape
        if old.dtype is not None:
            result.dtype = old.dtype
        old.replace_all_uses_with(result, replace_graph_outputs=True)
        name = old.name
        model.graph.remove(node, safe=True)
        result.name = name


def _fold_weight_transposes(model: ir.Model, keep: set[str]) -> int:
    """Give MatMuls that read ``Transpose(constant)`` a transposed constant; returns how many.

    A tied LM head (GPT-2: logits = h @ wte.T) reads the embedding table through a
    Transpose, which ORT's 4-bit quantizer does not look through: the head stayed float, the
    largest weight of the model, next to the table's 4-bit copy. Its own transposed copy is
    quantized like any MatMul weight. Nodes named in ``keep`` stay.
    """
    folded = 0
    for node in list(model.graph):
        weight = node.inputs[1] if node.op_type == "MatMul" and len(node.inputs) > 1 else None
        producer = weight.producer() if weight is not None else None
        if producer is None or producer.op_type != "Transpose" or node.name in keep:
            continue
        source = producer.inputs[0]
        perm = producer.attributes["perm"].value if "perm" in producer.attributes else None
        if source is None or list(perm or (1, 0)) != [1, 0]:
            continue
        tensor = source.const_value
        if tensor is None or len(tensor.shape) != 2:
            continue
        array = np.ascontiguousarray(tensor.numpy().T)
        node.replace_input_with(1, new_initializer(model.graph, f"{source.name}.T", array))
        if not producer.outputs[0].uses() and not producer.outputs[0].is_graph_output():
            model.graph.remove(producer, safe=True)
        folded += 1
    return folded
