"""The scoring models: where each comes from, its licence, and getting its files once.

A model lives in ``<models_dir>/<key>/`` with its files under the same relative paths as in its
Hugging Face repository. Once they are there nothing here touches the network again (as with the WD14
tagger in :mod:`lib_lora_trainer.captioning.wd14_models`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScorerModel:
    key: str  # the folder name under the models folder
    repo_id: str
    files: tuple[str, ...]  # paths inside the repository; the first is the model itself
    licence: str

    @property
    def page_url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"

    def folder(self, models_dir: str | Path) -> Path:
        return Path(models_dir) / self.key

    def model_path(self, models_dir: str | Path) -> Path:
        return self.folder(models_dir) / self.files[0]


# ArcFace ResNet100 from the ONNX Model Zoo (mirrored on Hugging Face): 112x112 RGB face in, 512 out.
FACE_MODEL = ScorerModel(
    key="arcface-resnet100",
    repo_id="onnxmodelzoo/arcfaceresnet100-8",
    files=("arcfaceresnet100-8.onnx",),
    licence="Apache-2.0 (ONNX Model Zoo); the weights were trained on MS-Celeb-1M, a withdrawn data set",
)
# deepghs CCIP (contrastive anime character image pre-training): 384x384 RGB in, 768 out.
CHARACTER_MODEL = ScorerModel(
    key="ccip-caformer-24-randaug-pruned",
    repo_id="deepghs/ccip_onnx",
    files=("ccip-caformer-24-randaug-pruned/model_feat.onnx",),
    licence="OpenRAIL (use-based restrictions, commercial use allowed)",
)
CLIP_MODEL = ScorerModel(
    key="clip-vit-base-patch32",
    repo_id="openai/clip-vit-base-patch32",
    files=(
        "pytorch_model.bin",
        "config.json",
        "preprocessor_config.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "special_tokens_map.json",
    ),
    licence="MIT",
)
SCORER_MODELS = (FACE_MODEL, CHARACTER_MODEL, CLIP_MODEL)


class ScorerModelUnavailable(RuntimeError):
    """A scoring model's files are not on disk and could not (or may not) be downloaded."""


def missing_files(model: ScorerModel, models_dir: str | Path) -> list[str]:
    """The model's files absent (or empty, like an interrupted copy) in its folder."""
    folder = model.folder(models_dir)
    return [
        name for name in model.files if not (folder / name).is_file() or (folder / name).stat().st_size == 0
    ]


def is_available(model: ScorerModel, models_dir: str | Path) -> bool:
    return bool(str(models_dir).strip()) and not missing_files(model, models_dir)


def ensure_model(
    model: ScorerModel, models_dir: str | Path, *, allow_download: bool = True, endpoint: str | None = None
) -> Path:
    """The folder holding ``model``'s files, downloading what is missing with huggingface_hub."""
    if not str(models_dir).strip():
        raise ScorerModelUnavailable(
            f"No folder for scoring models is set; set it in the settings to score epochs with {model.key}."
        )
    folder = model.folder(models_dir)
    missing = missing_files(model, models_dir)
    if not missing:
        return folder
    if not allow_download:
        raise ScorerModelUnavailable(_missing_message(model, folder, missing, "downloads are off"))
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise ScorerModelUnavailable(
            _missing_message(model, folder, missing, "huggingface_hub is not installed")
        ) from error
    folder.mkdir(parents=True, exist_ok=True)
    for name in missing:
        logger.info("Downloading %s of %s into %s", name, model.repo_id, folder)
        try:
            hf_hub_download(model.repo_id, name, local_dir=folder, endpoint=endpoint)
        except Exception as error:  # network, HTTP, disk: all end the same way for the user
            reason = f"the download failed ({type(error).__name__}: {_first_line(error)})"
            message = _missing_message(model, folder, [name], reason)
            logger.error(message)
            raise ScorerModelUnavailable(message) from error
    return folder


def _missing_message(model: ScorerModel, folder: Path, missing: list[str], reason: str) -> str:
    return (
        f"Scoring model {model.key} is not available: {', '.join(missing)} missing in {folder} and "
        f"{reason}. If this computer is offline, download those files from {model.page_url} elsewhere "
        "and put them in that folder (same sub-paths); training itself is not affected."
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
