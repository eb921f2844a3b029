"""What the command line prints: progress on stderr, tables or ``--json`` on stdout.

Steps run inside :func:`quiet`, which keeps exporters' and ORT's own prints off stdout, so
that stdout holds only the results; :func:`progress_steps` and :func:`working` show a
``rich`` progress bar while they run (off with ``--json``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

err = Console(stderr=True, emoji=False)
"""The console for progress and messages (stderr)."""


class _Stdout(Console):
    """The console for tables: a reader that went away (``| head``) is a BrokenPipeError.

    rich's own handling exits with status 1, which onnxpipe keeps for failed gates.
    """

    def on_broken_pipe(self) -> None:
        """Raise BrokenPipeError for :func:`onnxpipe.cli.main` (exit 141, as SIGPIPE)."""
        self.quiet = True
        raise BrokenPipeError


@contextlib.contextmanager
def quiet(debug: bool) -> Iterator[None]:
    """Keep exporters' prints and warnings off stdout, which belongs to tables and --json.

    The TorchScript exporter and TensorFlow print from C++ straight to file descriptor 1, so
    the descriptor itself is pointed at a scratch file while steps run.
    """
    if debug or sys.stdout is None:  # None: closed by the caller (>&-), nothing to keep clean
        yield
        return
    # TensorFlow's C++ errors include "failed call to cuInit" on every machine without a GPU.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.stdout.flush()
    saved = os.dup(1)
    for name in ("torch", "onnxscript", "tf2onnx", "tensorflow", "absl"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # ORT's tools reset their loggers to DEBUG when first imported, so a level set here
    # would not hold: these are switched off for the step instead.
    chatty = [logging.getLogger(n) for n in ("ort_format_model.utils", "usability_checker")]
    for chatty_logger in chatty:
        chatty_logger.disabled = True
    # Python-level prints (ORT's calibrators: "Collecting tensor data ...") go to a buffer,
    # whatever sys.stdout is (a test harness replaces it); C++ ones to the scratch file.
    with (
        warnings.catch_warnings(),
        tempfile.TemporaryFile() as sink,
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)
            for chatty_logger in chatty:
                chatty_logger.disabled = False


def progress_steps(
    steps: Sequence[Any],
    out: Path,
    args: argparse.Namespace,
    title: str | None = None,
    protect: Sequence[Path] = (),
    recipe: bool = False,
) -> dict[str, Any]:
    """Run ``steps`` into ``out`` with a bar counting the steps; returns the manifest.

    Errors name the step only for a ``recipe`` (the user's steps, not convert's own).
    """
    from onnxpipe.recipe import run_steps  # noqa: PLC0415 - keeps --help fast

    with _bar(args, TextColumn("{task.completed}/{task.total}")) as bar:
        task = bar.add_task("starting", total=len(steps))

        def progress(i: int, total: int, name: str) -> None:
            bar.update(task, completed=i, description=f"[bold]{name}[/bold]")

        with quiet(args.debug):
            overwrite = getattr(args, "overwrite", False)
            return run_steps(steps, out, overwrite, progress, title=title, protect=protect,
                             name_steps=recipe)  # fmt: skip


def _bar(args: argparse.Namespace, *extra: TextColumn) -> Progress:
    """The progress bar on stderr: spinner, what runs, bar, ``extra``, elapsed time."""
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        *extra,
        TimeElapsedColumn(),
        console=err,
        transient=True,
        disable=args.json or not err.is_terminal,  # no bar (nor its blank line) in logs
    )


@contextlib.contextmanager
def working(args: argparse.Namespace, label: str) -> Iterator[None]:
    """A spinner, a bar where the work reports counts (--auto, gated pruning), elapsed time."""
    from onnxpipe.progress import reporting  # noqa: PLC0415

    with _bar(args) as bar:
        task = bar.add_task(label, total=None)

        def update(text: str, done: int | None, total: int | None) -> None:
            count = f" ({done}/{total})" if total else ""
            bar.update(task, description=f"{label}: {escape(text)}{count}", completed=done or 0,
                       total=total)  # fmt: skip

        shown = reporting(update) if not args.json else contextlib.nullcontext()
        with shown, quiet(args.debug):
            yield


def emit(args: argparse.Namespace, payload: Any, tables: Sequence[Any]) -> None:
    """Print ``payload`` as JSON (``--json``) or the ``tables``, on stdout."""
    if args.json:
        from onnxpipe.atomic import strict_json  # noqa: PLC0415

        print(json.dumps(strict_json(payload), indent=2, default=str))
        return
    out = _Stdout(emoji=False)
    for table in tables:
        out.print(table)
