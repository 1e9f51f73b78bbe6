"""Shared pieces for the tab's tests: a tiny real model, a small dataset, stand-alone host services."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.model.standalone import build_random_host
from lib_lora_trainer.ui.jobs import TrainingJobs
from lib_lora_trainer.ui.standalone import StandaloneServices
from tests.engine.helpers import TINY_TRAINING, make_images

# Settings that train the tiny model in seconds on a CPU (2 epochs x 4 steps by default).
TINY = dict(
    TINY_TRAINING,
    trigger_word="ohwx_alice",
    max_bucket_reso=128,
    flat_repeats=2,
    batch_size=1,
    sample_steps=2,
    sample_width=64,
    sample_height=64,
    sample_prompts=["ohwx_alice, portrait"],
)


@pytest.fixture(scope="module")
def tiny_host():
    return build_random_host("tiny", seed=3)


def make_dataset(folder: Path, count: int = 2, caption: str | None = "ohwx_alice, red scarf") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for index, image in enumerate(make_images(count, size=64, seed=11)):
        image.save(folder / f"img{index}.png")
        if caption is not None:
            (folder / f"img{index}.txt").write_text(f"{caption}\n", encoding="utf-8")
    return folder


@pytest.fixture
def services(tmp_path, tiny_host) -> StandaloneServices:
    return StandaloneServices(tiny_host, tmp_path / "webui")


@pytest.fixture
def jobs(services) -> TrainingJobs:
    return TrainingJobs(services)


@pytest.fixture
def dataset(services) -> Path:
    return make_dataset(services.datasets_dir / "alice")


def tiny_config(dataset: Path, **overrides) -> TrainingConfig:
    return dataclasses.replace(TrainingConfig(train_data_dir=str(dataset), **TINY), **overrides)
