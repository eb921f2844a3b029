"""onnxpipe: framework model -> ONNX -> optimized, validated, benchmarked handoff bundle.

Importing onnxpipe pulls in neither torch nor tensorflow; only the converters for those
frameworks do, when they are used.
"""

__version__ = "0.1.0"
