"""The hashes sd-scripts writes into a LoRA file's header (``sshs_model_hash``, ``sshs_legacy_hash``).

A1111 reads them from the header instead of hashing the file.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import safetensors.torch
import torch

LEGACY_HASH_OFFSET = 0x100000
LEGACY_HASH_LENGTH = 0x10000


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
