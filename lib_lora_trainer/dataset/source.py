"""The real :class:`~lib_lora_trainer.dataset.base.BatchSource`: buckets, repeats, regularisation
images, augmentation and latent caching.

``prepare`` loads and crops every image once and encodes it (and its mirror image when flipping is on)
into latents kept in memory, optionally also on disk. With colour augmentation, or with latent caching
switched off, latents cannot be cached: the cropped pixels are kept instead and every step encodes its
batch with the VAE (slower; the report and ``warnings`` say so).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lib_lora_trainer.config import TrainingConfig, validate_for_dataset
from lib_lora_trainer.dataset.base import TrainingBatch, check_finite_latents
from lib_lora_trainer.dataset.caption_processing import CaptionAugmentation, augment_caption
from lib_lora_trainer.dataset.crop import CropResult, FaceFinder, crop_to_bucket, face_finder_for
from lib_lora_trainer.dataset.images import DEFAULT_BACKGROUND, ImageLoadError, load_image
from lib_lora_trainer.dataset.latent_cache import (
    FLIPPED_KEY,
    LATENT_KEY,
    LatentDiskCache,
    content_hash,
    default_cache_dir,
)
from lib_lora_trainer.dataset.masks import MaskSettings, cropped_mask, mask_settings_for, to_latent_mask
from lib_lora_trainer.dataset.plan import EpochPlan, PlannedImage, plan_epoch
from lib_lora_trainer.dataset.scan import ScannedDataset

logger = logging.getLogger(__name__)

Encode = Callable[[torch.Tensor], torch.Tensor]
ProgressCallback = Callable[[int, int], None]

# kohya's weak colour augmentation: a third of the samples get a small hue shift or gamma change.
COLOR_AUG_PROBABILITY = 1 / 3
HUE_SHIFT_DEGREES = 16.0
GAMMA_RANGE = (0.95, 1.05)


class DatasetError(ValueError):
    """The dataset cannot be trained on; ``messages`` has one sentence per reason."""

    def __init__(self, messages: Sequence[str]):
        self.messages = list(messages)
        super().__init__("The dataset cannot be used:\n- " + "\n- ".join(self.messages))


@dataclass(frozen=True)
class SourceSettings:
    flip_aug: bool = False
    color_aug: bool = False
    cache_latents: bool = True
    captions: CaptionAugmentation = CaptionAugmentation()
    background: tuple[int, int, int] = DEFAULT_BACKGROUND
    disk_cache_requested: bool = False
    masks: MaskSettings = MaskSettings()

    @property
    def latents_cacheable(self) -> bool:
        return self.cache_latents and not self.color_aug


class BucketedBatchSource:
    def __init__(
        self,
        plan: EpochPlan,
        settings: SourceSettings,
        *,
        disk_cache: LatentDiskCache | None = None,
        face_finder: FaceFinder | None = None,
    ):
        self.plan = plan
        self.settings = settings
        self.disk_cache = disk_cache if settings.latents_cacheable else None
        self.face_finder = face_finder
        self.warnings = latent_cache_warnings(settings)
        for message in self.warnings:
            logger.warning("%s", message)
        self.cache_hits = 0  # images whose latents came from the disk cache in the last prepare()
        self._encode: Encode | None = None
        self._latents: list[torch.Tensor] = []
        self._flipped: list[torch.Tensor | None] = []
        self._pixels: list[np.ndarray] = []
        self._masks: list[torch.Tensor | None] = []  # (1, h, w) at latent size; None = trained everywhere

    # --- BatchSource ----------------------------------------------------------------------------
    def prepare(self, encode: Encode, progress: ProgressCallback | None = None) -> None:
        self._encode = encode
        self._latents, self._flipped, self._pixels, self._masks = [], [], [], []
        self.cache_hits = 0
        total = len(self.plan.images)
        for index, planned in enumerate(self.plan.images):
            data = _read_image_bytes(planned)
            # Masks are recomputed here every time (never cached), so the crop is needed even on a hit.
            crop = self._crop(planned, data) if self.settings.masks.enabled else None
            if self.settings.latents_cacheable:
                latent, flipped = self._cached_or_encoded(planned, data, encode, crop)
                self._latents.append(latent)
                self._flipped.append(flipped)
            else:
                self._pixels.append(np.asarray((crop or self._crop(planned, data)).image))
            self._masks.append(self._latent_mask(planned, data, crop) if crop is not None else None)
            if progress is not None:
                progress(index + 1, total)
        if self.settings.masks.enabled and total and all(mask is None for mask in self._masks):
            message = (
                "A loss mask option is on but no image has a mask (or no face was found): "
                "every image is learned whole"
            )
            logger.warning("%s", message)
            if message not in self.warnings:
                self.warnings.append(message)

    def batches_per_epoch(self) -> int:
        return self.plan.batches_per_epoch

    def epoch(self, epoch_index: int, rng: random.Random) -> Iterator[TrainingBatch]:
        if self._encode is None:
            raise RuntimeError("prepare() must run before epoch()")
        for chosen in self._epoch_batches(rng):
            yield self._make_batch(chosen, rng)

    def captions(self) -> list[str]:
        return sorted({planned.caption for planned in self.plan.images})

    def captions_vary(self) -> bool:
        return self.settings.captions.varies

    def fingerprint(self) -> list[str]:
        lines = []
        for planned in self.plan.images:
            path = planned.record.path
            try:
                stat = path.stat()
                identity = f"{stat.st_size}|{stat.st_mtime_ns}"
            except OSError:
                identity = "missing"
            lines.append(f"{path}|{identity}|{planned.repeats}|{planned.loss_weight}|{planned.caption}")
        return lines

    # --- internals ----------------------------------------------------------------------------------
    def _epoch_batches(self, rng: random.Random) -> list[list[int]]:
        """Sample indices grouped into single-bucket batches, in a shuffled order."""
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for index, planned in enumerate(self.plan.images):
            by_bucket.setdefault(planned.choice.bucket, []).extend([index] * planned.repeats)
        batches = []
        size = self.plan.batch_size
        for bucket in sorted(by_bucket):
            members = by_bucket[bucket]
            rng.shuffle(members)
            batches += [members[start : start + size] for start in range(0, len(members), size)]
        rng.shuffle(batches)
        return batches

    def _make_batch(self, chosen: list[int], rng: random.Random) -> TrainingBatch:
        flips = [self.settings.flip_aug and rng.random() < 0.5 for _ in chosen]
        captions = [augment_caption(self.plan.images[i].caption, self.settings.captions, rng) for i in chosen]
        if self.settings.latents_cacheable:
            latents = torch.stack(
                [
                    self._flipped[i] if flip else self._latents[i]
                    for i, flip in zip(chosen, flips, strict=True)
                ]
            )
        else:
            latents = self._encode_pixels(chosen, flips, rng)
        weights = torch.tensor([self.plan.images[i].loss_weight for i in chosen], dtype=torch.float32)
        masks = self._batch_masks(chosen, flips, latents) if self.settings.masks.enabled else None
        return TrainingBatch(latents=latents, captions=captions, loss_weights=weights, masks=masks)

    def _batch_masks(self, chosen: list[int], flips: list[bool], latents: torch.Tensor) -> torch.Tensor:
        """(B, 1, h, w): each image's mask, mirrored with its image; all ones for an image without one."""
        masks = []
        for index, flip in zip(chosen, flips, strict=True):
            mask = self._masks[index]
            if mask is None:
                mask = torch.ones(1, *latents.shape[-2:])
            masks.append(mask.flip(-1) if flip else mask)
        return torch.stack(masks)

    def _latent_mask(self, planned: PlannedImage, data: bytes, crop: CropResult) -> torch.Tensor | None:
        record = planned.record
        try:
            mask = cropped_mask(
                record.path, data, (record.width, record.height), crop, planned.choice.resized,
                self.settings.masks, self.face_finder,
            )  # fmt: skip
        except OSError as error:
            raise DatasetError([f"the mask of {record.path.name} cannot be read ({error})"]) from error
        return None if mask is None else to_latent_mask(mask)

    def _encode_pixels(self, chosen: list[int], flips: list[bool], rng: random.Random) -> torch.Tensor:
        pixels = []
        for index, flip in zip(chosen, flips, strict=True):
            array = self._pixels[index]
            if flip:
                array = array[:, ::-1]
            if self.settings.color_aug:
                array = color_augment(array, rng)
            pixels.append(_to_model_pixels(array))
        assert self._encode is not None
        with torch.no_grad():
            return self._encode(torch.stack(pixels)).float().cpu()

    def _cropped(self, planned: PlannedImage, data: bytes) -> Image.Image:
        return self._crop(planned, data).image

    def _crop(self, planned: PlannedImage, data: bytes) -> CropResult:
        try:
            loaded = load_image(
                planned.record.path,
                data=data,
                background=self.settings.background,
                draft_size=planned.choice.resized,
            )
        except ImageLoadError as error:
            raise DatasetError([f"{error} (it was readable when the dataset was scanned)"]) from error
        scanned_aspect = planned.record.width / planned.record.height
        if abs(loaded.image.width / loaded.image.height - scanned_aspect) > 0.02 * scanned_aspect:
            raise DatasetError(
                [f"{planned.record.path.name} changed shape since the dataset was scanned; scan it again"]
            )
        return crop_to_bucket(loaded.image, planned.choice, face_finder=self.face_finder)

    def _cached_or_encoded(
        self, planned: PlannedImage, data: bytes, encode: Encode, crop: CropResult | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        need_flipped = self.settings.flip_aug
        key = None
        if self.disk_cache is not None:
            key = self.disk_cache.key(content_hash(data), planned.choice.bucket, self._crop_signature())
            cached = self.disk_cache.load(key, need_flipped=need_flipped)
            if cached is not None and all(bool(torch.isfinite(t).all()) for t in cached.values()):
                self.cache_hits += 1
                return cached[LATENT_KEY].float(), cached[FLIPPED_KEY].float() if need_flipped else None
        pixels = _to_model_pixels(
            np.asarray(crop.image if crop is not None else self._cropped(planned, data))
        )
        batch = torch.stack([pixels, pixels.flip(-1)]) if need_flipped else pixels[None]
        with torch.no_grad():
            encoded = encode(batch).float().cpu()
        try:
            check_finite_latents(encoded, planned.record.path.name)
        except ValueError as error:
            raise DatasetError([str(error)]) from None
        latent, flipped = encoded[0].clone(), (encoded[1].clone() if need_flipped else None)
        if key is not None and self.disk_cache is not None:
            tensors = {LATENT_KEY: latent}
            if flipped is not None:
                tensors[FLIPPED_KEY] = flipped
            self.disk_cache.store(key, tensors)
        return latent, flipped

    def _crop_signature(self) -> str:
        finder = "center"
        if self.face_finder is not None:
            finder = "face:" + str(getattr(self.face_finder, "name", type(self.face_finder).__qualname__))
        background = ",".join(str(channel) for channel in self.settings.background)
        return f"crop={finder};background={background}"


def build_batch_source(
    config: TrainingConfig,
    dataset: ScannedDataset,
    *,
    vae_id: str = "",
    cache_dir: str | Path | None = None,
    face_finder: FaceFinder | None = None,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
) -> BucketedBatchSource:
    """The batch source for ``config`` over a scanned dataset.

    ``vae_id`` identifies the VAE (e.g. its hash) and is required when ``config.cache_latents_to_disk``
    is on; ``cache_dir`` defaults to :func:`default_cache_dir`. ``face_finder`` replaces the default
    OpenCV detector when ``config.crop_mode`` is "face". Raises :class:`DatasetError` when the dataset
    cannot be trained on.
    """
    if not dataset.usable:
        raise DatasetError(dataset.errors or ["the dataset has no usable training images"])
    plan = plan_epoch(dataset, config)
    train_images = sum(len(subset.images) for subset in dataset.train_subsets)
    problems = validate_for_dataset(config, train_images)
    if problems:
        raise DatasetError(problems)
    settings = settings_for(config, background=background)
    folder = settings.masks.conditioning_dir
    if settings.masks.mask_files and folder is not None and not folder.is_dir():
        raise DatasetError([f"the mask images folder {folder} does not exist; correct it or leave it empty"])
    disk_cache = None
    if settings.disk_cache_requested and settings.latents_cacheable:
        if not vae_id.strip():
            raise ValueError("build_batch_source needs vae_id to cache latents on disk")
        disk_cache = LatentDiskCache(cache_dir if cache_dir is not None else default_cache_dir(), vae_id)
    return BucketedBatchSource(
        plan, settings, disk_cache=disk_cache, face_finder=face_finder_for(config, face_finder)
    )


def settings_for(
    config: TrainingConfig, *, background: tuple[int, int, int] = DEFAULT_BACKGROUND
) -> SourceSettings:
    return SourceSettings(
        flip_aug=config.flip_aug,
        color_aug=config.color_aug,
        cache_latents=config.cache_latents,
        captions=CaptionAugmentation(
            shuffle=config.shuffle_caption,
            keep_tokens=config.keep_tokens,
            caption_dropout_rate=config.caption_dropout_rate,
            tag_dropout_rate=config.caption_tag_dropout_rate,
        ),
        background=background,
        disk_cache_requested=config.cache_latents_to_disk,
        masks=mask_settings_for(config),
    )


def color_augment(pixels: np.ndarray, rng: random.Random) -> np.ndarray:
    """A weak random colour change on an (H, W, 3) uint8 array: hue shift or gamma, a third of the time."""
    if rng.random() >= COLOR_AUG_PROBABILITY:
        return pixels
    if rng.random() < 0.5:
        shift = round(rng.uniform(-HUE_SHIFT_DEGREES, HUE_SHIFT_DEGREES) * 256 / 360)
        hsv = np.array(Image.fromarray(np.ascontiguousarray(pixels)).convert("HSV"))
        hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + shift) % 256).astype(np.uint8)
        return np.asarray(Image.fromarray(hsv, "HSV").convert("RGB"))
    gamma = rng.uniform(*GAMMA_RANGE)
    return np.clip(np.round(255.0 * (pixels / 255.0) ** gamma), 0, 255).astype(np.uint8)


def _to_model_pixels(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 to a (3, H, W) float tensor in [-1, 1]."""
    tensor = torch.from_numpy(np.array(array, dtype=np.float32)) / 127.5 - 1.0
    return tensor.permute(2, 0, 1).contiguous()


def _read_image_bytes(planned: PlannedImage) -> bytes:
    try:
        return planned.record.path.read_bytes()
    except OSError as error:
        raise DatasetError(
            [f"{planned.record.path.name} cannot be read any more ({error.strerror or error}); scan again"]
        ) from error


def latent_cache_warnings(settings: SourceSettings) -> list[str]:
    """Why latents will be encoded at every step, if they will."""
    messages = []
    if settings.color_aug:
        messages.append(
            "Colour augmentation is on, so latents cannot be cached: every step encodes its images with "
            "the VAE (slower, and the VAE must stay loaded)"
            + ("; the disk cache is not used either" if settings.disk_cache_requested else "")
        )
    elif not settings.cache_latents:
        messages.append("Latent caching is off: every step encodes its images with the VAE (slower)")
    return messages
