"""Fitting an image into its bucket: scale to cover, then crop — in the centre, or around the face.

The face finder is pluggable (:class:`FaceFinder`): inside A1111 the adapter can wrap A1111's own
autocrop/focal-point detector; the default, :class:`HaarFaceFinder`, uses the Haar cascades that
OpenCV ships inside its package (``cv2.data.haarcascades``), so it works offline and needs no download.
When no face is found the crop falls back to the centre.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from PIL import Image

from lib_lora_trainer.dataset.buckets import BucketChoice, Bucketer
from lib_lora_trainer.dataset.images import DEFAULT_BACKGROUND, load_image, read_size

if TYPE_CHECKING:
    from lib_lora_trainer.config import TrainingConfig

logger = logging.getLogger(__name__)

CROP_MODES = ("center", "face")
# Where the face centre goes, as a fraction of the crop height from the top: a little above the middle
# keeps the head and the shoulders/body below it (A1111's autocrop aims at the upper third similarly).
FACE_VERTICAL_POSITION = 0.4


@dataclass(frozen=True)
class FaceBox:
    left: int
    top: int
    width: int
    height: int

    @property
    def center(self) -> tuple[float, float]:
        return self.left + self.width / 2, self.top + self.height / 2

    @property
    def area(self) -> int:
        return self.width * self.height


class FaceFinder(Protocol):
    """Finds faces in an RGB image; boxes are in that image's pixel coordinates.

    Implementations may set a ``name`` attribute: it becomes part of the latent-cache key, so latents
    cropped with one detector are not reused for another.
    """

    def find_faces(self, image: Image.Image) -> list[FaceBox]: ...


class HaarFaceFinder:
    """OpenCV's frontal-face Haar cascade, run on a copy at most ``max_side`` pixels wide."""

    name = "opencv-haar-frontalface-default"

    def __init__(self, *, max_side: int = 640, min_neighbors: int = 5):
        self.max_side = max_side
        self.min_neighbors = min_neighbors
        self._cascade = None
        self._unavailable = False

    def find_faces(self, image: Image.Image) -> list[FaceBox]:
        cascade = self._load_cascade()
        if cascade is None:
            return []
        import numpy as np

        scale = min(1.0, self.max_side / max(image.size))
        small = image.convert("L")
        if scale < 1.0:
            small = small.resize((round(image.width * scale), round(image.height * scale)))
        grey = np.asarray(small)
        min_side = max(24, int(min(small.size) * 0.05))
        found = cascade.detectMultiScale(
            grey, scaleFactor=1.1, minNeighbors=self.min_neighbors, minSize=(min_side, min_side)
        )
        return [
            FaceBox(round(x / scale), round(y / scale), round(w / scale), round(h / scale))
            for (x, y, w, h) in found
        ]

    def _load_cascade(self):
        if self._cascade is None and not self._unavailable:
            try:
                import cv2

                path = Path(cv2.data.haarcascades) / "haarcascade_frontalface_default.xml"
                cascade = cv2.CascadeClassifier(str(path))
                if cascade.empty():
                    raise OSError(f"could not load {path}")
                self._cascade = cascade
            except Exception as error:  # opencv missing or broken: centre crop still works
                self._unavailable = True
                logger.warning("Face-aware crop unavailable (%s); using centre crop instead", error)
        return self._cascade


@dataclass(frozen=True)
class CropResult:
    image: Image.Image  # exactly the bucket size
    box: tuple[int, int, int, int]  # (left, top, right, bottom) in the resized image
    face: FaceBox | None  # the face the crop was placed around, in resized coordinates


def crop_to_bucket(
    image: Image.Image, choice: BucketChoice, *, face_finder: FaceFinder | None = None
) -> CropResult:
    """Scale ``image`` to ``choice.resized`` and crop ``choice.bucket`` out of it.

    With a face finder the crop keeps the largest face in frame; otherwise (or with no face) it is
    centred, as kohya does.
    """
    resized = image
    if image.size != choice.resized:
        resized = image.resize(choice.resized, Image.Resampling.LANCZOS, reducing_gap=3.0)
    bucket_w, bucket_h = choice.bucket
    slack_x, slack_y = resized.width - bucket_w, resized.height - bucket_h
    left, top = slack_x // 2, slack_y // 2
    face = _largest_face(resized, face_finder) if face_finder and (slack_x or slack_y) else None
    if face is not None:
        center_x, center_y = face.center
        left = _clamp(round(center_x - bucket_w / 2), 0, slack_x)
        top = _clamp(round(center_y - bucket_h * FACE_VERTICAL_POSITION), 0, slack_y)
    box = (left, top, left + bucket_w, top + bucket_h)
    return CropResult(resized.crop(box), box, face)


def preview_crop(
    image_path: str | Path,
    config: TrainingConfig,
    *,
    face_finder: FaceFinder | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> Image.Image:
    """The image exactly as training will see it (bucket and crop from ``config``), for the UI; with a
    loss mask option on, what the mask leaves out is dimmed.

    Raises :class:`~lib_lora_trainer.dataset.images.ImageLoadError` with a readable reason for a
    file that cannot be used.
    """
    choice = bucketer_for(config).select(*read_size(image_path))
    loaded = load_image(image_path, background=background, draft_size=choice.resized)
    finder = face_finder_for(config, face_finder)
    crop = crop_to_bucket(loaded.image, choice, face_finder=finder)
    from lib_lora_trainer.dataset import masks  # masks builds on this module

    settings = masks.mask_settings_for(config)
    if not settings.enabled:
        return crop.image
    path = Path(image_path)
    size = (loaded.image.width, loaded.image.height)
    mask = masks.cropped_mask(path, path.read_bytes(), size, crop, choice.resized, settings, face_finder)
    return masks.overlay(crop.image, mask)  # what is not trained is dimmed


def bucketer_for(config: TrainingConfig) -> Bucketer:
    return Bucketer(
        config.resolution,
        enabled=config.enable_bucket,
        min_size=config.min_bucket_reso,
        max_size=config.max_bucket_reso,
        no_upscale=config.bucket_no_upscale,
    )


def face_finder_for(config: TrainingConfig, face_finder: FaceFinder | None) -> FaceFinder | None:
    """The finder to use for ``config.crop_mode``: None for centre crop, the given one or Haar for face."""
    if config.crop_mode != "face":
        return None
    return face_finder if face_finder is not None else HaarFaceFinder()


def _largest_face(image: Image.Image, face_finder: FaceFinder) -> FaceBox | None:
    try:
        faces = face_finder.find_faces(image)
    except Exception as error:  # a detector failure must not stop training; centre crop instead
        logger.warning("Face detection failed (%s); using a centre crop", error)
        return None
    return max(faces, key=lambda face: face.area) if faces else None


def _clamp(value: int, low: int, high: int) -> int:
    return max(low, min(high, value))
