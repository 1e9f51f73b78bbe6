"""Optimizers and learning-rate schedules.

AdamW and Adafactor come from torch and transformers (A1111 ships both); the others from small optional
packages (bitsandbytes, lion-pytorch, prodigyopt, schedulefree) that appear in the form only when they
are installed. :func:`precheck_optimizer` builds the chosen optimizer and schedule on a dummy parameter and
steps them before the model is touched, so a pair that cannot run is refused with a sentence, never a
traceback after the model is prepared. ``optimizer_args``/``lr_scheduler_args`` (kohya's ``key=value``
text) are checked there against the optimizer's constructor and the schedule's arguments.

transformers 4.30.2 (A1111's pin) has no cosine_with_min_lr, warmup-stable-decay or piecewise-constant
schedule: they are written here as ``LambdaLR`` with the semantics of newer transformers releases.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from lib_lora_trainer.config import (
    OPTIMIZERS,
    SCHEDULE_FREE_OPTIMIZERS,
    ConfigError,
    TrainingConfig,
    parse_arguments,
)
from lib_lora_trainer.training.precision import device_rule


class OptimizerUnavailable(ConfigError):
    """The chosen optimizer needs a package that is not installed."""

    def __init__(self, message: str):
        super().__init__([message])


@dataclass(frozen=True)
class ParamGroup:
    name: str  # "unet" or "text_encoder"
    params: list[torch.nn.Parameter]
    lr: float


@dataclass(frozen=True)
class OptionalPackage:
    module: str
    install: str  # what to type; keeps every package A1111 pins (torch above all) as it is


BITSANDBYTES_OPTIMIZERS = ("AdamW8bit", "PagedAdamW8bit", "Lion8bit")
# Measured with torch 2.13 (CPU): bitsandbytes 0.45.5 to 0.49.2 cannot step an 8-bit optimizer on the CPU,
# 0.50.0 and 0.50.2 can; 0.50 needs torch 2.4, and on torch 2.1 (A1111 v1.10.1) pip chooses 0.45.5.
BITSANDBYTES_CPU = "bitsandbytes 0.50 or newer (with torch 2.4 or newer)"
# Below this many elements bitsandbytes keeps a parameter's state in 32 bits (its min_8bit_size), so the
# check on the training device steps a parameter this large: the 8-bit kernels themselves.
BITSANDBYTES_8BIT_SIZE = 4096


def _keeping_this_torch(package: str) -> str:
    """The pip command that installs ``package`` beside this torch: the torch pin (met by the installed
    one, whatever its CUDA build) lets pip choose the package's release made for it and change nothing."""
    return f'pip install {package} "torch=={torch.__version__.split("+")[0]}"'


_BITSANDBYTES = OptionalPackage(
    "bitsandbytes",
    f"{_keeping_this_torch('bitsandbytes')} (8-bit optimizers run on CUDA GPUs, on the CPU with "
    f"{BITSANDBYTES_CPU})",
)
OPTIONAL_PACKAGES: dict[str, OptionalPackage] = {
    **{name: _BITSANDBYTES for name in BITSANDBYTES_OPTIMIZERS},
    "Lion": OptionalPackage("lion_pytorch", "pip install --no-deps lion-pytorch (pure Python)"),
    "Prodigy": OptionalPackage("prodigyopt", "pip install prodigyopt (pure Python, no dependencies)"),
    "AdamWScheduleFree": OptionalPackage(
        "schedulefree",
        "pip install --no-deps schedulefree (pure Python; needs only torch and typing-extensions)",
    ),
}

# Arguments with a field of their own in the form: refused in optimizer_args so one value cannot hide
# another.
_OWN_FIELDS = {
    "params": "the trained parameters",
    "lr": "the learning-rate fields",
    "weight_decay": "Weight decay",
    "relative_step": "Adafactor picks its own LR",
    "d_coef": "Prodigy d_coef",
    "safeguard_warmup": "Prodigy safeguard warmup",
    "use_bias_correction": "Prodigy bias correction",
    "warmup_steps": "Warmup steps",
}


