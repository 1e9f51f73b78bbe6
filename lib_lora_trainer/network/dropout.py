"""kohya's three dropouts, as hooks on peft's layers (nothing of them reaches the saved file).

- ``network_dropout`` (kohya's neuron dropout): ordinary dropout on the *output of the down projection*
  (``lora_A``), i.e. on the rank-dimensional activations. peft's own ``lora_dropout`` drops the layer's
  *input* before ``lora_A`` instead (and also feeds DoRA's dropped input), which is a different
  regulariser; it is left at 0.
- ``rank_dropout``: LoRA/LoCon/DoRA drop whole rank dimensions of the down projection's output, one mask
  per sample, and scale the rest by ``1 / (1 - p)`` as kohya does. LoHa and LoKr use peft's own rank
  dropout, which is LyCORIS': rows of the update weight, rescaled by the kept fraction.
- ``module_dropout``: the whole adapter of a module is skipped for one forward with probability ``p``
  (peft's ``disable_adapters`` flag for that call), so the layer gives the base output; for every kind.

They act only in training: the layer in training mode *and* autograd on. Samples rendered between epochs
(under ``torch.no_grad``) and :meth:`AttachedAdapters.train` ``(False)`` see the full adapters; peft's
LyCORIS rank dropout is held off under ``no_grad`` by the same guard.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from lib_lora_trainer.network.kinds.base import ADAPTER_NAME


@dataclass(frozen=True)
class DropoutSettings:
    network_dropout: float = 0.0
    rank_dropout: float = 0.0
    module_dropout: float = 0.0


def _training(module: nn.Module) -> bool:
    return module.training and torch.is_grad_enabled()


def _down_output_dropout(settings: DropoutSettings):
    def hook(module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        if not _training(module):
            return output
        if settings.network_dropout > 0:
            output = F.dropout(output, p=settings.network_dropout, training=True)
        if settings.rank_dropout > 0:
            keep = 1.0 - settings.rank_dropout
            rank = output.shape[1] if output.dim() == 4 else output.shape[-1]
            mask = (torch.rand(output.shape[0], rank, device=output.device) < keep).to(output.dtype)
            if output.dim() == 3:  # tokens: [batch, tokens, rank]
                mask = mask.unsqueeze(1)
            elif output.dim() == 4:  # conv: [batch, rank, h, w]
                mask = mask[:, :, None, None]
            output = output * mask / keep
        return output

    return hook


def _module_dropout_hooks(layer: nn.Module, probability: float) -> list[RemovableHandle]:
    skipped: list[bool] = []

    def before(module: nn.Module, inputs) -> None:
        skip = probability > 0 and _training(module) and torch.rand(1).item() < probability
        held_training = module.training and not torch.is_grad_enabled()
        skipped.append((skip, held_training))
        if skip:
            module._disable_adapters = True
        if held_training:  # peft's LyCORIS layers test only ``training``
            module.training = False

    def after(module: nn.Module, inputs, output):
        skip, held_training = skipped.pop()
        if skip:
            module._disable_adapters = False
        if held_training:
            module.training = True
        return output

    return [layer.register_forward_pre_hook(before), layer.register_forward_hook(after)]


def install_dropout(layer: nn.Module, algo: str, settings: DropoutSettings) -> list[RemovableHandle]:
    """Hook one peft layer; the handles remove every hook again."""
    handles = []
    if settings.module_dropout > 0 or (algo != "lora" and settings.rank_dropout > 0):
        handles += _module_dropout_hooks(layer, settings.module_dropout)
    if algo == "lora" and (settings.network_dropout > 0 or settings.rank_dropout > 0):
        handles.append(layer.lora_A[ADAPTER_NAME].register_forward_hook(_down_output_dropout(settings)))
    return handles
