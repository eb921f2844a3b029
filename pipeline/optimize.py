"""``onnxpipe optimize``: the cleanup pass as a bundle step, its outputs kept to the input's.

A cleanup (folding, dedup, ORT's offline optimizer, transformer fusions) keeps the math, so
its outputs may move by float rounding only (:data:`onnxpipe.transform.PRESERVED_RTOL`);
more than that is a broken rewrite and nothing is written (:func:`_require_preserved`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx_ir as ir

from onnxpipe.compress import apply_pass
from onnxpipe.errors import GateFailed, InputError
from onnxpipe.graphs.base import parameter_count
from onnxpipe.graphs.cleanup import CleanupConfig, CleanupPass
from onnxpipe.transform import TransformContext, derive_bundle


def optimize_bundle(
    bundle: Path, out: Path, config: CleanupConfig, overwrite: bool = False
) -> dict[str, Any]:
    """``onnxpipe optimize``: the cleanup pass as a bundle step, outputs kept to the input's."""

    def transform(model: ir.Model, ctx: TransformContext) -> tuple[ir.Model, dict[str, Any]]:
        before = parameter_count(model)
        model, metrics = apply_pass(CleanupPass(config), model)
        after = parameter_count(model)
        if after > 2 * before + 1024:  # weights the model computed (ConstantOfShape) now stored
            metrics["note"] = (
                f"parameters {before:,} -> {after:,}: constant folding stored weights the model "
                "computes at run time (e.g. from ConstantOfShape, as in the onnx test zoo), so "
                "the file grew. That is what quantize and prune need; to keep the small file, "
                "ship the input bundle."
            )
        _require_preserved(model, ctx, config, out)
        return model, {**metrics, "params_before": before, "params_after": after}

    return derive_bundle(bundle, out, "optimize", config, transform, (), None, overwrite)


def _require_preserved(
    model: ir.Model, ctx: TransformContext, config: CleanupConfig, out: Path
) -> None:
    """Refuse a cleanup whose outputs moved past float rounding from the input model's.

    Given heads or a hidden size the graph does not have, ORT's attention fusion splits the
    hidden size into the wrong heads and says nothing: such a model was written, exit 0.

    Raises:
        InputError: with ``--num-heads``/``--hidden-size`` given (the likely cause).
        GateFailed: otherwise, with the numbers.
    """
    output, moved, limit, gate = ctx.drift(model)
    if moved <= limit:
        return
    what = (
        f"the optimized model's output {output!r} moved by {moved:.3g} from the input "
        f"model's (a cleanup moves it by float rounding, at most {limit:.3g}) on "
        f"{gate['samples']} samples."
    )
    if config.transformer and (config.num_heads or config.hidden_size):
        flags = (("--num-heads", config.num_heads), ("--hidden-size", config.hidden_size))
        given = " ".join(f"{flag} {value}" for flag, value in flags if value)
        raise InputError(
            f"optimize --transformer {config.transformer} {given}: "
            f"{what} Nothing was written at {out}. The heads or hidden size do not match the "
            "graph: leave both out to read them from the graph, or give the model's own."
        )
    raise GateFailed(
        f"optimize: {what} An optimization changed the math: try a lower --level, or leave "
        "out --transformer/--slim.",
        gate,
    )
