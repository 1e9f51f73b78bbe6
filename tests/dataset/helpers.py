"""Building small real datasets for the dataset tests."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFilter

from lib_lora_trainer.config import TrainingConfig

VAE_SCALE = 0.18215


def photo(width: int, height: int, seed: int) -> Image.Image:
    """A picture with a gradient and a few random shapes: compresses well, distinct perceptual hash."""
    rng = random.Random(seed)
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = np.array([rng.randint(0, 255) for _ in range(3)], dtype=np.float64)
    array = np.clip(base * (0.4 + 0.6 * x) * (0.6 + 0.4 * y), 0, 255).astype(np.uint8)
    image = Image.fromarray(array, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randint(0, width - 2), rng.randint(0, height - 2)
        x1, y1 = rng.randint(x0 + 1, width), rng.randint(y0 + 1, height)
        colour = tuple(rng.randint(0, 255) for _ in range(3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return image


def save_photo(
    path: Path, width: int = 320, height: int = 320, seed: int = 0, caption: str | None = None
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = photo(width, height, seed)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        image.save(path, "JPEG", quality=92)
    else:
        image.save(path)
    if caption is not None:
        path.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return path


def make_folder(
    folder: Path, count: int, *, start_seed: int = 0, size=(320, 320), caption: str | None = None
):
    for index in range(count):
        save_photo(folder / f"img_{index:03d}.png", *size, seed=start_seed + index, caption=caption)
    return folder


def drawn_face(size: int = 200) -> Image.Image:
    """A schematic face (skin oval, hair, eyes, brows, nose, mouth) that OpenCV's Haar cascade detects,
    centred at (size, 1.3 * size) on a 3*size square canvas."""
    image = Image.new("RGB", (size * 3, size * 3), (90, 110, 140))
    draw = ImageDraw.Draw(image)
    cx, cy, s = size, int(size * 1.3), size
    draw.ellipse([cx - 0.42 * s, cy - 0.55 * s, cx + 0.42 * s, cy + 0.55 * s], fill=(225, 190, 165))
    draw.ellipse([cx - 0.45 * s, cy - 0.75 * s, cx + 0.45 * s, cy - 0.25 * s], fill=(60, 40, 30))
    draw.ellipse([cx - 0.42 * s, cy - 0.40 * s, cx + 0.42 * s, cy + 0.55 * s], fill=(225, 190, 165))
    for ex in (-0.17, 0.17):
        draw.ellipse(
            [cx + (ex - 0.08) * s, cy - 0.16 * s, cx + (ex + 0.08) * s, cy - 0.06 * s], fill=(250,) * 3
        )
        draw.ellipse(
            [cx + (ex - 0.04) * s, cy - 0.15 * s, cx + (ex + 0.04) * s, cy - 0.07 * s], fill=(40, 30, 20)
        )
        draw.rectangle(
            [cx + (ex - 0.1) * s, cy - 0.26 * s, cx + (ex + 0.09) * s, cy - 0.22 * s], fill=(70, 50, 40)
        )
    draw.polygon(
        [(cx, cy - 0.05 * s), (cx - 0.05 * s, cy + 0.12 * s), (cx + 0.05 * s, cy + 0.12 * s)],
        fill=(200, 160, 140),
    )
    draw.ellipse([cx - 0.14 * s, cy + 0.22 * s, cx + 0.14 * s, cy + 0.3 * s], fill=(170, 80, 80))
    return image.filter(ImageFilter.GaussianBlur(2))


def config_for(folder: Path, **overrides) -> TrainingConfig:
    values = {"train_data_dir": str(folder), "cache_latents_to_disk": False}
    values.update(overrides)
    return TrainingConfig(**values)


class PoolingEncoder:
    """A deterministic stand-in for the VAE's encoder with its exact contract: (B,3,H,W) in [-1,1] ->
    scaled (B,4,H/8,W/8). Average pooling commutes with flipping, so flipped latents can be checked."""

    def __init__(self, scale: float = VAE_SCALE):
        self.scale = scale
        self.calls = 0
        self.images_encoded = 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        assert pixels.ndim == 4 and pixels.shape[1] == 3
        assert pixels.min() >= -1.0 - 1e-6 and pixels.max() <= 1.0 + 1e-6
        self.calls += 1
        self.images_encoded += pixels.shape[0]
        pooled = F.avg_pool2d(pixels, 8)
        return torch.cat([pooled, pooled.mean(dim=1, keepdim=True)], dim=1) * self.scale


def folder_fingerprint(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> SHA-256 of its bytes)."""
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
