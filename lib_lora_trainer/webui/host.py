"""The A1111 v1.10.1 host: trains on ``shared.sd_model`` as it is loaded, and gives it back unchanged.

Preparing the live model is a list of steps, each undone in reverse order when the session ends,
whatever the exit: clear LoRAs the built-in Lora extension merged into the weights, unload
hypernetworks, freeze every parameter, switch to scaled-dot-product attention, checkpoint the UNet
blocks (non-reentrant) when asked. Captions are encoded by our own encoder over A1111's tokenizer and
CLIP (literal unless weighted captions are on, clip skip from the run's settings), so nothing is
written into the WebUI's settings. The checks that can refuse (--lowvram, fp8 weights, a
custom UNet, a non-SD1 model) all run before the first change.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from lib_lora_trainer.model.host import (
    BaseModelInfo,
    HostOptions,
    HostRefused,
    autocast_for,
    frozen_parameters,
)
from lib_lora_trainer.model.ldm_parts import gradient_checkpointing
from lib_lora_trainer.model.text_encoding import COMMA_PADDING_BACKTRACK, CaptionEncoder, ClipTokenizerView
from lib_lora_trainer.webui.model_guard import model_changes_refused

log = logging.getLogger(__name__)

SDP_OPTIMIZATION_NAME = "sdp"


def _modules():
    from modules import devices, processing, sd_hijack, sd_unet, shared

    return shared, devices, sd_hijack, sd_unet, processing


class A1111Host:
    """:class:`~lib_lora_trainer.model.host.TrainingHost` over A1111's ``shared.sd_model``."""

    def __init__(self) -> None:
        _, devices, *_ = _modules()
        self.device = torch.device(devices.device)
        self._encoder: CaptionEncoder | None = None

    # --- model access -------------------------------------------------------------------------------
    @staticmethod
    def _model():
        shared, *_ = _modules()
        model = shared.sd_model
        if model is None:
            raise HostRefused("No Stable Diffusion checkpoint is loaded; load an SD1.5 checkpoint first.")
        return model

    def unet(self) -> nn.Module:
        return self._model().model.diffusion_model

    def text_encoder(self) -> nn.Module:
        return self._model().cond_stage_model.wrapped.transformer

    def parameterization(self) -> str:
        return getattr(self._model(), "parameterization", "eps")

    def alphas_cumprod(self) -> torch.Tensor:
        model = self._model()
        # A1111 may replace alphas_cumprod for sampling (fp16 downcast, zero terminal SNR);
        # alphas_cumprod_original keeps the checkpoint's fp32 schedule.
        schedule = getattr(model, "alphas_cumprod_original", None)
        if schedule is None:
            schedule = model.alphas_cumprod
        return schedule.detach().to(self.device, torch.float32)

    def base_model_info(self) -> BaseModelInfo:
        info = getattr(self._model(), "sd_checkpoint_info", None)
        if info is None:
            return BaseModelInfo()
        return BaseModelInfo(
            name=getattr(info, "model_name", "") or getattr(info, "name", ""),
            hash_legacy=getattr(info, "hash", "") or "",
            hash_sha256=getattr(info, "sha256", "") or "",
            vae_name=_loaded_vae_name(),
        )

    # --- compute ------------------------------------------------------------------------------------
    def autocast(self, mixed_precision: str) -> contextlib.AbstractContextManager[None]:
        # ``mixed_precision`` is resolved against the weights' dtype (training/precision.py): "no" only
        # ever comes with fp32 weights, so this is the whole autocast of a step.
        return autocast_for(self.device, mixed_precision)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        _, devices, *_ = _modules()
        model = self._model()
        with devices.autocast():
            posterior = model.encode_first_stage(pixels.to(devices.device, devices.dtype_vae))
            return model.get_first_stage_encoding(posterior).float()

    def encode_text(self, captions: Sequence[str]) -> torch.Tensor:
        # Our encoder over A1111's tokenizer and CLIP (model/text_encoding.py); no no_grad inside, so
        # text-encoder adapters get gradients.
        if self._encoder is None:
            self._encoder = caption_encoder(self._model().cond_stage_model, clip_skip=1, weighted=False)
        return self._encoder(captions, self.device)

    def max_token_length(self) -> int | None:
        return self._encoder.max_token_length() if self._encoder is not None else None

    def predict(
        self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor
    ) -> torch.Tensor:
        # The UNet itself, under the run's autocast: A1111's apply_model wrapper would open its own
        # devices.autocast() inside (fp16 on CUDA whatever was resolved; on MPS a manual cast that
        # converts the adapters' fp32 weights to fp16 and back at every call).
        return self._model().model.diffusion_model(noisy_latents, timesteps, context=cond)

    def gradient_checkpointing(self, enabled: bool) -> contextlib.AbstractContextManager[None]:
        return gradient_checkpointing(self._model().model.diffusion_model, enabled)

    # --- session ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def session(self, options: HostOptions) -> Iterator[None]:
        shared, devices, sd_hijack, sd_unet, processing = _modules()
        model = self._model()
        self._refuse_unsupported(model, options)
        with contextlib.ExitStack() as undo:
            undo.callback(_reset_conditioning_cache, processing)
            undo.callback(devices.torch_gc)
            undo.enter_context(model_changes_refused())  # no reload, unload or swap of the model meanwhile
            clear_merged_loras(model)
            undo.enter_context(_without_hypernetworks(shared))
            undo.enter_context(frozen_parameters(model))
            undo.enter_context(_kept_training_flags(model))
            undo.enter_context(_sdp_attention(sd_hijack))
            undo.enter_context(self._caption_encoding(model, options))
            yield

    @contextlib.contextmanager
    def _caption_encoding(self, model, options: HostOptions) -> Iterator[None]:
        self._encoder = caption_encoder(
            model.cond_stage_model, clip_skip=options.clip_skip, weighted=options.weighted_captions
        )
        try:
            yield
        finally:
            self._encoder = None

    @staticmethod
    def _refuse_unsupported(model, options: HostOptions) -> None:
        shared, devices, _, sd_unet, _ = _modules()
        if getattr(shared.cmd_opts, "lowvram", False):
            raise HostRefused(
                "Training is not possible with --lowvram: A1111 then moves the model to the GPU piece by "
                "piece. Restart the WebUI without --lowvram (--medvram works for UNet-only training)."
            )
        if getattr(model, "lowvram", False) and options.train_text_encoder:
            raise HostRefused(
                "With --medvram, train the UNet only (switch off text-encoder training), or restart the "
                "WebUI without --medvram."
            )
        if getattr(devices, "fp8", False):
            raise HostRefused(
                "The model's weights are stored in FP8 (Settings > Optimizations > FP8 weight); "
                "switch that off and reload the checkpoint to train."
            )
        if getattr(sd_unet, "current_unet", None) is not None:
            raise HostRefused(
                "A custom UNet (e.g. TensorRT) is active in Settings > SD Unet; set it to None to train."
            )
        if not getattr(model, "is_sd1", True) or getattr(model, "is_sdxl", False):
            raise HostRefused("The loaded checkpoint is not Stable Diffusion 1.x; load an SD1.5 checkpoint.")
        if getattr(model.model, "conditioning_key", "crossattn") != "crossattn":
            raise HostRefused(
                "Inpainting and other special checkpoints cannot be trained; load a plain SD1.5 model."
            )


