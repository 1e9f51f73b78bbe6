"""The maths of each score, on L2-normalised embedding rows (zero rows = subject not found).

* likeness: for each evaluation image with a subject, the best cosine to any training image's subject;
  their mean, with the share of evaluation images where a subject was found beside it;
* prompt fidelity: mean cosine of each image with its own prompt's text;
* variety: per prompt, 1 - mean pairwise cosine of its images over the seeds; the mean over prompts;
* memorisation: evaluation images whose cosine to one training image reaches a threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lib_lora_trainer.evaluation.embedders import found_mask

MEMORISATION_THRESHOLD = 0.95  # CLIP image cosine: near-duplicates, not just the same character


@dataclass(frozen=True)
class Likeness:
    mean: float | None  # None when no evaluation image (or no training image) has a subject
    found_share: float  # of the evaluation images
    per_image: tuple[float | None, ...]


def likeness(evaluation: np.ndarray, training: np.ndarray) -> Likeness:
    evaluation, training = np.asarray(evaluation), np.asarray(training)
    found = found_mask(evaluation) if len(evaluation) else np.zeros(0, bool)
    share = float(found.mean()) if len(found) else 0.0
    train_rows = training[found_mask(training)] if len(training) else training
    if not len(train_rows) or not found.any():
        return Likeness(None, share, tuple(None for _ in range(len(evaluation))))
    best = (evaluation @ train_rows.T).max(axis=1)
    per_image = tuple(float(b) if f else None for b, f in zip(best, found, strict=True))
    return Likeness(float(best[found].mean()), share, per_image)


def prompt_fidelity(images: np.ndarray, texts: np.ndarray) -> float:
    """Mean of the row-wise cosines (image i with text i)."""
    return float(np.mean(np.sum(np.asarray(images) * np.asarray(texts), axis=1)))


def variety(groups: Sequence[np.ndarray]) -> float | None:
    """Mean over groups (one prompt's images across seeds) of 1 - mean pairwise cosine; None if no pairs."""
    values = []
    for rows in groups:
        rows = np.asarray(rows)
        if len(rows) < 2:
            continue
        similarity = rows @ rows.T
        pairs = similarity[np.triu_indices(len(rows), k=1)]
        values.append(1.0 - float(pairs.mean()))
    return float(np.mean(values)) if values else None


@dataclass(frozen=True)
class Memorised:
    evaluation_index: int
    training_index: int
    similarity: float


def memorised(
    evaluation: np.ndarray, training: np.ndarray, threshold: float = MEMORISATION_THRESHOLD
) -> list[Memorised]:
    """Evaluation images nearly identical to one training image (best match at or above ``threshold``)."""
    evaluation, training = np.asarray(evaluation), np.asarray(training)
    if not len(evaluation) or not len(training):
        return []
    similarity = evaluation @ training.T
    best = similarity.argmax(axis=1)
    return [
        Memorised(index, int(best[index]), float(similarity[index, best[index]]))
        for index in range(len(evaluation))
        if similarity[index, best[index]] >= threshold
    ]
