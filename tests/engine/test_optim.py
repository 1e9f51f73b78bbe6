"""Optimizers and schedules: every pair the form offers runs or is refused before the model is touched;
each installed optimizer learns; the missing ones say how to install them."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import math
import sys
import types

import pytest
import torch
import torch.nn.functional as F

from lib_lora_trainer.config import LR_SCHEDULERS, OPTIMIZERS, ConfigError, TrainingConfig, validate
from lib_lora_trainer.model.host import HostOptions
from lib_lora_trainer.network.adapters import AdapterSpec, attached_adapters, plan_targets
from lib_lora_trainer.training import optim
from lib_lora_trainer.training.loop import TrainingCallbacks, train
from lib_lora_trainer.ui.form import SPECS
from tests.engine.helpers import tiny_config, tiny_host
from tests.engine.test_training import CAPTIONS, small_source

# A learning rate each optimizer learns with on the tiny model (Prodigy's is its multiplier).
LEARNING_RATES = {"Prodigy": 1.0, "Lion": 1e-3, "Lion8bit": 1e-3}


def config_for(optimizer: str, scheduler: str, **overrides) -> TrainingConfig:
    rate = LEARNING_RATES.get(optimizer, 1e-3)
    values = dict(optimizer=optimizer, lr_scheduler=scheduler, unet_lr=rate, text_encoder_lr=rate)
    values.update(overrides)
    return TrainingConfig(**values)


class ModelTouched(AssertionError):
    pass


class GuardedHost:
    """A host whose model must not be touched: opening a session or reading anything but the device it
    trains on fails the test."""

    device = torch.device("cpu")

    def __getattr__(self, name):
        raise ModelTouched(f"the host's {name} was used before the settings were refused")


def run_or_refuse(config: TrainingConfig) -> str:
    """'refused: ...' when validate or the pre-check refuses ``config``; else steps it and says 'runs'."""
    problems = validate(config, need_dataset=False)
    if problems:
        return "refused: " + problems[0]
    try:
        optim.precheck_optimizer(config)
    except ConfigError as error:
        return "refused: " + error.messages[0]
    params = [torch.nn.Parameter(torch.randn(8, 8)), torch.nn.Parameter(torch.randn(8))]
    groups = [optim.ParamGroup("unet", params[:1], config.unet_lr)]
    groups.append(optim.ParamGroup("text_encoder", params[1:], config.text_encoder_lr))
    optimizer = optim.build_optimizer(config, groups, torch.device("cpu"))
    scheduler = optim.build_scheduler(config, optimizer, 30)
    for _ in range(30):
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        rates = optim.current_learning_rates(optimizer, scheduler)
        assert all(math.isfinite(rate) for rate in rates.values())
    return "runs"


GRID = [
    (optimizer, scheduler, warmup, relative)
    for optimizer in OPTIMIZERS
    for scheduler in LR_SCHEDULERS
    for warmup in (0, 3)
    for relative in ((False, True) if optimizer == "Adafactor" else (False,))
]


@pytest.mark.parametrize("optimizer, scheduler, warmup, relative", GRID)
def test_every_optimizer_and_schedule_pair_runs_or_is_refused_before_the_model(
    tmp_path, optimizer, scheduler, warmup, relative
):
    overrides = dict(
        optimizer=optimizer, lr_scheduler=scheduler, lr_warmup_steps=warmup, adafactor_relative_step=relative
    )
    overrides.update(_rates(optimizer))
    config = TrainingConfig(**overrides)
    if not optim.is_available(optimizer):
        with pytest.raises(optim.OptimizerUnavailable, match="pip install"):
            optim.precheck_optimizer(config)
        return
    if run_or_refuse(config).startswith("refused"):
        # train() refuses it the same way, before the host prepares the model
        with pytest.raises(ConfigError):
            train(GuardedHost(), tiny_config(tmp_path, **overrides), small_source())


def test_the_grid_decisions_that_matter():
    assert run_or_refuse(config_for("Adafactor", "polynomial")) == "runs"  # crashed after model prep before
    assert run_or_refuse(config_for("Adafactor", "polynomial", lr_warmup_steps=3)) == "runs"
    refusal = run_or_refuse(config_for("AdamW", "constant", lr_warmup_steps=3))
    assert "constant schedule has no warmup" in refusal  # was silently constant_with_warmup
    assert run_or_refuse(config_for("AdamW", "constant_with_warmup", lr_warmup_steps=3)) == "runs"
    assert "relative step" in run_or_refuse(config_for("Adafactor", "cosine", adafactor_relative_step=True))
    assert "step_rules" in run_or_refuse(config_for("AdamW", "piecewise_constant"))
    if optim.is_available("AdamWScheduleFree"):
        assert "replaces the schedule" in run_or_refuse(config_for("AdamWScheduleFree", "cosine"))


def test_prodigy_at_an_adamw_learning_rate_is_refused_before_the_model(tmp_path):
    config = tiny_config(tmp_path, optimizer="Prodigy", unet_lr=2e-4, text_encoder_lr=1e-4)
    with pytest.raises(ConfigError, match="about 1.0"):
        train(GuardedHost(), config, small_source())


@pytest.mark.skipif(importlib.util.find_spec("prodigyopt") is None, reason="prodigyopt not installed")
def test_prodigy_effective_learning_rate_is_its_estimate_times_the_multiplier():
    config = config_for("Prodigy", "constant", prodigy_d_coef=2.0, optimizer_args="d0=1e-5")
    param = torch.nn.Parameter(torch.full((16,), 3.0))
    optimizer = optim.build_optimizer(config, [optim.ParamGroup("unet", [param], 1.0)], torch.device("cpu"))
    scheduler = optim.build_scheduler(config, optimizer, 20)
    group = optimizer.param_groups[0]
    assert group["lr"] == 1.0 and group["d_coef"] == 2.0 and group["d"] == 1e-5
    rates = []
    for _ in range(20):
        (param**2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        rates.append(optim.current_learning_rates(optimizer, scheduler)["unet"])
    assert rates[-1] == pytest.approx(group["d"] * group["lr"])
    assert rates[-1] > 100 * 1e-5  # the estimate grew: it learns at lr 1.0 (2e-4 would be refused)


@pytest.mark.skipif(importlib.util.find_spec("schedulefree") is None, reason="schedulefree not installed")
def test_schedule_free_saves_the_averaged_weights_and_goes_back_to_training():
    config = config_for("AdamWScheduleFree", "constant_with_warmup", lr_warmup_steps=2, unet_lr=0.1)
    param = torch.nn.Parameter(torch.full((4,), 3.0))
    optimizer = optim.build_optimizer(config, [optim.ParamGroup("unet", [param], 0.1)], torch.device("cpu"))
    scheduler = optim.build_scheduler(config, optimizer, 10)
    assert optimizer.param_groups[0]["warmup_steps"] == 2
    for _ in range(5):
        (param**2).sum().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    training_values = param.detach().clone()
    with optim.evaluation_weights(optimizer):
        averaged = param.detach().clone()
        assert not optimizer.param_groups[0]["train_mode"]
    assert optimizer.param_groups[0]["train_mode"]
    assert not torch.equal(training_values, averaged)
    assert torch.allclose(param.detach(), training_values)


def test_optimizer_args_are_parsed_and_checked_against_the_constructor():
    config = config_for("AdamW", "constant", optimizer_args="betas=0.8,0.95 eps=1e-6 amsgrad=true")
    param = torch.nn.Parameter(torch.zeros(2))
    optimizer = optim.build_optimizer(config, [optim.ParamGroup("unet", [param], 1e-3)], torch.device("cpu"))
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6 and group["amsgrad"] is True
    assert "betas=(0.8, 0.95)" in optim.describe_optimizer(config)
    with pytest.raises(ConfigError, match="has no argument 'momentum'"):
        optim.precheck_optimizer(config_for("AdamW", "constant", optimizer_args="momentum=0.9"))
    with pytest.raises(ConfigError, match="Weight decay"):
        optim.precheck_optimizer(config_for("AdamW", "constant", optimizer_args="weight_decay=0.1"))
    with pytest.raises(ConfigError, match="cannot run"):
        optim.precheck_optimizer(config_for("AdamW", "constant", optimizer_args="betas=2.0,0.9"))
    assert any(
        "not key=value" in p for p in validate(TrainingConfig(optimizer_args="betas"), need_dataset=False)
    )
    with pytest.raises(ConfigError, match="has no argument 'gamma'"):
        optim.precheck_optimizer(config_for("AdamW", "cosine", lr_scheduler_args="gamma=0.5"))


def schedule_rates(config: TrainingConfig, total: int, lr: float = 1.0) -> list[float]:
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = optim.build_optimizer(config, [optim.ParamGroup("unet", [param], lr)], torch.device("cpu"))
    scheduler = optim.build_scheduler(config, optimizer, total)
    rates = []
    for _ in range(total):
        rates.append(optim.current_learning_rates(optimizer, scheduler)["unet"])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_new_schedules_follow_their_definitions():
    rates = schedule_rates(
        TrainingConfig(unet_lr=1.0, lr_scheduler="cosine_with_min_lr", lr_scheduler_args="min_lr_rate=0.2"),
        100,
    )
    # cosine from 1 to 0.2: halfway 0.6, the last step just above 0.2
    assert rates[0] == pytest.approx(1.0) and rates[50] == pytest.approx(0.6)
    assert rates[99] == pytest.approx(0.2, abs=1e-3) and min(rates) >= 0.2
    absolute = schedule_rates(
        TrainingConfig(unet_lr=0.5, lr_scheduler="cosine_with_min_lr", lr_scheduler_args="min_lr=0.05"),
        100,
        lr=0.5,
    )
    assert absolute[99] == pytest.approx(0.05, abs=1e-3) and min(absolute) >= 0.05
    wsd = schedule_rates(
        TrainingConfig(
            unet_lr=1.0,
            lr_scheduler="warmup_stable_decay",
            lr_warmup_steps=10,
            lr_scheduler_args="num_decay_steps=20 decay_type=linear",
        ),
        100,
    )
    assert wsd[5] == pytest.approx(0.5) and wsd[10] == wsd[79] == 1.0 and wsd[90] == pytest.approx(0.5)
    piecewise = schedule_rates(
        TrainingConfig(
            unet_lr=1.0, lr_scheduler="piecewise_constant", lr_scheduler_args="step_rules=1:3,0.5:6,0.1"
        ),
        8,
    )
    assert piecewise == pytest.approx([1, 1, 1, 0.5, 0.5, 0.5, 0.1, 0.1])
    poly = schedule_rates(
        TrainingConfig(optimizer="Adafactor", unet_lr=1.0, lr_scheduler="polynomial", lr_scheduler_power=2.0),
        10,
    )
    assert poly[5] == pytest.approx(0.25)


@pytest.mark.parametrize("name", [name for name, package in optim.OPTIONAL_PACKAGES.items()])
def test_a_missing_optimizer_package_gives_the_install_hint(tmp_path, name, monkeypatch):
    package = optim.OPTIONAL_PACKAGES[name]
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda module, *a: None if module == package.module else real_find_spec(module, *a),
    )
    assert name not in optim.available_optimizers()
    with pytest.raises(optim.OptimizerUnavailable) as raised:
        train(GuardedHost(), tiny_config(tmp_path, optimizer=name, **_rates(name)), small_source())
    message = str(raised.value)
    assert package.module in message and "pip install" in message and "AdamW" in message


def _rates(name: str) -> dict:
    rate = LEARNING_RATES.get(name, 1e-3)
    return {"unet_lr": rate, "text_encoder_lr": rate}


def test_bitsandbytes_is_not_installed_here_and_its_optimizers_say_so():
    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    assert set(SPECS["optimizer"].choices) == {name for name in OPTIMIZERS if optim.is_available(name)}
    for name in ("AdamW8bit", "PagedAdamW8bit", "Lion8bit"):
        assert name not in SPECS["optimizer"].choices
        with pytest.raises(optim.OptimizerUnavailable, match='pip install bitsandbytes "torch=='):
            optim.precheck_optimizer(config_for(name, "constant"))


def test_the_bitsandbytes_install_hint_keeps_this_torch():
    # pip keeps an installed torch that meets the pin (its +cu121 build too) and picks the bitsandbytes
    # release made for it: 0.45.5 on torch 2.1.2; a bare install would bring the newest and a new torch
    release = torch.__version__.split("+")[0]
    assert f'pip install bitsandbytes "torch=={release}"' in optim.unavailable_message("AdamW8bit")


# --- bitsandbytes installed, with what one release or another does on the training device ----------


class FakeEightBit(torch.optim.Optimizer):
    """A bitsandbytes 8-bit optimizer; ``failure`` is what its step raises on this device (None: it runs)."""

    failure: BaseException | None = None
    stepped: list = []

    def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999)):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas))

    def step(self, closure=None):
        if self.failure is not None:
            raise self.failure
        for group in self.param_groups:
            for parameter in group["params"]:
                type(self).stepped.append((parameter.numel(), parameter.device.type))
                parameter.data -= group["lr"] * parameter.grad


def fake_bitsandbytes(monkeypatch, version: str, failure: BaseException | None) -> type[FakeEightBit]:
    optimizer = type("FakeEightBit", (FakeEightBit,), {"failure": failure, "stepped": []})
    module = types.ModuleType("bitsandbytes")
    module.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", None)  # find_spec finds it
    module.__version__ = version
    module.optim = types.SimpleNamespace(**{name: optimizer for name in optim.BITSANDBYTES_OPTIMIZERS})
    monkeypatch.setitem(sys.modules, "bitsandbytes", module)
    return optimizer


# What the releases before 0.50 raise when an 8-bit optimizer steps a CPU parameter (measured, torch 2.13)
NO_CPU_KERNELS = {
    "0.45.5": NameError("name 'str2optimizer8bit_blockwise' is not defined"),
    "0.49.2": RuntimeError(
        "All input tensors need to be on the same GPU, but found some tensors to not be on a GPU:\n[...]"
    ),
}


@pytest.mark.parametrize("version", list(NO_CPU_KERNELS))
@pytest.mark.parametrize("name", optim.BITSANDBYTES_OPTIMIZERS)
def test_bitsandbytes_without_kernels_for_the_device_is_refused_before_the_model(
    tmp_path, monkeypatch, name, version
):
    fake_bitsandbytes(monkeypatch, version, NO_CPU_KERNELS[version])
    assert name in optim.available_optimizers()  # installed: the form offers it
    config = tiny_config(tmp_path, optimizer=name, **_rates(name))
    with pytest.raises(optim.OptimizerUnavailable) as raised:
        train(GuardedHost(), config, small_source())
    message = str(raised.value)
    assert f"{name} cannot run on the CPU with the installed bitsandbytes {version}" in message
    assert "bitsandbytes 0.50 or newer" in message and 'pip install bitsandbytes "torch==' in message
    assert "choose AdamW or Adafactor" in message
    assert str(NO_CPU_KERNELS[version]).splitlines()[0] in message  # what it said, in one line


def test_bitsandbytes_that_runs_on_the_device_is_stepped_there_through_its_8bit_kernels(monkeypatch):
    optimizer = fake_bitsandbytes(monkeypatch, "0.50.2", None)
    optim.precheck_optimizer(config_for("AdamW8bit", "constant"), device=torch.device("cpu"))
    # bitsandbytes keeps the state of a parameter under 4096 elements in 32 bits: one step is that large
    assert (optim.BITSANDBYTES_8BIT_SIZE, "cpu") in optimizer.stepped


def test_bitsandbytes_that_cannot_be_loaded_says_so(monkeypatch):
    fake_bitsandbytes(monkeypatch, "0.50.2", None)
    real_import = importlib.import_module

    def failing_import(name, *args):
        if name == "bitsandbytes":
            raise RuntimeError("bitsandbytes 0.50 needs torch 2.4 or newer\n(a long traceback)")
        return real_import(name, *args)

    monkeypatch.setattr(optim.importlib, "import_module", failing_import)
    with pytest.raises(optim.OptimizerUnavailable, match="installed but cannot be loaded .*needs torch 2.4"):
        optim.precheck_optimizer(config_for("Lion8bit", "constant"))


@pytest.mark.parametrize(
    ("device", "says"),
    [
        ("cuda", "reinstall it for this torch and its CUDA"),
        ("mps", "made for CUDA GPUs"),
        ("cpu", "bitsandbytes 0.50 or newer (with torch 2.4 or newer) runs them on the CPU"),
    ],
)
def test_the_device_message_says_what_to_do_on_each_device(device, says):
    message = optim._bitsandbytes_device_message("AdamW8bit", torch.device(device), RuntimeError("no"))
    assert says in message and "choose AdamW or Adafactor" in message


# The rate each optimizer takes a few clear steps down with on the tiny model (Prodigy: its multiplier).
OVERFIT_RATES = {
    "AdamW": 1e-2,
    "Adafactor": 1e-2,
    "AdamWScheduleFree": 1e-2,
    "Lion": 4e-3,
    "Prodigy": 1.0,
    "AdamW8bit": 1e-2,  # bitsandbytes' three: where it is installed (0.50+ steps them on the CPU)
    "PagedAdamW8bit": 1e-2,
    "Lion8bit": 4e-3,
}
# Prodigy's step size starts at d0 = 1e-6 and takes a few dozen steps to grow; a larger start shows it
# learning within a few steps.
# bitsandbytes keeps the tiny model's small tensors' state in 32 bits unless told otherwise: the 8-bit
# kernels themselves are stepped with min_8bit_size=1.
OVERFIT_ARGS = {"Prodigy": "d0=1e-4", **dict.fromkeys(optim.BITSANDBYTES_OPTIMIZERS, "min_8bit_size=1")}


def fixed_noise_losses(optimizer_name: str, steps: int) -> list[float]:
    """The UNet adapters of the tiny model trained on one fixed batch (fixed noise and timesteps), so the
    loss measured before every step falls only through what the optimizer does."""
    host = tiny_host()
    config = TrainingConfig(
        optimizer=optimizer_name,
        unet_lr=OVERFIT_RATES[optimizer_name],
        lr_scheduler="constant",
        weight_decay=0.0,
        train_text_encoder=False,
        optimizer_args=OVERFIT_ARGS.get(optimizer_name, ""),
    )
    generator = torch.Generator().manual_seed(0)
    options = HostOptions(train_text_encoder=False, clip_skip=1, mixed_precision="no")
    with host.session(options):
        images = small_source(count=2, batch_size=2)
        images.prepare(host.encode_images)
        latents = torch.stack(images._latents)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.tensor([300, 600])
        alpha_bar = host.alphas_cumprod()[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        with torch.no_grad():
            cond = host.encode_text(CAPTIONS[:2])
        spec = AdapterSpec(network_dim=4, network_alpha=2.0, train_text_encoder=False)
        with attached_adapters(
            host.unet(), host.text_encoder(), plan_targets(host.unet(), host.text_encoder(), spec)
        ) as adapters:
            params = adapters.parameters("unet")
            optimizer = optim.build_optimizer(
                config, [optim.ParamGroup("unet", params, config.unet_lr)], host.device
            )
            scheduler = optim.build_scheduler(config, optimizer, steps)
            losses = []
            for _ in range(steps):
                loss = F.mse_loss(host.predict(noisy, timesteps, cond), noise)
                losses.append(float(loss.detach()))
                loss.backward()
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            with optim.evaluation_weights(optimizer), torch.no_grad():
                losses.append(float(F.mse_loss(host.predict(noisy, timesteps, cond), noise)))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name in OPTIMIZERS if optim.is_available(name)])
def test_each_installed_optimizer_lowers_the_loss_on_the_tiny_overfit_set(name):
    losses = fixed_noise_losses(name, steps=6)
    assert losses[-1] < 0.9 * losses[0], (name, losses)


def test_the_file_metadata_records_the_loss_optimizer_and_schedule_as_kohya_does():
    from lib_lora_trainer.network.kohya_format import TrainingRunInfo, build_metadata

    config = TrainingConfig(
        loss_type="huber",
        huber_schedule="constant",
        huber_c=0.2,
        min_timestep=100,
        max_timestep=900,
        multires_noise_iterations=6,
        ip_noise_gamma=0.1,
        zero_terminal_snr=True,
        parameterization="v",
        debiased_estimation_loss=True,
        noise_offset=0.05,
        adaptive_noise_scale=0.01,
        alpha_mask=True,
        optimizer_args="betas=0.9,0.99",
        lr_scheduler="cosine_with_min_lr",
        lr_scheduler_args="min_lr_rate=0.1",
    )
    run = TrainingRunInfo(
        num_batches_per_epoch=1,
        max_train_steps=10,
        dataset_dirs={},
        tag_frequency={},
        optimizer=optim.describe_optimizer(config),
    )
    metadata = build_metadata(output_name="alice", epoch=1, steps=10, config=config, run=run)
    expected = {
        "ss_loss_type": "huber", "ss_huber_schedule": "constant", "ss_huber_c": "0.2",
        "ss_min_timestep": "100", "ss_max_timestep": "900", "ss_multires_noise_iterations": "6",
        "ss_ip_noise_gamma": "0.1", "ss_zero_terminal_snr": "True", "ss_debiased_estimation": "True",
        "ss_adaptive_noise_scale": "0.01", "ss_masked_loss": "True", "ss_lr_scheduler": "cosine_with_min_lr",
        "ss_lr_scheduler_args": "min_lr_rate=0.1",
        "ss_optimizer": "torch.optim.adamw.AdamW(weight_decay=0.01,betas=(0.9, 0.99))",
    }  # fmt: skip
    assert {key: metadata[key] for key in expected} == expected
    plain = build_metadata(output_name="alice", epoch=1, steps=10, config=TrainingConfig(), run=run)
    assert plain["ss_multires_noise_iterations"] == plain["ss_ip_noise_gamma"] == "None"
    assert plain["ss_loss_type"] == "l2" and plain["ss_masked_loss"] == "False"


@pytest.mark.skipif(importlib.util.find_spec("schedulefree") is None, reason="schedulefree not installed")
def test_a_schedule_free_run_saves_averaged_weights_and_trains_on_after_each_save(tmp_path, monkeypatch):
    import lib_lora_trainer.training.loop as loop

    built = []
    monkeypatch.setattr(
        loop, "build_optimizer", lambda *a, **k: built.append(optim.build_optimizer(*a, **k)) or built[-1]
    )
    modes_at_save = []

    class Watcher(TrainingCallbacks):
        def on_epoch_saved(self, saved):
            modes_at_save.append(built[0].param_groups[0]["train_mode"])

    config = tiny_config(
        tmp_path, optimizer="AdamWScheduleFree", lr_scheduler="constant_with_warmup", lr_warmup_steps=1
    )
    result = train(tiny_host(), config, small_source(), Watcher())
    assert result.status == "completed" and len(result.losses) == 4
    assert modes_at_save == [False, False]  # saved (and sampled) with the averaged weights
    assert built[0].param_groups[0]["train_mode"]  # and back to training after each save
