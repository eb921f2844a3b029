"""Structured channel pruning: tensors physically shrink, consumers stay consistent, and the
pruned model computes exactly what the original computes with those channels masked."""

from __future__ import annotations

import io
import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper, numpy_helper
from rich.console import Console

from onnxpipe.graphs.channel_groups import find_groups
from onnxpipe.graphs.channel_refit import pooled_source
from onnxpipe.graphs.prune_channels import PruneChannelsPass, apply_cut, channel_scores
from onnxpipe.progress import reporting
from onnxpipe.tables import summary_table
from tests.conftest import model_ref
from tests.helpers import assert_close, graph_bundle, ort_run

X = np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32)


@pytest.fixture(scope="module")
def cnn_bundle(tmp_path_factory):
    from onnxpipe.cli import main

    out = tmp_path_factory.mktemp("cnn") / "cnn"
    spec = "x:float32[batch,3,16,16]"
    assert main(["convert", model_ref("prunable_cnn"), "-o", str(out), "--input", spec]) == 0
    return out


def _load(bundle):
    return ir.load(bundle / "model.onnx")


def test_groups_cover_depthwise_residual_and_classifier(cnn_bundle):
    groups = {g.key: g for g in find_groups(_load(cnn_bundle))}
    prunable = [g for g in groups.values() if not g.blocked]
    assert len(prunable) == 3  # stem (through BN? folded or not) + dw, residual, inner res conv
    residual = next(g for g in prunable if len(g.producers) == 2)
    assert residual.channels == 24 and len(residual.consumers) == 2  # res conv + head Gemm
    stem = next(g for g in prunable if g.depthwise)
    assert stem.channels == 16
    blocked = [g for g in groups.values() if g.blocked]
    assert any("graph output" in r for g in blocked for r in g.blocked)


@pytest.mark.parametrize("index", [0, 1, 2])
def test_cut_equals_masking_the_removed_channels(cnn_bundle, index):
    """Removing channels == zeroing the consumers' columns for them, to float precision."""
    chosen = [g for g in find_groups(_load(cnn_bundle)) if not g.blocked][index]
    keep = np.sort(np.argsort(-channel_scores(chosen))[: chosen.channels // 2])
    _, groups = _cut_equals_masking(lambda: _load(cnn_bundle), {chosen.key: keep}, {"x": X})
    group = groups[chosen.key]
    for cut in group.cuts:
        assert cut.value.const_value.shape[cut.axis] == len(keep)
    for node in group.depthwise:
        assert node.attributes["group"].value == len(keep)


def test_pass_shrinks_params_and_reports(cnn_bundle):
    model = _load(cnn_bundle)
    graph_pass = PruneChannelsPass(ratio=0.5, multiple_of=1, min_channels=1)
    result = graph_pass(model)
    m = graph_pass.metrics
    assert result.modified and m["groups_pruned"] == 3
    assert m["params_after"] < 0.7 * m["params_before"]
    assert all(after == before // 2 for before, after in m["channels"].values())
    assert any("graph output" in r[0] for r in m["skipped"].values())
    (out,) = ort_run(result.model, {"x": X})
    assert out.shape == (4, 10) and np.isfinite(out).all()


def test_multiple_of_rounds_kept_channels_up(cnn_bundle):
    graph_pass = PruneChannelsPass(ratio=0.3, multiple_of=8, min_channels=8)
    graph_pass(_load(cnn_bundle))
    assert all(after % 8 == 0 for _, after in graph_pass.metrics["channels"].values())


@pytest.mark.parametrize(("flags", "block"), [({"avx2"}, 8), ({"avx2", "avx512f"}, 16)])
def test_default_multiple_is_the_cpus_nchwc_block(cnn_bundle, monkeypatch, flags, block):
    import onnxpipe.graphs.prune_channels as pc  # noqa: PLC0415

    monkeypatch.setattr(pc, "cpu_flags", lambda: flags)
    graph_pass = PruneChannelsPass(ratio=0.5, min_channels=1)
    graph_pass(_load(cnn_bundle))
    # groups of 16, 24 and 32 channels, halved and rounded up to the block
    cuts = sorted(graph_pass.metrics["channels"].values())
    assert cuts == ([[16, 8], [24, 16], [32, 16]] if block == 8 else [[24, 16], [32, 16]])


def test_activation_criterion_with_bias_refit_beats_weights(cnn_bundle):
    feeds = [{"x": X}]
    ref = ort_run(_load(cnn_bundle), {"x": X})[0]
    errors = {}
    for criterion in ("weight", "activation"):
        model = _load(cnn_bundle)
        PruneChannelsPass(ratio=0.5, multiple_of=1, criterion=criterion, feeds=feeds)(model)
        errors[criterion] = float(np.abs(ort_run(model, {"x": X})[0] - ref).mean())
    assert errors["activation"] < errors["weight"]


def _ir_model(nodes, inits, x_shape, y_shape=None, opset: int = 17) -> ir.Model:
    """One float input ``x`` and output ``y`` around ``nodes``, shapes inferred."""
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, y_shape)],
        inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(onnx.shape_inference.infer_shapes(proto))


def _bn_concat_model() -> ir.Model:
    """Conv -> BatchNorm -> Relu -> Conv, plus a Conv feeding a Concat (must stay blocked)."""
    rng = np.random.default_rng(1)

    def init(name, *shape):
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("BatchNormalization", ["c1", "s", "o", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Conv", ["r", "w2"], ["c2"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["x", "w3"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("Concat", ["c2", "c3"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w4"], ["y"], kernel_shape=[1, 1]),
    ]
    var = numpy_helper.from_array(rng.uniform(0.5, 1.5, 8).astype(np.float32), "v")
    inits = [init("w1", 8, 3, 1, 1), init("b1", 8), init("s", 8), init("o", 8), init("m", 8), var,
             init("w2", 6, 8, 1, 1), init("w3", 6, 3, 1, 1), init("w4", 2, 12, 1, 1)]  # fmt: skip
    return _ir_model(nodes, inits, [1, 3, 4, 4], [1, 2, 4, 4])


def test_batchnorm_is_cut_and_concat_passes_channels_on():
    model = _bn_concat_model()
    x = np.random.default_rng(2).standard_normal((1, 3, 4, 4)).astype(np.float32)
    reference = ort_run(model, {"x": x})
    groups = {g.key: g for g in find_groups(model)}
    assert [k for k, g in groups.items() if not g.blocked] == ["w1", "w2", "w3"]
    # w3's channels sit at offset 6 of the Concat's 12: w4's columns 6..11
    (span,) = [c for c in groups["w3"].cuts if c.segment is not None]
    assert span.value.name == "w4" and span.segment.offset() == 6
    graph_pass = PruneChannelsPass(ratio=0.5, multiple_of=1, min_channels=1)
    graph_pass(model)
    assert graph_pass.metrics["channels"] == {"w1": [8, 4], "w2": [6, 3], "w3": [6, 3]}
    shapes = {v.name: v.const_value.shape for v in model.graph.initializers.values()}
    assert shapes["s"] == (4,) and shapes["v"] == (4,) and shapes["w2"] == (3, 4, 1, 1)
    assert shapes["w4"] == (2, 6, 1, 1)
    (out,) = ort_run(model, {"x": x})
    assert out.shape == reference[0].shape


