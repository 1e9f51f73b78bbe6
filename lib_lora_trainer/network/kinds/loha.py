"""LoHa (LyCORIS ``algo=loha``): the update is the Hadamard product of two low-rank products.

File parts (A1111 ``network_hada.py``): ``hada_w1_a`` ``[out, r]``, ``hada_w1_b`` ``[r, in*kh*kw]``,
``hada_w2_a``, ``hada_w2_b`` and ``alpha``; ``dW = (w1_a @ w1_b) * (w2_a @ w2_b) * alpha / r``. With
Tucker (peft's ``use_effective_conv2d``) a 3x3 conv has ``hada_t1``/``hada_t2`` ``[r, r, kh, kw]`` and
``hada_w1_a``/``hada_w2_a`` ``[r, out]``, ``hada_w1_b``/``hada_w2_b`` ``[r, in]``. peft's tensors are
these, under the same names.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lib_lora_trainer.network.kinds.base import ADAPTER_NAME, KindSettings, split_evenly
from lib_lora_trainer.network.kinds.lycoris import LycorisKind

_FACTORS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
_TUCKER = ("hada_t1", "hada_t2")


class LohaKind(LycorisKind):
    algo = "loha"
    file_parts = _FACTORS + _TUCKER
    up_parts = ("hada_w1_a", "hada_w2_a")

    def peft_classes(self) -> tuple[type, type]:
        from peft import LoHaConfig
        from peft.tuners.loha import LoHaModel

        return LoHaConfig, LoHaModel

    def scale_update(self, layer: nn.Module, ratio: float) -> None:
        each = split_evenly(ratio, 2)  # dW is linear in w1_a and in w2_a
        with torch.no_grad():
            layer.hada_w1_a[ADAPTER_NAME].mul_(each)
            layer.hada_w2_a[ADAPTER_NAME].mul_(each)

    def owns(self, parts: Mapping[str, torch.Tensor]) -> bool:
        return all(name in parts for name in _FACTORS)

    def saved_rank(self, parts: Mapping[str, torch.Tensor]) -> int:
        return int(parts["hada_w1_b"].shape[0])

    def saved_settings(
        self, parts: Mapping[str, torch.Tensor], metadata_args: Mapping[str, str]
    ) -> KindSettings:
        return KindSettings(algo=self.algo, use_tucker="hada_t1" in parts)
