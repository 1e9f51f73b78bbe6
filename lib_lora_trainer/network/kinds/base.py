"""What every adapter kind provides, as A1111's ``network.py`` does for its module types.

A kind is one small class: the peft config that trains it, the peft parameters that hold each part of
the kohya/LyCORIS file (``lora_down.weight``, ``hada_w1_a``, ``lokr_w1`` ...), and the parts that tell
its saved modules apart. Export and load are written once here over that part table; peft does the maths.
What LoHa and LoKr share besides (their peft config options and parameter dicts) is in ``lycoris.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

ADAPTER_NAME = "default"
ALPHA_PART = "alpha"

ModuleTensors = dict[str, torch.Tensor]  # one module's file parts: {"lora_down.weight": ..., "alpha": ...}


@dataclass(frozen=True)
class KindSettings:
    """The network-wide choices of a kind (kohya/LyCORIS ``network_args``)."""

    algo: str = "lora"  # "lora" (LoRA, LoCon, DoRA), "loha" or "lokr"
    dora_wd: bool = False  # DoRA: LoRA/LoCon with weight decomposition
    use_tucker: bool = False  # LoHa/LoKr: Tucker (CP) form for 3x3 convolutions
    lokr_factor: int = -1  # LoKr: Kronecker factor, -1 = near the square root
    lokr_decompose_both: bool = False  # LoKr: w1 also low-rank (files from LyCORIS with decompose_both)
    rank_dropout: float = 0.0  # LoHa/LoKr: handed to peft (LyCORIS' rank dropout)


@dataclass(frozen=True)
class PeftTarget:
    full_name: str  # peft's name under the throw-away root: "unet.<ldm name>" or "text_encoder.<name>"
    rank: int
    alpha: float


def most_common_rank_and_alpha(targets: Sequence[PeftTarget]) -> tuple[int, float]:
    pairs = [(t.rank, t.alpha) for t in targets]
    return max(set(pairs), key=pairs.count)


def peft_target_options(targets: Sequence[PeftTarget], alpha_option: str = "alpha") -> dict[str, object]:
    """peft config options for the targets: ``r`` and alpha (peft's LoRA calls it ``lora_alpha``) for the
    most common pair, and per-module patterns for the rest."""
    rank, alpha = most_common_rank_and_alpha(targets)
    return {
        "r": rank,
        alpha_option: alpha,
        "target_modules": [t.full_name for t in targets],
        "rank_pattern": {t.full_name: t.rank for t in targets if t.rank != rank},
        "alpha_pattern": {t.full_name: t.alpha for t in targets if t.alpha != alpha},
    }


class AdapterKind:
    """One adapter type. Subclasses fill in the peft side and the part table."""

    algo: str = ""
    # Every part A1111's module type for this kind reads (besides ``alpha`` and ``dora_scale``).
    file_parts: tuple[str, ...] = ()
    # Parts LoRA+ treats as "up" (B): they get the learning rate times the LoRA+ ratio.
    up_parts: tuple[str, ...] = ()

    def peft_model(self, root: nn.Module, targets: Sequence[PeftTarget], settings: KindSettings) -> nn.Module:
        raise NotImplementedError

    def prepare_layer(self, layer: nn.Module, settings: KindSettings) -> None:
        """After injection: adapters in float32 (peft follows an fp16 base) and trainable."""
        for parameter in self.parameters(layer).values():
            parameter.data = parameter.data.float()
            parameter.requires_grad_(True)

    def parameters(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        """The layer's trainable parameters by file part name, in a stable order."""
        raise NotImplementedError

    def rank_and_alpha(self, layer: nn.Module) -> tuple[int, float]:
        return int(layer.r[ADAPTER_NAME]), float(layer.alpha[ADAPTER_NAME])

    def file_alpha(self, layer: nn.Module) -> float:
        """The alpha written to the file: the one that makes every loader scale the update as peft does."""
        return self.rank_and_alpha(layer)[1]

    def delta_weight(self, layer: nn.Module) -> torch.Tensor:
        """The update added to the layer's weight (before any DoRA decomposition), as peft computes it."""
        mode = layer.training
        layer.training = False  # peft's LyCORIS layers apply rank dropout to it in training mode
        try:
            return layer.get_delta_weight(ADAPTER_NAME)
        finally:
            layer.training = mode

    def scale_update(self, layer: nn.Module, ratio: float) -> None:
        """Multiply the layer's update by ``ratio`` (the parts of each product scaled evenly)."""
        raise NotImplementedError

    def export(self, layer: nn.Module) -> ModuleTensors:
        tensors = {part: p.detach().float().cpu().clone() for part, p in self.parameters(layer).items()}
        tensors[ALPHA_PART] = torch.tensor(float(self.file_alpha(layer)))
        return tensors

    @torch.no_grad()
    def load(self, layer: nn.Module, label: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy saved parts into the layer; every part must be there with the shape the layer has."""
        parameters = self.parameters(layer)
        wanted = set(parameters)
        given = set(tensors) - {ALPHA_PART}
        if given != wanted:
            raise ValueError(
                f"the saved network's {label} has the parts {sorted(given)}, the current settings train "
                f"{sorted(wanted)} (another network type, Tucker or DoRA setting?)"
            )
        for part, parameter in parameters.items():
            value = tensors[part]
            if tuple(value.shape) != tuple(parameter.shape):
                raise ValueError(
                    f"the saved network's {label} has {part} of shape {tuple(value.shape)}, the current "
                    f"settings need {tuple(parameter.shape)} (a different rank or factor?)"
                )
            parameter.copy_(value.to(parameter.dtype))

    # --- reading files ------------------------------------------------------------------------------
    def owns(self, parts: Mapping[str, torch.Tensor]) -> bool:
        """Whether a saved module with these parts is of this kind (as A1111's ``create_module`` tests)."""
        raise NotImplementedError

    def saved_rank(self, parts: Mapping[str, torch.Tensor]) -> int:
        raise NotImplementedError

    def saved_settings(
        self, parts: Mapping[str, torch.Tensor], metadata_args: Mapping[str, str]
    ) -> KindSettings:
        raise NotImplementedError


def split_evenly(ratio: float, count: int) -> float:
    """The factor each of ``count`` multiplied parts gets so that their product scales by ``ratio``."""
    return ratio ** (1.0 / count)
