"""Epoch samples: what to render after an epoch, who renders it, and where the pictures go.

* :func:`sample_requests` turns the config into one :class:`SampleRequest` per prompt. Every prompt
  carries ``<lora:STEM:w>``: the image is rendered with the adapters in memory, and the tag in its
  infotext lets Infinite Image Browser (and a person) find the epoch by name.
* A :class:`SampleRenderer` renders requests. Inside A1111 that is A1111's own txt2img pipeline
  (``lib_lora_trainer.webui``); :class:`EulerSampleRenderer` is a small sampler for the standalone
  host (tests, the demo app): a few Euler steps through the UNet, then the VAE decoder.
* :func:`save_sample` writes a PNG with A1111's ``parameters`` text chunk, never over an existing file.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.files import atomic_write_bytes
from lib_lora_trainer.model.host import TrainingHost
from lib_lora_trainer.outputs.registry import png_bytes

logger = logging.getLogger(__name__)

DEFAULT_SAMPLE_WEIGHT = 1.0
# What people who train characters type to check one: the bare trigger, a portrait, a full body shot.
SAMPLE_VARIATIONS = ("", "portrait, looking at viewer, simple background", "full body, standing, outdoors")
STANDALONE_VERSION = "character-lora-trainer standalone"
LORA_TAG_PATTERN = re.compile(r"\s*<lora:[^>]*>")


@dataclass(frozen=True)
class SampleRequest:
    prompt: str  # with the <lora:stem:w> tag
    negative_prompt: str
    seed: int
    steps: int
    sampler: str
    cfg_scale: float
    width: int
    height: int
    clip_skip: int = 1  # the run's: its samples are rendered as it trained (A1111 puts it in the infotext)


@dataclass(frozen=True)
class RenderedSample:
    request: SampleRequest
    image: Image.Image  # ``image.info["parameters"]`` holds the infotext
    infotext: str
    path: Path | None = None


class SampleRenderer(Protocol):
    """Renders sample images with the model as it is now (adapters attached during training)."""

    def render(
        self, requests: Sequence[SampleRequest], folder: Path, file_stem: str
    ) -> list[RenderedSample]: ...


class SampleError(RuntimeError):
    """Samples could not be rendered; training goes on without them."""


def lora_tag(stem: str, weight: float = DEFAULT_SAMPLE_WEIGHT) -> str:
    return f"<lora:{stem}:{weight:g}>"


def default_sample_prompts(trigger_word: str, class_token: str = "") -> list[str]:
    """The trigger word alone and in a portrait and a full-body prompt."""
    subject = ", ".join(part.strip() for part in (trigger_word, class_token) if part.strip()) or "a person"
    return [", ".join(part for part in (subject, extra) if part) for extra in SAMPLE_VARIATIONS]


def sample_requests(
    config: TrainingConfig, stem: str, weight: float = DEFAULT_SAMPLE_WEIGHT
) -> list[SampleRequest]:
    """One request per sample prompt (the defaults when the config has none), each with its own seed.

    Seeds are ``sample_seed``, ``sample_seed + 1``, ... the same for every epoch, so epochs compare
    like for like.
    """
    prompts = [p.strip() for p in config.sample_prompts if p.strip()] or default_sample_prompts(
        config.trigger_word, config.class_token
    )
    width = config.sample_width or config.resolution
    height = config.sample_height or config.resolution
    return [
        SampleRequest(
            prompt=f"{prompt} {lora_tag(stem, weight)}",
            negative_prompt=config.sample_negative_prompt.strip(),
            seed=config.sample_seed + index,
            steps=config.sample_steps,
            sampler=config.sample_sampler,
            cfg_scale=config.sample_cfg_scale,
            width=width,
            height=height,
            clip_skip=config.clip_skip,
        )
        for index, prompt in enumerate(prompts)
    ]


def sample_due(config: TrainingConfig, epoch: int) -> bool:
    """Samples are rendered every N epochs and always after the last one (unless N is 0)."""
    every = config.sample_every_n_epochs
    return every > 0 and (epoch % every == 0 or epoch == config.epochs)


def format_infotext(request: SampleRequest, *, sampler: str, model_name: str = "", version: str = "") -> str:
    """A1111's generation-parameters text: prompt, ``Negative prompt:`` line, then ``key: value`` pairs."""
    pairs = [
        ("Steps", request.steps),
        ("Sampler", sampler),
        ("CFG scale", f"{request.cfg_scale:g}"),
        ("Seed", request.seed),
        ("Size", f"{request.width}x{request.height}"),
        ("Model", model_name),
        ("Version", version),
    ]
    lines = [request.prompt]
    if request.negative_prompt:
        lines.append(f"Negative prompt: {request.negative_prompt}")
    lines.append(", ".join(f"{key}: {value}" for key, value in pairs if value not in ("", None)))
    return "\n".join(lines)


