"""Low-rank factorisation: replace a large Gemm/MatMul weight ``W`` by ``A @ B`` (truncated SVD).

``x @ W`` becomes ``(x @ A) @ B`` with ``A = U_r sqrt(S_r)``, ``B = sqrt(S_r) V_r^T``. Fewer
parameters and multiply-adds whenever ``r (K + N) < K N``; the pass only factors a weight when
the factored form is at most ``max_share`` of the original, so it is smaller and not slower.

With input statistics (``covariances``, from :func:`input_covariances` on real data) the SVD
is activation-aware: it minimises ``|X (W - A B)|`` instead of ``|W - A B|`` by factoring
``L^T W`` where ``L L^T`` is the inputs' second-moment matrix (SVD-LLM's whitening), shrunk
toward a scaled identity so that few samples do not overfit. Measured on all-MiniLM-L6-v2 at
ratio 0.5 (statistics from 40 sentences, cosine on 41 others): one FFN weight alone 0.966
plain, 0.983 whitened; all 36 weights 0.435 plain, 0.716 whitened.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from pydantic import Field, model_validator

from onnxpipe.errors import PassError
from onnxpipe.graphs.base import GraphPass, PassConfig, computed_weights_hint
from onnxpipe.graphs.quant_utils import Feeds, tap_session, token_rows

logger = logging.getLogger(__name__)


class LowRankConfig(PassConfig):
    """Settings of :class:`LowRankPass`."""

    ratio: float = Field(
        0.5,
        gt=0.0,
        lt=1.0,
        description="share of each factored weight's parameters to remove; sets the rank "
        "r = floor((1 - ratio) K N / (K + N))",
    )
    energy: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="smallest rank keeping this share of sum(S^2) (with input statistics, S of "
        "the whitened weight: the share of output energy on those inputs); with ratio given "
        "too, ratio's rank is the target and this the floor (the larger rank)",
    )
    ranks: dict[str, int] | None = Field(
        None,
        description="explicit rank per weight name; when given, only these weights are factored",
    )
    min_elements: int = Field(
        16384, ge=1, description="leave weights with fewer elements than this"
    )
    shrink: float = Field(
        0.1,
        ge=0.0,
        le=1.0,
        description="with input statistics: share of a scaled identity mixed into their "
        "second-moment matrix (1: plain SVD; on MiniLM 0.1 kept the most held-out cosine)",
    )
    max_share: float = Field(
        0.8,
        gt=0.0,
        lt=1.0,
        description="factor only when r (K + N) <= max_share K N: two small matmuls must be "
        "clearly cheaper than one, or they are slower",
    )

    @model_validator(mode="after")
    def _positive_ranks(self) -> LowRankConfig:
        for name, rank in (self.ranks or {}).items():
            if rank < 1:
                raise ValueError(f"rank {rank} for {name!r} must be >= 1")
        return self


def factorable(model: ir.Model, min_elements: int) -> list[tuple[ir.Node, ir.Value]]:
    """(node, weight) for MatMul with a constant 2-D right operand and plain Gemm."""
    found = []
    for node in model.graph:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("MatMul", "Gemm"):
            continue
        weight = node.inputs[1]
        if weight is None or weight.const_value is None or not weight.is_initializer():
            continue
        if len(weight.const_value.shape) != 2 or weight.const_value.size < min_elements:
            continue
        if len(weight.uses()) != 1 or not weight.const_value.dtype.is_floating_point():
            continue
        if node.op_type == "Gemm":
            attrs = {k: a.value for k, a in node.attributes.items()}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
                continue
        found.append((node, weight))
    return found


def _matrix(node: ir.Node, weight: ir.Value) -> np.ndarray:
    """The weight as ``[K, N]`` with ``y = x @ W``."""
    array = weight.const_value.numpy()  # type: ignore[union-attr]
    trans = node.op_type == "Gemm" and node.attributes.get("transB") is not None
    return array.T if trans and node.attributes["transB"].value else array


class LowRankPass(GraphPass[LowRankConfig]):
    """Factor large Gemm/MatMul weights by truncated SVD where that saves parameters.

    Refuses (``PassError``) a model with no constant 2-D Gemm/MatMul weight of at least
    ``min_elements``. ``metrics["layers"]`` lists rank, energy kept and parameters per weight.
    """

    name = "lowrank"
    config_class = LowRankConfig
    modifies_in_place: ClassVar[bool] = True

    def __init__(
        self,
        config: LowRankConfig | None = None,
        *,
        covariances: Mapping[str, np.ndarray] | None = None,
        **settings: Any,
    ) -> None:
        """``covariances``: input tensor -> ``X^T X / rows`` (:func:`input_covariances`)."""
        super().__init__(config, **settings)
        self.covariances = dict(covariances or {})

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        """Rewrite each chosen ``x @ W`` as ``(x @ A) @ B``."""
        cfg = self.config
        candidates = factorable(model, cfg.min_elements)
        if not candidates:
            hint = computed_weights_hint(model, ("Gemm", "MatMul"))
            raise PassError(
                "nothing to factor: no Gemm/MatMul with a constant 2-D weight of at least "
                f"{cfg.min_elements} elements (--method lowrank needs dense layers).{hint}"
            )
        layers: dict[str, dict[str, Any]] = {}
        skipped: dict[str, str] = {}
        for node, weight in candidates:
            name = weight.name or node.name or "?"
            if cfg.ranks is not None and name not in cfg.ranks:
                continue
            w = _matrix(node, weight).astype(np.float64)
            k, n = w.shape
            lower = self._whitening(node, k)
            u, s, vt = np.linalg.svd(w if lower is None else lower.T @ w, full_matrices=False)
            rank = self._rank(name, s, k, n)
            if rank * (k + n) > cfg.max_share * k * n:
                skipped[name] = f"rank {rank} would not save enough ({rank * (k + n)} vs {k * n})"
                continue
            root = np.sqrt(s[:rank])
            a = u[:, :rank] * root
            a = a if lower is None else np.linalg.solve(lower.T, a)
            b = root[:, None] * vt[:rank]
            _rewrite(model.graph, node, weight, a, b, weight.const_value.numpy().dtype)  # type: ignore[union-attr]
            energy = float((s[:rank] ** 2).sum() / max((s**2).sum(), 1e-300))
            layers[name] = {"shape": [k, n], "rank": rank, "energy": energy,
                            "activation_aware": lower is not None,
                            "params_before": k * n, "params_after": rank * (k + n)}  # fmt: skip
            logger.debug("%s: [%d, %d] -> rank %d (energy %.4f)", name, k, n, rank, energy)
        if not layers and cfg.ranks is None:  # the result would be the model as it was
            reasons = "; ".join(f"{k}: {v}" for k, v in list(skipped.items())[:3])
            raise PassError(
                f"nothing to factor at --ratio {cfg.ratio:g}"
                + (f" / --energy {cfg.energy:g}" if cfg.energy is not None else "")
                + f": no weight's factored form is small enough ({reasons}"
                + (", ..." if len(skipped) > 3 else "")
                + (
                    "). Lower --energy: its floor sets the rank here."
                    if cfg.energy is not None
                    else f"). Raise --ratio{', e.g. --ratio 0.5' if cfg.ratio < 0.5 else ''}."
                )
            )
        if layers:
            logger.info("low-rank: factored %d weights", len(layers))
        self.metrics = {"layers": layers, "skipped": skipped, "candidates": len(candidates)}
        return ir.passes.PassResult(model, modified=bool(layers))

    def _whitening(self, node: ir.Node, k: int) -> np.ndarray | None:
        """Lower Cholesky factor of the node's shrunk input second moments, if measured."""
        x = node.inputs[0]
        moments = self.covariances.get(x.name or "") if x is not None else None
        if moments is None or moments.shape != (k, k) or self.config.shrink >= 1.0:
            return None
        scale = max(float(np.trace(moments)) / k, 1e-12)
        shrunk = (1 - self.config.shrink) * moments / scale + self.config.shrink * np.eye(k)
        try:
            return np.linalg.cholesky(shrunk)
        except np.linalg.LinAlgError:  # not positive definite (shrink 0, too few samples)
            return None

    def _rank(self, name: str, s: np.ndarray, k: int, n: int) -> int:
        cfg = self.config
        if cfg.ranks is not None:
            return min(cfg.ranks[name], len(s))
        by_ratio = max(1, math.floor((1 - cfg.ratio) * k * n / (k + n)))
        if cfg.energy is not None:
            cumulative = np.cumsum(s**2) / max(float((s**2).sum()), 1e-300)
            by_energy = min(int(np.searchsorted(cumulative, cfg.energy - 1e-12)) + 1, len(s))
            # --energy alone ranks by energy; with --ratio it is the floor under ratio's rank
            # (--energy 0.5 --ratio 0.1, 0.5 and 0.9 wrote one model, recording three ratios)
            return max(by_energy, by_ratio) if "ratio" in cfg.model_fields_set else by_energy
        return by_ratio


