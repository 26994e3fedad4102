"""Encoded image bytes -> the image encoder's pixels, with Pillow and numpy.

The one definition of the image preprocessing: the trainer's feature cache
(`trainer.features.image.load_image`) and the served `image_preprocess` model both call `image_pixels`,
so served vectors match the cached training features. RGB, shorter side resized to 224 (bicubic),
centre crop 224 x 224, ImageNet mean/std.

Sizes are checked on the header, before anything is decoded (`check_image_size`): at most
MAX_IMAGE_PIXELS (decoding allocates 3 bytes a pixel) and an aspect ratio of at most MAX_ASPECT_RATIO.
The ratio bound is what keeps the resize small: the resized image is 224 x (224 * ratio), at most
224 x 4480, where a 1 x 20000 strip of a few hundred bytes would resize to 224 x 4480000 (3 GB). Resizing
only the cropped box (`Image.resize(box=...)`) would avoid that too, but PIL's resampling weights for a
box differ by rounding from the full resize's: that moved a few pixels of 25 of the first 200 ML-100K
posters by one level and their EfficientNet features by up to 0.011, so the features cached for
training would no longer be the served ones.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from common.errors import MMRankError

IMAGE_SIZE = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
MAX_IMAGE_PIXELS = 25_000_000  # 5000 x 5000: about 75 MB once decoded to RGB
MAX_ASPECT_RATIO = 20  # the centre crop keeps a twentieth of such an image


class ImageSizeError(MMRankError, ValueError):
    """An image outside the size bounds. Also a ValueError, which the trainer's feature cache reports
    as a bad image of the item it belongs to."""


def check_image_size(width: int, height: int) -> None:
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageSizeError(
            f"image is {width} x {height} pixels, over the limit of {MAX_IMAGE_PIXELS} pixels"
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageSizeError(
            f"image is {width} x {height} pixels, an aspect ratio over the limit of {MAX_ASPECT_RATIO}:1"
        )


def image_pixels(blob: bytes) -> np.ndarray:
    """Encoded image bytes (any format PIL reads) -> float32 [3, 224, 224], ImageNet-normalised.

    Raises ImageSizeError for an image outside the size bounds, PIL.UnidentifiedImageError / OSError
    on bytes that are not a readable image.
    """
    with Image.open(io.BytesIO(blob)) as im:
        check_image_size(*im.size)
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
