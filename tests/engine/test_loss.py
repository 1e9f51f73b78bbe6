"""Loss shaping: each option changes exactly what it should, checked against values computed here."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from lib_lora_trainer.config import TrainingConfig, validate
from lib_lora_trainer.model.ldm_parts import sd_alphas_cumprod
from lib_lora_trainer.training.loop import train
from lib_lora_trainer.training.loss import LossShaping, NoisedLatents, zero_terminal_snr
from tests.engine.helpers import tiny_config, tiny_host
from tests.engine.test_training import small_source

ALPHAS = sd_alphas_cumprod().float()


def shaping(**overrides) -> LossShaping:
    config = TrainingConfig(**overrides)
    parameterization = "v" if config.parameterization == "v" else "eps"
    return LossShaping.from_config(config, ALPHAS, parameterization)


def hand_made(timesteps=(10, 500, 990)) -> tuple[torch.Tensor, NoisedLatents]:
    """A prediction and a target that differ by known amounts, small and large."""
    count = len(timesteps)
    target = torch.zeros(count, 1, 2, 2)
    prediction = torch.tensor([0.05, -0.2, 1.0, -3.0]).view(1, 1, 2, 2).repeat(count, 1, 1, 1)
    steps = torch.tensor(timesteps)
    return prediction, NoisedLatents(target.clone(), steps, target, ALPHAS[steps])


def per_sample_mean(values: torch.Tensor) -> torch.Tensor:
    return values.flatten(1).mean(dim=1)


ONES = torch.ones(3)


def test_default_shaping_draws_and_computes_what_the_loop_always_did():
    latents = torch.randn(2, 4, 8, 8)
    torch.manual_seed(3)
    noised = shaping().noise(latents)
    torch.manual_seed(3)
    noise = torch.randn_like(latents)
    timesteps = torch.randint(0, 1000, (2,))
    alpha_bar = ALPHAS[timesteps].view(-1, 1, 1, 1)
    assert torch.equal(noised.timesteps, timesteps)
    assert torch.allclose(noised.noisy, alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise)
    assert torch.equal(noised.target, noise)
    prediction = torch.randn_like(latents)
    expected = F.mse_loss(prediction, noise)
    assert torch.allclose(shaping().loss(prediction, noised, torch.ones(2)), expected)


def test_l2_and_l1_losses():
    prediction, noised = hand_made()
    difference = prediction - noised.target
    assert torch.allclose(shaping(loss_type="l2").loss(prediction, noised, ONES), (difference**2).mean())
    assert torch.allclose(shaping(loss_type="l1").loss(prediction, noised, ONES), difference.abs().mean())


@pytest.mark.parametrize("loss_type", ["huber", "smooth_l1"])
def test_huber_and_smooth_l1_with_a_constant_threshold(loss_type):
    prediction, noised = hand_made()
    c = 0.3
    d = prediction - noised.target
    pseudo = torch.sqrt(d**2 + c**2) - c
    expected = (2 * c * pseudo if loss_type == "huber" else 2 * pseudo).mean()
    result = shaping(loss_type=loss_type, huber_schedule="constant", huber_c=c).loss(prediction, noised, ONES)
    assert torch.allclose(result, expected)
    # quadratic for small errors, linear for large ones: the -3.0 error counts far less than in l2
    assert result < shaping(loss_type="l2").loss(prediction, noised, ONES)


def test_huber_schedules_change_the_threshold_with_the_timestep():
    prediction, noised = hand_made()
    c, scale = 0.1, 2.0
    d = prediction - noised.target
    steps = noised.timesteps.float()
    thresholds = {
        "exponential": torch.exp(math.log(c) * steps / 1000) * scale,
        "snr": (1 - c) / (1 + ((1 - noised.alpha_bar) / noised.alpha_bar).sqrt()) ** 2 + c,
        "constant": torch.full((3,), c * scale),
    }
    for schedule, threshold in thresholds.items():
        t = threshold.view(-1, 1, 1, 1)
        expected = per_sample_mean(2 * t * (torch.sqrt(d**2 + t**2) - t)).mean()
        config = dict(loss_type="huber", huber_schedule=schedule, huber_c=c, huber_scale=scale)
        assert torch.allclose(shaping(**config).loss(prediction, noised, ONES), expected), schedule
    # exponential: huber_scale at t=0 falling to huber_c x huber_scale at t=1000
    assert thresholds["exponential"][0] == pytest.approx(scale * c ** (10 / 1000))


def test_loss_weights_min_snr_and_debiased_estimation_weigh_each_sample():
    prediction, noised = hand_made()
    base = per_sample_mean((prediction - noised.target) ** 2)
    weights = torch.tensor([1.0, 0.5, 0.25])  # e.g. the prior loss weight of a regularisation image
    assert torch.allclose(shaping().loss(prediction, noised, weights), (base * weights).mean())
    snr = noised.alpha_bar / (1 - noised.alpha_bar)
    gamma = 5.0
    eps_min_snr = torch.minimum(snr, torch.tensor(gamma)) / snr
    assert torch.allclose(
        shaping(min_snr_gamma=gamma).loss(prediction, noised, ONES), (base * eps_min_snr).mean()
    )
    v = LossShaping.from_config(TrainingConfig(min_snr_gamma=gamma), ALPHAS, "v")
    v_min_snr = torch.minimum(snr, torch.tensor(gamma)) / (snr + 1)
    assert torch.allclose(v.loss(prediction, noised, ONES), (base * v_min_snr).mean())
    debiased = 1 / torch.sqrt(torch.clamp(snr, max=1000))
    result = shaping(debiased_estimation_loss=True).loss(prediction, noised, ONES)
    assert torch.allclose(result, (base * debiased).mean())
    v_debiased = LossShaping.from_config(TrainingConfig(debiased_estimation_loss=True), ALPHAS, "v")
    assert torch.allclose(v_debiased.loss(prediction, noised, ONES), (base / (snr + 1)).mean())


def generator(seed: int = 5) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_noise_offset_and_adaptive_noise_scale():
    latents = torch.randn(2, 4, 8, 8) + torch.tensor([0.0, 1.0, -2.0, 0.5]).view(1, 4, 1, 1)
    noised = shaping(noise_offset=0.1).noise(latents, generator())
    g = generator()
    noise = torch.randn(latents.shape, generator=g)
    expected = noise + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    assert torch.allclose(noised.target, expected)

    adaptive = shaping(noise_offset=0.1, adaptive_noise_scale=0.05).noise(latents, generator())
    g = generator()
    noise = torch.randn(latents.shape, generator=g)
    offset = torch.clamp(0.1 + 0.05 * latents.mean(dim=(2, 3), keepdim=True).abs(), min=0)
    assert torch.allclose(adaptive.target, noise + offset * torch.randn(2, 4, 1, 1, generator=g))

    random_strength = shaping(noise_offset=0.1, noise_offset_random_strength=True).noise(latents, generator())
    g = generator()
    noise = torch.randn(latents.shape, generator=g)
    strength = torch.rand(1, generator=g) * 0.1
    assert torch.allclose(random_strength.target, noise + strength * torch.randn(2, 4, 1, 1, generator=g))


def test_multires_noise_adds_coarse_noise_and_keeps_unit_variance():
    latents = torch.zeros(2, 4, 32, 32)
    iterations, discount = 3, 0.4
    noised = shaping(multires_noise_iterations=iterations, multires_noise_discount=discount).noise(
        latents, generator()
    )
    g = generator()
    noise = torch.randn(latents.shape, generator=g)
    total = noise.clone()
    for level in range(iterations):
        r = float(torch.rand(1, generator=g)) * 2 + 2
        h = w = max(1, int(32 / r**level))
        coarse = torch.randn(2, 4, h, w, generator=g)
        total += F.interpolate(coarse, size=(32, 32), mode="bilinear") * discount**level
    assert torch.allclose(noised.target, total / total.std(), atol=1e-6)
    assert noised.target.std().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("random_strength", [False, True])
def test_ip_noise_gamma_perturbs_the_input_but_not_the_target(random_strength):
    latents = torch.randn(2, 4, 8, 8)
    gamma = 0.1
    noised = shaping(ip_noise_gamma=gamma, ip_noise_gamma_random_strength=random_strength).noise(
        latents, generator()
    )
    g = generator()
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    strength = torch.rand(1, generator=g) * gamma if random_strength else gamma
    perturbation = torch.randn(latents.shape, generator=g)
    alpha_bar = ALPHAS[timesteps].view(-1, 1, 1, 1)
    assert torch.equal(noised.target, noise)
    expected = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * (noise + strength * perturbation)
    assert torch.allclose(noised.noisy, expected)


def test_the_timestep_range_is_respected():
    steps = shaping(min_timestep=200, max_timestep=400).sample_timesteps(
        20000, torch.device("cpu"), generator()
    )
    assert steps.min().item() == 200 and steps.max().item() == 399
    assert shaping().sample_timesteps(20000, torch.device("cpu"), generator()).max().item() == 999
    noised = shaping(min_timestep=990).noise(torch.zeros(64, 4, 2, 2), generator())
    assert bool((noised.timesteps >= 990).all())


def test_zero_terminal_snr_makes_the_last_alpha_bar_zero_and_targets_v():
    rescaled = zero_terminal_snr(ALPHAS)
    assert rescaled[-1].item() == 0.0 and ALPHAS[-1].item() > 0
    assert rescaled[0].item() == pytest.approx(ALPHAS[0].item(), rel=1e-6)
    assert bool((rescaled[1:] < rescaled[:-1]).all())
    shaped = LossShaping.from_config(
        TrainingConfig(zero_terminal_snr=True, parameterization="v"), ALPHAS, "v"
    )
    assert torch.equal(shaped.alphas_cumprod, rescaled)
    latents = torch.randn(2, 4, 4, 4)
    noised = LossShaping.from_config(
        TrainingConfig(zero_terminal_snr=True, parameterization="v", min_timestep=999), ALPHAS, "v"
    ).noise(latents, generator())
    # at the last step the input is pure noise and the v target is -latents
    assert torch.allclose(noised.target, -latents)
    assert "zero terminal SNR needs v-prediction" in " ".join(
        validate(TrainingConfig(zero_terminal_snr=True, parameterization="eps"), need_dataset=False)
    )


def test_a_masked_pixel_contributes_no_gradient():
    prediction = torch.randn(2, 4, 8, 8, requires_grad=True)
    noised = NoisedLatents(
        torch.zeros(2, 4, 8, 8), torch.tensor([100, 800]), torch.randn(2, 4, 8, 8), ALPHAS[[100, 800]]
    )
    masks = torch.ones(2, 1, 8, 8)
    masks[:, :, :, :4] = 0  # the left half is background
    loss = shaping().loss(prediction, noised, torch.ones(2), masks)
    loss.backward()
    assert bool((prediction.grad[..., :4] == 0).all())
    assert bool((prediction.grad[..., 4:] != 0).all())
    # kohya's semantics: loss x mask, then the mean over every element (no renormalisation)
    expected = (((prediction - noised.target) ** 2) * masks).mean()
    assert torch.allclose(loss, expected)


def test_a_pixel_resolution_mask_is_area_averaged_to_latent_size():
    prediction = torch.ones(1, 1, 2, 2)
    noised = NoisedLatents(torch.zeros(1, 1, 2, 2), torch.tensor([10]), torch.zeros(1, 1, 2, 2), ALPHAS[[10]])
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1  # the top-left latent pixel fully, nothing else
    mask[..., 2, 2] = 1  # a quarter of the bottom-right one
    assert shaping().loss(prediction, noised, torch.ones(1), mask).item() == pytest.approx((1 + 0.25) / 4)


@pytest.mark.parametrize(
    "option",
    [
        {"loss_type": "huber", "huber_schedule": "constant", "huber_c": 0.05},
        {"multires_noise_iterations": 4},
        {"ip_noise_gamma": 0.1},
        {"max_timestep": 100},
        {"debiased_estimation_loss": True},
    ],
)
def test_each_option_reaches_the_training_loop(tmp_path, option):
    baseline = train(tiny_host(), tiny_config(tmp_path / "a", epochs=1), small_source())
    changed = train(tiny_host(), tiny_config(tmp_path / "b", epochs=1, **option), small_source())
    assert changed.status == "completed" and all(math.isfinite(v) for v in changed.losses)
    assert changed.losses != baseline.losses


def test_bad_loss_settings_are_refused_with_a_sentence():
    cases = [
        ({"loss_type": "l3"}, "loss type"),
        ({"huber_c": 0.0}, "huber_c"),
        ({"adaptive_noise_scale": 0.1}, "needs a noise offset"),
        ({"min_timestep": 500, "max_timestep": 500}, "min_timestep < max_timestep"),
        ({"max_timestep": 1001}, "max_timestep <= 1000"),
        ({"multires_noise_discount": 0.0}, "discount"),
        ({"auto_mask": "body"}, "automatic mask"),
    ]
    for overrides, expected in cases:
        problems = validate(TrainingConfig(**overrides), need_dataset=False)
        assert any(expected in problem for problem in problems), (overrides, problems)


class MaskedSource:
    """small_source's batches with every pixel masked out."""

    def __init__(self, source):
        self._source = source

    def __getattr__(self, name):
        return getattr(self._source, name)

    def epoch(self, epoch_index, rng):
        for batch in self._source.epoch(epoch_index, rng):
            masks = torch.zeros(batch.latents.shape[0], 1, *batch.latents.shape[-2:])
            yield dataclasses.replace(batch, masks=masks)


def test_the_loop_passes_the_batch_masks_to_the_loss(tmp_path):
    result = train(tiny_host(), tiny_config(tmp_path, epochs=1), MaskedSource(small_source()))
    assert result.status == "completed" and result.losses == [0.0] * len(result.losses)
