"""Conversion: onnxpipe vs the bare converters on the same models, in one run.

For each model and route: did it convert, conversion seconds, the worst parity against the
source framework at shapes the export never saw, and ORT CPU p50 latency at batch 1 (routes of
one model timed interleaved, so the ratios hold on a noisy machine).

    python benchmarks/convert.py            # everything (a few minutes on 2 cores)
    python benchmarks/convert.py --quick    # torch models only
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

Row = dict[str, Any]


def session(path: Path) -> ort.InferenceSession:
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert s.get_providers() == ["CPUExecutionProvider"]
    return s


def worst_diff(path: Path, reference: Callable[[dict], list], feeds_list: list[dict]) -> float:
    """Max abs diff over outputs and feeds; inf when ORT refuses a shape."""
    s = session(path)
    worst = 0.0
    for feeds in feeds_list:
        try:
            got = s.run(None, feeds)
        except Exception:  # noqa: BLE001 - ORT refusing a frozen shape is the measurement
            return float("inf")
        for want, have in zip(reference(feeds), got, strict=False):
            if want.shape != have.shape:
                return float("inf")
            worst = max(worst, float(np.abs(want.astype(np.float64) - have).max()))
    return worst


def interleaved_p50(paths: dict[str, Path], feeds: dict, rounds: int = 5, runs: int = 20) -> dict:
    sessions = {}
    for k, p in paths.items():
        s = session(p)
        try:
            for _ in range(3):
                s.run(None, feeds)
        except Exception:  # noqa: BLE001 - a model frozen to another batch cannot be timed here
            continue
        sessions[k] = s
    times: dict[str, list[float]] = {k: [] for k in sessions}
    for _ in range(rounds):
        for k, s in sessions.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                s.run(None, feeds)
                times[k].append((time.perf_counter() - t0) * 1000)
    return {k: float(np.median(v)) for k, v in times.items()}


def run_route(name: str, fn: Callable[[Path], None], out: Path) -> tuple[Row, Path | None]:
    started = time.perf_counter()
    try:
        fn(out)
        return {"route": name, "status": "ok", "seconds": time.perf_counter() - started}, out
    except Exception as e:  # noqa: BLE001 - a bare tool failing is the measurement
        reason = (
            f"{type(e).__name__}: {str(e).strip().splitlines()[0][:90]}"
            if str(e)
            else type(e).__name__
        )
        return {"route": name, "status": reason, "seconds": time.perf_counter() - started}, None


def onnxpipe_route(
    source: Any, inputs: tuple[str, ...], framework: str = "auto"
) -> Callable[[Path], None]:
    from onnxpipe.convert import convert
    from onnxpipe.converters.base import ConvertConfig

    def go(out: Path) -> None:
        done = convert(source, ConvertConfig(inputs=inputs), out.parent / "work", framework)
        out.write_bytes(done.model_path.read_bytes())

    return go


def torch_models(tmp: Path) -> list[dict]:
    import torch
    from tests.fixtures.models import tiny_bert

    from onnxpipe.demo import efficientnet_lite0

    cases = []
    effnet = efficientnet_lite0()
    x = torch.randn(2, 3, 224, 224)
    batch = torch.export.Dim("batch")

    def eff_ref(feeds: dict) -> list:
        with torch.no_grad():
            return [effnet(torch.from_numpy(feeds["input"])).numpy()]

    rng = np.random.default_rng(0)
    cases.append(
        {
            "model": "EfficientNet-Lite0 (ImageNet weights)",
            "routes": {
                "onnxpipe (auto)": onnxpipe_route(effnet, ("input:float32[batch,3,224,224]",)),
                "torch.onnx dynamo, defaults": lambda p: torch.onnx.export(
                    effnet, (x,), str(p), dynamo=True, input_names=["input"]
                ),
                "torch.onnx dynamo, dynamic batch": lambda p: torch.onnx.export(
                    effnet,
                    (x,),
                    str(p),
                    dynamo=True,
                    input_names=["input"],
                    dynamic_shapes=({0: batch},),
                ),
                "torch.onnx torchscript, dynamic batch": lambda p: torch.onnx.export(
                    effnet,
                    (x,),
                    str(p),
                    dynamo=False,
                    input_names=["input"],
                    dynamic_axes={"input": {0: "batch"}},
                ),
            },
            "reference": eff_ref,
            "feeds": [
                {"input": rng.standard_normal((b, 3, 224, 224)).astype(np.float32)} for b in (1, 3)
            ],
        }
    )
    bert = tiny_bert()
    ids, mask = torch.randint(1, 100, (2, 8)), torch.ones(2, 8, dtype=torch.long)
    axes = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}

    def bert_ref(feeds: dict) -> list:
        with torch.no_grad():
            out = bert(
                input_ids=torch.from_numpy(feeds["input_ids"]),
                attention_mask=torch.from_numpy(feeds["attention_mask"]),
            )
        return [out.last_hidden_state.numpy(), out.pooler_output.numpy()]

    cases.append(
        {
            "model": "BERT (transformers config, 2 layers)",
            "routes": {
                "onnxpipe (auto)": onnxpipe_route(
                    bert, ("input_ids:int64[batch,seq]", "attention_mask:int64[batch,seq]")
                ),
                "torch.onnx torchscript, dynamic axes": lambda p: torch.onnx.export(
                    bert,
                    (ids, mask),
                    str(p),
                    dynamo=False,
                    input_names=["input_ids", "attention_mask"],
                    dynamic_axes=axes,
                ),
            },
            "reference": bert_ref,
            "feeds": [
                {
                    "input_ids": rng.integers(1, 100, (b, s)),
                    "attention_mask": np.ones((b, s), np.int64),
                }
                for b, s in ((1, 13), (3, 5))
            ],
        }
    )
    return cases


def keras_models(tmp: Path) -> list[dict]:
    import keras
    import tensorflow as tf
    import tf2onnx

    cases = []
    rng = np.random.default_rng(0)
    for name, factory in (
        ("EfficientNetB0", keras.applications.EfficientNetB0),
        ("ConvNeXtTiny", keras.applications.ConvNeXtTiny),
        ("MobileNetV2", keras.applications.MobileNetV2),
    ):
        model = factory(weights=None, input_shape=(64, 64, 3), classifier_activation=None)
        signature = (tf.TensorSpec((None, 64, 64, 3), tf.float32, name="input"),)
        fn = tf.function(lambda x, m=model: m(x, training=False), input_signature=signature)

        def ref(feeds: dict, m=model) -> list:
            return [m(feeds["input"], training=False).numpy()]

        def raw_function(p: Path, fn=fn, signature=signature) -> None:
            tf2onnx.convert.from_function(
                fn, input_signature=signature, opset=18, output_path=str(p)
            )
            session(p)  # loading is part of "converted"

        def raw_keras(p: Path, m=model, signature=signature) -> None:
            tf2onnx.convert.from_keras(m, input_signature=signature, opset=18, output_path=str(p))
            session(p)

        cases.append(
            {
                "model": f"keras {name} (weights=None, 64x64)",
                "routes": {
                    "onnxpipe (tf2onnx route)": onnxpipe_route(model, (), framework="tf"),
                    "tf2onnx.from_keras": raw_keras,
                    "tf2onnx.from_function": raw_function,
                },
                "reference": ref,
                "feeds": [
                    {"input": rng.standard_normal((b, 64, 64, 3)).astype(np.float32)}
                    for b in (1, 3)
                ],
            }
        )
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="torch models only")
    args = parser.parse_args()
    table = Table(title="conversion: onnxpipe vs bare converters (parity at unseen shapes)")
    for col in (
        "model",
        "route",
        "status",
        "convert s",
        "max abs diff",
        "p50 ms",
        "p50 vs first row",
    ):
        table.add_column(col)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        cases = torch_models(tmp) + ([] if args.quick else keras_models(tmp))
        for index, case in enumerate(cases):
            rows, paths = [], {}
            for r_index, (route, fn) in enumerate(case["routes"].items()):
                out = tmp / f"{index}-{r_index}" / "model.onnx"
                out.parent.mkdir()
                row, path = run_route(route, fn, out)
                if path is not None:
                    row["diff"] = worst_diff(path, case["reference"], case["feeds"])
                    paths[route] = path
                rows.append(row)
            feeds = case["feeds"][0]
            p50 = interleaved_p50(paths, feeds) if paths else {}
            base = next(iter(p50.values()), None)
            for row in rows:
                ms = p50.get(row["route"])
                diff = row.get("diff")
                table.add_row(
                    case["model"],
                    row["route"],
                    row["status"],
                    f"{row['seconds']:.1f}",
                    "n/a"
                    if diff is None
                    else ("refused shape" if diff == float("inf") else f"{diff:.2e}"),
                    "n/a" if ms is None else f"{ms:.2f}",
                    "n/a" if ms is None or base is None else f"{ms / base:.2f}x",
                )
            table.add_section()
    Console(width=170).print(table)


if __name__ == "__main__":
    main()
