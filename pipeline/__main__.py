"""``python -m onnxpipe`` runs the CLI."""

import sys

from onnxpipe.cli import main

sys.exit(main())
