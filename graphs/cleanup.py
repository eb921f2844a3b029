"""Cleanup: folding, dead-node/identity removal, dedup, ORT offline optimization, fusions.

Runs before the other compression passes and on its own as ``onnxpipe optimize``. The graph
rewrites are onnxscript's optimizer and onnx_ir's common passes; ``slim`` then runs onnxslim
(optional dependency); ``level`` runs ONNX Runtime's offline graph optimizer; ``transformer``
runs the fusions of ``onnxruntime.transformers.optimizer``, the maintained successor of
``onnxruntime-tools`` (attention, LayerNorm, GELU, embedding fusions for BERT-like models).

onnxslim is opt-in because it adds little here. Measured with onnxslim 0.1.98 against
``level="basic"``: all-MiniLM-L6-v2 216 -> 215 nodes (one Unsqueeze chain merged);
EfficientNet-Lite0 and the nine opset-9 zoo models in the onnx package, no node fewer, though
four zoo models keep 32-57 fewer initializers (27-49 KB) because onnxslim dedupes the weights
it folds; outputs identical; 0.2-14 s more per model (most on the 513 MB VGG-19).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar, Literal

import onnx_ir as ir
import onnx_ir.passes.common as common
from pydantic import Field, model_validator

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import GraphPass, PassConfig, copy_model, identity_output, ort_graph_level

logger = logging.getLogger(__name__)

LEVELS = ("none", "basic", "extended", "all")


class CleanupConfig(PassConfig):
    """Settings of :class:`CleanupPass`."""

    fold_constants: bool = Field(
        True, description="fold constant subgraphs (e.g. ConstantOfShape weights) into values"
    )
    level: Literal["none", "basic", "extended", "all"] = Field(
        "basic",
        description="ONNX Runtime offline optimization level: basic keeps standard ONNX ops "
        "(portable to every EP); extended adds ORT contrib fusions; all also bakes the CPU's "
        "NCHWc layout in (only for this CPU family)",
    )
    slim: bool = Field(
        False,
        description="run onnxslim (pip install onnxslim) after the onnxscript/onnx_ir passes: "
        "folds the large constants onnxscript leaves, simplifies shape-op chains (Unsqueeze "
        "after Unsqueeze), fuses Conv/Gemm with BatchNorm/Mul/Add and ties duplicate weights; "
        "graph inputs it drops as unused are put back",
    )
    transformer: str | None = Field(
        None,
        description="model type for onnxruntime.transformers.optimizer fusions "
        "(bert, gpt2, bart, vit, ...); None skips them",
    )
    num_heads: int = Field(0, ge=0, description="attention heads (0: detect from the graph)")
    hidden_size: int = Field(0, ge=0, description="hidden size (0: detect from the graph)")

    @model_validator(mode="after")
    def _heads_need_transformer(self) -> CleanupConfig:
        if self.transformer is not None:
            from onnxruntime.transformers.optimizer import MODEL_TYPES  # noqa: PLC0415

            if self.transformer not in MODEL_TYPES:
                raise ValueError(
                    f"transformer type {self.transformer!r} is not one ORT's optimizer knows; "
                    f"use one of {', '.join(sorted(MODEL_TYPES))}"
                )
        if (self.num_heads or self.hidden_size) and not self.transformer:
            raise ValueError("num_heads/hidden_size only apply with transformer=TYPE")
        if self.num_heads and self.hidden_size and self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self


def op_counts(model: ir.Model) -> dict[str, int]:
    """Nodes per op type in the main graph (``domain::op`` outside the default domain)."""
    return dict(
        collections.Counter(
            n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
            for n in model.graph
        )
    )


class CleanupPass(GraphPass[CleanupConfig]):
    """Fold, dedupe and simplify the graph, then optionally ORT-optimize and fuse it.

    Functional (returns a new model). Raises ``PassError`` when ONNX Runtime or the
    transformer optimizer cannot load the model, naming the step.
    """

    name = "cleanup"
    config_class = CleanupConfig
    modifies_in_place: ClassVar[bool] = False

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Run the steps in order; ``metrics`` get node/initializer counts and op tables."""
        cfg = self.config
        before = op_counts(model)
        inits_before = len(model.graph.initializers)
        model = copy_model(model)  # a private copy, weights in memory
        steps: list[str] = []
        if model.ir_version < 4:
            # IR < 4 lists every initializer as a graph input too (the opset-9 zoo models);
            # folding would drop the initializers and leave required inputs behind.
            model.ir_version = 4
            steps.append("ir_version 4")
        model = common.RemoveInitializersFromInputsPass()(model).model
        interface = [v.name for v in model.graph.inputs], [v.name for v in model.graph.outputs]
        fused: dict[str, int] | None = None
        if cfg.transformer:
            # first: ORT's fusion scripts match the graph as its exporter wrote it; after the
            # folding below, all-MiniLM-L6-v2 fused none of its 6 attention blocks
            model, fused = _transformer_fusions(model, cfg)
            steps.append(f"onnxruntime.transformers.optimizer ({cfg.transformer})")
        if cfg.fold_constants:
            import onnxscript.optimizer  # noqa: PLC0415 - heavy, only when folding

            onnxscript.optimizer.optimize_ir(model, num_iterations=2)
            steps.append("onnxscript.optimizer")
        for graph_pass in (
            common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1),
            common.IdentityEliminationPass(),
            common.DeduplicateInitializersPass(),
            common.RemoveUnusedNodesPass(),
        ):
            model = graph_pass(model).model
            steps.append(type(graph_pass).__name__)
        slim_metrics = None
        if cfg.slim:
            model, slim_metrics = _slim(model)
            steps.append("onnxslim")
        left_out: list[str] = []
        if cfg.level != "none":
            left_out = non_onnx_fusions(model)
            model = _ort_optimize(model, cfg.level, left_out)
            steps.append(f"onnxruntime offline optimization ({cfg.level})")
        model = common.RemoveUnusedOpsetsPass()(model).model  # ORT declares every domain
        keep_interface(model, *interface)
        after = op_counts(model)
        logger.info("cleanup: %d -> %d nodes", sum(before.values()), sum(after.values()))
        self.metrics = {
            "steps": steps,
            "nodes_before": sum(before.values()),
            "nodes_after": sum(after.values()),
            "initializers_before": inits_before,
            "initializers_after": len(model.graph.initializers),
            "ops_before": before,
            "ops_after": after,
            "slim": slim_metrics,
            "ort_fusions_disabled": left_out,
            **({"transformer_fusions": fused} if fused is not None else {}),
        }
        if fused is not None and not fused.get("Attention") and before.get("Softmax"):
            self.metrics["note"] = (
                f"--transformer {cfg.transformer}: no attention block fused. ORT's fusion "
                "scripts match TorchScript exports of eager attention: convert with --exporter "
                "torchscript (a transformers model loaded with attn_implementation='eager'), "
                "and give --num-heads and --hidden-size where the graph does not show them. "
                "The other fusions are in transformer_fusions."
            )
            logger.warning("%s", self.metrics["note"])
        return ir.passes.PassResult(model, modified=True)


