"""Import a kohya-ss/sd-scripts ``train_network.py --config_file`` TOML (and the ``--dataset_config`` it
names) into a :class:`TrainingConfig`, with the same report as the kohya_ss GUI import.

The TOML is read as sd-scripts' ``read_config_from_file`` reads it: one level of sections is flattened
(top-level values kept, each table's keys lifted to the top; a later key wins), and the keys are
train_network.py's argument names. The mapping is the GUI importer's (:mod:`.kohya_ss_import`); only the
steps whose keys or meaning differ are overridden here: ``network_module`` + ``network_args`` (networks.lora,
lycoris.kohya with its ``algo``), ``optimizer_type``, ``resolution``, ``lr_warmup_steps`` (steps, or a
fraction below 1), ``unet_lr``/``text_encoder_lr`` that fall back to ``learning_rate`` when absent, noise
offset and multires noise side by side, ``sample_prompts`` as a file, ``seed = 0`` as a seed.

A --config_file is a whole command line: what it leaves out, sd-scripts takes from its own defaults
(``network_alpha`` 1, ``lr_scheduler`` constant, ``keep_tokens`` 0 ...). Those defaults replace the tab's
values for the settings that change what is trained, and the report lists them; the caption extension,
which names the caption files on disk, stays the tab's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_lora_trainer.config import MAX_VALIDATION_SHARE, OPTIMIZERS, ConfigError, TrainingConfig
from lib_lora_trainer.kohya_ss_import import (
    _IGNORED_WITH_REASON,
    _NEUTRAL_DEFAULTS,
    _SIMPLE_FIELDS,
    _UNSUPPORTED_REASONS,
    KohyaImport,
    ReportedKey,
    _Importer,
    load_kohya_ss_json,
    read_config_text,
)
from lib_lora_trainer.sd_scripts_dataset import DatasetMapping, map_dataset_config
from lib_lora_trainer.sd_scripts_keys import (
    BLOCK_WEIGHT_KEYS,
    GUI_ONLY_KEYS,
    KOHYA_LORA_ARGS,
    LYCORIS_ALGOS,
    LYCORIS_ARGS,
    LYCORIS_BOOLS,
    LYCORIS_PRESETS,
    LYCORIS_PRESETS_WITH_CONVS,
    LYCORIS_UNSUPPORTED_DEFAULTS,
    NETWORK_ARG_NAMES,
    OPTIMIZER_ARGUMENT_FIELDS,
    OPTIMIZER_WEIGHT_DECAY,
    SD_IGNORED,
    SD_NEUTRAL,
    SD_SCRIPTS_DEFAULTS,
    SD_UNSUPPORTED,
)

logger = logging.getLogger(__name__)

SD_SCRIPTS_LABEL = "sd-scripts config"
LEARNING_RATE_DEFAULT = 2e-6  # train_network.py's --learning_rate default
MAX_TRAIN_STEPS_DEFAULT = 1600  # train_network.py's --max_train_steps default


# --- reading TOML ---------------------------------------------------------------------------------------
def _toml_reader() -> tuple[Any, tuple[type[Exception], ...]]:
    """``loads`` and its decode errors: tomllib (Python 3.11+), else tomli or toml when installed."""
    try:
        import tomllib

        return tomllib.loads, (tomllib.TOMLDecodeError,)
    except ImportError:
        pass
    try:
        import tomli

        return tomli.loads, (tomli.TOMLDecodeError,)
    except ImportError:
        pass
    try:
        import toml

        # toml 0.10 also raises IndexError/TypeError on some broken files
        return toml.loads, (toml.TomlDecodeError, IndexError, TypeError)
    except ImportError:
        raise ConfigError(
            [
                "reading a .toml file needs Python 3.11 or the tomli package: install it into the WebUI's "
                "Python (pip install tomli) and restart the WebUI"
            ]
        ) from None


def parse_toml(text: str, name: str) -> dict[str, Any]:
    """The TOML document ``text`` as a dict; ConfigError (one sentence) when it is not valid TOML."""
    loads, errors = _toml_reader()
    try:
        data = loads(text)
    except errors as error:
        raise ConfigError([f"{name} is not valid TOML: {error}"]) from error
    if not isinstance(data, dict):  # tomllib always gives a table; an old toml package might not
        raise ConfigError([f"{name} must hold a TOML table, not {type(data).__name__}"])
    return data


def read_toml_file(path: str | Path, role: str = "sd-scripts config") -> dict[str, Any]:
    """A TOML file as a dict; every unusable file is one ConfigError sentence."""
    file = Path(path)
    return parse_toml(read_config_text(file, role), f"{role} {file}")


def read_settings_file(path: str | Path, role: str) -> Any:
    """A .json or .toml file parsed (sd-scripts' dataset configs and sample prompt files may be either)."""
    file = Path(path)
    if file.suffix.lower() == ".json":
        try:
            return json.loads(read_config_text(file, role))
        except ValueError as error:
            if isinstance(error, ConfigError):
                raise
            raise ConfigError([f"{role} {file} is not valid JSON: {error}"]) from error
    return read_toml_file(file, role)


def flatten_sections(data: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """sd-scripts' ``read_config_from_file``: top-level values kept, each table's keys lifted to the top
    (a key given twice: the later one wins). Returns the flat dict and notes on keys given twice."""
    flat: dict[str, Any] = {}
    origin: dict[str, str] = {}
    notes: list[str] = []
    for section, value in data.items():
        items = value.items() if isinstance(value, dict) else [(section, value)]
        where = f"[{section}]" if isinstance(value, dict) else "the top level"
        for key, item in items:
            if key in flat:
                notes.append(
                    f"{key} is given in {origin[key]} and in {where}; the latter is used, as in sd-scripts"
                )
                del flat[key]  # keeps the report in the order the file is read
            flat[key] = item
            origin[key] = where
    return flat, notes


def is_dataset_config(data: dict[str, Any]) -> bool:
    """A dataset TOML of its own ([[datasets]] tables) rather than a --config_file."""
    datasets = data.get("datasets")
    return (
        isinstance(datasets, list) and all(isinstance(entry, dict) for entry in datasets) and bool(datasets)
    )


# --- network_args and other translation ---------------------------------------------------------------------
@dataclass
class _Translation:
    data: dict[str, Any]  # train_network.py argument names, network_args entries lifted beside them
    network_args: dict[str, Any] = field(default_factory=dict)
    ignored: list[ReportedKey] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    problem_keys: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)


# top-level train_network.py arguments whose names the network options table also holds
_TOP_LEVEL_NETWORK_ARGUMENTS = {"network_dropout", "scale_weight_norms"}


def _translate(flat: dict[str, Any]) -> _Translation:
    data: dict[str, Any] = {}
    result = _Translation(data)
    for key, value in flat.items():
        if key == "network_args":
            continue
        if key in GUI_ONLY_KEYS:
            result.ignored.append(ReportedKey(key, value, SD_IGNORED[key]))
            continue
        if key in NETWORK_ARG_NAMES and key not in _TOP_LEVEL_NETWORK_ARGUMENTS:
            reason = "a network_args entry: sd-scripts does not read it at the top level"
            result.ignored.append(ReportedKey(f"{key} (top level)", value, reason))
            continue
        data[key] = value
    if flat.get("network_args") in ([], ""):
        result.ignored.append(ReportedKey("network_args", flat["network_args"], "empty"))
    elif "network_args" in flat:
        _split_network_args(flat["network_args"], result)
    if "caption_extention" in data:  # sd-scripts' old spelling wins over caption_extension when given
        old = data.pop("caption_extention")
        if old is not None:
            if "caption_extension" in data:
                result.ignored.append(
                    ReportedKey("caption_extension", data.pop("caption_extension"), "caption_extention wins")
                )
            data["caption_extension"] = old
            result.notes.append("caption_extention (sd-scripts' old spelling) read as caption_extension")
    return result


def _split_network_args(value: Any, result: _Translation) -> None:
    if isinstance(value, str):
        entries: list[Any] = value.split()
    elif isinstance(value, list):
        entries = value
    else:
        result.problems.append(f'network_args = {value!r}: must be a list of "key=value" texts')
        result.problem_keys.add("network_args")
        return
    for entry in entries:
        key, sep, text = str(entry).partition("=")
        key = key.strip()
        if not sep or not key:
            result.problems.append(
                f"network_args {entry!r} is not key=value (sd-scripts stops on it); not read"
            )
            result.problem_keys.add("network_args")
            continue
        if key in result.network_args:
            result.notes.append(f"network_args gives {key} twice; the last one is used, as in sd-scripts")
            result.data.pop(key, None)
        result.network_args[key] = text.strip()
        result.data[key] = text.strip()


def _lycoris_bool(value: Any) -> bool:
    """LyCORIS' ``str_bool``: anything but "false" is true."""
    return str(value).strip().lower() != "false"


def _int_or_ratio(value: Any) -> float:
    """sd-scripts' ``int_or_float`` for warmup/decay steps: a count, a fraction below 1, or "10%"."""
    if isinstance(value, bool):
        raise ValueError(f"{value!r} is not a number of steps")
    if isinstance(value, str):
        text = value.strip()
        number = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    else:
        number = float(value)
    if number != number or number < 0 or number == float("inf"):
        raise ValueError(f"{value!r} is not a number of steps or a fraction of them")
    if number >= 1 and not number.is_integer():
        raise ValueError(f"{value!r} is neither a whole number of steps nor a fraction below 1")
    return number


class _SdScriptsImporter(_Importer):
    tool = "sd-scripts"
    resolution_key = "resolution"
    simple_field_table = {k: v for k, v in _SIMPLE_FIELDS.items() if k not in ("conv_dim", "conv_alpha")}
    ignored_reasons = {**_IGNORED_WITH_REASON, **SD_IGNORED}
    unsupported_reasons = {**_UNSUPPORTED_REASONS, **SD_UNSUPPORTED}
    neutral_defaults = {**_NEUTRAL_DEFAULTS, **SD_NEUTRAL}
    dependent_on = {
        "huber_c": ("loss_type", ("huber", "smooth_l1")),
        "huber_scale": ("loss_type", ("huber", "smooth_l1")),
        "huber_schedule": ("loss_type", ("huber", "smooth_l1")),
    }

    def __init__(
        self,
        data: dict[str, Any],
        base: TrainingConfig,
        *,
        network_args: dict[str, Any],
        dataset: DatasetMapping | None,
        dataset_problem: str | None,
        folder: Path | None,
    ):
        super().__init__(data, base)
        self.network_args = network_args
        self.dataset = dataset
        self.dataset_problem = dataset_problem
        self.folder = folder

    # --- folders and the dataset config ---------------------------------------------------------------
    def folders(self) -> None:
        if self.dataset is None:
            super().folders()
            return
        for our_field, value, source in self.dataset.folder_settings:
            self.set(our_field, value, source)

    def dataset_config(self) -> None:
        value = self.take("dataset_config")
        if self.dataset_problem:
            self.report_problem("dataset_config", self.dataset_problem)
        elif self.dataset is not None:
            self.mark_read("dataset_config")
        elif "dataset_config" in self.data:
            self.ignore("dataset_config", value, "empty")

    # --- network ------------------------------------------------------------------------------------------
    def network(self) -> None:
        module = self.take("network_module")
        name = str(module).strip() if module is not None else "networks.lora"
        if module is None:
            self.result.notes.append(
                "network_module is not in the file (sd-scripts needs one); read as networks.lora"
            )
        if name == "networks.lora":
            self.kohya_lora()
            self.not_read_by(name, KOHYA_LORA_ARGS, ignore_unknown=True)
        elif name == "lycoris.kohya":
            self.lycoris()
            self.not_read_by(name, LYCORIS_ARGS, ignore_unknown=False)
        else:
            self.unsupported("network_module", module, _unsupported_module_reason(name))
            self.ignore_network_args(f"a network_args entry of {name}, which is not trained here")
        self.network_options()  # the top-level network_dropout and scale_weight_norms, and what is left

    def ignore_network_args(self, reason: str) -> None:
        for key in self.network_args:
            if key in self.data and key not in self.handled:
                self.ignore(key, self.take(key), reason)

    def not_read_by(self, module: str, reads: frozenset[str], *, ignore_unknown: bool) -> None:
        for key in self.network_args:
            if key in self.handled or key not in self.data:
                continue
            if key in reads:
                continue
            value = self.take(key)
            if ignore_unknown or key in NETWORK_ARG_NAMES:
                self.ignore(key, value, f"{module} does not read it")
            else:
                self.unsupported(key, value, f"a network argument of {module} that has no equivalent here")

    def kohya_lora(self) -> None:
        conv_dim = self.convert("conv_dim", "int")
        conv_alpha = self.convert("conv_alpha", "float")
        blocks = any(key in self.data for key in BLOCK_WEIGHT_KEYS)
        if not blocks:
            for key in ("block_alphas", "conv_block_dims", "conv_block_alphas"):
                if key in self.data:
                    reason = "networks.lora reads it only together with block_dims or the block LR weights"
                    self.ignore(key, self.take(key), reason)
        if "conv_dim" in self.problem_keys:
            self.result.notes.append("conv_dim could not be read, so the network type is kept")
            return
        convs = bool(conv_dim) or (blocks and bool(self.data.get("conv_block_dims")))
        if not convs:
            self.set("network_type", "lora", "network_module networks.lora")
            if conv_dim is not None:
                self.ignore("conv_dim", conv_dim, "0: no convolution layers")
            if conv_alpha is not None:
                self.ignore("conv_alpha", conv_alpha, "only used with conv_dim")
            return
        self.set("network_type", "locon", "network_module networks.lora with conv_dim (LoCon)")
        if conv_dim:
            self.set("conv_dim", conv_dim, "conv_dim")
        if conv_alpha is not None:
            self.set("conv_alpha", conv_alpha, "conv_alpha")
        else:
            self.set("conv_alpha", 1.0, "network_module (networks.lora's conv_alpha is 1 when not given)")

    def lycoris(self) -> None:
        algo_value = self.take("algo")
        algo = str(algo_value or "lora").strip().lower()
        kind = LYCORIS_ALGOS.get(algo)
        if kind is None:
            reason = f"LyCORIS' {algo} is not trained here; algo lora/locon, loha and lokr are"
            self.unsupported("network_module", "lycoris.kohya", reason)
            if algo_value is not None:
                self.unsupported("algo", algo_value, "see network_module")
            self.ignore_network_args(f"a network_args entry of LyCORIS' {algo}, which is not trained here")
            return
        self.lycoris_booleans()
        self.lycoris_unsupported_options()
        preset = self.lycoris_preset()
        conv_dim = self.convert("conv_dim", "int")
        conv_alpha = self.convert("conv_alpha", "float")
        if "conv_dim" in self.problem_keys or "conv_alpha" in self.problem_keys:
            self.result.notes.append("the conv rank or alpha could not be read, so the network type is kept")
            return
        dim = conv_dim if conv_dim is not None else self.values["network_dim"]
        alpha = conv_alpha if conv_alpha is not None else self.values["network_alpha"]
        convs = preset in LYCORIS_PRESETS_WITH_CONVS and dim > 0
        source = f"network_module lycoris.kohya, algo {algo}"
        if kind == "locon" and not convs:
            self.set("network_type", "lora", source)
            self.result.notes.append(
                f"LyCORIS {algo} with preset {preset} adapts no convolutions: trained as lora"
            )
        else:
            self.set("network_type", kind, source)
        if kind in ("loha", "lokr"):
            self.set("conv_layers", convs, f"preset {preset} (convolutions {'on' if convs else 'off'})")
        self.mark_read("algo")
        self.mark_read("preset")
        if kind == "locon" and convs:
            self.result.notes.append(
                "LyCORIS LoCon is trained as kohya LoCon (linear layers + ResBlock 3x3 convs); A1111 loads "
                "both the same way"
            )
        self.lycoris_conv(convs, conv_dim, conv_alpha, dim, alpha)
        self.lycoris_dropout()
        if kind != "lokr":
            for key in ("factor", "decompose_both"):
                if key in self.data and key not in self.handled:
                    self.ignore(key, self.take(key), "only LoKr reads it")

    def lycoris_conv(self, convs: bool, conv_dim: Any, conv_alpha: Any, dim: int, alpha: float) -> None:
        if not convs:
            for key, value in (("conv_dim", conv_dim), ("conv_alpha", conv_alpha)):
                if value is not None:
                    self.ignore(key, value, "no convolution layers are adapted")
            return
        dim_source = (
            "conv_dim" if conv_dim is not None else "network_dim (LyCORIS' conv_dim when none is given)"
        )
        alpha_source = (
            "conv_alpha"
            if conv_alpha is not None
            else "network_alpha (LyCORIS' conv_alpha when none is given)"
        )
        self.set("conv_dim", dim, dim_source)
        self.set("conv_alpha", alpha, alpha_source)

    def lycoris_preset(self) -> str:
        value = self.take("preset")
        preset = str(value or "full").strip()
        if preset not in LYCORIS_PRESETS:
            self.unsupported(
                "preset", value, "a LyCORIS preset file is not read; the full preset's layers are used"
            )
            self.handled.add("preset")
            return "full"
        return preset

    def lycoris_booleans(self) -> None:
        for key in LYCORIS_BOOLS:
            if key in self.data and isinstance(self.data[key], str):
                text = self.data[key]
                self.data[key] = _lycoris_bool(text)
                if text.strip().lower() not in ("true", "false"):
                    self.result.notes.append(f"{key}={text} read as {self.data[key]}, as LyCORIS reads it")
        tucker_keys = [key for key in ("use_tucker", "use_cp", "use_conv_cp") if key in self.data]
        disable = self.data.get("disable_conv_cp")
        if not tucker_keys and disable is None:
            return
        tucker = any(self.data[key] for key in tucker_keys) or (disable is not None and not disable)
        first = (tucker_keys or ["disable_conv_cp"])[0]
        self.set("use_tucker", tucker, first)
        for key in (*tucker_keys, "disable_conv_cp"):
            self.mark_read(key)

    def lycoris_unsupported_options(self) -> None:
        for key, default in LYCORIS_UNSUPPORTED_DEFAULTS.items():
            if key not in self.data:
                continue
            value = self.take(key)
            if isinstance(default, bool):
                neutral = _lycoris_bool(value) == default
            else:
                try:
                    neutral = float(value) == float(default)
                except (TypeError, ValueError):
                    neutral = False
            if neutral:
                self.ignore(key, value, "LyCORIS' default")
            else:
                self.unsupported(key, value, "a LyCORIS option with no equivalent here")

    def lycoris_dropout(self) -> None:
        """LyCORIS takes its dropout from network_args ``dropout``; sd-scripts passes network_dropout only
        when that entry is missing."""
        if "dropout" not in self.data:
            return
        value = self.convert("dropout", "float")
        if value is not None:
            self.set("network_dropout", value, "dropout")
        if "network_dropout" in self.data:
            self.ignore("network_dropout", self.take("network_dropout"), "network_args dropout overrides it")

    # --- learning rates, optimizer, schedule -------------------------------------------------------------
    def learning_rates(self) -> None:
        rates = self.data.get("text_encoder_lr")
        if isinstance(rates, list):  # newer sd-scripts: one rate per text encoder
            self.data["text_encoder_lr"] = rates[0] if rates else None
            if len(rates) > 1:
                self.result.notes.append(
                    "text_encoder_lr gives several rates; SD1.5 has one text encoder (the first)"
                )
        keys = ("learning_rate", "unet_lr", "text_encoder_lr")
        base, unet, text = (self.convert(key, "float") for key in keys)
        unet_only = bool(self.convert("network_train_unet_only", "bool"))
        text_only = bool(self.convert("network_train_text_encoder_only", "bool"))
        if any(key in self.problem_keys for key in keys):
            self.result.notes.append(
                "a learning rate could not be read, so all learning rates keep their previous values"
            )
            return
        if unet_only and text_only:
            self.report_problem(
                "network_train_unet_only",
                "network_train_unet_only and network_train_text_encoder_only are both set; nothing would be "
                "trained, so the previous learning rates are kept",
            )
            self.handled.add("network_train_text_encoder_only")
            return
        if base is None:
            base = LEARNING_RATE_DEFAULT
            if unet is None or text is None:
                self.result.notes.append(
                    f"learning_rate is not in the file: sd-scripts' default {base} is used"
                )
        self.unet_rate(unet, base, text_only)
        self.text_encoder_rate(text, base, unet_only)
        used = (unet is None and not text_only) or (text is None and not unet_only)
        if "learning_rate" in self.data and not used:
            self.ignore(
                "learning_rate", self.data["learning_rate"], "unet_lr and text_encoder_lr leave it unused"
            )
        for key, on in (
            ("network_train_unet_only", unet_only),
            ("network_train_text_encoder_only", text_only),
        ):
            if key in self.data and not on:
                self.ignore(key, self.data[key], "off")

    def unet_rate(self, unet: float | None, base: float, text_only: bool) -> None:
        if text_only:
            self.set("unet_lr", 0.0, "network_train_text_encoder_only")
            if unet is not None:
                self.ignore("unet_lr", unet, "network_train_text_encoder_only: the UNet is not trained")
        elif unet is not None:
            self.set("unet_lr", unet, "unet_lr" if unet else "unet_lr = 0 (sd-scripts then trains no UNet)")
        else:
            self.set("unet_lr", base, "learning_rate (unet_lr is not given)")

    def text_encoder_rate(self, text: float | None, base: float, unet_only: bool) -> None:
        if unet_only:
            self.set("train_text_encoder", False, "network_train_unet_only")
            if text is not None:
                self.ignore(
                    "text_encoder_lr", text, "network_train_unet_only: the text encoder is not trained"
                )
            return
        rate = text if text is not None else base
        source = "text_encoder_lr" if text is not None else "learning_rate (text_encoder_lr is not given)"
        if rate == 0:
            self.set("train_text_encoder", False, f"{source.split()[0]} = 0 (UNet only)")
            self.set("text_encoder_lr", 0.0, source)
        else:
            self.set("text_encoder_lr", rate, source)
            self.set("train_text_encoder", True, source)

    def optimizer_name(self) -> None:
        name = self.take("optimizer_type")
        eight_bit = self.convert("use_8bit_adam", "bool")
        lion = self.convert("use_lion_optimizer", "bool")
        if (eight_bit or lion) and name:
            message = "use_8bit_adam/use_lion_optimizer together with optimizer_type: sd-scripts refuses both"
            self.report_problem("optimizer_type", message)
            return
        if eight_bit:
            self.set("optimizer", "AdamW8bit", "use_8bit_adam")
        elif lion:
            self.set("optimizer", "Lion", "use_lion_optimizer")
        if name is None or eight_bit or lion:
            return
        wanted = str(name).strip() or "AdamW"
        mapped = {option.lower(): option for option in OPTIMIZERS}.get(wanted.lower())
        if mapped:
            self.set("optimizer", mapped, "optimizer_type")
        else:
            self.unsupported("optimizer_type", name, f"available here: {', '.join(OPTIMIZERS)}")

    def optimizer_arguments(self) -> None:
        _join_list_values(self.data, "optimizer_args")
        given = self.optimizer_argument_names()
        super().optimizer_arguments()
        if "optimizer_args" in self.problem_keys:
            return
        optimizer = self.values["optimizer"]
        defaults: dict[str, Any] = {}
        if "weight_decay" not in given:
            defaults["weight_decay"] = OPTIMIZER_WEIGHT_DECAY.get(optimizer, 0.0)
        for name, (our_field, value) in OPTIMIZER_ARGUMENT_FIELDS.items():
            if name not in given:
                defaults[our_field] = value
        if "relative_step" not in given:  # sd-scripts turns Adafactor's relative step on unless told not to
            defaults["adafactor_relative_step"] = optimizer == "Adafactor"
        if optimizer == "Adafactor" and self.optimizer_argument_is_true("warmup_init"):
            defaults["adafactor_relative_step"] = True  # sd-scripts: warmup_init needs relative steps
        self.apply_defaults(
            defaults, f"what optimizer_args leave out takes {optimizer}'s defaults in sd-scripts"
        )

    def optimizer_argument_tokens(self) -> list[str]:
        args = self.data.get("optimizer_args") or []
        if isinstance(args, str):
            return args.split()
        return [str(item) for item in args] if isinstance(args, list) else []

    def optimizer_argument_names(self) -> set[str]:
        return {token.partition("=")[0].strip() for token in self.optimizer_argument_tokens()}

    def optimizer_argument_is_true(self, name: str) -> bool:
        return any(
            token.replace(" ", "").lower() == f"{name}=true" for token in self.optimizer_argument_tokens()
        )

    def apply_defaults(self, defaults: dict[str, Any], why: str) -> None:
        changed = []
        for our_field, value in defaults.items():
            if self.values[our_field] != value and our_field not in self.result.applied:
                changed.append(f"{our_field} {value!r} (was {self.values[our_field]!r})")
                self.values[our_field] = value
        if changed:
            self.result.notes.append(f"{why}: {', '.join(changed)}")

    def scheduler_arguments(self) -> None:
        _join_list_values(self.data, "lr_scheduler_args")
        super().scheduler_arguments()
        name = self.values["lr_scheduler"]
        extra = self.schedule_extras(name)
        if not extra:
            return
        current = self.values["lr_scheduler_args"] if "lr_scheduler_args" in self.result.applied else ""
        present = {token.partition("=")[0] for token in current.split()}
        added = [f"{key}={value}" for key, (value, _source) in extra.items() if key not in present]
        if not added:
            return
        sources = [source for key, (_value, source) in extra.items() if key not in present]
        self.set("lr_scheduler_args", " ".join([*current.split(), *added]), sources[0])
        for source in sources[1:]:
            self.mark_read(source.split()[0])

    def schedule_extras(self, name: str) -> dict[str, tuple[Any, str]]:
        """sd-scripts' own scheduler arguments, in the form our schedules take them."""
        extra: dict[str, tuple[Any, str]] = {}
        ratio = self.convert("lr_scheduler_min_lr_ratio", "float")
        if ratio is not None:
            if name == "cosine_with_min_lr":
                extra["min_lr_rate"] = (ratio, "lr_scheduler_min_lr_ratio")
            elif name == "warmup_stable_decay":
                extra["min_lr_ratio"] = (ratio, "lr_scheduler_min_lr_ratio")
            else:
                self.ignore(
                    "lr_scheduler_min_lr_ratio",
                    ratio,
                    "only cosine_with_min_lr and warmup_stable_decay use it",
                )
        decay_value = self.take("lr_decay_steps")
        if name == "warmup_stable_decay":
            try:
                decay = _int_or_ratio(decay_value if decay_value is not None else 0)
            except (TypeError, ValueError) as error:
                self.report_problem("lr_decay_steps", f"lr_decay_steps = {decay_value!r}: {error}")
            else:  # sd-scripts' default is no decay at all
                extra["num_decay_steps"] = (decay if decay < 1 else int(decay), "lr_decay_steps")
        elif decay_value not in (None, 0, "0"):
            self.ignore("lr_decay_steps", decay_value, "only warmup_stable_decay uses it")
        cycles = self.values["lr_scheduler_num_cycles"]
        if name == "cosine_with_min_lr" and cycles != 1:  # sd-scripts passes num_cycles / 2
            extra["num_cycles"] = (cycles / 2, "lr_scheduler_num_cycles")
        return extra

    def warmup(self) -> None:
        value = self.take("lr_warmup_steps")
        if value is None:
            return
        try:
            steps = _int_or_ratio(value)
        except (TypeError, ValueError, OverflowError) as error:
            self.report_problem(
                "lr_warmup_steps", f"lr_warmup_steps = {value!r}: {error}; previous value kept"
            )
            return
        if isinstance(value, float) and value >= 1:
            self.result.notes.append(
                f"lr_warmup_steps = {value!r} read as {int(steps)} steps (sd-scripts would multiply a float "
                "by the number of steps)"
            )
        fraction = steps < 1 and steps != 0
        self.set(
            "lr_warmup_steps",
            float(steps),
            "lr_warmup_steps (a fraction of all steps)" if fraction else "lr_warmup_steps",
        )

    def seed(self) -> None:
        """The seed, and the validation split (sd-scripts draws both at random from seeds)."""
        seed = self.convert("seed", "int")
        if seed is not None:
            self.set("seed", seed, "seed")
        self.validation_split()

    def validation_split(self) -> None:
        split = self.convert("validation_split", "float")
        if split is None or split == 0 or "validation_split" in self.problem_keys:
            return
        if not 0 < split <= MAX_VALIDATION_SHARE:
            message = (
                f"validation_split = {split!r}: this trainer holds out at most {MAX_VALIDATION_SHARE:g} of "
                "the training images; previous value kept"
            )
            self.report_problem("validation_split", message)
            return
        self.set("validation_share", split, "validation_split")
        self.set("validation_dir", "", "validation_split (instead of a held-out folder)")
        self.set("validation_loss", True, "validation_split (the validation loss is measured on them)")
        self.result.notes.append(
            "validation_split: the held-out images are the same on every run, chosen by a hash of their "
            "file names (not drawn with validation_seed)"
        )

    # --- noise and samples ----------------------------------------------------------------------------
    def noise(self) -> None:
        """sd-scripts adds the noise offset and the multires noise independently (both when both are set)."""
        offset = self.convert("noise_offset", "float")
        self.original_noise_offset(offset, "sd-scripts refuses it without noise_offset")
        discount = self.data.get("multires_noise_discount")
        applied = self.multires_noise()
        if not applied and discount is not None and "multires_noise_discount" not in self.problem_keys:
            self.ignore("multires_noise_discount", discount, "only used with multires_noise_iterations")

    def sample_prompts(self) -> None:
        value = self.take("sample_prompts")
        if value is None:
            return
        if not isinstance(value, str) or not value.strip():
            self.ignore("sample_prompts", value, "empty")
            return
        path = _beside(value.strip(), self.folder)
        try:
            prompts, dropped = read_prompt_file(path)
        except ConfigError as error:
            message = f"sample_prompts = {value!r}: {'; '.join(error.messages)}; the tab's prompts are kept"
            self.report_problem("sample_prompts", message)
            return
        if dropped:
            self.result.notes.append(
                f"sample prompt settings {', '.join(sorted(dropped))} dropped; samples use the tab's "
                "sampler, size, seed and negative prompt"
            )
        if not prompts:
            self.ignore("sample_prompts", value, "the file has no prompts")
            return
        self.apply_prompt_lines("\n".join(prompts), f"sample_prompts (read from {path})")


def _join_list_values(data: dict[str, Any], key: str) -> None:
    """sd-scripts splits each list item at its first "=" only, so "betas=0.9, 0.99" is one item; ours are
    split at spaces, so the space after the comma goes."""
    items = data.get(key)
    if isinstance(items, list):
        data[key] = [re.sub(r",\s+", ",", str(item).strip()) for item in items]


def _unsupported_module_reason(module: str) -> str:
    if module.startswith("networks.dylora"):
        return "DyLoRA is not trained here; choose lora, locon, loha or lokr"
    if re.search(r"(sd3|flux|sdxl|hunyuan|lumina|anima|chroma)", module):
        return "a network for another model family; this tab trains SD1.5 LoRAs"
    return (
        "trained here: networks.lora (LoRA, LoCon with conv_dim) and lycoris.kohya (algo lora/locon, loha, "
        "lokr)"
    )


def _beside(value: str, folder: Path | None) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() or folder is None else folder / path


def read_prompt_file(path: Path) -> tuple[list[str], set[str]]:
    """The prompts of an sd-scripts sample prompt file (.txt: one a line, # comments; .toml: [prompt] with
    [[prompt.subset]]; .json: a list of texts or of {"prompt": ...}) and the per-prompt settings dropped."""
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".toml", ".json"):
        raise ConfigError(["sd-scripts reads sample prompts from a .txt, .toml or .json file"])
    if suffix == ".txt":
        lines = read_config_text(path, "the sample prompt file").splitlines()
        return [line.strip() for line in lines if line.strip() and not line.startswith("#")], set()
    data = read_settings_file(path, "the sample prompt file")
    if suffix == ".toml":
        prompt = data.get("prompt") if isinstance(data, dict) else None
        subsets = prompt.get("subset", []) if isinstance(prompt, dict) else None
        if not isinstance(subsets, list):
            raise ConfigError(["the sample prompt TOML has no [prompt] with [[prompt.subset]] tables"])
        entries: list[Any] = [{**prompt, **subset} for subset in subsets if isinstance(subset, dict)]
    else:
        if not isinstance(data, list):
            raise ConfigError(["the sample prompt JSON must be a list of prompts"])
        entries = data
    prompts: list[str] = []
    dropped: set[str] = set()
    for entry in entries:
        if isinstance(entry, str):
            prompts.append(entry.strip())
        elif isinstance(entry, dict) and isinstance(entry.get("prompt"), str):
            prompts.append(entry["prompt"].strip())
            dropped |= {key for key in entry if key not in ("prompt", "subset")}
    return [prompt for prompt in prompts if prompt], dropped


