"""The training configuration: one flat, JSON-friendly record with the options kohya users know.

Every value is checked by :func:`validate` before anything touches the model, so a bad value never
leaves the WebUI half-prepared. Field names follow sd-scripts where one exists (``network_dim``,
``lr_warmup_steps``, ``min_snr_gamma`` ...), so a kohya user recognises them and a kohya_ss JSON maps
onto them without guesswork.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
)
NETWORK_TYPES = ("lora", "locon")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
DATASET_LAYOUTS = ("flat", "kohya")
PARAMETERIZATIONS = ("auto", "eps", "v")
GRADIENT_CHECKPOINTING = ("auto", "on", "off")
EVALUATION_SCORERS = ("auto", "face", "character")

# What A1111's Lora folder scan and every file system accept without surprises.
OUTPUT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")


class ConfigError(ValueError):
    """One or more configuration values are unusable; ``messages`` has one line per problem."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("Training settings need fixing:\n- " + "\n- ".join(self.messages))


@dataclass
class TrainingConfig:
    # --- what is produced ---------------------------------------------------------------------
    output_name: str = "my_character"
    output_dir: str = ""  # the WebUI's Lora folder (or a subfolder of it) in the tab
    save_precision: str = "fp16"
    save_every_n_epochs: int = 1
    training_comment: str = ""

    # --- dataset --------------------------------------------------------------------------------
    train_data_dir: str = ""
    dataset_layout: str = "flat"  # "flat": one folder, `flat_repeats`; "kohya": N_name subfolders
    flat_repeats: int = 10
    reg_data_dir: str = ""
    prior_loss_weight: float = 1.0
    caption_extension: str = ".txt"
    trigger_word: str = ""
    class_token: str = ""
    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    max_bucket_reso: int = 1024
    bucket_no_upscale: bool = False
    crop_mode: str = "center"  # "center" or "face"
    shuffle_caption: bool = False
    keep_tokens: int = 1
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0
    flip_aug: bool = False
    color_aug: bool = False
    cache_latents: bool = True
    cache_latents_to_disk: bool = False

    # --- network --------------------------------------------------------------------------------
    network_type: str = "lora"  # "lora": attention + feed-forward; "locon": also ResBlock convs
    network_dim: int = 32
    network_alpha: float = 16.0
    conv_dim: int = 8
    conv_alpha: float = 4.0
    train_text_encoder: bool = True
    network_weights: str = ""  # continue from a saved kohya LoRA file

    # --- optimisation ---------------------------------------------------------------------------
    unet_lr: float = 2e-4
    text_encoder_lr: float = 1e-4
    optimizer: str = "AdamW"
    weight_decay: float = 0.01
    adafactor_relative_step: bool = False
    lr_scheduler: str = "cosine_with_restarts"
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    lr_warmup_steps: float = 0  # an integer count, or a fraction (< 1) of the total steps
    epochs: int = 10
    batch_size: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0

    # --- loss and noise -------------------------------------------------------------------------
    min_snr_gamma: float = 0.0  # 0 = off; 5 is the paper's value
    noise_offset: float = 0.0
    parameterization: str = "auto"  # "auto" takes the loaded model's own (eps for SD1.5)
    clip_skip: int = 1

    # --- precision and memory ---------------------------------------------------------------
    mixed_precision: str = "fp16"
    gradient_checkpointing: str = "auto"  # "auto": on only when memory needs it; "on"; "off"
    seed: int = 1234

    # --- epoch scoring and validation loss ------------------------------------------------------
    evaluate_epochs: bool = True  # score every saved epoch after training (when the scorers are there)
    evaluation_scorer: str = "auto"  # likeness: "auto" (faces in most images -> face), "face", "character"
    evaluation_near_prompts: list[str] = field(default_factory=list)  # empty: trigger + class, 3 framings
    evaluation_far_prompts: list[str] = field(default_factory=list)  # empty: astronaut, pencil, kimono
    evaluation_seeds: int = 3
    evaluation_steps: int = 20
    evaluation_size: int = 0  # 0 = the training resolution
    validation_loss: bool = True  # a deterministic loss after every epoch, beside the training loss
    validation_dir: str = ""  # held-out images (with captions); empty: a fixed subset of the training images

    # --- samples --------------------------------------------------------------------------------
    sample_every_n_epochs: int = 1
    sample_prompts: list[str] = field(default_factory=list)
    sample_negative_prompt: str = "lowres, bad anatomy, blurry"
    sample_steps: int = 20
    sample_sampler: str = "Euler a"
    sample_cfg_scale: float = 7.0
    sample_seed: int = 42
    sample_width: int = 0  # 0 = the training resolution
    sample_height: int = 0

    # --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainingConfig:
        """Build a config from a dict, refusing unknown keys (a typo must not be silently ignored)."""
        known = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError([f"unknown setting {name!r}" for name in unknown])
        problems: list[str] = []
        kwargs: dict[str, Any] = {}
        for name, value in values.items():
            if name == "gradient_checkpointing" and isinstance(value, bool):
                value = "on" if value else "off"  # configs saved before "auto" existed
            try:
                kwargs[name] = _coerce(value, known[name])
            except (TypeError, ValueError):
                problems.append(f"{name}: {value!r} is not a valid {_type_name(known[name])}")
        if problems:
            raise ConfigError(problems)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainingConfig:
        try:
            data = json.loads(Path(path).read_text(encoding="utf-8-sig"))
        except FileNotFoundError as error:
            raise ConfigError([f"config file {path} does not exist"]) from error
        except json.JSONDecodeError as error:
            raise ConfigError([f"config file {path} is not valid JSON: {error}"]) from error
        if not isinstance(data, dict):
            raise ConfigError([f"config file {path} must hold a JSON object"])
        return cls.from_dict(data)

    def save_json(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    def warmup_steps_for(self, total_steps: int) -> int:
        if 0 < self.lr_warmup_steps < 1:
            return int(round(self.lr_warmup_steps * total_steps))
        return int(self.lr_warmup_steps)


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("list[str]", "list of text")


def _coerce(value: Any, f: dataclasses.Field) -> Any:
    kind = str(f.type)
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.strip().lower() in ("true", "1", "yes")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ValueError(value)
    if kind == "int":
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    if kind == "float":
        if isinstance(value, bool):
            raise TypeError(value)
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise TypeError(value)
        return value
    if kind == "list[str]":
        if isinstance(value, str):
            return [line for line in value.splitlines() if line.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError(value)
        return list(value)
    return value


def output_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be used as a LoRA file stem, or None when it can."""
    if not name:
        return "output name is empty"
    if "/" in name or "\\" in name:
        return f"output name {name!r} must not contain a folder separator"
    if ".." in name:
        return f"output name {name!r} must not contain '..'"
    if not OUTPUT_NAME_PATTERN.match(name):
        return f"output name {name!r} may only use letters, digits, '_', '.' and '-'"
    if name.startswith("."):
        return f"output name {name!r} must not start with '.' (hidden files)"
    return None


def validate(config: TrainingConfig, *, need_dataset: bool = True) -> list[str]:
    """Every problem with ``config`` as a sentence a user understands; empty when it is usable."""
    problems: list[str] = []

    def check(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    name_problem = output_name_problem(config.output_name)
    if name_problem:
        problems.append(name_problem)
    check(config.save_precision in SAVE_PRECISIONS, f"save precision must be one of {SAVE_PRECISIONS}")
    check(config.save_every_n_epochs >= 1, "save every N epochs must be at least 1")

    if need_dataset:
        check(bool(config.train_data_dir.strip()), "choose a training image folder")
    check(config.dataset_layout in DATASET_LAYOUTS, f"dataset layout must be one of {DATASET_LAYOUTS}")
    check(config.flat_repeats >= 1, "repeats must be at least 1")
    check(config.prior_loss_weight >= 0, "prior loss weight must not be negative")
    check(config.caption_extension.startswith("."), "caption extension must start with '.', like .txt")
    check(
        config.resolution >= 64 and config.resolution % 64 == 0,
        f"resolution {config.resolution} must be a positive multiple of 64 (512 or 768 for SD1.5)",
    )
    check(
        config.min_bucket_reso % 64 == 0 and config.max_bucket_reso % 64 == 0,
        "bucket minimum and maximum must be multiples of 64",
    )
    check(
        0 < config.min_bucket_reso <= config.resolution <= config.max_bucket_reso,
        "bucket range must contain the resolution (min <= resolution <= max)",
    )
    check(config.crop_mode in ("center", "face"), "crop mode must be 'center' or 'face'")
    check(config.keep_tokens >= 0, "keep tokens must not be negative")
    check(0 <= config.caption_dropout_rate < 1, "caption dropout must be in [0, 1)")
    check(0 <= config.caption_tag_dropout_rate < 1, "tag dropout must be in [0, 1)")

    check(config.network_type in NETWORK_TYPES, f"network type must be one of {NETWORK_TYPES}")
    check(config.network_dim >= 1, f"rank (network dim) must be at least 1, got {config.network_dim}")
    check(config.network_alpha > 0, "network alpha must be greater than 0")
    if config.network_type == "locon":
        check(config.conv_dim >= 1, f"conv rank must be at least 1, got {config.conv_dim}")
        check(config.conv_alpha > 0, "conv alpha must be greater than 0")

    check(config.unet_lr >= 0, f"UNet learning rate must not be negative, got {config.unet_lr}")
    check(
        config.text_encoder_lr >= 0,
        f"text encoder learning rate must not be negative, got {config.text_encoder_lr}",
    )
    check(
        config.unet_lr > 0
        or (config.train_text_encoder and config.text_encoder_lr > 0)
        or (config.optimizer in ("Adafactor",) and config.adafactor_relative_step),
        "at least one learning rate must be greater than 0",
    )
    check(
        config.optimizer in OPTIMIZERS,
        f"unknown optimizer {config.optimizer!r}; choose one of {', '.join(OPTIMIZERS)}",
    )
    check(config.weight_decay >= 0, "weight decay must not be negative")
    check(
        config.lr_scheduler in LR_SCHEDULERS,
        f"unknown LR scheduler {config.lr_scheduler!r}; choose one of {', '.join(LR_SCHEDULERS)}",
    )
    check(config.lr_scheduler_num_cycles >= 1, "scheduler cycles must be at least 1")
    check(config.lr_scheduler_power > 0, "scheduler power must be greater than 0")
    check(config.lr_warmup_steps >= 0, "warmup steps must not be negative")
    check(
        config.lr_warmup_steps < 1 or float(config.lr_warmup_steps).is_integer(),
        "warmup steps must be a whole number of steps, or a fraction below 1 of all steps",
    )
    check(config.epochs >= 1, "epochs must be at least 1")
    check(config.batch_size >= 1, "batch size must be at least 1")
    check(config.gradient_accumulation_steps >= 1, "gradient accumulation steps must be at least 1")
    check(config.max_grad_norm >= 0, "max grad norm must not be negative (0 turns clipping off)")

    check(config.min_snr_gamma >= 0, "min-SNR gamma must not be negative (0 turns it off)")
    check(config.noise_offset >= 0, "noise offset must not be negative")
    check(
        config.parameterization in PARAMETERIZATIONS, f"parameterization must be one of {PARAMETERIZATIONS}"
    )
    check(
        config.gradient_checkpointing in GRADIENT_CHECKPOINTING,
        f"gradient checkpointing must be one of {GRADIENT_CHECKPOINTING}",
    )
    check(1 <= config.clip_skip <= 12, "clip skip must be between 1 and 12")
    check(
        config.mixed_precision in MIXED_PRECISIONS,
        f"mixed precision must be one of {MIXED_PRECISIONS}",
    )
    check(config.sample_every_n_epochs >= 0, "sample every N epochs must not be negative (0 = never)")
    check(config.sample_steps >= 1, "sample steps must be at least 1")
    for side in ("sample_width", "sample_height"):
        value = getattr(config, side)
        check(value == 0 or (value >= 64 and value % 8 == 0), f"{side} must be 0 or a multiple of 8")
    # --- epoch scoring and validation loss
    check(
        config.evaluation_scorer in EVALUATION_SCORERS,
        f"likeness scorer must be one of {EVALUATION_SCORERS}",
    )
    check(1 <= config.evaluation_seeds <= 16, "evaluation seeds must be between 1 and 16")
    check(config.evaluation_steps >= 1, "evaluation steps must be at least 1")
    check(
        config.evaluation_size == 0 or (config.evaluation_size >= 64 and config.evaluation_size % 8 == 0),
        "evaluation size must be 0 (the training resolution) or a multiple of 8 from 64",
    )
    return problems


def validate_for_dataset(config: TrainingConfig, image_count: int) -> list[str]:
    """Problems that only show once the dataset is known (it may be empty, or smaller than a batch)."""
    if image_count == 0:
        return ["the dataset has no usable images"]
    if config.batch_size > image_count:
        return [
            f"batch size {config.batch_size} is larger than the dataset ({image_count} images); "
            f"lower the batch size to {image_count} or fewer"
        ]
    return []


def ensure_valid(config: TrainingConfig, *, need_dataset: bool = True) -> TrainingConfig:
    problems = validate(config, need_dataset=need_dataset)
    if problems:
        raise ConfigError(problems)
    return config
