"""The training loop: one LoRA, trained on a host's live model, saved after every epoch.

Reading order: :func:`train` checks everything that can be checked before the model is touched (a
resumed run also that its state still fits the dataset, checkpoint and settings), then opens the host
session, caches latents, attaches the adapters and hands over to :class:`_Run`, whose ``execute`` is
the loop itself. What the loop has done lives in one :class:`~lib_lora_trainer.training.state.RunState`
that saves and loads itself; which files are written or removed when is
:class:`~lib_lora_trainer.training.saving.SavePolicy`'s. Leaving :func:`train` by any path (success,
interrupt, NaN, exception) detaches the adapters and lets the host restore its model.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lib_lora_trainer.config import ConfigError, TrainingConfig, ensure_valid, validate_for_dataset
from lib_lora_trainer.dataset.base import BatchSource, TrainingBatch
from lib_lora_trainer.model.host import HostOptions, TrainingHost
from lib_lora_trainer.network import kohya_format
from lib_lora_trainer.network.adapters import AttachedAdapters, attached_adapters
from lib_lora_trainer.network.kohya_format import NonFiniteWeights
from lib_lora_trainer.network.max_norm import scale_weight_norms
from lib_lora_trainer.network.param_groups import adapter_param_groups
from lib_lora_trainer.network.plan import SavedNetwork, load_saved_network, plan_network
from lib_lora_trainer.training.callbacks import (
    DatasetFacts,
    EpochSaved,
    NonFiniteLoss,
    StepProgress,
    TrainingCallbacks,
    TrainingOutOfMemory,
    TrainingPlan,
    TrainingResult,
)
from lib_lora_trainer.training.conditioning import CaptionConditioning
from lib_lora_trainer.training.device_settings import tf32_matmul, to_device_async
from lib_lora_trainer.training.loss import LossShaping
from lib_lora_trainer.training.memory import (
    CatchOutOfMemory,
    CheckpointingChoice,
    available_bytes,
    choose_checkpointing,
    estimate_step_bytes,
    free_cached_memory,
    out_of_memory_advice,
)
from lib_lora_trainer.training.optim import (
    build_optimizer,
    build_scheduler,
    current_learning_rates,
    describe_optimizer,
    evaluation_weights,
    precheck_optimizer,
)
from lib_lora_trainer.training.precision import PrecisionPolicy, host_weight_dtype, resolve_precision
from lib_lora_trainer.training.saving import RunLength, SavePolicy
from lib_lora_trainer.training.state import (
    LoadedState,
    ResumeMismatch,
    RunFingerprint,
    RunState,
    StateError,
    StateFolder,
    StateKeeper,
    check_resume,
    fingerprint_for,
    load_trainables,
    trainables_of,
)

log = logging.getLogger(__name__)

# re-exported: the UI and the tests import the run's vocabulary from here
__all__ = [
    "DatasetFacts",
    "EpochSaved",
    "NonFiniteLoss",
    "ResumeMismatch",
    "StateError",
    "StepProgress",
    "TrainingCallbacks",
    "TrainingOutOfMemory",
    "TrainingPlan",
    "TrainingResult",
    "train",
]

# The loss is read back to the CPU after the first step, then once per this many steps (and at every
# epoch end and state save): reading it every step would make the CPU wait for the GPU each step.
LOSS_READ_INTERVAL = 10
# Measures a deterministic validation loss on the weights as they are: (host, source, mixed precision).
Validation = Callable[[TrainingHost, BatchSource, str], float]


# A validation loss measured at every epoch end (evaluation/validation.py): (host, data, precision).
Validation = Callable[[TrainingHost, BatchSource, str], float]


class _StoppedWhilePreparing(Exception):
    pass


class _SaveFailed(RuntimeError):
    pass


def train(
    host: TrainingHost,
    config: TrainingConfig,
    source: BatchSource,
    callbacks: TrainingCallbacks | None = None,
    *,
    dataset_facts: DatasetFacts | None = None,
    image_count: int | None = None,
    resume_from: str | Path | None = None,
    allow_mismatch: bool = False,
    validation: Validation | None = None,
) -> TrainingResult:
    """Train one LoRA as ``config`` says; every epoch file lands in ``config.output_dir``.

    ``resume_from`` (a state file or a run's state folder) goes on at the exact step it was saved at;
    a dataset, checkpoint or settings difference is refused with :class:`ResumeMismatch` unless
    ``allow_mismatch``.
    """
    callbacks = callbacks or TrainingCallbacks()
    ensure_valid(config, need_dataset=False)
    problems = validate_for_dataset(config, image_count) if image_count is not None else []
    if problems:
        raise ConfigError(problems)
    precheck_optimizer(config, device=host.device)  # bitsandbytes is checked where it will run
    output_dir = Path(config.output_dir or ".")
    length = RunLength.of(config, source.batches_per_epoch())
    fingerprint = fingerprint_for(config, source.fingerprint(), host.base_model_info())
    resumed, differences = (
        check_resume(resume_from, fingerprint, allow_mismatch) if resume_from else (None, [])
    )
    for difference in differences:
        log.warning("resuming although %s", difference)
        callbacks.on_notice(f"Resuming although {difference}.")
    own_files = SavePolicy(config, length).refuse_existing(output_dir, resumed)
    unfinished = StateFolder.for_run(output_dir, config.output_name).state_paths()
    if resumed is None and unfinished:
        raise ConfigError(
            [
                f"an unfinished run named {config.output_name!r} has a training state in "
                f"{unfinished[-1].parent}; resume it, or choose another output name"
            ]
        )
    initial_weights = _load_initial_weights(config)

    precision = resolve_precision(host.device, host_weight_dtype(host.unet()), config.mixed_precision)
    torch.manual_seed(config.seed)
    options = HostOptions(
        train_text_encoder=_trains_text_encoder(config),
        clip_skip=config.clip_skip,
        mixed_precision=precision.compute,
        weighted_captions=config.weighted_captions,
    )
    with (
        host.session(options),
        tf32_matmul(host.device),
        precision.attention_guard(),
    ):
        try:
            _cache_latents(host, config, source, callbacks)
        except _StoppedWhilePreparing:
            message = "Stopped while caching latents; nothing was trained."
            log.info("%s", message)
            return TrainingResult("interrupted", message)
        callbacks.on_phase("attaching adapters", 0, 1)
        unet, text_encoder = host.unet(), host.text_encoder()
        plan = plan_network(
            config, unet, text_encoder, train_text_encoder=_trains_text_encoder(config), saved=initial_weights
        )
        with attached_adapters(unet, text_encoder, plan.targets, plan.settings, plan.dropout) as adapters:
            if initial_weights:
                adapters.load(initial_weights.weights)
            callbacks.on_phase("attaching adapters", 1, 1)
            run = _Run(
                host,
                config,
                source,
                adapters,
                callbacks,
                _RunFiles(output_dir, fingerprint, own_files),
                length,
                dataset_facts or DatasetFacts(),
                resumed,
                precision,
            )
            run.validation = validation
            return run.execute()


def _cache_latents(host: TrainingHost, config: TrainingConfig, source: BatchSource, callbacks) -> None:
    """Encode the dataset once (phase "caching latents"); Stop is honoured after each image."""
    total = source.batches_per_epoch()
    log.info("caching latents for %d batches per epoch", total)

    def progress(done: int, total: int) -> None:
        callbacks.on_phase("caching latents", done, total)
        if callbacks.should_stop():
            raise _StoppedWhilePreparing()

    callbacks.on_phase("caching latents", 0, 1)
    with CatchOutOfMemory() as memory:
        source.prepare(host.encode_images, progress)
    if memory.ran_out:  # outside the with block, so what the VAE held is released first
        free_cached_memory(host.device)
        raise TrainingOutOfMemory(out_of_memory_advice(host.device, config, "while caching latents", False))


def _trains_text_encoder(config: TrainingConfig) -> bool:
    relative = config.optimizer == "Adafactor" and config.adafactor_relative_step
    return config.train_text_encoder and (config.text_encoder_lr > 0 or relative)


def _load_initial_weights(config: TrainingConfig) -> SavedNetwork | None:
    return load_saved_network(config.network_weights, config) if config.network_weights else None


@dataclass(frozen=True)
class _RunFiles:
    output_dir: Path
    fingerprint: RunFingerprint
    own_files: set[str]  # files a resumed run wrote after its state was saved: written again


class _Run:
    """One run once the model is prepared and adapters are attached: the optimisation and the loop."""

    def __init__(
        self,
        host: TrainingHost,
        config: TrainingConfig,
        source: BatchSource,
        adapters: AttachedAdapters,
        callbacks: TrainingCallbacks,
        files: _RunFiles,
        length: RunLength,
        dataset_facts: DatasetFacts,
        resumed: LoadedState | None,
        precision: PrecisionPolicy,
    ):
        self.host, self.config, self.source = host, config, source
        self.adapters, self.callbacks, self.files = adapters, callbacks, files
        self.length, self.dataset_facts = length, dataset_facts
        self.policy = SavePolicy(config, length)
        self.state = resumed.run if resumed else RunState.new(config.seed, uuid.uuid4().int % 2**31)
        self.precision = precision
        self.device = host.device
        configured = config.parameterization
        self.parameterization = host.parameterization() if configured == "auto" else configured
        self.loss_shaping = LossShaping.from_config(
            config, host.alphas_cumprod(), self.parameterization, self.device
        )
        self.train_text_encoder = _trains_text_encoder(config)

        self.unet_params = adapters.parameters("unet")
        self.text_params = adapters.parameters("text_encoder") if self.train_text_encoder else []
        self.trainable = self.unet_params + self.text_params
        self.trainable_parameters = sum(p.numel() for p in self.trainable)
        groups = adapter_param_groups(adapters, config, train_text_encoder=self.train_text_encoder)
        self.optimizer = build_optimizer(config, groups, self.device)
        self.scheduler = build_scheduler(config, self.optimizer, length.total_steps)
        self.scaler = precision.grad_scaler()
        self.checkpointing_stack = contextlib.ExitStack()
        self.checkpointing_on = False  # before the caption cache: its out-of-memory advice says it
        self.conditioning = self._caption_conditioning()
        checkpointing = self._choose_checkpointing()
        self.plan = TrainingPlan(
            batches_per_epoch=length.batches_per_epoch,
            steps_per_epoch=length.steps_per_epoch,
            total_steps=length.total_steps,
            epochs=length.epochs,
            adapted_modules=len(adapters.targets),
            trainable_parameters=self.trainable_parameters,
            gradient_checkpointing=checkpointing,
            resumed_at_step=self.state.step,
        )
        if resumed is not None:
            self._load_trainables(resumed)
        self.started_at = time.time()
        folder = StateFolder.for_run(files.output_dir, config.output_name, config.save_last_n_states)
        self.states = StateKeeper(
            folder,
            config,
            files.fingerprint,
            length.total_steps,
            length.epochs,
            callbacks.on_notice,
            resumed.path if resumed else None,
        )
        self.pending_losses: list[tuple[int, torch.Tensor]] = []
        self.validation: Validation | None = None

    # --- the loop -----------------------------------------------------------------------------------
    def execute(self) -> TrainingResult:
        with self.checkpointing_stack:
            if self.plan.gradient_checkpointing.enabled or self.state.checkpointing_on:
                self._checkpoint_from_now()
            return self._execute()

    def _execute(self) -> TrainingResult:
        self.callbacks.on_start(self.plan)
        self.callbacks.on_phase("training", self.state.step, self.plan.total_steps)
        log.info("%s", self.precision.reason)
        if self.precision.notice:
            self.callbacks.on_notice(self.precision.notice)
        log.info(
            "training %s: %d epochs x %d steps, %d adapted modules, %d trainable parameters; "
            "gradient checkpointing %s%s",
            self.config.output_name,
            self.plan.epochs,
            self.plan.steps_per_epoch,
            self.plan.adapted_modules,
            self.plan.trainable_parameters,
            self.plan.gradient_checkpointing.reason,
            f"; resumed at step {self.state.step}" if self.state.step else "",
        )
        self._write_status("training", "training")
        try:
            while not self._finished():
                if not self._train_epoch():
                    return self._stopped(f"Interrupted during epoch {self.state.epoch}")
                self._finish_epoch()
                if self._finished():
                    break
                self._save_state_if_due()
                if self.callbacks.should_stop():
                    return self._stopped(f"Interrupted after epoch {self.state.epoch - 1}")
        except (NonFiniteLoss, NonFiniteWeights) as error:
            return self._result("stopped_nonfinite_loss", self._nonfinite_message(error))
        except _SaveFailed as error:
            return self._result("stopped_save_failed", str(error))
        except TrainingOutOfMemory as error:
            message = self._after_out_of_memory(error)
            raise TrainingOutOfMemory(message, weights_intact=error.weights_intact) from None
        message = f"Trained {self.plan.epochs} epochs, {self.state.step} steps."
        result = self._result("completed", message)
        with contextlib.suppress(OSError):
            self.states.folder.remove()  # a finished run needs no state; its files are the result
        result.state_path = None
        return result

    def _finished(self) -> bool:
        return self.state.step >= self.length.total_steps or self.state.epoch > self.length.epochs

    def _train_epoch(self) -> bool:
        """The rest of the epoch in progress; False when the user interrupted it."""
        state, accumulation = self.state, self.config.gradient_accumulation_steps
        batches = self.length.batches_per_epoch
        self.rng = state.data_rng()
        state.begin_epoch(self.rng)
        epoch_batches = iter(self.source.epoch(state.epoch - 1, self.rng))
        for _ in range(state.batches_done):  # a resumed epoch: replay its first batches' random draws
            next(epoch_batches)
        # torch's generators as after the last step, whatever drew from them since (samples, resume)
        state.restore_torch_rngs()
        window: list[TrainingBatch] = []  # the batches of this optimizer step
        for index, batch in enumerate(epoch_batches, start=state.batches_done):
            if self.callbacks.should_stop():
                return False
            window.append(batch)
            self._accumulate(window)
            if (index + 1) % accumulation == 0 or index + 1 == batches:
                self._optimizer_step()
                state.step_done(index + 1, self.device)
                window = []
                epoch_end = index + 1 == batches or state.step >= self.length.total_steps
                self._report(epoch_end)
                if self.policy.step_file_due(state.step):
                    self._save_file("step", state.step)
                if epoch_end:
                    break
                self._save_state_if_due()
        return True

    def _accumulate(self, window: list[TrainingBatch]) -> None:
        """Forward and backward of the window's newest batch. If it runs out of memory while "auto" has
        checkpointing off, checkpointing goes on and the whole window is done again (a failed backward
        leaves partial gradients)."""
        if self._forward_backward(window[-1]):
            return
        if self.checkpointing_on or self.config.gradient_checkpointing != "auto":
            raise TrainingOutOfMemory(self._out_of_memory_advice())
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_losses = [(step, loss) for step, loss in self.pending_losses if step <= self.state.step]
        free_cached_memory(self.device)
        self._checkpoint_from_now()
        notice = (
            f"Step {self.state.step + 1} ran out of memory with gradient checkpointing off; "
            "switched it on for the rest of the run and did the step again."
        )
        log.warning("%s", notice)
        self.callbacks.on_notice(notice)
        for batch in window:
            if not self._forward_backward(batch):
                raise TrainingOutOfMemory(self._out_of_memory_advice())

    def _forward_backward(self, batch: TrainingBatch) -> bool:
        """False when the batch did not fit in memory (what it allocated is released on return)."""
        with CatchOutOfMemory() as memory:
            loss = self._loss(batch)
            self.pending_losses.append((self.state.step + 1, loss.detach()))
            self._backward(loss / self.config.gradient_accumulation_steps)
        return not memory.ran_out

    def _out_of_memory_advice(self, during: str = "") -> str:
        where = during or f"at step {self.state.step + 1}"
        return out_of_memory_advice(self.device, self.config, where, self.checkpointing_on)

    def _after_out_of_memory(self, error: TrainingOutOfMemory) -> str:
        """Save the state of the last finished step (unless the failed optimizer step changed the
        weights half-way) and say what Resume will do."""
        self.optimizer.zero_grad(set_to_none=True)
        self.pending_losses = [(step, loss) for step, loss in self.pending_losses if step <= self.state.step]
        free_cached_memory(self.device)
        path = None
        if error.weights_intact:
            with contextlib.suppress(NonFiniteLoss):
                path = self._save_state()
        self._write_status("failed", str(error))
        if path is not None:
            return (
                f"{error} The training state of step {self.state.step} is saved: Resume goes on from there."
            )
        return str(error)

    # --- gradient checkpointing ---------------------------------------------------------------------
    def _choose_checkpointing(self) -> CheckpointingChoice:
        mode = self.config.gradient_checkpointing
        free = available_bytes(self.device) if mode == "auto" else None
        if free is None:
            return choose_checkpointing(mode, None, None)
        self.callbacks.on_phase("memory probe", 0, 1)
        captions = self.source.captions()[:1] or [""]
        need = None
        with CatchOutOfMemory():
            need = estimate_step_bytes(
                self.host,
                lambda: self.conditioning(captions),
                mixed_precision=self.precision.compute,
                batch_size=self.config.batch_size,
                resolution=self.config.resolution,
                trainable_parameters=self.trainable_parameters,
                optimizer=self.config.optimizer,
            )
        self.callbacks.on_phase("memory probe", 1, 1)
        if need is None:  # outside the with block, so what the probe held is released first
            free_cached_memory(self.device)
            return CheckpointingChoice(True, "auto: on (the memory probe itself ran out of memory)")
        return choose_checkpointing(mode, need, free)

    def _checkpoint_from_now(self) -> None:
        self.checkpointing_stack.enter_context(self.host.gradient_checkpointing(True))
        self.checkpointing_on = self.state.checkpointing_on = True

    # --- one step -----------------------------------------------------------------------------------
    def _loss(self, batch: TrainingBatch) -> torch.Tensor:
        latents = to_device_async(batch.latents, self.device, torch.float32)
        cond = self.conditioning(batch.captions)
        noised = self.loss_shaping.noise(latents)  # draws from torch's global RNG (order: training/loss.py)
        with self.host.autocast(self.precision.compute):
            prediction = self.host.predict(noised.noisy, noised.timesteps, cond)
        return self.loss_shaping.loss(prediction, noised, batch.loss_weights, batch.masks)

    def _backward(self, loss: torch.Tensor) -> None:
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()

    def _optimizer_step(self) -> None:
        with CatchOutOfMemory() as memory:
            self._apply_gradients()
        if memory.ran_out:  # e.g. the optimizer's state, allocated at the first step, does not fit
            raise TrainingOutOfMemory(
                self._out_of_memory_advice(f"in the optimizer step of step {self.state.step + 1}"),
                weights_intact=False,
            )

    def _apply_gradients(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.trainable, self.config.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.config.scale_weight_norms > 0:
            scale_weight_norms(self.adapters, self.config.scale_weight_norms)  # logs the keys scaled
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    # --- conditioning -------------------------------------------------------------------------------
    def _caption_conditioning(self) -> CaptionConditioning:
        conditioning = CaptionConditioning(self.host, self.precision.compute, self.train_text_encoder)
        if self.train_text_encoder or self.source.captions_vary():
            return conditioning
        if not conditioning.cache(self.source.captions(), self.callbacks.on_phase):
            free_cached_memory(self.device)
            raise TrainingOutOfMemory(self._out_of_memory_advice("while encoding the captions"))
        return conditioning

    # --- reporting ----------------------------------------------------------------------------------
    def _read_losses(self) -> list[tuple[int, float]]:
        """Bring pending losses to the CPU in one transfer; stop on the first non-finite one."""
        if not self.pending_losses:
            return []
        values = torch.stack([loss for _, loss in self.pending_losses]).float().cpu().tolist()
        read = [(step, value) for (step, _), value in zip(self.pending_losses, values, strict=True)]
        self.pending_losses = []
        for step, value in read:
            if not math.isfinite(value):
                raise NonFiniteLoss(f"The loss became {value} at step {step}; training stopped.")
        self.state.losses += [value for _, value in read]
        self.state.epoch_losses += [value for _, value in read]
        return read

    def _report(self, epoch_end: bool = False) -> None:
        # read after the first step (the chart has a value at once), every LOSS_READ_INTERVAL steps
        # and at each epoch's end (so the chart has every step before the epoch is saved)
        step = self.state.step
        due = epoch_end or step == 1 or step % LOSS_READ_INTERVAL == 0
        new_losses = self._read_losses() if due else []
        self.callbacks.on_step(
            StepProgress(
                step=step,
                total_steps=self.plan.total_steps,
                epoch=self.state.epoch,
                epochs=self.plan.epochs,
                learning_rates=current_learning_rates(self.optimizer, self.scheduler),
                new_losses=new_losses,
                elapsed_s=time.time() - self.started_at,
            )
        )

    def _nonfinite_message(self, error: Exception) -> str:
        epochs = [s for s in self.state.saved if s.kind == "epoch"]
        last = epochs[-1].path.name if epochs else "none yet"
        state = (
            f" The last good training state is {self.states.last_path.name} "
            "(Resume it with a lower learning rate)."
            if self.states.last_path is not None
            else ""
        )
        precision = " and save in bf16/fp32" if isinstance(error, NonFiniteWeights) else ""
        message = (
            f"{error} The last good epoch file is {last}. Lower the learning rate or alpha, or train in "
            f"bf16/fp32 instead of fp16{precision}.{state}"
        )
        self._write_status("stopped_nonfinite_loss", message)
        return message

    # --- files --------------------------------------------------------------------------------------
    def _finish_epoch(self) -> None:
        self._read_losses()
        losses = self.state.epoch_losses
        mean_loss = sum(losses) / max(1, len(losses))
        validation_loss = None
        if self.validation is not None:  # its own generator: the training RNG is left as it was
            validation_loss = self.validation(self.host, self.source, self.precision.compute)
            log.info("epoch %d validation loss %.6f", self.state.epoch, validation_loss)
        if self.policy.epoch_file_due(self.state.epoch):
            self._save_file("epoch", self.state.epoch, validation_loss)
        self.state.epoch_done(mean_loss, self.rng)

    def _save_file(self, kind: str, number: int, validation_loss: float | None = None) -> None:
        """Write an epoch or step file (refused when not finite), then drop what save_last_n_* drops."""
        self._read_losses()
        losses = self.state.epoch_losses
        mean_loss = sum(losses) / max(1, len(losses))
        path = self.files.output_dir / self.policy.file_name(kind, number)
        with evaluation_weights(self.optimizer):  # schedule-free: save and sample the averaged weights
            modules = {
                kohya_format.kohya_name(component, name): weights
                for (component, name), weights in self.adapters.export().items()
            }
            try:
                kohya_format.save_kohya_lora(
                    path,
                    modules,
                    self._metadata(path.stem),
                    self.config.save_precision,
                    overwrite=path.name in self.files.own_files,
                )
            except OSError as error:
                raise _SaveFailed(self._save_failed_message(path, error)) from None
            saved = EpochSaved(
                epoch=self.state.epoch,
                step=self.state.step,
                mean_loss=mean_loss,
                path=path,
                kind=kind,
                validation_loss=validation_loss,
            )
            self.state.saved.append(saved)
            log.info("saved %s (step %d, mean loss %.4f)", path, self.state.step, mean_loss)
            self.callbacks.on_epoch_saved(saved)
        for old in self.policy.to_remove(self.state.saved):
            old.path.unlink(missing_ok=True)
            self.state.saved.remove(old)
            log.info("removed %s (save_last_n_%ss)", old.path.name, old.kind)
            self.callbacks.on_file_removed(old)

    def _save_failed_message(self, path: Path, error: OSError) -> str:
        reason = "the disk is full" if error.errno == 28 else (error.strerror or str(error))
        state = (
            f"the training state of step {self.state.step} is saved, so Resume goes on from there"
            if self._save_state() is not None
            else "the previous training state is kept"
        )
        message = (
            f"{path.name} could not be saved: {reason} (nothing partial was left). Free some space or "
            f"choose another Lora folder; {state}, and the epoch files saved so far are kept."
        )
        self._write_status("stopped_save_failed", message)
        return message

    def _metadata(self, stem: str) -> dict[str, str]:
        info = self.host.base_model_info()
        facts = self.dataset_facts
        run = kohya_format.TrainingRunInfo(
            num_batches_per_epoch=self.plan.batches_per_epoch,
            max_train_steps=self.plan.total_steps,
            dataset_dirs=facts.dataset_dirs,
            tag_frequency=facts.tag_frequency,
            bucket_info=facts.bucket_info,
            reg_dataset_dirs=facts.reg_dataset_dirs,
            session_id=self.state.session_id,
            training_started_at=self.state.started_at,
            parameterization=self.parameterization,
            optimizer=describe_optimizer(self.config),
            gradient_checkpointing=self.checkpointing_on,
            mixed_precision=self.precision.compute,
            max_token_length=self.host.max_token_length(),
            sd_model_name=info.name,
            sd_model_hash=info.hash_legacy,
            new_sd_model_hash=info.hash_sha256,
        )
        return kohya_format.build_metadata(
            output_name=self.config.output_name,
            epoch=self.state.epoch,
            steps=self.state.step,
            config=self.config,
            run=run,
            file_stem=stem,
        )

    # --- the training state -------------------------------------------------------------------------
    def _save_state_if_due(self) -> None:
        if self.policy.state_due(self.state.step, time.monotonic() - self.states.last_saved_at):
            self._save_state()

    def _save_state(self) -> Path | None:
        """Save the state of the last finished step; None when it could not be (the previous is kept)."""
        # the losses of a step not finished (a stop during gradient accumulation) are redone on resume
        self.pending_losses = [(step, loss) for step, loss in self.pending_losses if step <= self.state.step]
        self._read_losses()  # a non-finite loss stops the run here: no state after it is "good"
        if not all(bool(torch.isfinite(p).all()) for p in self.trainable):
            log.warning("the adapters hold NaN/inf values; the training state is not saved")
            return None
        trainables = trainables_of(self.adapters, self.optimizer, self.scheduler, self.scaler)
        return self.states.save(self.state, trainables)

    def _load_trainables(self, resumed: LoadedState) -> None:
        load_trainables(resumed, self.adapters, self.optimizer, self.scheduler, self.scaler)
        notice = f"Resuming at step {self.state.step} of {self.plan.total_steps} (epoch {self.state.epoch})."
        log.info("%s", notice)
        self.callbacks.on_notice(notice)

    def _write_status(self, status: str, message: str) -> None:
        self.states.status(status, message, self.state)

    def _stopped(self, what: str) -> TrainingResult:
        path = self._save_state()
        resume = f" Resume goes on at step {self.state.step}." if path is not None else ""
        message = f"{what}.{resume}"
        self._write_status("interrupted", message)
        return self._result("interrupted", message)

    def _result(self, status: str, message: str) -> TrainingResult:
        if status != "stopped_nonfinite_loss":
            with contextlib.suppress(NonFiniteLoss):
                self._read_losses()
        log.info("%s", message)
        saved = self.state.saved
        return TrainingResult(
            status,
            message,
            [s for s in saved if s.kind == "epoch"],
            list(self.state.losses),
            self.plan,
            [s for s in saved if s.kind == "step"],
            self.states.last_path,
        )
