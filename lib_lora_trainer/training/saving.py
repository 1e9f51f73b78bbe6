"""When a run ends, and which files it writes and removes when: the policy, apart from the loop.

kohya's rules: the run lasts ``epochs`` epochs, or ``max_train_steps`` steps when that is set (the last
epoch is then cut short); an epoch file is written every ``save_every_n_epochs`` epochs and after the
last one, a step file every ``save_every_n_steps`` steps; ``save_last_n_epochs`` keeps the newest N epoch
files and ``save_last_n_steps`` the step files of the last N steps, removing only files this run wrote.
The training state is saved every ``save_state_every_n_steps`` steps, or about every
:data:`AUTO_STATE_INTERVAL_S` seconds of training when that is 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import safetensors

from lib_lora_trainer.config import ConfigError, TrainingConfig
from lib_lora_trainer.network import kohya_format
from lib_lora_trainer.training.state import EpochSaved, LoadedState

AUTO_STATE_INTERVAL_S = 300.0


@dataclass(frozen=True)
class RunLength:
    batches_per_epoch: int
    steps_per_epoch: int  # optimizer steps of a full epoch
    total_steps: int
    epochs: int

    @classmethod
    def of(cls, config: TrainingConfig, batches_per_epoch: int) -> RunLength:
        steps_per_epoch = math.ceil(batches_per_epoch / config.gradient_accumulation_steps)
        if config.max_train_steps > 0:
            total = config.max_train_steps
            return cls(batches_per_epoch, steps_per_epoch, total, math.ceil(total / steps_per_epoch))
        return cls(batches_per_epoch, steps_per_epoch, steps_per_epoch * config.epochs, config.epochs)


class SavePolicy:
    def __init__(self, config: TrainingConfig, length: RunLength):
        self.config, self.length = config, length

    def epoch_file_due(self, epoch: int) -> bool:
        return epoch % self.config.save_every_n_epochs == 0 or epoch == self.length.epochs

    def step_file_due(self, step: int) -> bool:
        every = self.config.save_every_n_steps
        return every > 0 and step % every == 0

    def file_name(self, kind: str, number: int) -> str:
        if kind == "step":
            return kohya_format.step_file_name(self.config.output_name, number)
        return kohya_format.epoch_file_name(self.config.output_name, number)

    def planned_file_names(self, from_step: int = 0, from_epoch: int = 1) -> list[str]:
        """The files a run that goes on from ``from_step`` / ``from_epoch`` would write (checked first)."""
        names = [
            self.file_name("epoch", epoch)
            for epoch in range(from_epoch, self.length.epochs + 1)
            if self.epoch_file_due(epoch)
        ]
        every = self.config.save_every_n_steps
        if every > 0:
            first = (from_step // every + 1) * every
            names += [
                self.file_name("step", step) for step in range(first, self.length.total_steps + 1, every)
            ]
        return names

    def refuse_existing(self, output_dir: Path, resumed: LoadedState | None) -> set[str]:
        """Refuse a run that would overwrite a file; returns the names a resumed run may write again
        (its own files, written after its state was saved: the same session id)."""
        from_step, from_epoch = (resumed.run.step, resumed.run.epoch) if resumed else (0, 1)
        own, clashes = set(), []
        for name in self.planned_file_names(from_step, from_epoch):
            path = output_dir / name
            if not path.exists():
                continue
            if resumed is not None and _session_of(path) == str(resumed.run.session_id):
                own.add(name)
            else:
                clashes.append(path)
        if clashes:
            raise ConfigError(
                [
                    f"{clashes[0].name} already exists in {output_dir}; "
                    "choose another output name (nothing is overwritten)"
                ]
            )
        return own

    def to_remove(self, saved: list[EpochSaved]) -> list[EpochSaved]:
        """The files of ``saved`` (this run's, newest last) that the save_last_n_* settings drop."""
        removed = []
        keep_epochs = self.config.save_last_n_epochs
        epochs = [s for s in saved if s.kind == "epoch"]
        if keep_epochs > 0:
            removed += epochs[:-keep_epochs]
        keep_steps = self.config.save_last_n_steps
        steps = [s for s in saved if s.kind == "step"]
        if keep_steps > 0 and steps:
            newest = steps[-1].step
            removed += [s for s in steps if s.step <= newest - keep_steps]
        return removed

    def state_due(self, step: int, seconds_since_last_state: float) -> bool:
        every = self.config.save_state_every_n_steps
        if every > 0:
            return step % every == 0
        return seconds_since_last_state >= AUTO_STATE_INTERVAL_S


def _session_of(path: Path) -> str:
    try:
        with safetensors.safe_open(str(path), framework="pt") as reader:
            return (reader.metadata() or {}).get("ss_session_id", "")
    except Exception:  # not ours, or unreadable: never overwritten
        return ""
