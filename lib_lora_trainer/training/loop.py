"""The training loop: one LoRA, trained on a host's live model, saved after every epoch.

Reading order: :func:`train` checks everything that can be checked before the model is touched, then
opens the host session, attaches the adapters and hands over to :class:`_Run`, whose ``execute`` is
the loop itself. Leaving :func:`train` by any path (success, interrupt, NaN, exception) detaches the
adapters and lets the host restore its model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lib_lora_trainer.config import ConfigError, TrainingConfig, ensure_valid, validate_for_dataset
from lib_lora_trainer.dataset.base import BatchSource, TrainingBatch
from lib_lora_trainer.model.host import HostOptions, TrainingHost
from lib_lora_trainer.network import kohya_format
from lib_lora_trainer.network.adapters import (
    AdapterSpec,
    AttachedAdapters,
    attached_adapters,
    plan_targets,
    targets_from_weights,
)
from lib_lora_trainer.training.device_settings import (
    fp16_grad_scaler,
    safe_cpu_attention,
    tf32_matmul,
    to_device_async,
)
from lib_lora_trainer.training.memory import (
    CheckpointingChoice,
    available_bytes,
    choose_checkpointing,
    estimate_step_bytes,
    free_cached_memory,
)
from lib_lora_trainer.training.optim import (
    ParamGroup,
    build_optimizer,
    build_scheduler,
    check_optimizer_available,
    current_learning_rates,
    describe_optimizer,
)

log = logging.getLogger(__name__)

# The loss is read back to the CPU once per this many steps (and at every epoch end): reading it every
# step would make the CPU wait for the GPU each step.
LOSS_READ_INTERVAL = 10
# Measures a deterministic validation loss on the weights as they are: (host, source, mixed precision).
Validation = Callable[[TrainingHost, BatchSource, str], float]


@dataclass(frozen=True)
class TrainingPlan:
    batches_per_epoch: int
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    epochs: int
    adapted_modules: int
    trainable_parameters: int
    gradient_checkpointing: CheckpointingChoice = CheckpointingChoice(False, "off")


@dataclass(frozen=True)
class StepProgress:
    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # 1-based
    epochs: int
    learning_rates: dict[str, float]
    new_losses: list[tuple[int, float]]  # (step, loss) pairs read back since the last report
    elapsed_s: float


@dataclass(frozen=True)
class EpochSaved:
    epoch: int
    step: int
    mean_loss: float
    path: Path
    validation_loss: float | None = None


@dataclass
class TrainingResult:
    status: str  # "completed", "interrupted" or "stopped_nonfinite_loss"
    message: str
    epochs: list[EpochSaved] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)  # per optimizer-step micro-batch loss, in order
    plan: TrainingPlan | None = None


class TrainingCallbacks:
    """Hooks the UI (or a test) uses to follow and steer a run. Every method is optional."""

    def on_start(self, plan: TrainingPlan) -> None: ...

    def on_step(self, progress: StepProgress) -> None: ...

    def on_epoch_saved(self, saved: EpochSaved) -> None: ...

    def on_notice(self, message: str) -> None:
        """Something the user should know that changes how the run goes on (it goes on)."""

    def should_stop(self) -> bool:
        return False


class NonFiniteLoss(RuntimeError):
    pass


class TrainingOutOfMemory(RuntimeError):
    """A step did not fit in memory, with every automatic remedy tried; the message says what to change."""


@dataclass(frozen=True)
class DatasetFacts:
    """What the dataset layer knows that goes into the file's ss_* metadata."""

    dataset_dirs: dict[str, dict[str, int]] = field(
        default_factory=dict
    )  # {"10_alice": {"n_repeats": 10, ...}}
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # {"10_alice": {"tag": count}}
    bucket_info: dict[str, Any] | None = None


