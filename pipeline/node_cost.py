"""What keeping a node in float costs in time, measured with ORT's profiler on this CPU.

``quantize --auto`` keeps the most damaging nodes in float until its gate holds. Which
nodes it keeps decides the speed of the result: on EfficientNet-Lite0 (2-core AVX2, no
VNNI) ORT's int8 kernels run the stem conv and the first depthwise conv *slower* than
their float NCHWc kernels (0.71x, 0.68x), while the 1x1 convs run 1.6-2x faster. So the
search orders its fallbacks by damage per millisecond, from per-node kernel times of the
float model and of the all-int8 candidate, plus the Q/DQ work each float/int8 boundary adds.

Kernel times are mapped back to the original nodes by weight name: ORT's fused kernels
keep the weight initializer's name or a name derived from it (``w_quantized``, ``w_bias``).
NCHWc convs get reordered weights (``reorder_*``) and keep their bias name only when their
channel count is a multiple of the SIMD block (8 on AVX2, 16 on AVX-512); the others are
traced by the tensor their kernel is named after. Nodes that cannot be traced get no time
(cost 0 beyond their boundaries).
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from onnxpipe.data import Feeds

logger = logging.getLogger(__name__)

PROFILE_RUNS = 30
# A unit counts as free to keep in float only when it saves at least this much (ms):
# below it, per-node profile noise decides.
FREE_MARGIN_MS = 0.005

Unit = tuple[str, ...]

MOVERS = {"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split", "Gather",
          "Slice", "MaxPool", "Resize", "Pad", "Expand", "Tile", "Identity"}  # fmt: skip
"""Ops that only move data: they run on int8 data between quantized neighbours, and
quantizing one alone tells nothing about accuracy (``--auto`` does not rank them)."""


@dataclass(frozen=True)
class Profile:
    """Mean per-run kernel time (ms) per original node, and the Q cost per element."""

    node_ms: dict[str, float]
    quantize_ms_per_element: float


def weight_owners(model: ir.Model, nodes: set[str]) -> dict[str, str]:
    """Initializer name -> the node (of ``nodes``) that consumes it."""
    owners: dict[str, str] = {}
    for node in model.graph:
        if node.name not in nodes:
            continue
        for value in node.inputs:
            if value is not None and value.is_initializer() and value.name:
                owners.setdefault(value.name, node.name or "")
    return owners


def profile(path: Path, feeds: Feeds, owners: Mapping[str, str], scratch: Path) -> Profile:
    """Profile ``path`` on ORT CPU and attribute its kernel times to the nodes in ``owners``."""
    scratch.mkdir(parents=True, exist_ok=True)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.enable_profiling = True
    so.profile_file_prefix = str(scratch / "profile")
    so.optimized_model_filepath = str(scratch / "optimized.onnx")
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(3):
        session.run(None, dict(feeds))
    for _ in range(PROFILE_RUNS):
        session.run(None, dict(feeds))
    events = json.loads(Path(session.end_profiling()).read_text())
    optimized = onnx.load(str(scratch / "optimized.onnx"), load_external_data=False)
    traced = _nchwc_tracer(onnx.load(str(path), load_external_data=False).graph, owners)
    owner_of = {n.name: _owner(n.input, owners) or traced(n.name) for n in optimized.graph.node}
    # Per kernel, the median over the runs: one slow run (the machine is shared) must not
    # reorder the fallbacks.
    durations: dict[str, list[float]] = defaultdict(list)
    q_elements: dict[str, float] = {}
    for event in events:
        name = event.get("name", "")
        if event.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        kernel = name[: -len("_kernel_time")]
        durations[kernel].append(event["dur"] / 1000)
        if event["args"].get("op_name") == "QuantizeLinear":
            q_elements[kernel] = float(event["args"].get("output_size", 0))
    node_ms: dict[str, float] = defaultdict(float)
    for kernel, times in durations.items():
        owner = owner_of.get(kernel)
        if owner:
            node_ms[owner] += float(np.median(times))
    q_ms = sum(float(np.median(durations[k])) for k in q_elements)
    per_element = q_ms / sum(q_elements.values()) if sum(q_elements.values()) else 0.0
    return Profile(dict(node_ms), per_element)


def _nchwc_tracer(graph: onnx.GraphProto, owners: Mapping[str, str]) -> Callable[[str], str | None]:
    """Kernel name -> original node, for NCHWc Conv kernels whose inputs ORT renamed.

    ORT names such a kernel after the tensor its fused chain produced (``<tensor>_nchwc``);
    from that tensor's producer, the walk goes up through single-input ops (the fused
    activation) to a node of ``owners``. A kernel that also fused a residual Add (two data
    inputs) is not traced this way.
    """
    producers = {out: node for node in graph.node for out in node.output}
    weights = {init.name for init in graph.initializer}
    nodes = set(owners.values())

    def trace(kernel: str) -> str | None:
        if not kernel.endswith("_nchwc"):
            return None
        node = producers.get(kernel.removesuffix("_nchwc"))
        for _ in range(3):  # Conv, then its fused activation(s)
            if node is None or node.name in nodes:
                return node.name if node is not None else None
            data = [name for name in node.input if name and name not in weights]
            node = producers.get(data[0]) if len(data) == 1 else None
        return None

    return trace


def _owner(inputs: Sequence[str], owners: Mapping[str, str]) -> str | None:
    """The original node a fused kernel belongs to, from its inputs' names."""
    for name in inputs:
        if name in owners:
            return owners[name]
    best = ""
    for name in inputs:
        for weight in owners:
            if name.startswith(weight + "_") and len(weight) > len(best):
                best = weight
    return owners.get(best) if best else None


