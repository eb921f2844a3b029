"""The ``onnxpipe`` command line: one ``cmd_*`` per subcommand.

The flags are :mod:`onnxpipe.cli_args`'s; what it prints, :mod:`onnxpipe.cli_output`'s.

Exit codes (contract): 0 done; 1 a gate failed, numbers reported; 2 bad input or usage, one
paragraph naming the file and the fix; 3 internal error. ``--debug`` shows tracebacks.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import math
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

from onnxpipe.cli_args import build_parser, int_list, symbol_sizes
from onnxpipe.cli_output import emit, err, progress_steps, quiet, working
from onnxpipe.errors import (
    GateFailed,
    InputError,
    OnnxPipeError,
    Terminated,
    invalid_settings,
    terminate_cleanly,
    what_stands,
)
from onnxpipe.tables import bench_table, compare_table, summary_table, validation_table

logger = logging.getLogger(__name__)


def cmd_convert(args: argparse.Namespace) -> int:
    """``onnxpipe convert``."""
    from onnxpipe.steps import BenchStep, ConvertStep, ValidateStep  # noqa: PLC0415

    try:
        steps: list[Any] = [
            ConvertStep(
                source=args.source,
                framework=args.framework,
                inputs=tuple(args.input),
                opset=args.opset,
                exporter=args.exporter,
                nchw=args.nchw,
                atol=args.atol,
                data=args.data,
                unsafe_load=args.unsafe_load,
                signature=args.signature,
            ),
            ValidateStep(ep=("cpu",), atol=args.atol),
        ]
    except ValueError as e:  # pydantic's ValidationError: --opset or --atol out of range
        raise invalid_settings("convert", e, flags=True) from e
    if not args.no_bench:
        steps.append(BenchStep(batch=(1,), runs=30))
    manifest = progress_steps(steps, args.out, args)
    emit(args, manifest, [summary_table(manifest, args.out)])
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``onnxpipe demo``: the default recipe on the embedded EfficientNet-Lite0."""
    from onnxpipe.demo import demo_steps  # noqa: PLC0415

    manifest = progress_steps(demo_steps(), args.out, args, title="EfficientNet-Lite0 (demo)")
    emit(
        args, manifest, [summary_table(manifest, args.out), bench_table(manifest["bench_records"])]
    )
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """``onnxpipe run RECIPE.yaml``."""
    from onnxpipe.recipe import load_recipe, modules_beside  # noqa: PLC0415

    steps = load_recipe(args.recipe)
    with modules_beside(args.recipe):
        manifest = progress_steps(steps, args.out, args, protect=(args.recipe,), recipe=True)
    emit(args, manifest, [summary_table(manifest, args.out)])
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    """``onnxpipe validate BUNDLE``: records ``validation.<ep>`` in the manifest."""
    from onnxpipe.bundle_ops import validate_existing  # noqa: PLC0415
    from onnxpipe.validate import parse_eps  # noqa: PLC0415

    eps = parse_eps(args.ep)
    require = tuple(parse_eps(args.require)) if args.require else ()
    if not (args.atol > 0 and math.isfinite(args.atol)):
        raise InputError(f"--atol {args.atol}: give a tolerance above 0, e.g. --atol 1e-4.")
    with quiet(args.debug):
        results, failed = validate_existing(args.bundle, eps, require, args.data, args.atol)
    emit(args, results, [validation_table(results)])
    if failed:
        err.print(f"[bold red]onnxpipe: gate failed:[/bold red] {escape(failed)}", soft_wrap=True)
        return 1
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``onnxpipe bench BUNDLE``: one record per (ep, batch, threads)."""
    from onnxpipe.bench import BenchConfig  # noqa: PLC0415
    from onnxpipe.bundle_ops import bench_existing  # noqa: PLC0415
    from onnxpipe.validate import parse_eps  # noqa: PLC0415

    config = BenchConfig(
        eps=tuple(parse_eps(args.ep)),
        batches=int_list(args.batch, "--batch", minimum=1),
        threads=int_list(args.threads, "--threads", minimum=0),
        runs=args.runs,
        warmup=args.warmup,
        sizes=symbol_sizes(args.size),
        data=args.data,
    )
    with err.status("benchmarking", spinner="dots") if not args.json else contextlib.nullcontext():
        records = bench_existing(args.bundle, config)
    emit(args, records, [bench_table(records)])
    return 0


def cmd_package(args: argparse.Namespace) -> int:
    """``onnxpipe package BUNDLE -o OUT --target mobile``."""
    from onnxpipe.mobile import package_mobile  # noqa: PLC0415

    status = err.status("packaging", spinner="dots") if not args.json else contextlib.nullcontext()
    with status, quiet(args.debug):
        manifest = package_mobile(
            args.bundle, args.out, args.fixed_shape, args.level, args.overwrite
        )
    emit(args, manifest, [summary_table(manifest, args.out)])
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    """``onnxpipe quantize BUNDLE -o OUT --mode ...``: a gated, quantized bundle."""
    from onnxpipe.quantize import (  # noqa: PLC0415
        quantize_bundle,
        settings_from,
        with_preprocess_all,
    )

    calib, eval_data = with_preprocess_all(args.preprocess, args.calib, args.eval)
    settings = settings_from(
        mode=args.mode,
        calib=calib,
        method=args.method,
        per_channel=args.per_channel,
        rounding=args.rounding,
        empirical_bias=args.empirical_bias,
        smooth_alpha=args.smooth_alpha,
        format=args.format,
        activation_type=args.activation_type,
        exclude=tuple(args.exclude),
        auto=args.auto,
        gates=tuple(args.gate),
    )
    with working(args, "quantizing"):
        manifest = quantize_bundle(
            args.bundle,
            args.out,
            settings,
            eval_data,
            args.overwrite,
        )
    emit(args, manifest, [summary_table(manifest, args.out)])
    return 0


def cmd_optimize(args: argparse.Namespace) -> int:
    """``onnxpipe optimize BUNDLE -o OUT``: the cleanup pass as a bundle step."""
    from onnxpipe.graphs.cleanup import CleanupConfig  # noqa: PLC0415
    from onnxpipe.optimize import optimize_bundle  # noqa: PLC0415

    try:
        config = CleanupConfig(
            fold_constants=True,
            level=args.level,
            slim=args.slim,
            transformer=args.transformer,
            num_heads=args.num_heads,
            hidden_size=args.hidden_size,
        )
    except ValueError as e:  # pydantic's ValidationError
        raise invalid_settings("optimize", e, flags=True) from e
    status = err.status("optimizing", spinner="dots") if not args.json else contextlib.nullcontext()
    with status, quiet(args.debug):
        manifest = optimize_bundle(args.bundle, args.out, config, args.overwrite)
    emit(args, manifest, [summary_table(manifest, args.out)])
    _print_note(args, manifest)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    """``onnxpipe prune BUNDLE -o OUT --method ... --ratio R``: a gated, compressed bundle."""
    from onnxpipe.compress import prune_bundle  # noqa: PLC0415
    from onnxpipe.prune_settings import PruneSettings, check_ratio  # noqa: PLC0415

    try:
        given = {"scope": args.scope, "energy": args.energy, "multiple_of": args.multiple_of}
        settings = PruneSettings(
            method=args.method,
            ratio=check_ratio(args.ratio),
            gates=tuple(args.gate),
            cleanup=not args.no_cleanup,
            **{k: v for k, v in given.items() if v is not None},  # options not given: unset
        )
    except ValueError as e:  # pydantic's ValidationError
        raise invalid_settings("prune", e, flags=True) from e
    with working(args, "pruning"):
        manifest = prune_bundle(args.bundle, args.out, settings, args.eval, args.overwrite)
    emit(args, manifest, [summary_table(manifest, args.out)])
    _print_note(args, manifest)
    return 0


def _print_note(args: argparse.Namespace, manifest: dict[str, Any]) -> None:
    """The last step's note (what the user should know about the result), unless --json."""
    note = manifest["steps"][-1]["metrics"].get("note")
    if note and not args.json:
        err.print(f"note: {escape(note)}", soft_wrap=True)


