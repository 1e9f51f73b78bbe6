"""The SmilingWolf WD14 tagger models: which exist, their default thresholds, and getting their files.

A model lives in ``<models_dir>/<model name>/`` as ``model.onnx`` + ``selected_tags.csv``. Once both
files are there, nothing here touches the network again, so tagging works offline after one download.
A model placed by hand may sit in any folder below ``models_dir`` (one or two levels deep) that holds
both files: :func:`installed_models` finds it under its folder's name.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

MODEL_FILENAME = "model.onnx"
LABELS_FILENAME = "selected_tags.csv"
MODEL_FILES = (MODEL_FILENAME, LABELS_FILENAME)

# The character threshold most WD14 front ends start from (SmilingWolf's own demo included).
DEFAULT_CHARACTER_THRESHOLD = 0.85
# Used for a hand-made model folder whose name is not in the registry.
FALLBACK_GENERAL_THRESHOLD = 0.35


@dataclass(frozen=True)
class WD14ModelInfo:
    name: str
    repo_id: str
    dataset_version: int  # 2: "wd-v1-4-*-v2" models, 3: "wd-*-tagger-v3" models
    general_threshold: float  # the model card's precision = recall threshold
    character_threshold: float = DEFAULT_CHARACTER_THRESHOLD

    @property
    def page_url(self) -> str:
        return f"https://huggingface.co/{self.repo_id}"

    @property
    def min_onnxruntime(self) -> tuple[int, int]:
        # The v3 model cards state "ONNX model requires onnxruntime >= 1.17.0".
        return (1, 17) if self.dataset_version >= 3 else (1, 0)


def _model(name: str, version: int, general_threshold: float) -> WD14ModelInfo:
    return WD14ModelInfo(name, f"SmilingWolf/{name}", version, general_threshold)


WD14_MODELS: dict[str, WD14ModelInfo] = {
    info.name: info
    for info in (
        _model("wd-v1-4-convnext-tagger-v2", 2, 0.3685),
        _model("wd-v1-4-convnextv2-tagger-v2", 2, 0.3710),
        _model("wd-v1-4-vit-tagger-v2", 2, 0.3537),
        _model("wd-v1-4-swinv2-tagger-v2", 2, 0.3771),
        _model("wd-v1-4-moat-tagger-v2", 2, 0.3771),
        _model("wd-vit-tagger-v3", 3, 0.2614),
        _model("wd-convnext-tagger-v3", 3, 0.2682),
        _model("wd-swinv2-tagger-v3", 3, 0.2653),
        _model("wd-vit-large-tagger-v3", 3, 0.2606),
        _model("wd-eva02-large-tagger-v3", 3, 0.5296),
    )
}

# Current tag set, a moderate download (~470 MB) and fast enough on a CPU.
DEFAULT_MODEL = "wd-swinv2-tagger-v3"


class TaggerModelUnavailable(RuntimeError):
    """The model's files are not on disk and could not (or may not) be downloaded."""


def get_model_info(model: str) -> WD14ModelInfo:
    """The registry entry for a model name (``wd-swinv2-tagger-v3``) or repo id (``SmilingWolf/...``)."""
    name = model.strip().rsplit("/", 1)[-1]
    if name not in WD14_MODELS:
        known = ", ".join(WD14_MODELS)
        raise ValueError(f"Unknown WD14 tagger model '{model}'. Choose one of: {known}")
    return WD14_MODELS[name]


def model_folder(models_dir: str | Path, model: str) -> Path:
    return Path(models_dir) / get_model_info(model).name


def installed_models(models_dir: str | Path, max_depth: int = 2) -> dict[str, Path]:
    """Every model folder below ``models_dir`` with both files, by name: the built-in models first (in
    registry order), then the others by folder name (``my-tagger`` or ``SmilingWolf/wd-vit-tagger-v3``
    as placed by hand). Hidden folders (download caches) are skipped."""
    root = Path(models_dir)
    if not str(models_dir).strip() or not root.is_dir():
        return {}
    found: dict[str, Path] = {}
    level = [root]
    for _ in range(max_depth):
        children = []
        for folder in level:
            try:
                entries = sorted(entry for entry in folder.iterdir() if entry.is_dir())
            except OSError as error:
                logger.warning("cannot list tagger models in %s: %s", folder, error)
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if not missing_model_files(entry):
                    found.setdefault(entry.relative_to(root).as_posix(), entry)
                else:
                    children.append(entry)
        level = children
    builtin = {name: found.pop(name) for name in WD14_MODELS if name in found}
    # a built-in model placed one level deeper (SmilingWolf/<name>) is that model
    for name in list(found):
        short = name.rsplit("/", 1)[-1]
        if short in WD14_MODELS and short not in builtin:
            builtin[short] = found.pop(name)
    ordered = {name: builtin[name] for name in WD14_MODELS if name in builtin}
    return {**ordered, **dict(sorted(found.items()))}


