from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from PIL import Image

from lib_lora_trainer.captioning import WD14Tagger
from tests.captioning.wd14_fixtures import write_model_folder

# A registered name, so the tagger picks up that model's default thresholds (general 0.3685).
CONVNEXT_V2 = "wd-v1-4-convnext-tagger-v2"


@pytest.fixture
def models_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    write_model_folder(folder / CONVNEXT_V2, size=448)
    return folder


@pytest.fixture
def tagger(models_dir: Path) -> WD14Tagger:
    tagger = WD14Tagger(models_dir / CONVNEXT_V2, use_gpu=False)
    yield tagger
    tagger.unload()


@pytest.fixture
def dataset(tmp_path: Path) -> Path:
    folder = tmp_path / "dataset"
    folder.mkdir()
    return folder


def save_image(path: Path, size: tuple[int, int] = (64, 64), color=(0, 0, 0), mode: str = "RGB") -> Path:
    """A plain image; black by default so the probe tags (pixel means) score 0 and stay out of captions."""
    Image.new(mode, size, color).save(path)
    return path


def file_digests(folder: Path) -> dict[str, str]:
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }
