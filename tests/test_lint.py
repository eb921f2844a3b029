"""Ruff (lint and format) and mypy are part of the suite, so CI (which runs the suite) runs them."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]
BIN = Path(sys.executable).parent
SOURCES = ["pipeline", "converters", "graphs", "tests", "benchmarks", "examples"]


def _tool(name: str) -> str:
    path = shutil.which(name, path=str(BIN)) or shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed; install the dev extra: pip install -e '.[dev]'")
    return path


def installed_layout(tmp: Path) -> Path:
    """Symlink the three layers into ``tmp/onnxpipe`` as the wheel lays them out."""
    package = tmp / "onnxpipe"
    package.mkdir()
    for item in (ROOT / "pipeline").iterdir():
        if item.suffix == ".py":
            (package / item.name).symlink_to(item)
    (package / "converters").symlink_to(ROOT / "converters", target_is_directory=True)
    (package / "graphs").symlink_to(ROOT / "graphs", target_is_directory=True)
    return tmp


def test_ruff():
    proc = subprocess.run(
        [_tool("ruff"), "check", *SOURCES], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_ruff_format():
    proc = subprocess.run(
        [_tool("ruff"), "format", "--check", *SOURCES], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_mypy(tmp_path):
    tree = installed_layout(tmp_path)
    proc = subprocess.run(
        [_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "-p", "onnxpipe"],
        cwd=tree,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