def _dense_block_model() -> ir.Model:
    """A DenseNet-style block: Concats of Concats, with BatchNorm, a depthwise conv and a
    per-channel Mul on the concatenated maps."""
    rng = np.random.default_rng(4)

    def init(name, *shape, low=None):
        if low is not None:
            return numpy_helper.from_array(rng.uniform(low, 1.5, shape).astype(np.float32), name)
        return numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)

    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["ca"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["ca"], ["a"]),
        helper.make_node("Conv", ["a", "wb", "bb"], ["b"], kernel_shape=[1, 1]),
        helper.make_node("Concat", ["a", "b"], ["cat1"], axis=1),
        helper.make_node("BatchNormalization", ["cat1", "s", "o", "m", "v"], ["bn"]),
        helper.make_node("Relu", ["bn"], ["r"]),
        helper.make_node("Conv", ["r", "wc", "bc"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Concat", ["cat1", "c"], ["cat2"], axis=1),
        helper.make_node("Conv", ["cat2", "wd"], ["dw"], kernel_shape=[3, 3], pads=[1] * 4,
                         group=18),
        helper.make_node("Mul", ["dw", "k"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "we", "be"], ["y"], kernel_shape=[1, 1]),
    ]  # fmt: skip
    inits = [init("wa", 8, 3, 3, 3), init("ba", 8), init("wb", 6, 8, 1, 1), init("bb", 6),
             init("s", 14), init("o", 14), init("m", 14), init("v", 14, low=0.5),
             init("wc", 4, 14, 3, 3), init("bc", 4), init("wd", 18, 1, 3, 3),
             init("k", 1, 18, 1, 1), init("we", 2, 18, 1, 1), init("be", 2)]  # fmt: skip
    return _ir_model(nodes, inits, [2, 3, 6, 6], [2, 2, 6, 6])


def _mask(group, drop: np.ndarray) -> None:
    """Zero the consumer columns of ``drop`` (at the group's offsets, of the Split part a
    consumer takes), leaving shapes alone."""
    for cut in group.consumer_cuts():
        start = cut.segment.offset() if cut.segment is not None else 0
        array = cut.value.const_value.numpy().copy()
        if cut.groups > 1:  # a grouped Conv: block b's rows read block b's channels
            rows, size = array.shape[0] // cut.groups, group.channels // cut.groups
            for channel in drop:
                block = channel // size
                array[block * rows : (block + 1) * rows, channel - block * size] = 0
            cut.value.const_value = ir.tensor(array, name=cut.value.name)
            continue
        index = [slice(None)] * array.ndim
        index[cut.axis] = start + (cut.part.local(drop) if cut.part is not None else drop)
        array[tuple(index)] = 0
        cut.value.const_value = ir.tensor(array, name=cut.value.name)


def _cut_equals_masking(build, keeps: dict, feeds: dict) -> tuple[ir.Model, dict]:
    """Cut the groups ``keeps`` names (key -> kept channels, in that order) in one model from
    ``build()``, mask their dropped channels in another, and assert both compute the same.

    Returns the cut model and its groups (as the analysis found them).
    """
    pruned, masked = build(), build()
    groups = {g.key: g for g in find_groups(pruned)}
    twins = {g.key: g for g in find_groups(masked)}
    for key, keep in keeps.items():
        assert not groups[key].blocked, groups[key].blocked
        _mask(twins[key], np.setdiff1d(np.arange(groups[key].channels), keep))
        apply_cut(groups[key], keep)
    assert_close(ort_run(masked, feeds), pruned, feeds, atol=1e-4)
    return pruned, groups


def test_dense_block_groups_reach_through_nested_concats():
    groups = {g.key: g for g in find_groups(_dense_block_model())}
    assert set(groups) == {"wa", "wb", "wc", "we"}
    assert groups["we"].blocked  # the graph output
    for key in ("wa", "wb", "wc"):
        assert not groups[key].blocked, groups[key].blocked
    spans = {k: {c.value.name: c.segment.offset() for c in g.cuts if c.segment} for k, g in
             groups.items()}  # fmt: skip
    assert spans["wa"] == {"s": 0, "o": 0, "m": 0, "v": 0, "wc": 0, "wd": 0, "k": 0, "we": 0}
    assert spans["wb"] == {"s": 8, "o": 8, "m": 8, "v": 8, "wc": 8, "wd": 8, "k": 8, "we": 8}
    assert spans["wc"] == {"wd": 14, "k": 14, "we": 14}
    assert [n.op_type for n in groups["wa"].consumers] == ["Conv", "Conv", "Conv"]


def test_cutting_every_concat_group_equals_masking():
    """Groups cut one after another (offsets move as earlier segments shrink) == masking."""
    x = np.random.default_rng(5).standard_normal((2, 3, 6, 6)).astype(np.float32)
    keeps = {"wa": np.array([1, 2, 5, 7]), "wb": np.array([0, 3, 4]), "wc": np.array([2])}
    pruned, _ = _cut_equals_masking(_dense_block_model, keeps, {"x": x})
    shapes = {v.name: v.const_value.shape for v in pruned.graph.initializers.values()}
    assert shapes["wd"] == (8, 1, 3, 3) and shapes["we"] == (2, 8, 1, 1) and shapes["s"] == (7,)
    groups = [n.attributes.get_int("group", 1) for n in pruned.graph if n.op_type == "Conv"]
    assert sorted(groups) == [1, 1, 1, 1, 8]  # the depthwise conv, 18 -> 8 channels


def test_concat_pass_with_refit_shrinks_and_runs():
    rng = np.random.default_rng(6)
    feeds = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(4)]
    model = _dense_block_model()
    before = np.concatenate([ort_run(model, f)[0] for f in feeds])
    graph_pass = PruneChannelsPass(
        ratio=0.5, multiple_of=1, min_channels=1, feeds=feeds, criterion="activation", refit="lstsq"
    )
    graph_pass(model)
    assert set(graph_pass.metrics["channels"]) == {"wa", "wb", "wc"}
    assert graph_pass.metrics["params_after"] < graph_pass.metrics["params_before"]
    after = np.concatenate([ort_run(model, f)[0] for f in feeds])
    assert after.shape == before.shape and np.isfinite(after).all()


def test_concat_consumer_refit_keeps_the_output_mean():
    """Cutting the last segment: the 1x1 consumer folds the removed channels' mean into its
    bias, read at the segment's columns, so the output mean over the data stays exact."""
    rng = np.random.default_rng(8)
    feeds = [{"x": rng.standard_normal((2, 3, 6, 6)).astype(np.float32)} for _ in range(4)]
    model = _dense_block_model()
    before = np.concatenate([ort_run(model, f)[0] for f in feeds])
    graph_pass = PruneChannelsPass(
        ratio=0.5,
        ratios={"wc": 0.5},
        multiple_of=1,
        min_channels=1,
        feeds=feeds,
        criterion="activation",
        refit="bias",
    )
    graph_pass(model)
    assert graph_pass.metrics["channels"] == {"wc": [4, 2]}
    after = np.concatenate([ort_run(model, f)[0] for f in feeds])
    np.testing.assert_allclose(after.mean((0, 2, 3)), before.mean((0, 2, 3)), atol=1e-4)
    assert not np.allclose(after, before, atol=1e-3)


def test_concat_offsets_move_after_an_earlier_segment_is_cut():
    model = _dense_block_model()
    groups = {g.key: g for g in find_groups(model)}
    consumer = next(n for n in groups["wc"].consumers if n.inputs[1].name == "we")
    now, then, channel = groups["wc"].columns(consumer)
    assert now.tolist() == then.tolist() == [14, 15, 16, 17] and channel.tolist() == [0, 1, 2, 3]
    apply_cut(groups["wb"], np.array([0, 2, 5]))
    # in the weights the segment now starts 3 channels earlier; sampled inputs keep 14
    now, then, _ = groups["wc"].columns(consumer)
    assert now.tolist() == [11, 12, 13, 14] and then.tolist() == [14, 15, 16, 17]


