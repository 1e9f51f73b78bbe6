"""CLIP's text-image similarity (transformers' CLIPModel), for prompt fidelity, variety and memorisation.

The text side never sees the trigger word: it means nothing to CLIP, so it is replaced by the class
word (``ohwx_alice, portrait`` -> ``woman, portrait``), as the LyCORIS evaluation does with its
descriptions, and ``<lora:...>`` tags are removed.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from lib_lora_trainer.evaluation.embedders import ScorerModelError, l2_normalise
from lib_lora_trainer.outputs.samples import strip_lora_tags

DEFAULT_SUBJECT = "person"


def fidelity_text(prompt: str, trigger_word: str, class_word: str) -> str:
    """The prompt as CLIP reads it: LoRA tags out, the trigger word (as a whole word) -> the class word."""
    text = strip_lora_tags(prompt)
    trigger = trigger_word.strip()
    if trigger:
        replacement = class_word.strip() or DEFAULT_SUBJECT
        text = re.sub(rf"(?<![\w]){re.escape(trigger)}(?![\w])", replacement, text)
    return re.sub(r"\s+", " ", text).strip()


class ClipScorer:
    """Image and text embeddings of one CLIP model (L2-normalised numpy rows)."""

    name = "clip"

    def __init__(
        self, model: Any, image_processor: Any, tokenizer: Any, *, device: str | torch.device = "cpu"
    ):
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.image_processor = image_processor
        self.tokenizer = tokenizer

    @classmethod
    def from_folder(cls, folder: str | Path, *, device: str | torch.device = "cpu") -> ClipScorer:
        try:
            from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

            model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
            processor = CLIPImageProcessor.from_pretrained(str(folder), local_files_only=True)
            tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, RuntimeError) as error:
            raise ScorerModelError(
                f"The CLIP model in {folder} cannot be loaded ({type(error).__name__}); it is probably "
                "incomplete or corrupt: delete the folder so it is downloaded again."
            ) from error
        return cls(model, processor, tokenizer, device=device)

    @torch.no_grad()
    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Image embeddings (the :class:`~.embedders.ImageEmbedder` interface)."""
        if not images:
            return np.zeros((0, 0))
        pixels = self.image_processor(images=[i.convert("RGB") for i in images], return_tensors="pt")
        features = self.model.get_image_features(pixel_values=pixels["pixel_values"].to(self.device))
        return l2_normalise(features.float().cpu().numpy())

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, 0))
        tokens = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return l2_normalise(features.float().cpu().numpy())

    def close(self) -> None:
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
