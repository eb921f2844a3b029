"""Packaging: a wheel built from the tree installs only ``onnxpipe`` top-level."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_wheel_has_one_top_level_package(tmp_path):
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        check=True,
    )
    wheel = next(tmp_path.glob("onnxpipe-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"onnxpipe"}
    for module in (
        "onnxpipe/cli.py",
        "onnxpipe/converters/torch/export.py",
        "onnxpipe/converters/onnx_file.py",
        "onnxpipe/graphs/__init__.py",
    ):
        assert module in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    # run(): main(), then exit without the interpreter's teardown (see onnxpipe.cli.run)
    assert "onnxpipe = onnxpipe.cli:run" in zipfile.ZipFile(wheel).read(entry_points).decode()