def test_dense_unet_concat_groups_cut_equal_masking(tmp_path):
    """A torch U-Net with a dense block, as exported: each group behind a Concat is cut and
    compared with masking its channels, then the pass cuts them all at once and the bundle
    runs."""
    from onnxpipe.cli import main

    bundle = tmp_path / "unet"
    spec = "x:float32[batch,3,16,16]"
    assert main(["convert", model_ref("dense_unet"), "-o", str(bundle), "--input", spec,
                 "--no-bench"]) == 0  # fmt: skip
    x = np.random.default_rng(9).standard_normal((2, 3, 16, 16)).astype(np.float32)
    spanned = [g for g in find_groups(_load(bundle)) if not g.blocked and g.spans]
    assert len(spanned) == 5  # encoder 1's output, encoder 2's output, the 3 dense layers
    for group in spanned:
        keep = np.sort(np.argsort(-channel_scores(group))[: group.channels // 2])
        _cut_equals_masking(lambda: _load(bundle), {group.key: keep}, {"x": x})
    out = tmp_path / "pruned"
    args = ["prune", str(bundle), "-o", str(out), "--method", "channels", "--ratio", "0.5"]
    assert main([*args, "--multiple-of", "1", "--json"]) == 0
    metrics = json.loads((out / "manifest.json").read_text())["steps"][-1]["metrics"]
    assert metrics["pass"]["groups_pruned"] == 9
    assert ort_run(out / "model.onnx", {"x": x})[0].shape == (2, 2, 16, 16)


def test_c2f_split_groups_cut_equal_masking(tmp_path):
    """YOLOv8-style C2f blocks as torch exports them (Split of a Conv output, Concat of the
    pieces; in the second block the bottleneck adds its Split input back): each group behind
    a Split is cut like masking, and the whole pass runs."""
    from onnxpipe.cli import main

    bundle = tmp_path / "c2f"
    spec = "x:float32[batch,3,16,16]"
    assert main(["convert", model_ref("c2f_net"), "-o", str(bundle), "--input", spec,
                 "--no-bench"]) == 0  # fmt: skip
    x = np.random.default_rng(15).standard_normal((2, 3, 16, 16)).astype(np.float32)
    groups = find_groups(_load(bundle))
    split = [g for g in groups if g.parts and not g.blocked]
    assert [[p.length for p in g.parts] for g in split] == [[32, 32], [32, 32]]
    # the bottleneck that adds its input back is cut with the C2f's first conv
    assert sum(any("added to the output of Split" in r for r in g.blocked) for g in groups) == 1
    keep = np.sort(np.concatenate([np.arange(0, 32, 2), np.arange(33, 64, 2)]))
    for group in split:
        _cut_equals_masking(lambda: _load(bundle), {group.key: keep}, {"x": x})
    out = tmp_path / "pruned"
    args = ["prune", str(bundle), "-o", str(out), "--method", "channels", "--ratio", "0.5"]
    assert main([*args, "--multiple-of", "1", "--json"]) == 0
    assert ort_run(out / "model.onnx", {"x": x})[0].shape == (2, 4, 16, 16)


def _residual_concat_model(second_concat: bool = False) -> ir.Model:
    """Concat(c1, c2) + c3: a layer added to a Concat output (or, with ``second_concat``,
    another Concat's output)."""
    rng = np.random.default_rng(7)
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["x", "w2"], ["c2"], kernel_shape=[1, 1]),
        helper.make_node("Concat", ["c1", "c2"], ["cat"], axis=1),
        helper.make_node("Conv", ["x", "w3", "b3"], ["c3"], kernel_shape=[1, 1]),
        helper.make_node("Add", ["cat", "c3"], ["sum"]),
        helper.make_node("Relu", ["sum"], ["r"]),
        helper.make_node("Conv", ["r", "w4"], ["y"], kernel_shape=[1, 1]),
    ]
    arrays = {"w1": (4, 3, 1, 1), "b1": (4,), "w2": (4, 3, 1, 1), "w3": (8, 3, 1, 1),
              "b3": (8,), "w4": (2, 8, 1, 1)}  # fmt: skip
    if second_concat:
        nodes[3:4] = [
            helper.make_node("Conv", ["x", "w5"], ["c5"], kernel_shape=[1, 1]),
            helper.make_node("Conv", ["x", "w6"], ["c6"], kernel_shape=[1, 1]),
            helper.make_node("Concat", ["c5", "c6"], ["c3"], axis=1),
        ]
        arrays.update(w5=(4, 3, 1, 1), w6=(4, 3, 1, 1))
        del arrays["w3"], arrays["b3"]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in arrays.items()]  # fmt: skip
    return _ir_model(nodes, inits, [1, 3, 4, 4], [1, 2, 4, 4])


def test_a_layer_added_to_a_concat_output_is_cut_with_its_groups():
    x = np.random.default_rng(16).standard_normal((1, 3, 4, 4)).astype(np.float32)
    keeps = {"w1": np.array([0, 3]), "w2": np.array([1, 2])}
    pruned, groups = _cut_equals_masking(_residual_concat_model, keeps, {"x": x})
    assert any("added to the output of Concat" in r for r in groups["w3"].blocked)
    shapes = {v.name: v.const_value.shape for v in pruned.graph.initializers.values()}
    assert shapes["w3"] == (4, 3, 1, 1) and shapes["b3"] == (4,) and shapes["w4"] == (2, 4, 1, 1)
    # two Concat outputs added together: their groups would have to be cut as one
    groups = {g.key: g for g in find_groups(_residual_concat_model(second_concat=True))}
    for key in ("w1", "w2", "w5", "w6"):
        assert any("added to another Concat's" in r for r in groups[key].blocked)


def test_resnext_grouped_conv_groups_cut_equal_masking(tmp_path):
    """Grouped 3x3 convs (8 groups) as torch exports them: the groups they take and make
    keep as many channels in every block, and each cut equals masking."""
    from onnxpipe.cli import main

    bundle = tmp_path / "resnext"
    spec = "x:float32[batch,3,8,8]"
    assert main(["convert", model_ref("resnext_blocks"), "-o", str(bundle), "--input", spec,
                 "--no-bench"]) == 0  # fmt: skip
    x = np.random.default_rng(19).standard_normal((2, 3, 8, 8)).astype(np.float32)
    grouped = [g for g in find_groups(_load(bundle)) if not g.blocked and g.blocks > 1]
    assert sorted((g.channels, g.blocks) for g in grouped) == [(64, 8)] * 2 + [(128, 8)] * 2
    for group in grouped:
        keep = PruneChannelsPass(multiple_of=1).select(group, channel_scores(group), 0.5)
        size = group.channels // 8
        assert np.bincount(keep // size, minlength=8).tolist() == [size // 2] * 8
        _cut_equals_masking(lambda: _load(bundle), {group.key: keep}, {"x": x})
    out = tmp_path / "pruned"
    args = ["prune", str(bundle), "-o", str(out), "--method", "channels", "--ratio", "0.5"]
    assert main([*args, "--multiple-of", "1"]) == 0
    metrics = json.loads((out / "manifest.json").read_text())["steps"][-1]["metrics"]
    assert metrics["pass"]["groups_pruned"] == 5  # the four around the grouped convs, the stem
    assert ort_run(out / "model.onnx", {"x": x})[0].shape == (2, 10)


def test_concat_of_token_features_on_the_last_axis_equals_masking():
    """MatMul outputs [B, S, C] concatenated on the last axis, then a MatMul consumer."""
    rng = np.random.default_rng(11)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h1"]),
        helper.make_node("MatMul", ["x", "w2"], ["h2"]),
        helper.make_node("Concat", ["h1", "h2"], ["cat"], axis=-1),
        helper.make_node("Gelu", ["cat"], ["g"], domain=""),
        helper.make_node("MatMul", ["g", "w3"], ["y"]),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w1", (4, 6)), ("w2", (4, 5)), ("w3", (11, 3))]]  # fmt: skip

    def build():
        return _ir_model(nodes, inits, [2, 5, 4], [2, 5, 3], opset=20)

    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    keeps = {"w1": np.array([0, 2, 5]), "w2": np.array([1, 4])}
    pruned, _ = _cut_equals_masking(build, keeps, {"x": x})
    assert pruned.graph.initializers["w3"].const_value.shape == (5, 3)


def _split_model(residual: bool = False, form: str = "input") -> ir.Model:
    """YOLOv8's C2f in small: a Conv's output split in two halves; the second feeds a Conv;
    both halves and that Conv's output are concatenated for the last Conv."""
    rng = np.random.default_rng(12)
    second = "b" if not residual else "b0"
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        {
            "input": helper.make_node("Split", ["r1", "halves"], ["s0", "s1"], axis=1),
            "num_outputs": helper.make_node("Split", ["r1"], ["s0", "s1"], axis=1, num_outputs=2),
            "attribute": helper.make_node("Split", ["r1"], ["s0", "s1"], axis=1, split=[4, 4]),
        }[form],
        helper.make_node("Conv", ["s1", "w2", "b2"], [second], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Concat", ["s0", "s1", "b"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w3", "b3"], ["y"], kernel_shape=[1, 1]),
    ]
    if residual:  # the bottleneck's shortcut: a Split output added to a layer's output
        nodes.insert(4, helper.make_node("Add", ["s1", "b0"], ["b"]))
    arrays = {"w1": (8, 3, 1, 1), "b1": (8,), "w2": (4, 4, 3, 3), "b2": (4,),
              "w3": (2, 12, 1, 1), "b3": (2,)}  # fmt: skip
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in arrays.items()]  # fmt: skip
    if form == "input":
        inits.append(numpy_helper.from_array(np.array([4, 4], np.int64), "halves"))
    opset = 11 if form == "attribute" else 18
    return _ir_model(nodes, inits, [2, 3, 5, 5], [2, 2, 5, 5], opset=opset)


def _split_sizes(model: ir.Model) -> list[int]:
    split = next(n for n in model.graph if n.op_type == "Split")
    if "split" in split.attributes:
        return list(split.attributes["split"].as_ints())
    assert "num_outputs" not in split.attributes
    return split.inputs[1].const_value.numpy().tolist()


@pytest.mark.parametrize("form", ["input", "num_outputs", "attribute"])
def test_split_parts_are_cut_like_masking_and_sizes_rewritten(form):
    x = np.random.default_rng(13).standard_normal((2, 3, 5, 5)).astype(np.float32)
    keeps = {"w1": np.array([0, 2, 5, 7]), "w2": np.array([1, 3])}
    pruned, groups = _cut_equals_masking(lambda: _split_model(form=form), keeps, {"x": x})
    assert [(p.start, p.length) for p in groups["w1"].parts] == [(0, 4), (4, 4)]
    assert _split_sizes(pruned) == [2, 2]
    shapes = {v.name: v.const_value.shape for v in pruned.graph.initializers.values()}
    assert shapes["w1"] == (4, 3, 1, 1) and shapes["w2"] == (2, 2, 3, 3)
    assert shapes["w3"] == (2, 6, 1, 1)


