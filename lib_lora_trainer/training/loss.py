"""Everything that shapes the training loss, beside the loss: noise, timesteps, loss function, weights.

:class:`LossShaping` is built once per run from the config (:meth:`LossShaping.from_config`); the loop
calls :meth:`LossShaping.noise` before the UNet and :meth:`LossShaping.loss` after it. The options
follow kohya sd-scripts' semantics (``train_util.get_noise_noisy_latents_and_timesteps``,
``conditional_loss``, ``get_huber_threshold_if_needed`` and ``custom_train_functions``), so a kohya
user's settings mean the same here.

Random draws: every draw goes through ``generator`` (None: torch's global RNG on the latents' device),
so a resumed run that restores the RNG state draws the same numbers. Per batch, in this order:

1. ``noise``: one normal draw shaped like the latents;
2. noise offset: with ``noise_offset_random_strength`` one uniform draw (1,), then one normal (B, C, 1, 1);
3. multires noise: per level one uniform draw (1,) for the scale, then one normal at that size (kohya
   draws the scale from Python's ``random``; here it is torch's, so one RNG state covers every draw);
4. timesteps: one integer draw (B,) in [min_timestep, max_timestep);
5. input perturbation (``ip_noise_gamma``): with the random variant one uniform draw (1,), then one
   normal shaped like the latents.

With every option off, only draws 1 and 4 happen (as before these options existed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib_lora_trainer.config import TrainingConfig

# kohya clamps the SNR at t=0 (where it is huge) to this for the debiased-estimation weight.
DEBIASED_SNR_CAP = 1000.0


@dataclass(frozen=True)
class NoisedLatents:
    """One batch as the UNet receives it, and what its prediction is compared with."""

    noisy: torch.Tensor  # (B, C, H, W)
    timesteps: torch.Tensor  # (B,) long
    target: torch.Tensor  # (B, C, H, W): the noise (eps) or the velocity (v)
    alpha_bar: torch.Tensor  # (B,) the noise schedule's alpha_bar at each timestep


def zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The schedule rescaled so that the last alpha_bar is exactly 0 (Lin et al. 2023, "Common diffusion
    noise schedules and sample steps are flawed", Algorithm 1): sqrt(alpha_bar) is shifted so its last
    value is 0 and scaled so its first value is unchanged."""
    root = alphas_cumprod.double().sqrt()
    first, last = root[0].clone(), root[-1].clone()
    rescaled = (root - last) * (first / (first - last))
    return (rescaled**2).to(alphas_cumprod.dtype)


