"""Progress of long searches, for whoever shows it (the CLI's progress bar); silent otherwise.

The searches (``quantize --auto``, gated pruning) call :func:`report` at each candidate or
layer; the CLI installs a callback with :func:`reporting` for the duration of a command.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

Callback = Callable[[str, int | None, int | None], None]
"""``(text, done, total)``; ``done``/``total`` are None where the count is not known."""

_callback: ContextVar[Callback | None] = ContextVar("onnxpipe_progress", default=None)


@contextmanager
def reporting(callback: Callback) -> Iterator[None]:
    """Send every :func:`report` inside the block to ``callback``."""
    token = _callback.set(callback)
    try:
        yield
    finally:
        _callback.reset(token)


def report(text: str, done: int | None = None, total: int | None = None) -> None:
    """Say what the work is doing now (``done`` of ``total`` where known)."""
    callback = _callback.get()
    if callback is not None:
        callback(text, done, total)
