"""Import a bmaltais/kohya_ss GUI LoRA config (its saved JSON) into a :class:`TrainingConfig`.

The GUI's JSON is flat (about 190 keys in current versions, fewer in old files). Old files are
migrated first the way the GUI itself does when it opens them (``update_my_data``): numbers stored as
strings, ``use_8bit_adam``, ``lora_network_weights``, ``LoRA_type: LoCon``, boolean ``xformers``.
Every key then ends up in exactly one place of the :class:`KohyaImport` report:

* ``applied``: set in the config (our field and value, with the kohya key it came from);
* ``unsupported``: a setting that changes training but has no equivalent here, with the reason;
* ``ignored``: a key with no effect here (off/empty, for other model families, or handled by the WebUI);
* ``problems``: a value that could not be read or is not usable at all (NaN, infinity, out of range):
  the config keeps its previous value, and nothing derived from that value is applied either;
* ``to_fix``: a value applied as given that our checks refuse; training is refused until it is changed.

Nothing is dropped silently. The reverse direction (writing a kohya_ss JSON) is not provided.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_lora_trainer.config import (
    HUBER_SCHEDULES,
    LOSS_TYPES,
    LR_SCHEDULERS,
    OPTIMIZERS,
    ConfigError,
    TrainingConfig,
    field_value_problem,
    output_name_problem,
    validate,
)
from lib_lora_trainer.files import read_text_file
from lib_lora_trainer.sd_scripts_keys import LYCORIS_PRESETS_WITH_CONVS

logger = logging.getLogger(__name__)

_NETWORK_TYPES = {
    "Standard": "lora",
    "Kohya LoCon": "locon",
    "LyCORIS/LoCon": "locon",
    "LyCORIS/LoHa": "loha",
    "LyCORIS/LoKr": "lokr",
}

_SAVE_PRECISIONS = {"float": "fp32", "fp32": "fp32", "fp16": "fp16", "bf16": "bf16"}

# sd-scripts sample sampler names -> A1111 sampler names
_SAMPLERS = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "k_lms": "LMS",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
    "dpmsolver": "DPM++ 2M",
    "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ 2M",
}

_SIMPLE_FIELDS: dict[str, tuple[str, str]] = {
    # kohya key: (our field, kind)
    "training_comment": ("training_comment", "str"),
    "reg_data_dir": ("reg_data_dir", "str"),
    "prior_loss_weight": ("prior_loss_weight", "float"),
    "caption_extension": ("caption_extension", "str"),
    "enable_bucket": ("enable_bucket", "bool"),
    "min_bucket_reso": ("min_bucket_reso", "int"),
    "max_bucket_reso": ("max_bucket_reso", "int"),
    "bucket_no_upscale": ("bucket_no_upscale", "bool"),
    "shuffle_caption": ("shuffle_caption", "bool"),
    "keep_tokens": ("keep_tokens", "int"),
    "caption_dropout_rate": ("caption_dropout_rate", "float"),
    "caption_tag_dropout_rate": ("caption_tag_dropout_rate", "float"),
    "flip_aug": ("flip_aug", "bool"),
    "color_aug": ("color_aug", "bool"),
    "cache_latents": ("cache_latents", "bool"),
    "cache_latents_to_disk": ("cache_latents_to_disk", "bool"),
    "network_dim": ("network_dim", "int"),
    "network_alpha": ("network_alpha", "float"),
    "conv_dim": ("conv_dim", "int"),
    "conv_alpha": ("conv_alpha", "float"),
    "network_weights": ("network_weights", "str"),
    "lr_scheduler_power": ("lr_scheduler_power", "float"),
    "train_batch_size": ("batch_size", "int"),
    "gradient_accumulation_steps": ("gradient_accumulation_steps", "int"),
    "max_grad_norm": ("max_grad_norm", "float"),
    "min_snr_gamma": ("min_snr_gamma", "float"),
    "clip_skip": ("clip_skip", "int"),
    "gradient_checkpointing": ("gradient_checkpointing", "checkpointing"),
    "sample_every_n_epochs": ("sample_every_n_epochs", "int"),
    # --- caption encoding (precision helper) ---
    "weighted_captions": ("weighted_captions", "bool"),
}

# kohya_ss GUI key: (our field, kind) for the network kinds, dropouts, LoRA+, block weights, max norm.
_NETWORK_OPTION_FIELDS: dict[str, tuple[str, str]] = {
    "dora_wd": ("dora_wd", "bool"),
    "use_tucker": ("use_tucker", "bool"),
    "use_cp": ("use_tucker", "bool"),  # LyCORIS' older name
    "factor": ("lokr_factor", "int"),
    "network_dropout": ("network_dropout", "float"),
    "rank_dropout": ("rank_dropout", "float"),
    "module_dropout": ("module_dropout", "float"),
    "loraplus_lr_ratio": ("loraplus_lr_ratio", "float"),
    "loraplus_unet_lr_ratio": ("loraplus_unet_lr_ratio", "float"),
    "loraplus_text_encoder_lr_ratio": ("loraplus_text_encoder_lr_ratio", "float"),
    "down_lr_weight": ("down_lr_weight", "str"),
    "mid_lr_weight": ("mid_lr_weight", "str"),
    "up_lr_weight": ("up_lr_weight", "str"),
    "block_lr_zero_threshold": ("block_lr_zero_threshold", "float"),
    "block_dims": ("block_dims", "str"),
    "block_alphas": ("block_alphas", "str"),
    "conv_block_dims": ("conv_block_dims", "str"),
    "conv_block_alphas": ("conv_block_alphas", "str"),
    "scale_weight_norms": ("scale_weight_norms", "float"),
}

_AT_LEAST_ONE = ("clip_skip", "gradient_accumulation_steps", "batch_size")

_UNSUPPORTED_REASONS: dict[str, str] = {
    "sample_every_n_steps": "samples are made every N epochs here (sample_every_n_epochs)",
    "resume": "a kohya state folder cannot be read; resume a run of this trainer from its Results section",
    "stop_text_encoder_training": "the text encoder trains for the whole run (kohya_ss ignores it as well)",
    "random_crop": "images are cropped once, when the dataset is prepared",
    "caption_dropout_every_n_epochs": "only caption_dropout_rate is supported",
    "conv_dims": "per-block conv ranks are read from conv_block_dims",
    "conv_alphas": "per-block conv alphas are read from conv_block_alphas",
    "dim_from_weights": "set the rank to the rank of the network_weights file yourself",
    "additional_parameters": "raw sd-scripts arguments cannot be applied",
}

_IGNORED_WITH_REASON: dict[str, str] = {
    # --- caption encoding (precision helper) ---
    "max_token_length": "captions are never cut here: every 75 tokens are one chunk, as A1111 reads a prompt",
    **dict.fromkeys(
        (
            "pretrained_model_name_or_path",
            "model_list",
        ),
        "training uses the checkpoint loaded in the WebUI; load that model there before training",
    ),
    "output_dir": "epochs are saved in the WebUI's Lora folder",
    "save_model_as": "epochs are always saved as .safetensors",
    **dict.fromkeys(
        ("xformers", "sdpa", "mem_eff_attn"),
        "the WebUI's own cross-attention optimisation is used",
    ),
    **dict.fromkeys(
        (
            "gpu_ids",
            "multi_gpu",
            "num_machines",
            "num_processes",
            "num_cpu_threads_per_process",
            "main_process_port",
            "extra_accelerate_launch_args",
            "dynamo_backend",
            "dynamo_mode",
            "dynamo_use_dynamic",
            "dynamo_use_fullgraph",
            "max_data_loader_n_workers",
            "persistent_data_loader_workers",
            "vae_batch_size",
            "lowram",
            "lowvram",
            "highvram",
            "mem_eff_save",
            "disable_mmap_load_safetensors",
            "skip_cache_check",
            "async_upload",
            "bucket_reso_steps",
        ),
        "a process setting of sd-scripts/accelerate; training runs inside the WebUI",
    ),
    **dict.fromkeys(
        (
            "logging_dir",
            "log_with",
            "log_prefix",
            "log_config",
            "log_tracker_name",
            "log_tracker_config",
            "use_wandb",
            "wandb_api_key",
            "wandb_run_name",
        ),
        "the tab shows progress and the loss chart itself",
    ),
    "LyCORIS_preset": "LoCon here adapts the attention, feed-forward and ResBlock convolution layers; "
    "LoHa/LoKr take the convolutions when conv_dim is set and the preset includes them",
    "learning_rate_te": "a DreamBooth-tab setting; the LoRA tab uses text_encoder_lr",
    "learning_rate_te1": "an SDXL setting",
    "learning_rate_te2": "an SDXL setting",
}

# Settings for SDXL / SD3 / Flux and other model families: inert for an SD1.5 LoRA.
_OTHER_FAMILY_PREFIXES = (
    "flux",
    "sd3",
    "sdxl_",
    "t5xxl",
    "clip_g",
    "clip_l",
    "hunyuan",
    "lumina",
    "anima",
    "chroma",
)
_OTHER_FAMILY_KEYS = {
    "ae",
    "apply_t5_attn_mask",
    "blocks_to_swap",
    "double_blocks_to_swap",
    "single_blocks_to_swap",
    "cpu_offload_checkpointing",
    "discrete_flow_shift",
    "guidance_scale",
    "model_prediction_type",
    "timestep_sampling",
    "split_mode",
    "train_blocks",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "weighting_scheme",
    "save_clip",
    "save_t5xxl",
    "save_as_bool",
    "fp8_base_unet",
    "blockwise_fused_optimizers",
    "fused_backward_pass",
    "fused_optimizer_groups",
    "model_type",
}
_FAMILY_SWITCHES = ("v2", "sdxl", "sd3_checkbox", "flux1_checkbox", "hunyuan_image_checkbox")

# kohya_ss GUI defaults that mean "off / standard": such values are ignored, not unsupported.
_NEUTRAL_DEFAULTS: dict[str, Any] = {
    "loss_type": "l2",
    "huber_c": 0.1,
    "huber_scale": 1,
    "huber_schedule": "snr",
    "max_timestep": 1000,
    "min_timestep": 0,
    "max_token_length": 75,
    "noise_offset_type": "Original",
    "multires_noise_discount": 0.3,
    "save_model_as": "safetensors",
    "bucket_reso_steps": 64,
    "lr_scheduler_type": "",
}

# Only in effect together with another setting; ignored when that setting is off.
_DEPENDENT_ON = {
    "huber_c": ("loss_type", ("huber", "smooth_l1")),
    "huber_scale": ("loss_type", ("huber", "smooth_l1")),
    "huber_schedule": ("loss_type", ("huber", "smooth_l1")),
    "multires_noise_discount": ("noise_offset_type", ("Multires",)),
    "multires_noise_iterations": ("noise_offset_type", ("Multires",)),
}

_INT_KEYS_RESET_TO = {  # update_my_data: unreadable strings become these
    "clip_skip": 0,
    "epoch": 0,
    "gradient_accumulation_steps": 0,
    "keep_tokens": 0,
    "lr_warmup": 0,
    "max_data_loader_n_workers": 0,
    "max_train_epochs": 0,
    "save_every_n_epochs": 0,
    "seed": 0,
    "lr_scheduler_num_cycles": 1,
    "max_train_steps": 0,
    "caption_dropout_every_n_epochs": 0,
    "max_token_length": 75,
}
_FLOAT_KEYS_RESET_TO = {
    "adaptive_noise_scale": 0.0,
    "noise_offset": 0.0,
    "learning_rate": 0.0,
    "text_encoder_lr": 0.0,
    "unet_lr": 0.0,
    "lr_scheduler_power": 1.0,
}


@dataclass(frozen=True)
class ReportedKey:
    key: str
    value: Any
    reason: str

    def line(self) -> str:
        return f"{self.key} = {self.value!r}: {self.reason}"


@dataclass
class KohyaImport:
    config: TrainingConfig
    applied: dict[str, Any] = field(default_factory=dict)  # our field -> value
    sources: dict[str, str] = field(default_factory=dict)  # our field -> the kohya key it came from
    read_from: set[str] = field(default_factory=set)  # kohya keys whose values were applied
    unsupported: list[ReportedKey] = field(default_factory=list)
    ignored: list[ReportedKey] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    to_fix: list[str] = field(default_factory=list)  # also in problems: applied, but refused by validate
    problem_keys: set[str] = field(default_factory=set)  # keys whose values could not be read
    source_label: str = "kohya_ss config"  # what was imported, for the summary's first line

    def summary(self) -> str:
        """A plain-text report for the tab: what was set, what was not, and why."""
        parts = [f"Imported {len(self.applied)} settings from the {self.source_label}."]
        sections = [
            ("Could not be read (previous value kept)", [p for p in self.problems if p not in self.to_fix]),
            ("Applied, but must be changed before training", self.to_fix),
            ("Not supported here (training will differ)", [item.line() for item in self.unsupported]),
            ("Adjusted on import", self.notes),
            ("Ignored (no effect here)", [item.line() for item in self.ignored]),
        ]
        for title, lines in sections:
            if lines:
                parts.append(f"{title}:\n" + "\n".join(f"- {line}" for line in lines))
        return "\n\n".join(parts)


def _is_neutral(key: str, value: Any, neutral_defaults: dict[str, Any] = _NEUTRAL_DEFAULTS) -> bool:
    if value is None or value is False or value == "" or value == [] or value == {}:
        return True
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0:
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "0.0", "none", "false", "no"):
        return True
    default = neutral_defaults.get(key)
    if default is not None:
        try:
            return value == default or float(value) == float(default)
        except (TypeError, ValueError):
            return False
    return False


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "false", "1", "0", "yes", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise ValueError(f"{value!r} is not true/false")


def _as_float(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number")
    return number


def _as_int(value: Any) -> int:
    number = _as_float(value)
    if not number.is_integer():
        raise ValueError(f"{value!r} is not a whole number")
    return int(number)


def _as_str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not text")
    return value


def _as_checkpointing(value: Any) -> str:
    # kohya has no "auto": its true is our "on"; its false (the default) leaves our "auto", which turns
    # checkpointing on only when a step would otherwise not fit.
    return "on" if _as_bool(value) else "auto"


_CONVERTERS = {
    "bool": _as_bool,
    "float": _as_float,
    "int": _as_int,
    "str": _as_str,
    "checkpointing": _as_checkpointing,
}


def migrate_old_fields(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Bring an old kohya_ss JSON up to the current field style, as the GUI does on load."""
    migrated = dict(data)
    notes: list[str] = []
    if "optimizer" not in migrated and "use_8bit_adam" in migrated:
        use_8bit = _safe_bool(migrated["use_8bit_adam"])
        migrated["optimizer"] = "AdamW8bit" if use_8bit else "AdamW"
        old_value = data["use_8bit_adam"]
        notes.append(f"old field use_8bit_adam={old_value!r} read as optimizer {migrated['optimizer']}")
    if "use_8bit_adam" in migrated:
        migrated.pop("use_8bit_adam")
    if "lora_network_weights" in migrated:
        old = migrated.pop("lora_network_weights")
        if not migrated.get("network_weights"):
            migrated["network_weights"] = old
        if old:
            notes.append("old field lora_network_weights read as network_weights")
    if migrated.get("LoRA_type") == "LoCon":
        migrated["LoRA_type"] = "LyCORIS/LoCon"
        notes.append("old LoRA_type 'LoCon' read as 'LyCORIS/LoCon'")
    if isinstance(migrated.get("xformers"), bool):
        migrated["xformers"] = "xformers" if migrated["xformers"] else "none"
    for key, fallback in _INT_KEYS_RESET_TO.items():
        migrated[key] = _number_or(migrated, key, int, fallback, notes)
    for key, fallback in _FLOAT_KEYS_RESET_TO.items():
        migrated[key] = _number_or(migrated, key, float, fallback, notes)
    return {key: value for key, value in migrated.items() if value is not _MISSING}, notes


