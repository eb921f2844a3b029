"""A directory of images as model feeds, through a preprocessing spec.

DATA form: ``DIR?resize=256,crop=224,mean=127,std=128,layout=nchw`` (the CLI's
``--preprocess SPEC`` appends the same spec to ``--calib``/``--eval`` image directories).
Keys, all optional:

- ``resize=N``: scale the shorter side to N pixels (default: the crop size);
- ``crop=N``: center crop N x N (default: the model's spatial size);
- ``mean=M`` / ``std=S``: ``(pixel - M) / S`` on 0..255 pixels; one value or three
  separated by ``/`` (R/G/B), e.g. ``mean=123.7/116.3/103.5`` (defaults 0 and 1);
- ``layout=nchw|nhwc`` (default: read from the model's input shape).

Images are converted to RGB; the model must take one 4-D float input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onnxpipe.converters.base import InputSpec
from onnxpipe.errors import InputError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
_KEYS = ("resize", "crop", "mean", "std", "layout")


@dataclass(frozen=True)
class ImageSpec:
    """How images become an input tensor."""

    resize: int | None = None
    crop: int | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    layout: str | None = None

    @classmethod
    def parse(cls, text: str) -> ImageSpec:
        """Parse ``resize=256,crop=224,mean=127,std=128,layout=nchw``.

        Raises:
            InputError: unknown key, bad number, or a layout other than nchw/nhwc.
        """
        values: dict[str, str] = {}
        for part in (p.strip() for p in text.split(",") if p.strip()):
            key, sep, value = part.partition("=")
            if not sep or key not in _KEYS:
                raise InputError(
                    f"--preprocess {text!r}: {part!r} is not KEY=VALUE with KEY one of "
                    f"{', '.join(_KEYS)}, e.g. resize=256,crop=224,mean=127,std=128,layout=nchw."
                )
            values[key] = value.strip()
        try:
            mean = tuple(float(v) for v in values.get("mean", "0").split("/"))
            std = tuple(float(v) for v in values.get("std", "1").split("/"))
            resize = int(values["resize"]) if "resize" in values else None
            crop = int(values["crop"]) if "crop" in values else None
        except ValueError as e:
            raise InputError(f"--preprocess {text!r}: {e}; numbers expected.") from e
        layout = values.get("layout")
        if layout not in (None, "nchw", "nhwc"):
            raise InputError(f"--preprocess {text!r}: layout is nchw or nhwc, not {layout!r}.")
        if len(mean) not in (1, 3) or len(std) not in (1, 3) or 0.0 in std:
            raise InputError(f"--preprocess {text!r}: mean/std take 1 or 3 values, std non-zero.")
        if any(v is not None and v <= 0 for v in (resize, crop)):
            raise InputError(f"--preprocess {text!r}: resize and crop must be positive.")
        return cls(resize, crop, mean, std, layout)


def split_image_data(data: str) -> tuple[str, ImageSpec | None]:
    """``DIR?SPEC`` -> (``DIR``, spec); other DATA strings come back unchanged."""
    path, sep, spec = data.partition("?")
    if sep and Path(path).is_dir():
        return path, ImageSpec.parse(spec)
    return data, None


def image_files(directory: Path) -> list[Path]:
    """The image files directly inside ``directory``, sorted by name."""
    return sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)


def load_images(
    directory: Path, spec: ImageSpec, specs: Sequence[InputSpec], batch: int
) -> list[dict[str, np.ndarray]]:
    """Feeds from every image in ``directory``, ``batch`` images per feed dict.

    Raises:
        InputError: no images, an unreadable image (named), or a model that does not take
            one 4-D image tensor.
    """
    from PIL import Image, UnidentifiedImageError  # noqa: PLC0415

    if len(specs) != 1 or len(specs[0].shape) != 4:
        shown = ", ".join(f"{s.name}{list(s.shape)}" for s in specs)
        raise InputError(
            f"{directory}: image data needs a model with one 4-D image input; this one takes "
            f"{shown}. Give .npz data with one array per input instead."
        )
    target = specs[0]
    if not target.dtype.startswith("float"):
        raise InputError(
            f"{directory}: the model's input {target.name!r} is {target.dtype}; "
            "images are fed as floats. Give .npz data instead."
        )
    layout = spec.layout or ("nchw" if target.shape[1] in (1, 3) else "nhwc")
    spatial = target.shape[2:] if layout == "nchw" else target.shape[1:3]
    channels = target.shape[1] if layout == "nchw" else target.shape[3]
    crop = spec.crop or next((d for d in spatial if isinstance(d, int)), None)
    if crop is None:
        raise InputError(
            f"{directory}: the model's image size is dynamic; add crop=N to --preprocess."
        )
    resize = spec.resize or crop
    files = image_files(directory)
    if not files:
        if any(p.suffix in (".npz", ".npy") for p in directory.iterdir()):
            raise InputError(
                f"{directory}: holds arrays, not images, so a preprocessing spec does not "
                "apply: drop --preprocess (or the ?resize=... after the folder)."
            )
        raise InputError(
            f"{directory}: no images ({', '.join(IMAGE_SUFFIXES)}) and no .npy/.npz inside. "
            "Put calibration/eval images or arrays there."
        )
    arrays = []
    for f in files:
        try:
            with Image.open(f) as img:
                rgb = _eight_bit(img).convert("L" if channels == 1 else "RGB")
                arrays.append(_resize_crop(rgb, resize, crop))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InputError(
                f"{f}: not a readable image ({e}). Remove it from {directory} or re-save it "
                "as PNG/JPEG."
            ) from e
    pixels = np.stack(arrays).astype(np.float32)
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    pixels = ((pixels - mean) / std).astype(np.float32)
    if layout == "nchw":
        pixels = pixels.transpose(0, 3, 1, 2)
    pixels = np.ascontiguousarray(pixels, dtype=np.dtype(target.dtype))
    logger.info("%s: %d images as %s %s", directory, len(files), layout, list(pixels.shape))
    return [{target.name: pixels[i : i + batch]} for i in range(0, len(pixels), batch)]


def _resize_crop(img: object, resize: int, crop: int) -> np.ndarray:
    from PIL import Image  # noqa: PLC0415

    assert isinstance(img, Image.Image)
    scale = resize / min(img.size)
    size = (max(crop, round(img.width * scale)), max(crop, round(img.height * scale)))
    img = img.resize(size, Image.Resampling.BILINEAR)
    left, top = (img.width - crop) // 2, (img.height - crop) // 2
    return np.asarray(img.crop((left, top, left + crop, top + crop)), np.float32)


def _eight_bit(img: Any) -> Any:
    """``img`` (a PIL image) with 8-bit samples; Pillow's convert() clips 16 bits, not scales.

    A 16-bit PNG of a photo became an all-white frame (0.98-1.00 after /255), and calibration
    and the gate silently ran on it. 16-bit values are scaled by 1/257 (65535 -> 255); float
    images are taken as 0..1 when they stay in it, else clipped to 0..255.
    """
    from PIL import Image  # noqa: PLC0415

    if img.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return img
    values = np.asarray(img, dtype=np.float64)
    if img.mode == "F":
        scaled = values * 255.0 if values.size and values.max() <= 1.0 else values
    else:
        scaled = values / 257.0 if img.mode != "I" or values.max(initial=0) > 255 else values
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
