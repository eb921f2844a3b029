"""Graph passes: ONNX -> ONNX (cleanup, quantize, prune, fp16, low-rank)."""