def _loaded_vae_name() -> str:
    try:
        from modules import sd_vae
    except ImportError:
        return ""
    return str(getattr(sd_vae, "loaded_vae_file", None) or "")


@torch.no_grad()  # restoring a backup is an in-place write to a leaf that may require grad
def clear_merged_loras(model: nn.Module) -> None:
    """Put back the original weights wherever the Lora extension merged a LoRA, and forget the LoRAs.

    A1111 merges active LoRAs into the base weights in place and keeps CPU backups; ``loaded_networks``
    stays set after a generation, so a LoRA used in the last prompt is still inside the weights.
    """
    networks = sys.modules.get("networks")
    if networks is None:
        return
    loaded = getattr(networks, "loaded_networks", None)
    if loaded:
        log.info("clearing %d LoRA(s) merged into the model before training", len(loaded))
        loaded.clear()
    for module in model.modules():
        if (
            getattr(module, "network_weights_backup", None) is not None
            or getattr(module, "network_bias_backup", None) is not None
        ):
            networks.network_restore_weights_from_backup(module)
        if hasattr(module, "network_current_names"):
            networks.network_reset_cached_weight(module)


@contextlib.contextmanager
def _without_hypernetworks(shared) -> Iterator[None]:
    saved = list(getattr(shared, "loaded_hypernetworks", []) or [])
    shared.loaded_hypernetworks = []
    try:
        yield
    finally:
        shared.loaded_hypernetworks = saved