def test_split_pass_keeps_a_share_of_each_part():
    model = _split_model()
    rng = np.random.default_rng(14)
    feeds = [{"x": rng.standard_normal((2, 3, 5, 5)).astype(np.float32)} for _ in range(3)]
    before = np.concatenate([ort_run(model, f)[0] for f in feeds])
    graph_pass = PruneChannelsPass(
        ratio=0.5, multiple_of=1, min_channels=1, feeds=feeds, criterion="activation",
        refit="bias", ratios={"w1": 0.5},
    )  # fmt: skip
    graph_pass(model)
    assert graph_pass.metrics["channels"] == {"w1": [8, 4]}
    assert _split_sizes(model) == [2, 2]
    after = np.concatenate([ort_run(model, f)[0] for f in feeds])
    assert after.shape == before.shape and np.isfinite(after).all()


def test_a_layer_added_to_a_split_output_is_cut_with_the_split_group():
    """C2f's shortcut: the bottleneck's conv rows are cut with the part they are added to."""
    x = np.random.default_rng(17).standard_normal((2, 3, 5, 5)).astype(np.float32)
    keeps = {"w1": np.array([0, 2, 5, 7])}
    pruned, groups = _cut_equals_masking(lambda: _split_model(residual=True), keeps, {"x": x})
    assert any("added to the output of Split" in r for r in groups["w2"].blocked)
    shapes = {v.name: v.const_value.shape for v in pruned.graph.initializers.values()}
    assert shapes["w2"] == (2, 2, 3, 3) and shapes["b2"] == (2,) and shapes["w3"] == (2, 6, 1, 1)


def test_a_conv_added_to_its_own_input_is_cut_on_both_axes():
    """y = h + conv(h): the conv's rows and columns both belong to h's group."""
    rng = np.random.default_rng(18)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["h"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["h", "w2", "b2"], ["c2"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Add", ["h", "c2"], ["s"]),
        helper.make_node("Conv", ["s", "w3"], ["y"], kernel_shape=[1, 1]),
    ]
    arrays = {"w1": (6, 3, 1, 1), "w2": (6, 6, 3, 3), "b2": (6,), "w3": (2, 6, 1, 1)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in arrays.items()]  # fmt: skip
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    build = lambda: _ir_model(nodes, inits, [1, 3, 4, 4], [1, 2, 4, 4])  # noqa: E731
    pruned, groups = _cut_equals_masking(build, {"w1": np.array([0, 2, 3])}, {"x": x})
    assert [k for k, g in groups.items() if not g.blocked] == ["w1"]
    assert pruned.graph.initializers["w2"].const_value.shape == (3, 3, 3, 3)


def test_variadic_sum_joins_its_inputs_like_add():
    """Opset-9 models (the onnx zoo's) add residuals with Sum; Mean averages branches."""
    rng = np.random.default_rng(20)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["a"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["x", "w2"], ["b"], kernel_shape=[1, 1]),
        helper.make_node("Conv", ["x", "w3"], ["c"], kernel_shape=[1, 1]),
        helper.make_node("Sum", ["a", "b", "c"], ["s"]),
        helper.make_node("Mean", ["s", "a"], ["m"]),
        helper.make_node("Conv", ["m", "w4"], ["y"], kernel_shape=[1, 1]),
    ]
    arrays = {"w1": (6, 3, 1, 1), "w2": (6, 3, 1, 1), "w3": (6, 3, 1, 1), "w4": (2, 6, 1, 1)}
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in arrays.items()]  # fmt: skip
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    build = lambda: _ir_model(nodes, inits, [1, 3, 4, 4], [1, 2, 4, 4], 9)  # noqa: E731
    _, groups = _cut_equals_masking(build, {"w1": np.array([0, 2, 3, 5])}, {"x": x})
    assert [k for k, g in groups.items() if not g.blocked] == ["w1"]
    assert len(groups["w1"].producers) == 3


def test_a_group_concatenated_with_itself_is_cut_in_both_places():
    rng = np.random.default_rng(10)
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], kernel_shape=[1, 1]),
        helper.make_node("Concat", ["c1", "c1"], ["cat"], axis=1),
        helper.make_node("Conv", ["cat", "w2", "b2"], ["y"], kernel_shape=[1, 1]),
    ]
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in [("w1", (4, 3, 1, 1)), ("w2", (2, 8, 1, 1)), ("b2", (2,))]]  # fmt: skip
    x = rng.standard_normal((1, 3, 4, 4)).astype(np.float32)
    build = lambda: _ir_model(nodes, inits, [1, 3, 4, 4], [1, 2, 4, 4])  # noqa: E731
    pruned, groups = _cut_equals_masking(build, {"w1": np.array([1, 3])}, {"x": x})
    assert len(groups["w1"].span(groups["w1"].consumers[0])) == 2
    assert pruned.graph.initializers["w2"].const_value.shape == (2, 4, 1, 1)
    # the refit sees both copies of each channel: bias-only refit keeps the output mean
    feeds = [{"x": rng.standard_normal((1, 3, 4, 4)).astype(np.float32)} for _ in range(4)]
    model = build()
    before = np.concatenate([ort_run(model, f)[0] for f in feeds])
    PruneChannelsPass(
        ratio=0.5, multiple_of=1, min_channels=1, feeds=feeds, criterion="activation", refit="bias"
    )(model)
    after = np.concatenate([ort_run(model, f)[0] for f in feeds])
    np.testing.assert_allclose(after.mean((0, 2, 3)), before.mean((0, 2, 3)), atol=1e-4)


def test_cli_prune_channels_with_gate_records_search(cli, cnn_bundle, tmp_path):
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((32, 3, 16, 16)).astype("f4"))
    out = tmp_path / "pruned"
    seen = []
    with reporting(lambda *a: seen.append(a)):  # --json shows no bar, so this one hears it
        code, stdout, stderr = cli(
            "prune", cnn_bundle, "-o", out, "--method", "channels", "--ratio", "0.5",
            "--eval", data, "--gate", "cosine>=0.5", "--json",
        )  # fmt: skip
    assert code == 0, stderr
    layers = [d for t, d, _ in seen if t.startswith("sensitivity of")]
    assert layers and layers == list(range(len(layers)))
    assert any(t.startswith("cutting ") for t, _, _ in seen)
    manifest = json.loads(stdout)
    step = manifest["steps"][-1]
    assert step["name"] == "prune_channels"
    metrics = step["metrics"]
    assert metrics["params_after"] < metrics["params_before"]
    assert metrics["search"]["sensitivity"] and metrics["ratios"]
    # 4 eval batches: channels chosen on one half are measured on the other
    assert metrics["search"]["cross_fitted"] is True
    assert metrics["search"]["gates_asked"] == ["cosine>=0.5"]
    assert metrics["gate"]["cosine"] >= 0.5 and "speedup" in metrics
    assert manifest["validation"]["cpu"]["status"] == "passed"
    # the table a user sees says what the step bought
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(summary_table(manifest, out))
    before, after = metrics["params_before"], metrics["params_after"]
    assert f"prune_channels: params {before:,} -> {after:,}" in console.export_text()
    # 2 batches (16 samples, 8 a batch): too few to split, and the record says so
    np.savez(data, x=np.random.default_rng(3).standard_normal((16, 3, 16, 16)).astype("f4"))
    code, stdout, stderr = cli(
        "prune", cnn_bundle, "-o", tmp_path / "two", "--method", "channels", "--ratio", "0.5",
        "--eval", data, "--gate", "cosine>=0.5", "--json",
    )  # fmt: skip
    assert code == 0, stderr
    assert json.loads(stdout)["steps"][-1]["metrics"]["search"]["cross_fitted"] is False


def test_cli_prune_channels_unmeetable_gate_exits_1_with_best(cli, cnn_bundle, tmp_path):
    out = tmp_path / "pruned"
    code, _, stderr = cli(
        "prune", cnn_bundle, "-o", out, "--method", "channels", "--ratio", "0.5",
        "--gate", "max_abs<=1e-9",
    )  # fmt: skip
    assert code == 1
    assert "best found" in stderr and not out.exists()