# --- sd-scripts' defaults ---------------------------------------------------------------------------------
def with_sd_scripts_defaults(
    base: TrainingConfig, data: dict[str, Any], replaced: set[str]
) -> tuple[TrainingConfig, list[str]]:
    """``base`` with sd-scripts' defaults for the settings the file leaves out (``data`` holds its keys,
    ``replaced`` the options a dataset config gives), and what changed."""
    values = base.to_dict()
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    changed: list[str] = []
    given = set(data) | replaced
    for our_field, keys, default in SD_SCRIPTS_DEFAULTS:
        if our_field not in known or any(key in given for key in keys):
            continue
        if values[our_field] == default:
            continue
        changed.append(f"{our_field} {default!r} (was {values[our_field]!r})")
        values[our_field] = default
    if not any(key in given for key in ("max_train_steps", "max_train_epochs")):
        if values["max_train_steps"] != MAX_TRAIN_STEPS_DEFAULT:
            changed.append(f"max_train_steps {MAX_TRAIN_STEPS_DEFAULT} (was {values['max_train_steps']!r})")
            values["max_train_steps"] = MAX_TRAIN_STEPS_DEFAULT
    elif "max_train_steps" not in given and values["max_train_steps"]:
        changed.append(
            f"max_train_steps 0 (was {values['max_train_steps']!r}; max_train_epochs sets the length)"
        )
        values["max_train_steps"] = 0
    notes = []
    if changed:
        notes.append(
            "not in the file, so sd-scripts' defaults are used (a --config_file is a whole command line): "
            + ", ".join(changed)
        )
    return TrainingConfig.from_dict(values), notes


