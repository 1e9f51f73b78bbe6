"""What a run tells the UI (or a test) and what it hands back: the plan, progress, saved files, the
result, and the hooks that follow and steer it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lib_lora_trainer.training.memory import CheckpointingChoice
from lib_lora_trainer.training.state import EpochSaved

__all__ = ["EpochSaved"]


@dataclass(frozen=True)
class TrainingPlan:
    batches_per_epoch: int
    steps_per_epoch: int  # optimizer steps
    total_steps: int
    epochs: int
    adapted_modules: int
    trainable_parameters: int
    gradient_checkpointing: CheckpointingChoice = CheckpointingChoice(False, "off")
    resumed_at_step: int = 0  # > 0 when the run goes on from a saved training state


@dataclass(frozen=True)
class StepProgress:
    step: int  # optimizer steps done
    total_steps: int
    epoch: int  # 1-based
    epochs: int
    learning_rates: dict[str, float]
    new_losses: list[tuple[int, float]]  # (step, loss) pairs read back since the last report
    elapsed_s: float


@dataclass
class TrainingResult:
    status: str  # "completed", "interrupted", "stopped_nonfinite_loss" or "stopped_save_failed"
    message: str
    epochs: list[EpochSaved] = field(default_factory=list)  # the epoch files that exist
    losses: list[float] = field(default_factory=list)  # per optimizer-step micro-batch loss, in order
    plan: TrainingPlan | None = None
    step_files: list[EpochSaved] = field(default_factory=list)
    state_path: Path | None = None  # the newest training state, for Resume (None once completed)


class TrainingCallbacks:
    """Hooks the UI (or a test) uses to follow and steer a run. Every method is optional."""

    def on_phase(self, phase: str, done: int, total: int) -> None:
        """Preparation progress: "caching latents", "attaching adapters", "caching captions",
        "memory probe", then "training"."""

    def on_start(self, plan: TrainingPlan) -> None: ...

    def on_step(self, progress: StepProgress) -> None: ...

    def on_epoch_saved(self, saved: EpochSaved) -> None:
        """An epoch file, or a step file (``saved.kind == "step"``), was written."""

    def on_file_removed(self, saved: EpochSaved) -> None:
        """A file this run wrote was removed (save_last_n_epochs / save_last_n_steps)."""

    def on_notice(self, message: str) -> None:
        """Something the user should know that changes how the run goes on (it goes on)."""

    def should_stop(self) -> bool:
        return False


class NonFiniteLoss(RuntimeError):
    pass


class TrainingOutOfMemory(RuntimeError):
    """A step did not fit in memory, with every automatic remedy tried; the message says what to change."""

    def __init__(self, message: str, *, weights_intact: bool = True):
        super().__init__(message)
        self.weights_intact = weights_intact  # False: the optimizer step failed half-way


@dataclass(frozen=True)
class DatasetFacts:
    """What the dataset layer knows that goes into the file's ss_* metadata."""

    dataset_dirs: dict[str, dict[str, int]] = field(
        default_factory=dict
    )  # {"10_alice": {"n_repeats": 10, ...}}
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)  # {"10_alice": {"tag": count}}
    bucket_info: dict[str, Any] | None = None
