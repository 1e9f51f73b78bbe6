"""The deterministic validation loss on the tiny real model: bit-identical on the same weights, moved
by the weights, falling while a tiny set is overfitted, and invisible to training's random state."""

from __future__ import annotations

import random

import pytest
import torch

from lib_lora_trainer.dataset.base import InMemoryBatchSource
from lib_lora_trainer.evaluation.validation import DeterministicValidation
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
