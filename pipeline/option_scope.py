"""Settings that only some modes of a command read (``quantize --mode``, ``prune --method``).

Such a setting given with another mode did nothing, yet the step's config recorded it as
applied: :func:`refuse_unread` turns it into a usage error, and :func:`read_settings` keeps a
recorded config to what the chosen mode reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

Readers = Mapping[str, tuple[str, ...]]
"""Setting name -> the modes that read it; settings not listed are read by every mode."""


def refuse_unread(
    given: Iterable[str],
    readers: Readers,
    chosen: str,
    switch: str,
    flags: Mapping[str, str] | None = None,
) -> None:
    """ValueError naming the first setting in ``given`` that mode ``chosen`` does not read.

    ``switch`` is the flag that picks the mode (``--mode``); ``flags`` spells settings whose
    flag is not ``--<name>`` (``--no-empirical-bias``).
    """
    for name in sorted(given):
        modes = readers.get(name)
        if modes is not None and chosen not in modes:
            flag = (flags or {}).get(name, f"--{name.replace('_', '-')}")
            raise ValueError(f"{flag} applies to {switch} {' and '.join(modes)} only")


def read_settings(data: Mapping[str, Any], readers: Readers, chosen: str) -> dict[str, Any]:
    """The entries of ``data`` that mode ``chosen`` reads: what a manifest records as applied."""
    return {k: v for k, v in data.items() if chosen in readers.get(k, (chosen,))}
