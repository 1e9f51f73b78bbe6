"""Map an sd-scripts dataset config (``--dataset_config``, ``library/config_util.py``) onto this trainer's
dataset settings: one training folder (flat with ``flat_repeats``, or kohya ``N_name`` subfolders), one
regularisation folder, and one value of each caption/augmentation/bucket option for every image.

sd-scripts resolves every option of a subset from the first level that gives it: the subset, its
``[[datasets]]`` entry, ``[general]``, the command line (the main TOML), then its own default. The same
order is followed here; an option that ends up with one value for all subsets is applied, one that
differs between subsets is reported as not supported (one value applies to all images here). What
cannot become one folder (several unrelated ``image_dir``) is reported, and the folder is left as it was.

Only parsed data comes in (no file is read here); the mapping never raises for bad input.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

# kohya folder names read as the dataset scan reads them (10_alice: 10 repeats, class token "alice")
from lib_lora_trainer.dataset.scan import KOHYA_FOLDER_PATTERN
from lib_lora_trainer.kohya_ss_import import ReportedKey

# sd-scripts' defaults (train_network.py's argparse defaults, then config_util's dataclasses) for the
# options a subset can carry; the folder options (image_dir, num_repeats, is_reg, class_tokens) are mapped
# to the training/regularisation folder instead.
SUBSET_DEFAULTS: dict[str, Any] = {
    "shuffle_caption": False,
    "caption_separator": ",",
    "keep_tokens": 0,
    "keep_tokens_separator": "",
    "secondary_separator": None,
    "enable_wildcard": False,
    "color_aug": False,
    "flip_aug": False,
    "face_crop_aug_range": None,
    "random_crop": False,
    "caption_prefix": None,
    "caption_suffix": None,
    "caption_dropout_rate": 0.0,
    "caption_dropout_every_n_epochs": 0,
    "caption_tag_dropout_rate": 0.0,
    "token_warmup_min": 1,
    "token_warmup_step": 0,
    "custom_attributes": None,
    "resize_interpolation": None,
    "caption_extension": ".caption",
    "cache_info": False,
    "alpha_mask": False,
    "conditioning_data_dir": None,  # mask images (train_network.py with --masked_loss)
}
DATASET_DEFAULTS: dict[str, Any] = {
    "batch_size": 1,
    "enable_bucket": False,
    "min_bucket_reso": 256,
    "max_bucket_reso": 1024,
    "bucket_reso_steps": 64,
    "bucket_no_upscale": False,
    "resolution": None,
    "network_multiplier": 1.0,
    "validation_seed": None,
    "validation_split": 0.0,
}
FOLDER_OPTIONS = ("image_dir", "num_repeats", "is_reg", "class_tokens")
# config option -> the train_network.py argument that is its fallback (and that the importer reads)
ARGUMENT_NAMES = {"batch_size": "train_batch_size", "num_repeats": "dataset_repeats"}
_SUBSET_ONLY = {"image_dir", "is_reg", "alpha_mask", "metadata_file", "conditioning_data_dir"}
_SUBSET_KEYS = set(SUBSET_DEFAULTS) | set(FOLDER_OPTIONS) | {"metadata_file"}
_DATASET_KEYS = (
    set(SUBSET_DEFAULTS) | set(DATASET_DEFAULTS) | {"num_repeats", "class_tokens"}
) - _SUBSET_ONLY
_GENERAL_KEYS = _DATASET_KEYS
_TRAIN_ONLY = {"conditioning_data_dir"}  # regularisation subsets carry no masks
SOURCE = "dataset_config"


@dataclass
class DatasetMapping:
    """What the dataset config sets; ``arguments`` uses train_network.py's argument names."""

    arguments: dict[str, Any] = field(default_factory=dict)  # one value for every subset
    shown_as: dict[str, str] = field(default_factory=dict)  # argument -> the name the report shows
    folder_settings: list[tuple[str, Any, str]] = field(default_factory=list)  # (our field, value, source)
    replaces: dict[str, str] = field(default_factory=dict)  # top-level argument -> why it is not used
    unsupported: list[ReportedKey] = field(default_factory=list)
    ignored: list[ReportedKey] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Subset:
    label: str
    options: dict[str, Any]  # every option resolved through subset -> dataset -> general -> arguments