def input_covariances(
    model: ir.Model, feeds: Sequence[Feeds], min_elements: int = 16384
) -> dict[str, np.ndarray]:
    """``X^T X / rows`` of every factorable weight's input over ``feeds``, by tensor name.

    Rows are the input's last axis; where a feed has an ``attention_mask`` of the input's
    leading shape, padded positions are left out.
    """
    names = sorted(
        {x.name for n, _ in factorable(model, min_elements) if (x := n.inputs[0]) and x.name}
    )
    if not names or not feeds:
        return {}
    session = tap_session(model, names)
    sums: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for feed in feeds:
        mask = feed.get("attention_mask")
        for name, value in zip(names, session.run(names, dict(feed)), strict=True):
            tokens = token_rows(value, mask).astype(np.float64)
            sums[name] = sums.get(name, 0) + tokens.T @ tokens
            rows[name] = rows.get(name, 0) + len(tokens)
    return {name: sums[name] / max(rows[name], 1) for name in names}


def _rewrite(
    graph: ir.Graph, node: ir.Node, weight: ir.Value, a: np.ndarray, b: np.ndarray, dtype: np.dtype
) -> None:
    base = weight.name or node.name or "w"
    value_a = ir.Value(name=f"{base}.lowrank_a", const_value=ir.tensor(a.astype(dtype)))
    value_b = ir.Value(name=f"{base}.lowrank_b", const_value=ir.tensor(b.astype(dtype)))
    value_a.const_value.name = value_a.name  # type: ignore[union-attr]
    value_b.const_value.name = value_b.name  # type: ignore[union-attr]
    graph.register_initializer(value_a)
    graph.register_initializer(value_b)
    x = node.inputs[0]
    first = ir.node("MatMul", [x, value_a], name=f"{node.name}.lowrank_a")
    first.outputs[0].name = f"{base}.lowrank_hidden"
    graph.insert_before(node, first)
    node.replace_input_with(0, first.outputs[0])
    node.replace_input_with(1, value_b)
    if node.op_type == "Gemm":
        node.attributes["transB"] = ir.AttrInt64("transB", 0)
    graph.initializers.pop(weight.name)  # type: ignore[arg-type]