def element_counts(model: ir.Model) -> dict[str, int]:
    """Elements per value at batch 1 (symbolic dims count as 1; unknown shapes are absent)."""
    counts: dict[str, int] = {}
    values = [*model.graph.inputs, *(o for n in model.graph for o in n.outputs)]
    for value in values:
        if value.shape is None or not value.name:
            continue
        dims = [d if isinstance(d, int) else 1 for d in value.shape]
        counts[value.name] = int(np.prod(dims)) if dims else 1
    return counts


def fallback_order(
    model: ir.Model,
    units: Sequence[Unit],
    damage: Mapping[Unit, float],
    float_ms: Profile,
    int8_ms: Profile,
) -> list[tuple[Unit, float]]:
    """Units in the order to keep them in float, each with its estimated cost (ms).

    Greedy: units that are faster in float (counting boundaries) come first, most
    damaging first; then the highest damage per unit of cost. The cost of a unit is its
    float kernel time minus its int8 kernel time, plus one quantize per element for every
    float/int8 boundary it opens, minus those it closes (neighbours already in float). Size
    counts too: float weights take 3 more bytes per parameter, and a unit that grows the
    int8 model by a share ``p`` of its size costs like ``p`` of its kernel time, so that a
    large classifier does not go to float for a sliver of accuracy. The returned cost is the
    time part alone (ms).
    """
    unit_of = {name: unit for unit in units for name in unit}
    elements = element_counts(model)
    per_element = int8_ms.quantize_ms_per_element
    kernel = {
        u: sum(float_ms.node_ms.get(n, 0.0) - int8_ms.node_ms.get(n, 0.0) for n in u) for u in units
    }
    nodes = {node.name: node for node in model.graph}
    total = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value)
    budget_ms = sum(int8_ms.node_ms.values())
    size_ms = {
        u: 3 * sum(_weight_elements(nodes[n]) for n in u) / max(total, 1) * budget_ms for u in units
    }
    kept: set[Unit] = set()

    def is_float(node: ir.Node | None) -> bool:
        if node is None:  # a graph input or output
            return True
        unit = unit_of.get(node.name or "")
        return unit in kept if unit is not None else node.op_type not in MOVERS

    def cost(unit: Unit) -> float:
        first, last = nodes[unit[0]], nodes[unit[-1]]
        boundary = 0
        for value in first.inputs:
            if value is None or value.is_initializer() or value.const_value is not None:
                continue
            sign = -1 if is_float(value.producer()) else 1
            boundary += sign * elements.get(value.name or "", 0)
        for value in last.outputs:
            users: list[ir.Node | None] = [use.node for use in value.uses()] or [None]
            opens = any(not is_float(u) for u in users)
            closes = any(is_float(u) for u in users)
            boundary += (int(opens) - int(closes)) * elements.get(value.name or "", 0)
        return kernel[unit] + boundary * per_element

    order: list[tuple[Unit, float]] = []
    remaining = list(units)
    while remaining:
        costs = {u: cost(u) for u in remaining}
        ranked = {u: costs[u] + size_ms[u] for u in remaining}
        free = [u for u in remaining if ranked[u] <= -FREE_MARGIN_MS]
        if free:
            pick = max(free, key=lambda u: (damage[u], -ranked[u]))
        else:
            pick = max(remaining, key=lambda u: damage[u] / max(ranked[u], FREE_MARGIN_MS))
        order.append((pick, costs[pick]))
        kept.add(pick)
        remaining.remove(pick)
    return order


def _weight_elements(node: ir.Node) -> int:
    """Parameters in the node's weight initializers (rank >= 2: biases stay 32-bit)."""
    return sum(
        v.const_value.size
        for v in node.inputs
        if v is not None and v.const_value is not None and len(v.const_value.shape) >= 2
    )
