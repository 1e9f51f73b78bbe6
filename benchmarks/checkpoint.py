"""Load an SD1.x ``.safetensors`` checkpoint (the single-file layout A1111 loads) into a standalone host.

The file's prefixes map onto the modules the project trains on: ``model.diffusion_model.*`` onto ldm's
``UNetModel``, ``first_stage_model.*`` onto ldm's ``AutoencoderKL`` and ``cond_stage_model.transformer.*``
onto transformers' ``CLIPTextModel``. No tokenizer is loaded: for timing, the hash tokenizer produces
the same tensor shapes as CLIP's.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from lib_lora_trainer.model import ldm_parts
from lib_lora_trainer.model.host import BaseModelInfo
from lib_lora_trainer.model.standalone import StandaloneHost, host_over

log = logging.getLogger(__name__)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model.transformer."
OPEN_CLIP_PREFIX = "cond_stage_model.model."  # SD2.x: OpenCLIP, not supported here
# Keys the file may carry that the modules do not need (training-only loss weights, a position_ids
# buffer some checkpoints store with wrong values).
IGNORED_SUFFIXES = ("embeddings.position_ids",)
IGNORED_PREFIXES = ("loss.",)

SIZES = ldm_parts.MODEL_SIZES


class CheckpointError(ValueError):
    """The file is not an SD1.x checkpoint this loader can use; the message says why."""


def split_checkpoint(state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The file's tensors grouped by component, with the component prefix removed."""
    if any(key.startswith(OPEN_CLIP_PREFIX) for key in state):
        raise CheckpointError("this is an SD2.x checkpoint (OpenCLIP text encoder); only SD1.x is supported")
    parts: dict[str, dict[str, torch.Tensor]] = {"unet": {}, "vae": {}, "text_encoder": {}}
    for key, tensor in state.items():
        if key.startswith(UNET_PREFIX):
            parts["unet"][key[len(UNET_PREFIX) :]] = tensor
        elif key.startswith(VAE_PREFIX):
            parts["vae"][key[len(VAE_PREFIX) :]] = tensor
        elif key.startswith(TEXT_ENCODER_PREFIX):
            name = key[len(TEXT_ENCODER_PREFIX) :]
            # Older transformers saved CLIPTextModel without the "text_model." level.
            parts["text_encoder"][name if name.startswith("text_model.") else f"text_model.{name}"] = tensor
    missing = [name for name, tensors in parts.items() if not tensors]
    if missing:
        raise CheckpointError(
            f"the file has no {', '.join(missing)} weights; expected an SD1.x single-file checkpoint "
            f"(keys starting with {UNET_PREFIX!r}, {VAE_PREFIX!r}, {TEXT_ENCODER_PREFIX!r})"
        )
    return parts


def _load_into(module: nn.Module, tensors: dict[str, torch.Tensor], component: str) -> None:
    wanted = {
        key: value
        for key, value in tensors.items()
        if not key.endswith(IGNORED_SUFFIXES) and not key.startswith(IGNORED_PREFIXES)
    }
    try:
        result = module.load_state_dict(wanted, strict=False)
    except RuntimeError as error:  # a tensor of the wrong shape
        first = str(error).splitlines()[1:2] or [str(error)]
        raise CheckpointError(
            f"the {component} weights do not fit SD1.5's architecture: {first[0].strip()}"
        ) from error
    missing = [key for key in result.missing_keys if not key.endswith(IGNORED_SUFFIXES)]
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"the {component} weights do not fit SD1.5's architecture: "
            f"{len(missing)} missing (e.g. {missing[:3]}), "
            f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:3]})"
        )


def load_checkpoint_host(
    path: str | Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    size: str = "sd15",
    use_sdp_attention: bool = True,
) -> StandaloneHost:
    """A :class:`StandaloneHost` over the checkpoint's UNet, VAE and text encoder, in ``dtype`` on ``device``.

    ``size`` picks the architecture the weights must fit ("sd15"; "tiny" for tests).
    """
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"checkpoint {path.name} must be a .safetensors file")
    if size not in SIZES:
        raise CheckpointError(f"unknown architecture size {size!r}; use one of {sorted(SIZES)}")
    state = load_file(str(path), device="cpu")
    parts = split_checkpoint(state)
    unet, text_encoder, vae, text_shape = ldm_parts.build_model(size)
    _load_into(unet, parts["unet"], "UNet")
    _load_into(vae, parts["vae"], "VAE")
    _load_into(text_encoder, parts["text_encoder"], "text encoder")
    alphas = state.get("alphas_cumprod")
    log.info("loaded %s (%d tensors) onto %s as %s", path.name, len(state), device, dtype)
    return host_over(
        unet,
        text_encoder,
        vae,
        vocab_size=text_shape.vocab_size,
        device=device,
        dtype=dtype,
        alphas_cumprod=alphas.float() if alphas is not None else None,
        use_sdp_attention=use_sdp_attention,
        model_info=BaseModelInfo(name=path.stem),
    )