@contextlib.contextmanager
def _kept_training_flags(model: nn.Module) -> Iterator[None]:
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


@contextlib.contextmanager
def _sdp_attention(sd_hijack) -> Iterator[None]:
    """Train with A1111's scaled-dot-product attention (it supports backward), then restore the
    user's cross-attention choice."""
    optimizers = getattr(sd_hijack, "optimizers", [])
    candidates = [o for o in optimizers if o.name == SDP_OPTIMIZATION_NAME and o.is_available()]
    if not candidates:
        log.info("scaled-dot-product attention is not available here; training with the current attention")
        yield
        return
    sd_hijack.model_hijack.apply_optimizations(candidates[0].title())
    try:
        yield
    finally:
        sd_hijack.model_hijack.apply_optimizations()


def caption_encoder(cond_stage_model, *, clip_skip: int, weighted: bool) -> CaptionEncoder:
    """Our :class:`CaptionEncoder` over A1111's SD1 ``FrozenCLIPEmbedderWithCustomWords``: its tokenizer,
    chunk tokens and comma backtrack; weighted captions through A1111's own parser and emphasis setting."""
    from modules import shared

    opts = shared.opts
    wrapped = cond_stage_model.wrapped
    tokenizer = ClipTokenizerView(wrapped.tokenizer, getattr(cond_stage_model, "comma_token", None))
    tokenizer.bos_token_id = getattr(cond_stage_model, "id_start", tokenizer.bos_token_id)
    tokenizer.eos_token_id = getattr(cond_stage_model, "id_end", tokenizer.eos_token_id)
    backtrack = getattr(opts, "comma_padding_backtrack", COMMA_PADDING_BACKTRACK)
    hijack = getattr(cond_stage_model, "hijack", None)

    def clear_embedding_fixes() -> None:
        # A1111's token embedding splices textual-inversion vectors at hijack.fixes; captions are literal.
        if hijack is not None:
            hijack.fixes = None

    options = {}
    if weighted:
        from modules import prompt_parser, sd_emphasis

        emphasis_name = getattr(opts, "emphasis", "Original")

        def parse(text: str) -> list[tuple[str, float]]:
            if emphasis_name == "None":  # A1111 then reads a prompt as plain text
                return [(text, 1.0)]
            return [(piece, weight) for piece, weight in prompt_parser.parse_prompt_attention(text)]

        def emphasis(z: torch.Tensor, multipliers: torch.Tensor, tokens: list[list[int]]) -> torch.Tensor:
            method = sd_emphasis.get_current_option(emphasis_name)()
            method.tokens, method.multipliers, method.z = tokens, multipliers, z
            method.after_transformers()
            return method.z

        options = {"parse": parse, "emphasis": emphasis}
    return CaptionEncoder(
        wrapped.transformer,
        tokenizer,
        clip_skip=clip_skip,
        weighted=weighted,
        backtrack=backtrack,
        before_chunk=clear_embedding_fixes,
        **options,
    )


def _reset_conditioning_cache(processing) -> None:
    # The prompt cache is keyed by prompt and checkpoint, not by in-memory text-encoder weights.
    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
