"""Running a WD14 tagger model with onnxruntime and turning its scores into tags.

The ONNX model takes (batch, size, size, 3) float32 BGR 0..255 and returns (batch, n_tags) sigmoid
scores, one per row of ``selected_tags.csv`` (category 9: rating, 0: general, 4: character).
"""

from __future__ import annotations

import csv
import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lib_lora_trainer.captioning.tag_text import display_tag, parse_tag_list, without_tags
from lib_lora_trainer.captioning.wd14_models import (
    DEFAULT_CHARACTER_THRESHOLD,
    FALLBACK_GENERAL_THRESHOLD,
    LABELS_FILENAME,
    MODEL_FILENAME,
    WD14_MODELS,
    WD14ModelInfo,
    ensure_model_files,
    get_model_info,
    missing_model_files,
)
from lib_lora_trainer.captioning.wd14_preprocess import prepare_image

logger = logging.getLogger(__name__)

RATING_CATEGORY = 9
GENERAL_CATEGORY = 0
CHARACTER_CATEGORY = 4

# Best first; onnxruntime-gpu offers CUDA, the ROCm and DirectML builds their own provider.
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")
CPU_PROVIDER = "CPUExecutionProvider"


class TaggerModelError(RuntimeError):
    """The model files exist but are not a usable WD14 tagger (wrong files, mismatched pair, no runtime)."""


@dataclass(frozen=True)
class TagLabels:
    names: tuple[str, ...]
    categories: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.names)

    def indices(self, category: int) -> np.ndarray:
        return np.flatnonzero(np.asarray(self.categories) == category)


def load_tag_labels(csv_path: str | Path) -> TagLabels:
    """The tag names and categories of ``selected_tags.csv`` (columns tag_id, name, category, count)."""
    csv_path = Path(csv_path)
    try:
        with csv_path.open(encoding="utf-8-sig", newline="") as stream:
            rows = list(csv.DictReader(stream))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise TaggerModelError(f"{csv_path.name} could not be read: {error}") from error
    if not rows or not {"name", "category"} <= set(rows[0]):
        raise TaggerModelError(f"{csv_path} is not a WD14 tag list (it needs 'name' and 'category' columns)")
    try:
        categories = tuple(int(row["category"]) for row in rows)
    except (TypeError, ValueError) as error:
        raise TaggerModelError(f"{csv_path.name} has a category that is not a number: {error}") from error
    return TagLabels(tuple(row["name"] for row in rows), categories)


@dataclass(frozen=True)
class TagSelection:
    """What the tagger found in one image, best first, before any caption is written."""

    general: list[tuple[str, float]]
    character: list[tuple[str, float]]
    rating: tuple[str, float] | None  # the most likely rating (ratings are exclusive)

    def tags(self, *, include_rating: bool = False, replace_underscores: bool = True) -> list[str]:
        """Character tags, then general tags, then (optionally) the rating, as caption text."""
        chosen = [name for name, _ in self.character] + [name for name, _ in self.general]
        if include_rating and self.rating is not None:
            chosen.append(self.rating[0])
        return [display_tag(tag, replace_underscores) for tag in chosen]


def choose_providers(available: Sequence[str], use_gpu: bool = True) -> list[str]:
    """The onnxruntime providers to ask for: the best GPU one on offer (if wanted), then the CPU."""
    providers = [name for name in GPU_PROVIDERS if use_gpu and name in available][:1]
    return [*providers, CPU_PROVIDER]


def _import_onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise TaggerModelError(
            "WD14 tagging needs onnxruntime. Install 'onnxruntime-gpu' (NVIDIA GPU) or 'onnxruntime' "
            "(CPU) into the WebUI's Python environment - only one of the two, as they replace each other."
        ) from error
    return onnxruntime


def _version_tuple(version: str) -> tuple[int, ...]:
    numbers = []
    for part in version.split(".")[:3]:
        digits = "".join(char for char in part if char.isdigit())
        numbers.append(int(digits) if digits else 0)
    return tuple(numbers)


