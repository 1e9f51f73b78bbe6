"""LoKr (LyCORIS ``algo=lokr``): the update is a Kronecker product ``kron(w1, w2)``.

File parts (A1111 ``network_lokr.py``): ``lokr_w1`` ``[a, c]`` (or ``lokr_w1_a``/``lokr_w1_b`` when it is
low-rank too), ``lokr_w2`` ``[b, d(, kh, kw)]`` or ``lokr_w2_a`` ``[b, r]`` / ``lokr_w2_b``
``[r, d(*kh*kw)]``, with Tucker ``lokr_t2`` ``[r, r, kh, kw]`` and ``lokr_w2_a`` ``[r, b]``,
``lokr_w2_b`` ``[r, d]``; ``out = a*b``, ``in = c*d``. peft's tensors have the same names.

Scale: peft 0.13.2's LoKr applies no ``alpha / r`` (its ``get_delta_weight`` is the bare Kronecker
product). A1111 multiplies by ``alpha / r`` when a factor is low-rank and by 1 when both are full, so the
file's ``alpha`` is written as the rank: every loader then computes exactly what was trained. The
configured alpha therefore does not change a LoKr's update (it is recorded in ``ss_network_alpha``).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from lib_lora_trainer.network.kinds.base import ADAPTER_NAME, ALPHA_PART, KindSettings, split_evenly
from lib_lora_trainer.network.kinds.lycoris import LycorisKind

_PARTS = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


class LokrKind(LycorisKind):
    algo = "lokr"
    file_parts = _PARTS
    up_parts = ("lokr_w1", "lokr_w1_a")  # peft starts w1 at zero, as LoRA's up

    def peft_classes(self) -> tuple[type, type]:
        from peft import LoKrConfig
        from peft.tuners.lokr import LoKrModel

        return LoKrConfig, LoKrModel

    def own_options(self, settings: KindSettings) -> dict[str, object]:
        return {"decompose_both": settings.lokr_decompose_both, "decompose_factor": settings.lokr_factor}

    def file_alpha(self, layer: nn.Module) -> float:
        return float(layer.r[ADAPTER_NAME])

    def scale_update(self, layer: nn.Module, ratio: float) -> None:
        each = split_evenly(ratio, 2)  # dW is linear in w1 (or w1_a) and in w2 (or w2_a)
        parameters = self.parameters(layer)
        with torch.no_grad():
            parameters["lokr_w1" if "lokr_w1" in parameters else "lokr_w1_a"].mul_(each)
            parameters["lokr_w2" if "lokr_w2" in parameters else "lokr_w2_a"].mul_(each)

    def owns(self, parts: Mapping[str, torch.Tensor]) -> bool:
        has_w1 = "lokr_w1" in parts or ("lokr_w1_a" in parts and "lokr_w1_b" in parts)
        has_w2 = "lokr_w2" in parts or ("lokr_w2_a" in parts and "lokr_w2_b" in parts)
        return has_w1 and has_w2

    def saved_rank(self, parts: Mapping[str, torch.Tensor]) -> int:
        for low_rank in ("lokr_w1_b", "lokr_w2_b"):
            if low_rank in parts:
                return int(parts[low_rank].shape[0])
        # both factors full: this trainer writes alpha = rank, and the rank only decides that w2 is full
        return max(1, int(round(float(parts[ALPHA_PART].float().item())))) if ALPHA_PART in parts else 1

    def saved_settings(
        self, parts: Mapping[str, torch.Tensor], metadata_args: Mapping[str, str]
    ) -> KindSettings:
        factor = int(float(metadata_args.get("factor", -1)))
        return KindSettings(
            algo=self.algo,
            use_tucker="lokr_t2" in parts,
            lokr_factor=factor,
            lokr_decompose_both="lokr_w1_a" in parts,
        )
