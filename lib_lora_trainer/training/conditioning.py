"""The text conditioning of each batch: with a frozen text encoder and captions that never change, each
caption is encoded once for the whole run; otherwise every batch's captions are encoded as it comes."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from lib_lora_trainer.model.host import TrainingHost
from lib_lora_trainer.training.memory import CatchOutOfMemory

PhaseCallback = Callable[[str, int, int], None]


class CaptionConditioning:
    """Called with a batch's captions, gives their conditioning (cached rows where it has them)."""

    def __init__(self, host: TrainingHost, compute: str, train_text_encoder: bool):
        self.host = host
        self.compute = compute  # the precision the text encoder computes in
        self.train_text_encoder = train_text_encoder
        self._cache: dict[str, torch.Tensor] = {}

    def cache(self, captions: Sequence[str], on_phase: PhaseCallback) -> bool:
        """Encode each caption once; False (and nothing kept) when the device ran out of memory."""
        with CatchOutOfMemory() as memory, torch.no_grad(), self.host.autocast(self.compute):
            for index, caption in enumerate(captions):
                on_phase("caching captions", index, len(captions))
                self._cache[caption] = self.host.encode_text([caption])[0]
        if memory.ran_out:
            self._cache = {}
            return False
        on_phase("caching captions", len(captions), len(captions))
        return True

    def __call__(self, captions: Sequence[str]) -> torch.Tensor:
        cached = [self._cache.get(caption) for caption in captions]
        if cached and all(c is not None for c in cached) and len({c.shape for c in cached}) == 1:
            return torch.stack(cached)
        with torch.set_grad_enabled(self.train_text_encoder), self.host.autocast(self.compute):
            return self.host.encode_text(list(captions))