def keep_interface(model: ir.Model, inputs: list[str | None], outputs: list[str | None]) -> None:
    """Give the graph its input and output names back where passes changed them, in place.

    A graph output that is also a graph input (a model returning its input) is valid ONNX;
    onnx_ir's OutputFixPass (run by the onnxscript optimizer) renamed the input ``x_orig``
    and added ``Identity(x_orig) -> x``, and the model then asked its callers for ``x_orig``.
    Such an output goes back to being the input itself. Identity removal made outputs ``[y,
    Identity(y) -> z]`` into ``[z, z]``: an output whose value another output, an input or an
    initializer also names gets an Identity of its own name again.
    """
    graph = model.graph
    if len(graph.inputs) != len(inputs) or len(graph.outputs) != len(outputs):
        return  # not a renaming
    renamed = {
        value: name for value, name in zip(graph.inputs, inputs, strict=True) if value.name != name
    }
    for index, value in enumerate(graph.outputs):
        node = value.producer()
        source = node.inputs[0] if node is not None and node.op_type == "Identity" else None
        if (
            node is not None
            and source in renamed
            and value.name == renamed[source] == outputs[index]
        ):
            graph.outputs[index] = source
            if not value.uses():
                graph.remove(node, safe=True)
    for value, name in renamed.items():
        value.name = name
    for index, (value, name) in enumerate(zip(graph.outputs, outputs, strict=True)):
        if name is None or value.name == name:
            continue
        shared = value.is_graph_input() or value.is_initializer()
        if shared or value.name in outputs or list(graph.outputs).count(value) > 1:
            graph.outputs[index] = identity_output(graph, value, name)
        else:
            value.name = name


def _slim(model: ir.Model) -> tuple[ir.Model, dict[str, int]]:
    try:
        import onnxslim  # noqa: PLC0415 - optional dependency
    except ImportError as e:
        raise PassError(
            "cleanup with slim (onnxpipe optimize --slim) needs onnxslim, which is not "
            "installed. Install it with: pip install onnxslim (or pip install "
            "'onnxpipe[slim]'), or run without --slim."
        ) from e
    try:
        slimmed = ir.serde.deserialize_model(onnxslim.slim(ir.serde.serialize_model(model)))
    except (KeyError, ValueError, AssertionError, RuntimeError, IndexError, TypeError) as e:
        raise PassError(f"onnxslim failed on the model: {e}. Run without --slim.") from e
    # onnxslim drops graph inputs that nothing reads, but the inputs are the bundle's
    # interface: a caller feeding e.g. an unused token_type_ids must keep working.
    kept = {value.name: value for value in slimmed.graph.inputs}
    inputs = [
        kept.get(value.name) or ir.Value(name=value.name, type=value.type, shape=value.shape)
        for value in model.graph.inputs
    ]
    slimmed.graph.inputs.clear()
    slimmed.graph.inputs.extend(inputs)
    logger.info("onnxslim: %d -> %d nodes", len(model.graph), len(slimmed.graph))
    return slimmed, {
        "nodes_before": len(model.graph),
        "nodes_after": len(slimmed.graph),
        "initializers_before": len(model.graph.initializers),
        "initializers_after": len(slimmed.graph.initializers),
    }


