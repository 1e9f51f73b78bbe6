"""The extension's settings: a section of A1111's "Training" category (Settings > Training)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

SECTION = ("lora_char_trainer", "Character LoRA trainer")
CATEGORY = "training"


@dataclass(frozen=True)
class Option:
    key: str
    default: Any
    label: str
    is_path: bool = False


def options(data_path: str, models_path: str) -> list[Option]:
    return [
        Option(
            "lct_datasets_dir",
            os.path.join(data_path, "datasets"),
            "Datasets folder (the tab starts here; when the WebUI is reachable from other machines, "
            "training images must be inside the WebUI's own datasets folder and this setting is not used)",
            is_path=True,
        ),
        Option(
            "lct_tagger_models_dir",
            os.path.join(models_path, "wd14_tagger"),
            "WD14 tagger model folder (each model is downloaded into it once; when the WebUI is reachable "
            "from other machines, models/wd14_tagger is used)",
            is_path=True,
        ),
        Option("lct_allow_tagger_download", True, "Download a missing WD14 tagger model from Hugging Face"),
        Option(
            "lct_scorer_models_dir",
            os.path.join(models_path, "lora_trainer_scorers"),
            "Epoch-scoring model folder (face, character and CLIP models, each downloaded into it once)",
            is_path=True,
        ),
        Option("lct_allow_scorer_download", True, "Download a missing epoch-scoring model from Hugging Face"),
        Option(
            "lct_lora_subfolder",
            "character_trainer",
            "Subfolder of the Lora folder for trained epochs",
            is_path=True,
        ),
        Option(
            "lct_samples_subfolder",
            "lora-trainer",
            "Subfolder of the txt2img output folder for epoch samples",
            is_path=True,
        ),
    ]


def register() -> None:
    """Add the options (call from ``on_ui_settings``). Folder options are hidden and locked under
    ``--hide-ui-dir-config`` like A1111's own output folders."""
    from modules import shared
    from modules.paths_internal import data_path, models_path

    for option in options(data_path, models_path):
        component_args = shared.hide_dirs if option.is_path else None
        info = shared.OptionInfo(
            option.default, option.label, component_args=component_args, section=SECTION, category_id=CATEGORY
        )
        shared.opts.add_option(option.key, info)
        if option.is_path:
            shared.restricted_opts.add(option.key)


def default(key: str) -> Any:
    """The option's default: fixed by the WebUI's own folders (``--data-dir``, ``--models-dir``), so no
    browser or API user can change it."""
    from modules.paths_internal import data_path, models_path

    return {option.key: option.default for option in options(data_path, models_path)}[key]


def value(key: str) -> Any:
    """The option's value, or its default before the settings were registered (``--nowebui``)."""
    from modules import shared

    return shared.opts.data.get(key, default(key))