def train(
    host: TrainingHost,
    config: TrainingConfig,
    source: BatchSource,
    callbacks: TrainingCallbacks | None = None,
    *,
    dataset_facts: DatasetFacts | None = None,
    image_count: int | None = None,
    validation: Validation | None = None,
) -> TrainingResult:
    """Train one LoRA as ``config`` says; every epoch file lands in ``config.output_dir``."""
    callbacks = callbacks or TrainingCallbacks()
    ensure_valid(config, need_dataset=False)
    problems = validate_for_dataset(config, image_count) if image_count is not None else []
    if problems:
        raise ConfigError(problems)
    check_optimizer_available(config)
    output_dir = Path(config.output_dir or ".")
    _refuse_existing_outputs(output_dir, config)
    initial_weights = _load_initial_weights(config)

    torch.manual_seed(config.seed)
    options = HostOptions(
        train_text_encoder=_trains_text_encoder(config),
        clip_skip=config.clip_skip,
        mixed_precision=config.mixed_precision,
    )
    with (
        host.session(options),
        tf32_matmul(host.device),
        safe_cpu_attention(host.device, config.mixed_precision),
    ):
        log.info("caching latents for %d batches per epoch", source.batches_per_epoch())
        source.prepare(host.encode_images)
        unet, text_encoder = host.unet(), host.text_encoder()
        targets = _targets(config, unet, text_encoder, initial_weights)
        with attached_adapters(unet, text_encoder, targets) as adapters:
            if initial_weights:
                adapters.load(initial_weights)
            run = _Run(host, config, source, adapters, callbacks, output_dir, dataset_facts or DatasetFacts())
            run.validation = validation
            return run.execute()


def _trains_text_encoder(config: TrainingConfig) -> bool:
    relative = config.optimizer == "Adafactor" and config.adafactor_relative_step
    return config.train_text_encoder and (config.text_encoder_lr > 0 or relative)


def _refuse_existing_outputs(output_dir: Path, config: TrainingConfig) -> None:
    clashes = [
        output_dir / kohya_format.epoch_file_name(config.output_name, epoch)
        for epoch in range(1, config.epochs + 1)
        if (output_dir / kohya_format.epoch_file_name(config.output_name, epoch)).exists()
    ]
    if clashes:
        raise ConfigError(
            [
                f"{clashes[0].name} already exists in {output_dir}; "
                "choose another output name (nothing is overwritten)"
            ]
        )


def _load_initial_weights(config: TrainingConfig) -> dict[tuple[str, str], kohya_format.LoraModuleWeights]:
    if not config.network_weights:
        return {}
    path = Path(config.network_weights)
    if not path.is_file():
        raise ConfigError([f"the LoRA to continue from, {path}, does not exist"])
    modules, _ = kohya_format.load_kohya_lora(path)
    return {kohya_format.module_name_from_kohya(stem): weights for stem, weights in modules.items()}


def _targets(config, unet, text_encoder, initial_weights):
    if initial_weights:
        # Continue with the file's own layout: its ranks and alphas, and only its modules.
        targets = targets_from_weights(initial_weights)
        if not _trains_text_encoder(config):
            targets = [t for t in targets if t.component == "unet"]
            for key in [k for k in initial_weights if k[0] == "text_encoder"]:
                del initial_weights[key]
        return targets
    spec = AdapterSpec(
        network_dim=config.network_dim,
        network_alpha=config.network_alpha,
        locon=config.network_type == "locon",
        conv_dim=config.conv_dim,
        conv_alpha=config.conv_alpha,
        train_text_encoder=_trains_text_encoder(config),
    )
    return plan_targets(unet, text_encoder, spec)


