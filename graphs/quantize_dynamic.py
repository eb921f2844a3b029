"""Dynamic int8 quantization for MatMul/Gemm/attention models, on ORT's quantizer.

Weights become int8 (per output channel by default), activations are quantized at run time
(DynamicQuantizeLinear + MatMulInteger, or DynamicQuantizeMatMul after ORT's fusion).

Before quantizing, ORT's transformer optimizer fuses BERT-like encoders (Attention,
SkipLayerNormalization, BiasGelu) when it recognises every attention block; the fused
Attention is then quantized as QAttention. Measured on all-MiniLM-L6-v2 (TorchScript export,
batch 1, seq 14, 2 threads): 2.25x faster than fp32 against 1.94x unfused, same cosine. When
attention does not fuse (e.g. dynamo's decomposed SDPA), the fusion is skipped: the partial
fusions alone measured slower (1.44x vs 1.76x) because the quantizer leaves their MatMuls
unfused. EmbedLayerNormalization is not fused: it would hide the embedding tables from the
quantizer (MiniLM's size ratio was 1.54x with it, 3.96x without, same speed).

With statistics feeds (``--calib``, else ``--eval``), activation outliers are smoothed into
the weights first (:mod:`onnxpipe.graphs.smooth_quant`): MiniLM's pooled cosine went from
0.9924 to 0.9957 on held-out sentences.

Conv is never quantized dynamically: ORT's ConvInteger has no fast CPU kernel (measured on
EfficientNet-Lite0: 20x slower than fp32 with 42% top-1 agreement). Conv nodes stay float
and the pass says so; when Conv holds most of the weights the pass refuses and points to
static mode, since dynamic quantization would then buy neither size nor speed.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from pydantic import Field

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import GraphPass, PassConfig
from onnxpipe.graphs.quant_exclude import split_exclude
from onnxpipe.graphs.quant_utils import (
    Feeds,
    load_from_ort,
    refuse_quantized,
    save_for_ort,
    scratch_dir,
    working_directory,
)
from onnxpipe.graphs.smooth_quant import ALPHA, smooth_model

logger = logging.getLogger(__name__)

DYNAMIC_OPS = ("MatMul", "Gemm", "Attention", "LSTM", "GRU", "Gather")


class QuantizeDynamicConfig(PassConfig):
    """Settings of :class:`QuantizeDynamicPass`."""

    per_channel: bool = Field(default=True, description="one weight scale per output channel")
    reduce_range: bool = Field(default=False, description="7-bit weights (x86 without VNNI)")
    exclude: tuple[str, ...] = Field(default=(), description="node names or op types kept in float")
    fuse_transformer: bool = Field(
        default=True,
        description="fuse BERT-like attention with ORT's transformer optimizer first, if it fuses",
    )
    num_heads: int = Field(
        default=0, ge=0, description="attention heads for the fusion (0: read from the graph)"
    )
    hidden_size: int = Field(
        default=0, ge=0, description="hidden size for the fusion (0: read from the graph)"
    )
    max_conv_share: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="refuse when Conv holds more than this share of the weight parameters",
    )
    smooth_alpha: float = Field(
        default=ALPHA,
        ge=0.0,
        le=1.0,
        description="SmoothQuant migration strength when statistics feeds are given (0: off)",
    )


class QuantizeDynamicPass(GraphPass[QuantizeDynamicConfig]):
    """Int8 weights and run-time-quantized activations for MatMul/Gemm/attention.

    With ``statistics`` feeds, MatMul/Attention/Gemm inputs are smoothed first
    (:mod:`onnxpipe.graphs.smooth_quant`).

    Refuses: a quantized model; a model without MatMul/Gemm weights; a Conv-heavy model
    (more than ``max_conv_share`` of the parameters in Conv), with a pointer to static mode.
    """

    name = "quantize_dynamic"
    config_class = QuantizeDynamicConfig
    modifies_in_place = False

    def __init__(
        self,
        config: QuantizeDynamicConfig | None = None,
        *,
        statistics: Sequence[Feeds] = (),
        **settings: Any,
    ) -> None:
        super().__init__(config, **settings)
        self.statistics = list(statistics)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Return the quantized model (a new object)."""
        from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

        refuse_quantized(model, self.name)
        cfg = self.config
        nodes, op_types = split_exclude(model, cfg.exclude, self.name)
        params = _weight_params(model)
        total = sum(params.values()) or 1
        conv_share = params.get("Conv", 0) / total
        dense = sum(params.get(op, 0) for op in DYNAMIC_OPS if op != "Gather")
        if not dense:
            raise PassError(
                f"{self.name}: the model has no MatMul/Gemm weights to quantize dynamically "
                f"(weights by op: {params}). Use --mode static with --calib DATA."
            )
        if conv_share > cfg.max_conv_share:
            raise PassError(
                f"{self.name}: {conv_share:.0%} of the weights are in Conv nodes. Dynamic mode "
                "would leave them in float (ORT's ConvInteger measured 20x slower than fp32 "
                "Conv with 42% top-1 agreement on EfficientNet-Lite0), so it buys neither size "
                "nor speed here. Use --mode static --calib DATA (or --auto) instead."
            )
        ops = [op for op in DYNAMIC_OPS if op not in op_types]
        # ORT's dynamic quantizer rewrites each Gemm as MatMul '<name>_MatMul' + Add before it
        # reads the exclusions: an excluded Gemm (by name or op type) is excluded by that name.
        gemms = {n.name for n in model.graph if n.op_type == "Gemm" and n.name}
        excluded_gemms = sorted(gemms if "Gemm" in op_types else gemms & set(nodes))
        ort_excluded = [*nodes, *(f"{name}_MatMul" for name in excluded_gemms)]
        extra: dict[str, Any] = {"MatMulConstBOnly": True}
        if any(n.domain == "com.microsoft" for n in model.graph):  # optimize --transformer's
            extra["DefaultTensorType"] = onnx.TensorProto.FLOAT  # ops carry no types for ORT
        fusion: dict[str, Any] = {"applied": False}
        with scratch_dir() as tmp:
            src = save_for_ort(model, tmp / "in.onnx")
            out = tmp / "out.onnx"
            if cfg.fuse_transformer and not nodes and not op_types:
                fusion = _fuse_transformer(model, src, tmp / "fused.onnx", cfg)
                if fusion["applied"]:
                    src = tmp / "fused.onnx"
                    # The fused contrib ops carry no type info the quantizer can read.
                    extra["DefaultTensorType"] = onnx.TensorProto.FLOAT
            smoothing: dict[str, Any] = {"smoothed_nodes": 0}
            if self.statistics and cfg.smooth_alpha > 0:
                smoothing = smooth_model(
                    src, tmp / "smoothed.onnx", self.statistics, cfg.smooth_alpha, nodes
                )
                src = tmp / "smoothed.onnx"
            quantize_dynamic(
                str(src),
                str(out),
                op_types_to_quantize=ops,
                per_channel=cfg.per_channel,
                reduce_range=cfg.reduce_range,
                weight_type=QuantType.QInt8,
                nodes_to_exclude=ort_excluded,
                extra_options=extra,
            )
            result = load_from_ort(out)
        counts: dict[str, int] = {}
        for node in result.graph:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        conv = sum(1 for n in model.graph if n.op_type == "Conv")
        self.metrics = {
            "quantized_op_types": ops,
            "excluded_nodes": [*nodes, *(n for n in excluded_gemms if n not in nodes)],
            "conv_kept_float": conv,
            "conv_weight_share": round(conv_share, 4),
            "integer_nodes": counts.get("MatMulInteger", 0)
            + counts.get("DynamicQuantizeMatMul", 0)
            + counts.get("QAttention", 0),
            "transformer_fusion": fusion,
            "smoothing": smoothing,
        }
        if conv:
            logger.info("quantize_dynamic: %d Conv nodes kept float (no fast ConvInteger)", conv)
        return ir.passes.PassResult(result, modified=True)