def _check_file_target(path: Path, flag: str) -> None:
    """Refuse a file to write that is a directory or whose folder is missing or read-only."""
    folder = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        inside = path / "compare.html"
        example = inside if not (path / "manifest.json").is_file() else Path("compare.html")
        raise InputError(f"{flag} {path}: is a directory; give a file name, e.g. {example}.")
    if not folder.is_dir():
        raise InputError(f"{flag} {path}: folder {folder} does not exist; create it first.")
    if not os.access(folder, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise InputError(f"{flag} {path}: not writable here; choose another path.")


def cmd_compare(args: argparse.Namespace) -> int:
    """``onnxpipe compare A B``: the contract's JSON record, a table, or an HTML page."""
    from onnxpipe.atomic import write_text_atomic  # noqa: PLC0415
    from onnxpipe.bundle import input_paths  # noqa: PLC0415
    from onnxpipe.compare import compare_bundles, render_html  # noqa: PLC0415

    if args.html:  # before the work: a page that cannot be written is bad input
        _check_file_target(args.html, "--html")
        inputs = [("the compared bundle", b) for b in (args.bundle_a, args.bundle_b)]
        inputs += [("the --data input", d) for d in input_paths(args.data)]
        page = args.html.resolve()
        for what, path in inputs:
            if page.is_relative_to(path.resolve()):  # the path itself, or inside it
                raise InputError(
                    f"--html {args.html}: inside {what} {path} (or that path itself), whose "
                    "files it would replace or add to; write the page elsewhere."
                )
    shown = not args.json and err.is_terminal
    status = err.status("comparing", spinner="dots") if shown else contextlib.nullcontext()
    with status, quiet(args.debug):
        record = compare_bundles(args.bundle_a, args.bundle_b, args.data, not args.no_bench)
    if args.html:
        try:
            write_text_atomic(args.html, render_html(record))
        except OSError as e:
            raise InputError(f"--html {args.html}: cannot write it ({e.strerror}).") from e
    emit(args, record, [compare_table(record)])
    return 0


COMMANDS = {
    "convert": cmd_convert,
    "validate": cmd_validate,
    "bench": cmd_bench,
    "compare": cmd_compare,
    "quantize": cmd_quantize,
    "optimize": cmd_optimize,
    "prune": cmd_prune,
    "package": cmd_package,
    "run": cmd_run,
    "demo": cmd_demo,
}


def _check_runtime() -> None:
    """Every command runs models on ONNX Runtime: its absence is an install to fix, exit 2.

    ``onnxruntime`` (CPU) and ``onnxruntime-gpu`` install the same module, so onnxpipe
    depends on neither directly: the ``cpu`` and ``gpu`` extras pick one.
    """
    if importlib.util.find_spec("onnxruntime") is None:
        raise InputError(
            "onnxpipe runs models on ONNX Runtime, which is not installed. Install it with: "
            "pip install 'onnxpipe[cpu]' (or 'onnxpipe[gpu]' on a machine with CUDA; never both "
            "in one environment)."
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    previous = terminate_cleanly()
    args: argparse.Namespace | None = None
    try:
        args = build_parser().parse_args(argv)
        _check_runtime()
        return COMMANDS[args.command](args)
    except Terminated:
        err.print(f"onnxpipe: terminated; {what_stands()}.")
        return 143
    except OnnxPipeError as e:
        if debug:
            traceback.print_exc()
        if isinstance(e, GateFailed) and args is not None and getattr(args, "json", False):
            # a script reading --json gets the numbers too, not empty input
            record = e.report or {"error": str(e), "metrics": e.metrics}
            emit(args, {"status": "gate_failed", **record}, [])
        label = {1: "gate failed", 2: "error"}.get(e.exit_code, "internal error")
        err.print(
            f"[bold red]onnxpipe: {label}:[/bold red] {escape(str(e))}",
            highlight=False,
            soft_wrap=True,
        )
        return e.exit_code
    except KeyboardInterrupt:
        err.print(f"onnxpipe: interrupted; {what_stands()}.")
        return 130
    except BrokenPipeError:
        # stdout's reader went away (| head): the work is done, the rest of the output unread
        with contextlib.suppress(OSError, ValueError, AttributeError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except PermissionError as e:
        err.print(
            f"[bold red]onnxpipe: error:[/bold red] {escape(str(e.filename or ''))}: "
            f"{escape(e.strerror or 'permission denied')}. Make it readable (and its folder), "
            "or work on a copy you own.",
            highlight=False,
            soft_wrap=True,
        )
        return 2
    except Exception as e:  # noqa: BLE001 - the contract's exit 3 for anything unforeseen
        if debug:
            traceback.print_exc()
        err.print(
            f"[bold red]onnxpipe: internal error:[/bold red] {type(e).__name__}: "
            f"{escape(str(e))}. Rerun with --debug for the traceback and report it.",
            highlight=False,
            soft_wrap=True,
        )
        return 3
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run() -> None:
    """The ``onnxpipe`` console script: :func:`main`, then exit at once.

    The interpreter's teardown after a command (torch's takes seconds) is skipped: a signal
    there made a finished command's exit code 130/143, and every file is closed by then.
    """
    code = main()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        # closed (>&-: None) or a reader that went away (| head): it got what it read
        with contextlib.suppress(OSError, ValueError, AttributeError):
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
