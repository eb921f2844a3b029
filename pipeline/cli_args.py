"""The ``onnxpipe`` argument parser: every subcommand and its flags (the CLI of CONTRACT.md).

Usage errors raise :class:`onnxpipe.errors.InputError`, so they are exit 2 with one paragraph,
as bad input is.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from onnxpipe import __version__
from onnxpipe.errors import InputError

DESCRIPTION = (
    "Convert PyTorch, Keras/TensorFlow and ONNX models to ONNX bundles, then optimize, "
    "quantize, prune, validate, bench, compare and package them. "
    "'onnxpipe COMMAND --help' describes each command."
)

EP_HELP = "comma-separated: cpu,cuda,tensorrt,xnnpack,nnapi,coreml,mobile"
"""validate's and bench's --ep (runtime.EP_PROVIDERS' names, plus mobile: not imported
here, so that --help loads no ONNX Runtime)."""
GATE_HELP = (
    "accuracy gate vs the input model, repeatable: top1>=0.97, cosine>=0.99, kl<=0.04 or "
    "max_abs<=1e-3"
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # argparse's usage errors are exit 2, as ours
        raise InputError(f"{message}. See '{self.prog} --help'.")  # main adds 'onnxpipe:'


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks and exporter logs")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser for every subcommand."""
    parser = _Parser(prog="onnxpipe", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"onnxpipe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("convert", help="framework model or ONNX file -> validated bundle")
    p.add_argument(
        "source",
        help="module:callable, file.py:callable, .pt, .pt2, .keras, .h5, SavedModel dir or .onnx",
    )
    p.add_argument("-o", "--out", required=True, type=Path, help="new bundle directory")
    p.add_argument(
        "--framework", default="auto", choices=["auto", "torch", "tf", "onnx"],
        help="source framework (auto: from the file or object)",
    )  # fmt: skip
    p.add_argument(
        "--input",
        action="append",
        default=[],
        metavar="SPEC",
        help="name:dtype[d0,d1,...], symbols are dynamic, e.g. x:float32[batch,3,224,224]",
    )
    p.add_argument(
        "--opset", type=int, default=None,
        help="ONNX opset (default: the exporter's; dynamo writes 18+, lower falls back to "
        "TorchScript; tf2onnx knows up to 18)",
    )  # fmt: skip
    p.add_argument(
        "--exporter", default="auto", choices=["auto", "dynamo", "torchscript"],
        help="PyTorch exporter (auto: dynamo, then TorchScript if it fails)",
    )  # fmt: skip
    p.add_argument("--nchw", action="store_true", help="NCHW image inputs for TF models")
    p.add_argument(
        "--atol", type=float, default=1e-4, help="parity tolerance (scaled by magnitude)"
    )
    p.add_argument("--data", help="DATA for parity besides generated samples (.npz, dir, callable)")
    p.add_argument("--unsafe-load", action="store_true", help="allow full-pickle loading")
    p.add_argument(
        "--signature", metavar="NAME", help="SavedModel signature (default: serving_default)"
    )
    p.add_argument("--no-bench", action="store_true", help="skip the batch-1 CPU benchmark")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _common(p)

    p = sub.add_parser("validate", help="checker + parity per execution provider")
    p.add_argument("bundle", type=Path)
    p.add_argument("--ep", default="cpu", help=EP_HELP)
    p.add_argument("--require", default="", help="EPs whose unavailability is a failure")
    p.add_argument("--data", help="DATA to validate on besides the bundle's stored samples")
    p.add_argument(
        "--atol", type=float, default=1e-4, help="parity tolerance (scaled by magnitude)"
    )
    _common(p)

    p = sub.add_parser("bench", help="latency matrix: EPs x batch x threads")
    p.add_argument("bundle", type=Path)
    p.add_argument("--ep", default="cpu", help=EP_HELP)
    p.add_argument("--batch", default="1", help="comma-separated batch sizes, e.g. 1,8 (default 1)")
    p.add_argument(
        "--threads", default="0", help="comma-separated intra-op threads (default 0: ORT's own)"
    )
    p.add_argument("--runs", type=_at_least(1), default=50, help="timed runs per cell (default 50)")
    p.add_argument("--warmup", type=_at_least(0), default=5, help="untimed runs first (default 5)")
    p.add_argument(
        "--size",
        action="append",
        default=[],
        metavar="SYMBOL=N",
        help="size of a dynamic dim other than the batch (default 8), e.g. --size seq=128 "
        "--size height=224",
    )
    p.add_argument(
        "--data",
        help="DATA to time on instead of generated values (its first samples, repeated to "
        "each --batch): for a model whose ids generated values overrun",
    )
    _common(p)

    p = sub.add_parser("package", help="package a bundle for a target (mobile: ORT format)")
    p.add_argument("bundle", type=Path)
    p.add_argument("-o", "--out", required=True, type=Path, help="new bundle directory")
    p.add_argument(
        "--target", required=True, choices=["mobile"], help="mobile: ORT format + operator config"
    )
    p.add_argument(
        "--fixed-shape",
        action="append",
        default=[],
        metavar="NAME:DIMS",
        help="fix an input's shape, e.g. input:1,3,224,224 (NNAPI/CoreML need it)",
    )
    p.add_argument(
        "--level",
        default="auto",
        choices=["auto", "basic", "extended", "all"],
        help="ORT optimization level baked into the .ort model (auto: extended for an int8 "
        "QDQ model, whose int8 kernels basic leaves unfused, else basic, portable to "
        "NNAPI/CoreML; all is for the CPU EP only)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _common(p)

    p = sub.add_parser(
        "quantize",
        help="int8 static/dynamic, int4 or fp16 bundle behind an accuracy gate",
        description="Quantize a bundle. DATA: .npz, a dir of .npy/.npz, module:callable, or a "
        "dir of images with --preprocess (or DIR?resize=256,crop=224,mean=127,std=128).",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("-o", "--out", required=True, type=Path, help="new bundle directory")
    p.add_argument(
        "--mode", required=True, choices=["static", "dynamic", "int4", "fp16"],
        help="static/dynamic int8, int4 weight-only (MatMulNBits) or fp16",
    )  # fmt: skip
    p.add_argument(
        "--calib",
        metavar="DATA",
        help="calibration data (static; dynamic: smoothing statistics; int4: GPTQ rounding)",
    )
    p.add_argument("--eval", metavar="DATA", help="gate data (default: the bundle's samples)")
    p.add_argument(
        "--preprocess",
        metavar="SPEC",
        help="for image dirs: resize=N,crop=N,mean=M[/G/B],std=S[/G/B],layout=nchw|nhwc, "
        "e.g. resize=256,crop=224,mean=127,std=128",
    )
    p.add_argument(
        "--method",
        choices=["minmax", "entropy", "percentile", "distribution"],
        help="static calibration (default minmax; distribution is ORT's float8 method: "
        "refused for int8, with the measured reason)",
    )
    scales = p.add_mutually_exclusive_group()
    scales.add_argument(
        "--per-channel",
        dest="per_channel",
        action="store_const",
        const=True,
        help="per-channel weight scales (the default)",
    )
    scales.add_argument(
        "--per-tensor", dest="per_channel", action="store_const", const=False,
        help="one scale per weight tensor",
    )  # fmt: skip
    p.add_argument(
        "--rounding",
        choices=["gptq", "nearest"],
        help="static int8 and int4 weight rounding: error-compensating on the calibration "
        "data (default; int4 without --calib rounds to nearest) or to nearest",
    )
    p.add_argument(
        "--no-empirical-bias",
        dest="empirical_bias",
        action="store_const",
        const=False,
        help="static QDQ: skip the bias correction measured layer by layer on the calibration "
        "data (about 30 s on EfficientNet-Lite0; it lowered KL by a third there)",
    )
    p.add_argument(
        "--smooth-alpha",
        type=float,
        metavar="A",
        help="dynamic: SmoothQuant strength in [0, 1] (default 0.7), statistics from --calib or "
        "--eval (0: off)",
    )
    p.add_argument("--format", choices=["qdq", "qop"], help="static: QDQ (default) or QOperator")
    types = (
        "static: activation int type (auto: uint8 on x86, int8 elsewhere; int8 for an ARM device)"
    )
    p.add_argument("--activation-type", choices=["auto", "uint8", "int8"], help=types)
    p.add_argument(
        "--exclude", action="append", default=[], metavar="NODE", help="node or op type in float"
    )
    p.add_argument("--gate", action="append", default=[], metavar="GATE", help=GATE_HELP)
    p.add_argument(
        "--auto", action="store_const", const=True, help="static: search configs + float fallbacks"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _common(p)

    p = sub.add_parser(
        "optimize",
        help="cleanup: constant folding, dedup, ORT offline optimization, transformer fusions",
        description="Fold constants, drop dead and Identity nodes, dedupe initializers "
        "(onnxscript / onnx_ir passes), with --slim run onnxslim's rewrites, run ONNX "
        "Runtime's offline optimizer at --level and, with --transformer, the fusions of "
        "onnxruntime.transformers.optimizer (the maintained successor of onnxruntime-tools).",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("-o", "--out", required=True, type=Path, help="new bundle directory")
    p.add_argument(
        "--level",
        default="basic",
        choices=["none", "basic", "extended", "all"],
        help="basic (default) keeps standard ONNX ops (any EP); extended adds ORT contrib "
        "fusions; all also bakes this CPU's NCHWc layout in; none skips ORT's optimizer",
    )
    p.add_argument(
        "--slim",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="also run onnxslim's rewrites before --level (pip install 'onnxpipe[slim]'; off by "
        "default: it rarely removes more than --level basic)",
    )
    p.add_argument("--transformer", metavar="TYPE", help="bert, gpt2, bart, vit, ... fusions")
    p.add_argument("--num-heads", type=int, default=0, help="attention heads (0: detect)")
    p.add_argument("--hidden-size", type=int, default=0, help="hidden size (0: detect)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _common(p)

    p = sub.add_parser(
        "prune",
        help="magnitude, structured-channel or low-rank compression behind an accuracy gate",
        description="magnitude zeroes weights (smaller only when zipped; no ORT speedup); "
        "channels removes Conv/Gemm/MatMul output channels (smaller and faster); lowrank factors "
        "Gemm/MatMul weights by SVD. With --gate, channels and lowrank choose per-layer ratios "
        "up to --ratio, least sensitive layers first, on --eval data.",
    )
    p.add_argument("bundle", type=Path)
    p.add_argument("-o", "--out", required=True, type=Path, help="new bundle directory")
    p.add_argument(
        "--method", required=True, choices=["magnitude", "channels", "lowrank"],
        help="zero small weights, cut channels, or factor weights (SVD)",
    )  # fmt: skip
    p.add_argument("--ratio", required=True, type=float, help="share to remove, in (0, 1)")
    p.add_argument(
        "--scope", choices=["layer", "global"], help="magnitude threshold scope (default: layer)"
    )
    p.add_argument(
        "--energy",
        type=float,
        help="lowrank: keep at least this share of SVD energy (the rank --ratio sets, or larger)",
    )
    p.add_argument(
        "--multiple-of",
        type=int,
        metavar="N",
        help="channels: kept channel counts round up to multiples of N (default: ORT's NCHWc "
        "block on this CPU, 16 with AVX-512, else 8)",
    )
    p.add_argument("--no-cleanup", action="store_true", help="skip the cleanup pass first")
    p.add_argument("--eval", metavar="DATA", help="gate/search data (default: bundle samples)")
    p.add_argument("--gate", action="append", default=[], metavar="GATE", help=GATE_HELP)
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _common(p)

    p = sub.add_parser("compare", help="two bundles side by side (e.g. Keras vs PyTorch)")
    p.add_argument("bundle_a", type=Path)
    p.add_argument("bundle_b", type=Path)
    p.add_argument("--data", help="DATA keyed by A's input names (default: generated)")
    p.add_argument("--html", type=Path, help="write a single-page HTML comparison here")
    p.add_argument("--no-bench", action="store_true", help="skip the latency measurement")
    _common(p)

    p = sub.add_parser("run", help="run a recipe YAML into a bundle")
    p.add_argument("recipe", type=Path)
    p.add_argument("-o", "--out", required=True, type=Path, help="new bundle directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _common(p)

    p = sub.add_parser("demo", help="the default recipe on EfficientNet-Lite0 (ImageNet weights)")
    p.add_argument(
        "-o", "--out", type=Path, default=Path("demo-bundle"),
        help="new bundle directory (default demo-bundle)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    _common(p)
    return parser


def _at_least(minimum: int) -> Any:
    """An argparse type: an integer >= ``minimum`` (argparse names the flag as typed)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from e
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: must be >= {minimum}")
        return value

    return parse


def int_list(text: str, flag: str, minimum: int | None = None) -> tuple[int, ...]:
    """A flag's comma-separated integers (``--batch 1,8``), each >= ``minimum`` if given."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError as e:
        raise InputError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,8.") from e
    if not values:
        raise InputError(f"{flag}: give at least one value.")
    low = next((v for v in values if minimum is not None and v < minimum), None)
    if low is not None:
        raise InputError(
            f"{flag} {text!r}: {low} is below {minimum}; every value must be >= {minimum}."
        )
    return values


def symbol_sizes(texts: Sequence[str]) -> tuple[tuple[str, int], ...]:
    """``--size SYMBOL=N`` flags as (symbol, size) pairs."""
    from onnxpipe.bench import parse_sizes  # noqa: PLC0415

    try:
        return parse_sizes(texts)
    except ValueError as e:
        raise InputError(
            f"--size {str(e)!r}: write SYMBOL=N with N >= 1, e.g. --size seq=128."
        ) from e
