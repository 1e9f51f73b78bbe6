"""Helpers for ldm's own model classes (the ones A1111 v1.10.1 loads SD1.5 into).

* builders for SD1.5-shaped models: the full size (benchmarks) and a tiny one with the same block
  layout (tests), plus a small CLIP text encoder and VAE;
* non-reentrant gradient checkpointing and scaled-dot-product attention, both as instance-level
  patches that leave the module tree and every class untouched, and undo cleanly.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

SD15_UNET_CONFIG = {
    "image_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_heads": 8,
    "use_spatial_transformer": True,
    "transformer_depth": 1,
    "context_dim": 768,
    "use_checkpoint": False,
    "legacy": False,
}

# Same blocks, attention placement and module names as SD1.5, at a size that trains on a CPU in
# seconds. GroupNorm32 needs channel counts divisible by 32, hence 32 model channels.
TINY_UNET_CONFIG = {**SD15_UNET_CONFIG, "model_channels": 32, "num_heads": 4, "context_dim": 32}

SD15_VAE_CONFIG = {
    "double_z": True,
    "z_channels": 4,
    "resolution": 256,
    "in_channels": 3,
    "out_ch": 3,
    "ch": 128,
    "ch_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_resolutions": [],
    "dropout": 0.0,
}
TINY_VAE_CONFIG = {
    **SD15_VAE_CONFIG,
    "ch": 32,
    "ch_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "resolution": 64,
}

SD15_SCALE_FACTOR = 0.18215


@dataclass(frozen=True)
class TextEncoderShape:
    hidden_size: int = 768
    layers: int = 12
    heads: int = 12
    intermediate_size: int = 3072
    vocab_size: int = 49408


SD15_TEXT_ENCODER = TextEncoderShape()
TINY_TEXT_ENCODER = TextEncoderShape(hidden_size=32, layers=4, heads=4, intermediate_size=64, vocab_size=1000)

# The architectures the stand-alone host builds: (UNet config, VAE config, text encoder shape).
MODEL_SIZES = {
    "tiny": (TINY_UNET_CONFIG, TINY_VAE_CONFIG, TINY_TEXT_ENCODER),
    "sd15": (SD15_UNET_CONFIG, SD15_VAE_CONFIG, SD15_TEXT_ENCODER),
}


def build_model(size: str) -> tuple[nn.Module, nn.Module, nn.Module, TextEncoderShape]:
    """UNet, text encoder and VAE of one of :data:`MODEL_SIZES`, freshly initialised, with the text shape."""
    if size not in MODEL_SIZES:
        raise ValueError(f"unknown model size {size!r}; use one of {sorted(MODEL_SIZES)}")
    unet_config, vae_config, text_shape = MODEL_SIZES[size]
    return build_unet(unet_config), build_text_encoder(text_shape), build_vae(vae_config), text_shape


def build_unet(config: dict) -> nn.Module:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    return UNetModel(**config)


def build_vae(ddconfig: dict) -> nn.Module:
    from ldm.models.autoencoder import AutoencoderKL

    return AutoencoderKL(ddconfig=ddconfig, lossconfig={"target": "torch.nn.Identity"}, embed_dim=4)


def build_text_encoder(shape: TextEncoderShape) -> nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads,
        max_position_embeddings=77,
        hidden_act="quick_gelu",
    )
    return CLIPTextModel(config)


def reinitialise_zero_layers(unet: nn.Module, generator: torch.Generator | None = None) -> None:
    """Give random values to the layers ldm zero-initialises (ResBlock out conv, ``proj_out``, ``out.2``).

    A freshly built UNet outputs exactly zero and passes no gradient; a real checkpoint has trained
    values there, so tests and benchmarks must not train against the all-zero version.
    """
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    zero_layers = [unet.out[-1]]
    for module in unet.modules():
        if isinstance(module, ResBlock):
            zero_layers.append(module.out_layers[-1])
        elif isinstance(module, SpatialTransformer):
            zero_layers.append(module.proj_out)
    with torch.no_grad():
        for layer in zero_layers:
            fan_in = layer.weight[0].numel()
            bound = 1.0 / math.sqrt(fan_in)
            layer.weight.uniform_(-bound, bound, generator=generator)
            if layer.bias is not None:
                layer.bias.uniform_(-bound, bound, generator=generator)


def sd_alphas_cumprod(
    steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> torch.Tensor:
    """SD1.x's "scaled linear" schedule as ldm registers it, in float64 then float32."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0).float()


# --- instance-level patches ----------------------------------------------------------------------


def _set_instance_forward(module: nn.Module, forward: types.MethodType) -> None:
    module.__dict__["forward"] = forward


def _clear_instance_forward(module: nn.Module) -> None:
    module.__dict__.pop("forward", None)


def _checkpointed_forward(self: nn.Module, *args, **kwargs):
    # Non-reentrant: adapters inside the block get gradients even when its inputs don't need grad.
    if torch.is_grad_enabled():
        return checkpoint(self._forward, *args, use_reentrant=False, **kwargs)
    return self._forward(*args, **kwargs)


def checkpointable_blocks(unet: nn.Module) -> list[nn.Module]:
    """The ldm blocks worth checkpointing: every ResBlock and BasicTransformerBlock."""
    from ldm.modules.attention import BasicTransformerBlock
    from ldm.modules.diffusionmodules.openaimodel import ResBlock

    return [m for m in unet.modules() if isinstance(m, (ResBlock, BasicTransformerBlock))]


@contextlib.contextmanager
def _instance_forwards(modules: list[nn.Module], forward) -> Iterator[None]:
    """Give each of ``modules`` ``forward`` as its own forward for the duration of the block."""
    try:
        for module in modules:
            _set_instance_forward(module, types.MethodType(forward, module))
        yield
    finally:
        for module in modules:
            _clear_instance_forward(module)


def gradient_checkpointing(unet: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Checkpoint every ResBlock and transformer block of an ldm UNet for the duration of the block."""
    return _instance_forwards(checkpointable_blocks(unet) if enabled else [], _checkpointed_forward)


def _sdp_attention_forward(self: nn.Module, x: torch.Tensor, context=None, mask=None) -> torch.Tensor:
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    batch, tokens, _ = q.shape
    heads = self.heads
    q, k, v = (t.reshape(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v)
    return self.to_out(out.transpose(1, 2).reshape(batch, tokens, -1))


def sdp_attention(unet: nn.Module, enabled: bool = True) -> contextlib.AbstractContextManager[None]:
    """Run ldm's CrossAttention through torch's scaled-dot-product attention (same maths, less memory)."""
    from ldm.modules.attention import CrossAttention

    layers = [m for m in unet.modules() if isinstance(m, CrossAttention)] if enabled else []
    return _instance_forwards(layers, _sdp_attention_forward)
