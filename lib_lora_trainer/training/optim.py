"""Optimizers and learning-rate schedules, from torch and transformers (A1111 ships both)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.training.precision import device_rule


class OptimizerUnavailable(RuntimeError):
    """The chosen optimizer needs a package that is not installed."""


@dataclass(frozen=True)
class ParamGroup:
    name: str  # "unet" or "text_encoder"
    params: list[torch.nn.Parameter]
    lr: float


def describe_optimizer(config: TrainingConfig) -> str:
    """kohya's ``ss_optimizer`` style: ``AdamW(weight_decay=0.01)``."""
    if config.optimizer == "Adafactor":
        return f"Adafactor(relative_step={config.adafactor_relative_step},weight_decay={config.weight_decay})"
    return f"{config.optimizer}(weight_decay={config.weight_decay})"


_OPTIONAL_OPTIMIZER_PACKAGES = {"AdamW8bit": "bitsandbytes", "Prodigy": "prodigyopt"}


def check_optimizer_available(config: TrainingConfig) -> None:
    """Refuse, before the model is touched, an optimizer whose package is missing."""
    package = _OPTIONAL_OPTIMIZER_PACKAGES.get(config.optimizer)
    if package and importlib.util.find_spec(package) is None:
        raise OptimizerUnavailable(
            f"{config.optimizer} needs the '{package}' package, which is not installed in the WebUI's "
            f"environment; install it (pip install {package}) or choose AdamW or Adafactor"
        )


def build_optimizer(config: TrainingConfig, groups: list[ParamGroup], device: torch.device) -> Optimizer:
    param_groups = [{"params": g.params, "lr": g.lr, "name": g.name} for g in groups if g.params]
    if config.optimizer == "AdamW":
        return _adamw(param_groups, config.weight_decay, device)
    if config.optimizer == "Adafactor":
        from transformers.optimization import Adafactor

        if config.adafactor_relative_step:
            # Adafactor computes its own step size; the per-group learning rates are not used.
            for group in param_groups:
                group["lr"] = None
            return Adafactor(
                param_groups,
                lr=None,
                relative_step=True,
                scale_parameter=True,
                warmup_init=False,
                weight_decay=config.weight_decay,
            )
        return Adafactor(
            param_groups,
            relative_step=False,
            scale_parameter=False,
            warmup_init=False,
            weight_decay=config.weight_decay,
        )
    check_optimizer_available(config)
    if config.optimizer == "AdamW8bit":
        import bitsandbytes

        return bitsandbytes.optim.AdamW8bit(param_groups, weight_decay=config.weight_decay)
    if config.optimizer == "Prodigy":
        from prodigyopt import Prodigy

        return Prodigy(param_groups, weight_decay=config.weight_decay)
    raise OptimizerUnavailable(f"unknown optimizer {config.optimizer!r}")


def _adamw(param_groups: list[dict], weight_decay: float, device: torch.device) -> Optimizer:
    """torch's fused AdamW (one kernel over all parameters) where this torch has it for ``device``:
    CUDA always, the CPU from torch 2.4 on; else the default implementation."""
    if device_rule(device).fused_adamw:  # CUDA and the CPU, not MPS (training/precision.py)
        try:
            # Copies: a failed constructor has already filled defaults into the group dicts.
            groups = [dict(group) for group in param_groups]
            return torch.optim.AdamW(groups, weight_decay=weight_decay, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(param_groups, weight_decay=weight_decay)


def build_scheduler(config: TrainingConfig, optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """transformers' schedules, with warmup, over ``total_steps`` optimizer steps."""
    from transformers import optimization as schedules

    if config.optimizer == "Adafactor" and config.adafactor_relative_step:
        return schedules.AdafactorSchedule(optimizer)
    warmup = min(config.warmup_steps_for(total_steps), total_steps)
    name = config.lr_scheduler
    if name == "constant":
        if warmup:
            return schedules.get_constant_schedule_with_warmup(optimizer, warmup)
        return schedules.get_constant_schedule(optimizer)
    if name == "constant_with_warmup":
        return schedules.get_constant_schedule_with_warmup(optimizer, warmup)
    if name == "linear":
        return schedules.get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    if name == "cosine":
        return schedules.get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    if name == "cosine_with_restarts":
        return schedules.get_cosine_with_hard_restarts_schedule_with_warmup(
            optimizer, warmup, total_steps, num_cycles=config.lr_scheduler_num_cycles
        )
    if name == "polynomial":
        return schedules.get_polynomial_decay_schedule_with_warmup(
            optimizer, warmup, total_steps, lr_end=0.0, power=config.lr_scheduler_power
        )
    raise ValueError(f"unknown LR scheduler {name!r}")


def current_learning_rates(optimizer: Optimizer, scheduler: LRScheduler) -> dict[str, float]:
    """The learning rate of each named group after the last scheduler step."""
    rates = scheduler.get_last_lr()
    return {
        group.get("name", str(i)): float(rate or 0.0)
        for i, (group, rate) in enumerate(zip(optimizer.param_groups, rates, strict=False))
    }