_MISSING = object()


_FIELD_KINDS = {
    "huber_c": "float",
    "huber_scale": "float",
    "min_timestep": "int",
    "max_timestep": "int",
    "ip_noise_gamma": "float",
    "ip_noise_gamma_random_strength": "bool",
    "debiased_estimation_loss": "bool",
    "zero_terminal_snr": "bool",
    "masked_loss": "bool",
    "alpha_mask": "bool",
}


def _safe_bool(value: Any) -> bool:
    try:
        return _as_bool(value)
    except ValueError:
        return False


def _number_or(data: dict[str, Any], key: str, kind: type, fallback: Any, notes: list[str]) -> Any:
    if key not in data:
        return _MISSING
    value = data[key]
    if value is None or isinstance(value, bool):
        return value
    try:
        number = float(value)
        if not math.isfinite(number):
            return value  # left for the converter, which reports it and keeps the previous value
        return int(number) if kind is int else number
    except OverflowError:
        return value
    except (TypeError, ValueError):
        if value != "":
            notes.append(f"{key}: {value!r} is not a number; read as {fallback} as kohya_ss does")
        return fallback


class _Importer:
    """Maps the kohya_ss GUI's keys; :mod:`lib_lora_trainer.sd_scripts_import` overrides the steps whose
    keys or meaning differ on sd-scripts' command line."""

    tool = "kohya_ss"  # named in reasons
    resolution_key = "max_resolution"
    simple_field_table: dict[str, tuple[str, str]] = _SIMPLE_FIELDS
    ignored_reasons: dict[str, str] = _IGNORED_WITH_REASON
    unsupported_reasons: dict[str, str] = _UNSUPPORTED_REASONS
    neutral_defaults: dict[str, Any] = _NEUTRAL_DEFAULTS
    dependent_on: dict[str, tuple[str, tuple[str, ...]]] = _DEPENDENT_ON

    def __init__(self, data: dict[str, Any], base: TrainingConfig):
        self.data = data
        self.values = base.to_dict()
        self.result = KohyaImport(config=base)
        self.handled: set[str] = set()
        self.problem_keys = self.result.problem_keys  # one set: the report carries it out

    # --- helpers ---------------------------------------------------------------------------------
    def take(self, key: str) -> Any:
        self.handled.add(key)
        return self.data.get(key)

    def set(self, our_field: str, value: Any, source: str) -> None:
        """Apply ``value``; ``source`` starts with the kohya key it came from. Nothing is applied from
        a key whose value could not be read, and no value our field cannot hold at all (NaN, infinity,
        out of range, too long): both are reported and the previous value is kept."""
        key = source.split()[0]
        if key in self.problem_keys:
            return
        problem = field_value_problem(our_field, value)
        if problem:
            shown = repr(self.data.get(key, value))
            shown = shown if len(shown) <= 80 else f"{shown[:80]}..."
            self.report_problem(key, f"{key} = {shown}: {problem}; previous value kept")
            return
        self.values[our_field] = value
        self.result.applied[our_field] = value
        self.result.sources[our_field] = source
        self.result.read_from.add(source.split()[0])

    def mark_read(self, key: str) -> None:
        """``key`` was used for a value applied under another key's name."""
        if key in self.data:
            self.handled.add(key)
            self.result.read_from.add(key)

    def report_problem(self, key: str, message: str) -> None:
        self.problem_keys.add(key)
        self.result.problems.append(message)

    def unsupported(self, key: str, value: Any, reason: str) -> None:
        self.result.unsupported.append(ReportedKey(key, value, reason))

    def ignore(self, key: str, value: Any, reason: str) -> None:
        self.result.ignored.append(ReportedKey(key, value, reason))

    def is_argument_text(self, key: str, value: Any) -> bool:
        """key=value arguments come as one text or a list of texts; anything else is reported."""
        if isinstance(value, (str, list)):
            return True
        self.report_problem(key, f"{key} = {value!r}: expected key=value text; previous value kept")
        return False

    def convert(self, key: str, kind: str) -> Any:
        """The value of ``key`` converted, or None when absent, empty or unreadable (then reported)."""
        value = self.take(key)
        if value is None or (value == "" and kind != "str"):
            return None
        try:
            return _CONVERTERS[kind](value)
        except (TypeError, ValueError, OverflowError) as error:
            self.report_problem(key, f"{key} = {value!r}: {error}; previous value kept")
            return None

    # --- the mapping ------------------------------------------------------------------------------
    def run(self) -> KohyaImport:
        self.model_family()
        self.simple_fields()
        self.names_and_folders()
        self.network()
        self.learning_rates()
        self.optimizer()
        self.scheduler()
        self.length()
        self.resolution()
        self.precision()
        self.noise()
        self.loss_shaping()
        self.samples()
        self.remaining()
        self.superseded()
        return self.finish()

    def finish(self) -> KohyaImport:
        """The config from the mapped values, with what our checks refuse in ``to_fix``."""
        try:
            self.result.config = TrainingConfig.from_dict(self.values)
        except ConfigError as error:  # a value our own checks refuse (type level)
            self.result.problems.extend(error.messages)
        self.result.to_fix = validate(self.result.config, need_dataset=False)
        self.result.problems.extend(self.result.to_fix)
        return self.result

    def model_family(self) -> None:
        for key in _FAMILY_SWITCHES:
            value = self.take(key)
            if value is not None and _safe_bool(value):
                self.unsupported(key, value, "this tab trains SD1.5 LoRAs on the WebUI's loaded model")
            elif key in self.data:
                self.ignore(key, value, "off")
        v_param = self.convert("v_parameterization", "bool")
        if v_param:
            self.set("parameterization", "v", "v_parameterization")
        elif v_param is False:
            reason = "the loaded model's own prediction type is used (eps for SD1.5)"
            self.ignore("v_parameterization", False, reason)

    def simple_fields(self) -> None:
        for key, (our_field, kind) in self.simple_field_table.items():
            if key not in self.data:
                continue
            value = self.convert(key, kind)
            if key in self.problem_keys:
                continue
            if value is None or (our_field == "caption_extension" and not value):
                self.ignore(key, self.data[key], "empty")
                continue
            if our_field in _AT_LEAST_ONE and value < 1:
                self.result.notes.append(f"{key} = {value} read as 1")
                value = 1
            self.set(our_field, value, key)

    def names_and_folders(self) -> None:
        name = self.take("output_name")
        if isinstance(name, str) and name.strip():
            problem = output_name_problem(name.strip())
            if problem:
                self.report_problem("output_name", f"output_name: {problem}; previous name kept")
            else:
                self.set("output_name", name.strip(), "output_name")
        self.folders()
        save_precision = self.take("save_precision")
        if save_precision is not None:
            mapped = _SAVE_PRECISIONS.get(str(save_precision))
            if mapped:
                self.set("save_precision", mapped, "save_precision")
            else:
                self.unsupported("save_precision", save_precision, "only fp16, bf16 and float are supported")
        vae = self.take("vae")
        if vae:
            self.unsupported("vae", vae, "training uses the VAE selected in the WebUI; choose it there")
        self.dataset_config()

    def folders(self) -> None:
        train_dir = self.take("train_data_dir")
        if isinstance(train_dir, str) and train_dir.strip():
            self.set("train_data_dir", train_dir, "train_data_dir")
            self.set("dataset_layout", "kohya", f"train_data_dir ({self.tool} uses N_name subfolders)")

    def dataset_config(self) -> None:
        dataset_config = self.take("dataset_config")
        if dataset_config:
            reason = "a dataset TOML is read when you import the sd-scripts .toml that names it"
            self.unsupported("dataset_config", dataset_config, reason)

    def network(self) -> None:
        lora_type = self.take("LoRA_type")
        if lora_type is not None:
            mapped = _NETWORK_TYPES.get(str(lora_type))
            if mapped is None:
                reason = "only Standard, LoCon, LyCORIS/LoCon, LyCORIS/LoHa and LyCORIS/LoKr are trained here"
                self.unsupported("LoRA_type", lora_type, reason)
            else:
                self.set("network_type", mapped, "LoRA_type")
                if lora_type == "LyCORIS/LoCon":
                    self.result.notes.append(
                        "LyCORIS/LoCon is trained as kohya LoCon (linear layers + ResBlock 3x3 convs); "
                        "A1111 loads both the same way"
                    )
                if mapped in ("loha", "lokr"):
                    self.lycoris_conv_layers(str(lora_type))
        self.network_options()

    # --- network kinds, dropout, LoRA+, block weights, max norm (networks) -------------------------
    def lycoris_conv_layers(self, lora_type: str) -> None:
        """kohya_ss passes conv_dim to LyCORIS, whose default preset ("full") then adapts the convs."""
        preset = str(self.data.get("LyCORIS_preset") or "full")
        conv_dim = _number_or(self.data, "conv_dim", int, 0, self.result.notes)
        convs = conv_dim > 0 and preset in LYCORIS_PRESETS_WITH_CONVS  # "full-lin": linear layers only
        self.set("conv_layers", convs, f"LoRA_type {lora_type} with conv_dim {conv_dim}, preset {preset}")

    def network_options(self) -> None:
        for key, (our_field, kind) in _NETWORK_OPTION_FIELDS.items():
            if key not in self.data or key in self.handled:
                continue
            value = self.convert(key, kind)
            if key in self.problem_keys:
                continue
            if value is None:
                self.ignore(key, self.data[key], "empty")
                continue
            self.set(our_field, value, key)
        decompose_both = self.take("decompose_both")
        if decompose_both is not None and _safe_bool(decompose_both):
            reason = "LoKr's w1 is always a full matrix here (files with a low-rank w1 can be continued)"
            self.unsupported("decompose_both", decompose_both, reason)
        elif "decompose_both" in self.data:
            self.ignore("decompose_both", decompose_both, "off")

    def learning_rates(self) -> None:
        keys = ("learning_rate", "unet_lr", "text_encoder_lr")
        base, unet, text = (self.convert(key, "float") or 0.0 for key in keys)
        unreadable = [key for key in keys if key in self.problem_keys]
        if unreadable:  # an unreadable rate is not 0: reading it so would train only the other part
            self.result.notes.append(
                f"{', '.join(unreadable)} could not be read, so all learning rates keep their previous values"
            )
            return
        if base == unet == text == 0.0:
            if any(key in self.data for key in ("learning_rate", "unet_lr", "text_encoder_lr")):
                message = "every learning rate is 0 in the config; previous rates kept"
                self.report_problem("learning_rate", message)
            return
        # kohya_ss: a UNet/TE rate of 0 falls back to learning_rate, except that a TE rate of 0 next to
        # a non-zero UNet rate means "UNet only" (and the reverse means "text encoder only").
        if text == 0 and unet != 0:
            self.set("unet_lr", unet, "unet_lr")
            self.set("train_text_encoder", False, "text_encoder_lr = 0 (UNet only)")
            self.set("text_encoder_lr", 0.0, "text_encoder_lr")
        elif unet == 0 and text != 0:
            self.set("unet_lr", 0.0, "unet_lr = 0 (text encoder only)")
            self.set("text_encoder_lr", text, "text_encoder_lr")
            self.set("train_text_encoder", True, "text_encoder_lr")
        else:
            self.set("unet_lr", unet or base, "unet_lr" if unet else "learning_rate")
            self.set("text_encoder_lr", text or base, "text_encoder_lr" if text else "learning_rate")
            self.set("train_text_encoder", True, "text_encoder_lr")

    def optimizer(self) -> None:
        self.optimizer_name()
        self.optimizer_arguments()

    def optimizer_name(self) -> None:
        name = self.take("optimizer")
        if name is not None:
            if name in OPTIMIZERS:
                self.set("optimizer", name, "optimizer")
            else:
                self.unsupported("optimizer", name, f"available here: {', '.join(OPTIMIZERS)}")

    def optimizer_arguments(self) -> None:
        args = self.take("optimizer_args")
        if not args:
            if "optimizer_args" in self.data:
                self.ignore("optimizer_args", args, "empty")
            return
        if not self.is_argument_text("optimizer_args", args):
            return
        tokens = str(args).replace('"', "").replace("'", "").split() if isinstance(args, str) else list(args)
        passed_on: list[str] = []  # arguments without a field of ours go to optimizer_args as they are
        own_fields = {
            "weight_decay": ("weight_decay", _as_float),
            "relative_step": ("adafactor_relative_step", _as_bool),
            "d_coef": ("prodigy_d_coef", _as_float),
            "safeguard_warmup": ("prodigy_safeguard_warmup", _as_bool),
            "use_bias_correction": ("prodigy_use_bias_correction", _as_bool),
        }
        for token in tokens:
            key, _, value = str(token).partition("=")
            key = key.strip()
            try:
                if key in own_fields:
                    our_field, convert = own_fields[key]
                    self.set(our_field, convert(value), f"optimizer_args {key}")
                else:
                    passed_on.append(f"{key}={value.strip()}")
            except ValueError as error:
                self.report_problem("optimizer_args", f"optimizer_args {token!r}: {error}")
        if passed_on:
            self.set("optimizer_args", " ".join(passed_on), "optimizer_args (checked before training)")

    def scheduler(self) -> None:
        name = self.take("lr_scheduler")
        if name == "adafactor":
            self.set("adafactor_relative_step", True, "lr_scheduler = adafactor")
            self.set("lr_scheduler", "constant", "lr_scheduler = adafactor")
            self.result.notes.append("lr_scheduler 'adafactor' read as Adafactor's relative-step mode")
        elif name is not None:
            if name in LR_SCHEDULERS:
                self.set("lr_scheduler", name, "lr_scheduler")
            else:
                self.unsupported("lr_scheduler", name, f"available here: {', '.join(LR_SCHEDULERS)}")
        cycles = self.convert("lr_scheduler_num_cycles", "int")
        if cycles is not None:
            self.set("lr_scheduler_num_cycles", max(cycles, 1), "lr_scheduler_num_cycles")
        self.scheduler_arguments()
        self.warmup()
        if self.values["lr_scheduler"] == "constant" and self.values["lr_warmup_steps"] > 0:
            # sd-scripts refuses a warmup with "constant"; the warmup is dropped, not silently added.
            self.set("lr_warmup_steps", 0.0, "lr_scheduler = constant (no warmup)")
            self.result.notes.append(
                "the constant schedule has no warmup (sd-scripts refuses one); the warmup was set to 0 — "
                "choose constant_with_warmup to keep it"
            )

    def scheduler_arguments(self) -> None:
        lr_args = self.take("lr_scheduler_args")
        if lr_args and not self.is_argument_text("lr_scheduler_args", lr_args):
            return
        if lr_args:
            text = lr_args if isinstance(lr_args, str) else " ".join(str(item) for item in lr_args)
            self.set(
                "lr_scheduler_args",
                " ".join(text.replace('"', "").replace("'", "").split()),
                "lr_scheduler_args",
            )
        elif "lr_scheduler_args" in self.data:
            self.ignore("lr_scheduler_args", lr_args, "empty")

    def warmup(self) -> None:
        percent = self.convert("lr_warmup", "float") or 0.0
        steps = self.convert("lr_warmup_steps", "float") or 0.0
        if steps > 0:
            self.set("lr_warmup_steps", float(int(steps)), "lr_warmup_steps")
            if percent > 0:
                self.result.notes.append(
                    "both lr_warmup and lr_warmup_steps are set; lr_warmup_steps wins, as in kohya_ss"
                )
        elif percent > 0:
            fraction = percent / 100
            if fraction >= 1:
                fraction = 0.99
                self.result.notes.append(f"lr_warmup {percent}% read as 99% of the steps")
            self.set("lr_warmup_steps", fraction, "lr_warmup (percent of all steps)")
        elif "lr_warmup" in self.data or "lr_warmup_steps" in self.data:
            self.set("lr_warmup_steps", 0.0, "lr_warmup")

    def length(self) -> None:
        epochs = self.convert("epoch", "int")
        max_epochs = self.convert("max_train_epochs", "int")
        max_steps = self.convert("max_train_steps", "int")
        if max_epochs:
            self.set("epochs", max_epochs, "max_train_epochs (overrides epoch)")
        elif epochs:
            self.set("epochs", epochs, "epoch")
        self.steps_and_states(max_steps, max_epochs)
        save_every = self.convert("save_every_n_epochs", "int")
        if save_every is not None:
            if save_every >= 1:
                self.set("save_every_n_epochs", save_every, "save_every_n_epochs")
            else:
                last_only = "save_every_n_epochs = 0 (last epoch only)"
                self.set("save_every_n_epochs", self.values["epochs"], last_only)
        self.seed()

    def seed(self) -> None:
        seed = self.convert("seed", "int")
        if seed:
            self.set("seed", seed, "seed")
        elif "seed" in self.data and "seed" not in self.problem_keys:
            self.result.notes.append(
                f"seed 0 means a random seed in kohya_ss; the fixed seed {self.values['seed']} is kept"
            )

    # --- resume and saving by steps ---
    def steps_and_states(self, max_steps: int | None, max_epochs: int | None) -> None:
        if max_steps and max_steps > 0:
            if max_epochs:
                self.ignore("max_train_steps", max_steps, "max_train_epochs overrides it, as in sd-scripts")
            else:
                self.set("max_train_steps", max_steps, "max_train_steps")
        for key in ("save_every_n_steps", "save_last_n_epochs", "save_last_n_steps"):
            value = self.convert(key, "int")
            if value is not None and value > 0:
                self.set(key, value, key)
            elif value is not None:
                self.ignore(key, value, "off")
        for key in (
            "save_state",
            "save_state_on_train_end",
            "save_last_n_epochs_state",
            "save_last_n_steps_state",
        ):
            if key in self.data:
                reason = "the training state is always saved here (every few minutes, on Stop and on failure)"
                self.ignore(key, self.take(key), reason)

    def resolution(self) -> None:
        key = self.resolution_key
        value = self.take(key)
        if value in (None, ""):
            return
        try:
            sizes = [int(float(part)) for part in re.split(r"[,x ]+", str(value).strip()) if part]
            if not sizes or len(sizes) > 2 or min(sizes) <= 0:
                raise ValueError("expected 'width,height'")
        except (ValueError, OverflowError) as error:
            message = f"{key} = {value!r}: {error}; previous resolution kept"
            self.report_problem(key, message)
            return
        width, height = (sizes[0], sizes[-1])
        if width == height:
            self.set("resolution", width, key)
            return
        side = max(64, int(round(math.sqrt(width * height) / 64)) * 64)
        self.set("resolution", side, key)
        self.result.notes.append(
            f"{key} {width}x{height} read as {side} (same pixel area; buckets keep each "
            "image's aspect ratio)"
        )

    def precision(self) -> None:
        mixed = self.take("mixed_precision")
        if mixed is not None:
            if mixed in ("no", "fp16", "bf16"):
                self.set("mixed_precision", mixed, "mixed_precision")
                if mixed == "no":  # resolved like the tab's "no" (training/precision.py)
                    self.result.notes.append(
                        "mixed_precision no: fp32 where the WebUI holds the model in fp32 (--no-half); on "
                        "its default half-precision model training computes in fp16 with loss scaling "
                        "(the epoch files' ss_mixed_precision says which)"
                    )
            else:
                self.unsupported("mixed_precision", mixed, "choose no, fp16 or bf16")
        for key in ("full_fp16", "full_bf16", "fp8_base"):
            value = self.take(key)
            if value is not None and _safe_bool(value):
                self.unsupported(key, value, "adapters are trained in fp32 with mixed precision")
            elif key in self.data:
                self.ignore(key, value, "off")

    def noise(self) -> None:
        kind = self.take("noise_offset_type")
        offset = self.convert("noise_offset", "float")
        if kind == "Multires":
            if self.multires_noise():
                self.result.read_from.add("noise_offset_type")
            else:
                self.ignore("noise_offset_type", kind, "multires noise with 0 iterations is off")
            for key in ("noise_offset", "adaptive_noise_scale", "noise_offset_random_strength"):
                if self.take(key):
                    self.ignore(key, self.data[key], "kohya_ss only uses it with noise_offset_type Original")
            return
        if kind not in (None, "Original"):
            self.unsupported("noise_offset_type", kind, "only the original noise offset is supported")
            return
        self.original_noise_offset(offset, "only used together with noise_offset")

    def multires_noise(self) -> bool:
        """Multires noise, applied when its iterations are set (True); the discount only with them."""
        iterations = self.convert("multires_noise_iterations", "int")
        discount = self.convert("multires_noise_discount", "float")
        if not iterations:
            return False
        self.set("multires_noise_iterations", iterations, "multires_noise_iterations")
        if discount is not None:
            self.set("multires_noise_discount", discount, "multires_noise_discount")
        return True

    def original_noise_offset(self, offset: float | None, adaptive_alone: str) -> None:
        """The noise offset with its adaptive scale and random strength; ``adaptive_alone``: why an
        adaptive scale without an offset is ignored."""
        if offset is not None:
            self.set("noise_offset", offset, "noise_offset")
        adaptive = self.convert("adaptive_noise_scale", "float")
        if adaptive and offset:
            self.set("adaptive_noise_scale", adaptive, "adaptive_noise_scale")
        elif adaptive:
            self.ignore("adaptive_noise_scale", adaptive, adaptive_alone)
        random_strength = self.convert("noise_offset_random_strength", "bool")
        if random_strength is not None:
            self.set("noise_offset_random_strength", random_strength, "noise_offset_random_strength")

    def loss_shaping(self) -> None:
        """Loss type and Huber schedule, timesteps, input perturbation, zero terminal SNR, masks."""
        for key in (
            "huber_c", "huber_scale", "min_timestep", "max_timestep", "ip_noise_gamma",
            "ip_noise_gamma_random_strength", "debiased_estimation_loss", "zero_terminal_snr", "masked_loss",
            "alpha_mask",
        ):  # fmt: skip
            kind = _FIELD_KINDS[key]
            value = self.convert(key, kind)
            if value is not None and key not in self.problem_keys:
                self.set(key, value, key)
        for key, choices in (("loss_type", LOSS_TYPES), ("huber_schedule", HUBER_SCHEDULES)):
            value = self.take(key)
            if value is None or value == "":
                continue
            if value in choices:
                self.set(key, value, key)
            else:
                self.unsupported(key, value, f"available here: {', '.join(choices)}")
        folder = self.take("conditioning_data_dir")
        if isinstance(folder, str) and folder.strip():
            self.set("conditioning_data_dir", folder.strip(), "conditioning_data_dir (mask images)")

    def samples(self) -> None:
        self.sample_prompts()
        self.sample_sampler()

    def sample_prompts(self) -> None:
        prompts = self.take("sample_prompts")
        if isinstance(prompts, str) and prompts.strip():
            self.apply_prompt_lines(prompts, "sample_prompts")
        elif "sample_prompts" in self.data:
            self.ignore("sample_prompts", prompts, "empty")

    def apply_prompt_lines(self, prompts: str, source: str) -> None:
        """One prompt a line; kohya's ``--n``/``--w``... options are dropped with a note."""
        kept: list[str] = []
        for line in prompts.splitlines():
            text, _, options = line.partition(" --")
            if text.strip():
                kept.append(text.strip())
            if options.strip():
                self.result.notes.append(
                    f"sample prompt options '--{options.strip()}' dropped; samples use the tab's "
                    "sampler, size, seed and negative prompt"
                )
        if kept:
            self.set("sample_prompts", kept, source)

    def sample_sampler(self) -> None:
        sampler = self.take("sample_sampler")
        if sampler:
            mapped = _SAMPLERS.get(str(sampler).lower())
            if mapped:
                self.set("sample_sampler", mapped, "sample_sampler")
            else:
                reason = "no matching WebUI sampler; the tab's sampler is used"
                self.unsupported("sample_sampler", sampler, reason)

    def remaining(self) -> None:
        for key, value in self.data.items():
            if key in self.handled:
                continue
            if key in self.ignored_reasons:
                self.ignore(key, value, self.ignored_reasons[key])
            elif key in _OTHER_FAMILY_KEYS or key.startswith(_OTHER_FAMILY_PREFIXES):
                self.ignore(key, value, "a setting for SDXL/SD3/Flux or other model families")
            elif key in self.dependent_on and not self.switched_on(key):
                switch, values = self.dependent_on[key]
                self.ignore(key, value, f"only used when {switch} is {values[0]}")
            elif _is_neutral(key, value, self.neutral_defaults):
                self.ignore(key, value, "off or empty")
            else:
                reason = self.unsupported_reasons.get(key, "this trainer has no such setting")
                self.unsupported(key, value, reason)

    def switched_on(self, key: str) -> bool:
        switch, values = self.dependent_on[key]
        return self.data.get(switch) in values

    def superseded(self) -> None:
        """Report keys that were read but neither applied nor reported: empty, or overridden."""
        reported = (
            self.result.read_from
            | {item.key.split()[0] for item in self.result.unsupported}
            | {item.key for item in self.result.ignored}
            | self.problem_keys
        )
        for key, value in self.data.items():
            if key in reported:
                continue
            if key == "learning_rate":
                reason = f"unet_lr and text_encoder_lr are both set, so {self.tool} does not use it either"
            elif key == "epoch":
                reason = "max_train_epochs overrides it"
            elif key == "lr_warmup":
                reason = "lr_warmup_steps overrides it"
            elif key == "noise_offset_type":
                reason = "the original noise offset (noise_offset)"
            else:
                reason = "empty or off"
            self.ignore(key, value, reason)