def free_path(folder: Path, name: str, suffix: str = ".png") -> Path:
    """``folder/name.png``, or ``name-1.png``, ``name-2.png`` ... when taken: nothing is overwritten."""
    candidate = folder / f"{name}{suffix}"
    number = 1
    while candidate.exists():
        candidate = folder / f"{name}-{number}{suffix}"
        number += 1
    return candidate


def save_sample(image: Image.Image, infotext: str, folder: Path, name: str) -> Path:
    """Write ``image`` as PNG with its infotext in the ``parameters`` chunk (as A1111 does)."""
    image.info["parameters"] = infotext
    target = free_path(folder, name)
    atomic_write_bytes(target, png_bytes(image))
    return target


@dataclass
class EulerSampleRenderer:
    """Euler sampling with classifier-free guidance over any :class:`TrainingHost`, for the standalone
    host: ``decode`` turns scaled latents back into pixels in [-1, 1] (the VAE decoder)."""

    host: TrainingHost
    decode: Callable[[torch.Tensor], torch.Tensor]
    scale_factor: float = 0.18215
    model_name: str = ""
    sampler_name: str = "Euler"
    saved: list[Path] = field(default_factory=list)

    def render(self, requests: Sequence[SampleRequest], folder: Path, file_stem: str) -> list[RenderedSample]:
        results = []
        for index, request in enumerate(requests):
            image = self.render_image(request)
            infotext = format_infotext(
                request, sampler=self.sampler_name, model_name=self.model_name, version=STANDALONE_VERSION
            )
            path = save_sample(image, infotext, folder, f"{file_stem}-{index:02d}")
            self.saved.append(path)
            results.append(RenderedSample(request, image, infotext, path))
        return results

    @torch.no_grad()
    def render_image(self, request: SampleRequest) -> Image.Image:
        device = self.host.device
        generator = torch.Generator(device="cpu").manual_seed(request.seed)
        shape = (1, 4, request.height // 8, request.width // 8)
        alphas = self.host.alphas_cumprod().float().to(device)
        sigmas_all = ((1 - alphas) / alphas).sqrt()
        timesteps = np.linspace(len(alphas) - 1, 0, request.steps).round().astype(np.int64)
        sigmas = [float(sigmas_all[t]) for t in timesteps] + [0.0]
        prompt = strip_lora_tags(request.prompt)
        # one batch: a prompt longer than 75 tokens pads the negative prompt to its chunks (as A1111 does)
        uncond, cond = self.host.encode_text([request.negative_prompt, prompt]).chunk(2)
        x = torch.randn(shape, generator=generator).to(device) * sigmas[0]
        for index, timestep in enumerate(timesteps):
            sigma, sigma_next = sigmas[index], sigmas[index + 1]
            scaled = x / math.sqrt(sigma**2 + 1)
            t = torch.full((2,), int(timestep), device=device, dtype=torch.long)
            output = self.host.predict(torch.cat([scaled, scaled]), t, torch.cat([uncond, cond])).float()
            eps_uncond, eps_cond = output.chunk(2)
            denoised = x - (eps_uncond + request.cfg_scale * (eps_cond - eps_uncond)) * sigma
            x = denoised + (x - denoised) / sigma * sigma_next if sigma_next > 0 else denoised
        pixels = self.decode(x / self.scale_factor).float().clamp(-1, 1)
        array = ((pixels[0].permute(1, 2, 0).cpu().numpy() + 1) * 127.5).round().astype(np.uint8)
        return Image.fromarray(array, "RGB")


def strip_lora_tags(prompt: str) -> str:
    """The prompt without ``<lora:...>`` tags, which A1111 also removes before the text encoder."""
    return LORA_TAG_PATTERN.sub("", prompt).strip()
