"""Where a run's epochs live in the WebUI's Lora folder, and the card files written beside each one.

Layout: ``<lora root>/<subfolder from settings>/<name>-000001.safetensors`` (the engine writes the
model file itself, at :meth:`RunOutputs.model_path`), then per epoch :meth:`EpochRegistry.register_epoch`
adds ``<stem>.json`` (the user metadata A1111's card editor reads and writes) and
``<stem>.preview.png`` (the card's preview) and tells the host through ``on_registered``.

A1111 keys LoRAs by file stem without subfolder, across every Lora root, so a run name is refused
when any of its epoch stems already exists anywhere under those roots; :meth:`EpochRegistry.plan_run`
then offers the next free numbered name (``alice_run2``). Nothing existing is ever overwritten.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from lib_lora_trainer.config import TrainingConfig, output_name_problem
from lib_lora_trainer.files import atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from lib_lora_trainer.network.kohya_format import epoch_file_name
from lib_lora_trainer.paths import safe_relative_subfolder
from lib_lora_trainer.training.state import STATE_FOLDER_NAME, StateFolder

logger = logging.getLogger(__name__)

EPOCH_DIGITS = 6
MODEL_EXTENSIONS = (".safetensors", ".pt", ".ckpt")  # what A1111's Lora scan lists
RUN_CONFIG_SUFFIX = ".lora_trainer_config.json"
SD_VERSION = "SD1"

OnRegistered = Callable[[str, Path], None]

# What files.atomic_write_bytes leaves when the process is killed mid-write: ".<target>.<random>.tmp".


class OutputNameError(ValueError):
    """The run name cannot be used; ``suggestion`` is a free name when one applies."""

    def __init__(self, message: str, suggestion: str | None = None):
        super().__init__(message)
        self.suggestion = suggestion


class RegistrationError(RuntimeError):
    """An epoch's card files could not be written; nothing partial was left behind."""


def epoch_stem(name: str, epoch: int) -> str:
    """``alice`` + 3 -> ``alice-000003`` (kohya's epoch naming, used for every epoch incl. the last)."""
    return Path(epoch_file_name(name, epoch)).stem


@dataclass(frozen=True)
class RunOutputs:
    """The files of one run: ``folder/name-NNNNNN.*``."""

    name: str
    folder: Path

    def stem(self, epoch: int) -> str:
        return epoch_stem(self.name, epoch)

    def model_path(self, epoch: int) -> Path:
        return self.folder / epoch_file_name(self.name, epoch)

    def metadata_path(self, epoch: int) -> Path:
        return self.folder / f"{self.stem(epoch)}.json"

    def preview_path(self, epoch: int) -> Path:
        return self.folder / f"{self.stem(epoch)}.preview.png"

    @property
    def config_path(self) -> Path:
        """The effective training config, saved beside the epochs (no LoRA shares this stem)."""
        return self.folder / f"{self.name}{RUN_CONFIG_SUFFIX}"

    def saved_epochs(self) -> list[int]:
        """Epoch numbers whose model file exists, in order."""
        pattern = re.compile(rf"^{re.escape(self.name)}-(\d{{{EPOCH_DIGITS}}})\.safetensors$")
        if not self.folder.is_dir():
            return []
        found = (pattern.match(entry.name) for entry in self.folder.iterdir())
        return sorted(int(match.group(1)) for match in found if match)

    def saved_stems(self) -> list[str]:
        return [self.stem(epoch) for epoch in self.saved_epochs()]


@dataclass(frozen=True)
class ResumableRun:
    """A run that did not finish ("training" means its process ended without saying so: a crash)."""

    name: str
    state_folder: Path
    latest_state: Path
    status: str
    message: str
    step: int
    total_steps: int
    updated_at: float

    def describe(self) -> str:
        how = (
            "did not finish (the WebUI stopped during training)" if self.status == "training" else self.status
        )
        return f"{self.name}: step {self.step} of {self.total_steps}, {how.replace('_', ' ')}"


@dataclass(frozen=True)
class EpochCard:
    """What the Lora card shows for one epoch."""

    epoch: int
    steps: int
    loss: float | None
    trigger_word: str
    total_epochs: int | None = None
    preferred_weight: float = 1.0
    negative_text: str = ""
    description: str = ""
    stem: str = ""  # the file's stem when it is not the epoch's (a step file: name-step00000500)


