"""Opening a user's image safely: every broken file gets its own message, never a crash.

:func:`probe_image` checks a file during the dataset scan (size after EXIF rotation, a full but cheap
decode to catch truncated files, and a perceptual hash); :func:`load_image` returns the RGB pixels for
training. Both only read: nothing in the user's folder is ever written.
"""

from __future__ import annotations

import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps

from lib_lora_trainer.file_types import IMAGE_EXTENSIONS

# PIL's own hard limit (2 x MAX_IMAGE_PIXELS), checked by us because A1111 may switch PIL's check off.
MAX_IMAGE_PIXELS = 2 * 89_478_485
# Smaller than this (short side) is too small to train on at all; below LOW_RESOLUTION it is only flagged.
MIN_TRAINABLE_SIDE = 64
LOW_RESOLUTION_SIDE = 256

_EXPECTED_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP"}
_ROTATING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that swap width and height
_EXIF_ORIENTATION_TAG = 0x0112
DEFAULT_BACKGROUND = (255, 255, 255)


class ImageLoadError(Exception):
    """A file that cannot be used; ``str(error)`` is the sentence shown to the user."""


@dataclass(frozen=True)
class ImageProbe:
    width: int  # after EXIF orientation
    height: int
    file_format: str
    dhash: int  # 128-bit difference hash, for near-duplicate detection
    notes: tuple[str, ...]  # what was converted or fixed, in words


@dataclass(frozen=True)
class LoadedImage:
    image: Image.Image  # RGB, EXIF orientation applied, transparency composited on the background
    notes: tuple[str, ...]


