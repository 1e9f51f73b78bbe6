"""The optimizer's parameter groups of the attached adapters: LoRA+ and kohya's per-block LR weights.

LoRA+ (Hayou et al., kohya's ``loraplus_lr_ratio``): the "up" parts (LoRA's B / ``lora_up``; LoHa's
``hada_w*_a``; LoKr's ``w1``) learn at the group's learning rate times the ratio;
``loraplus_unet_lr_ratio`` and ``loraplus_text_encoder_lr_ratio`` override it per component, as in kohya.
Block LR weights (:mod:`.blocks`): each UNet block is its own group at ``unet_lr x weight``. The records
carry plain data (name, parameters, learning rate), which ``training.optim`` turns into torch groups.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.network.adapters import AttachedAdapters
from lib_lora_trainer.network.blocks import block_index, block_label, block_lr_weights


@dataclass(frozen=True)
class AdapterParamGroup:
    name: str  # "unet", "text_encoder", "unet IN04", "unet lora+", "text_encoder lora+" ...
    params: list[nn.Parameter]
    lr: float


def loraplus_ratio(config: TrainingConfig, component: str) -> float:
    """The LoRA+ ratio of a component; 1.0 when LoRA+ is off."""
    own = config.loraplus_unet_lr_ratio if component == "unet" else config.loraplus_text_encoder_lr_ratio
    ratio = own or config.loraplus_lr_ratio
    return ratio if ratio > 0 else 1.0


def adapter_param_groups(
    adapters: AttachedAdapters, config: TrainingConfig, *, train_text_encoder: bool = True
) -> list[AdapterParamGroup]:
    """One group per (component, block, up or not): plain groups are named ``unet``/``text_encoder``."""
    block_weights = block_lr_weights(config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight)
    base_lr = {"unet": config.unet_lr, "text_encoder": config.text_encoder_lr}
    groups: dict[str, AdapterParamGroup] = {}
    for target, part, parameter in adapters.named_parameters():
        if target.component == "text_encoder" and not train_text_encoder:
            continue
        name, lr = target.component, base_lr[target.component]
        block = block_index(target.component, target.module_name)
        if block_weights is not None and block >= 0:
            name, lr = f"{name} {block_label(block)}", lr * block_weights[block]
        ratio = loraplus_ratio(config, target.component)
        if ratio != 1.0 and part in adapters.kind.up_parts:
            name, lr = f"{name} lora+", lr * ratio
        group = groups.setdefault(name, AdapterParamGroup(name, [], lr))
        group.params.append(parameter)
    return list(groups.values())