def non_onnx_fusions(model: ir.Model) -> list[str]:
    """ORT's fusions to leave out of a saved model: their op is ORT's, in the ONNX domain.

    ORT registers SimplifiedLayerNormalization (T5's RMSNorm, any opset) and, below opset 17,
    LayerNormalization as ops of the ONNX domain, which ONNX does not define: the saved model
    then fails the ONNX checker and every runtime but ORT. LayerNormFusionL1 (basic) fuses
    LayerNormalization at opset 17 and later only; LayerNormFusionL2 (extended) at any opset.
    With LayerNormFusionL1 off at opset 17, SimplifiedLayerNormFusion took the tail of every
    LayerNorm instead, so that one stays on.
    """
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0))
    return ["SimplifiedLayerNormFusion", *(["LayerNormFusionL2"] if opset < 17 else [])]


def _ort_optimize(model: ir.Model, level: str, disabled: list[str]) -> ir.Model:
    import onnxruntime as ort  # noqa: PLC0415

    with tempfile.TemporaryDirectory(prefix="onnxpipe-cleanup-") as tmp:
        source, target = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
        ir.save(model, source)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort_graph_level(level)
        options.optimized_model_filepath = str(target)
        options.log_severity_level = 3
        try:
            ort.InferenceSession(
                str(source),
                options,
                providers=["CPUExecutionProvider"],
                disabled_optimizers=disabled,
            )
        except (RuntimeError, ValueError) as e:  # ORT's Fail/InvalidGraph derive from these
            raise PassError(f"ONNX Runtime cannot load the model to optimize it: {e}") from e
        return ir.external_data.load_to_model(ir.load(target))


def _transformer_fusions(model: ir.Model, cfg: CleanupConfig) -> tuple[ir.Model, dict[str, int]]:
    """The model after ORT's fusions for ``cfg.transformer``, and the fused op counts."""
    from onnxruntime.transformers.optimizer import optimize_model  # noqa: PLC0415

    from onnxpipe.graphs.quantize_dynamic import attention_shape  # noqa: PLC0415

    heads, hidden = cfg.num_heads, cfg.hidden_size
    if not (heads and hidden):  # ORT's own guess missed all-MiniLM-L6-v2's 12 x 32
        found = attention_shape(model)
        heads, hidden = (heads or found[0], hidden or found[1]) if found else (heads, hidden)
    proto = ir.serde.serialize_model(model)
    try:
        with ort_producer_warning_off():
            optimized = optimize_model(
                proto,
                model_type=cfg.transformer or "bert",
                num_heads=heads or 0,
                hidden_size=hidden or 0,
                opt_level=0,
            )
    except (KeyError, ValueError, AssertionError, RuntimeError, IndexError, TypeError) as e:
        # IndexError: ORT's gpt2 postprocess reads the bias of every Gemm (a bias-free one fails)
        raise PassError(
            f"onnxruntime.transformers.optimizer ({cfg.transformer}) failed on this graph: "
            f"{type(e).__name__}: {e}. ORT's fusion scripts match the graphs its own export "
            "scripts write, and some exports (dynamo's GPT-2) do not fit them. Check "
            "--transformer, --num-heads and --hidden-size, or leave --transformer out (the "
            "other cleanup passes still run)."
        ) from e
    present = collections.Counter(n.op_type for n in model.graph)
    # ORT counts the fused ops in the result: those the input had already are not new
    counted = optimized.get_fused_operator_statistics().items()
    fused = {k: v - present[k] for k, v in counted if v - present[k] > 0}
    logger.info("transformer fusions: %s", fused)
    result = ir.serde.deserialize_model(optimized.model)
    domains = {n.domain for n in result.graph if n.domain not in ("", "ai.onnx")}
    for domain in domains - set(result.opset_imports):  # opt_level 0 declares none of them
        result.opset_imports[domain] = 1
    return result, fused


@contextlib.contextmanager
def ort_producer_warning_off() -> Iterator[None]:
    """Silence ORT's 'Model producer not matched ... specify --model_type' warning.

    It names a flag of ORT's own script and fires for every model onnxpipe wrote (producer
    "onnxpipe"); the model type onnxpipe passes is the one the user gave.
    """
    optimizer_log = logging.getLogger("onnxruntime.transformers.optimizer")
    level = optimizer_log.level
    optimizer_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        optimizer_log.setLevel(level)
