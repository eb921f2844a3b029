"""``python -m onnxpipe`` runs the CLI."""

from onnxpipe.cli import run

run()
