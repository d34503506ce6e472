"""Image files to pixels: the one decoder that training, validation and the logged image model share.

Standalone on purpose (PIL and numpy only, no tlexp import): the logged image model ships this file
as its code, so that it decodes a photo exactly as training did on a machine without tlexp.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
from typing import IO, Any, Union

import numpy as np

ImageSource = Union[str, "os.PathLike[str]", IO[bytes]]


def decode_image(source: ImageSource, image_size: int, *, exif_transpose: bool = True) -> np.ndarray:
    """Decode one image (a path or a binary file object) to (3, S, S) uint8 RGB, upright (EXIF orientation)
    when ``exif_transpose``, squashed to S x S as the seed's Resize((S, S)) does."""
    from PIL import Image, ImageOps

    with Image.open(source) as img:
        img.load()  # raises on truncated/corrupt files, which the caller reports and skips
        if exif_transpose:  # in place: no full-size copy of the (usual) image without a rotation tag
            ImageOps.exif_transpose(img, in_place=True)
        if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
            # 16-bit and float greyscale: Image.convert('RGB') would clip, so scale to 8 bits.
            arr = np.asarray(img, dtype=np.float32)
            top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            img = Image.fromarray(np.clip(arr / top * 255.0, 0, 255).astype(np.uint8))
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        if img.mode != "RGB":  # convert() would copy even an RGB image: a full-size buffer for nothing
            img = img.convert("RGB")
        img = img.resize((image_size, image_size), Image.BILINEAR, reducing_gap=None)
        return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def open_image_value(value: Any) -> ImageSource:
    """What one cell of the image model's input holds, as something ``decode_image`` opens: raw bytes, a
    base64 string (optionally a ``data:image/...;base64,`` URL), or a file path."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(value))
    if isinstance(value, os.PathLike):
        return value
    if not isinstance(value, str):
        raise ValueError(f"an image must be a file path, bytes or a base64 string, not {type(value).__name__}")
    if value.startswith("data:") and "," in value:
        value = value.split(",", 1)[1]
    elif len(value) < 4096 and os.path.exists(value):  # a path is short; a base64 photo is not
        return value
    try:
        return io.BytesIO(base64.b64decode(value, validate=True))
    except (binascii.Error, ValueError):
        raise ValueError(f"{value[:80]!r} is neither an existing file nor base64-encoded image bytes") from None
