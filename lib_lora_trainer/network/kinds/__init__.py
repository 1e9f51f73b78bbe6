"""The adapter kinds, one small module each (as A1111's ``extensions-builtin/Lora/network_*.py``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lib_lora_trainer.network.kinds.base import AdapterKind, KindSettings, ModuleTensors
from lib_lora_trainer.network.kinds.loha import LohaKind
from lib_lora_trainer.network.kinds.lokr import LokrKind
from lib_lora_trainer.network.kinds.lora import LoraKind

KINDS: dict[str, AdapterKind] = {kind.algo: kind for kind in (LoraKind(), LohaKind(), LokrKind())}

__all__ = ["KINDS", "AdapterKind", "KindSettings", "ModuleTensors", "kind_for", "kind_of_parts"]


def kind_for(algo: str) -> AdapterKind:
    try:
        return KINDS[algo]
    except KeyError:
        raise ValueError(f"unknown network algorithm {algo!r}; choose one of {', '.join(KINDS)}") from None


def kind_of_parts(label: str, parts: Mapping[str, torch.Tensor]) -> AdapterKind:
    """The kind a saved module belongs to, tested in A1111's order (LoRA, LoHa, LoKr)."""
    for kind in KINDS.values():
        if kind.owns(parts):
            return kind
    raise ValueError(
        f"{label} is not a LoRA, LoCon, LoHa or LoKr module (its parts are {', '.join(sorted(parts))})"
    )