def import_kohya_ss_config(data: dict[str, Any], base: TrainingConfig | None = None) -> KohyaImport:
    """Map a kohya_ss GUI LoRA JSON (already parsed) onto ``base`` (defaults when None)."""
    if not isinstance(data, dict):
        raise ConfigError(["a kohya_ss config must be a JSON object"])
    migrated, notes = migrate_old_fields(data)
    importer = _Importer(migrated, base or TrainingConfig())
    importer.result.notes.extend(notes)
    result = importer.run()
    for item in result.unsupported:
        logger.warning("kohya_ss import: not supported: %s", item.line())
    for line in result.problems:
        logger.warning("kohya_ss import: %s", line)
    return result


def read_config_text(path: str | Path, role: str) -> str:
    """The text of a settings file to import; every unusable file is one ConfigError sentence that
    starts with ``role`` ("kohya_ss config" ...)."""
    file = Path(path)
    if file.is_dir():
        raise ConfigError([f"{role} {file} is a folder, not a file; choose the file inside it"])
    try:
        return read_text_file(file)
    except FileNotFoundError as error:
        raise ConfigError([f"{role} {file} does not exist"]) from error
    except OSError as error:
        raise ConfigError([f"{role} {file} cannot be read ({error.strerror or error})"]) from error
    except ValueError as error:  # not text (a binary file, an unknown encoding)
        raise ConfigError([f"{role} {error}"]) from error


def load_kohya_ss_json(path: str | Path, base: TrainingConfig | None = None) -> KohyaImport:
    """Read a kohya_ss GUI JSON file and map it (see :func:`import_kohya_ss_config`)."""
    text = read_config_text(path, "kohya_ss config")
    try:
        data = json.loads(text)
    except ValueError as error:  # JSONDecodeError, or an integer of more than 4300 digits
        raise ConfigError([f"kohya_ss config {path} is not valid JSON: {error}"]) from error
    if not isinstance(data, dict):
        raise ConfigError(
            [f"kohya_ss config {path} must hold a JSON object ({{...}}), not {type(data).__name__}"]
        )
    looks_like_kohya = any(key in data for key in ("LoRA_type", "network_dim", "train_data_dir"))
    if isinstance(data, dict) and not looks_like_kohya:
        logger.warning("%s does not look like a kohya_ss LoRA config; importing what matches", path)
    return import_kohya_ss_config(data, base)
