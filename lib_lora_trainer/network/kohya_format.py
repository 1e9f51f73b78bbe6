"""kohya-format LoRA files: the tensors, the ``ss_*``/``modelspec.*`` metadata, the hashes, the names.

A file holds, for every adapted module (key stem from :mod:`.kohya_names`):
``<stem>.lora_down.weight`` ``[r, in]`` or ``[r, in, kh, kw]``, ``<stem>.lora_up.weight`` ``[out, r]`` or
``[out, r, 1, 1]`` and a 0-dim ``<stem>.alpha``; the module adds ``up @ down * alpha / r`` to the
layer's weight. All tensors share the save precision, as in sd-scripts. ``sshs_model_hash`` and
``sshs_legacy_hash`` are computed as sd-scripts does (only ``ss_*`` keys take part), so A1111 reads the
hash from the header instead of hashing the file.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import safetensors
import safetensors.torch
import torch

from lib_lora_trainer.config import TrainingConfig, output_name_problem
from lib_lora_trainer.files import atomic_write_bytes
from lib_lora_trainer.network.kohya_names import kohya_name, module_name_from_kohya

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "bf16", "fp32"]
SAVE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

DOWN_SUFFIX = "lora_down.weight"
UP_SUFFIX = "lora_up.weight"
ALPHA_SUFFIX = "alpha"
# peft-style names that kohya-format readers (A1111 included) also accept.
_SUFFIX_ALIASES = {"lora_A.weight": DOWN_SUFFIX, "lora_B.weight": UP_SUFFIX}
# Parts of other network types A1111 knows, so such a file gets a message that names its type.
_OTHER_NETWORK_PARTS = (
    (("hada_",), "LoHa"),
    (("lokr_",), "LoKr"),
    (("oft_",), "OFT"),
    (("lora_mid.",), "LoCon with a Tucker (lora_mid) layer"),
    (("dora_scale",), "DoRA"),
    (("diff",), "full weight difference"),
    (("w_norm", "b_norm"), "norm"),
    (("a1.", "a2.", "b1.", "b2."), "GLoRA"),
    (("weight", "on_input"), "IA3"),
)

NETWORK_MODULE = "networks.lora"
BASE_MODEL_VERSION = "sd_v1"
MODELSPEC_ARCHITECTURE = "stable-diffusion-v1/lora"
LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000

_Function = TypeVar("_Function", bound=Callable[..., Any])


def _log_refusals(function: _Function) -> _Function:
    """Log every refusal (bad file, bad input, existing file) before the caller sees the exception."""

    @functools.wraps(function)
    def logged(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (ValueError, TypeError, OSError) as error:
            logger.warning("%s: %s", function.__name__, error)
            raise

    return logged  # type: ignore[return-value]


@dataclass
class LoraModuleWeights:
    """One adapted module in kohya orientation: the layer gains ``up @ down * alpha / rank``."""

    down: torch.Tensor  # [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


# --------------------------------------------------------------------------------------------
# names
# --------------------------------------------------------------------------------------------


def epoch_file_name(output_name: str, epoch: int) -> str:
    """``name-000001.safetensors``: sd-scripts' epoch name, used for every epoch, the last one too."""
    problem = output_name_problem(output_name)
    if problem:
        raise ValueError(problem)
    if epoch < 1:
        raise ValueError(f"epochs are counted from 1, got {epoch}")
    return f"{output_name}-{epoch:06d}.safetensors"


# --------------------------------------------------------------------------------------------
# merge (kohya's math, written without peft so it can check peft)
# --------------------------------------------------------------------------------------------


def lora_delta_weight(module: LoraModuleWeights) -> torch.Tensor:
    """``up @ down * alpha / rank`` in float32, shaped like the adapted layer's weight."""
    down = module.down.float()
    up = module.up.float()
    if down.ndim == 2:
        delta = up @ down
    else:  # conv: a kh x kw down conv followed by a 1x1 up conv
        delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
    return delta * module.scale


def merge_into_weight(
    weight: torch.Tensor, module: LoraModuleWeights, multiplier: float = 1.0
) -> torch.Tensor:
    """A new weight tensor equal to ``weight + multiplier * up @ down * alpha / rank`` (Linear, 1x1, 3x3)."""
    _check_module_shapes("module", module)
    delta = lora_delta_weight(module)
    if delta.shape != weight.shape:
        raise ValueError(
            f"LoRA of shape up {tuple(module.up.shape)} / down {tuple(module.down.shape)} does not fit "
            f"a weight of shape {tuple(weight.shape)}"
        )
    return (weight.float() + multiplier * delta.to(weight.device)).to(weight.dtype)


# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


@_log_refusals
def save_kohya_lora(
    path: str | Path,
    modules: Mapping[str, LoraModuleWeights],
    metadata: Mapping[str, str],
    precision: Precision,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``modules`` (keyed by kohya stem) as a kohya LoRA file, atomically; returns the path.

    Every tensor, alpha included, is cast to ``precision``. ``sshs_model_hash``/``sshs_legacy_hash`` are
    added to ``metadata``. An existing file is refused with FileExistsError unless ``overwrite``.
    """
    target = Path(path)
    if target.suffix != ".safetensors":
        raise ValueError(f"a LoRA file name must end in .safetensors, got {target.name!r}")
    if precision not in SAVE_DTYPES:
        raise ValueError(f"save precision must be one of {', '.join(SAVE_DTYPES)}, got {precision!r}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another output name or allow overwriting it")
    tensors = kohya_state_dict(modules, SAVE_DTYPES[precision])
    header = _checked_metadata(metadata)
    model_hash, legacy_hash = safetensors_hashes(tensors, header)
    header["sshs_model_hash"] = model_hash
    header["sshs_legacy_hash"] = legacy_hash
    atomic_write_bytes(target, safetensors.torch.save(tensors, metadata=header))
    logger.info("Saved %d LoRA modules to %s (%s)", len(modules), target, precision)
    return target


def kohya_state_dict(modules: Mapping[str, LoraModuleWeights], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The file's tensors: down, up and a 0-dim alpha per module, all in ``dtype``, on the CPU."""
    if not modules:
        raise ValueError("there are no LoRA modules to save")
    tensors: dict[str, torch.Tensor] = {}
    for stem, module in modules.items():
        _check_stem(stem)
        _check_module_shapes(stem, module)
        tensors[f"{stem}.{DOWN_SUFFIX}"] = _to_file_tensor(module.down, dtype)
        tensors[f"{stem}.{UP_SUFFIX}"] = _to_file_tensor(module.up, dtype)
        tensors[f"{stem}.{ALPHA_SUFFIX}"] = torch.tensor(float(module.alpha), dtype=dtype)
    return tensors


def _to_file_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


def _check_stem(stem: str) -> None:
    component, module_name = module_name_from_kohya(stem)
    if kohya_name(component, module_name) != stem:
        expected = kohya_name(component, module_name)
        raise ValueError(f"{stem!r} is not in kohya's naming; save it as {expected!r}")


def _checked_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise TypeError(f"metadata values must be text; these are not: {', '.join(map(str, bad))}")
    return dict(metadata)


def safetensors_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as sd-scripts computes them.

    The file is serialised with only the ``ss_*`` metadata; the model hash is the sha256 of everything
    after the header (what A1111 calls the addnet hash), the legacy hash the first 8 hex digits of the
    sha256 of the 64 KiB at offset 1 MiB.
    """
    training_metadata = {key: value for key, value in metadata.items() if key.startswith("ss_")}
    data = safetensors.torch.save(dict(tensors), metadata=training_metadata)
    header_length = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header_length :]).hexdigest()
    legacy_block = data[LEGACY_HASH_OFFSET : LEGACY_HASH_OFFSET + LEGACY_HASH_LENGTH]
    return model_hash, hashlib.sha256(legacy_block).hexdigest()[:8]


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


@_log_refusals
def load_kohya_lora(
    path: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, LoraModuleWeights], dict[str, str]]:
    """Read a kohya LoRA/LoCon file: ``({stem: weights}, metadata)``, tensors as ``dtype`` on the CPU.

    Stems are returned as written in the file (map them with ``module_name_from_kohya``). peft-style
    ``lora_A``/``lora_B`` names are accepted; a missing alpha means alpha = rank (scale 1.0, as A1111
    uses). Anything that is not a LoRA gets a ValueError that says what is wrong.
    """
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"LoRA file {source} does not exist")
    if source.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{source.name}: only .safetensors LoRA files can be loaded "
            "(.pt/.ckpt files can run code when they are read)"
        )
    try:
        with safetensors.safe_open(str(source), framework="pt", device="cpu") as reader:
            metadata = dict(reader.metadata() or {})
            keys = reader.keys()
            parts = _group_by_stem(source.name, {key: reader.get_tensor(key) for key in keys})
    except safetensors.SafetensorError as error:
        raise ValueError(f"{source.name} is not a readable safetensors file ({error})") from error
    modules = {stem: _module_from_parts(source.name, stem, tensors, dtype) for stem, tensors in parts.items()}
    logger.info("Loaded %d LoRA modules from %s", len(modules), source)
    return modules, metadata


def _group_by_stem(file_name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        if stem == "bundle_emb":
            logger.warning("%s: skipping the embedding bundled in the LoRA file (%s)", file_name, key)
            continue
        part = _SUFFIX_ALIASES.get(part, part)
        if part in (DOWN_SUFFIX, UP_SUFFIX, ALPHA_SUFFIX):
            groups.setdefault(stem, {})[part] = tensor
            continue
        other = _other_network_type(stem, part)
        if other:
            raise ValueError(f"{file_name} is a {other} network ({key}); only LoRA/LoCon files can be loaded")
        unknown.append(key)
    if unknown:
        raise ValueError(
            f"{file_name} is not a kohya-format LoRA: keys like {', '.join(unknown[:3])} are not "
            "'<name>.lora_down.weight', '<name>.lora_up.weight' or '<name>.alpha' (a checkpoint, an "
            "embedding or a diffusers-format LoRA?)"
        )
    if not any(DOWN_SUFFIX in parts for parts in groups.values()):
        raise ValueError(f"{file_name} holds no LoRA weights (no '<name>.lora_down.weight' keys)")
    return groups


def _other_network_type(stem: str, part: str) -> str | None:
    if not stem.startswith(("lora_", "oft_")):
        return None
    return next((kind for prefixes, kind in _OTHER_NETWORK_PARTS if part.startswith(prefixes)), None)


def _module_from_parts(
    file_name: str, stem: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> LoraModuleWeights:
    missing = [part for part in (DOWN_SUFFIX, UP_SUFFIX) if part not in parts]
    if missing:
        raise ValueError(
            f"{file_name}: module {stem!r} has no {' or '.join(missing)}; the file is incomplete"
        )
    down = parts[DOWN_SUFFIX].to(dtype)
    up = parts[UP_SUFFIX].to(dtype)
    rank = int(down.shape[0]) if down.ndim else 0
    if ALPHA_SUFFIX in parts:
        alpha_tensor = parts[ALPHA_SUFFIX]
        if alpha_tensor.numel() != 1:
            raise ValueError(f"{file_name}: alpha of {stem!r} must be a single number")
        alpha = float(alpha_tensor.float().item())
    else:
        logger.info("%s: %s has no alpha; using alpha = rank (scale 1.0, as A1111 does)", file_name, stem)
        alpha = float(rank)
    module = LoraModuleWeights(down=down, up=up, alpha=alpha)
    _check_module_shapes(f"{file_name}: {stem!r}", module)
    return module


def _check_module_shapes(label: str, module: LoraModuleWeights) -> None:
    down, up = module.down, module.up
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise ValueError(
            f"{label}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} must both be 2-D "
            "(Linear) or both 4-D (Conv2d)"
        )
    if up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise ValueError(
            f"{label}: rank mismatch, lora_down {tuple(down.shape)} has {down.shape[0]} rows but lora_up "
            f"{tuple(up.shape)} has {up.shape[1]} columns"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ValueError(f"{label}: lora_up of a conv must be 1x1, got {tuple(up.shape)}")
    if not math.isfinite(module.alpha):
        raise ValueError(f"{label}: alpha must be a finite number, got {module.alpha}")


# --------------------------------------------------------------------------------------------
# metadata
# --------------------------------------------------------------------------------------------


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
) -> dict[str, str]:
    """The ``ss_*`` and ``modelspec.*`` header of one epoch's file, every value a string.

    ``ss_output_name`` is the file's stem (``name-000003``), so each epoch file has its own A1111
    alias instead of all of them colliding on ``name``.
    """
    stem = Path(epoch_file_name(output_name, epoch)).stem
    finished = time.time() if finished_at is None else finished_at
    metadata = {
        **_session_metadata(stem, run),
        **_network_metadata(config),
        **_optimisation_metadata(config, run),
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
    metadata = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": str(config.network_dim),
        "ss_network_alpha": str(float(config.network_alpha)),
        "ss_network_dropout": "None",
    }
    if config.network_type == "locon":
        metadata["ss_network_args"] = _json(
            {"conv_dim": _number(config.conv_dim), "conv_alpha": _number(config.conv_alpha)}
        )
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
        "ss_zero_terminal_snr": "False",
        "ss_multires_noise_iterations": "None",
        "ss_adaptive_noise_scale": "None",
        "ss_scale_weight_norms": "None",
        "ss_ip_noise_gamma": "None",
        "ss_debiased_estimation": "False",
        "ss_loss_type": "l2",
        "ss_fp8_base": "False",
        "ss_training_comment": config.training_comment,
    }


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
