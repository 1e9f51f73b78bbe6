"""The host seam: the little a trainer needs from whatever holds the model (A1111, Forge, a test).

A host lends its loaded UNet, text encoder and VAE for the length of a training session and takes them
back exactly as they were. Everything above this layer (adapters, the loop, outputs) talks to a
:class:`TrainingHost` only, so no training code imports ``modules.*``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn


class HostRefused(RuntimeError):
    """The host cannot train in its current state (e.g. --lowvram); the message tells the user why."""


@dataclass(frozen=True)
class HostOptions:
    """What the session must set up on the host for this run."""

    train_text_encoder: bool
    clip_skip: int = 1  # applied by the host's caption encoder, never through the WebUI's settings
    mixed_precision: str = "no"  # what the run computes in, resolved: "no", "fp16" or "bf16"
    weighted_captions: bool = False  # read (tag:1.2), [tag], BREAK in captions; off: plain text


@dataclass(frozen=True)
class BaseModelInfo:
    """The loaded checkpoint, for the LoRA file's metadata."""

    name: str = ""
    hash_legacy: str = ""  # A1111's old 8-hex model hash
    hash_sha256: str = ""
    vae_name: str = ""  # a VAE chosen apart from the checkpoint's own, if any

    def vae_identity(self) -> str:
        """What the latents depend on: keys the on-disk latent cache."""
        return f"{self.name}|{self.hash_sha256 or self.hash_legacy}|{self.vae_name}"


class TrainingHost(Protocol):
    """What the trainer needs from a host. ``session`` brackets every use of the other members."""

    device: torch.device

    def session(self, options: HostOptions) -> contextlib.AbstractContextManager[None]:
        """Prepare the live model for training; restore every change on exit, whatever the exit."""
        ...

    def gradient_checkpointing(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        """Checkpoint the UNet's blocks while the context is open (in a session); no-op if not enabled."""
        ...

    def unet(self) -> nn.Module:
        """The ldm ``UNetModel`` (module names as in the checkpoint: ``input_blocks.1.1...``)."""
        ...

    def text_encoder(self) -> nn.Module:
        """The transformers ``CLIPTextModel`` (names ``text_model.encoder.layers.0...``)."""
        ...

    def parameterization(self) -> str:
        """ "eps" (SD1.x) or "v" (SD2-v)."""
        ...

    def alphas_cumprod(self) -> torch.Tensor:
        """The training noise schedule in float32 on :attr:`device` (1000 values for SD)."""
        ...

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> latents (B,4,H/8,W/8) scaled by the VAE factor, float32, no grad."""
        ...

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        """Conditioning for ``captions`` with gradients reaching text-encoder adapters, as
        :mod:`~lib_lora_trainer.model.text_encoding` describes: literal unless the session's options
        ask for weighted captions, every 75-token chunk kept, the session's clip skip."""
        ...

    def max_token_length(self) -> int | None:
        """kohya's ``max_token_length`` of what this session encoded: None while every caption fit 75
        tokens, else 75 x the chunks of the longest (150, 225 ...)."""
        ...

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        """The UNet's output (noise or v) for ``noisy_latents`` at ``timesteps``."""
        ...

    def autocast(self, mixed_precision: str) -> contextlib.AbstractContextManager[None]:
        """The autocast context the forward passes run under."""
        ...

    def base_model_info(self) -> BaseModelInfo: ...


def autocast_for(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager[None]:
    """torch.autocast for ``mixed_precision`` on ``device``, or a no-op for full precision."""
    if mixed_precision == "no":
        return contextlib.nullcontext()
    dtype = torch.float16 if mixed_precision == "fp16" else torch.bfloat16
    return torch.autocast(device_type=device.type, dtype=dtype)


@contextlib.contextmanager
def frozen_parameters(*modules: nn.Module) -> Iterator[None]:
    """Switch off ``requires_grad`` on every parameter of ``modules``; put every flag back on exit."""
    flags = [(p, p.requires_grad) for module in modules for p in module.parameters()]
    try:
        for parameter, _ in flags:
            parameter.requires_grad_(False)
        yield
    finally:
        for parameter, flag in flags:
            parameter.requires_grad_(flag)
