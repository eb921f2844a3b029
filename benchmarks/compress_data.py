"""Real evaluation data for ``benchmarks/compress.py``, split so tuning and held-out never meet.

Images: the sklearn sample photos and the images shipped in ``skimage/data``; several crops
(scale, position, mirror) per image, split *by source image*, so no held-out sample shares a
photo with the data the pruning search saw. Sentences: ``benchmarks/sentences.txt``, split by line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
SKIP = {"lbpcascade_frontalface_opencv.xml", "multipage.tif", "multipage_rgb.tif"}


def image_files() -> list[Path]:
    """Every photo-like image file of sklearn and skimage, sorted by name."""
    import skimage  # noqa: PLC0415
    import sklearn.datasets  # noqa: PLC0415

    sk = Path(sklearn.datasets.__file__).parent / "images"
    ski = Path(skimage.__file__).parent / "data"
    files = sorted(sk.glob("*.jpg"))
    files += sorted(
        p for p in ski.iterdir() if p.suffix in (".png", ".jpg", ".gif") and p.name not in SKIP
    )
    return files


def _crops(path: Path, count: int, size: int, seed: int) -> list[np.ndarray]:
    """``count`` crops of one image, EfficientNet-Lite preprocessing: (pixel - 127) / 128."""
    from PIL import Image  # noqa: PLC0415

    rng = np.random.default_rng(seed)
    img = Image.open(path).convert("RGB")
    out = []
    for i in range(count):
        short = 256 if i == 0 else int(rng.integers(230, 400))
        scale = short / min(img.size)
        resized = img.resize(
            (max(size, round(img.width * scale)), max(size, round(img.height * scale))),
            Image.BILINEAR,
        )
        if i == 0:
            left, top = (resized.width - size) // 2, (resized.height - size) // 2
        else:
            left = int(rng.integers(0, resized.width - size + 1))
            top = int(rng.integers(0, resized.height - size + 1))
        crop = resized.crop((left, top, left + size, top + size))
        if i % 2 == 1:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        arr = (np.asarray(crop, np.float32) - 127.0) / 128.0
        out.append(arr.transpose(2, 0, 1))
    return out


def image_split(crops: int = 6, size: int = 224) -> tuple[np.ndarray, np.ndarray]:
    """(tune, held_out) NCHW float32 arrays; even-indexed images tune, odd ones are held out."""
    tune: list[np.ndarray] = []
    held: list[np.ndarray] = []
    for i, path in enumerate(image_files()):
        (tune if i % 2 == 0 else held).extend(_crops(path, crops, size, seed=i))
    return np.stack(tune), np.stack(held)


def sentence_split() -> tuple[list[str], list[str]]:
    """(tune, held_out) sentences: every third line is held out."""
    lines = [s.strip() for s in (HERE / "sentences.txt").read_text().splitlines() if s.strip()]
    return [s for i, s in enumerate(lines) if i % 3], [s for i, s in enumerate(lines) if i % 3 == 0]