def card_metadata(run_name: str, card: EpochCard) -> dict[str, Any]:
    """The user-metadata JSON A1111's card editor uses (same keys it writes)."""
    epoch_text = f"epoch {card.epoch}" + (f" of {card.total_epochs}" if card.total_epochs else "")
    loss_text = "loss n/a" if card.loss is None or not math.isfinite(card.loss) else f"loss {card.loss:.4f}"
    description = card.description or f"Character LoRA '{run_name}', {epoch_text}"
    return {
        "description": description,
        "sd version": SD_VERSION,
        "activation text": card.trigger_word,
        "preferred weight": card.preferred_weight,
        "negative text": card.negative_text,
        "notes": f"{epoch_text}, {card.steps} steps, {loss_text}",
    }


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG, keeping A1111's ``parameters`` infotext so the preview stays searchable."""
    info = PngImagePlugin.PngInfo()
    parameters = image.info.get("parameters") if isinstance(image.info, dict) else None
    if isinstance(parameters, str):
        info.add_text("parameters", parameters)
    buffer = io.BytesIO()
    picture = image if image.mode in ("RGB", "RGBA", "L") else image.convert("RGB")
    picture.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


class EpochRegistry:
    """Plans run names in the Lora folder(s) and registers each finished epoch."""

    def __init__(
        self,
        lora_roots: Sequence[str | Path],
        subfolder: str = "",
        on_registered: OnRegistered | None = None,
    ):
        roots = [Path(root) for root in lora_roots if str(root).strip()]
        if not roots:
            raise ValueError("no Lora folder is configured")
        self.lora_roots = roots
        self.output_folder = roots[0] / safe_relative_subfolder(subfolder)
        self.on_registered = on_registered

    # --- names -------------------------------------------------------------------------------
    def _walk_files(self) -> Iterator[Path]:
        seen: set[str] = set()
        for root in self.lora_roots:
            if not root.is_dir():
                continue
            for folder, _dirs, files in os.walk(root, followlinks=True):
                real = os.path.realpath(folder)
                if real in seen:  # a symlink loop, or two roots sharing a folder
                    continue
                seen.add(real)
                for file_name in files:
                    yield Path(folder) / file_name

    @staticmethod
    def _epoch_file_pattern(name: str) -> re.Pattern[str]:
        # Case-insensitive: Windows and macOS file systems treat ``Alice`` and ``alice`` as one name.
        # epoch files name-000001.*, and step files name-step00000500.*
        return re.compile(rf"^{re.escape(name)}-(\d{{{EPOCH_DIGITS}}}|step\d{{8}})(\..*)?$", re.IGNORECASE)

    def existing_epoch_files(self, name: str) -> list[Path]:
        """Every file under the Lora roots whose name starts with an epoch stem of ``name``."""
        pattern = self._epoch_file_pattern(name)
        return sorted(path for path in self._walk_files() if pattern.match(path.name))

    def is_name_free(self, name: str) -> bool:
        return not self.existing_epoch_files(name) and not self.run_for(name).config_path.exists()

    def suggest_free_name(self, name: str) -> str:
        """``alice`` -> ``alice_run2`` (or the next free number); ``alice_run2`` -> ``alice_run3``."""
        match = re.match(r"^(.*)_run(\d+)$", name)
        base, number = (match.group(1), int(match.group(2)) + 1) if match else (name, 2)
        file_names = [path.name for path in self._walk_files()]

        def taken(candidate: str) -> bool:
            pattern = self._epoch_file_pattern(candidate)
            in_use = any(pattern.match(file_name) for file_name in file_names)
            return in_use or self.run_for(candidate).config_path.exists()

        while taken(f"{base}_run{number}"):
            number += 1
        return f"{base}_run{number}"

    def run_for(self, name: str) -> RunOutputs:
        return RunOutputs(name=name, folder=self.output_folder)

    def plan_run(self, name: str) -> RunOutputs:
        """The outputs of a new run named ``name``; refuses a bad or already used name."""
        problem = output_name_problem(name)
        if problem:
            logger.warning(problem)
            raise OutputNameError(problem)
        clashes = self.existing_epoch_files(name)
        if clashes or self.run_for(name).config_path.exists():
            suggestion = self.suggest_free_name(name)
            where = str(clashes[0]) if clashes else str(self.run_for(name).config_path)
            message = (
                f"a run named {name!r} already has files in the Lora folder ({where}); A1111 lists LoRAs "
                f"by file name, so they would clash. Choose another name, e.g. {suggestion!r}."
            )
            logger.warning(message)
            raise OutputNameError(message, suggestion=suggestion)
        return self.run_for(name)

    # --- per run and per epoch ---------------------------------------------------------------
    def save_run_config(self, run: RunOutputs, config: TrainingConfig) -> Path:
        """Write the effective config beside the epochs (refuses to replace an existing one)."""
        target = run.config_path
        if target.exists():
            raise RegistrationError(f"{target} already exists; not overwriting it")
        text = json.dumps(config.to_dict(), indent=2, sort_keys=True) + "\n"
        return atomic_write_text(target, text)

    def register_epoch(self, run: RunOutputs, card: EpochCard, preview: Image.Image | None = None) -> Path:
        """Write ``<stem>.json`` and ``<stem>.preview.png`` beside the epoch's model, then announce it.

        The model file must already exist. Either both card files are written or neither is.
        """
        stem = card.stem or run.stem(card.epoch)
        model = run.folder / f"{stem}.safetensors"
        if not model.is_file():
            raise RegistrationError(f"epoch {card.epoch} has no model file at {model}")
        targets = [run.folder / f"{stem}.json"] + (
            [run.folder / f"{stem}.preview.png"] if preview is not None else []
        )
        existing = [path for path in targets if path.exists()]
        if existing:
            raise RegistrationError(f"{existing[0]} already exists; not overwriting it")

        payloads = [json.dumps(card_metadata(run.name, card), indent=4, ensure_ascii=False).encode("utf-8")]
        try:
            if preview is not None:
                payloads.append(png_bytes(preview))
        except (OSError, ValueError) as error:
            raise RegistrationError(f"could not encode the preview of epoch {card.epoch}: {error}") from error
        written: list[Path] = []
        try:
            for target, payload in zip(targets, payloads, strict=True):
                atomic_write_bytes(target, payload)
                written.append(target)
        except BaseException as error:
            for path in written:
                path.unlink(missing_ok=True)
            logger.error("registering epoch %s of %s failed: %s", card.epoch, run.name, error)
            if isinstance(error, OSError):
                raise RegistrationError(f"could not write the card files of {model.stem}: {error}") from error
            raise
        self._announce(stem, model)
        return model

    @staticmethod
    def remove_card_files(run: RunOutputs, stem: str) -> None:
        """The card files of a model file the run removed (save_last_n_epochs / save_last_n_steps)."""
        for suffix in (".json", ".preview.png"):
            (run.folder / f"{stem}{suffix}").unlink(missing_ok=True)

    # --- after a crash -----------------------------------------------------------------------------
    def resumable_runs(self) -> list[ResumableRun]:
        """Runs in the output folder that did not finish and have a training state, newest first."""
        root = self.output_folder / STATE_FOLDER_NAME
        if not root.is_dir():
            return []
        runs = []
        for folder in root.iterdir():
            states = StateFolder(folder)
            paths = states.state_paths() if folder.is_dir() else []
            status = states.read_status() if paths else {}
            if not paths or status.get("status") == "completed":
                continue
            runs.append(
                ResumableRun(
                    name=folder.name,
                    state_folder=folder,
                    latest_state=paths[-1],
                    status=str(status.get("status", "training")),
                    message=str(status.get("message", "")),
                    step=int(status.get("step", 0) or 0),
                    total_steps=int(status.get("total_steps", 0) or 0),
                    updated_at=float(status.get("updated_at", paths[-1].stat().st_mtime) or 0.0),
                )
            )
        return sorted(runs, key=lambda run: run.updated_at, reverse=True)

    def remove_stale_temporaries(self) -> list[Path]:
        """Delete the temporary files a killed write left in the output and state folders (only ours:
        :func:`lib_lora_trainer.files.remove_stale_temporaries` knows their names)."""
        folders = [self.output_folder, *sorted((self.output_folder / STATE_FOLDER_NAME).glob("*"))]
        removed = [path for folder in folders if folder.is_dir() for path in remove_stale_temporaries(folder)]
        for path in removed:
            logger.info("removed %s, left by an interrupted save", path)
        return removed

    def _announce(self, stem: str, model: Path) -> None:
        # The files are complete at this point; a failing refresh must not undo them (a prompt's
        # <lora:stem:w> still finds the file, A1111 looks unknown names up on use).
        if self.on_registered is None:
            return
        try:
            self.on_registered(stem, model)
        except Exception:
            logger.exception("telling the WebUI about %s failed; use the Lora tab's refresh button", stem)