def is_available(name: str) -> bool:
    package = OPTIONAL_PACKAGES.get(name)
    return package is None or importlib.util.find_spec(package.module) is not None


def available_optimizers() -> tuple[str, ...]:
    """The optimizers whose package is installed, in the form's order."""
    return tuple(name for name in OPTIMIZERS if is_available(name))


def unavailable_message(name: str) -> str:
    package = OPTIONAL_PACKAGES[name]
    return (
        f"{name} needs the '{package.module}' package, which is not installed in the WebUI's environment; "
        f"install it into the WebUI's venv with: {package.install}; or choose AdamW or Adafactor"
    )


def check_optimizer_available(config: TrainingConfig) -> None:
    """Refuse, before the model is touched, an optimizer whose package is missing."""
    if not is_available(config.optimizer):
        raise OptimizerUnavailable(unavailable_message(config.optimizer))


def describe_optimizer(config: TrainingConfig) -> str:
    """kohya's ``ss_optimizer`` style: the class path and the arguments, ``bitsandbytes.optim.AdamW8bit
    (weight_decay=0.01,betas=(0.9, 0.99))``."""
    kwargs = _constructor_kwargs(config)
    arguments = ",".join(f"{key}={value}" for key, value in kwargs.items() if key != "lr")
    return f"{_CLASS_PATHS.get(config.optimizer, config.optimizer)}({arguments})"


_CLASS_PATHS = {
    "AdamW": "torch.optim.adamw.AdamW",
    "Adafactor": "transformers.optimization.Adafactor",
    "AdamW8bit": "bitsandbytes.optim.adamw.AdamW8bit",
    "PagedAdamW8bit": "bitsandbytes.optim.adamw.PagedAdamW8bit",
    "Lion8bit": "bitsandbytes.optim.lion.Lion8bit",
    "Lion": "lion_pytorch.lion_pytorch.Lion",
    "Prodigy": "prodigyopt.prodigy.Prodigy",
    "AdamWScheduleFree": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
}


def optimizer_class(name: str) -> type[Optimizer]:
    if name not in OPTIMIZERS:
        raise ConfigError([f"unknown optimizer {name!r}; choose one of {', '.join(OPTIMIZERS)}"])
    if not is_available(name):
        raise OptimizerUnavailable(unavailable_message(name))
    if name == "AdamW":
        return torch.optim.AdamW
    if name == "Adafactor":
        from transformers.optimization import Adafactor

        return Adafactor
    if name in BITSANDBYTES_OPTIMIZERS:
        return getattr(_import_bitsandbytes(name).optim, name)
    if name == "Lion":
        return importlib.import_module("lion_pytorch").Lion
    if name == "Prodigy":
        return importlib.import_module("prodigyopt").Prodigy
    return importlib.import_module("schedulefree").AdamWScheduleFree


def _import_bitsandbytes(name: str) -> Any:
    """bitsandbytes, or a sentence: a release built for another torch or CUDA can fail on import."""
    try:
        return importlib.import_module("bitsandbytes")
    except Exception as error:
        raise OptimizerUnavailable(
            f"{name} needs bitsandbytes, which is installed but cannot be loaded ({_first_line(error)}); "
            f"reinstall it for this torch with: {_BITSANDBYTES.install}; or choose AdamW or Adafactor"
        ) from error


def check_bitsandbytes_runs(name: str, device: torch.device) -> None:
    """Step ``name`` once on ``device``: bitsandbytes has 8-bit kernels for some devices only, and says
    so only when an optimizer steps (often in words about something else). Raises OptimizerUnavailable."""
    cls = optimizer_class(name)
    parameter = torch.nn.Parameter(torch.ones(BITSANDBYTES_8BIT_SIZE, device=device))
    parameter.grad = torch.full_like(parameter, 0.1)
    try:
        cls([parameter], lr=1e-3).step()
    except Exception as error:  # NameError, AttributeError, RuntimeError ...: whatever the release raises
        raise OptimizerUnavailable(_bitsandbytes_device_message(name, device, error)) from error


