"""ONNX Runtime sessions that prove which execution provider actually runs the model.

ORT silently falls back to CPU when an EP's libraries are missing (ORT#24841), so every
session here compares ``get_providers()`` with what was asked for.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from onnxpipe.graphs.base import ort_graph_level

logger = logging.getLogger(__name__)

# ORT's Python errors do not share a base class beyond Exception; these are all of them.
ORT_ERRORS: tuple[type[Exception], ...] = (
    _ort_state.Fail,
    _ort_state.InvalidArgument,
    _ort_state.RuntimeException,
    _ort_state.InvalidGraph,
    _ort_state.NoSuchFile,
    _ort_state.NotImplemented,
    _ort_state.EPFail,
    RuntimeError,
    ValueError,
)

EP_PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
}
# Where each EP's ORT build is: a wrong hint (onnxruntime-gpu for NNAPI) sends users astray.
EP_INSTALL = {
    "cuda": "install onnxruntime-gpu instead of onnxruntime",
    "tensorrt": "install onnxruntime-gpu instead of onnxruntime (with TensorRT libraries)",
    "xnnpack": "XNNPACK is in ORT's Android and iOS packages and in builds with --use_xnnpack",
    "nnapi": "NNAPI exists only on Android (the onnxruntime-android package); onnxpipe package "
    "--target mobile reports the NNAPI partitions meanwhile",
    "coreml": "CoreML exists only on macOS and iOS (the onnxruntime wheel for macOS has it); "
    "onnxpipe package --target mobile reports the CoreML partitions meanwhile",
}


class ProviderUnavailable(Exception):
    """The EP cannot run here; the message says why (not installed, fell back to CPU)."""


UNAVAILABLE_EXIT = 4
"""A bench worker's exit status when its EP cannot run here (bad input, not a crash)."""


def check_provider(ep: str) -> None:
    """Raise :class:`ProviderUnavailable` when this ORT build lacks ``ep`` (no model needed).

    A build that has the EP may still fall back to CPU at session time (missing CUDA
    libraries); :func:`make_session` catches that.
    """
    provider = EP_PROVIDERS.get(ep)
    if provider is None:
        raise ProviderUnavailable(f"onnxpipe has no session support for EP {ep!r}")
    available = ort.get_available_providers()
    if provider not in available:
        raise ProviderUnavailable(
            f"{provider} is not in this onnxruntime build ({ort.__version__}, providers: "
            f"{', '.join(available)}); {EP_INSTALL.get(ep, 'see its ORT docs')}"
        )


@dataclass(frozen=True)
class SessionOptions:
    """How to build a session: EP short name and intra-op threads (0 = ORT's default)."""

    ep: str = "cpu"
    threads: int = 0
    level: str | None = None  # graph optimizations: none/basic/extended/all (None: ORT's, all)


def ort_options() -> ort.SessionOptions:
    """ORT session options that log errors only with ``--debug`` (the DEBUG log level).

    ORT logs a failed run before raising it: that line came ahead of the one-paragraph
    message of an exit 2 (ids outside a table). The exception carries the same text.
    """
    so = ort.SessionOptions()
    so.log_severity_level = 3 if logger.isEnabledFor(logging.DEBUG) else 4
    return so


def make_session(model: Path, options: SessionOptions = SessionOptions()) -> ort.InferenceSession:
    """A session on ``options.ep``; raises if ORT does not have it or quietly fell back."""
    check_provider(options.ep)
    provider = EP_PROVIDERS[options.ep]
    so = ort_options()
    if options.threads:
        so.intra_op_num_threads = options.threads
    if options.level is not None:
        so.graph_optimization_level = ort_graph_level(options.level)
    providers = (
        [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    )
    session = ort.InferenceSession(str(model), sess_options=so, providers=providers)
    used = session.get_providers()
    if not used or used[0] != provider:
        raise ProviderUnavailable(
            f"asked for {provider} but the session runs on {used}: its libraries (CUDA, cuDNN, "
            "TensorRT) are missing or no device is visible"
        )
    return session
