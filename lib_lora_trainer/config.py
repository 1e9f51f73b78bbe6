"""The training configuration: one flat, JSON-friendly record with the options kohya users know.

Every value is checked by :func:`validate` before anything touches the model, so a bad value never
leaves the WebUI half-prepared. Field names follow sd-scripts where one exists (``network_dim``,
``lr_warmup_steps``, ``min_snr_gamma`` ...), so a kohya user recognises them and a kohya_ss JSON maps
onto them without guesswork.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_lora_trainer.file_types import caption_extension_problem
from lib_lora_trainer.files import atomic_write_text, read_text_file

OPTIMIZERS = (
    "AdamW",
    "AdamW8bit",
    "Adafactor",
    "Prodigy",
    "PagedAdamW8bit",
    "Lion8bit",
    "Lion",
    "AdamWScheduleFree",
)
LR_SCHEDULERS = (
    "constant",
    "constant_with_warmup",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "cosine_with_min_lr",
    "warmup_stable_decay",
    "piecewise_constant",
)
LOSS_TYPES = ("l2", "l1", "huber", "smooth_l1")
HUBER_SCHEDULES = ("constant", "exponential", "snr")
AUTO_MASKS = ("none", "face")  # "face": a soft head-and-shoulders region around the detected face
# Prodigy estimates the step size itself; its learning rate is a multiplier on that estimate (about 1).
PRODIGY_LR_RANGE = (0.1, 10.0)
SCHEDULE_FREE_OPTIMIZERS = ("AdamWScheduleFree",)
NETWORK_TYPES = ("lora", "locon", "loha", "lokr")
MIXED_PRECISIONS = ("auto", "no", "fp16", "bf16")  # auto: per device, see training/precision.py
SAVE_PRECISIONS = ("fp16", "bf16", "fp32")
DATASET_LAYOUTS = ("flat", "kohya")
PARAMETERIZATIONS = ("auto", "eps", "v")
GRADIENT_CHECKPOINTING = ("auto", "on", "off")
EVALUATION_SCORERS = ("auto", "face", "character")

# What A1111's Lora folder scan and every file system accept without surprises.
OUTPUT_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
# A file name may have 255 bytes; the longest we derive from the name is NAME-step00000500 (13) plus
# .lora_trainer_config.json (25), so 200 leaves room for both and some to spare.
MAX_OUTPUT_NAME_LENGTH = 200


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
    mixed_precision: str = "auto"  # per device and loaded weights (training/precision.py)
    gradient_checkpointing: str = "auto"  # "auto": on only when memory needs it; "on"; "off"
    seed: int = 1234

    # --- resume and saving by steps ---------------------------------------------------------------
    max_train_steps: int = 0  # > 0: the run's length in optimizer steps (the epochs setting is then ignored)
    save_every_n_steps: int = 0  # > 0: also save NAME-step00000500.safetensors every N steps
    save_last_n_epochs: int = 0  # > 0: keep only the last N epoch files this run wrote
    save_last_n_steps: int = 0  # > 0: keep only the step files of the last N steps this run wrote
    save_state_every_n_steps: int = 0  # training state for Resume; 0 = about every 5 minutes of work
    save_last_n_states: int = 2  # training states kept (the newest ones)
    # --- loss shaping, masks, optimizer and schedule options (kohya's names) -------------------
    loss_type: str = "l2"  # l2, l1, huber, smooth_l1
    huber_schedule: str = "snr"  # constant, exponential, snr (how huber_c changes over timesteps)
    huber_c: float = 0.1
    huber_scale: float = 1.0
    debiased_estimation_loss: bool = False
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float = 0.0  # 0 = off; needs noise_offset
    multires_noise_iterations: int = 0  # 0 = off; 6-10 usual
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0  # 0 = off; 0.1 usual
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int = 1000  # exclusive
    zero_terminal_snr: bool = False  # needs v-prediction
    masked_loss: bool = False  # mask images: NAME.mask.png beside the picture, or conditioning_data_dir
    alpha_mask: bool = False  # the picture's own alpha channel is the mask
    conditioning_data_dir: str = ""  # kohya's folder of mask images named like the pictures
    auto_mask: str = "none"  # "face": images without a mask get one around the detected face
    optimizer_args: str = ""  # kohya style: "betas=0.9,0.99 eps=1e-8"
    prodigy_d_coef: float = 1.0
    prodigy_safeguard_warmup: bool = False
    prodigy_use_bias_correction: bool = False
    lr_scheduler_args: str = ""  # e.g. "min_lr_rate=0.1" (cosine_with_min_lr)
    # --- network kinds, dropout, LoRA+, block weights, max norm (networks) -------------------------
    dora_wd: bool = False  # DoRA (LyCORIS' dora_wd): LoRA/LoCon with weight decomposition
    conv_layers: bool = False  # LoHa/LoKr: also the convolutions (LoCon's layer set)
    use_tucker: bool = False  # LoHa/LoKr: Tucker (CP) form for 3x3 convolutions
    lokr_factor: int = -1  # LoKr Kronecker factor; -1 = near the square root
    network_dropout: float = 0.0  # kohya: dropout on the down projection's output
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    loraplus_lr_ratio: float = 0.0  # 0 = off; the up (B) matrices get the LR times this
    loraplus_unet_lr_ratio: float = 0.0  # 0 = loraplus_lr_ratio
    loraplus_text_encoder_lr_ratio: float = 0.0  # 0 = loraplus_lr_ratio
    down_lr_weight: str = ""  # 12 weights (IN00-IN11) or a preset (sine, cosine, linear, ...)
    mid_lr_weight: str = ""
    up_lr_weight: str = ""  # 12 weights (OUT00-OUT11) or a preset
    block_lr_zero_threshold: float = 0.0  # blocks whose LR weight is at or below this are not trained
    block_dims: str = ""  # 25 ranks (IN00-IN11, MID, OUT00-OUT11); "" = network_dim everywhere
    block_alphas: str = ""
    conv_block_dims: str = ""
    conv_block_alphas: str = ""
    scale_weight_norms: float = 0.0  # 0 = off; kohya's max-norm regularisation
    # --- caption encoding (precision helper) ---------------------------------------------------
    # Off: captions are trained as plain text, brackets and all (kohya's default); on: (tag:1.2), [tag]
    # and BREAK are read as A1111 reads them in a prompt (kohya's --weighted_captions).
    weighted_captions: bool = False
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
    # 0 = off; else the share of each training folder's images kept out of training for the validation
    # loss (the same images every run: dataset/held_out.py); not together with validation_dir
    validation_share: float = 0.0

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
            except NotFinite:
                problems.append(f"{name}: {value!r} is not a number; enter a finite number")
            except (TypeError, ValueError, OverflowError):
                problems.append(f"{name}: {value!r} is not a valid {_type_name(known[name])}")
        if problems:
            raise ConfigError(problems)
        return cls(**kwargs)

    @classmethod
    def from_json_file(cls, path: str | Path) -> TrainingConfig:
        try:
            text = read_text_file(path)
        except FileNotFoundError as error:
            raise ConfigError([f"config file {path} does not exist"]) from error
        except IsADirectoryError as error:
            raise ConfigError([str(error)]) from error
        except OSError as error:
            raise ConfigError([f"config file {path} cannot be read ({error.strerror or error})"]) from error
        except ValueError as error:  # not text (read_text_file says which encoding to use)
            raise ConfigError([f"config file {error}"]) from error
        try:
            data = json.loads(text)
        except ValueError as error:  # JSONDecodeError, or an integer of more than 4300 digits
            raise ConfigError([f"config file {path} is not valid JSON: {error}"]) from error
        if not isinstance(data, dict):
            raise ConfigError([f"config file {path} must hold a JSON object"])
        return cls.from_dict(data)

    def save_json(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    def warmup_steps_for(self, total_steps: int) -> int:
        if 0 < self.lr_warmup_steps < 1:
            return int(round(self.lr_warmup_steps * total_steps))
        return int(self.lr_warmup_steps)


def _type_name(f: dataclasses.Field) -> str:
    return str(f.type).replace("list[str]", "list of text")


class NotFinite(ValueError):
    """NaN or infinity where a number is expected."""


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
        if isinstance(value, int):
            return value  # float() of a huge int overflows; validate bounds it
        number = float(value)
        if not math.isfinite(number):
            raise NotFinite(value)
        if not number.is_integer():
            raise ValueError(value)
        return int(number)
    if kind == "float":
        if isinstance(value, bool):
            raise TypeError(value)
        number = float(value)
        if not math.isfinite(number):
            raise NotFinite(value)
        return number
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
    if len(name) > MAX_OUTPUT_NAME_LENGTH:
        return (
            f"output name is {len(name)} characters long; use at most {MAX_OUTPUT_NAME_LENGTH} (the epoch "
            "number and file extensions are added to it)"
        )
    if "/" in name or "\\" in name:
        return f"output name {name!r} must not contain a folder separator"
    if ".." in name:
        return f"output name {name!r} must not contain '..'"
    if not OUTPUT_NAME_PATTERN.match(name):
        return f"output name {name!r} may only use letters, digits, '_', '.' and '-'"
    if name.startswith("."):
        return f"output name {name!r} must not start with '.' (hidden files)"
    return None


def parse_arguments(text: str) -> dict[str, Any]:
    """kohya's ``optimizer_args``/``lr_scheduler_args``: ``key=value`` items separated by spaces; a value
    is a Python literal (``0.9,0.99`` is a tuple, ``True``/``true`` a bool) or else text. Raises
    ValueError with a sentence for an item that is not ``key=value``."""
    import ast

    parsed: dict[str, Any] = {}
    for item in text.replace("\n", " ").split():
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier() or not raw:
            raise ValueError(f"{item!r} is not key=value (e.g. weight_decay=0.1 betas=0.9,0.99)")
        if key in parsed:
            raise ValueError(f"{key} is given twice")
        lowered = raw.lower()
        if lowered in ("true", "false"):
            parsed[key] = lowered == "true"
            continue
        try:
            parsed[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            parsed[key] = raw
    return parsed


def validate(config: TrainingConfig, *, need_dataset: bool = True) -> list[str]:
    """Every problem with ``config`` as a sentence a user understands; empty when it is usable."""
    problems, config = _value_problems(config)

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
    # the caption extension is checked in _value_problems (it must never name an image)
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
    # --- resume and saving by steps ---
    for name in ("max_train_steps", "save_every_n_steps", "save_last_n_epochs", "save_last_n_steps"):
        check(getattr(config, name) >= 0, f"{name} must not be negative (0 = off)")
    check(config.save_state_every_n_steps >= 0, "save state every N steps must not be negative (0 = auto)")
    check(config.save_last_n_states >= 1, "keep at least 1 training state (save_last_n_states)")
    problems += _loss_and_optimizer_problems(config)
    # --- network kinds, dropout, LoRA+, block weights, max norm (networks) ---
    problems += network_option_problems(config)
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
    problems += _held_out_share_problems(config)
    return problems


MAX_VALIDATION_SHARE = 0.5


def _held_out_share_problems(config: TrainingConfig) -> list[str]:
    share = config.validation_share
    if share == 0:
        return []
    if not 0 < share <= MAX_VALIDATION_SHARE:
        return [
            f"held-out share (validation_share) must be between 0 (off) and {MAX_VALIDATION_SHARE:g}, "
            f"not {share:g}: it is the part of the training images kept out of training"
        ]
    if config.validation_dir.strip():
        return [
            "held-out share (validation_share) and held-out images folder (validation_dir) cannot both "
            "be used: set the share to 0 to use the folder, or empty the folder to hold out a share of "
            "the training images"
        ]
    if not config.validation_loss:
        return [
            "a held-out share (validation_share) only serves the validation loss: switch on Validation "
            "loss, or set the share to 0 to train on every image"
        ]
    return []


def _loss_and_optimizer_problems(config: TrainingConfig) -> list[str]:
    """Loss shaping, masks, and every optimizer x schedule pair the form offers (refused here, before the
    model is touched, when it cannot run)."""
    problems: list[str] = []

    def check(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    check(config.loss_type in LOSS_TYPES, f"loss type must be one of {', '.join(LOSS_TYPES)}")
    check(
        config.huber_schedule in HUBER_SCHEDULES,
        f"Huber schedule must be one of {', '.join(HUBER_SCHEDULES)}",
    )
    check(config.huber_c > 0, "huber_c must be greater than 0 (0.1 is usual)")
    if config.huber_schedule in ("exponential", "snr"):
        check(config.huber_c <= 1, f"huber_c must be at most 1 with the {config.huber_schedule} schedule")
    check(config.huber_scale > 0, "huber_scale must be greater than 0 (1 is usual)")
    check(
        config.adaptive_noise_scale == 0 or config.noise_offset > 0,
        "adaptive noise scale needs a noise offset; set a noise offset (e.g. 0.05) or adaptive scale 0",
    )
    check(config.multires_noise_iterations >= 0, "multires noise iterations must not be negative (0 = off)")
    check(0 < config.multires_noise_discount <= 1, "multires noise discount must be in (0, 1] (0.3 is usual)")
    check(config.ip_noise_gamma >= 0, "ip noise gamma must not be negative (0 = off, 0.1 is usual)")
    check(
        0 <= config.min_timestep < config.max_timestep <= 1000,
        f"timesteps must satisfy 0 <= min_timestep < max_timestep <= 1000, got {config.min_timestep} and "
        f"{config.max_timestep}",
    )
    check(
        not config.zero_terminal_snr or config.parameterization == "v",
        "zero terminal SNR needs v-prediction (the last step is pure noise, which an eps model cannot "
        "learn from); set Prediction type to v or switch zero terminal SNR off",
    )
    check(config.auto_mask in AUTO_MASKS, f"automatic mask must be one of {', '.join(AUTO_MASKS)}")

    for field_name, label in (
        ("optimizer_args", "optimizer arguments"),
        ("lr_scheduler_args", "scheduler arguments"),
    ):
        try:
            parse_arguments(getattr(config, field_name))
        except ValueError as error:
            problems.append(f"{label}: {error}")
    check(config.prodigy_d_coef > 0, "Prodigy d_coef must be greater than 0 (1 is usual)")

    warmup = config.lr_warmup_steps > 0
    check(
        not (config.lr_scheduler == "constant" and warmup),
        "the constant schedule has no warmup (kohya refuses it too); choose constant_with_warmup, or set "
        "warmup steps to 0",
    )
    relative = config.optimizer == "Adafactor" and config.adafactor_relative_step
    check(
        not relative or (config.lr_scheduler == "constant" and not warmup),
        "Adafactor's relative step sets its own learning rate over time; choose the constant schedule with "
        "no warmup, or switch relative step off",
    )
    if config.optimizer in SCHEDULE_FREE_OPTIMIZERS:
        check(
            config.lr_scheduler in ("constant", "constant_with_warmup"),
            f"{config.optimizer} replaces the schedule (its own warmup is the warmup steps); choose "
            "constant or constant_with_warmup",
        )
    if config.optimizer == "Prodigy":
        low, high = PRODIGY_LR_RANGE
        rates = [("UNet", config.unet_lr)]
        if config.train_text_encoder:
            rates.append(("text encoder", config.text_encoder_lr))
        for name, rate in rates:
            check(
                rate == 0 or low <= rate <= high,
                f"Prodigy finds the step size itself and its {name} learning rate is a multiplier on it: "
                f"set it to about 1.0 (between {low} and {high}), not {rate}",
            )
        nonzero = {rate for _, rate in rates if rate}
        check(
            len(nonzero) <= 1,
            "Prodigy needs the same learning rate for the UNet and the text encoder (or 0 for one of them); "
            "set both to 1.0",
        )
    return problems


# --- value bounds: numbers finite and within sane limits, text that fits in the file's metadata ---
# Upper limits, far above any useful value, so a typo (or a huge number from an imported JSON) is
# refused here instead of overflowing later. An int field not listed is bounded by DEFAULT_INT_LIMIT.
DEFAULT_INT_LIMIT = 2**31 - 1
MAX_SEED = 2**32 - 1  # what numpy, torch's generators and A1111's seeds all accept
INT_LIMITS: dict[str, tuple[int, int]] = {
    "seed": (0, MAX_SEED),
    "sample_seed": (-1, MAX_SEED),  # -1: a random seed per sample
    "flat_repeats": (-DEFAULT_INT_LIMIT, 10_000),
    "epochs": (-DEFAULT_INT_LIMIT, 10_000),
    "save_every_n_epochs": (-DEFAULT_INT_LIMIT, 10_000),
    "sample_every_n_epochs": (-DEFAULT_INT_LIMIT, 10_000),
    "batch_size": (-DEFAULT_INT_LIMIT, 1024),
    "gradient_accumulation_steps": (-DEFAULT_INT_LIMIT, 1024),
    "network_dim": (-DEFAULT_INT_LIMIT, 4096),
    "conv_dim": (-DEFAULT_INT_LIMIT, 4096),
    "resolution": (-DEFAULT_INT_LIMIT, 8192),
    "min_bucket_reso": (-DEFAULT_INT_LIMIT, 8192),
    "max_bucket_reso": (-DEFAULT_INT_LIMIT, 8192),
    "keep_tokens": (-DEFAULT_INT_LIMIT, 1000),
    "lr_scheduler_num_cycles": (-DEFAULT_INT_LIMIT, 10_000),
    "sample_steps": (-DEFAULT_INT_LIMIT, 1000),
    "sample_width": (-DEFAULT_INT_LIMIT, 8192),
    "sample_height": (-DEFAULT_INT_LIMIT, 8192),
}
FLOAT_LIMITS: dict[str, float] = {"lr_warmup_steps": 1e9}
# Text that ends up in every epoch file's metadata (safetensors refuses a header over 100 MB) or in
# prompts: 64 KiB each is far more than any comment or prompt needs.
MAX_TEXT_BYTES = 64 * 1024
MAX_PATH_BYTES = 4096
PATH_FIELDS = (
    "output_dir",
    "train_data_dir",
    "reg_data_dir",
    "network_weights",
    "conditioning_data_dir",
    "validation_dir",
)


def _value_problems(config: TrainingConfig) -> tuple[list[str], TrainingConfig]:
    """Problems of values that are not usable at all (NaN, infinity, out of range, too long), and
    ``config`` with those fields set back to their defaults, so that the other checks neither repeat
    them in misleading words ("nan must not be negative") nor fail on them."""
    problems: list[str] = []
    defaults: dict[str, Any] = {}
    for f in dataclasses.fields(config):
        problem = field_value_problem(f.name, getattr(config, f.name))
        if problem:
            problems.append(problem)
            defaults[f.name] = (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            )
    return problems, dataclasses.replace(config, **defaults) if defaults else config


def field_value_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is not usable at all for the field ``name`` (see :func:`_value_problems`)."""
    label = name.replace("_", " ")
    if name == "caption_extension" and isinstance(value, str):
        return caption_extension_problem(value)
    if isinstance(value, bool):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return f"{label} must be a finite number, not {value}"
    if isinstance(value, int):
        low, high = INT_LIMITS.get(name, (-DEFAULT_INT_LIMIT, DEFAULT_INT_LIMIT))
        shown = value if len(str(value)) <= 20 else f"a {len(str(value))}-digit number"
        if name in ("seed", "sample_seed") and not low <= value <= high:
            return f"{label} must be between {low} and {high}, not {shown}"
        if value > high:
            return f"{label} must be at most {high}, not {shown}"
        if value < low:
            return f"{label} {shown} is far out of range"
    if isinstance(value, float) and abs(value) > FLOAT_LIMITS.get(name, math.inf):
        return f"{label} must be at most {FLOAT_LIMITS[name]:g}, not {value:g}"
    texts = value if isinstance(value, list) else [value] if isinstance(value, str) else []
    if texts:
        size = sum(len(text.encode("utf-8", "surrogatepass")) for text in texts if isinstance(text, str))
        limit = MAX_PATH_BYTES if name in PATH_FIELDS else MAX_TEXT_BYTES
        if size > limit:
            return (
                f"{label} is {size // 1024} KiB long; at most {limit // 1024} KiB are kept "
                "(it is stored in every epoch file); shorten it"
            )
    return None


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