def _bitsandbytes_device_message(name: str, device: torch.device, error: BaseException) -> str:
    version = getattr(sys.modules.get("bitsandbytes"), "__version__", "?")
    where = {"cuda": "this GPU", "cpu": "the CPU", "mps": "Apple MPS"}.get(device.type, device.type)
    if device.type == "cuda":
        remedy = f"reinstall it for this torch and its CUDA with: {_BITSANDBYTES.install}"
    elif device.type == "cpu":
        remedy = f"{BITSANDBYTES_CPU} runs them on the CPU: {_BITSANDBYTES.install}"
    else:
        remedy = "bitsandbytes' 8-bit optimizers are made for CUDA GPUs"
    return (
        f"{name} cannot run on {where} with the installed bitsandbytes {version} (its 8-bit optimizer "
        f"step failed: {_first_line(error)}); {remedy}; or choose AdamW or Adafactor"
    )


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _constructor_kwargs(config: TrainingConfig) -> dict[str, Any]:
    """Everything passed to the optimizer besides the parameter groups: our fields, then optimizer_args."""
    kwargs: dict[str, Any] = {"weight_decay": config.weight_decay}
    if config.optimizer == "Adafactor":
        relative = config.adafactor_relative_step
        # relative step: Adafactor computes its own step size (scaled by the parameters' RMS).
        kwargs.update(relative_step=relative, scale_parameter=relative, warmup_init=False)
        if not relative:
            kwargs["lr"] = config.unet_lr or config.text_encoder_lr  # the default for groups without one
    if config.optimizer == "Prodigy":
        kwargs.update(
            d_coef=config.prodigy_d_coef,
            safeguard_warmup=config.prodigy_safeguard_warmup,
            use_bias_correction=config.prodigy_use_bias_correction,
        )
    kwargs.update(parse_arguments(config.optimizer_args))
    return kwargs


def _optimizer_args_problems(config: TrainingConfig, cls: type[Optimizer]) -> list[str]:
    try:
        extra = parse_arguments(config.optimizer_args)
    except ValueError as error:
        return [f"optimizer arguments: {error}"]
    problems = []
    accepted = [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "params")]
    for key in extra:
        if key in _OWN_FIELDS:
            problems.append(f"optimizer arguments: set {key} with {_OWN_FIELDS[key]}, not in the arguments")
        elif key not in accepted:
            problems.append(
                f"optimizer arguments: {config.optimizer} has no argument {key!r}; it accepts "
                f"{', '.join(a for a in accepted if a not in _OWN_FIELDS)}"
            )
    return problems


def build_optimizer(config: TrainingConfig, groups: list[ParamGroup], device: torch.device) -> Optimizer:
    """The optimizer over the non-empty ``groups`` (each keeps its name and learning rate)."""
    param_groups = [{"params": g.params, "lr": g.lr, "name": g.name} for g in groups if g.params]
    cls = optimizer_class(config.optimizer)
    kwargs = _constructor_kwargs(config)
    if config.optimizer == "AdamW":
        return _adamw(param_groups, kwargs, device)
    if config.optimizer == "Adafactor" and config.adafactor_relative_step:
        for group in param_groups:
            group["lr"] = None  # Adafactor's own step size; the learning-rate fields are not used
    optimizer = cls(param_groups, **kwargs)
    if config.optimizer in SCHEDULE_FREE_OPTIMIZERS:
        optimizer.train()  # schedule-free optimizers step only in train mode; see evaluation_weights
    return optimizer


