"""Loss masks: where in each picture the loss counts (masked loss).

Sources, for each image, first found wins:

1. with ``masked_loss``: a mask image beside the picture, ``photo.mask.png`` for ``photo.jpg``, or one
   named like the picture in ``conditioning_data_dir`` (kohya's convention: same stem, any image type);
   white = trained, black = ignored, grey in between (kohya reads the red channel; so do we);
2. with ``alpha_mask``: the picture's own alpha channel (opaque = trained), as kohya's ``alpha_mask``;
3. with ``auto_mask = "face"``: a soft head-and-shoulders region around the largest face OpenCV's face
   finder (the one the face crop uses) sees in the cropped picture; no face found: no mask.

An image with no mask trains everywhere. A mask is fitted exactly like its picture (the same resize and
the same crop box) and then averaged down to latent size (1/8), so it lines up with the latents. Masks are
computed when the dataset is prepared and never written to the latent cache, so cached latents stay valid
whatever the masks are.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from lib_lora_trainer.dataset.crop import CropResult, FaceFinder, HaarFaceFinder
from lib_lora_trainer.dataset.images import IMAGE_EXTENSIONS

MASK_SUFFIX = ".mask"  # photo.mask.png beside photo.jpg
LATENT_FACTOR = 8
# The automatic region, in face sizes around the face centre: the head (with hair) and the shoulders.
HEAD_HALF_WIDTH, HEAD_UP, HEAD_DOWN = 0.9, 1.0, 0.9
SHOULDERS_HALF_WIDTH, SHOULDERS_TOP, SHOULDERS_BOTTOM = 1.9, 0.7, 3.2
SOFT_EDGE = 0.25  # blur radius, in face widths


@dataclass(frozen=True)
class MaskSettings:
    mask_files: bool = False  # config.masked_loss
    alpha: bool = False  # config.alpha_mask
    auto: str = "none"  # config.auto_mask
    conditioning_dir: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.mask_files or self.alpha or self.auto != "none"


def mask_settings_for(config) -> MaskSettings:
    folder = config.conditioning_data_dir.strip()
    return MaskSettings(
        mask_files=config.masked_loss,
        alpha=config.alpha_mask,
        auto=config.auto_mask,
        conditioning_dir=Path(folder) if folder else None,
    )


def is_mask_file(path: Path) -> bool:
    """``photo.mask.png`` is a mask, not a training image."""
    return Path(path.stem).suffix.lower() == MASK_SUFFIX


def mask_file_for(image_path: Path, conditioning_dir: Path | None = None) -> Path | None:
    """The mask image of ``image_path``, or None: beside it first, then in ``conditioning_dir``."""
    for extension in (".png", ".webp", ".jpg", ".jpeg", ".bmp"):
        beside = image_path.with_name(f"{image_path.stem}{MASK_SUFFIX}{extension}")
        if beside.is_file():
            return beside
    if conditioning_dir is not None:
        for extension in IMAGE_EXTENSIONS:
            candidate = conditioning_dir / f"{image_path.stem}{extension}"
            if candidate.is_file():
                return candidate
    return None


def source_mask(
    image_path: Path, data: bytes, size: tuple[int, int], settings: MaskSettings
) -> Image.Image | None:
    """The mask of one picture at its upright full ``size`` (mode L), from a file or its alpha channel."""
    if settings.mask_files:
        path = mask_file_for(image_path, settings.conditioning_dir)
        if path is not None:
            with Image.open(path) as opened:
                mask = ImageOps.exif_transpose(opened).convert("RGB").getchannel("R")
            return mask.resize(size, Image.Resampling.BILINEAR) if mask.size != size else mask
    if settings.alpha:
        with Image.open(io.BytesIO(data)) as opened:
            upright = ImageOps.exif_transpose(opened)
            if "A" in upright.getbands() or "transparency" in upright.info:
                return upright.convert("RGBA").getchannel("A")
    return None


def fit_like_crop(mask: Image.Image, crop: CropResult, resized: tuple[int, int]) -> Image.Image:
    """The mask resized and cropped exactly as :func:`~lib_lora_trainer.dataset.crop.crop_to_bucket` did
    the picture."""
    if mask.size != resized:
        mask = mask.resize(resized, Image.Resampling.BILINEAR)
    return mask.crop(crop.box)


def face_region(size: tuple[int, int], face) -> Image.Image:
    """A soft head-and-shoulders region (mode L) around ``face`` (a FaceBox) in an image of ``size``."""
    mask = Image.new("L", size, 0)
    draw = ImageDraw.Draw(mask)
    cx, cy = face.center
    w, h = face.width, face.height
    draw.ellipse(
        (cx - HEAD_HALF_WIDTH * w, cy - HEAD_UP * h, cx + HEAD_HALF_WIDTH * w, cy + HEAD_DOWN * h), 255
    )
    draw.ellipse(
        (
            cx - SHOULDERS_HALF_WIDTH * w,
            cy + SHOULDERS_TOP * h,
            cx + SHOULDERS_HALF_WIDTH * w,
            cy + SHOULDERS_BOTTOM * h,
        ),
        255,
    )
    return mask.filter(ImageFilter.GaussianBlur(max(1.0, SOFT_EDGE * w)))


def automatic_mask(
    cropped: Image.Image, settings: MaskSettings, finder: FaceFinder | None
) -> Image.Image | None:
    if settings.auto != "face":
        return None
    faces = (finder or _default_finder()).find_faces(cropped)
    if not faces:
        return None
    return face_region(cropped.size, max(faces, key=lambda face: face.area))


@functools.cache
def _default_finder() -> FaceFinder:
    return HaarFaceFinder()  # loads OpenCV's cascade once per process


def to_latent_mask(mask: Image.Image) -> torch.Tensor:
    """(1, H/8, W/8) float in [0, 1]: the mask averaged over each latent pixel's 8x8 block."""
    array = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    height, width = array.shape[-2:]
    size = (max(1, height // LATENT_FACTOR), max(1, width // LATENT_FACTOR))
    return torch.nn.functional.interpolate(array, size=size, mode="area")[0]


def cropped_mask(
    image_path: Path,
    data: bytes,
    upright_size: tuple[int, int],
    crop: CropResult,
    resized: tuple[int, int],
    settings: MaskSettings,
    finder: FaceFinder | None = None,
) -> Image.Image | None:
    """The mask of one picture as training sees it (bucket size, mode L), or None when it has none."""
    if not settings.enabled:
        return None
    mask = source_mask(image_path, data, upright_size, settings)
    if mask is not None:
        return fit_like_crop(mask, crop, resized)
    return automatic_mask(crop.image, settings, finder)


def overlay(image: Image.Image, mask: Image.Image | None) -> Image.Image:
    """The preview: what is not trained is dimmed and tinted, so the user sees what is learned."""
    if mask is None:
        return image
    dimmed = Image.blend(image.convert("RGB"), Image.new("RGB", image.size, (40, 0, 60)), 0.7)
    return Image.composite(image.convert("RGB"), dimmed, mask.resize(image.size))
