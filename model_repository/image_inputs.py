"""Encoded image bytes -> the image encoder's pixels, with Pillow and numpy.

The one definition of the image preprocessing: the trainer's feature cache
(`trainer.features.image.load_image`) and the served `image_preprocess` model both call `image_pixels`,
so served vectors match the cached training features. RGB, shorter side resized to 224 (bicubic),
centre crop 224 x 224, ImageNet mean/std.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_pixels(blob: bytes) -> np.ndarray:
    """Encoded image bytes (any format PIL reads) -> float32 [3, 224, 224], ImageNet-normalised.

    Raises PIL.UnidentifiedImageError / OSError on bytes that are not a readable image.
    """
    with Image.open(io.BytesIO(blob)) as im:
        rgb = im.convert("RGB")
    w, h = rgb.size
    scale = IMAGE_SIZE / min(w, h)
    size = (max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale)))
    rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - IMAGE_SIZE) // 2, (size[1] - IMAGE_SIZE) // 2
    rgb = rgb.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    x = np.asarray(rgb, dtype=np.float32) / 255.0
    x = (x - np.asarray(IMAGENET_MEAN, np.float32)) / np.asarray(IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1))