def _adamw(param_groups: list[dict], kwargs: dict[str, Any], device: torch.device) -> Optimizer:
    """torch's fused AdamW (one kernel over all parameters) where this torch has it for ``device``:
    CUDA always, the CPU from torch 2.4 on; else the default implementation."""
    if device_rule(device).fused_adamw and "fused" not in kwargs and "foreach" not in kwargs:  # not MPS
        try:
            # Copies: a failed constructor has already filled defaults into the group dicts.
            groups = [dict(group) for group in param_groups]
            return torch.optim.AdamW(groups, **kwargs, fused=True)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(param_groups, **kwargs)


@contextlib.contextmanager
def evaluation_weights(optimizer: Optimizer) -> Iterator[None]:
    """Inside: the weights to save and sample with. A schedule-free optimizer trains on an interpolation
    of its iterates and keeps the average apart; ``eval()`` swaps the average in, ``train()`` back. Other
    optimizers are untouched."""
    switches = any("train_mode" in group for group in optimizer.param_groups) and hasattr(optimizer, "eval")
    if switches:
        optimizer.eval()
    try:
        yield
    finally:
        if switches:
            optimizer.train()


# --- schedules ---------------------------------------------------------------------------------------
ScheduleBuilder = Callable[..., LRScheduler]


def build_scheduler(config: TrainingConfig, optimizer: Optimizer, total_steps: int) -> LRScheduler:
    """The schedule ``config.lr_scheduler`` over ``total_steps`` optimizer steps, with its warmup."""
    from transformers import optimization as schedules

    if config.optimizer == "Adafactor" and config.adafactor_relative_step:
        return schedules.AdafactorSchedule(optimizer)
    warmup = min(config.warmup_steps_for(total_steps), total_steps)
    if config.optimizer in SCHEDULE_FREE_OPTIMIZERS:
        for group in optimizer.param_groups:
            group["warmup_steps"] = warmup  # the optimizer warms up itself; the schedule stays flat
        warmup = 0
    builder = _SCHEDULES[config.lr_scheduler]
    arguments = parse_arguments(config.lr_scheduler_args)
    return builder(optimizer, warmup, total_steps, config, **arguments)


def _constant(optimizer, warmup, total, config):
    return LambdaLR(optimizer, lambda step: _warmup(step, warmup) if step < warmup else 1.0)


def _linear(optimizer, warmup, total, config):
    from transformers import optimization as schedules

    return schedules.get_linear_schedule_with_warmup(optimizer, warmup, total)


def _cosine(optimizer, warmup, total, config):
    from transformers import optimization as schedules

    return schedules.get_cosine_schedule_with_warmup(optimizer, warmup, total)


def _cosine_with_restarts(optimizer, warmup, total, config):
    from transformers import optimization as schedules

    return schedules.get_cosine_with_hard_restarts_schedule_with_warmup(
        optimizer, warmup, total, num_cycles=config.lr_scheduler_num_cycles
    )