def network_option_problems(config: TrainingConfig) -> list[str]:
    """The checks of the network kinds, dropouts, LoRA+, block weights and max norm."""
    from lib_lora_trainer.network.blocks import block_lr_weights, block_values

    problems: list[str] = []

    def check(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    lycoris = config.network_type in ("loha", "lokr")
    check(
        not (config.dora_wd and lycoris),
        "DoRA (dora_wd) works with network type lora or locon; peft has no DoRA for LoHa or LoKr",
    )
    check(
        not (config.use_tucker and not lycoris),
        "Tucker (use_tucker) is for LoHa and LoKr; peft's LoRA/LoCon has no Tucker layer",
    )
    if lycoris and config.conv_layers:
        check(config.conv_dim >= 1, f"conv rank must be at least 1, got {config.conv_dim}")
        check(config.conv_alpha > 0, "conv alpha must be greater than 0")
    check(
        config.lokr_factor == -1 or config.lokr_factor >= 1,
        f"LoKr factor must be -1 (automatic) or at least 1, got {config.lokr_factor}",
    )
    for name in ("network_dropout", "rank_dropout", "module_dropout"):
        value = getattr(config, name)
        check(0 <= value < 1, f"{name} must be at least 0 and below 1 (0 = off), got {value}")
    check(
        not (lycoris and config.network_dropout > 0),
        "network_dropout (kohya's neuron dropout) is for LoRA/LoCon/DoRA; LoHa and LoKr take rank and "
        "module dropout",
    )
    for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        value = getattr(config, name)
        check(value >= 0 and value == value, f"{name} must not be negative (0 = off), got {value}")
    check(config.block_lr_zero_threshold >= 0, "block_lr_zero_threshold must not be negative")
    try:
        block_lr_weights(config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight)
    except ValueError as error:
        problems.append(str(error))
    for name, integer in (
        ("block_dims", True),
        ("block_alphas", False),
        ("conv_block_dims", True),
        ("conv_block_alphas", False),
    ):
        try:
            block_values(getattr(config, name), name, integer=integer)
        except ValueError as error:
            problems.append(str(error))
    check(
        config.scale_weight_norms >= 0 and config.scale_weight_norms == config.scale_weight_norms,
        "scale_weight_norms must not be negative (0 = off; kohya suggests 1)",
    )
    return problems