def _weight_params(model: ir.Model) -> dict[str, Any]:
    """Parameters of float initializers by the op type that consumes them."""
    sizes: dict[str, int] = {}
    for value in model.graph.initializers.values():
        tensor = value.const_value
        if tensor is None or value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
            continue
        users = {use.node.op_type for use in value.uses()}
        count = int(np.prod(tensor.shape.numpy())) if tensor.shape.rank() else 1
        for op in users:
            sizes[op] = sizes.get(op, 0) + count
    return sizes


def _fuse_transformer(
    model: ir.Model, src: Path, out: Path, cfg: QuantizeDynamicConfig
) -> dict[str, Any]:
    """Run ORT's BERT optimizer (opt_level 1: portable) into ``out``.

    Kept only when every attention block (Softmax) fused; the returned dict says what fused
    and, under ``applied``, whether ``out`` holds the fused model.
    """
    from onnxruntime.transformers.fusion_options import FusionOptions  # noqa: PLC0415
    from onnxruntime.transformers.optimizer import optimize_model  # noqa: PLC0415

    from onnxpipe.graphs.cleanup import ort_producer_warning_off  # noqa: PLC0415

    heads, hidden = cfg.num_heads, cfg.hidden_size
    if not (heads and hidden):
        found = attention_shape(model)
        if found is None:
            return {"applied": False, "reason": "no attention heads/hidden size in the graph"}
        heads, hidden = heads or found[0], hidden or found[1]
    softmax = sum(1 for n in model.graph if n.op_type == "Softmax")
    options = FusionOptions("bert")
    # EmbedLayerNormalization would hide the embedding Gathers from the quantizer: their
    # tables (a third of MiniLM's weights) would stay fp32.
    options.enable_embed_layer_norm = False
    # SkipLayerNormalization ran slower than the Add + LayerNormalization it replaces: on
    # all-MiniLM-L6-v2 (batch 1, 12 tokens, 2 threads, Xeon with AVX-512) 1.64x -> 1.79x of
    # fp32 without it, outputs the same to float rounding.
    options.enable_skip_layer_norm = False
    with working_directory(out.parent), ort_producer_warning_off():
        fused = optimize_model(
            str(src),
            model_type="bert",
            num_heads=heads,
            hidden_size=hidden,
            opt_level=1,
            optimization_options=options,
        )
    stats = {k: v for k, v in fused.get_fused_operator_statistics().items() if v}
    attention = stats.get("Attention", 0) + stats.get("MultiHeadAttention", 0)
    info: dict[str, Any] = {"num_heads": heads, "hidden_size": hidden, "fused": stats}
    if not softmax or attention < softmax:
        logger.info(
            "transformer fusion skipped: %d of %d attention blocks fused", attention, softmax
        )
        return {
            **info,
            "applied": False,
            "reason": f"{attention} of {softmax} attention blocks fused",
        }
    fused.save_model_to_file(str(out))
    logger.info("transformer fusion: %s", stats)
    return {**info, "applied": True}


