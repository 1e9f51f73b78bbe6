"""Tiny real models and data for the engine tests."""

from __future__ import annotations

import copy
import hashlib

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.model.standalone import StandaloneHost, build_random_host


def make_images(count: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Distinct, learnable pictures: a coloured disc on a coloured background."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        background = tuple(int(v) for v in rng.integers(0, 255, 3))
        image = Image.new("RGB", (size, size), background)
        draw = ImageDraw.Draw(image)
        x, y = (int(v) for v in rng.integers(size // 4, 3 * size // 4, 2))
        r = size // 5
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        images.append(image)
    return images


# Settings that train the tiny model in seconds on a CPU (the engine's and the tab's tests start here).
TINY_TRAINING = dict(
    output_name="alice",
    resolution=64,
    min_bucket_reso=64,
    network_dim=4,
    network_alpha=2.0,
    unet_lr=1e-3,
    text_encoder_lr=5e-4,
    lr_scheduler="constant",
    epochs=2,
    mixed_precision="no",
    save_precision="fp32",
    seed=7,
)


def tiny_config(tmp_path, **overrides) -> TrainingConfig:
    values = dict(
        TINY_TRAINING,
        output_dir=str(tmp_path / "Lora"),
        train_data_dir="unused",
        conv_dim=2,
        conv_alpha=1.0,
        batch_size=2,
    )
    values.update(overrides)
    return TrainingConfig(**values)


def tiny_host(seed: int = 0) -> StandaloneHost:
    return build_random_host("tiny", seed=seed)


def state_fingerprint(*modules: nn.Module) -> dict:
    """Everything 'restored exactly' means: weights, requires_grad flags, module types and modes."""
    digest = hashlib.sha256()
    flags, types, modes = [], [], []
    for module in modules:
        for name, tensor in sorted(module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        flags += [(n, p.requires_grad) for n, p in module.named_parameters()]
        types += [(n, type(m).__name__) for n, m in module.named_modules()]
        modes += [(n, m.training) for n, m in module.named_modules()]
        types += [(n, "forward" in vars(m)) for n, m in module.named_modules()]
    return {"weights": digest.hexdigest(), "flags": flags, "types": types, "modes": modes}


def host_fingerprint(host: StandaloneHost) -> dict:
    return state_fingerprint(host.unet(), host.text_encoder(), host.vae())


def clone_modules(host: StandaloneHost) -> tuple[nn.Module, nn.Module]:
    return copy.deepcopy(host.unet()), copy.deepcopy(host.text_encoder())


def fixed_inputs(host: StandaloneHost, seed: int = 99):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([100, 700])
    token_ids = host._tokenizer(["alice, red scarf", "alice smiling"])
    return latents, timesteps, token_ids
