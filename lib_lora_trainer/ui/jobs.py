"""The training job: one background thread per run, its state readable by any page at any time.

The thread takes the host's GPU lock itself (:meth:`HostServices.exclusive_job`), so nothing else runs
on the model while it trains, and it does not depend on the browser page that started it: a reload,
or a second browser, reads the same :class:`JobSnapshot`. Stopping is cooperative: the Stop button and
the host's own Interrupt both end the run after the current step; the last finished epoch stays on
disk and the host restores the model.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lib_lora_trainer.config import ConfigError, TrainingConfig, ensure_valid
from lib_lora_trainer.dataset.source import DatasetError
from lib_lora_trainer.evaluation.validation import validation_for
from lib_lora_trainer.model.host import HostRefused
from lib_lora_trainer.outputs.registry import (
    EpochCard,
    EpochRegistry,
    OutputNameError,
    RegistrationError,
    RunOutputs,
)
from lib_lora_trainer.outputs.samples import SampleError, sample_due, sample_requests
from lib_lora_trainer.paths import PathNotAllowedError
from lib_lora_trainer.training.loop import (
    EpochSaved,
    StepProgress,
    TrainingCallbacks,
    TrainingOutOfMemory,
    TrainingPlan,
)
from lib_lora_trainer.training.run import prepare_dataset, run_training
from lib_lora_trainer.training.state import StateError, load_state
from lib_lora_trainer.ui.services import HostServices, JobFrame

logger = logging.getLogger(__name__)

RUNNING_STATES = ("queued", "preparing", "training", "sampling")
MAX_LOG_LINES = 200
# How the preparation phases the engine reports (TrainingCallbacks.on_phase) are named for the user.
PHASE_LABELS = {
    "caching latents": "Caching latents",
    "attaching adapters": "Attaching the adapters",
    "memory probe": "Measuring memory",
    "caching captions": "Encoding captions",
}


def phase_label(phase: str) -> str:
    """A phase name from the engine as the user reads it ("cache_latents" -> "Caching latents")."""
    return PHASE_LABELS.get(phase, phase.replace("_", " ").strip().capitalize() or "Preparing")


class JobRefused(ValueError):
    """The run cannot start; the message says why (``suggestion`` is a free run name on a clash)."""

    def __init__(self, message: str, suggestion: str | None = None):
        super().__init__(message)
        self.suggestion = suggestion


@dataclass(frozen=True)
class EpochResult:
    epoch: int
    stem: str
    step: int
    mean_loss: float
    model_path: Path
    samples: tuple[Path, ...] = ()
    registered: bool = False
    problem: str = ""
    validation_loss: float | None = None


@dataclass(frozen=True)
class JobSnapshot:
    """A consistent copy of a job's state for the UI."""

    task_id: str
    run_name: str
    run_folder: Path
    state: str  # queued, preparing, training, sampling, completed, interrupted, failed, ...
    message: str
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    elapsed_s: float = 0.0
    losses: tuple[tuple[int, float], ...] = ()
    epoch_results: tuple[EpochResult, ...] = ()
    log: tuple[str, ...] = ()
    version: int = 0
    phase: str = ""  # the preparation phase under way ("Caching latents"), empty once training runs
    phase_done: int = 0
    phase_total: int = 0

    @property
    def running(self) -> bool:
        return self.state in RUNNING_STATES

    @property
    def eta_s(self) -> float | None:
        if self.step <= 0 or self.total_steps <= 0 or self.state != "training":
            return None
        return self.elapsed_s / self.step * (self.total_steps - self.step)

    @property
    def last_loss(self) -> float | None:
        return self.losses[-1][1] if self.losses else None

    def progress_text(self) -> str:
        """One line for A1111's progress bar (no newline, or A1111 hides it)."""
        if self.phase:
            return f"Preparing {self.run_name}: {self.phase} {self.phase_done}/{self.phase_total}"
        if self.state == "preparing":
            return f"Preparing {self.run_name}: reading the dataset"
        text = (
            f"Training {self.run_name}: step {self.step}/{self.total_steps}, epoch {self.epoch}/{self.epochs}"
        )
        if self.last_loss is not None:
            text += f", loss {self.last_loss:.4f}"
        return text


@dataclass
class _State:
    state: str = "queued"
    message: str = "Waiting for the GPU (another generation is running)..."
    step: int = 0
    total_steps: int = 0
    epoch: int = 0
    epochs: int = 0
    started: float = 0.0
    ended: float = 0.0
    phase: str = ""
    phase_done: int = 0
    phase_total: int = 0
    losses: list[tuple[int, float]] = field(default_factory=list)
    epoch_results: list[EpochResult] = field(default_factory=list)
    log: list[str] = field(default_factory=list)
    version: int = 0