@pytest.mark.parametrize("gate", [(), ("--gate", "cosine>=0.5")])
def test_cli_ratio_that_cuts_nothing_exits_2_and_multiple_of_1_cuts(
    cli, cnn_bundle, tmp_path, gate
):
    """At 0.1, 16/24/32 channels round back up to themselves (block 8 or 16): nothing to cut.

    It used to write the unchanged model with exit 0 (and, with a gate, fail on a None).
    """
    out = tmp_path / "pruned"
    args = ("prune", cnn_bundle, "-o", out, "--method", "channels", "--ratio", "0.1", *gate)
    code, _, stderr = cli(*args)
    assert code == 2, stderr
    assert "nothing to cut at --ratio 0.1" in stderr and "--multiple-of 1" in stderr
    assert not out.exists()
    code, _, stderr = cli(*args, "--multiple-of", "1")
    assert code == 0, stderr
    step = json.loads((out / "manifest.json").read_text())["steps"][-1]
    metrics = step["metrics"]
    assert step["config"]["multiple_of"] == 1
    if not gate:
        assert sorted(metrics["pass"]["channels"].values()) == [[16, 14], [24, 22], [32, 29]]
    assert metrics["params_after"] < metrics["params_before"]


def test_layers_too_narrow_to_cut_say_so(cli, tmp_path):
    """An 8-channel CNN at --ratio 0.9 --multiple-of 1 was told to raise --ratio or pass
    --multiple-of 1: neither helps, as every layer keeps at least 8 channels."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"])],
        "narrow", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4, 8, 8])],
        [numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype("f4"), "w1"),
         numpy_helper.from_array(rng.normal(size=(4, 8, 1, 1)).astype("f4"), "w2")],
    )  # fmt: skip
    bundle = graph_bundle(cli, tmp_path, "narrow", graph)
    code, _, err = cli("prune", bundle, "-o", tmp_path / "p", "--method", "channels",
                       "--ratio", "0.9", "--multiple-of", "1")  # fmt: skip
    message = " ".join(err.split())
    assert code == 2 and "keeps at least 8 in each" in message and "--multiple-of" not in message
    assert not (tmp_path / "p").exists()


def _dense_stack() -> ir.Model:
    """x[batch, 64] -> (MatMul + Add -> Relu) x 2 -> MatMul + Add: Keras Dense via tf2onnx."""
    rng = np.random.default_rng(5)
    widths = [64, 48, 32, 10]
    nodes, inits, x = [], [], "x"
    for i, (k, n) in enumerate(zip(widths, widths[1:], strict=False)):
        inits.append(
            numpy_helper.from_array(rng.normal(size=(k, n)).astype(np.float32) / 6, f"w{i}")
        )
        inits.append(numpy_helper.from_array(rng.normal(size=n).astype(np.float32), f"b{i}"))
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"]))
        nodes.append(helper.make_node("Add", [f"m{i}", f"b{i}"], ["y" if i == 2 else f"a{i}"]))
        if i < 2:
            nodes.append(helper.make_node("Relu", [f"a{i}"], [f"r{i}"]))
            x = f"r{i}"
    return _ir_model(nodes, inits, ["batch", 64], ["batch", 10])


def test_dense_matmul_add_layers_are_cut_like_gemm():
    """MatMul + Add on a 2-D input (a Keras Dense) produces channels; the bias is cut with it."""
    x = np.random.default_rng(6).normal(size=(32, 64)).astype(np.float32)
    model = _dense_stack()
    groups = find_groups(model)
    prunable = sorted((g for g in groups if not g.blocked), key=lambda g: -g.channels)
    assert [(g.channels, [p.op_type for p in g.producers]) for g in prunable] == [
        (48, ["MatMul"]),
        (32, ["MatMul"]),
    ]
    assert {c.value.name for c in prunable[0].cuts} == {"w0", "b0", "w1"}
    assert any("graph output" in r for g in groups if g.blocked for r in g.blocked)
    # the cut equals zeroing the consumer's rows for the removed channels
    masked = _dense_stack()
    keep = np.arange(0, 48, 2)
    apply_cut(prunable[0], keep)
    w1 = masked.graph.initializers["w1"]
    rows = w1.const_value.numpy().copy()
    rows[np.setdiff1d(np.arange(48), keep)] = 0
    w1.const_value = ir.tensor(rows, name="w1")
    assert model.graph.initializers["b0"].const_value.shape == (24,)
    assert_close(ort_run(masked, {"x": x}), model, {"x": x}, atol=1e-4)


def test_dense_bias_refit_goes_into_the_add_after_the_matmul():
    """Cutting the last hidden layer: the removed channels' mean moves into the output Add."""
    x = np.random.default_rng(7).normal(size=(64, 64)).astype(np.float32)
    ref = ort_run(_dense_stack(), {"x": x})[0]
    shift = {}
    for refit in ("none", "bias"):
        model = _dense_stack()
        settings = {"ratio": 0.5, "ratios": {"w1": 0.5}, "multiple_of": 1, "refit": refit}
        graph_pass = PruneChannelsPass(criterion="activation", feeds=[{"x": x}], **settings)
        graph_pass(model)
        assert graph_pass.metrics["channels"] == {"w1": [32, 16]}
        shift[refit] = float(np.abs((ort_run(model, {"x": x})[0] - ref).mean(0)).max())
    assert shift["bias"] < 1e-4 < 0.05 < shift["none"], shift


def _keras_pool_head(keepdims: int = 0) -> ir.Model:
    """Conv -> Relu -> Transpose to NHWC -> ReduceMean over H, W -> MatMul + Add (tf2onnx)."""
    rng = np.random.default_rng(8)
    inits = [
        numpy_helper.from_array(rng.normal(size=(16, 3, 3, 3)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "conv_b"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(rng.normal(size=(16, 10)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(rng.normal(size=10).astype(np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Transpose", ["r"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["t", "axes"], ["p"], keepdims=keepdims),
        helper.make_node("MatMul", ["p", "fc_w"], ["m"]),
        helper.make_node("Add", ["m", "fc_b"], ["y"]),
    ]
    return _ir_model(nodes, inits, ["batch", 3, 16, 16], opset=18)


@pytest.mark.parametrize("keepdims", [0, 1])
def test_keras_global_pooling_passes_channels_through_the_transpose(keepdims):
    """tf2onnx pools a Keras model channels-last; the conv's channels still reach the Dense
    (on ``[N, C]``, or on ``[N, 1, 1, C]`` with keepdims, whose last axis is still C)."""
    model, masked = _keras_pool_head(keepdims), _keras_pool_head(keepdims)
    (group,) = [g for g in find_groups(model) if not g.blocked]
    assert group.channels == 16 and [n.op_type for n in group.consumers] == ["MatMul"]
    keep = np.arange(1, 16, 2)
    apply_cut(group, keep)
    fc = masked.graph.initializers["fc_w"]
    rows = fc.const_value.numpy().copy()
    rows[np.setdiff1d(np.arange(16), keep)] = 0
    fc.const_value = ir.tensor(rows, name="fc_w")
    transposed = next(n for n in model.graph if n.op_type == "Transpose").outputs[0]
    assert transposed.shape is not None and transposed.shape[3] == 8
    assert_close(ort_run(masked, {"x": X}), model, {"x": X}, atol=1e-4)


def test_a_constant_shared_by_two_layers_no_longer_blocks_them():
    """Dedup shares equal constants (here one zero bias of two convs); pruning copies it per
    use, cuts each layer on its own, then merges what is still equal."""
    rng = np.random.default_rng(9)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.zeros(8, np.float32), "zero_bias"),
        numpy_helper.from_array(rng.normal(size=(10, 8)).astype(np.float32), "fc_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0", "zero_bias"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1", "zero_bias"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("GlobalAveragePool", ["r1"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1),
    ]
    model = _ir_model(nodes, inits, ["batch", 3, 16, 16])
    graph_pass = PruneChannelsPass(ratio=0.5, multiple_of=1, min_channels=1)
    graph_pass(model)
    assert graph_pass.metrics["channels"] == {"w0": [8, 4], "w1": [8, 4]}
    biases = [n for n in model.graph.initializers if n.startswith("zero_bias")]
    assert len(biases) == 1  # the two cut copies were still equal: merged again
    (out,) = ort_run(model, {"x": X})
    assert out.shape == (4, 10) and np.isfinite(out).all()


def _token_ffn(residual: bool = True) -> ir.Model:
    """x[batch, seq, 16] -> MatMul + Add -> Relu -> MatMul + Add (+ x): a transformer FFN."""
    rng = np.random.default_rng(10)
    inits = [
        numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32) / 4, "up_w"),
        numpy_helper.from_array(rng.normal(size=32).astype(np.float32), "up_b"),
        numpy_helper.from_array(rng.normal(size=(32, 16)).astype(np.float32) / 6, "down_w"),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "down_b"),
    ]
    nodes = [
        helper.make_node("MatMul", ["x", "up_w"], ["u"]),
        helper.make_node("Add", ["u", "up_b"], ["ub"]),
        helper.make_node("Relu", ["ub"], ["h"]),
        helper.make_node("MatMul", ["h", "down_w"], ["d"]),
        helper.make_node("Add", ["d", "down_b"], ["db" if residual else "y"]),
    ]
    if residual:
        nodes.append(helper.make_node("Add", ["db", "x"], ["y"]))
    return _ir_model(nodes, inits, ["batch", "seq", 16])


def test_transformer_ffn_channels_are_cut_on_the_last_axis():
    x = np.random.default_rng(11).normal(size=(3, 5, 16)).astype(np.float32)
    model, masked = _token_ffn(), _token_ffn()
    groups = find_groups(model)
    (group,) = [g for g in groups if not g.blocked]
    assert group.axis == -1 and group.channels == 32
    assert {c.value.name: c.axis for c in group.cuts} == {"up_w": 1, "up_b": 0, "down_w": 0}
    blocked = next(g for g in groups if g.key == "down_w")
    assert any("Add" in r for r in blocked.blocked)  # the residual mixes in the input
    keep = np.arange(0, 32, 3)
    apply_cut(group, keep)
    hidden = next(v for n in model.graph if n.op_type == "Relu" for v in n.outputs)
    assert hidden.shape is not None and hidden.shape[-1] == len(keep)
    rows = masked.graph.initializers["down_w"].const_value.numpy().copy()
    rows[np.setdiff1d(np.arange(32), keep)] = 0
    masked.graph.initializers["down_w"].const_value = ir.tensor(rows, name="down_w")
    assert_close(ort_run(masked, {"x": x}), model, {"x": x}, atol=1e-4)


def test_ffn_pass_with_activation_criterion_samples_tokens():
    """Statistics of a [batch, seq, features] input are taken per token (last axis)."""
    x = np.random.default_rng(12).normal(size=(8, 7, 16)).astype(np.float32)
    ref = ort_run(_token_ffn(residual=False), {"x": x})[0]
    errors = {}
    for criterion in ("weight", "activation"):
        model = _token_ffn(residual=False)
        graph_pass = PruneChannelsPass(
            ratio=0.5, multiple_of=1, criterion=criterion, feeds=[{"x": x}]
        )
        graph_pass(model)
        assert graph_pass.metrics["channels"] == {"up_w": [32, 16]}
        errors[criterion] = float(np.abs(ort_run(model, {"x": x})[0] - ref).mean())
    assert errors["activation"] < errors["weight"], errors


def test_matmul_over_the_width_of_a_feature_map_consumes_no_channels():
    """[N, C, H, W] @ W[W, K] mixes positions along W: the conv's channels cannot be cut there."""
    rng = np.random.default_rng(13)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 3, 1, 1)).astype(np.float32), "conv_w"),
        numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32), "mix_w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv_w"], ["c"]),
        helper.make_node("MatMul", ["c", "mix_w"], ["y"]),
    ]
    groups = find_groups(_ir_model(nodes, inits, ["batch", 3, 16, 16]))
    conv = next(g for g in groups if g.key == "conv_w")
    assert any("contracts its last axis" in r for r in conv.blocked)