class WD14Tagger:
    """One WD14 model, loaded on first use and freed with :meth:`unload`."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        use_gpu: bool = True,
        info: WD14ModelInfo | None = None,
    ) -> None:
        self.model_dir = Path(model_dir)
        missing = missing_model_files(self.model_dir)
        if missing:
            raise TaggerModelError(f"{self.model_dir} has no {' and no '.join(missing)}")
        self.info = info or WD14_MODELS.get(self.model_dir.name)
        self.use_gpu = use_gpu
        self.labels = load_tag_labels(self.model_dir / LABELS_FILENAME)
        self._session: Any = None
        self._input_name = ""
        self._input_size = 0
        self._fixed_batch: int | None = None
        self._providers: list[str] = []

    @classmethod
    def from_registry(
        cls,
        model: str,
        models_dir: str | Path,
        *,
        allow_download: bool = True,
        use_gpu: bool = True,
        endpoint: str | None = None,
    ) -> WD14Tagger:
        """A tagger for a SmilingWolf model, downloading its two files into ``models_dir`` if needed."""
        info = get_model_info(model)
        folder = ensure_model_files(info.name, models_dir, allow_download=allow_download, endpoint=endpoint)
        return cls(folder, use_gpu=use_gpu, info=info)

    @property
    def name(self) -> str:
        return self.info.name if self.info else self.model_dir.name

    @property
    def default_general_threshold(self) -> float:
        return self.info.general_threshold if self.info else FALLBACK_GENERAL_THRESHOLD

    @property
    def default_character_threshold(self) -> float:
        return self.info.character_threshold if self.info else DEFAULT_CHARACTER_THRESHOLD

    @property
    def is_loaded(self) -> bool:
        return self._session is not None

    @property
    def input_size(self) -> int:
        """The square side the model takes, read from its input shape."""
        self.load()
        return self._input_size

    @property
    def providers(self) -> list[str]:
        """The onnxruntime providers the loaded session really uses (the first one runs the model)."""
        self.load()
        return list(self._providers)

    def load(self) -> None:
        if self._session is not None:
            return
        onnxruntime = _import_onnxruntime()
        self._check_runtime_version(onnxruntime.__version__)
        wanted = choose_providers(onnxruntime.get_available_providers(), self.use_gpu)
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3  # onnxruntime's own warnings are noise for a user
        model_path = self.model_dir / MODEL_FILENAME
        try:
            session = onnxruntime.InferenceSession(str(model_path), sess_options=options, providers=wanted)
        except Exception as error:  # onnxruntime raises its own exception types
            raise TaggerModelError(f"{model_path} could not be loaded by onnxruntime: {error}") from error
        self._read_signature(session)
        self._session = session
        self._providers = list(session.get_providers())
        logger.info("WD14 tagger %s loaded; it runs on %s", self.name, self._providers[0])
        if wanted[0] != CPU_PROVIDER and self._providers[0] == CPU_PROVIDER:
            logger.warning(
                "WD14 tagger %s asked for %s but onnxruntime fell back to the CPU (check that the "
                "CUDA/cuDNN libraries onnxruntime-gpu needs are installed); tagging will be slower.",
                self.name,
                wanted[0],
            )

    def _check_runtime_version(self, version: str) -> None:
        if self.info and _version_tuple(version) < self.info.min_onnxruntime:
            needed = ".".join(map(str, self.info.min_onnxruntime))
            raise TaggerModelError(
                f"{self.name} needs onnxruntime {needed} or newer; this environment has {version}."
            )

    def _read_signature(self, session: Any) -> None:
        inputs = session.get_inputs()
        shape = list(inputs[0].shape) if len(inputs) == 1 else []
        square = len(shape) == 4 and isinstance(shape[1], int) and shape[1] == shape[2]
        if not square or shape[3] != 3 or shape[1] <= 0:
            raise TaggerModelError(
                f"{self.model_dir / MODEL_FILENAME} is not a WD14 tagger: it should take one "
                f"(batch, size, size, 3) image input, it takes {[tuple(i.shape) for i in inputs]}"
            )
        outputs = session.get_outputs()
        tag_count = outputs[0].shape[-1] if outputs and outputs[0].shape else None
        if isinstance(tag_count, int) and tag_count != len(self.labels):
            raise TaggerModelError(
                f"{LABELS_FILENAME} lists {len(self.labels)} tags but {MODEL_FILENAME} scores {tag_count}: "
                f"the two files in {self.model_dir} come from different models"
            )
        self._input_name = inputs[0].name
        self._input_size = int(shape[1])
        self._fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    def unload(self) -> None:
        """Free the model (and its GPU memory); the next prediction loads it again."""
        if self._session is None:
            return
        self._session = None
        gc.collect()
        logger.info("WD14 tagger %s unloaded", self.name)

    def predict(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Scores (len(images), n_tags) for PIL images, in one model call per batch the model accepts."""
        if not images:
            return np.zeros((0, len(self.labels)), dtype=np.float32)
        self.load()
        batch = np.stack([prepare_image(image, self._input_size) for image in images])
        return self.predict_prepared(batch)

    def predict_prepared(self, batch: np.ndarray) -> np.ndarray:
        """Scores for an already prepared (B, size, size, 3) BGR float32 batch."""
        self.load()
        # Some exported models have the batch dimension fixed (usually to 1): feed them that many at a time.
        step = self._fixed_batch or len(batch)
        scores = [self._run(batch[start : start + step]) for start in range(0, len(batch), step)]
        result = np.concatenate(scores, axis=0)
        if result.shape[1] != len(self.labels):
            raise TaggerModelError(
                f"{MODEL_FILENAME} scored {result.shape[1]} tags but "
                f"{LABELS_FILENAME} lists {len(self.labels)}"
            )
        return result

    def _run(self, chunk: np.ndarray) -> np.ndarray:
        outputs = self._session.run(None, {self._input_name: chunk.astype(np.float32, copy=False)})
        return np.asarray(outputs[0], dtype=np.float32).reshape(len(chunk), -1)

    def select(
        self,
        scores: np.ndarray,
        *,
        general_threshold: float | None = None,
        character_threshold: float | None = None,
        undesired_tags: str | Sequence[str] = "",
    ) -> TagSelection:
        """The tags of one image's ``scores`` at or above the thresholds (model defaults when None),
        best first, leaving out ``undesired_tags`` (a comma list; spacing and underscores don't matter)."""
        general_threshold = self.default_general_threshold if general_threshold is None else general_threshold
        character_threshold = (
            self.default_character_threshold if character_threshold is None else character_threshold
        )
        unwanted = parse_tag_list(undesired_tags) if isinstance(undesired_tags, str) else list(undesired_tags)
        general = self._above(scores, GENERAL_CATEGORY, general_threshold, unwanted)
        character = self._above(scores, CHARACTER_CATEGORY, character_threshold, unwanted)
        rating_indices = self.labels.indices(RATING_CATEGORY)
        rating = None
        if rating_indices.size:
            best = int(rating_indices[np.argmax(scores[rating_indices])])
            rating = (self.labels.names[best], float(scores[best]))
        return TagSelection(general, character, rating)

    def _above(
        self, scores: np.ndarray, category: int, threshold: float, unwanted: Sequence[str]
    ) -> list[tuple[str, float]]:
        indices = self.labels.indices(category)
        chosen = indices[scores[indices] >= threshold]
        ranked = sorted(((self.labels.names[i], float(scores[i])) for i in chosen), key=lambda item: -item[1])
        kept_names = set(without_tags([name for name, _ in ranked], unwanted))
        return [(name, score) for name, score in ranked if name in kept_names]
