"""kohya-format network files, by what callers need: names, reading and writing, metadata, hashes.

The work lives in small modules (:mod:`.names`, :mod:`.kohya_file`, :mod:`.metadata`, :mod:`.hashing`);
this module gathers their public names so callers keep one import.
"""

from __future__ import annotations

from lib_lora_trainer.network.hashing import LEGACY_HASH_LENGTH, LEGACY_HASH_OFFSET, safetensors_hashes
from lib_lora_trainer.network.kohya_file import (
    ALPHA_SUFFIX,
    DOWN_SUFFIX,
    SAVE_DTYPES,
    UP_SUFFIX,
    LoraModuleWeights,
    NonFiniteWeights,
    Precision,
    kohya_state_dict,
    load_kohya_lora,
    load_network_file,
    save_kohya_lora,
)
from lib_lora_trainer.network.kohya_names import kohya_name, module_name_from_kohya
from lib_lora_trainer.network.metadata import (
    BASE_MODEL_VERSION,
    MODELSPEC_ARCHITECTURE,
    NETWORK_MODULE,
    TrainingRunInfo,
    build_metadata,
    count_tags,
)
from lib_lora_trainer.network.names import epoch_file_name, step_file_name

__all__ = [
    "ALPHA_SUFFIX",
    "BASE_MODEL_VERSION",
    "DOWN_SUFFIX",
    "LEGACY_HASH_LENGTH",
    "LEGACY_HASH_OFFSET",
    "MODELSPEC_ARCHITECTURE",
    "NETWORK_MODULE",
    "NonFiniteWeights",
    "SAVE_DTYPES",
    "UP_SUFFIX",
    "LoraModuleWeights",
    "Precision",
    "TrainingRunInfo",
    "build_metadata",
    "count_tags",
    "epoch_file_name",
    "kohya_name",
    "kohya_state_dict",
    "load_kohya_lora",
    "load_network_file",
    "module_name_from_kohya",
    "safetensors_hashes",
    "save_kohya_lora",
    "step_file_name",
]
