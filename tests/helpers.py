"""Shared test helpers: run an ONNX model with ONNX Runtime and compare with a reference."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort


def ort_session(model: ir.Model | str | Path) -> ort.InferenceSession:
    """A CPU session on an ir.Model (saved to a temp file) or a model path; asserts the EP."""
    if isinstance(model, ir.Model):
        # The session holds the model in memory: the file goes with the directory.
        with tempfile.TemporaryDirectory(prefix="onnxpipe-test-") as tmp:
            path = Path(tmp) / "model.onnx"
            ir.save(model, path)
            return ort_session(path)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert session.get_providers() == ["CPUExecutionProvider"]
    return session


def ort_run(model: ir.Model | str | Path, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
    """Run the model once on ORT CPU."""
    return ort_session(model).run(None, dict(feeds))


def assert_close(
    reference: list[np.ndarray],
    model: ir.Model | str | Path,
    feeds: Mapping[str, np.ndarray],
    atol: float = 1e-4,
) -> None:
    """Assert ORT's outputs of ``model`` on ``feeds`` match ``reference`` within ``atol``."""
    got = ort_run(model, feeds)
    assert len(got) == len(reference)
    for i, (want, have) in enumerate(zip(reference, got, strict=True)):
        assert want.shape == have.shape, (i, want.shape, have.shape)
        diff = float(np.max(np.abs(want.astype(np.float64) - have.astype(np.float64))))
        assert diff <= atol, f"output {i}: max abs diff {diff} > {atol}"


def matmul_model(w: np.ndarray, opset: int = 17) -> ir.Model:
    """One MatMul node ``mm``: ``y = x @ w`` for ``x`` float32 ``[n, K]``."""
    from onnx import TensorProto, helper, numpy_helper  # noqa: PLC0415

    k, n = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n])],
        [numpy_helper.from_array(w, "w")],
    )  # fmt: skip
    return ir.serde.deserialize_model(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    )


def graph_bundle(cli, folder: Path, name: str, graph: onnx.GraphProto) -> Path:
    """``graph`` at opset 17 saved as ``folder/name.onnx`` and converted to ``folder/name``."""
    source = folder / f"{name}.onnx"
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    onnx.save(model, source)
    code, _, err = cli("convert", source, "-o", folder / name, "--no-bench")
    assert code == 0, err
    return folder / name
