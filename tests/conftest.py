"""Shared fixtures: paths to the fixture models and a CLI runner that returns exit codes."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from onnxpipe.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
MODELS = FIXTURES / "models.py"


def model_ref(name: str) -> str:
    """``tests/fixtures/models.py:NAME`` as an absolute SOURCE string."""
    return f"{MODELS}:{name}"


def tree_hash(path: Path) -> str:
    """A digest of every file's path and bytes under ``path`` (or of the file itself)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        digest.update(str(f.relative_to(path.parent)).encode())
        digest.update(f.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]):
    """Run ``onnxpipe ARGS`` in-process; returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A converted bundle of the fixture MLP (64 -> 64), shared read-only by the pruning tests."""
    out = tmp_path_factory.mktemp("mlp") / "mlp"
    spec = "x:float32[batch,64]"
    assert main(["convert", model_ref("mlp"), "-o", str(out), "--input", spec]) == 0
    return out
