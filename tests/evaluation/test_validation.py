"""The deterministic validation loss on the tiny real model: bit-identical on the same weights, moved
by the weights, falling while a tiny set is overfitted, and invisible to training's random state; over
a held-out folder or over the images a held-out share keeps out of training."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from lib_lora_trainer.dataset.base import InMemoryBatchSource
from lib_lora_trainer.dataset.scan import scan_dataset
from lib_lora_trainer.dataset.source import build_batch_source
from lib_lora_trainer.evaluation.scoring import load_training_images
from lib_lora_trainer.evaluation.validation import DeterministicValidation, validation_for
from lib_lora_trainer.model.host import HostOptions
from lib_lora_trainer.training.loop import TrainingCallbacks, train
from tests.engine.helpers import make_images, tiny_config, tiny_host

CAPTIONS = ["alice, red scarf", "alice smiling"]


def source(count: int = 2, seed: int = 0) -> InMemoryBatchSource:
    items = list(zip(make_images(count, seed=seed), CAPTIONS * count, strict=False))
    return InMemoryBatchSource(items, resolution=64, batch_size=1)


def measured(host, validation, data) -> float:
    with host.session(HostOptions(train_text_encoder=False)):
        data.prepare(host.encode_images)
        return validation(host, data, "no")


def test_bit_identical_twice_on_the_same_weights_and_different_when_they_change():
    host, data = tiny_host(), source()
    validation = DeterministicValidation(timesteps=3)
    first = measured(host, validation, data)
    second = measured(host, validation, data)
    assert first == second  # bit for bit, not approximately

    with torch.no_grad():
        host.unet().out[-1].weight.mul_(1.5)
    assert measured(host, validation, data) != first


def test_the_global_random_state_is_left_alone():
    host, data = tiny_host(), source()
    with host.session(HostOptions(train_text_encoder=False)):
        data.prepare(host.encode_images)
        torch.manual_seed(5)
        before = torch.get_rng_state()
        python_state = random.getstate()
        DeterministicValidation()(host, data, "no")
    assert torch.equal(torch.get_rng_state(), before)
    assert random.getstate() == python_state


def test_held_out_images_are_used_instead_of_the_training_images():
    host, data = tiny_host(), source()
    on_training = measured(host, DeterministicValidation(), data)
    held_out = measured(host, DeterministicValidation(source(2, seed=9)), data)
    assert held_out != on_training


class Recorder(TrainingCallbacks):
    def __init__(self):
        self.saved = []

    def on_epoch_saved(self, saved):
        self.saved.append(saved)


@pytest.mark.slow
def test_falls_across_epochs_on_a_tiny_overfit_set_and_leaves_training_unchanged(tmp_path):
    config = tiny_config(tmp_path / "with", epochs=4, batch_size=1, unet_lr=3e-3, train_text_encoder=False)
    recorder = Recorder()
    validation = DeterministicValidation(timesteps=4)
    with_validation = train(tiny_host(), config, source(), recorder, validation=validation)

    losses = [saved.validation_loss for saved in recorder.saved]
    assert len(losses) == 4 and all(loss is not None for loss in losses)
    assert losses == validation.history
    assert losses[-1] < losses[0]

    plain = train(
        tiny_host(),
        tiny_config(tmp_path / "without", epochs=4, batch_size=1, unet_lr=3e-3, train_text_encoder=False),
        source(),
    )
    assert with_validation.losses == plain.losses  # same random draws: exact resume is not disturbed


# --- a held-out share -------------------------------------------------------------------------------
def image_folder(folder, count: int, seed: int = 0):
    folder.mkdir(parents=True)
    for index, image in enumerate(make_images(count, seed=seed)):
        image.save(folder / f"photo_{index}.png")
        (folder / f"photo_{index}.txt").write_text(f"red scarf, pose {index}", encoding="utf-8")
    return folder


def held_out_paths(config) -> set:
    return {record.path for subset in scan_dataset(config).held_out for record in subset.images}


def measured_paths(validation) -> set:
    return {planned.record.path for planned in validation.held_out.plan.images}


def test_a_held_out_share_is_measured_on_exactly_the_images_it_keeps_out(tmp_path):
    folder = image_folder(tmp_path / "alice", 6)
    config = tiny_config(
        tmp_path, train_data_dir=str(folder), validation_share=0.34, trigger_word="ohwx", flat_repeats=3,
        flip_aug=True, shuffle_caption=True,
    )  # fmt: skip
    validation = validation_for(config)

    assert validation.uses_held_out_images
    held = held_out_paths(config)
    assert measured_paths(validation) == held and len(held) == 2  # 0.34 x 6 = 2.04 -> 2
    # measured as trained (trigger word first) but each image once, without augmentation
    assert all(planned.repeats == 1 for planned in validation.held_out.plan.images)
    assert all(caption.startswith("ohwx, red scarf") for caption in validation.held_out.captions())
    assert not validation.held_out.settings.flip_aug and not validation.held_out.captions_vary()

    host = tiny_host()
    training = build_batch_source(config, scan_dataset(config))
    assert not held & {planned.record.path for planned in training.plan.images}
    on_held_out = measured(host, validation, training)
    assert measured(host, validation_for(config), training) == on_held_out  # a new run: bit-identical
    assert measured(host, DeterministicValidation(), training) != on_held_out  # not the training images


def test_a_held_out_folder_is_measured_on_its_images(tmp_path):
    folder, held = image_folder(tmp_path / "alice", 4), image_folder(tmp_path / "held", 2, seed=4)
    config = tiny_config(tmp_path, train_data_dir=str(folder), validation_dir=str(held), flat_repeats=2)
    validation = validation_for(config)
    assert measured_paths(validation) == set(held.glob("*.png"))
    assert scan_dataset(config).held_out == []  # the folder keeps nothing of the training images out


def test_a_share_that_keeps_nothing_out_measures_the_training_images(tmp_path):
    folder = image_folder(tmp_path / "train" / "5_alice", 1)
    config = tiny_config(
        tmp_path, train_data_dir=str(folder.parent), dataset_layout="kohya", validation_share=0.2
    )
    validation = validation_for(config)
    assert validation is not None and not validation.uses_held_out_images


def test_the_held_out_images_are_the_first_likeness_references(tmp_path):
    folder = image_folder(tmp_path / "alice", 6)
    config = tiny_config(tmp_path, train_data_dir=str(folder), validation_share=0.34)
    names = [image.filename for image in load_training_images(config)]
    assert len(names) == 6  # the same character, never trained on: compared with as well
    assert {Path(name) for name in names[:2]} == held_out_paths(config)


@pytest.mark.slow
def test_a_tiny_run_with_a_share_trains_on_the_rest_and_records_validation_losses(tmp_path, monkeypatch):
    from lib_lora_trainer.network.kohya_format import load_kohya_lora
    from lib_lora_trainer.ui import jobs as jobs_module
    from lib_lora_trainer.ui.jobs import TrainingJobs
    from lib_lora_trainer.ui.standalone import StandaloneServices
    from tests.ui.conftest import make_dataset
    from tests.ui.conftest import tiny_config as tab_config

    built = []

    def recorded_validation_for(config, face_finder=None):
        built.append(validation_for(config, face_finder))
        return built[-1]

    monkeypatch.setattr(jobs_module, "validation_for", recorded_validation_for)
    services = StandaloneServices(tiny_host(), tmp_path / "webui")
    dataset = make_dataset(services.datasets_dir / "alice", count=5)
    config = tab_config(dataset, validation_share=0.2, sample_every_n_epochs=0, evaluate_epochs=False)
    job = TrainingJobs(services).start(config)
    assert job.wait(300)
    snapshot = job.snapshot()
    assert snapshot.state == "completed", snapshot.message

    (validation,) = built
    held = held_out_paths(job.config)
    assert measured_paths(validation) == held and len(held) == 1  # 0.2 x 5 images
    # 4 images x 2 repeats, batch 1: 8 steps per epoch instead of 10
    assert snapshot.total_steps == 2 * 8
    losses = [result.validation_loss for result in snapshot.epoch_results]
    assert len(losses) == 2 and None not in losses and losses == validation.history
    _, metadata = load_kohya_lora(job.run.model_path(2))
    assert metadata["ss_num_train_images"] == "8"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"alice": {"n_repeats": 2, "img_count": 4}}


@pytest.mark.slow
def test_a_run_with_a_share_resumes_exactly_and_a_changed_share_is_named(tmp_path):
    from lib_lora_trainer.training.loop import ResumeMismatch
    from lib_lora_trainer.training.run import run_training
    from tests.engine.test_resume import StopAtBatch

    folder = image_folder(tmp_path / "alice", 5)
    settings = dict(
        train_data_dir=str(folder), validation_share=0.2, batch_size=1, epochs=2, trigger_word="ohwx"
    )
    whole_config, config = (
        tiny_config(tmp_path / "whole", **settings),
        tiny_config(tmp_path / "run", **settings),
    )
    whole = run_training(tiny_host(), whole_config, validation=validation_for(whole_config))
    first = run_training(tiny_host(), config, StopAtBatch(3), validation=validation_for(config))
    assert first.status == "interrupted" and first.state_path is not None

    changed = tiny_config(tmp_path / "run", **dict(settings, validation_share=0.4))
    with pytest.raises(ResumeMismatch, match="validation_share 0.2 -> 0.4") as refused:
        run_training(tiny_host(), changed, resume_from=first.state_path, validation=validation_for(changed))
    assert "the dataset changed" in str(refused.value)  # another image is held out

    resumed = run_training(
        tiny_host(), config, resume_from=first.state_path, validation=validation_for(config)
    )
    assert resumed.status == "completed", resumed.message
    assert resumed.losses == whole.losses  # the same 4 images in the same order: the same split
    assert [e.validation_loss for e in resumed.epochs] == [e.validation_loss for e in whole.epochs]
    assert None not in [e.validation_loss for e in resumed.epochs]
