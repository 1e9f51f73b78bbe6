"""The ``ss_*`` and ``modelspec.*`` header of an epoch file, as kohya's sd-scripts (and LyCORIS) write it."""

from __future__ import annotations

import datetime
import json
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.network.names import epoch_file_name

NETWORK_MODULE = "networks.lora"
LYCORIS_NETWORK_MODULE = "lycoris.kohya"
BASE_MODEL_VERSION = "sd_v1"
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1/lora"


@dataclass
class TrainingRunInfo:
    """What a run knows beyond its :class:`TrainingConfig`: dataset, schedule and base model facts.

    The dataset dicts use kohya's shapes, keyed by folder name (e.g. ``"10_alice"``):
    ``dataset_dirs = {"10_alice": {"n_repeats": 10, "img_count": 23}}``,
    ``tag_frequency = {"10_alice": {"1girl": 23, ...}}`` (see :func:`count_tags`),
    ``bucket_info = {"buckets": {"0": {"resolution": [512, 512], "count": 23}}, "mean_img_ar_error": 0.0}``.
    """

    num_batches_per_epoch: int
    max_train_steps: int
    dataset_dirs: dict[str, dict[str, int]]
    tag_frequency: dict[str, dict[str, int]]
    bucket_info: dict[str, Any] | None = None
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    session_id: int = field(default_factory=lambda: random.randint(0, 2**32 - 1))
    training_started_at: float = field(default_factory=time.time)
    parameterization: Literal["eps", "v"] = "eps"  # the resolved one, never "auto"
    optimizer: str = ""  # e.g. "torch.optim.adamw.AdamW(weight_decay=0.01)"; "" = described from the config
    max_token_length: int | None = None  # None = 75 tokens, kohya's default
    # --- precision and caption encoding, as the run resolved them ---
    mixed_precision: str = ""  # "no", "fp16" or "bf16" as computed; "" = the config's value
    gradient_checkpointing: bool = False  # as the run used it ("auto" resolved)
    # The base model, from A1111's checkpoint info when known.
    sd_model_name: str = ""
    sd_model_hash: str = ""  # the old 8-hex "model hash"
    new_sd_model_hash: str = ""  # the full-file sha256
    vae_name: str = ""
    vae_hash: str = ""
    new_vae_hash: str = ""


def count_tags(captions: Iterable[str]) -> dict[str, int]:
    """Tag counts of one folder's captions as kohya keeps them: comma-separated, trimmed, lower-cased."""
    counts: dict[str, int] = {}
    for caption in captions:
        for tag in caption.split(","):
            tag = tag.strip().lower()
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return counts


