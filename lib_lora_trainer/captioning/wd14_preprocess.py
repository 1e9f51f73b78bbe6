"""Reading an image for the tagger and turning it into exactly what a WD14 ONNX model expects.

WD14 models take a batch of NHWC float32 images, BGR, values 0..255 (no normalisation), square: the
image is padded to a square with white (transparent pixels composited on white first) and resized to
the model's own input size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

WHITE = (255, 255, 255)


class ImageReadError(ValueError):
    """An image could not be read; the message names the file and says why."""


def read_image(path: str | Path) -> Image.Image:
    """Open ``path`` fully into memory with its EXIF orientation applied. The file is only read."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path.name} is empty (0 bytes)")
        with Image.open(path) as opened:
            opened.load()
            return ImageOps.exif_transpose(opened)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"{path.name} is too large to open safely ({error})") from error
    except UnidentifiedImageError as error:
        message = f"{path.name} is not an image that can be read (corrupt or another format)"
        raise ImageReadError(message) from error
    except (OSError, SyntaxError, ValueError, MemoryError) as error:
        raise ImageReadError(f"{path.name} is damaged or truncated ({error})") from error


def to_rgb_on_background(image: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """An 8-bit RGB copy of ``image``; transparency is composited on ``background``, 16-bit scaled down."""
    if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        image = _high_bit_depth_to_l(image)
    has_alpha = image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info
    if has_alpha:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    values = np.asarray(image, dtype=np.float64)
    if image.mode.startswith("I;16") or (image.mode == "I" and values.max(initial=0) > 255):
        values = values / 257.0  # 0..65535 -> 0..255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8), mode="L")


def prepare_image(image: Image.Image, size: int) -> np.ndarray:
    """``image`` as a (size, size, 3) float32 BGR array in 0..255: padded to a white square, resized."""
    rgb = np.asarray(to_rgb_on_background(image, WHITE), dtype=np.uint8)
    square = _pad_to_square(rgb, fill=255)
    side = square.shape[0]
    if side != size:
        # Area averaging when shrinking (no aliasing), bicubic when enlarging; uint8 saturates overshoot.
        interpolation = cv2.INTER_AREA if side > size else cv2.INTER_CUBIC
        square = cv2.resize(square, (size, size), interpolation=interpolation)
    bgr = square[:, :, ::-1]
    return np.ascontiguousarray(bgr, dtype=np.float32)


def _pad_to_square(pixels: np.ndarray, fill: int) -> np.ndarray:
    height, width = pixels.shape[:2]
    side = max(height, width)
    if height == width:
        return pixels
    square = np.full((side, side, 3), fill, dtype=pixels.dtype)
    top = (side - height) // 2
    left = (side - width) // 2
    square[top : top + height, left : left + width] = pixels
    return square