def map_dataset_config(config: Any, arguments: dict[str, Any]) -> DatasetMapping:
    """Map a parsed dataset config; ``arguments`` are the main TOML's (flattened) train_network.py
    arguments, the fallback for options the dataset config does not give."""
    mapping = DatasetMapping()
    for argument in ("train_data_dir", "reg_data_dir", "in_json"):
        mapping.replaces[argument] = "sd-scripts ignores it when a dataset_config is given"
    if not isinstance(config, dict):
        mapping.problems.append(f"{SOURCE}: the file must hold a table, not {type(config).__name__}")
        return mapping
    general = config.get("general", {})
    datasets = config.get("datasets", [])
    if not isinstance(general, dict):
        mapping.problems.append(f"{SOURCE}: [general] must be a table; it is not read")
        general = {}
    if not isinstance(datasets, list) or not all(isinstance(entry, dict) for entry in datasets):
        mapping.problems.append(f"{SOURCE}: datasets must be [[datasets]] tables; none is read")
        return mapping
    for key, value in config.items():
        if key not in ("general", "datasets"):
            _report_unknown(mapping, key, value, "sd-scripts reads only [general] and [[datasets]]")
    _check_keys(mapping, general, _GENERAL_KEYS, "[general]")
    subsets = _resolve_subsets(mapping, general, datasets, arguments)
    mentioned = _mentioned_options(general, datasets)
    _agree_on_options(mapping, subsets, mentioned)
    _agree_on_dataset_options(mapping, general, datasets, arguments, mentioned)
    _map_folders(mapping, subsets)
    return mapping


# --- reading the levels --------------------------------------------------------------------------------
def _report_unknown(mapping: DatasetMapping, key: str, value: Any, reason: str) -> None:
    name = f"{key} ({SOURCE})"
    if all(item.key != name for item in mapping.unsupported):
        mapping.unsupported.append(ReportedKey(name, value, reason))


def _check_keys(mapping: DatasetMapping, table: dict[str, Any], allowed: set[str], where: str) -> None:
    for key, value in table.items():
        if key in allowed or (where.startswith("[[datasets]]") and key == "subsets"):
            continue
        if key in _SUBSET_KEYS:
            reason = f"sd-scripts allows it only in [[datasets.subsets]], not in {where}"
        else:
            reason = "not an sd-scripts dataset option (sd-scripts refuses the file)"
        _report_unknown(mapping, key, value, reason)


def _mentioned_options(general: dict[str, Any], datasets: list[dict[str, Any]]) -> set[str]:
    names = set(general)
    for dataset in datasets:
        names |= set(dataset) - {"subsets"}
        for subset in dataset.get("subsets", []) if isinstance(dataset.get("subsets"), list) else []:
            if isinstance(subset, dict):
                names |= set(subset)
    return names


def _first_given(key: str, levels: list[dict[str, Any]], default: Any) -> Any:
    for level in levels:
        value = level.get(key)
        if value is not None:
            return value
    return default


def _resolve_subsets(
    mapping: DatasetMapping,
    general: dict[str, Any],
    datasets: list[dict[str, Any]],
    arguments: dict[str, Any],
) -> list[_Subset]:
    renamed = {option: arguments.get(argument) for option, argument in ARGUMENT_NAMES.items()}
    fallback = {**arguments, **{option: value for option, value in renamed.items() if value is not None}}
    resolved: list[_Subset] = []
    for index, dataset in enumerate(datasets):
        where = f"[[datasets]] {index + 1}"
        _check_keys(mapping, dataset, _DATASET_KEYS, where)
        subsets = dataset.get("subsets", [])
        if not isinstance(subsets, list) or not all(isinstance(entry, dict) for entry in subsets):
            mapping.problems.append(f"{SOURCE}: the subsets of {where} must be tables; they are not read")
            continue
        for position, subset in enumerate(subsets):
            _check_keys(mapping, subset, _SUBSET_KEYS, "[[datasets.subsets]]")
            levels = [subset, dataset, general, fallback]
            options = {key: _first_given(key, levels, default) for key, default in SUBSET_DEFAULTS.items()}
            options["image_dir"] = subset.get("image_dir")
            options["is_reg"] = bool(subset.get("is_reg", False))
            options["num_repeats"] = _first_given("num_repeats", levels, 1)
            options["class_tokens"] = _first_given("class_tokens", [subset, dataset, general], None)
            label = _label(subset.get("image_dir"), index, position)
            if any(other.label == label for other in resolved):  # two folders of the same name
                label = f"{label} (datasets[{index}].subsets[{position}])"
            if "metadata_file" in subset:
                reason = (
                    "fine-tuning subsets (a metadata JSON of captions) are not read; captions come from files"
                )
                _report_unknown(mapping, "metadata_file", subset["metadata_file"], reason)
                continue
            resolved.append(_Subset(label, options))
    return resolved


def _label(image_dir: Any, dataset_index: int, position: int) -> str:
    if isinstance(image_dir, str) and image_dir.strip():
        return _path_parts(image_dir)[1] or image_dir
    return f"datasets[{dataset_index}].subsets[{position}]"


