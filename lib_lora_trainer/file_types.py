"""Which file names are images (trained on, or known but skipped) and which may name a caption.

One list for the whole library: the dataset scan, the caption editor, the tagger, the config's checks
and the kohya_ss importer all ask here, so a caption extension can never name an image.
"""

from __future__ import annotations

# Read and trained on.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# Known image formats the scan leaves out, each with the reason the dataset report gives.
SKIPPED_IMAGE_EXTENSIONS: dict[str, str] = {
    ".gif": "GIF (often animated) is not used for training",
    ".avif": "AVIF cannot be read without an extra Pillow plugin",
    ".heic": "HEIC (iPhone photos) cannot be read without an extra Pillow plugin",
    ".heif": "HEIF cannot be read without an extra Pillow plugin",
    ".jxl": "JPEG XL cannot be read without an extra Pillow plugin",
    ".tif": "TIFF is not used for training",
    ".tiff": "TIFF is not used for training",
    ".jfif": "JFIF is not used for training (rename it to .jpg if it is a JPEG)",
    ".jp2": "JPEG 2000 is not used for training",
    ".psd": "Photoshop files are not used for training",
    ".svg": "SVG drawings are not used for training",
    ".ico": "icons are not used for training",
    ".tga": "TGA is not used for training",
    ".dng": "camera raw files are not used for training",
    ".cr2": "camera raw files are not used for training",
    ".nef": "camera raw files are not used for training",
    ".arw": "camera raw files are not used for training",
}
# Every extension a caption must not use: an image's own name, or one kohya_ss keeps beside images.
NOT_CAPTION_EXTENSIONS = frozenset(IMAGE_EXTENSIONS) | frozenset(SKIPPED_IMAGE_EXTENSIONS) | {".npz"}
MAX_CAPTION_EXTENSION_LENGTH = 32


def skipped_image_reason(suffix: str) -> str | None:
    """Why an image with this extension is left out of training, or None when it is not a known image."""
    reason = SKIPPED_IMAGE_EXTENSIONS.get(suffix.lower())
    if reason is None:
        return None
    return f"{reason}; convert it to PNG or JPEG to train on it"


def caption_extension_problem(extension: str) -> str | None:
    """Why ``extension`` cannot be the caption files' extension, or None when it can."""
    if not extension.startswith(".") or len(extension) < 2:
        return f"caption extension {extension!r} must start with '.', like .txt"
    if len(extension) > MAX_CAPTION_EXTENSION_LENGTH or any(c in extension for c in "/\\ \t\r\n\x00:"):
        return f"caption extension {extension!r} must be a short file extension like .txt or .caption"
    last = "." + extension.rsplit(".", 1)[-1].lower()  # ".x.png" would still name an image
    if last == "." or extension.lower() in NOT_CAPTION_EXTENSIONS or last in NOT_CAPTION_EXTENSIONS:
        return (
            f"caption extension {extension!r} is an image extension: caption files would overwrite "
            "the images; use .txt or .caption"
        )
    return None