class _Run:
    """The state of one run once the model is prepared and adapters are attached."""

    def __init__(
        self,
        host: TrainingHost,
        config: TrainingConfig,
        source: BatchSource,
        adapters: AttachedAdapters,
        callbacks: TrainingCallbacks,
        output_dir: Path,
        dataset_facts: DatasetFacts,
    ):
        self.host, self.config, self.source = host, config, source
        self.adapters, self.callbacks, self.output_dir = adapters, callbacks, output_dir
        self.dataset_facts = dataset_facts
        self.device = host.device
        self.alphas_cumprod = host.alphas_cumprod().float()
        configured = config.parameterization
        self.parameterization = host.parameterization() if configured == "auto" else configured
        self.train_text_encoder = _trains_text_encoder(config)

        self.unet_params = adapters.parameters("unet")
        self.text_params = adapters.parameters("text_encoder") if self.train_text_encoder else []
        self.trainable = self.unet_params + self.text_params
        self.trainable_parameters = sum(p.numel() for p in self.trainable)
        groups = [ParamGroup("unet", self.unet_params, config.unet_lr)]
        if self.text_params:
            groups.append(ParamGroup("text_encoder", self.text_params, config.text_encoder_lr))
        self.optimizer = build_optimizer(config, groups, self.device)
        self.scaler = fp16_grad_scaler(self.device, config.mixed_precision)
        self.cond_cache = self._cache_conditioning()
        self.checkpointing_stack = contextlib.ExitStack()
        self.checkpointing_on = False
        checkpointing = self._choose_checkpointing()

        batches = source.batches_per_epoch()
        steps_per_epoch = math.ceil(batches / config.gradient_accumulation_steps)
        self.plan = TrainingPlan(
            batches_per_epoch=batches,
            steps_per_epoch=steps_per_epoch,
            total_steps=steps_per_epoch * config.epochs,
            epochs=config.epochs,
            adapted_modules=len(adapters.targets),
            trainable_parameters=self.trainable_parameters,
            gradient_checkpointing=checkpointing,
        )
        self.scheduler = build_scheduler(config, self.optimizer, self.plan.total_steps)
        self.rng = random.Random(config.seed)
        self.session_id = uuid.uuid4().int % 2**31
        self.started_at = time.time()

        self.step = 0
        self.pending_losses: list[tuple[int, torch.Tensor]] = []
        self.losses: list[float] = []
        self.epoch_losses: list[float] = []
        self.saved: list[EpochSaved] = []
        self.validation: Validation | None = None

    # --- the loop -----------------------------------------------------------------------------------
    def execute(self) -> TrainingResult:
        with self.checkpointing_stack:
            if self.plan.gradient_checkpointing.enabled:
                self._checkpoint_from_now()
            return self._execute()

    def _execute(self) -> TrainingResult:
        self.callbacks.on_start(self.plan)
        log.info(
            "training %s: %d epochs x %d steps, %d adapted modules, %d trainable parameters; "
            "gradient checkpointing %s",
            self.config.output_name,
            self.plan.epochs,
            self.plan.steps_per_epoch,
            self.plan.adapted_modules,
            self.plan.trainable_parameters,
            self.plan.gradient_checkpointing.reason,
        )
        try:
            for epoch in range(1, self.config.epochs + 1):
                if not self._train_epoch(epoch):
                    return self._result("interrupted", f"Interrupted during epoch {epoch}.")
                self._finish_epoch(epoch)
        except NonFiniteLoss as error:
            return self._result("stopped_nonfinite_loss", str(error))
        return self._result("completed", f"Trained {self.config.epochs} epochs, {self.step} steps.")

    def _train_epoch(self, epoch: int) -> bool:
        """One pass over the data; False when the user interrupted it."""
        self.epoch_losses = []
        accumulation = self.config.gradient_accumulation_steps
        batches = self.plan.batches_per_epoch
        window: list[TrainingBatch] = []  # the batches of this optimizer step
        for index, batch in enumerate(self.source.epoch(epoch - 1, self.rng)):
            if self.callbacks.should_stop():
                return False
            window.append(batch)
            self._accumulate(window)
            if (index + 1) % accumulation == 0 or index + 1 == batches:
                self._optimizer_step()
                self.step += 1
                self._report(epoch, epoch_end=index + 1 == batches)
                window = []
        return not self.callbacks.should_stop()

    def _accumulate(self, window: list[TrainingBatch]) -> None:
        """Forward and backward of the window's newest batch. If it runs out of memory while "auto" has
        checkpointing off, checkpointing goes on and the whole window is done again (a failed backward
        leaves partial gradients)."""
        if self._forward_backward(window[-1]):
            return
        if self.checkpointing_on or self.config.gradient_checkpointing != "auto":
            raise TrainingOutOfMemory(self._out_of_memory_advice())
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_losses = [(step, loss) for step, loss in self.pending_losses if step <= self.step]
        free_cached_memory(self.device)
        self._checkpoint_from_now()
        notice = (
            f"Step {self.step + 1} ran out of memory with gradient checkpointing off; "
            "switched it on for the rest of the run and did the step again."
        )
        log.warning("%s", notice)
        self.callbacks.on_notice(notice)
        for batch in window:
            if not self._forward_backward(batch):
                raise TrainingOutOfMemory(self._out_of_memory_advice())

    def _forward_backward(self, batch: TrainingBatch) -> bool:
        """False when the batch did not fit in memory (what it allocated is released on return)."""
        try:
            loss = self._loss(batch)
            self.pending_losses.append((self.step + 1, loss.detach()))
            self._backward(loss / self.config.gradient_accumulation_steps)
        except torch.cuda.OutOfMemoryError:
            return False
        return True

    def _out_of_memory_advice(self) -> str:
        where = "GPU" if self.device.type == "cuda" else self.device.type.upper()
        checkpointing = "on" if self.checkpointing_on else "off"
        return (
            f"Out of {where} memory at step {self.step + 1} (batch size {self.config.batch_size}, "
            f"{self.config.resolution} px, gradient checkpointing {checkpointing}). Lower the batch size or "
            "the resolution, use a lower rank, keep the text encoder frozen, or close other programs "
            f"that use the {where}. Epoch files saved so far are kept."
        )

    # --- gradient checkpointing ---------------------------------------------------------------------
    def _choose_checkpointing(self) -> CheckpointingChoice:
        mode = self.config.gradient_checkpointing
        free = available_bytes(self.device) if mode == "auto" else None
        if free is None:
            return choose_checkpointing(mode, None, None)
        captions = self.source.captions()[:1] or [""]
        try:
            need = estimate_step_bytes(
                self.host,
                lambda: self._conditioning(captions),
                mixed_precision=self.config.mixed_precision,
                batch_size=self.config.batch_size,
                resolution=self.config.resolution,
                trainable_parameters=self.trainable_parameters,
                optimizer=self.config.optimizer,
            )
        except torch.cuda.OutOfMemoryError:
            need = None
        if need is None:  # outside the except block, so what the probe held is released first
            free_cached_memory(self.device)
            return CheckpointingChoice(True, "auto: on (the memory probe itself ran out of memory)")
        return choose_checkpointing(mode, need, free)

    def _checkpoint_from_now(self) -> None:
        self.checkpointing_stack.enter_context(self.host.gradient_checkpointing(True))
        self.checkpointing_on = True

    def _loss(self, batch: TrainingBatch) -> torch.Tensor:
        latents = to_device_async(batch.latents, self.device, torch.float32)
        cond = self._conditioning(batch.captions)
        noise = torch.randn_like(latents)
        if self.config.noise_offset:
            noise = noise + self.config.noise_offset * torch.randn(
                latents.shape[0], latents.shape[1], 1, 1, device=self.device
            )
        timesteps = torch.randint(0, len(self.alphas_cumprod), (latents.shape[0],), device=self.device)
        alpha_bar = self.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
        with self.host.autocast(self.config.mixed_precision):
            prediction = self.host.predict(noisy, timesteps, cond)
        if self.parameterization == "v":
            target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
        else:
            target = noise
        per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
        weights = to_device_async(batch.loss_weights, self.device, torch.float32)
        if self.config.min_snr_gamma > 0:
            weights = weights * self._min_snr_weights(alpha_bar.view(-1))
        return (per_sample * weights).mean()

    def _min_snr_weights(self, alpha_bar: torch.Tensor) -> torch.Tensor:
        snr = alpha_bar / (1 - alpha_bar)
        clipped = torch.clamp(snr, max=self.config.min_snr_gamma)
        return clipped / (snr + 1) if self.parameterization == "v" else clipped / snr

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --- conditioning -------------------------------------------------------------------------------
    def _cache_conditioning(self) -> dict[str, torch.Tensor]:
        """With a frozen text encoder and fixed captions, each caption is encoded once for the run."""
        if self.train_text_encoder or self.source.captions_vary():
            return {}
        cache = {}
        with torch.no_grad(), self.host.autocast(self.config.mixed_precision):
            for caption in self.source.captions():
                cache[caption] = self.host.encode_text([caption])[0]
        return cache

    def _conditioning(self, captions: Sequence[str]) -> torch.Tensor:
        cached = [self.cond_cache.get(caption) for caption in captions]
        if cached and all(c is not None for c in cached) and len({c.shape for c in cached}) == 1:
            return torch.stack(cached)
        with torch.set_grad_enabled(self.train_text_encoder), self.host.autocast(self.config.mixed_precision):
            return self.host.encode_text(list(captions))

    # --- reporting and saving -----------------------------------------------------------------------
    def _read_losses(self) -> list[tuple[int, float]]:
        """Bring pending losses to the CPU in one transfer; stop on the first non-finite one."""
        if not self.pending_losses:
            return []
        values = torch.stack([loss for _, loss in self.pending_losses]).float().cpu().tolist()
        read = [(step, value) for (step, _), value in zip(self.pending_losses, values, strict=True)]
        self.pending_losses = []
        for step, value in read:
            if not math.isfinite(value):
                last = self.saved[-1].path.name if self.saved else "none yet"
                raise NonFiniteLoss(
                    f"The loss became {value} at step {step}; training stopped. The last good epoch file is "
                    f"{last}. Lower the learning rate or alpha, or train in bf16/fp32 instead of fp16."
                )
        self.losses += [value for _, value in read]
        self.epoch_losses += [value for _, value in read]
        return read

    def _report(self, epoch: int, epoch_end: bool = False) -> None:
        # also read at each epoch's end, so the UI's chart has every step before the epoch is saved
        due = epoch_end or self.step % LOSS_READ_INTERVAL == 0
        new_losses = self._read_losses() if due else []
        self.callbacks.on_step(
            StepProgress(
                step=self.step,
                total_steps=self.plan.total_steps,
                epoch=epoch,
                epochs=self.plan.epochs,
                learning_rates=current_learning_rates(self.optimizer, self.scheduler),
                new_losses=new_losses,
                elapsed_s=time.time() - self.started_at,
            )
        )

    def _finish_epoch(self, epoch: int) -> None:
        self._read_losses()
        validation_loss = None
        if self.validation is not None:
            validation_loss = self.validation(self.host, self.source, self.config.mixed_precision)
            log.info("epoch %d validation loss %.6f", epoch, validation_loss)
        last = epoch == self.config.epochs
        if epoch % self.config.save_every_n_epochs and not last:
            return
        mean_loss = sum(self.epoch_losses) / max(1, len(self.epoch_losses))
        path = self.output_dir / kohya_format.epoch_file_name(self.config.output_name, epoch)
        modules = {
            kohya_format.kohya_name(component, name): weights
            for (component, name), weights in self.adapters.export().items()
        }
        kohya_format.save_kohya_lora(path, modules, self._metadata(epoch), self.config.save_precision)
        saved = EpochSaved(epoch, self.step, mean_loss, path, validation_loss)
        self.saved.append(saved)
        log.info("saved epoch %d to %s (mean loss %.4f)", epoch, path, mean_loss)
        self.callbacks.on_epoch_saved(saved)

    def _metadata(self, epoch: int) -> dict[str, str]:
        info = self.host.base_model_info()
        facts = self.dataset_facts
        run = kohya_format.TrainingRunInfo(
            num_batches_per_epoch=self.plan.batches_per_epoch,
            max_train_steps=self.plan.total_steps,
            dataset_dirs=facts.dataset_dirs,
            tag_frequency=facts.tag_frequency,
            bucket_info=facts.bucket_info,
            reg_dataset_dirs=facts.reg_dataset_dirs,
            session_id=self.session_id,
            training_started_at=self.started_at,
            parameterization=self.parameterization,
            optimizer=describe_optimizer(self.config),
            gradient_checkpointing=self.checkpointing_on,
            sd_model_name=info.name,
            sd_model_hash=info.hash_legacy,
            new_sd_model_hash=info.hash_sha256,
        )
        return kohya_format.build_metadata(
            output_name=self.config.output_name, epoch=epoch, steps=self.step, config=self.config, run=run
        )

    def _result(self, status: str, message: str) -> TrainingResult:
        if status != "stopped_nonfinite_loss":
            with contextlib.suppress(NonFiniteLoss):
                self._read_losses()
        log.info("%s", message)
        return TrainingResult(status, message, list(self.saved), list(self.losses), self.plan)