def _keras_se_block() -> ir.Model:
    """tf2onnx's squeeze-and-excitation: pooled channels-last, reshaped back for 1x1 convs."""
    rng = np.random.default_rng(14)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) / 3, name)

    inits = [
        w("conv_w", 16, 3, 3, 3), w("conv_b", 16), w("red_w", 8, 16, 1, 1), w("red_b", 8),
        w("exp_w", 16, 8, 1, 1), w("exp_b", 16), w("proj_w", 6, 16, 1, 1),
        numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        numpy_helper.from_array(np.array([-1, 16, 1, 1], np.int64), "to_16"),
        numpy_helper.from_array(np.array([-1, 8, 1, 1], np.int64), "to_8"),
    ]  # fmt: skip
    nodes = [
        helper.make_node("Conv", ["x", "conv_w", "conv_b"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["f"]),
        helper.make_node("Transpose", ["f"], ["t"], perm=[0, 2, 3, 1]),
        helper.make_node("ReduceMean", ["t", "axes"], ["pooled"], keepdims=0),
        helper.make_node("Reshape", ["pooled", "to_16"], ["p4"]),
        helper.make_node("Conv", ["p4", "red_w", "red_b"], ["r"]),
        helper.make_node("Relu", ["r"], ["rr"]),
        helper.make_node("Reshape", ["rr", "to_8"], ["rr4"]),  # a no-op, as tf2onnx writes it
        helper.make_node("Conv", ["rr4", "exp_w", "exp_b"], ["e"]),
        helper.make_node("Sigmoid", ["e"], ["gate"]),
        helper.make_node("Mul", ["f", "gate"], ["scaled"]),
        helper.make_node("Conv", ["scaled", "proj_w"], ["y"]),
    ]
    return _ir_model(nodes, inits, ["batch", 3, 16, 16], opset=18)


def _target(model: ir.Model, output: str) -> list[int]:
    """The constant target of the Reshape that writes ``output``."""
    reshape = next(n for n in model.graph if n.outputs[0].name == output)
    return reshape.inputs[1].const_value.numpy().tolist()


def test_keras_squeeze_and_excitation_is_cut_through_its_reshapes():
    model, masked = _keras_se_block(), _keras_se_block()
    groups = {g.key: g for g in find_groups(model)}
    main, squeeze = groups["conv_w"], groups["red_w"]
    assert not main.blocked and not squeeze.blocked, (main.blocked, squeeze.blocked)
    assert sorted(p.inputs[1].name for p in main.producers) == ["conv_w", "exp_w"]
    assert sorted(n.inputs[1].name for n in main.consumers) == ["proj_w", "red_w"]
    keep = np.arange(0, 16, 2)
    apply_cut(main, keep)
    assert _target(model, "p4") == [-1, 8, 1, 1]
    drop = np.setdiff1d(np.arange(16), keep)
    for name in ("red_w", "proj_w"):  # the removed channels' inputs, zeroed in the twin
        value = masked.graph.initializers[name]
        array = value.const_value.numpy().copy()
        array[:, drop] = 0
        value.const_value = ir.tensor(array, name=name)
    assert_close(ort_run(masked, {"x": X}), model, {"x": X}, atol=1e-4)
    # the squeeze group (8 channels through the no-op Reshape) is cut the same way
    apply_cut(squeeze, np.arange(4))
    assert _target(model, "rr4") == [-1, 4, 1, 1]
    (out,) = ort_run(model, {"x": X})
    assert out.shape == (4, 6, 16, 16)


def test_pooled_consumer_is_refitted_on_the_map_positions():
    """A classifier behind global pooling is refitted on the map before it, per position.

    Six images give six pooled rows, too few to fit eight weights per output; the 6 x 256
    positions of the NHWC map before tf2onnx's ReduceMean are enough, and pooling is linear.
    """
    model = _keras_pool_head()
    matmul = next(n for n in model.graph if n.op_type == "MatMul")
    source = pooled_source(matmul.inputs[0])
    assert source is not None and (source[0].name, source[1]) == ("t", 3)
    rng = np.random.default_rng(13)
    tune, held = (rng.normal(size=(n, 3, 16, 16)).astype(np.float32) for n in (6, 32))
    # channels built from 4 shared filters, so the kept ones can stand in for the cut ones
    mixed = rng.normal(size=(16, 4)) @ rng.normal(size=(4, 27)) + 0.1 * rng.normal(size=(16, 27))

    def correlated() -> ir.Model:
        model = _keras_pool_head()
        model.graph.initializers["conv_w"].const_value = ir.tensor(
            mixed.reshape(16, 3, 3, 3).astype(np.float32), name="conv_w"
        )
        return model

    ref = ort_run(correlated(), {"x": held})[0]
    errors = {}
    for refit in ("bias", "lstsq"):
        model = correlated()
        settings = {"ratio": 0.5, "multiple_of": 1, "refit": refit, "ridge": 0.01}
        PruneChannelsPass(criterion="activation", feeds=[{"x": tune}], **settings)(model)
        errors[refit] = float(np.abs(ort_run(model, {"x": held})[0] - ref).mean())
    assert errors["lstsq"] < 0.5 * errors["bias"], errors


def test_padded_tokens_do_not_choose_the_ffn_channels():
    """Statistics leave out what the attention_mask marks as padding.

    The padded positions here carry large inputs that light up other hidden features than
    the real tokens do; counted in, they would decide which features are kept.
    """
    rng = np.random.default_rng(14)
    x = rng.normal(size=(8, 7, 16)).astype(np.float32)
    mask = np.ones((8, 7), np.int64)
    mask[:, 3:] = 0
    x[:, 3:] = 12 * rng.normal(size=16).astype(np.float32)  # one loud pattern in every pad
    proto = ir.to_proto(_token_ffn(residual=False))
    proto.graph.input.append(
        helper.make_tensor_value_info("attention_mask", onnx.TensorProto.INT64, ["batch", "seq"])
    )
    real = x[:, :3]
    ref = ort_run(ir.from_proto(proto), {"x": real, "attention_mask": mask[:, :3]})[0]
    model = ir.from_proto(proto)
    graph_pass = PruneChannelsPass(
        ratio=0.5, multiple_of=1, criterion="activation", feeds=[{"x": x, "attention_mask": mask}]
    )
    graph_pass(model)
    masked_error = float(
        np.abs(ort_run(model, {"x": real, "attention_mask": mask[:, :3]})[0] - ref).mean()
    )
    model = ir.from_proto(proto)
    padded = {"x": x, "attention_mask": np.ones_like(mask)}  # the same tokens, pads counted
    PruneChannelsPass(ratio=0.5, multiple_of=1, criterion="activation", feeds=[padded])(model)
    counted_error = float(
        np.abs(ort_run(model, {"x": real, "attention_mask": mask[:, :3]})[0] - ref).mean()
    )
    assert masked_error < 0.5 * counted_error, (masked_error, counted_error)


def _gpt2_ffn() -> ir.Model:
    """Two of GPT-2's Conv1D FFNs: tokens flattened for each Gemm, the [B, S, C] target
    computed by one Concat that both layers share (as the exporter's CSE leaves it)."""
    rng = np.random.default_rng(16)
    inits = [
        numpy_helper.from_array(np.array(v, np.int64), name)
        for name, v in [("rows_16", [-1, 16]), ("rows_32", [-1, 32]), ("zero", [0]),
                        ("two", [2]), ("c32", [32]), ("c16", [16])]
    ]  # fmt: skip
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "zero", "two"], ["lead"]),
        helper.make_node("Concat", ["lead", "c32"], ["to_hidden"], axis=0),
        helper.make_node("Concat", ["lead", "c16"], ["to_out"], axis=0),
    ]
    for i, (x, y) in enumerate([("x", "y0"), ("y0", "y")]):
        inits += [
            numpy_helper.from_array(rng.normal(size=(16, 32)).astype(np.float32) / 4, f"fc{i}"),
            numpy_helper.from_array(rng.normal(size=32).astype(np.float32), f"fc{i}_b"),
            numpy_helper.from_array(rng.normal(size=(32, 16)).astype(np.float32) / 6, f"proj{i}"),
        ]
        nodes += [
            helper.make_node("Reshape", [x, "rows_16"], [f"x2_{i}"]),
            helper.make_node("Gemm", [f"x2_{i}", f"fc{i}", f"fc{i}_b"], [f"h2_{i}"]),
            helper.make_node("Reshape", [f"h2_{i}", "to_hidden"], [f"h{i}"]),
            helper.make_node("Tanh", [f"h{i}"], [f"a{i}"]),
            helper.make_node("Mul", [f"h{i}", f"a{i}"], [f"g{i}"]),  # gating on both paths
            helper.make_node("Reshape", [f"g{i}", "rows_32"], [f"g2_{i}"]),
            helper.make_node("Gemm", [f"g2_{i}", f"proj{i}"], [f"o2_{i}"]),
            helper.make_node("Reshape", [f"o2_{i}", "to_out"], [y]),
        ]
    return _ir_model(nodes, inits, ["batch", "seq", 16], opset=18)


