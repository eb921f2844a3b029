"""Converters: framework model -> ONNX (torch, tensorflow/keras, onnx passthrough).

One registry, keyed by framework name, of ``module:function`` strings imported on first use,
so ``import onnxpipe`` never pulls in torch or tensorflow. Each function takes
``(source, ConvertConfig)`` and yields :class:`~onnxpipe.converters.base.ExportAttempt` s,
or (single-exporter converters) returns one :class:`~onnxpipe.converters.base.ConversionResult`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from typing import Any

from onnxpipe.converters.base import ConversionResult, ConvertConfig, ExportAttempt
from onnxpipe.errors import InputError

CONVERTERS: dict[str, str] = {
    "torch": "onnxpipe.converters.torch:attempts",
    "tf": "onnxpipe.converters.tensorflow:convert",
    "onnx": "onnxpipe.converters.onnx_file:attempts",
}
_EXTRAS = {"torch": "onnxpipe[torch]", "tf": "onnxpipe[tf]", "onnx": "onnxpipe"}
_PACKAGES = {"torch": ("torch",), "tf": ("tensorflow", "tf2onnx", "keras")}
"""What each framework's extra installs (onnxscript, which the dynamo exporter imports, is core)."""


def extra_for(package: str) -> str | None:
    """The extra that installs ``package`` (``onnxpipe[tf]`` for keras), else None."""
    return next((_EXTRAS[f] for f, names in _PACKAGES.items() if package in names), None)


AttemptsFn = Callable[[Any, ConvertConfig], Iterator[ExportAttempt]]


def _single(fn: Callable[[Any, ConvertConfig], ConversionResult]) -> AttemptsFn:
    def attempts(source: Any, config: ConvertConfig) -> Iterator[ExportAttempt]:
        result = fn(source, config)  # a Loaded keeps its SOURCE string for messages
        yield ExportAttempt(exporter=result.exporter, result=result)

    return attempts


def get_converter(framework: str) -> AttemptsFn:
    """The ``attempts`` function for ``framework``, imported now.

    Raises:
        InputError: the framework is unknown, or its packages are not installed.
    """
    if framework not in CONVERTERS:
        raise InputError(
            f"unknown framework {framework!r}; use one of {', '.join(CONVERTERS)} (or auto)."
        )
    module_name, _, attr = CONVERTERS[framework].partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        needed = e.name or "a dependency"
        if needed.split(".")[0] in _PACKAGES.get(framework, ()) or framework != "onnx":
            raise InputError(
                f"converting a {framework} model needs {needed}, which is not installed. "
                f"Install it with: pip install '{_EXTRAS[framework]}'"
            ) from e
        raise
    fn = getattr(module, attr)
    return fn if attr == "attempts" else _single(fn)