def is_image_file(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def probe_image(path: str | Path, *, background: tuple[int, int, int] = DEFAULT_BACKGROUND) -> ImageProbe:
    """Check that ``path`` is a usable image; raise :class:`ImageLoadError` with the reason if not.

    JPEGs are decoded at reduced scale (``draft``), which still reads every byte of image data, so a
    truncated file is caught without paying for a full decode.
    """
    path = Path(path)
    data = _read_bytes(path)
    image, notes = _open_checked(path, data)
    oriented_size = _oriented_size(image)
    if image.format == "JPEG":
        image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
    _decode(path, image, data)
    rgb, conversion_notes = _to_rgb(image, background, path.name)
    notes += conversion_notes
    width, height = oriented_size
    _check_size(path, width, height)
    if _orientation(image) not in (None, 1):
        notes.append(f"{path.name}: rotated upright using its EXIF orientation")
    return ImageProbe(width, height, image.format or "", difference_hash(rgb), tuple(notes))


def load_image(
    path: str | Path,
    *,
    data: bytes | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    draft_size: tuple[int, int] | None = None,
) -> LoadedImage:
    """The RGB image in ``path`` (or in ``data``, the file's bytes already read), upright.

    With ``draft_size`` (upright width, height) a JPEG is decoded at the smallest DCT scale that is still
    at least that large — several times faster for big photos that are shrunk for training anyway.
    """
    path = Path(path)
    data = _read_bytes(path) if data is None else _non_empty(path, data)
    image, notes = _open_checked(path, data)
    if draft_size is not None and image.format == "JPEG":
        stored = draft_size[::-1] if _orientation(image) in _ROTATING_ORIENTATIONS else draft_size
        image.draft(image.mode, stored)
    _decode(path, image, data)
    orientation = _orientation(image)
    if orientation not in (None, 1):
        image = ImageOps.exif_transpose(image)
        notes.append(f"{path.name}: rotated upright using its EXIF orientation")
    rgb, conversion_notes = _to_rgb(image, background, path.name)
    _check_size(path, rgb.width, rgb.height)
    return LoadedImage(rgb, tuple(notes + conversion_notes))


def read_size(path: str | Path) -> tuple[int, int]:
    """The upright (EXIF-oriented) size of the image in ``path``, from its header only."""
    path = Path(path)
    image, _ = _open_checked(path, _read_bytes(path))
    return _oriented_size(image)


def difference_hash(image: Image.Image) -> int:
    """A 128-bit perceptual hash: horizontal and vertical dHash of a 9x9 greyscale thumbnail (one bit per
    pair of neighbouring pixels). Both directions, so smooth images with similar gradients still differ."""
    small = np.asarray(image.convert("L").resize((9, 9), Image.Resampling.BILINEAR), dtype=np.int16)
    horizontal = small[:8, 1:] > small[:8, :-1]
    vertical = small[1:, :8] > small[:-1, :8]
    bits = np.concatenate([horizontal.flatten(), vertical.flatten()])
    return int("".join("1" if bit else "0" for bit in bits), 2)


def _read_bytes(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError as error:
        raise ImageLoadError(f"{path.name}: the file disappeared while the dataset was being read") from error
    except OSError as error:
        raise ImageLoadError(f"{path.name}: cannot be read ({error.strerror or error})") from error
    return _non_empty(path, data)


def _non_empty(path: Path, data: bytes) -> bytes:
    if not data:
        raise ImageLoadError(f"{path.name}: the file is empty (0 bytes), probably a failed download or copy")
    return data


def _open_checked(path: Path, data: bytes) -> tuple[Image.Image, list[str]]:
    """Open the header only and refuse what must not be decoded."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as error:
        raise ImageLoadError(_bomb_message(path, error)) from error
    except Image.UnidentifiedImageError as error:
        raise ImageLoadError(_unidentified_message(path, data)) from error
    except Exception as error:  # a corrupt header can raise almost anything inside a PIL plugin
        raise ImageLoadError(f"{path.name}: the image header is corrupt ({error})") from error
    if image.width * image.height > MAX_IMAGE_PIXELS:
        megapixels = image.width * image.height / 1e6
        raise ImageLoadError(
            f"{path.name}: {image.width}x{image.height} pixels ({megapixels:.0f} megapixels) is over the "
            f"{MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel safety limit (decompression-bomb protection); "
            "it was left out — downscale it first if it is a real photo"
        )
    notes: list[str] = []
    expected = _EXPECTED_FORMATS.get(path.suffix.lower())
    if expected and image.format and image.format != expected:
        notes.append(
            f"{path.name}: the file is really a {image.format} image despite its {path.suffix} "
            "extension; it was read by its content"
        )
    return image, notes


def _decode(path: Path, image: Image.Image, data: bytes) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
    except OSError as error:
        if "truncated" in str(error):
            raise ImageLoadError(
                f"{path.name}: the file is truncated (it ends before the image data does); "
                "re-download or re-export it"
            ) from error
        raise ImageLoadError(f"{path.name}: the image data is corrupt ({error})") from error
    except Exception as error:
        raise ImageLoadError(f"{path.name}: the image data is corrupt ({error})") from error
    if ImageFile.LOAD_TRUNCATED_IMAGES and _looks_truncated(image.format, data):
        # Some hosts (A1111 extensions) let PIL fill missing data with grey; we still refuse such files.
        raise ImageLoadError(
            f"{path.name}: the file is truncated (it ends before the image data does); "
            "re-download or re-export it"
        )


def _looks_truncated(file_format: str | None, data: bytes) -> bool:
    if file_format == "JPEG":
        last_scan = data.rfind(b"\xff\xda")
        return last_scan >= 0 and data.find(b"\xff\xd9", last_scan) < 0
    if file_format == "PNG":
        return b"IEND" not in data[-64:]
    return False


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(_EXIF_ORIENTATION_TAG)
    except Exception:  # unreadable EXIF is not worth refusing a photo over
        return None


def _oriented_size(image: Image.Image) -> tuple[int, int]:
    if _orientation(image) in _ROTATING_ORIENTATIONS:
        return image.height, image.width
    return image.width, image.height


def _check_size(path: Path, width: int, height: int) -> None:
    if min(width, height) < MIN_TRAINABLE_SIDE:
        raise ImageLoadError(
            f"{path.name}: only {width}x{height} pixels, too small to train on "
            f"(the short side needs at least {MIN_TRAINABLE_SIDE} px, ideally 512)"
        )


def _to_rgb(image: Image.Image, background: tuple[int, int, int], name: str) -> tuple[Image.Image, list[str]]:
    """Convert any PIL mode to RGB correctly; notes say what was done when it is not obvious."""
    mode = image.mode
    notes: list[str] = []
    if mode == "RGB":
        return image, notes
    if (mode == "P" and "transparency" in image.info) or mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        canvas.alpha_composite(rgba)
        notes.append(f"transparent areas filled with the background colour {background}")
        return canvas.convert("RGB"), _named(notes, name)
    if mode.startswith("I;16") or mode == "I":
        array = np.asarray(image, dtype=np.float64)
        sixteen_bit = mode.startswith("I;16") or image.format == "PNG" or array.max(initial=0) > 255
        scale = 257.0 if sixteen_bit else 1.0
        grey = np.clip(np.round(array / scale), 0, 255).astype(np.uint8)
        notes.append("16-bit greyscale reduced to 8 bits")
        return Image.fromarray(grey, "L").convert("RGB"), _named(notes, name)
    if mode == "F":
        array = np.asarray(image, dtype=np.float64)
        if array.max(initial=0) <= 1.0:
            array = array * 255.0
        grey = np.clip(np.round(array), 0, 255).astype(np.uint8)
        notes.append("floating-point greyscale converted to 8 bits")
        return Image.fromarray(grey, "L").convert("RGB"), _named(notes, name)
    if mode == "CMYK":
        notes.append("CMYK (print) colours converted to RGB")
    elif mode in ("L", "1"):
        notes.append("greyscale image converted to RGB")
    return image.convert("RGB"), _named(notes, name)


def _named(notes: list[str], name: str) -> list[str]:
    return [f"{name}: {note}" for note in notes]


def _bomb_message(path: Path, error: Exception) -> str:
    declared = re.search(r"\((\d+) pixels\)", str(error))
    size = f" ({int(declared.group(1)) / 1e6:.0f} megapixels)" if declared else ""
    return (
        f"{path.name}: the image declares a size{size} over the {MAX_IMAGE_PIXELS / 1e6:.0f}-megapixel "
        "safety limit (decompression-bomb protection); it was left out — downscale it first if it is "
        "a real photo"
    )


def _unidentified_message(path: Path, data: bytes) -> str:
    head = data[:512]
    if head.lstrip().startswith((b"<!DOCTYPE", b"<html", b"<HTML", b"<?xml")):
        kind = "an HTML/XML page (a web page saved instead of the picture?)"
    elif _is_mostly_text(head):
        kind = "a text file"
    else:
        kind = "not in any image format PIL can read"
    return f"{path.name}: not an image — the content is {kind}; remove or replace the file"


def _is_mostly_text(head: bytes) -> bool:
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    printable = sum(ch.isprintable() or ch in "\r\n\t" for ch in text)
    return bool(text) and printable / len(text) > 0.95
