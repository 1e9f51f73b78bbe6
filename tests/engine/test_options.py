"""Optimizers, schedules and the loss options, each checked on its own or through a short real run."""

from __future__ import annotations

import math

import pytest
import torch

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.training import optim
from lib_lora_trainer.training.loop import TrainingCallbacks, train
from tests.engine.helpers import tiny_config, tiny_host
from tests.engine.test_training import small_source


def schedule_rates(config: TrainingConfig, total: int) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = optim.build_optimizer(
        config, [optim.ParamGroup("unet", [param], config.unet_lr)], torch.device("cpu")
    )
    scheduler = optim.build_scheduler(config, optimizer, total)
    rates = []
    for _ in range(total):
        rates.append(optim.current_learning_rates(optimizer, scheduler)["unet"])
        optimizer.step()
        scheduler.step()
    return rates


def test_warmup_then_cosine_with_restarts_cycles():
    config = TrainingConfig(
        unet_lr=1.0, lr_scheduler="cosine_with_restarts", lr_scheduler_num_cycles=2, lr_warmup_steps=10
    )
    rates = schedule_rates(config, 110)
    assert rates[0] == 0 and rates[5] == pytest.approx(0.5) and rates[10] == pytest.approx(1.0)
    # two cosine cycles of 50 steps after warmup: back to the top at step 60
    assert rates[59] < 0.01 and rates[60] == pytest.approx(1.0)


def test_warmup_as_a_fraction_and_the_other_schedules():
    config = TrainingConfig(unet_lr=1.0, lr_scheduler="linear", lr_warmup_steps=0.1)
    rates = schedule_rates(config, 100)
    assert rates[10] == pytest.approx(1.0) and rates[55] == pytest.approx(0.5)
    assert schedule_rates(TrainingConfig(unet_lr=2.0, lr_scheduler="constant"), 5) == [2.0] * 5
    poly = schedule_rates(TrainingConfig(unet_lr=1.0, lr_scheduler="polynomial", lr_scheduler_power=2.0), 10)
    assert poly[5] == pytest.approx(0.25)
    cosine = schedule_rates(TrainingConfig(unet_lr=1.0, lr_scheduler="cosine"), 10)
    assert cosine[5] == pytest.approx(0.5)


def test_missing_optimizer_package_is_a_clear_message(tmp_path):
    for name, package in (("AdamW8bit", "bitsandbytes"), ("Prodigy", "prodigyopt")):
        if __import__("importlib").util.find_spec(package) is not None:
            continue
        with pytest.raises(optim.OptimizerUnavailable, match=package):
            train(tiny_host(), tiny_config(tmp_path, optimizer=name), small_source())


@pytest.mark.parametrize("relative_step", [False, True])
def test_adafactor_trains(tmp_path, relative_step):
    config = tiny_config(tmp_path, optimizer="Adafactor", adafactor_relative_step=relative_step, epochs=1)
    result = train(tiny_host(), config, small_source())
    assert result.status == "completed" and all(math.isfinite(v) for v in result.losses)


class CountingHost:
    def __init__(self, host):
        self._host, self.text_calls, self.unet_calls = host, 0, 0

    def __getattr__(self, name):
        return getattr(self._host, name)

    def encode_text(self, captions):
        self.text_calls += 1
        return self._host.encode_text(captions)

    def predict(self, noisy, timesteps, cond):
        self.unet_calls += 1
        return self._host.predict(noisy, timesteps, cond)


def test_frozen_text_encoder_encodes_each_caption_once(tmp_path):
    host = CountingHost(tiny_host())
    # "off": no memory probe, whose two forwards would count here
    config = tiny_config(tmp_path, train_text_encoder=False, epochs=3, gradient_checkpointing="off")
    result = train(host, config, small_source())
    assert result.status == "completed"
    assert host.unet_calls == 6 and host.text_calls == 4  # 4 distinct captions, 6 steps


class StepCounter(TrainingCallbacks):
    def __init__(self):
        self.steps = []

    def on_step(self, progress):
        self.steps.append(progress.step)


def test_gradient_accumulation_counts_optimizer_steps(tmp_path):
    counter = StepCounter()
    source = small_source(count=4, batch_size=1)  # 4 batches per epoch
    config = tiny_config(tmp_path, batch_size=1, gradient_accumulation_steps=3, epochs=2)
    result = train(tiny_host(), config, source, counter)
    assert result.plan.steps_per_epoch == 2 and result.plan.total_steps == 4
    assert counter.steps == [1, 2, 3, 4]
    assert len(result.losses) == 8  # one loss per batch


@pytest.mark.parametrize(
    "overrides",
    [
        {"min_snr_gamma": 5.0, "noise_offset": 0.1},
        {"parameterization": "v"},
        {"mixed_precision": "bf16", "save_precision": "bf16"},
        {"clip_skip": 2, "max_grad_norm": 0.0, "lr_scheduler": "cosine_with_restarts", "lr_warmup_steps": 1},
    ],
)
def test_loss_options_run_and_stay_finite(tmp_path, overrides):
    result = train(tiny_host(), tiny_config(tmp_path, epochs=1, **overrides), small_source())
    assert result.status == "completed" and all(math.isfinite(v) for v in result.losses)


class LossCollector(TrainingCallbacks):
    def __init__(self):
        self.reported, self.at_save = [], []

    def on_step(self, progress):
        self.reported += progress.new_losses

    def on_epoch_saved(self, saved):
        self.at_save.append(len(self.reported))


def test_every_step_loss_is_reported_before_its_epoch_is_saved(tmp_path):
    collector = LossCollector()
    result = train(tiny_host(), tiny_config(tmp_path, epochs=2), small_source(), collector)  # 2 steps/epoch
    assert [step for step, _ in collector.reported] == [1, 2, 3, 4]
    assert collector.at_save == [2, 4]
    assert [loss for _, loss in collector.reported] == result.losses
