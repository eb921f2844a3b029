"""The pass contract: config validation, ir-py's checks, errors that name the pass."""

from typing import ClassVar

import onnx_ir as ir
import pytest
from pydantic import Field

from onnxpipe.errors import InputError, PassError
from onnxpipe.graphs.base import GraphPass, PassConfig, get_pass, run_passes


class RenameConfig(PassConfig):
    suffix: str = Field(default="_x", min_length=1, description="Appended to the graph name.")


class RenamePass(GraphPass[RenameConfig]):
    name: ClassVar[str] = "rename"
    config_class = RenameConfig

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        model.graph.name = (model.graph.name or "") + self.config.suffix
        self.metrics["renamed"] = True
        return ir.passes.PassResult(model, modified=True)


class LiarPass(RenamePass):
    name: ClassVar[str] = "liar"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        return ir.passes.PassResult(ir.Model(ir.Graph([], [], nodes=[]), ir_version=10), True)


def tiny() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    node = ir.node("Relu", [x])
    node.outputs[0].name = "y"
    return ir.Model(ir.Graph([x], node.outputs, nodes=[node], name="g"), ir_version=10)


def test_pass_runs_with_config_and_metrics():
    model = tiny()
    p = RenamePass(suffix="_q")
    result = p(model)
    assert result.model is model and model.graph.name == "g_q" and p.metrics == {"renamed": True}


def test_bad_config_is_input_error():
    with pytest.raises(InputError, match="rename"):
        RenamePass(suffix="")
    with pytest.raises(InputError):
        RenamePass(unknown=1)


def test_contract_breach_names_the_pass_and_the_steps_before():
    with pytest.raises(PassError, match=r"pass 2 \(liar\), after rename: .*in-place"):
        run_passes([RenamePass(), LiarPass()], tiny())


def test_unknown_pass_lists_known_ones():
    with pytest.raises(InputError, match="unknown pass 'nope'"):
        get_pass("nope")


def test_computed_weights_hint_names_constant_subgraphs_not_activations():
    """A weight built from constants (ConstantOfShape) gets the hint; a MatMul of two
    activations (attention scores) is not a computed weight."""
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    from onnxpipe.graphs.base import computed_weights_hint

    nodes = [
        helper.make_node("ConstantOfShape", ["shape"], ["w"], value=numpy_helper.from_array(
            np.array([0.02], np.float32))),
        helper.make_node("MatMul", ["x", "w"], ["h"]),
        helper.make_node("MatMul", ["h", "k"], ["y"]),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [2, 4]) for n in ("x", "k")],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.array([4, 4], np.int64), "shape")],
    )
    model = ir.serde.deserialize_model(helper.make_model(graph))
    hint = computed_weights_hint(model, ("MatMul",))
    assert "The weights of 1 MatMul node are computed in the graph (ConstantOfShape)" in hint
    assert computed_weights_hint(model, ("Gemm",)) == ""