# --- one value per option ---------------------------------------------------------------------------------
def _shown(option: str) -> str:
    return f"{option} ({SOURCE})"


def _agree_on_options(mapping: DatasetMapping, subsets: list[_Subset], mentioned: set[str]) -> None:
    """One value per option over the training subsets; regularisation subsets get the same value here,
    and a note says where theirs differed."""
    train = [subset for subset in subsets if not subset.options["is_reg"]] or subsets
    reg = [subset for subset in subsets if subset.options["is_reg"] and subset not in train]
    for option in SUBSET_DEFAULTS:
        if option not in mentioned:
            continue  # the command line's value (or sd-scripts' default) applies to every subset alike
        values = {subset.label: subset.options[option] for subset in train}
        _one_value(mapping, option, values, "training subsets")
        argument = ARGUMENT_NAMES.get(option, option)
        if argument not in mapping.arguments or option in _TRAIN_ONLY:
            continue
        differing = [s.label for s in reg if repr(s.options[option]) != repr(mapping.arguments[argument])]
        if differing:
            mapping.notes.append(
                f"{option}: the regularisation subsets {', '.join(differing)} have another value; here the "
                f"training subsets' {mapping.arguments[argument]!r} applies to their images too"
            )


def _agree_on_dataset_options(
    mapping: DatasetMapping,
    general: dict[str, Any],
    datasets: list[dict[str, Any]],
    arguments: dict[str, Any],
    mentioned: set[str],
) -> None:
    for option, default in DATASET_DEFAULTS.items():
        if option not in mentioned:
            continue
        argument = ARGUMENT_NAMES.get(option, option)
        fallback = {option: arguments.get(argument)}
        values = {
            f"datasets[{index}]": _first_given(option, [dataset, general, fallback], default)
            for index, dataset in enumerate(datasets)
        }
        if option == "resolution":
            values = {label: _resolution_text(value) for label, value in values.items()}
        _one_value(mapping, option, values, "datasets")


def _resolution_text(value: Any) -> Any:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return f"{value[0]},{value[1]}"
    return value


def _one_value(mapping: DatasetMapping, option: str, values: dict[str, Any], what: str) -> None:
    if not values:
        return
    argument = ARGUMENT_NAMES.get(option, option)
    mapping.replaces[argument] = f"the {SOURCE} sets {option} for its {what}"
    distinct = {repr(value) for value in values.values()}
    if len(distinct) == 1:
        mapping.arguments[argument] = next(iter(values.values()))
        mapping.shown_as[argument] = _shown(option)
        return
    reason = f"differs between the {what}; one value applies to every image here (previous value kept)"
    mapping.unsupported.append(ReportedKey(_shown(option), values, reason))


# --- folders ----------------------------------------------------------------------------------------------
def _map_folders(mapping: DatasetMapping, subsets: list[_Subset]) -> None:
    train = [subset for subset in subsets if not subset.options["is_reg"]]
    reg = [subset for subset in subsets if subset.options["is_reg"]]
    missing = [subset.label for subset in subsets if not _text(subset.options["image_dir"])]
    if missing:
        mapping.problems.append(
            f"{SOURCE}: subsets without image_dir ({', '.join(missing)}) are not read (sd-scripts needs one)"
        )
        train = [subset for subset in train if subset.label not in missing]
        reg = [subset for subset in reg if subset.label not in missing]
    for subset in train + reg:
        _note_relative(mapping, subset.options["image_dir"])
    _map_training_folder(mapping, train)
    _map_regularisation_folder(mapping, reg)


def _text(value: Any) -> str:
    return value.strip() if isinstance(value, str) else ""


def _map_training_folder(mapping: DatasetMapping, train: list[_Subset]) -> None:
    if not train:
        mapping.problems.append(
            f"{SOURCE}: no training subset (every subset is is_reg); training folder kept"
        )
        return
    if len(train) == 1:
        subset = train[0]
        repeats = _repeats(mapping, subset)
        if repeats is None:
            return
        source = f"{SOURCE} (subset {subset.label}: image_dir, num_repeats)"
        mapping.folder_settings += [
            ("train_data_dir", _text(subset.options["image_dir"]), source),
            ("dataset_layout", "flat", source),
            ("flat_repeats", repeats, source),
        ]
        tokens = subset.options["class_tokens"]
        if isinstance(tokens, str) and tokens.strip():
            mapping.folder_settings.append(("class_token", tokens.strip(), f"{SOURCE} (class_tokens)"))
        return
    parent, reason = _kohya_parent(train)
    if parent is None:
        dirs = [_text(subset.options["image_dir"]) for subset in train]
        mapping.unsupported.append(
            ReportedKey(
                _shown("image_dir"), dirs, f"{reason}; choose one training folder (previous one kept)"
            )
        )
        return
    source = f"{SOURCE} (subsets {', '.join(s.label for s in train)} are the N_name folders of {parent})"
    mapping.folder_settings += [("train_data_dir", parent, source), ("dataset_layout", "kohya", source)]