def _polynomial(optimizer, warmup, total, config, *, lr_end_rate: float = 0.0):
    """transformers' polynomial decay to ``lr_end_rate`` x each group's rate (transformers reads one
    ``optimizer.defaults["lr"]``, which Adafactor and others leave None: the crash of issue 9)."""
    power = config.lr_scheduler_power

    def factor(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        if step >= total:
            return lr_end_rate
        remaining = 1 - (step - warmup) / max(1, total - warmup)
        return (1 - lr_end_rate) * remaining**power + lr_end_rate

    return LambdaLR(optimizer, factor)


def _cosine_with_min_lr(
    optimizer,
    warmup,
    total,
    config,
    *,
    min_lr_rate: float | None = None,
    min_lr: float | None = None,
    num_cycles: float = 0.5,
):
    """Cosine from each group's rate down to ``min_lr_rate`` x that rate (default 0.1), or to the absolute
    ``min_lr``; as transformers' ``get_cosine_with_min_lr_schedule_with_warmup``."""
    if min_lr_rate is not None and min_lr is not None:
        raise ValueError("give min_lr_rate or min_lr, not both")
    rates = [
        (min_lr / group["initial_lr_for_schedule"] if group["initial_lr_for_schedule"] else 0.0)
        if min_lr is not None
        else (0.1 if min_lr_rate is None else min_lr_rate)
        for group in _with_initial_rates(optimizer)
    ]
    if any(not 0 <= rate <= 1 for rate in rates):
        raise ValueError("the minimum learning rate must be between 0 and each group's learning rate")

    def factor_for(rate: float) -> Callable[[int], float]:
        def factor(step: int) -> float:
            if step < warmup:
                return _warmup(step, warmup)
            progress = min(1.0, (step - warmup) / max(1, total - warmup))
            cosine = 0.5 * (1 + math.cos(math.pi * 2 * num_cycles * progress))
            return max(0.0, cosine * (1 - rate) + rate)

        return factor

    return LambdaLR(optimizer, [factor_for(rate) for rate in rates])


def _warmup_stable_decay(
    optimizer,
    warmup,
    total,
    config,
    *,
    num_decay_steps: float = 0.1,
    min_lr_ratio: float = 0.0,
    decay_type: str = "cosine",
):
    """Warmup, then the full rate, then a decay over the last ``num_decay_steps`` steps (a value below 1 is
    a fraction of all steps) to ``min_lr_ratio``; decay_type cosine, linear or 1-sqrt (as transformers'
    ``get_wsd_schedule``)."""
    decay = int(round(num_decay_steps * total)) if 0 < num_decay_steps < 1 else int(num_decay_steps)
    if decay < 0 or warmup + decay > total:
        raise ValueError(f"warmup ({warmup}) plus decay ({decay}) steps exceed the run's {total} steps")
    if decay_type not in ("cosine", "linear", "1-sqrt"):
        raise ValueError("decay_type must be cosine, linear or 1-sqrt")
    if not 0 <= min_lr_ratio <= 1:
        raise ValueError("min_lr_ratio must be between 0 and 1")
    stable_end = total - decay

    def factor(step: int) -> float:
        if step < warmup:
            return _warmup(step, warmup)
        if step < stable_end:
            return 1.0
        progress = min(1.0, (step - stable_end) / max(1, decay))
        if decay_type == "cosine":
            value = 0.5 * (1 + math.cos(math.pi * progress))
        elif decay_type == "linear":
            value = 1 - progress
        else:
            value = 1 - math.sqrt(progress)
        return value * (1 - min_lr_ratio) + min_lr_ratio

    return LambdaLR(optimizer, factor)


def _piecewise_constant(optimizer, warmup, total, config, *, step_rules: str | None = None):
    """transformers' ``get_piecewise_constant_schedule``: ``step_rules=1:500,0.5:1000,0.1`` keeps the
    rate x1 before step 500, x0.5 before step 1000, then x0.1."""
    if not step_rules:
        raise ValueError(
            "piecewise_constant needs step_rules, e.g. scheduler arguments step_rules=1:500,0.5:1000,0.1"
        )
    if warmup:
        raise ValueError(
            "piecewise_constant has no warmup; write it into step_rules and set warmup steps to 0"
        )
    *pieces, last = str(step_rules).split(",")
    rules = []
    for piece in pieces:
        multiplier, sep, until = piece.partition(":")
        if not sep:
            raise ValueError(f"step rule {piece!r} is not multiplier:step")
        rules.append((int(until), float(multiplier)))
    final = float(last)

    def factor(step: int) -> float:
        for until, multiplier in rules:
            if step < until:
                return multiplier
        return final

    return LambdaLR(optimizer, factor)


_SCHEDULES: dict[str, ScheduleBuilder] = {
    "constant": _constant,
    "constant_with_warmup": _constant,
    "linear": _linear,
    "cosine": _cosine,
    "cosine_with_restarts": _cosine_with_restarts,
    "polynomial": _polynomial,
    "cosine_with_min_lr": _cosine_with_min_lr,
    "warmup_stable_decay": _warmup_stable_decay,
    "piecewise_constant": _piecewise_constant,
}


def _warmup(step: int, warmup: int) -> float:
    return step / max(1, warmup)


def _with_initial_rates(optimizer: Optimizer) -> list[dict]:
    for group in optimizer.param_groups:
        group.setdefault("initial_lr_for_schedule", group.get("initial_lr", group.get("lr")) or 0.0)
    return optimizer.param_groups


def _scheduler_args_problems(config: TrainingConfig) -> list[str]:
    try:
        arguments = parse_arguments(config.lr_scheduler_args)
    except ValueError as error:
        return [f"scheduler arguments: {error}"]
    builder = _SCHEDULES.get(config.lr_scheduler)
    if builder is None:
        return []
    accepted = [
        p.name
        for p in inspect.signature(builder).parameters.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    ]
    return [
        f"scheduler arguments: {config.lr_scheduler} has no argument {key!r}"
        + (f"; it accepts {', '.join(accepted)}" if accepted else "; it takes none")
        for key in arguments
        if key not in accepted
    ]


# --- the check before the model is touched -------------------------------------------------------------
PRECHECK_STEPS = 20


def precheck_optimizer(
    config: TrainingConfig, total_steps: int = PRECHECK_STEPS, *, device: torch.device | None = None
) -> None:
    """Build the optimizer and schedule of ``config`` on dummy parameters and step them, so that any pair
    that cannot run (a missing package, a wrong argument, a schedule the optimizer cannot drive) is refused
    here, with a sentence, before the model is touched. Raises :class:`ConfigError`.

    The dummies live on the CPU, except bitsandbytes' on ``device`` (where training runs; the CPU when
    None): its kernels are per device, and a release without the CPU's still trains on a GPU."""
    check_optimizer_available(config)
    cls = optimizer_class(config.optimizer)
    problems = _optimizer_args_problems(config, cls) + _scheduler_args_problems(config)
    if problems:
        raise ConfigError(problems)
    where = torch.device("cpu")
    if config.optimizer in BITSANDBYTES_OPTIMIZERS:
        where = device or where
        check_bitsandbytes_runs(config.optimizer, where)
    groups = [ParamGroup("unet", [torch.nn.Parameter(torch.ones(4, 4, device=where))], config.unet_lr)]
    if config.train_text_encoder:
        text = torch.nn.Parameter(torch.ones(4, device=where))
        groups.append(ParamGroup("text_encoder", [text], config.text_encoder_lr))
    try:
        optimizer = build_optimizer(config, groups, where)
        scheduler = build_scheduler(config, optimizer, total_steps)
        for _ in range(min(total_steps, PRECHECK_STEPS)):
            for group in groups:
                for parameter in group.params:
                    parameter.grad = torch.full_like(parameter, 0.1)
            optimizer.step()
            scheduler.step()
        current_learning_rates(optimizer, scheduler)
    except Exception as error:  # any failure here would otherwise come after the model is prepared
        pair = f"{config.optimizer} with the {config.lr_scheduler} schedule"
        raise ConfigError([f"{pair} cannot run with these settings: {error}"]) from error


def current_learning_rates(optimizer: Optimizer, scheduler: LRScheduler) -> dict[str, float]:
    """The learning rate of each named group after the last scheduler step; for Prodigy the effective
    rate d x lr (its learning rate is a multiplier on the step size d it estimates)."""
    rates = scheduler.get_last_lr()
    result = {}
    for i, (group, rate) in enumerate(zip(optimizer.param_groups, rates, strict=False)):
        value = float(rate or 0.0)
        if "d" in group and "d_coef" in group:  # Prodigy
            value *= float(group["d"])
        result[group.get("name", str(i))] = value
    return result
