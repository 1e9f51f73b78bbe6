"""Ready-made training recipes, as overrides on top of :class:`~lib_lora_trainer.config.TrainingConfig`.

A preset changes only training settings; it never touches the training image folder, the output name
or the trigger word the user already chose (the "Game character" recipe does clear the regularisation
folder: it trains without regularisation images). The first two reproduce the recipes our users trained
with by hand in kohya_ss; the third is our LoCon starting point for characters.
"""

from __future__ import annotations

import dataclasses
import logging
from types import MappingProxyType
from typing import Any

from lib_lora_trainer.config import ConfigError, TrainingConfig, ensure_valid

logger = logging.getLogger(__name__)

FACE_PERSON = "Face / person"
GAME_CHARACTER = "Game character"
LOCON_CHARACTER = "LoCon character"

_FACE_PERSON: dict[str, Any] = {
    "network_type": "lora",
    "network_dim": 32,
    "network_alpha": 16.0,
    "optimizer": "AdamW",
    "unet_lr": 2e-4,
    "text_encoder_lr": 1e-4,
    "train_text_encoder": True,
    "lr_scheduler": "cosine_with_restarts",
    "lr_scheduler_num_cycles": 4,
    "lr_warmup_steps": 300,
    "batch_size": 2,
    "resolution": 512,
}

_GAME_CHARACTER: dict[str, Any] = {
    "network_type": "lora",
    "network_dim": 96,
    "network_alpha": 72.0,
    # Adafactor at a fixed learning rate (relative_step off), as kohya_ss' Adafactor configs run it,
    # so the UNet and text-encoder rates below are what is actually used.
    "optimizer": "Adafactor",
    "adafactor_relative_step": False,
    "unet_lr": 1e-4,
    "text_encoder_lr": 5e-5,
    "train_text_encoder": True,
    "lr_scheduler": "constant_with_warmup",
    "lr_warmup_steps": 0.05,
    "resolution": 768,
    "max_bucket_reso": 1024,
    "flat_repeats": 10,
    "epochs": 8,
    "batch_size": 1,
    "flip_aug": True,
    "color_aug": True,
    # Colour augmentation changes the pixels every step, so latents cannot be computed once and reused.
    "cache_latents": False,
    "cache_latents_to_disk": False,
    "reg_data_dir": "",  # no regularisation images in this recipe
}

# LoCon also adapts the 3x3 convolutions of the UNet's ResBlocks, which carry texture, colour and
# small shapes (outfit patterns, hair detail) that attention-only LoRA learns poorly. A 3x3 conv adapter
# has 9 times the parameters of a linear one per rank, so the conv rank stays at half the linear rank
# (16 vs 32) with alpha = rank / 2 on both, the LyCORIS guidance for LoCon; this keeps the file near the
# size of a rank-32 LoRA and keeps the convs from overfitting the backgrounds. The convs see more of
# each image, so the UNet rate is a little lower than the face recipe's and the run has one more epoch.
_LOCON_CHARACTER: dict[str, Any] = {
    "network_type": "locon",
    "network_dim": 32,
    "network_alpha": 16.0,
    "conv_dim": 16,
    "conv_alpha": 8.0,
    "optimizer": "AdamW",
    "unet_lr": 1.5e-4,
    "text_encoder_lr": 7.5e-5,
    "train_text_encoder": True,
    "lr_scheduler": "cosine_with_restarts",
    "lr_scheduler_num_cycles": 3,
    "lr_warmup_steps": 0.05,
    "resolution": 512,
    "batch_size": 2,
    "epochs": 11,
    "flip_aug": False,
}

PRESETS: MappingProxyType[str, MappingProxyType[str, Any]] = MappingProxyType(
    {
        FACE_PERSON: MappingProxyType(_FACE_PERSON),
        GAME_CHARACTER: MappingProxyType(_GAME_CHARACTER),
        LOCON_CHARACTER: MappingProxyType(_LOCON_CHARACTER),
    }
)


def preset_names() -> list[str]:
    return list(PRESETS)


def preset_overrides(name: str) -> dict[str, Any]:
    """The settings a preset changes (a copy, safe to modify)."""
    try:
        return dict(PRESETS[name])
    except KeyError:
        message = f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}"
        logger.error(message)
        raise ConfigError([message]) from None


def apply_preset(config: TrainingConfig, name: str) -> TrainingConfig:
    """A copy of ``config`` with the preset's settings applied and checked (the input is unchanged)."""
    updated = dataclasses.replace(config, **preset_overrides(name))
    return ensure_valid(updated, need_dataset=False)
