"""The onnxpipe error tree; each error knows the CLI exit code it maps to.

Every layer raises these so the CLI can turn them into one clear paragraph and the
contract's exit code: 1 a gate failed, 2 bad input or usage, 3 internal error. SIGINT and
SIGTERM become KeyboardInterrupt and :class:`Terminated` (:func:`terminate_cleanly`), so a
killed run cleans up as a Ctrl-C'd one does.
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from typing import Any


class OnnxPipeError(Exception):
    """Base of every error onnxpipe raises on purpose."""

    exit_code = 3


class InputError(OnnxPipeError):
    """The user's input is wrong: a file, a spec, a flag. Exit 2.

    The message names the file (or argument), what is wrong and what to do.
    """

    exit_code = 2


class ConversionError(InputError):
    """A framework model could not be converted (unsupported op, bad signature). Exit 2."""


class PassError(InputError):
    """A graph pass refused the model or its settings. Exit 2."""


class GateFailed(OnnxPipeError):
    """A parity or accuracy gate failed. Exit 1; carries the measured numbers."""

    exit_code = 1

    def __init__(
        self,
        message: str,
        metrics: dict[str, Any] | None = None,
        report: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.metrics = metrics or {}
        self.report = report  # what ``<out>.failed.json`` holds, once written


POSITIONAL = {"source": "SOURCE"}
"""Settings the command line takes as positional arguments, as its usage names them."""


def invalid_settings(
    what: str,
    error: ValueError,
    flags: bool = False,
    place: Callable[[Sequence[object]], str] | None = None,
) -> InputError:
    """InputError for settings that failed validation, one clause per field.

    pydantic's ValidationError (a ValueError) prints a multi-line dump ending in a link to
    its docs; users see ``what: energy Input should be less than or equal to 1.`` instead,
    or with ``flags`` (settings given on the command line) ``--energy Input should ...``.
    ``place`` names a field where the user wrote it (a recipe's ``steps[1].prune.energy``),
    from pydantic's location of the error (``()`` for the settings as a whole).
    """
    details = getattr(error, "errors", None)
    if not callable(details):
        return InputError(f"{what}: {error}.")

    def named(loc: object) -> str:
        if flags and loc in POSITIONAL:
            return POSITIONAL[str(loc)]
        return f"--{str(loc).replace('_', '-')}" if flags else str(loc)

    def where(loc: Sequence[object]) -> str:  # ("threads", 0) -> threads[0]
        return named(loc[0]) + "".join(f"[{part}]" for part in loc[1:]) if loc else ""

    def clause(item: Any) -> str:
        text = (
            "is not a setting of it"
            if item.get("type") == "extra_forbidden"
            else item["msg"].removeprefix("Value error, ")
        )
        if place is not None:  # "source is empty", "steps[1].bench.runs: Input should be"
            return f"{place(item['loc'])}{' ' if text.startswith('is ') else ': '}{text}"
        return f"{where(item['loc'])} {text}" if item["loc"] else text

    clauses = "; ".join(clause(item) for item in details())
    return InputError(f"{what}: {clauses}.")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so temporary files are cleaned up as on Ctrl-C."""


_RECEIVED: list[int] = []
"""Signals (SIGINT, SIGTERM) the command line received during this command."""


def signal_received(signum: int) -> None:
    """Remember ``signum``: :func:`raise_if_interrupted` raises for it later.

    The interrupt raised by the handler can be lost: when it lands while torch imports
    ``torch._dynamo`` lazily, torch's ``except torch._dynamo.exc.UserError`` then fails with
    AttributeError, which the exporter fallback took for an export failure (a Ctrl-C'd run
    went on to write its bundle with TorchScript).
    """
    _RECEIVED.append(signum)


_WRITTEN: list[str] = []
"""Bundles this command has put in place (a signal after that must not say 'nothing written')."""


def note_written(path: object) -> None:
    """Remember that the bundle at ``path`` is complete and in place."""
    _WRITTEN.append(str(path))


def written() -> list[str]:
    """The bundles this command has put in place so far."""
    return list(_WRITTEN)


def clear_signals() -> None:
    """Forget earlier signals and writes (a new command starts)."""
    _RECEIVED.clear()
    _WRITTEN.clear()


def raise_if_interrupted() -> None:
    """Raise :class:`Terminated` / KeyboardInterrupt if a signal came; before lasting work."""
    if _RECEIVED:
        raise Terminated if _RECEIVED[-1] == signal.SIGTERM else KeyboardInterrupt


def _on_signal(signum: int, frame: object) -> None:
    signal_received(signum)  # kept, in case the exception is lost on the way (see there)
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def terminate_cleanly() -> dict[int, Any]:
    """Handle SIGINT and SIGTERM as :class:`Terminated`/KeyboardInterrupt, remembered.

    Returns the handlers to restore. A killed run (``timeout``, a CI runner) otherwise left
    its scratch files behind: 476 MB of GPTQ statistics for a ResNet-50. Only the main thread
    may set handlers.
    """
    clear_signals()
    previous: dict[int, Any] = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            if signal.getsignal(signum) == signal.SIG_IGN:
                continue  # ignored by whoever started us (`cmd &`, nohup): stays ignored
            previous[signum] = signal.signal(signum, _on_signal)
        except ValueError:
            break
    return previous


def what_stands() -> str:
    """For the message on a signal: nothing was written, or the bundle that was complete."""
    done = written()
    if not done:
        return "nothing was written"
    return f"{', '.join(done)} was already complete and stands"