def build_metadata(
    *,
    output_name: str,
    epoch: int,
    steps: int,
    config: TrainingConfig,
    run: TrainingRunInfo,
    finished_at: float | None = None,
    file_stem: str = "",
) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` header of one epoch's file, every value a string.

    ``ss_output_name`` is the file's stem (``name-000003``), so each epoch file has its own A1111
    alias instead of all of them colliding on ``name``.
    """
    stem = file_stem or Path(epoch_file_name(output_name, epoch)).stem
    finished = time.time() if finished_at is None else finished_at
    metadata = {
        **_session_metadata(stem, run),
        **_network_metadata(config),
        **_optimisation_metadata(config, run),
        **_loss_shaping_metadata(config),
        **_dataset_metadata(config, run),
        **_base_model_metadata(run),
        "ss_epoch": str(epoch),
        "ss_steps": str(steps),
        "ss_training_finished_at": str(finished),
        **_modelspec_metadata(stem, config, run, finished),
    }
    return metadata


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


def _optional(value: float) -> str:
    """kohya's form of an option that is off at 0: ``None`` or the number as a float."""
    return str(float(value)) if value > 0 else "None"


def _number(value: float) -> str:
    """``8`` for 8.0 and ``0.5`` for 0.5: how a user writes a network argument."""
    return str(int(value)) if float(value).is_integer() else str(value)


def _images(dirs: Mapping[str, Mapping[str, int]]) -> int:
    """Images per epoch as kohya counts them: every image once per repeat."""
    return sum(int(d.get("img_count", 0)) * int(d.get("n_repeats", 1)) for d in dirs.values())


def _session_metadata(stem: str, run: TrainingRunInfo) -> dict[str, str]:
    return {
        "ss_session_id": str(run.session_id),
        "ss_training_started_at": str(run.training_started_at),
        "ss_output_name": stem,
        "ss_v2": "False",
        "ss_base_model_version": BASE_MODEL_VERSION,
    }


def _network_metadata(config: TrainingConfig) -> dict[str, str]:
    """``ss_network_module``/``ss_network_args`` as kohya (``networks.lora``) or LyCORIS
    (``lycoris.kohya`` with ``algo``) write them; every network argument is text, as on their command line."""
    lycoris = config.network_type in ("loha", "lokr") or config.dora_wd
    convs = config.network_type == "locon" or (config.network_type in ("loha", "lokr") and config.conv_layers)
    args: dict[str, str] = {}
    if lycoris:
        algo = config.network_type if config.network_type in ("loha", "lokr") else "locon"
        args["algo"] = algo  # no "preset": the layer set is kohya's (LoCon's with the convolutions)
    if convs:
        args["conv_dim"] = _number(config.conv_dim)
        args["conv_alpha"] = _number(config.conv_alpha)
    if config.dora_wd:
        args["dora_wd"] = "True"
        args["wd_on_output"] = "False"  # dora_scale per input channel, what A1111 v1.10.1 reads
    if config.use_tucker:
        args["use_tucker"] = "True"
    if config.network_type == "lokr":
        args["factor"] = str(config.lokr_factor)
    for name in ("rank_dropout", "module_dropout"):
        if getattr(config, name) > 0:
            args[name] = str(float(getattr(config, name)))
    for name in (
        "loraplus_lr_ratio",
        "loraplus_unet_lr_ratio",
        "loraplus_text_encoder_lr_ratio",
        "block_lr_zero_threshold",
    ):
        if getattr(config, name) > 0:
            args[name] = str(float(getattr(config, name)))
    for name in (
        "down_lr_weight",
        "mid_lr_weight",
        "up_lr_weight",
        "block_dims",
        "block_alphas",
        "conv_block_dims",
        "conv_block_alphas",
    ):
        if getattr(config, name).strip():
            args[name] = getattr(config, name).strip()
    metadata = {
        "ss_network_module": LYCORIS_NETWORK_MODULE if lycoris else NETWORK_MODULE,
        "ss_network_dim": str(config.network_dim),
        "ss_network_alpha": str(float(config.network_alpha)),
        "ss_network_dropout": _optional(config.network_dropout),
    }
    if args:
        metadata["ss_network_args"] = _json(args)
    return metadata


def _optimisation_metadata(config: TrainingConfig, run: TrainingRunInfo) -> dict[str, str]:
    text_encoder_lr = config.text_encoder_lr if config.train_text_encoder else 0.0
    return {
        "ss_learning_rate": str(config.unet_lr),
        "ss_unet_lr": str(config.unet_lr),
        "ss_text_encoder_lr": str(text_encoder_lr),
        "ss_num_epochs": str(config.epochs),
        "ss_num_batches_per_epoch": str(run.num_batches_per_epoch),
        "ss_max_train_steps": str(run.max_train_steps),
        "ss_gradient_checkpointing": str(run.gradient_checkpointing),
        "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
        "ss_lr_warmup_steps": str(config.warmup_steps_for(run.max_train_steps)),
        "ss_lr_scheduler": config.lr_scheduler,
        "ss_optimizer": run.optimizer or _optimizer_description(config),
        "ss_max_grad_norm": str(config.max_grad_norm),
        "ss_mixed_precision": run.mixed_precision or config.mixed_precision,
        "ss_full_fp16": "False",
        "ss_seed": str(config.seed),
        "ss_clip_skip": str(config.clip_skip),
        "ss_max_token_length": str(run.max_token_length),
        "ss_noise_offset": str(config.noise_offset) if config.noise_offset > 0 else "None",
        "ss_min_snr_gamma": str(config.min_snr_gamma) if config.min_snr_gamma > 0 else "None",
        "ss_prior_loss_weight": str(config.prior_loss_weight),
        "ss_v_parameterization": str(run.parameterization == "v"),
        "ss_scale_weight_norms": _optional(config.scale_weight_norms),
        "ss_fp8_base": "False",
        "ss_training_comment": config.training_comment,
    }


def _loss_shaping_metadata(config: TrainingConfig) -> dict[str, str]:
    """The loss, noise, timestep and mask options as kohya's train_network.py writes them (an option that
    is off is "None")."""

    def when(value: float) -> str:
        return str(value) if value else "None"

    metadata = {
        "ss_loss_type": config.loss_type,
        "ss_huber_schedule": config.huber_schedule,
        "ss_huber_c": str(config.huber_c),
        "ss_huber_scale": str(config.huber_scale),
        "ss_noise_offset_random_strength": str(config.noise_offset_random_strength),
        "ss_adaptive_noise_scale": when(config.adaptive_noise_scale),
        "ss_multires_noise_iterations": when(config.multires_noise_iterations),
        "ss_multires_noise_discount": str(config.multires_noise_discount),
        "ss_ip_noise_gamma": when(config.ip_noise_gamma),
        "ss_ip_noise_gamma_random_strength": str(config.ip_noise_gamma_random_strength),
        "ss_min_timestep": str(config.min_timestep),
        "ss_max_timestep": str(config.max_timestep),
        "ss_zero_terminal_snr": str(config.zero_terminal_snr),
        "ss_debiased_estimation": str(config.debiased_estimation_loss),
        "ss_masked_loss": str(config.masked_loss or config.alpha_mask or config.auto_mask != "none"),
    }
    if config.lr_scheduler_args:
        metadata["ss_lr_scheduler_args"] = config.lr_scheduler_args
    return metadata


def _optimizer_description(config: TrainingConfig) -> str:
    arguments = [f"weight_decay={config.weight_decay}"]
    if config.optimizer == "Adafactor" and config.adafactor_relative_step:
        arguments.append("relative_step=True")
    return f"{config.optimizer}({','.join(arguments)})"


def _dataset_metadata(config: TrainingConfig, run: TrainingRunInfo) -> dict[str, str]:
    metadata = {
        "ss_num_train_images": str(_images(run.dataset_dirs)),
        "ss_num_reg_images": str(_images(run.reg_dataset_dirs)),
        "ss_batch_size_per_device": str(config.batch_size),
        "ss_total_batch_size": str(config.batch_size * config.gradient_accumulation_steps),
        "ss_resolution": f"({config.resolution}, {config.resolution})",
        "ss_enable_bucket": str(config.enable_bucket),
        "ss_min_bucket_reso": str(config.min_bucket_reso),
        "ss_max_bucket_reso": str(config.max_bucket_reso),
        "ss_bucket_no_upscale": str(config.bucket_no_upscale),
        "ss_cache_latents": str(config.cache_latents),
        "ss_color_aug": str(config.color_aug),
        "ss_flip_aug": str(config.flip_aug),
        "ss_random_crop": "False",
        "ss_shuffle_caption": str(config.shuffle_caption),
        "ss_keep_tokens": str(config.keep_tokens),
        "ss_caption_dropout_rate": str(config.caption_dropout_rate),
        "ss_caption_dropout_every_n_epochs": "0",
        "ss_caption_tag_dropout_rate": str(config.caption_tag_dropout_rate),
        "ss_face_crop_aug_range": "None",
        "ss_dataset_dirs": _json(run.dataset_dirs),
        "ss_reg_dataset_dirs": _json(run.reg_dataset_dirs),
        "ss_tag_frequency": _json(run.tag_frequency),
    }
    if run.bucket_info is not None:
        metadata["ss_bucket_info"] = _json(run.bucket_info)
    return metadata


def _base_model_metadata(run: TrainingRunInfo) -> dict[str, str]:
    known = {
        "ss_sd_model_name": run.sd_model_name,
        "ss_sd_model_hash": run.sd_model_hash,
        "ss_new_sd_model_hash": run.new_sd_model_hash,
        "ss_vae_name": run.vae_name,
        "ss_vae_hash": run.vae_hash,
        "ss_new_vae_hash": run.new_vae_hash,
    }
    return {key: value for key, value in known.items() if value}


def _modelspec_metadata(
    stem: str, config: TrainingConfig, run: TrainingRunInfo, finished: float
) -> dict[str, str]:
    metadata = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": MODELSPEC_ARCHITECTURE,
        "modelspec.implementation": "diffusers",
        "modelspec.title": stem,
        "modelspec.resolution": f"{config.resolution}x{config.resolution}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(finished)).isoformat(),
        "modelspec.prediction_type": "v" if run.parameterization == "v" else "epsilon",
        "modelspec.encoder_layer": str(config.clip_skip),
    }
    if config.trigger_word.strip():
        metadata["modelspec.trigger_phrase"] = config.trigger_word.strip()
    if config.training_comment.strip():
        metadata["modelspec.description"] = config.training_comment.strip()
    return metadata