def attention_shape(model: ir.Model) -> tuple[int, int] | None:
    """(heads, hidden) from a Reshape to [batch, seq, heads, head_size].

    The target shape is a constant or a Concat of run-time dims and constants (TorchScript
    exports); heads * head_size must match a LayerNormalization width. None when the graph
    shows neither.
    """
    widths = set()
    for node in model.graph:
        if node.op_type == "LayerNormalization" and len(node.inputs) > 1:
            scale = node.inputs[1]
            if scale is not None and scale.const_value is not None:
                widths.add(int(scale.const_value.numpy().shape[0]))
    for node in model.graph:
        if node.op_type != "Reshape" or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        shape = node.inputs[1]
        dims = _const_ints(shape)
        producer = shape.producer()
        if dims is None and producer is not None and producer.op_type == "Concat":
            parts = [_const_ints(v) if v is not None else None for v in producer.inputs]
            if len(parts) == 4:
                dims = [p[0] if p is not None and len(p) == 1 else -1 for p in parts]
        if not dims or len(dims) != 4 or dims[3] <= 0:
            continue
        if dims[2] > 0 and dims[2] * dims[3] in widths:
            return dims[2], dims[2] * dims[3]
        if dims[2] == -1 and len(widths) == 1:  # heads inferred: [batch, seq, -1, head_size]
            width = next(iter(widths))
            if width % dims[3] == 0:
                return width // dims[3], width
    return None


def _const_ints(value: ir.Value) -> list[int] | None:
    """The integers of a constant ``value`` (through Constant/Unsqueeze/Cast), else None."""
    for _ in range(4):
        if value.const_value is not None:
            return [int(d) for d in value.const_value.numpy().ravel()]
        producer = value.producer()
        if producer is None:
            return None
        if producer.op_type == "Constant":
            attr = producer.attributes.get("value")
            return [int(d) for d in attr.value.numpy().ravel()] if attr is not None else None
        if producer.op_type not in ("Unsqueeze", "Cast") or producer.inputs[0] is None:
            return None
        value = producer.inputs[0]
    return None
