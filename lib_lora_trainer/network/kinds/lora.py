"""LoRA and LoCon (kohya's ``networks.lora``), and DoRA on top of them (LyCORIS ``dora_wd``).

File parts per module: ``lora_down.weight`` ``[r, in(, kh, kw)]`` = peft's ``lora_A``,
``lora_up.weight`` ``[out, r(, 1, 1)]`` = peft's ``lora_B``, ``alpha``; the layer gains
``up @ down * alpha / r``. DoRA adds ``dora_scale``.

DoRA's orientation: A1111 v1.10.1 (``network.py`` ``apply_weight_decompose``) normalises the merged
weight ``W + dW`` per *input* channel (the norm over the output dimension and the kernel) and reads
``dora_scale`` as ``[1, in(, 1, 1)]``: ``W' = (W + dW) * dora_scale / ||W + dW||_in``. That is LyCORIS
with ``wd_on_output=False``. peft 0.13.2's magnitude vector is per *output* channel (``[out]``), a
different function that no A1111 ``dora_scale`` can express, so the layer's DoRA part is replaced by
:class:`InputChannelDora`, which computes A1111's form; peft still does the LoRA part and the injection.
Scaling input channel ``i`` of a weight equals scaling channel ``i`` of the input, so the layer's output is
``base((c - 1) * x) + scale * up(down(c * x))`` with ``c = dora_scale / ||W + dW||_in`` (norm detached, as
peft and the DoRA paper do, so it costs no extra activation memory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lib_lora_trainer.network.kinds.base import (
    ADAPTER_NAME,
    AdapterKind,
    KindSettings,
    PeftTarget,
    peft_target_options,
    split_evenly,
)

DOWN_PART = "lora_down.weight"
UP_PART = "lora_up.weight"
DORA_PART = "dora_scale"


def input_channel_norm(weight: torch.Tensor) -> torch.Tensor:
    """``||W||`` per input channel, shaped ``[1, in(, 1, 1)]`` like A1111's ``dora_scale``."""
    norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norm.reshape(1, weight.shape[1], *[1] * (weight.dim() - 2))


class InputChannelDora(nn.Module):
    """DoRA's magnitude per input channel (A1111/kohya orientation), in peft's DoRA-layer slot."""

    def __init__(self, base_layer: nn.Module, lora_delta: torch.Tensor):
        super().__init__()
        merged = base_layer.weight.detach().float() + lora_delta.detach().float()
        self.weight = nn.Parameter(input_channel_norm(merged))

    def _base_without_bias(self, base_layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        weight = base_layer.weight.to(x.dtype)
        if isinstance(base_layer, nn.Conv2d):
            return F.conv2d(
                x, weight, None, base_layer.stride, base_layer.padding, base_layer.dilation, base_layer.groups
            )
        return F.linear(x, weight)

    def forward(self, x, *, lora_A, lora_B, scaling, base_layer):  # peft's DoRA-layer call
        lora_weight = _lora_weight(lora_A.weight, lora_B.weight)
        merged = base_layer.weight.float() + scaling * lora_weight.detach().float()
        factor = self.weight / input_channel_norm(merged).detach()
        if isinstance(base_layer, nn.Conv2d):
            factor = factor.reshape(1, -1, 1, 1)
        else:
            factor = factor.reshape(-1)  # the input's last dimension is the channel
        factor = factor.to(x.dtype)
        return self._base_without_bias(base_layer, (factor - 1) * x) + lora_B(lora_A(factor * x)) * scaling


def _lora_weight(down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``up @ down`` shaped like the layer's weight (a 1x1 up conv after a kh x kw down conv)."""
    if down.dim() == 2:
        return up @ down
    return torch.einsum("or,rikl->oikl", up.flatten(1), down)


class LoraKind(AdapterKind):
    algo = "lora"
    file_parts = (DOWN_PART, UP_PART, "lora_mid.weight")
    up_parts = (UP_PART,)

    def peft_model(self, root: nn.Module, targets: Sequence[PeftTarget], settings: KindSettings) -> nn.Module:
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        config = LoraConfig(
            **peft_target_options(targets, alpha_option="lora_alpha"),
            lora_dropout=0.0,  # peft's dropout is on the input; kohya's dropouts are in network/dropout.py
            bias="none",
            init_lora_weights=True,  # kohya's init: down kaiming-uniform, up zeros
            use_dora=settings.dora_wd,
        )
        return LoraModel(root, config, ADAPTER_NAME)

    def prepare_layer(self, layer: nn.Module, settings: KindSettings) -> None:
        for part in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
            part.float()
        if settings.dora_wd:
            delta = _lora_weight(layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight)
            dora = InputChannelDora(layer.get_base_layer(), delta * layer.scaling[ADAPTER_NAME])
            layer.lora_magnitude_vector[ADAPTER_NAME] = dora
        super().prepare_layer(layer, settings)

    def rank_and_alpha(self, layer: nn.Module) -> tuple[int, float]:
        return int(layer.r[ADAPTER_NAME]), float(layer.lora_alpha[ADAPTER_NAME])

    def parameters(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        parameters = {
            DOWN_PART: layer.lora_A[ADAPTER_NAME].weight,
            UP_PART: layer.lora_B[ADAPTER_NAME].weight,
        }
        if layer.use_dora.get(ADAPTER_NAME):
            parameters[DORA_PART] = layer.lora_magnitude_vector[ADAPTER_NAME].weight
        return parameters

    def scale_update(self, layer: nn.Module, ratio: float) -> None:
        each = split_evenly(ratio, 2)
        with torch.no_grad():
            layer.lora_A[ADAPTER_NAME].weight.mul_(each)
            layer.lora_B[ADAPTER_NAME].weight.mul_(each)

    def owns(self, parts: Mapping[str, torch.Tensor]) -> bool:
        return DOWN_PART in parts and UP_PART in parts

    def saved_rank(self, parts: Mapping[str, torch.Tensor]) -> int:
        return int(parts[DOWN_PART].shape[0])

    def saved_settings(
        self, parts: Mapping[str, torch.Tensor], metadata_args: Mapping[str, str]
    ) -> KindSettings:
        if "lora_mid.weight" in parts:
            raise ValueError(
                "the file is a LoCon with Tucker (lora_mid) layers, which peft's LoRA cannot train; "
                "start a new LoCon instead of continuing this one"
            )
        return KindSettings(algo=self.algo, dora_wd=DORA_PART in parts)


def check_dora_scale(label: str, dora_scale: torch.Tensor, down: torch.Tensor) -> None:
    """A1111 v1.10.1 reads only the per-input-channel form ``[1, in(, 1, 1)]``."""
    expected = (1, int(down.shape[1]), *[1] * (down.dim() - 2))
    if tuple(dora_scale.shape) != expected:
        raise ValueError(
            f"{label}: dora_scale has shape {tuple(dora_scale.shape)}, expected {expected}; the file stores "
            "DoRA per output channel (LyCORIS wd_on_output=True), which A1111 v1.10.1 does not apply "
            "correctly and this trainer cannot continue"
        )