def missing_model_files(folder: str | Path) -> list[str]:
    """The files of a tagger model that are absent (or empty, like an interrupted copy) in ``folder``."""
    return [
        filename
        for filename in MODEL_FILES
        if not (Path(folder) / filename).is_file() or (Path(folder) / filename).stat().st_size == 0
    ]


def ensure_model_files(
    model: str,
    models_dir: str | Path,
    *,
    allow_download: bool = True,
    endpoint: str | None = None,
) -> Path:
    """The folder holding ``model``'s files, downloading what is missing with huggingface_hub.

    Files already present are used as they are, without any network request. ``endpoint`` lets a
    user behind a firewall use a Hugging Face mirror.
    """
    name = model.strip().rsplit("/", 1)[-1]
    if name not in WD14_MODELS:  # a model placed by hand, under its folder's name
        placed = installed_models(models_dir).get(model.strip())
        if placed is not None:
            logger.info("Using WD14 tagger %s from %s", model, placed)
            return placed
    info = get_model_info(model)
    folder = installed_models(models_dir).get(info.name, Path(models_dir) / info.name)
    missing = missing_model_files(folder)
    if not missing:
        logger.info("Using WD14 tagger %s from %s", info.name, folder)
        return folder
    if not allow_download:
        raise TaggerModelUnavailable(_missing_message(info, folder, missing, reason="downloads are off"))
    for filename in missing:
        _download(info, filename, folder, endpoint)
    return folder


def _download(info: WD14ModelInfo, filename: str, folder: Path, endpoint: str | None) -> None:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError as error:
        raise TaggerModelUnavailable(
            _missing_message(info, folder, [filename], reason="huggingface_hub is not installed")
        ) from error
    logger.info("Downloading %s of WD14 tagger %s into %s", filename, info.name, folder)
    created_folder = not folder.exists()
    before = _files_below(folder)
    folder.mkdir(parents=True, exist_ok=True)
    try:
        hf_hub_download(info.repo_id, filename, local_dir=folder, endpoint=endpoint)
    except Exception as error:  # network, HTTP, disk: all end the same way for the user
        _clean_failed_download(folder, before, created_folder)
        reason = f"the download failed ({type(error).__name__}: {_first_line(error)})"
        message = _missing_message(info, folder, [filename], reason=reason)
        logger.error(message)
        raise TaggerModelUnavailable(message) from error


# where huggingface_hub keeps a local_dir download's locks and metadata (0.2x: .huggingface, later .cache)
HUB_DOWNLOAD_CACHES = (".huggingface", ".cache/huggingface")


def _files_below(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")} if folder.is_dir() else set()


def _clean_failed_download(folder: Path, before: set[Path], created_folder: bool) -> None:
    """Take away what a failed download left: its ``.lock`` files, the hub's metadata folder when the
    download created it and no partial file is worth resuming, and the model folder if it is empty now."""
    try:
        for path in _files_below(folder) - before:
            if path.is_file() and path.suffix == ".lock":
                path.unlink(missing_ok=True)
        for cache in HUB_DOWNLOAD_CACHES:
            cache_dir = folder / cache
            if cache_dir.is_dir() and cache_dir not in before and not any(cache_dir.rglob("*.incomplete")):
                shutil.rmtree(cache_dir, ignore_errors=True)
        if (
            (folder / ".cache").is_dir()
            and folder / ".cache" not in before
            and not any((folder / ".cache").iterdir())
        ):
            (folder / ".cache").rmdir()
        if created_folder and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    except OSError as error:  # cleaning is a courtesy; the message about the download is what matters
        logger.warning("could not clean up the failed download in %s: %s", folder, error)


def _missing_message(info: WD14ModelInfo, folder: Path, missing: list[str], *, reason: str) -> str:
    return (
        f"WD14 tagger {info.name} is not available: {', '.join(missing)} missing in {folder} and "
        f"{reason}. If this computer is offline, download {' and '.join(MODEL_FILES)} from "
        f"{info.page_url} elsewhere and put them in that folder."
    )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
