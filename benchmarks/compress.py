"""Compression benchmark: params, size, latency ratio and held-out accuracy per method.

EfficientNet-Lite0 (ImageNet weights): ``prune --method channels --ratio 0.3 --gate top1>=0.9``
and ``--method magnitude --ratio 0.5``. all-MiniLM-L6-v2: ``--method lowrank --ratio 0.5
--gate cosine>=0.98`` and ``--method channels --ratio 0.3 --gate cosine>=0.98`` (FFN hidden
features). Ratios are chosen on tuning data; accuracy is measured on held-out data
disjoint from it (other photos; other sentences, see ``compress_data.py``). Latency: batch 1,
ORT CPU, each model alone in a fresh process, taking turns 5 times; the speedup is the median
of the turn-by-turn ratios.

    python benchmarks/compress.py [--work DIR] [--only efficientnet|minilm] [--json]
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from compress_data import image_split, sentence_split  # noqa: E402
from quantize import _cli, _latency, _outputs, _pooled, _size, _speedup, _tokens, run_rows  # noqa: E402


def _params(path: Path) -> tuple[int, float]:
    """(parameters, share of exact zeros in Conv/Gemm/MatMul weights)."""
    import onnx_ir as ir  # noqa: PLC0415

    from onnxpipe.graphs.prune_magnitude import prunable_weights, weight_sparsity  # noqa: PLC0415

    model = ir.load(path)
    total = sum(v.const_value.size for v in model.graph.initializers.values() if v.const_value)
    return total, weight_sparsity(prunable_weights(model, ("Conv", "Gemm", "MatMul"), 1))


def _zipped(path: Path) -> int:
    import zlib  # noqa: PLC0415

    return len(zlib.compress(path.read_bytes(), 6))


def _row(model: str, method: str, base: Path, cand: Path, feeds1: dict, rounds: int = 5) -> dict:
    p0, _ = _params(base)
    p1, sparsity = _params(cand)
    ms = _latency({"base": base, "cand": cand}, feeds1, rounds=rounds)
    speedup, turns = _speedup(ms, "base", "cand")
    return {
        "model": model, "method": method, "params_ratio": p1 / p0, "sparsity": sparsity,
        "size_ratio": _size(base) / _size(cand), "zip_ratio": _zipped(base) / _zipped(cand),
        "speedup": speedup, "speedup_turns": turns,
    }  # fmt: skip


def efficientnet(work: Path) -> list[dict[str, Any]]:
    """Channels (gated search) and magnitude rows for EfficientNet-Lite0."""
    tune, held = image_split()
    np.savez(work / "tune.npz", input=tune)
    base = work / "effnet"
    _cli("convert", "onnxpipe.demo:efficientnet_lite0", "-o", base, "--overwrite", "--no-bench",
         "--input", "input:float32[batch,3,224,224]")  # fmt: skip
    runs = {
        "channels 0.3 top1>=0.9": ["--method", "channels", "--ratio", "0.3",
                                   "--gate", "top1>=0.9", "--eval", work / "tune.npz"],
        "magnitude 0.5": ["--method", "magnitude", "--ratio", "0.5"],
    }  # fmt: skip
    held_feeds = [{"input": held[i : i + 16]} for i in range(0, len(held), 16)]
    ref = _outputs(base / "model.onnx", held_feeds)
    rows = []
    for method, flags in runs.items():
        out = work / ("effnet-" + method.split()[0])
        _cli("prune", base, "-o", out, "--overwrite", *flags)
        got = _outputs(out / "model.onnx", held_feeds)
        row = _row("EfficientNet-Lite0", method, base / "model.onnx", out / "model.onnx",
                   {"input": held[:1]})  # fmt: skip
        row["top1_agreement"] = float((ref.argmax(1) == got.argmax(1)).mean())
        row["held_out"] = len(held)
        rows.append(row)
    return rows


def minilm(work: Path) -> list[dict[str, Any]]:
    """Low-rank and FFN-channel rows for all-MiniLM-L6-v2 (mean-pooled cosine on held-out)."""
    tune, held = sentence_split()
    np.savez(work / "sent-tune.npz", **_tokens(tune))
    base = work / "minilm"
    specs = ["--input", "input_ids:int64[batch,seq]", "--input", "attention_mask:int64[batch,seq]"]
    _cli("convert", f"{HERE / 'quantize.py'}:minilm", "-o", base, "--overwrite", "--no-bench",
         *specs)  # fmt: skip
    feeds = _tokens(held)
    batches = [{k: v[i : i + 8] for k, v in feeds.items()} for i in range(0, len(held), 8)]
    masks = np.concatenate([b["attention_mask"] for b in batches])
    ref = _pooled(_outputs(base / "model.onnx", batches), masks)
    runs = {
        "lowrank 0.5 cosine>=0.98": ["--method", "lowrank", "--ratio", "0.5"],
        "channels 0.3 cosine>=0.98": ["--method", "channels", "--ratio", "0.3"],
    }
    rows = []
    for method, flags in runs.items():
        out = work / ("minilm-" + method.split()[0])
        _cli("prune", base, "-o", out, "--overwrite", *flags, "--gate", "cosine>=0.98",
             "--eval", work / "sent-tune.npz")  # fmt: skip
        emb = _pooled(_outputs(out / "model.onnx", batches), masks)
        cos = (ref * emb).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(emb, axis=1))
        row = _row("all-MiniLM-L6-v2", method, base / "model.onnx", out / "model.onnx",
                   _tokens([held[3]]))  # fmt: skip
        row["embedding_cosine"] = float(cos.mean())
        row["held_out"] = len(held)
        rows.append(row)
    return rows


def main() -> None:
    """Run the benchmarks and print one table."""
    rows = run_rows(__doc__ or "", efficientnet, minilm)
    print(f"{'model':20} {'method':26} {'params':>7} {'zeros':>6} {'size':>6} {'zip':>6} "
          f"{'speedup':>8} {'top1':>6} {'cos':>7}")  # fmt: skip
    for r in rows:
        top1 = f"{r['top1_agreement']:.3f}" if "top1_agreement" in r else "-"
        cos = f"{r['embedding_cosine']:.4f}" if "embedding_cosine" in r else "-"
        print(f"{r['model']:20} {r['method']:26} {r['params_ratio']:6.3f}x {r['sparsity']:6.3f} "
              f"{r['size_ratio']:5.2f}x {r['zip_ratio']:5.2f}x {r['speedup']:7.3f}x {top1:>6} "
              f"{cos:>7}")  # fmt: skip


if __name__ == "__main__":
    main()