# --- entry points -----------------------------------------------------------------------------------------
def _load_dataset(
    value: Any, folder: Path | None, arguments: dict[str, Any]
) -> tuple[DatasetMapping | None, str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, None
    if not isinstance(value, str):
        return None, f"dataset_config = {value!r}: must be the path of a .toml or .json file; not read"
    path = _beside(value.strip(), folder)
    if not path.exists():
        where = (
            "" if Path(value).is_absolute() or folder is None else f" (a relative path is read from {folder})"
        )
        return None, (
            f"dataset_config = {value!r}: {path} was not found{where}; give its full path in the TOML. The "
            "training folders are left as they were"
        )
    try:
        data = read_settings_file(path, "dataset_config")
    except ConfigError as error:
        return None, f"dataset_config = {value!r}: {'; '.join(error.messages)}"
    return map_dataset_config(data, arguments), None


def _given_keys(data: dict[str, Any], network_args: dict[str, Any], module: Any) -> dict[str, Any]:
    """The keys that set something in sd-scripts: network_args entries count only when the module reads
    them (an entry it ignores leaves sd-scripts' default in place)."""
    reads = {"networks.lora": KOHYA_LORA_ARGS, "lycoris.kohya": LYCORIS_ARGS}.get(
        str(module or "networks.lora").strip(), frozenset()
    )
    return {key: value for key, value in data.items() if key not in network_args or key in reads}


def _rename(result: KohyaImport, shown: dict[str, str]) -> None:
    """Show keys that came from the dataset config under their report names."""
    if not shown:
        return

    def first(text: str) -> str:
        head, sep, rest = text.partition(" ")
        name, colon, tail = head.partition(":")
        if name in shown:
            return f"{shown[name]}{colon}{tail}{sep}{rest}"
        return text

    result.read_from = {shown.get(key, key) for key in result.read_from}
    result.problem_keys = {shown.get(key, key) for key in result.problem_keys}
    result.sources = {name: first(source) for name, source in result.sources.items()}
    for items in (result.unsupported, result.ignored):
        items[:] = [ReportedKey(shown.get(i.key, i.key), i.value, i.reason) for i in items]
    for lines in (result.problems, result.notes, result.to_fix):
        lines[:] = [first(line) for line in lines]


def import_sd_scripts_config(
    data: dict[str, Any], base: TrainingConfig | None = None, *, folder: Path | None = None
) -> KohyaImport:
    """Map a parsed sd-scripts TOML onto ``base``: a --config_file (train_network.py arguments), or a
    dataset config of its own. ``folder`` is where relative dataset_config/sample_prompts paths are read."""
    if not isinstance(data, dict):
        raise ConfigError(["an sd-scripts config must be a TOML table"])
    base = base or TrainingConfig()
    flat, notes = flatten_sections(data)
    if is_dataset_config(data) and "network_module" not in flat:
        return _import_dataset_only(data, base)
    translation = _translate(flat)
    dataset, dataset_problem = _load_dataset(flat.get("dataset_config"), folder, translation.data)
    importer_data = dict(translation.data)
    replaced_top: list[ReportedKey] = []
    if dataset_problem:  # sd-scripts would not fall back to these either
        for argument in ("train_data_dir", "reg_data_dir", "in_json"):
            if argument in importer_data:
                reason = "not used, as a dataset_config is given (sd-scripts ignores it then)"
                replaced_top.append(ReportedKey(argument, importer_data.pop(argument), reason))
    if dataset is not None:
        for argument, reason in dataset.replaces.items():
            if argument in importer_data:
                replaced_top.append(ReportedKey(argument, importer_data.pop(argument), reason))
        importer_data.update(dataset.arguments)
    given = _given_keys(importer_data, translation.network_args, flat.get("network_module"))
    replaced = set(dataset.replaces) if dataset is not None else set()
    start, default_notes = with_sd_scripts_defaults(base, given, replaced)
    importer = _SdScriptsImporter(
        importer_data,
        start,
        network_args=translation.network_args,
        dataset=dataset,
        dataset_problem=dataset_problem,
        folder=folder,
    )
    importer.result.notes.extend(notes + translation.notes + default_notes)
    result = importer.run()
    _rename(result, dataset.shown_as if dataset is not None else {})
    _add_reports(result, translation, dataset, replaced_top)
    result.source_label = SD_SCRIPTS_LABEL
    _log(result)
    return result


def _add_reports(
    result: KohyaImport,
    translation: _Translation,
    dataset: DatasetMapping | None,
    replaced: list[ReportedKey],
) -> None:
    result.ignored.extend(translation.ignored + replaced)
    result.problems[:0] = translation.problems
    result.problem_keys |= translation.problem_keys
    if dataset is not None:
        result.unsupported.extend(dataset.unsupported)
        result.ignored.extend(dataset.ignored)
        result.problems[:0] = dataset.problems
        result.notes.extend(dataset.notes)


def _import_dataset_only(data: dict[str, Any], base: TrainingConfig) -> KohyaImport:
    dataset = map_dataset_config(data, {})
    importer = _SdScriptsImporter(
        dict(dataset.arguments), base, network_args={}, dataset=dataset, dataset_problem=None, folder=None
    )
    result = _run_dataset_steps(importer)
    _rename(result, dataset.shown_as)
    result.unsupported.extend(dataset.unsupported)
    result.ignored.extend(dataset.ignored)
    result.problems[:0] = dataset.problems
    result.notes.extend(dataset.notes)
    result.source_label = "sd-scripts dataset config"
    _log(result)
    return result


def _run_dataset_steps(importer: _SdScriptsImporter) -> KohyaImport:
    """Only the steps a dataset config can touch, so the tab's other settings stay as they are."""
    importer.simple_fields()
    importer.folders()
    importer.resolution()
    importer.loss_shaping()
    importer.remaining()
    importer.superseded()
    return importer.finish()


def _log(result: KohyaImport) -> None:
    for item in result.unsupported:
        logger.warning("sd-scripts import: not supported: %s", item.line())
    for line in result.problems:
        logger.warning("sd-scripts import: %s", line)


def load_sd_scripts_toml(path: str | Path, base: TrainingConfig | None = None) -> KohyaImport:
    """Read an sd-scripts TOML (a --config_file or a dataset config) and map it."""
    file = Path(path)
    data = read_toml_file(file, "sd-scripts config")
    return import_sd_scripts_config(data, base, folder=file.parent)


def load_kohya_config(path: str | Path, base: TrainingConfig | None = None) -> KohyaImport:
    """The tab's import: a kohya_ss GUI .json or an sd-scripts .toml, told apart by the suffix (by the
    first character when the suffix is neither)."""
    file = Path(path)
    suffix = file.suffix.lower()
    if suffix == ".json":
        return load_kohya_ss_json(file, base)
    if suffix == ".toml":
        return load_sd_scripts_toml(file, base)
    text = read_config_text(file, "kohya config")
    if text.lstrip().startswith("{"):
        return load_kohya_ss_json(file, base)
    data = parse_toml(text, f"{file} (neither a kohya_ss JSON nor an sd-scripts TOML)")
    return import_sd_scripts_config(data, base, folder=file.parent)