def test_gpt2_conv1d_ffn_is_cut_through_its_token_reshapes():
    """The first FFN is cut; the second keeps its 32 features through the shared Concat."""
    x = np.random.default_rng(17).normal(size=(3, 5, 16)).astype(np.float32)
    model, masked = _gpt2_ffn(), _gpt2_ffn()
    groups = {g.key: g for g in find_groups(model) if not g.blocked}
    assert {"fc0", "fc1"} <= set(groups)
    group = groups["fc0"]
    assert group.channels == 32 and group.axis == -1
    keep = np.arange(0, 32, 3)
    apply_cut(group, keep)
    assert _target(model, "g2_0") == [-1, len(keep)] and _target(model, "g2_1") == [-1, 32]
    reshape = next(n for n in model.graph if n.outputs[0].name == "h0")
    concat = reshape.inputs[1].producer()  # layer 0's own copy of the shared Concat
    assert concat is not None
    assert concat.inputs[1].const_value.numpy().tolist() == [len(keep)]
    assert model.graph.initializers["c32"].const_value.numpy().tolist() == [32]  # layer 1's
    rows = masked.graph.initializers["proj0"].const_value.numpy().copy()
    rows[np.setdiff1d(np.arange(32), keep)] = 0
    masked.graph.initializers["proj0"].const_value = ir.tensor(rows, name="proj0")
    assert_close(ort_run(masked, {"x": x}), model, {"x": x}, atol=1e-4)


def _hard_swish_convs(transposed: bool = False) -> onnx.ModelProto:
    """Conv -> hard-swish (x * relu6(x + 3) / 6) -> Conv, as tf2onnx writes a Keras
    MobileNetV3 block. ``transposed``: as tf2onnx leaves it before ORT's optimizer runs, the
    activation on an NHWC map between Transposes, then a spatial Pad and a
    squeeze-and-excitation that pools over H and W of the NHWC map. No tensor shapes are
    stored."""
    rng = np.random.default_rng(18)

    def w(name, *shape):
        return numpy_helper.from_array(rng.normal(size=shape).astype(np.float32) / 3, name)

    scalars = [("three", 3.0), ("lo", 0.0), ("hi", 6.0), ("sixth", 1 / 6)]
    inits = [w("w0", 16, 3, 3, 3), w("w1", 8, 16, 1, 1), w("sq_w", 4, 16, 1, 1),
             w("ex_w", 16, 4, 1, 1)]  # fmt: skip
    inits += [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in scalars]
    inits += [
        numpy_helper.from_array(np.array([0, 1, 1, 0, 0, 0, 0, 0], np.int64), "pads"),
        numpy_helper.from_array(np.array([1, 2], np.int64), "hw"),
    ]
    c = "c"
    nodes = [helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1])]
    if transposed:
        nodes.append(helper.make_node("Transpose", ["c"], ["t"], perm=[0, 2, 3, 1]))
        c = "t"
    nodes += [
        helper.make_node("Add", [c, "three"], ["a"]),
        helper.make_node("Clip", ["a", "lo", "hi"], ["r6"]),
        helper.make_node("Mul", ["r6", "sixth"], ["g"]),
        helper.make_node("Mul", [c, "g"], ["hs"]),
    ]
    last = "hs"
    if transposed:
        nodes += [
            helper.make_node("Pad", ["hs", "pads"], ["padded"]),
            helper.make_node("ReduceMean", ["padded", "hw"], ["pooled"], keepdims=1),
            helper.make_node("Transpose", ["pooled"], ["pooled_nchw"], perm=[0, 3, 1, 2]),
            helper.make_node("Conv", ["pooled_nchw", "sq_w"], ["sq"]),
            helper.make_node("Relu", ["sq"], ["sq_r"]),
            helper.make_node("Conv", ["sq_r", "ex_w"], ["ex"]),
            helper.make_node("Sigmoid", ["ex"], ["gate_nchw"]),
            helper.make_node("Transpose", ["gate_nchw"], ["gate"], perm=[0, 2, 3, 1]),
            helper.make_node("Mul", ["padded", "gate"], ["scaled"]),
            helper.make_node("Transpose", ["scaled"], ["hs_nchw"], perm=[0, 3, 1, 2]),
        ]
        last = "hs_nchw"
    nodes.append(helper.make_node("Conv", [last, "w1"], ["y"]))
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        inits,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_groups_of_a_model_without_stored_shapes_are_found():
    """ORT-optimized files keep no intermediate shapes; the analysis infers them."""
    model = ir.serde.deserialize_model(_hard_swish_convs())
    assert any(o.shape is None for n in model.graph for o in n.outputs)
    (group,) = [g for g in find_groups(model) if not g.blocked]
    assert group.key == "w0" and group.channels == 16


def test_keras_nhwc_block_between_transposes_is_cut():
    """Channels followed through tf2onnx's Transposes, a spatial Pad and an NHWC
    squeeze-and-excitation: cutting equals zeroing the consumers' columns."""
    model = ir.serde.deserialize_model(_hard_swish_convs(transposed=True))
    masked = ir.serde.deserialize_model(_hard_swish_convs(transposed=True))
    groups = {g.key: g for g in find_groups(model)}
    main = groups["w0"]
    assert not main.blocked, main.blocked
    assert sorted(n.inputs[1].name for n in main.consumers) == ["sq_w", "w1"]
    keep = np.arange(0, 16, 2)
    apply_cut(main, keep)
    drop = np.setdiff1d(np.arange(16), keep)
    for name in ("sq_w", "w1"):
        value = masked.graph.initializers[name]
        array = value.const_value.numpy().copy()
        array[:, drop] = 0
        value.const_value = ir.tensor(array, name=name)
    assert_close(ort_run(masked, {"x": X}), model, {"x": X}, atol=1e-4)


