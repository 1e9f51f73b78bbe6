"""Images to L2-normalised embeddings, for likeness: one small interface, two ONNX models behind it.

* :class:`FaceEmbedder`: the largest face OpenCV's offline finder sees (``dataset.crop``), cropped with
  a margin, 112x112 RGB into an ArcFace-class model. An image without a face gets a row of zeros.
* :class:`CharacterEmbedder`: the whole picture, 384x384 with CLIP's normalisation, into deepghs CCIP
  (made to tell drawn characters apart).

Both run on onnxruntime (GPU provider first when there is one), like the WD14 tagger.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from lib_lora_trainer.dataset.crop import FaceBox, FaceFinder, HaarFaceFinder

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
FACE_MARGIN = (
    0.15  # of the face box on each side: ArcFace was trained on crops that include the chin and brow
)
GPU_PROVIDERS = ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider")


class ScorerModelError(RuntimeError):
    """A scoring model file exists but cannot be used (corrupt, wrong kind, no runtime)."""


class ImageEmbedder(Protocol):
    """Images to one L2-normalised row each; a row of zeros where the subject was not found."""

    name: str

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray: ...


def l2_normalise(rows: np.ndarray) -> np.ndarray:
    """Each row divided by its length; zero rows stay zero."""
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.where(norms > 0, rows / np.where(norms > 0, norms, 1.0), 0.0)


def found_mask(rows: np.ndarray) -> np.ndarray:
    """Which rows hold an embedding (a subject was found)."""
    return np.linalg.norm(np.asarray(rows), axis=1) > 0


@dataclass(frozen=True)
class Preprocessing:
    size: int
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (1.0, 1.0, 1.0)
    scale: float = 1.0  # pixels 0..255 are multiplied by this before mean/std

    def array(self, image: Image.Image) -> np.ndarray:
        """(3, size, size) float32, channels first."""
        resized = image.convert("RGB").resize((self.size, self.size), Image.Resampling.BILINEAR)
        pixels = np.asarray(resized, dtype=np.float32) * self.scale
        pixels = (pixels - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(pixels.transpose(2, 0, 1))


class OnnxModel:
    """One ONNX model on onnxruntime, opened on first use and freed with :meth:`close`."""

    def __init__(self, path: str | Path, *, use_gpu: bool = True):
        self.path = Path(path)
        self.use_gpu = use_gpu
        self._session: Any = None

    def session(self) -> Any:
        if self._session is None:
            self._session = open_session(self.path, use_gpu=self.use_gpu)
        return self._session

    def run(self, batch: np.ndarray) -> np.ndarray:
        session = self.session()
        entry = session.get_inputs()[0]
        fixed_batch = isinstance(entry.shape[0], int) and entry.shape[0] == 1
        chunks = [batch[i : i + 1] for i in range(len(batch))] if fixed_batch else [batch]
        outputs = [np.asarray(session.run(None, {entry.name: chunk})[0]) for chunk in chunks if len(chunk)]
        return np.concatenate(outputs).reshape(len(batch), -1) if outputs else np.zeros((0, 0))

    def close(self) -> None:
        self._session = None
        gc.collect()


def open_session(path: Path, *, use_gpu: bool = True) -> Any:
    """An onnxruntime session for ``path``; a clear :class:`ScorerModelError` when that fails."""
    try:
        import onnxruntime
    except ImportError as error:
        raise ScorerModelError(
            "Scoring epochs needs onnxruntime; install 'onnxruntime-gpu' (NVIDIA) or 'onnxruntime' (CPU)."
        ) from error
    available = onnxruntime.get_available_providers()
    providers = [name for name in GPU_PROVIDERS if use_gpu and name in available][:1] + [
        "CPUExecutionProvider"
    ]
    try:
        return onnxruntime.InferenceSession(str(path), providers=providers)
    except Exception as error:  # onnxruntime raises its own types for a corrupt or foreign file
        message = (
            f"The scoring model {path.name} in {path.parent} cannot be loaded ({type(error).__name__}); "
            "it is probably incomplete or corrupt: delete it so it is downloaded again."
        )
        logger.error("%s: %s", message, error)
        raise ScorerModelError(message) from error


class CharacterEmbedder:
    """deepghs CCIP: the whole image, CLIP-normalised, into the feature model."""

    name = "character"

    def __init__(self, model: OnnxModel, preprocessing: Preprocessing | None = None):
        self.model = model
        self.preprocessing = preprocessing or Preprocessing(384, CLIP_MEAN, CLIP_STD, 1 / 255)

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        if not images:
            return np.zeros((0, 0))
        batch = np.stack([self.preprocessing.array(image) for image in images])
        return l2_normalise(self.model.run(batch))

    def close(self) -> None:
        self.model.close()


class FaceEmbedder:
    """ArcFace-class model over the largest face in each image (ONNX Model Zoo's takes RGB 0..255)."""

    name = "face"

    def __init__(
        self,
        model: OnnxModel,
        face_finder: FaceFinder | None = None,
        preprocessing: Preprocessing | None = None,
    ):
        self.model = model
        self.face_finder = face_finder or HaarFaceFinder()
        self.preprocessing = preprocessing or Preprocessing(112)

    def face_crop(self, image: Image.Image) -> Image.Image | None:
        """The largest face with a margin, or None when no face is found."""
        try:
            faces = self.face_finder.find_faces(image.convert("RGB"))
        except Exception as error:  # a detector failure counts as "no face", never as a crash
            logger.warning("face detection failed (%s); the image counts as without a face", error)
            return None
        if not faces:
            return None
        return image.convert("RGB").crop(_with_margin(max(faces, key=lambda f: f.area), image.size))

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        crops = [self.face_crop(image) for image in images]
        found = [index for index, crop in enumerate(crops) if crop is not None]
        if not found:
            return np.zeros((len(images), 1))
        rows = self.model.run(np.stack([self.preprocessing.array(crops[i]) for i in found]))
        out = np.zeros((len(images), rows.shape[1]))
        out[found] = l2_normalise(rows)
        return out

    def faces_found(self, images: Sequence[Image.Image]) -> int:
        return sum(self.face_crop(image) is not None for image in images)

    def close(self) -> None:
        self.model.close()


def _with_margin(face: FaceBox, size: tuple[int, int]) -> tuple[int, int, int, int]:
    side = max(face.width, face.height) * (1 + 2 * FACE_MARGIN)
    center_x, center_y = face.center
    left, top = max(0, round(center_x - side / 2)), max(0, round(center_y - side / 2))
    return left, top, min(size[0], round(center_x + side / 2)), min(size[1], round(center_y + side / 2))
