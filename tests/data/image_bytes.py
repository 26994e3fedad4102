"""Image bytes whose header claims a size the pixels do not have, for the size-bound tests."""

import io

from PIL import Image


def jpeg_claiming(width: int, height: int) -> bytes:
    """An 8 x 8 JPEG whose frame header (SOF0) says width x height: a few hundred bytes that a decoder
    would size a width x height image for."""
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    blob = bytearray(buf.getvalue())
    sof = blob.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    blob[sof + 5 : sof + 7] = height.to_bytes(2, "big")
    blob[sof + 7 : sof + 9] = width.to_bytes(2, "big")
    return bytes(blob)


def png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, format="PNG")
    return buf.getvalue()