def _keras_tensordot_ffn() -> ir.Model:
    """tf2onnx's Tensordot for two Keras Dense layers on an NHWC map: rows flattened for each
    MatMul, the output shape computed from the input's leading dims (Shape -> Cast -> Gather
    -> Concat with the unit count -> Cast)."""
    rng = np.random.default_rng(19)
    inits = [
        numpy_helper.from_array(rng.normal(size=(8, 16)).astype(np.float32) / 3, "w1"),
        numpy_helper.from_array(rng.normal(size=16).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.normal(size=(16, 4)).astype(np.float32) / 4, "w2"),
        numpy_helper.from_array(np.array([0, 1, 2], np.int64), "free"),
    ] + [
        numpy_helper.from_array(np.array(v, np.int64), name)
        for name, v in [("rows_8", [-1, 8]), ("rows_16", [-1, 16]), ("u16", [16]), ("u4", [4])]
    ]  # fmt: skip
    nodes = []
    for i, (x, flat, units, w, y) in enumerate(
        [("x", "rows_8", "u16", "w1", "h"), ("r", "rows_16", "u4", "w2", "y")]
    ):
        nodes += [
            helper.make_node("Shape", [x], [f"s{i}"]),
            helper.make_node("Cast", [f"s{i}"], [f"s32_{i}"], to=onnx.TensorProto.INT32),
            helper.make_node("Gather", [f"s32_{i}", "free"], [f"lead{i}"], axis=0),
            helper.make_node("Cast", [f"lead{i}"], [f"lead64_{i}"], to=onnx.TensorProto.INT64),
            helper.make_node("Concat", [f"lead64_{i}", units], [f"t{i}"], axis=0),
            helper.make_node("Cast", [f"t{i}"], [f"target{i}"], to=onnx.TensorProto.INT64),
            helper.make_node("Reshape", [x, flat], [f"x2_{i}"]),
            helper.make_node("MatMul", [f"x2_{i}", w], [f"m{i}"]),
            helper.make_node("Reshape", [f"m{i}", f"target{i}"], [y if i else "m4"]),
        ]
        if not i:
            nodes += [
                helper.make_node("Add", ["m4", "b1"], ["h"]),
                helper.make_node("Relu", ["h"], ["r"]),
            ]
    return _ir_model(nodes, inits, ["batch", 5, 5, 8], opset=18)


def test_keras_dense_on_a_feature_map_is_cut_through_tensordot():
    x = np.random.default_rng(20).normal(size=(2, 5, 5, 8)).astype(np.float32)
    model, masked = _keras_tensordot_ffn(), _keras_tensordot_ffn()
    (group,) = [g for g in find_groups(model) if not g.blocked]
    assert group.key == "w1" and group.channels == 16
    keep = np.arange(0, 16, 2)
    apply_cut(group, keep)
    rows = masked.graph.initializers["w2"].const_value.numpy().copy()
    rows[np.setdiff1d(np.arange(16), keep)] = 0
    masked.graph.initializers["w2"].const_value = ir.tensor(rows, name="w2")
    assert_close(ort_run(masked, {"x": x}), model, {"x": x}, atol=1e-4)


def test_gpt2_from_a_transformers_config_has_both_ffns_cut(cli, tmp_path):
    """The dynamo export of GPT-2 as it comes: one Concat builds every layer's [B, S, 256]."""
    bundle, out = tmp_path / "gpt2", tmp_path / "pruned"
    spec = "input_ids:int64[batch,seq]"
    code, _, err = cli(
        "convert", model_ref("tiny_gpt2"), "-o", bundle, "--input", spec, "--no-bench"
    )
    assert code == 0, err
    args = ("--method", "channels", "--ratio", "0.5", "--multiple-of", "1", "--json")
    code, stdout, err = cli("prune", bundle, "-o", out, *args)
    assert code == 0, err
    metrics = json.loads(stdout)["steps"][-1]["metrics"]
    cut = {k: v for k, v in metrics["pass"]["channels"].items() if "mlp.c_fc" in k}
    assert sorted(cut.values()) == [[256, 128], [256, 128]], metrics["pass"]["channels"]
    assert json.loads(stdout)["validation"]["cpu"]["status"] == "passed"


def test_a_weight_shared_by_two_layers_stays_one_tensor():
    """Two convs on one kernel (tied, or equal ones that dedup merged): copying it would let
    each copy be cut its own way and the model grow, so its groups stay blocked and the
    layer before them is still cut."""
    rng = np.random.default_rng(15)
    inits = [
        numpy_helper.from_array(rng.normal(size=(16, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(size=(8, 16, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(size=(8, 8, 1, 1)).astype(np.float32), "tied"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c0"], ["r0"]),
        helper.make_node("Conv", ["r0", "w1"], ["c1"]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "tied"], ["c2"]),
        helper.make_node("Relu", ["c2"], ["r2"]),
        helper.make_node("Conv", ["r2", "tied"], ["y"]),
    ]
    model = _ir_model(nodes, inits, ["batch", 3, 16, 16])
    graph_pass = PruneChannelsPass(ratio=0.25, multiple_of=1, min_channels=1)
    graph_pass(model)
    assert graph_pass.metrics["channels"] == {"w0": [16, 12]}
    assert any("'tied' is shared" in r for r in graph_pass.metrics["skipped"]["w1"])
    assert [n for n in model.graph.initializers if n.startswith("tied")] == ["tied"]


def test_upsampling_passes_channels_on():
    """Resize by [1, 1, 2, 2] (a U-Net's or FPN's upsampling) resizes each channel alone."""
    rng = np.random.default_rng(21)
    inits = [
        numpy_helper.from_array(rng.normal(size=(16, 3, 3, 3)).astype(np.float32), "w0"),
        numpy_helper.from_array(rng.normal(size=(8, 16, 1, 1)).astype(np.float32), "w1"),
        numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w0"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node("Resize", ["r", "", "scales"], ["u"], mode="nearest"),
        helper.make_node("Conv", ["u", "w1"], ["y"]),
    ]
    model, masked = (_ir_model(nodes, inits, ["batch", 3, 16, 16]) for _ in range(2))
    (group,) = [g for g in find_groups(model) if not g.blocked]
    keep = np.arange(0, 16, 2)
    apply_cut(group, keep)
    weight = masked.graph.initializers["w1"]
    array = weight.const_value.numpy().copy()
    array[:, np.setdiff1d(np.arange(16), keep)] = 0
    weight.const_value = ir.tensor(array, name="w1")
    assert_close(ort_run(masked, {"x": X}), model, {"x": X}, atol=1e-4)


def test_a_tied_embedding_stays_one_tensor(tmp_path):
    """GPT-2's table is read by a Gather and, transposed, by the LM head: it is not copied."""
    from onnx import TensorProto

    rng = np.random.default_rng(0)
    table = rng.standard_normal((100, 16)).astype(np.float32)  # over dedup's 1024 elements
    w1 = rng.standard_normal((16, 64)).astype(np.float32)
    w2 = rng.standard_normal((64, 16)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["h"]),
        helper.make_node("MatMul", ["h", "w1"], ["a"]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["b"]),
        helper.make_node("Transpose", ["table"], ["head"], perm=[1, 0]),
        helper.make_node("MatMul", ["b", "head"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", 5])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 5, 100])],
        [numpy_helper.from_array(a, n) for a, n in ((table, "table"), (w1, "w1"), (w2, "w2"))],
    )
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    pruned = PruneChannelsPass(ratio=0.5, multiple_of=8)(model).model
    shapes = sorted(tuple(v.shape) for v in pruned.graph.initializers.values())
    assert shapes == [(16, 32), (32, 16), (100, 16)]  # one table, the hidden layer halved


def test_gated_search_measures_only_layers_the_ratio_cuts(cli, cnn_bundle, tmp_path):
    """At 0.3 with multiples of 8, 16 and 24 channels stay whole: no "damage 0" rows for them."""
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.random.default_rng(3).standard_normal((16, 3, 16, 16)).astype("f4"))
    code, stdout, err = cli(
        "prune", cnn_bundle, "-o", tmp_path / "p", "--method", "channels", "--ratio", "0.3",
        "--multiple-of", "8", "--eval", data, "--gate", "cosine>=0.5", "--json",
    )  # fmt: skip
    assert code == 0, err
    rows = json.loads(stdout)["steps"][-1]["metrics"]["search"]["sensitivity"]
    channels = {g.key: g.channels for g in find_groups(ir.load(cnn_bundle / "model.onnx"))}
    assert rows and all(channels[r["layer"]] == 32 for r in rows)
