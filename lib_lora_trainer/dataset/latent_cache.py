"""Latents kept on disk between runs, so a rerun on the same images and VAE skips encoding.

A cache entry is keyed by everything that changes the latent: the image file's content (SHA-256, so a
rename does not matter and an edit does), the bucket size, the crop (mode and face detector), the
background used for transparency, and the caller's VAE identity string. Entries are safetensors files
in a cache folder of our own — never next to the user's images — written atomically.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from lib_lora_trainer.files import atomic_write_bytes

logger = logging.getLogger(__name__)

# Bump when the preprocessing changes (resampling, crop rule...): old entries then stop matching.
CACHE_FORMAT_VERSION = "1"
LATENT_KEY = "latent"
FLIPPED_KEY = "latent_flipped"


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/character-lora-trainer/latents`` (``~/.cache/...`` when unset)."""
    import os

    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "character-lora-trainer" / "latents"


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class LatentDiskCache:
    def __init__(self, folder: str | Path, vae_id: str):
        if not vae_id.strip():
            raise ValueError("a VAE identity is needed to cache latents on disk (e.g. the VAE's hash)")
        self.folder = Path(folder)
        self.vae_id = vae_id.strip()

    def key(self, image_sha256: str, bucket: tuple[int, int], crop_signature: str) -> str:
        parts = [CACHE_FORMAT_VERSION, image_sha256, f"{bucket[0]}x{bucket[1]}", crop_signature, self.vae_id]
        return hashlib.sha256("\n".join(parts).encode("utf-8")).hexdigest()

    def path_for(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def load(self, key: str, *, need_flipped: bool) -> dict[str, torch.Tensor] | None:
        """The cached tensors, or None when absent, unreadable or missing the flipped latent."""
        path = self.path_for(key)
        if not path.is_file():
            return None
        try:
            tensors = load_file(str(path))
        except Exception as error:  # a half-written or foreign file: re-encode and overwrite it
            logger.warning("Latent cache file %s is unreadable (%s); encoding again", path, error)
            return None
        if LATENT_KEY not in tensors or (need_flipped and FLIPPED_KEY not in tensors):
            return None
        return tensors

    def store(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        try:
            data = save({name: tensor.contiguous().cpu() for name, tensor in tensors.items()})
            atomic_write_bytes(self.path_for(key), data)
        except OSError as error:  # a full or read-only disk must not stop training
            logger.warning(
                "Could not write the latent cache in %s (%s); continuing without it", self.folder, error
            )