class TrainingJob:
    """One run: the config, where its files go, and the thread that trains it."""

    def __init__(
        self,
        services: HostServices,
        config: TrainingConfig,
        run: RunOutputs,
        registry: EpochRegistry,
        task_id: str,
        resume_from: Path | None = None,
        allow_mismatch: bool = False,
    ):
        self.resume_from, self.allow_mismatch = resume_from, allow_mismatch
        self.services = services
        self.config = config
        self.run = run
        self.registry = registry
        self.task_id = task_id
        self._lock = threading.Lock()
        self._state = _State(epochs=config.epochs)
        self._stop = threading.Event()
        self._frame: JobFrame | None = None
        self._thread = threading.Thread(target=self._main, name=f"lora-train-{run.name}", daemon=True)
        self.on_finished: list[Callable[[TrainingJob], None]] = []  # run after the GPU lock is released

    # --- control ------------------------------------------------------------------------------------
    def start(self) -> None:
        self._log(f"Run {self.run.name}: epochs go to {self.run.folder}")
        self._thread.start()

    def request_stop(self) -> None:
        self._stop.set()
        self._log("Stop requested; the run ends after the current step.")

    def wait(self, timeout: float | None = None) -> bool:
        """True when the thread has finished."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def snapshot(self) -> JobSnapshot:
        with self._lock:
            state = self._state
            end = state.ended or time.time()
            elapsed = end - state.started if state.started else 0.0
            return JobSnapshot(
                task_id=self.task_id,
                run_name=self.run.name,
                run_folder=self.run.folder,
                state=state.state,
                message=state.message,
                step=state.step,
                total_steps=state.total_steps,
                epoch=state.epoch,
                epochs=state.epochs,
                elapsed_s=elapsed,
                losses=tuple(state.losses),
                epoch_results=tuple(state.epoch_results),
                log=tuple(state.log),
                version=state.version,
                phase=state.phase,
                phase_done=state.phase_done,
                phase_total=state.phase_total,
            )

    # --- the thread ---------------------------------------------------------------------------------
    def _main(self) -> None:
        try:
            with self.services.exclusive_job(self.task_id, f"Training {self.run.name}") as frame:
                if self._stop.is_set():  # stopped while it waited in the queue: touch nothing
                    self._update(state="interrupted", message="Stopped before it started; nothing changed.")
                    self._log("Stopped while waiting for the GPU; the model was not prepared.")
                    return
                self._frame = frame
                self._update(state="preparing", message="Preparing the dataset and the model...")
                self._started()
                self._report_progress()  # the host's bar says "preparing", not a stale 0.01
                result = run_training(
                    self.services.training_host(),
                    self.config,
                    _Callbacks(self),
                    face_finder=self.services.face_finder(),
                    vae_id=self.services.vae_id(),
                    resume_from=self.resume_from,
                    allow_mismatch=self.allow_mismatch,
                    validation=validation_for(self.config, self.services.face_finder()),
                )
            self._update(state=result.status, message=result.message)
            self._log(result.message)
        except (
            ConfigError,
            DatasetError,
            HostRefused,
            PathNotAllowedError,
            TrainingOutOfMemory,
            StateError,
        ) as error:
            self._fail(str(error))
        except Exception as error:  # anything else must still end the job visibly
            logger.exception("training %s failed", self.run.name)
            self._fail(f"Training failed: {type(error).__name__}: {error}")
        finally:
            self._frame = None
            self._ended()
        for hook in self.on_finished:
            hook(self)

    def _started(self) -> None:
        with self._lock:
            self._state.started = time.time()

    def _ended(self) -> None:
        with self._lock:
            if self._state.started and not self._state.ended:
                self._state.ended = time.time()
            self._state.phase = ""
            self._state.version += 1

    def _fail(self, message: str) -> None:
        logger.error("%s", message)
        self._update(state="failed", message=message)
        self._log(message)

    def should_stop(self) -> bool:
        frame = self._frame
        return self._stop.is_set() or (frame is not None and frame.interrupted())

    # --- callbacks from the engine ------------------------------------------------------------------
    def on_start(self, plan: TrainingPlan) -> None:
        if self.resume_from is None:  # a resumed run keeps the settings file it started with
            self.registry.save_run_config(self.run, self.config)
        self._update(
            state="training",
            message=f"{plan.epochs} epochs of {plan.steps_per_epoch} steps",
            total_steps=plan.total_steps,
            epochs=plan.epochs,
            epoch=1,
            phase="",
        )
        self._begin_phase()  # the progress bar's ETA counts from the first step, not from preparation
        self._log(
            f"{plan.total_steps} steps ({plan.epochs} epochs x {plan.steps_per_epoch}), "
            f"{plan.adapted_modules} adapted modules, {plan.trainable_parameters:,} trainable parameters; "
            f"gradient checkpointing {plan.gradient_checkpointing.reason}"
        )
        self._report_progress()

    def on_step(self, progress: StepProgress) -> None:
        with self._lock:
            state = self._state
            state.step = progress.step
            state.total_steps = progress.total_steps
            state.epoch = progress.epoch
            state.losses.extend(progress.new_losses)
            state.phase = ""  # the steps have begun: preparation is over
            if state.state == "training":
                state.message = f"epoch {progress.epoch} of {state.epochs}"
            state.version += 1
        self._report_progress()

    def on_phase(self, phase: str, done: int, total: int) -> None:
        """A preparation phase (latent caching, adapters, memory probe) moved on: its own progress."""
        label = phase_label(phase)
        with self._lock:
            state = self._state
            new_phase = state.phase != label
            state.phase, state.phase_done, state.phase_total = label, int(done), int(total)
            state.message = f"{label} ({done}/{total})" if total else label
            state.version += 1
        if new_phase:
            self._begin_phase()
        self._report_progress()

    def on_epoch_saved(self, saved: EpochSaved) -> None:
        stem = saved.path.stem  # name-000003, or a step file's name-step00000500
        self._log(f"Epoch {saved.epoch} saved: {saved.path.name} (mean loss {saved.mean_loss:.4f})")
        samples = self._render_samples(saved.epoch, stem)
        problem = ""
        card = EpochCard(
            epoch=saved.epoch,
            steps=saved.step,
            loss=saved.mean_loss,
            trigger_word=self.config.trigger_word,
            total_epochs=self.config.epochs,
            stem=stem,
        )
        try:
            self.registry.register_epoch(self.run, card, preview=samples[0].image if samples else None)
        except RegistrationError as error:
            problem = str(error)
            self._log(f"Epoch {saved.epoch}: the card files were not written: {error}")
        result = EpochResult(
            epoch=saved.epoch,
            stem=stem,
            step=saved.step,
            mean_loss=saved.mean_loss,
            model_path=saved.path,
            samples=tuple(sample.path for sample in samples if sample.path is not None),
            registered=not problem,
            problem=problem,
            validation_loss=saved.validation_loss,
        )
        with self._lock:
            self._state.epoch_results.append(result)
            self._state.state = "training"
            self._state.message = f"epoch {saved.epoch} of {self._state.epochs} saved"
            self._state.version += 1
        self._report_progress()

    def on_notice(self, message: str) -> None:
        self._log(message)

    def _render_samples(self, epoch: int, stem: str) -> list:
        if not sample_due(self.config, epoch) or self.should_stop():
            return []
        self._update(state="sampling", message=f"Rendering samples of epoch {epoch}...")
        folder = self.services.samples_root() / self.run.name
        try:
            return self.services.sample_renderer().render(sample_requests(self.config, stem), folder, stem)
        except (SampleError, OSError, RuntimeError, ValueError) as error:
            logger.exception("samples of %s failed", stem)
            self._log(f"Epoch {epoch}: samples could not be rendered ({error}); training goes on")
            return []

    # --- state --------------------------------------------------------------------------------------
    def _update(self, **changes) -> None:
        with self._lock:
            for name, value in changes.items():
                setattr(self._state, name, value)
            self._state.version += 1

    def _log(self, line: str) -> None:
        logger.info("%s", line)
        with self._lock:
            self._state.log.append(time.strftime("%H:%M:%S ") + line)
            del self._state.log[:-MAX_LOG_LINES]
            self._state.version += 1

    def _report_progress(self) -> None:
        frame = self._frame
        if frame is None:
            return
        snapshot = self.snapshot()
        if snapshot.phase:
            frame.progress(snapshot.phase_done, snapshot.phase_total, snapshot.progress_text())
        else:
            frame.progress(snapshot.step, snapshot.total_steps, snapshot.progress_text())

    def _begin_phase(self) -> None:
        frame = self._frame
        begin = getattr(frame, "begin_phase", None)
        if begin is not None:
            begin()


class _Callbacks(TrainingCallbacks):
    def __init__(self, job: TrainingJob):
        self.job = job

    def on_start(self, plan: TrainingPlan) -> None:
        self.job.on_start(plan)

    def on_step(self, progress: StepProgress) -> None:
        self.job.on_step(progress)

    def on_epoch_saved(self, saved: EpochSaved) -> None:
        self.job.on_epoch_saved(saved)

    def on_notice(self, message: str) -> None:
        self.job.on_notice(message)

    def on_phase(self, phase: str, done: int, total: int) -> None:
        self.job.on_phase(phase, done, total)

    def on_file_removed(self, saved: EpochSaved) -> None:
        self.job.registry.remove_card_files(self.job.run, saved.path.stem)

    def should_stop(self) -> bool:
        return self.job.should_stop()


class TrainingJobs:
    """The one training job of this process (a GPU trains one LoRA at a time)."""

    def __init__(self, services: HostServices):
        self.services = services
        self._lock = threading.Lock()
        self._current: TrainingJob | None = None
        self.on_finished: list[Callable[[TrainingJob], None]] = []  # given to every job it starts

    def current(self) -> TrainingJob | None:
        return self._current

    def is_running(self) -> bool:
        job = self._current
        return job is not None and job.snapshot().running

    def start(
        self,
        config: TrainingConfig,
        *,
        task_id: str = "",
        number_if_taken: bool = False,
    ) -> TrainingJob:
        """Check ``config``, plan the run's files and start training in the background.

        Raises :class:`JobRefused` with a user-readable reason (nothing is written then).
        """
        with self._lock:
            if self.is_running():
                raise JobRefused("A training run is already in progress; stop it or wait for it to end.")
            try:
                config = self._checked_paths(config)
                registry = EpochRegistry(
                    self.services.lora_roots(),
                    self.services.defaults().lora_subfolder,
                    on_registered=self.services.notify_lora_added,
                )
                run = self._plan_run(registry, config.output_name, number_if_taken)
                config = dataclasses.replace(config, output_name=run.name, output_dir=str(run.folder))
                ensure_valid(config)
                self._preflight(config)
            except (ConfigError, PathNotAllowedError, HostRefused, ValueError) as error:
                logger.warning("training not started: %s", error)
                raise JobRefused(str(error), getattr(error, "suggestion", None)) from error
            job = TrainingJob(
                self.services, config, run, registry, task_id or self.services.new_task_id("train")
            )
            job.on_finished = list(self.on_finished)
            self._current = job
            job.start()
            return job

    def resume(self, run_name: str, *, allow_mismatch: bool = False, task_id: str = "") -> TrainingJob:
        """Go on with a run that did not finish, from its newest training state, in its own folder."""
        with self._lock:
            if self.is_running():
                raise JobRefused("A training run is already in progress; stop it or wait for it to end.")
            registry = EpochRegistry(
                self.services.lora_roots(),
                self.services.defaults().lora_subfolder,
                on_registered=self.services.notify_lora_added,
            )
            runs = {run.name: run for run in registry.resumable_runs()}
            if run_name not in runs:
                raise JobRefused(
                    f"{run_name!r} has no training state to resume (it finished, or never saved one)."
                )
            try:
                saved = load_state(runs[run_name].state_folder).config
                run = registry.run_for(run_name)
                config = self._checked_paths(dataclasses.replace(saved, output_dir=str(run.folder)))
                ensure_valid(config)
            except (ConfigError, PathNotAllowedError, StateError, ValueError) as error:
                logger.warning("resume not started: %s", error)
                raise JobRefused(str(error)) from error
            job = TrainingJob(
                self.services,
                config,
                run,
                registry,
                task_id or self.services.new_task_id("train"),
                resume_from=runs[run_name].state_folder,
                allow_mismatch=allow_mismatch,
            )
            self._current = job
            job.start()
            return job

    def stop(self) -> str:
        job = self._current
        if job is None or not job.snapshot().running:
            return "No training is running."
        job.request_stop()
        return "Stopping after the current step; the training state is saved for Resume."

    def _preflight(self, config: TrainingConfig) -> None:
        """What run_training would refuse later, checked now so that Train never says "started" for a run
        that cannot start: the dataset (folders, usable images), the LoRA to continue from, the model."""
        prepare_dataset(config)  # DatasetError: one sentence per problem
        weights = config.network_weights.strip()
        if weights and not Path(weights).is_file():
            raise JobRefused(f"The LoRA file to continue from does not exist: {weights}.")
        self.services.training_host()  # HostRefused: no checkpoint loaded, an unsupported WebUI

    def _checked_paths(self, config: TrainingConfig) -> TrainingConfig:
        policy = self.services.path_policy()
        changes = {"train_data_dir": str(policy.check(config.train_data_dir))}
        for name in ("reg_data_dir", "network_weights", "validation_dir"):
            value = getattr(config, name).strip()
            if value:
                changes[name] = str(policy.check(value))
        return dataclasses.replace(config, **changes)

    @staticmethod
    def _plan_run(registry: EpochRegistry, name: str, number_if_taken: bool) -> RunOutputs:
        try:
            return registry.plan_run(name)
        except OutputNameError as error:
            if number_if_taken and error.suggestion:
                return registry.plan_run(error.suggestion)
            raise
