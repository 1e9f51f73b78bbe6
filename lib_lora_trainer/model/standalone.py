"""A host over plain ldm/transformers modules, outside any WebUI: tests, benchmarks, headless runs.

It does for bare modules what the A1111 host does for ``shared.sd_model``: freeze, patch attention
and checkpointing for the session, and restore every flag afterwards.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from lib_lora_trainer.model.host import (
    BaseModelInfo,
    HostOptions,
    HostRefused,
    autocast_for,
    frozen_parameters,
)
from lib_lora_trainer.model.ldm_parts import (
    SD15_SCALE_FACTOR,
    gradient_checkpointing,
    sd_alphas_cumprod,
    sdp_attention,
)
from lib_lora_trainer.model.text_encoding import CaptionEncoder, CaptionTokenizer


class HashTokenizer:
    """Words to ids by a stable hash: stands in for CLIP's BPE where no tokenizer files exist (tests,
    random-weight benchmarks); a :class:`~lib_lora_trainer.model.text_encoding.CaptionTokenizer`.
    Real runs inside A1111 use A1111's own tokenizer."""

    def __init__(self, vocab_size: int, length: int = 77):
        self.vocab_size = vocab_size
        self.length = length
        self.bos, self.eos = vocab_size - 2, vocab_size - 1
        self.bos_token_id, self.eos_token_id = self.bos, self.eos
        self.comma_token_id = self._id(",")

    def _id(self, word: str) -> int:
        return int.from_bytes(hashlib.sha1(word.encode()).digest()[:4], "little") % self.bos

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        return [[self._id(w) for w in re.findall(r"\w+|[^\w\s]", text.lower())] for text in texts]

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        """One 77-token row per caption (BOS, ids, EOS padding), cut at 75 ids."""
        rows = []
        for ids in self.tokenize(captions):
            row = [self.bos, *ids[: self.length - 2], self.eos]
            rows.append(row + [self.eos] * (self.length - len(row)))
        return torch.tensor(rows, dtype=torch.long)


class StandaloneHost:
    """A :class:`~lib_lora_trainer.model.host.TrainingHost` over bare modules."""

    def __init__(
        self,
        *,
        unet: nn.Module,
        text_encoder: nn.Module,
        vae: nn.Module,
        tokenizer: CaptionTokenizer,
        device: torch.device | str = "cpu",
        scale_factor: float = SD15_SCALE_FACTOR,
        alphas_cumprod: torch.Tensor | None = None,
        parameterization: str = "eps",
        use_sdp_attention: bool = True,
        model_info: BaseModelInfo | None = None,
    ):
        self.device = torch.device(device)
        self._unet = unet
        self._text_encoder = text_encoder
        self._vae = vae
        self._tokenizer = tokenizer
        self._scale_factor = scale_factor
        self._alphas = (alphas_cumprod if alphas_cumprod is not None else sd_alphas_cumprod()).float()
        self._parameterization = parameterization
        self._use_sdp = use_sdp_attention
        self._model_info = model_info or BaseModelInfo(name="standalone")
        self._encoder = CaptionEncoder(text_encoder, tokenizer)
        self._in_session = False

    # --- session ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, options: HostOptions) -> Iterator[None]:
        if self._in_session:
            raise HostRefused("a training session is already running on this model")
        layers = self._text_encoder.config.num_hidden_layers
        if not 1 <= options.clip_skip <= layers:
            raise HostRefused(f"clip skip {options.clip_skip} is outside 1..{layers} for this text encoder")
        modules = (self._unet, self._text_encoder, self._vae)
        training_flags = [(m, m.training) for root in modules for m in root.modules()]
        self._in_session = True
        self._encoder = CaptionEncoder(
            self._text_encoder,
            self._tokenizer,
            clip_skip=options.clip_skip,
            weighted=options.weighted_captions,
        )
        try:
            with (
                frozen_parameters(*modules),
                sdp_attention(self._unet, self._use_sdp),
            ):
                for root in modules:
                    root.eval()  # no dropout in the frozen base; adapters have none either
                yield
        finally:
            for module, flag in training_flags:
                module.training = flag
            self._in_session = False

    def gradient_checkpointing(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        return gradient_checkpointing(self._unet, enabled)

    # --- model access -------------------------------------------------------------------------------
    def vae(self) -> nn.Module:
        """The VAE (not part of the host protocol: the stand-alone sampler and the tests use it)."""
        return self._vae

    def unet(self) -> nn.Module:
        return self._unet

    def text_encoder(self) -> nn.Module:
        return self._text_encoder

    def parameterization(self) -> str:
        return self._parameterization

    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas.to(self.device)

    def base_model_info(self) -> BaseModelInfo:
        return self._model_info

    def autocast(self, mixed_precision: str) -> contextlib.AbstractContextManager[None]:
        return autocast_for(self.device, mixed_precision)

    # --- compute ------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        vae_dtype = next(self._vae.parameters()).dtype
        posterior = self._vae.encode(pixels.to(self.device, vae_dtype))
        return (posterior.sample() * self._scale_factor).float()

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        return self._encoder(captions, self.device)

    def max_token_length(self) -> int | None:
        return self._encoder.max_token_length()

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        return self._unet(noisy_latents, timesteps, context=cond)


def build_random_host(
    size: str = "tiny", *, device: str = "cpu", seed: int = 0, use_sdp_attention: bool = True
) -> StandaloneHost:
    """A host over randomly initialised ldm/CLIP modules: ``"tiny"`` (tests) or ``"sd15"`` (full size).

    The layers ldm zero-initialises get random values, as a trained checkpoint would have, so the
    UNet's output and every adapter's gradient are non-zero.
    """
    from lib_lora_trainer.model import ldm_parts

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    unet, text_encoder, vae, text_shape = ldm_parts.build_model(size)
    ldm_parts.reinitialise_zero_layers(unet, generator)
    return host_over(
        unet,
        text_encoder,
        vae,
        vocab_size=text_shape.vocab_size,
        device=device,
        use_sdp_attention=use_sdp_attention,
        model_info=BaseModelInfo(name=f"random-{size}-seed{seed}"),
    )


def host_over(
    unet: nn.Module,
    text_encoder: nn.Module,
    vae: nn.Module,
    *,
    vocab_size: int,
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    **host_options: Any,
) -> StandaloneHost:
    """A :class:`StandaloneHost` over freshly built modules, moved to ``device`` (and ``dtype``) for eval."""
    for module in (unet, text_encoder, vae):
        module.to(device, dtype).eval()
    return StandaloneHost(
        unet=unet,
        text_encoder=text_encoder,
        vae=vae,
        tokenizer=HashTokenizer(vocab_size),
        device=device,
        **host_options,
    )