def _map_regularisation_folder(mapping: DatasetMapping, reg: list[_Subset]) -> None:
    if not reg:
        mapping.folder_settings.append(("reg_data_dir", "", f"{SOURCE} (no is_reg subset)"))
        return
    repeats = [_repeats(mapping, subset) for subset in reg]
    if None in repeats:
        return
    if repeats == [1]:  # a folder of images: read with 1 repeat, as sd-scripts' num_repeats = 1
        subset = reg[0]
        source = f"{SOURCE} (is_reg subset {subset.label})"
        mapping.folder_settings.append(("reg_data_dir", _text(subset.options["image_dir"]), source))
        return
    parent, reason = _kohya_parent(reg)
    if parent is None:
        if len(reg) == 1:
            reason = (
                "a regularisation folder of images is read with 1 repeat; give it N_name subfolders instead"
            )
        dirs = [_text(subset.options["image_dir"]) for subset in reg]
        mapping.unsupported.append(
            ReportedKey(f"is_reg image_dir ({SOURCE})", dirs, f"{reason} (previous one kept)")
        )
        return
    source = f"{SOURCE} (is_reg subsets {', '.join(s.label for s in reg)} are the N_name folders of {parent})"
    mapping.folder_settings.append(("reg_data_dir", parent, source))


def _repeats(mapping: DatasetMapping, subset: _Subset) -> int | None:
    value = subset.options["num_repeats"]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not number or value != int(value) or value < 1:
        mapping.problems.append(
            f"{SOURCE}: num_repeats = {value!r} of subset {subset.label} is not a whole number >= 1"
        )
        return None
    return int(value)


def _kohya_parent(subsets: list[_Subset]) -> tuple[str | None, str]:
    """The folder whose N_name subfolders are exactly these subsets (N = num_repeats), or why not."""
    parts = [_path_parts(_text(subset.options["image_dir"])) for subset in subsets]
    parents = {parent for parent, _ in parts}
    if len(parents) != 1:
        return None, "this trainer takes one training folder; these image_dir are in different folders"
    parent = parents.pop()
    for subset, (_, name) in zip(subsets, parts, strict=True):
        match = KOHYA_FOLDER_PATTERN.match(name)
        repeats = subset.options["num_repeats"]
        if not match or int(match.group(1)) != repeats:
            return None, (
                f"the folder {name!r} is not named N_name with N = its num_repeats {repeats!r}, so its "
                "repeats cannot come from the folder name here"
            )
        tokens = subset.options["class_tokens"]
        if isinstance(tokens, str) and tokens.strip() and tokens.strip() != match.group(2).strip():
            return None, (
                f"subset {subset.label} has class_tokens {tokens!r}, but here the class tokens of an N_name "
                f"folder come from its name ({match.group(2).strip()!r})"
            )
    extra = _other_kohya_folders(parent, {name for _, name in parts})
    if extra:
        return (
            None,
            f"{parent} also holds N_name folders the dataset config does not train ({', '.join(extra)})",
        )
    return parent, ""


def _other_kohya_folders(parent: str, names: set[str]) -> list[str]:
    folder = Path(parent)
    try:
        if not folder.is_dir():
            return []  # not on this machine: nothing to compare with
        found = [entry.name for entry in folder.iterdir() if entry.is_dir() and _repeats_of(entry.name) >= 1]
    except OSError:
        return []
    return sorted(name for name in found if name not in names)


def _repeats_of(folder_name: str) -> int:
    """N of an ``N_name`` folder; 0 for any other name."""
    match = KOHYA_FOLDER_PATTERN.match(folder_name)
    return int(match.group(1)) if match else 0


def _path_parts(text: str) -> tuple[str, str]:
    """(parent, name) of a path written on Windows or POSIX, whichever this machine is."""
    windows = "\\" in text or re.match(r"^[A-Za-z]:", text) is not None
    pure = PureWindowsPath(text) if windows else PurePosixPath(text)
    return str(pure.parent), pure.name


def _note_relative(mapping: DatasetMapping, image_dir: Any) -> None:
    text = _text(image_dir)
    if text and not (PurePosixPath(text).is_absolute() or PureWindowsPath(text).is_absolute()):
        mapping.notes.append(
            f"image_dir {text!r} is relative: sd-scripts read it from the folder it ran in, this trainer "
            "from the WebUI's folder; give the full path if the dataset is not found"
        )
