"""Benchmark feeds from the user's DATA, for models that refuse generated values.

bench fills integer inputs with random ids (below ``index_limit`` where the manifest records
one); a model whose ids index something onnxpipe cannot see (a ``GatherElements`` over another
input, a computed table) refuses them, and only real samples can time it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from onnxpipe.benchworker import batch_symbols
from onnxpipe.converters.base import InputSpec
from onnxpipe.errors import InputError

OUT_OF_RANGE = re.compile(
    r"out of (data )?(range|bounds)|must be within the inclusive range|invalid index",
    re.IGNORECASE,
)
"""What ORT says when an index input's values are past what it indexes (Gather: 'indices
element out of data bounds', GatherElements: 'Out of range value in index tensor')."""


def out_of_range_error(model: str, detail: str) -> InputError:
    """The InputError for a model that refused the benchmark's generated input values."""
    return InputError(
        f"{model}: the benchmark's generated input values are out of the model's range, and "
        f"ONNX Runtime refused them ({_gist(detail)}): integer inputs get random ids from 1 to "
        "99 (or below the manifest's index_limit), which this model cannot take. Time it on "
        "real inputs: pass --data DATA (a .npz with one array per input, samples on axis 0)."
    )


def data_feeds(data: str, inputs: Sequence[dict[str, Any]], batch: int) -> dict[str, np.ndarray]:
    """The first samples of ``data``, repeated or cut to ``batch`` on the batch axis.

    ``inputs`` are the specs of the model timed (an ORT package's may be fixed), so data that
    does not fit them is refused by :func:`~onnxpipe.data.load_data`, naming the input.

    Raises:
        InputError: the data is unreadable or does not match the inputs.
    """
    from onnxpipe.data import load_data  # noqa: PLC0415 - data pulls in the bundle modules

    specs = [InputSpec.from_json(s) for s in inputs]
    first = load_data(data, specs)[0]
    batched = batch_symbols(specs)
    return {
        s.name: (
            np.take(first[s.name], np.arange(batch) % len(first[s.name]), axis=0)
            if s.shape and s.shape[0] in batched and first[s.name].ndim
            else first[s.name]
        )
        for s in specs
    }


def _gist(detail: str) -> str:
    """ORT's message without its source path and template noise: what it said last."""
    return detail if len(detail) <= 200 else "... " + detail[-160:].split("] ", 1)[-1]
