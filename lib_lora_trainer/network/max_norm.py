"""kohya's ``scale_weight_norms``: max-norm regularisation of every module's update after each step.

For each adapted module the update ``dW`` (what the module adds to its layer's weight, as the file
describes it) is measured by its Frobenius norm; where that is above the maximum, the module's factors are
scaled so that ``||dW||`` equals the maximum (LoRA: up and down by the square root of the ratio each,
as kohya). For DoRA the LoRA part is limited; the magnitude is left alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from lib_lora_trainer.network.adapters import AttachedAdapters

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MaxNormResult:
    keys_scaled: int  # modules whose update was scaled down
    mean_norm: float  # mean update norm after scaling
    max_norm: float


@torch.no_grad()
def scale_weight_norms(adapters: AttachedAdapters, max_norm: float) -> MaxNormResult:
    """Scale every update whose norm is above ``max_norm`` down to it; what kohya logs."""
    norms = []
    scaled = 0
    for _, layer in adapters.layers():
        norm = float(adapters.kind.delta_weight(layer).float().norm())
        if norm > max_norm:
            adapters.kind.scale_update(layer, max_norm / norm)
            scaled += 1
            norm = max_norm
        norms.append(norm)
    result = MaxNormResult(scaled, sum(norms) / max(1, len(norms)), max(norms, default=0.0))
    if scaled:
        log.info(
            "scale_weight_norms %g: keys scaled %d, average key norm %.4g, max key norm %.4g",
            max_norm,
            result.keys_scaled,
            result.mean_norm,
            result.max_norm,
        )
    return result