def pyramid_noise(
    noise: torch.Tensor, iterations: int, discount: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """kohya's multires ("pyramid") noise: noise at ever coarser random scales added on top, each
    ``discount`` times weaker than the last, then scaled back to unit standard deviation."""
    batch, channels, height, width = noise.shape
    result = noise.clone()
    for level in range(iterations):  # level 0 adds one more full-size noise, as in kohya
        factor = float(_rand((1,), noise, generator)) * 2 + 2  # each level 2x to 4x coarser
        low_h = max(1, int(height / factor**level))
        low_w = max(1, int(width / factor**level))
        coarse = _randn((batch, channels, low_h, low_w), noise, generator)
        result = result + F.interpolate(coarse, size=(height, width), mode="bilinear") * discount**level
        if low_h == 1 or low_w == 1:
            break
    return result / result.std()


def huber_thresholds(
    schedule: str,
    huber_c: float,
    huber_scale: float,
    timesteps: torch.Tensor,
    alpha_bar: torch.Tensor,
    num_timesteps: int,
) -> torch.Tensor:
    """kohya's per-sample Huber threshold for ``schedule`` (constant, exponential or snr)."""
    if schedule == "constant":
        return torch.full(timesteps.shape, huber_c * huber_scale, device=timesteps.device)
    if schedule == "exponential":
        rate = -math.log(huber_c) / num_timesteps
        return torch.exp(-rate * timesteps.float()) * huber_scale
    if schedule == "snr":
        sigmas = ((1.0 - alpha_bar) / alpha_bar) ** 0.5
        return (1 - huber_c) / (1 + sigmas) ** 2 + huber_c
    raise ValueError(f"unknown Huber schedule {schedule!r}")


def elementwise_loss(
    prediction: torch.Tensor, target: torch.Tensor, loss_type: str, huber: torch.Tensor | None = None
) -> torch.Tensor:
    """kohya's ``conditional_loss`` with no reduction: l2, l1, (pseudo-)huber or smooth_l1."""
    if loss_type == "l2":
        return F.mse_loss(prediction, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(prediction, target, reduction="none")
    if huber is None:
        raise ValueError(f"{loss_type} loss needs a Huber threshold")
    c = huber.view(-1, *([1] * (prediction.ndim - 1)))
    root = torch.sqrt((prediction - target) ** 2 + c**2) - c
    if loss_type == "huber":
        return 2 * c * root
    if loss_type == "smooth_l1":
        return 2 * root
    raise ValueError(f"unknown loss type {loss_type!r}")


@dataclass(frozen=True)
class LossShaping:
    """The noise, timesteps, loss function and weights of one run (see the module's docstring)."""

    alphas_cumprod: torch.Tensor  # the schedule training uses (zero terminal SNR already applied)
    parameterization: str  # "eps" or "v"
    noise_offset: float = 0.0
    noise_offset_random_strength: bool = False
    adaptive_noise_scale: float = 0.0
    multires_noise_iterations: int = 0
    multires_noise_discount: float = 0.3
    ip_noise_gamma: float = 0.0
    ip_noise_gamma_random_strength: bool = False
    min_timestep: int = 0
    max_timestep: int | None = None  # exclusive; None = the schedule's length
    loss_type: str = "l2"
    huber_schedule: str = "snr"
    huber_c: float = 0.1
    huber_scale: float = 1.0
    min_snr_gamma: float = 0.0
    debiased_estimation_loss: bool = False

    @classmethod
    def from_config(
        cls,
        config: TrainingConfig,
        alphas_cumprod: torch.Tensor,
        parameterization: str,
        device: torch.device | None = None,
    ) -> LossShaping:
        schedule = alphas_cumprod.float()
        if config.zero_terminal_snr:
            schedule = zero_terminal_snr(schedule)
        if device is not None:
            schedule = schedule.to(device)
        return cls(
            alphas_cumprod=schedule,
            parameterization=parameterization,
            noise_offset=config.noise_offset,
            noise_offset_random_strength=config.noise_offset_random_strength,
            adaptive_noise_scale=config.adaptive_noise_scale,
            multires_noise_iterations=config.multires_noise_iterations,
            multires_noise_discount=config.multires_noise_discount,
            ip_noise_gamma=config.ip_noise_gamma,
            ip_noise_gamma_random_strength=config.ip_noise_gamma_random_strength,
            min_timestep=config.min_timestep,
            max_timestep=min(config.max_timestep, len(schedule)),
            loss_type=config.loss_type,
            huber_schedule=config.huber_schedule,
            huber_c=config.huber_c,
            huber_scale=config.huber_scale,
            min_snr_gamma=config.min_snr_gamma,
            debiased_estimation_loss=config.debiased_estimation_loss,
        )

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    # --- before the UNet ----------------------------------------------------------------------------
    def noise(self, latents: torch.Tensor, generator: torch.Generator | None = None) -> NoisedLatents:
        """Draw the noise and the timesteps and noise ``latents`` (draws in the module docstring's order)."""
        noise = _randn(latents.shape, latents, generator)
        if self.noise_offset:
            noise = noise + self._offset(latents, generator)
        if self.multires_noise_iterations:
            noise = pyramid_noise(
                noise, self.multires_noise_iterations, self.multires_noise_discount, generator
            )
        timesteps = self.sample_timesteps(latents.shape[0], latents.device, generator)
        alpha_bar = self.alphas_cumprod.to(latents.device)[timesteps]
        scale = alpha_bar.view(-1, 1, 1, 1)
        noised_with = noise
        if self.ip_noise_gamma:
            # Input perturbation: the UNet sees slightly different noise than it is asked to predict.
            strength = self.ip_noise_gamma
            if self.ip_noise_gamma_random_strength:
                strength = _rand((1,), latents, generator) * self.ip_noise_gamma
            noised_with = noise + strength * _randn(latents.shape, latents, generator)
        noisy = scale.sqrt() * latents + (1 - scale).sqrt() * noised_with
        if self.parameterization == "v":
            target = scale.sqrt() * noise - (1 - scale).sqrt() * latents
        else:
            target = noise
        return NoisedLatents(noisy, timesteps, target, alpha_bar)

    def sample_timesteps(
        self, count: int, device: torch.device, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        high = self.num_timesteps if self.max_timestep is None else self.max_timestep
        return torch.randint(self.min_timestep, high, (count,), device=device, generator=generator)

    def _offset(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """kohya's ``apply_noise_offset``: a per-channel constant added to the noise; with the adaptive
        scale the offset grows with each channel's absolute mean (never below 0)."""
        offset: float | torch.Tensor = self.noise_offset
        if self.noise_offset_random_strength:
            offset = _rand((1,), latents, generator) * self.noise_offset
        if self.adaptive_noise_scale:
            channel_mean = latents.mean(dim=(2, 3), keepdim=True).abs()
            offset = torch.clamp(offset + self.adaptive_noise_scale * channel_mean, min=0.0)
        return offset * _randn((latents.shape[0], latents.shape[1], 1, 1), latents, generator)

    # --- after the UNet -----------------------------------------------------------------------------
    def loss(
        self,
        prediction: torch.Tensor,
        noised: NoisedLatents,
        loss_weights: torch.Tensor,
        masks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The batch's scalar loss, in kohya's order: element loss, mask, mean per sample, the batch's
        loss weights (prior loss for regularisation images), min-SNR, debiased estimation, mean."""
        huber = None
        if self.loss_type in ("huber", "smooth_l1"):
            huber = huber_thresholds(
                self.huber_schedule,
                self.huber_c,
                self.huber_scale,
                noised.timesteps,
                noised.alpha_bar,
                self.num_timesteps,
            )
        per_element = elementwise_loss(prediction.float(), noised.target.float(), self.loss_type, huber)
        if masks is not None:  # the batch has masks only when a mask option is on
            per_element = per_element * masks_at(masks, per_element)
        per_sample = per_element.mean(dim=tuple(range(1, per_element.ndim)))
        per_sample = per_sample * loss_weights.to(per_sample.device, torch.float32)
        if self.min_snr_gamma > 0:
            per_sample = per_sample * self.min_snr_weights(noised.alpha_bar)
        if self.debiased_estimation_loss:
            per_sample = per_sample * self.debiased_weights(noised.alpha_bar)
        return per_sample.mean()

    def min_snr_weights(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """Min-SNR-gamma (Hang et al. 2023): min(SNR, gamma) / SNR for eps, / (SNR + 1) for v."""
        snr = alpha_bar / (1 - alpha_bar)
        clipped = torch.clamp(snr, max=self.min_snr_gamma)
        return clipped / (snr + 1) if self.parameterization == "v" else clipped / snr

    def debiased_weights(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        """kohya's debiased estimation: 1 / sqrt(SNR) for eps, 1 / (SNR + 1) for v (SNR capped at 1000)."""
        snr = torch.clamp(alpha_bar / (1 - alpha_bar), max=DEBIASED_SNR_CAP)
        return 1 / (snr + 1) if self.parameterization == "v" else 1 / torch.sqrt(snr)


def masks_at(masks: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, h, w) masks in [0, 1] brought to ``like``'s spatial size by area averaging, as kohya does."""
    masks = masks.to(like.device, torch.float32)
    if masks.ndim == 3:
        masks = masks[:, None]
    if masks.shape[-2:] != like.shape[-2:]:
        masks = F.interpolate(masks, size=like.shape[-2:], mode="area")
    return masks


def _randn(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(tuple(shape), device=like.device, dtype=like.dtype, generator=generator)


def _rand(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.rand(tuple(shape), device=like.device, dtype=like.dtype, generator=generator)
