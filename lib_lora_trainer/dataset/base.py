"""What the training loop consumes: batches of latents and captions, one bucket per batch.

The rest of ``lib_lora_trainer.dataset`` builds these from folders, buckets, augmentation and
the latent cache; the loop only needs this small protocol, so tests and the headless entry can feed it
a plain list of images too (:class:`InMemoryBatchSource`).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from PIL import Image


@dataclass(frozen=True)
class TrainingBatch:
    latents: torch.Tensor  # (B, 4, H/8, W/8), already multiplied by the VAE scale factor
    captions: Sequence[str]
    loss_weights: torch.Tensor  # (B,), 1.0 for training images, the prior-loss weight for reg images
    masks: torch.Tensor | None = None  # (B, 1, H/8, W/8) in [0, 1]: where the loss counts (masked loss)


class BatchSource(Protocol):
    """A dataset ready for training. ``prepare`` encodes (or loads cached) latents once."""

    def prepare(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """``progress(done, total)`` is called after each image."""
        ...

    def batches_per_epoch(self) -> int: ...

    def epoch(self, epoch_index: int, rng: random.Random) -> Iterator[TrainingBatch]: ...

    def captions(self) -> list[str]:
        """Every caption the source can produce without augmentation (for caching conditioning)."""
        ...

    def captions_vary(self) -> bool:
        """True when captions change between steps (shuffle, dropout), so conditioning can't be cached."""
        ...

    def fingerprint(self) -> list[str]:
        """One line per image, ``"<name>|<what identifies its content and caption>"``: a resumed run
        checks with it that the dataset is still the one its state was trained on."""
        ...


def check_finite_latents(latents: torch.Tensor, image_name: str) -> torch.Tensor:
    """``latents``, or a ValueError when the VAE gave NaN/inf (a half-precision VAE overflow)."""
    if not bool(torch.isfinite(latents).all()):
        raise ValueError(
            f"the VAE turned {image_name} into NaN or infinite latents (usually a half-precision VAE "
            "overflow: start the WebUI with --no-half-vae, or choose another VAE); nothing was cached"
        )
    return latents


def pil_to_pixels(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a (3, H, W) float tensor in [-1, 1], the VAE's input range."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def center_crop_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """Scale ``image`` to cover width x height, then crop the centre."""
    scale = max(width / image.width, height / image.height)
    resized = image.convert("RGB").resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))),
        Image.Resampling.LANCZOS,
    )
    left = (resized.width - width) // 2
    top = (resized.height - height) // 2
    return resized.crop((left, top, left + width, top + height))


class InMemoryBatchSource:
    """A plain list of (image, caption) pairs at one square resolution, latents cached in memory.

    Used by tests, the benchmark and quick headless runs. The full dataset pipeline (buckets,
    repeats, augmentation, disk cache) lives in ``lib_lora_trainer.dataset``.
    """

    def __init__(
        self,
        items: Sequence[tuple[Image.Image, str]],
        *,
        resolution: int,
        batch_size: int,
        repeats: int = 1,
        loss_weight: float = 1.0,
    ):
        if not items:
            raise ValueError("the dataset has no images")
        self._items = list(items)
        self._resolution = resolution
        self._batch_size = batch_size
        self._repeats = repeats
        self._loss_weight = loss_weight
        self._latents: list[torch.Tensor] = []

    def prepare(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self._latents = []
        for index, (image, _) in enumerate(self._items):
            pixels = pil_to_pixels(center_crop_resize(image, self._resolution, self._resolution))
            latent = encode(pixels[None])[0].float().cpu()
            self._latents.append(check_finite_latents(latent, f"image {index + 1}"))
            if progress is not None:
                progress(index + 1, len(self._items))

    def batches_per_epoch(self) -> int:
        return -(-len(self._items) * self._repeats // self._batch_size)

    def epoch(self, epoch_index: int, rng: random.Random) -> Iterator[TrainingBatch]:
        if not self._latents:
            raise RuntimeError("prepare() must run before epoch()")
        order = [i for i in range(len(self._items)) for _ in range(self._repeats)]
        rng.shuffle(order)
        for start in range(0, len(order), self._batch_size):
            chosen = order[start : start + self._batch_size]
            yield TrainingBatch(
                latents=torch.stack([self._latents[i] for i in chosen]),
                captions=[self._items[i][1] for i in chosen],
                loss_weights=torch.full((len(chosen),), self._loss_weight),
            )

    def captions(self) -> list[str]:
        return sorted({caption for _, caption in self._items})

    def captions_vary(self) -> bool:
        return False

    def fingerprint(self) -> list[str]:
        lines = []
        for index, (image, caption) in enumerate(self._items):
            digest = hashlib.sha256(image.convert("RGB").tobytes()).hexdigest()[:16]
            lines.append(f"image {index + 1}|{image.size}|{digest}|{self._repeats}|{caption}")
        return lines
