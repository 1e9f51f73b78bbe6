"""A run's state: what the loop has done so far, and the file that lets it go on from there exactly.

:class:`RunState` holds the counters (step, epoch, position inside the epoch), the losses, the files the
run wrote and every random number generator it draws from. :meth:`RunState.save` writes it, together
with the adapter weights, optimizer, scheduler and loss-scaler state, the config and the
:class:`RunFingerprint` it belongs to, into the run's state folder; :func:`load_state` reads it back.

The state folder is ``<output folder>/.lora_trainer_state/<run name>/``: A1111's Lora list
(``modules/util.py`` ``walk_files``) keeps only ``.pt``/``.ckpt``/``.safetensors`` names and, with the
``list_hidden_files`` option off, skips folders starting with '.', so ``*.lctstate`` files in a hidden
folder are never listed as LoRAs. Every file is written atomically (a temporary name in the same folder,
fsync, rename): a kill leaves the previous state, never a partial one under a state name.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from lib_lora_trainer.config import ConfigError, TrainingConfig
from lib_lora_trainer.files import atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

STATE_FOLDER_NAME = ".lora_trainer_state"
STATE_SUFFIX = ".lctstate"  # not a suffix A1111's Lora list shows
STATUS_FILE_NAME = "run.json"
STATE_FORMAT = 1
_STATE_NAME = re.compile(r"^state-step(\d{8})" + re.escape(STATE_SUFFIX) + "$")

# Settings that change which files are written or when, not what is computed: they may differ on resume.
SETTINGS_FREE_ON_RESUME = frozenset(
    {
        "output_dir",
        "training_comment",
        "gradient_checkpointing",  # the same maths, only memory and speed differ
        "save_every_n_epochs",
        "save_every_n_steps",
        "save_last_n_epochs",
        "save_last_n_steps",
        "save_state_every_n_steps",
        "save_last_n_states",
        "sample_every_n_epochs",
        "sample_prompts",
        "sample_negative_prompt",
        "sample_steps",
        "sample_sampler",
        "sample_cfg_scale",
        "sample_seed",
        "sample_width",
        "sample_height",
    }
)


class StateError(ValueError):
    """A training state cannot be used; the message says why and what to do."""


class ResumeMismatch(ConfigError):
    """The dataset, checkpoint or settings differ from the saved state's; ``messages`` names each."""


@dataclass(frozen=True)
class EpochSaved:
    """One file the run wrote: an epoch file, or a step file (``kind == "step"``)."""

    epoch: int
    step: int
    mean_loss: float
    path: Path
    kind: str = "epoch"
    validation_loss: float | None = None  # evaluation/validation.py, at the epoch's end


@dataclass(frozen=True)
class RunFingerprint:
    """What a state belongs to: the dataset (one line per image), the checkpoint, the settings."""

    dataset: tuple[str, ...]
    checkpoint: dict[str, str]
    settings: dict[str, Any]

    def differences(self, current: RunFingerprint) -> list[str]:
        """One sentence per difference between this (saved) fingerprint and ``current``."""
        problems = []
        saved_images, now_images = _by_image(self.dataset), _by_image(current.dataset)
        added = sorted(set(now_images) - set(saved_images))
        removed = sorted(set(saved_images) - set(now_images))
        changed = sorted(k for k in set(saved_images) & set(now_images) if saved_images[k] != now_images[k])
        if added or removed or changed:
            parts = [
                f"{label} {_names(items)}"
                for label, items in (("added", added), ("removed", removed), ("changed", changed))
                if items
            ]
            problems.append("the dataset changed since the state was saved: " + "; ".join(parts))
        if not _same_checkpoint(self.checkpoint, current.checkpoint):
            problems.append(
                f"the checkpoint changed: the state was trained on {_checkpoint(self.checkpoint)}, "
                f"the WebUI has {_checkpoint(current.checkpoint)} loaded"
            )
        keys = sorted((set(self.settings) | set(current.settings)) - SETTINGS_FREE_ON_RESUME)
        changed_settings = [
            f"{key} {self.settings.get(key)!r} -> {current.settings.get(key)!r}"
            for key in keys
            if self.settings.get(key) != current.settings.get(key)
        ]
        if changed_settings:
            problems.append("settings changed: " + ", ".join(changed_settings))
        return problems


def _by_image(lines: tuple[str, ...]) -> dict[str, str]:
    return {line.split("|", 1)[0]: line for line in lines}


def _names(items: list[str], shown: int = 3) -> str:
    names = ", ".join(Path(item).name for item in items[:shown])
    return names + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _checkpoint(info: dict[str, str]) -> str:
    hash_text = info.get("sha256") or info.get("hash") or "no hash"
    return f"{info.get('name') or 'an unnamed model'} [{hash_text[:10]}]"


def _same_checkpoint(saved: dict[str, str], current: dict[str, str]) -> bool:
    """Name and VAE equal, and each hash equal where both are known (A1111 computes sha256 lazily)."""
    if (saved.get("name"), saved.get("vae")) != (current.get("name"), current.get("vae")):
        return False
    return all(
        saved.get(key) == current.get(key)
        for key in ("hash", "sha256")
        if saved.get(key) and current.get(key)
    )


def fingerprint_for(config: TrainingConfig, dataset_lines: list[str], base_model: Any) -> RunFingerprint:
    """``base_model`` is the host's :class:`~lib_lora_trainer.model.host.BaseModelInfo`."""
    checkpoint = {
        "name": base_model.name,
        "hash": base_model.hash_legacy,
        "sha256": base_model.hash_sha256,
        "vae": base_model.vae_name,
    }
    return RunFingerprint(tuple(dataset_lines), checkpoint, config.to_dict())


@dataclass
class RunState:
    """Everything the loop has done so far; the loop owns one and changes only this."""

    seed: int
    session_id: int
    started_at: float
    step: int = 0  # optimizer steps done
    epoch: int = 1  # the epoch in progress (1-based)
    batches_done: int = 0  # batches of ``epoch`` trained up to the last optimizer step
    losses: list[float] = field(default_factory=list)  # one per step, read back so far
    epoch_losses: list[float] = field(default_factory=list)  # the losses of ``epoch`` read back so far
    epoch_mean_losses: dict[int, float] = field(default_factory=dict)
    saved: list[EpochSaved] = field(default_factory=list)  # files this run wrote that still exist
    checkpointing_on: bool = False
    # The data-order generator (shuffling, flips, caption dropout, colour augmentation all draw from it):
    # its state at the start of ``epoch``, so a resumed epoch replays its first batches exactly.
    epoch_start_data_rng: tuple | None = None
    # torch's generators as they were after the last optimizer step (noise, timesteps, VAE sampling).
    torch_rng: torch.Tensor | None = None
    cuda_rng: list[torch.Tensor] | None = None

    @classmethod
    def new(cls, seed: int, session_id: int) -> RunState:
        return cls(seed=seed, session_id=session_id, started_at=time.time())

    def data_rng(self) -> random.Random:
        """The data-order generator for the start of ``epoch``."""
        rng = random.Random(self.seed)
        if self.epoch_start_data_rng is not None:
            rng.setstate(self.epoch_start_data_rng)
        return rng

    def begin_epoch(self, rng: random.Random) -> None:
        if self.batches_done == 0:
            self.epoch_start_data_rng = rng.getstate()

    def step_done(self, batches_done: int, device: torch.device) -> None:
        self.step += 1
        self.batches_done = batches_done
        self.torch_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state_all() if device.type == "cuda" else None

    def epoch_done(self, mean_loss: float, rng: random.Random) -> None:
        self.epoch_mean_losses[self.epoch] = mean_loss
        self.epoch += 1
        self.batches_done = 0
        self.epoch_losses = []
        self.epoch_start_data_rng = rng.getstate()

    def restore_torch_rngs(self) -> None:
        """Put torch's generators back to where they were after the last step (call after skipping)."""
        if self.torch_rng is not None:
            torch.set_rng_state(self.torch_rng)
        if self.cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(self.cuda_rng)

    # --- the file -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["saved"] = [{**asdict(s), "path": str(s.path)} for s in self.saved]
        values["epoch_mean_losses"] = {str(k): v for k, v in self.epoch_mean_losses.items()}
        if self.epoch_start_data_rng is not None:  # its 32-bit words as a tensor: no big ints in the pickle
            version, internal, gauss = self.epoch_start_data_rng
            values["epoch_start_data_rng"] = [version, torch.tensor(internal, dtype=torch.int64), gauss]
        return values

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunState:
        values = dict(values)
        values["saved"] = [EpochSaved(**{**s, "path": Path(s["path"])}) for s in values["saved"]]
        values["epoch_mean_losses"] = {int(k): v for k, v in values["epoch_mean_losses"].items()}
        if values.get("epoch_start_data_rng") is not None:
            version, internal, gauss = values["epoch_start_data_rng"]
            values["epoch_start_data_rng"] = (version, tuple(int(word) for word in internal.tolist()), gauss)
        return cls(**values)

    def save(
        self,
        folder: StateFolder,
        trainables: dict[str, Any],
        config: TrainingConfig,
        fingerprint: RunFingerprint,
        total_steps: int,
    ) -> Path:
        """Write this state with ``trainables`` (adapters, optimizer, scheduler, scaler state dicts)."""
        payload = {
            "format": STATE_FORMAT,
            "run": self.to_dict(),
            "total_steps": total_steps,
            "config": config.to_dict(),
            "fingerprint": asdict(fingerprint),
            **trainables,
        }
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        return folder.write_state(self.step, buffer.getvalue())


@dataclass(frozen=True)
class LoadedState:
    path: Path
    run: RunState
    config: TrainingConfig
    fingerprint: RunFingerprint
    total_steps: int
    trainables: dict[str, Any]


def load_state(path: str | Path) -> LoadedState:
    """Read a state file, or the newest readable one in a state folder."""
    source = Path(path)
    if source.is_dir():
        return StateFolder(source).latest()
    try:
        payload = torch.load(source, map_location="cpu", weights_only=True)
        if payload.get("format") != STATE_FORMAT:
            raise StateError(f"{source.name} was written by another version of the trainer")
        trainables = {k: payload[k] for k in ("adapters", "optimizer", "scheduler", "scaler")}
        return LoadedState(
            path=source,
            run=RunState.from_dict(payload["run"]),
            config=TrainingConfig.from_dict(payload["config"]),
            fingerprint=RunFingerprint(
                dataset=tuple(payload["fingerprint"]["dataset"]),
                checkpoint=payload["fingerprint"]["checkpoint"],
                settings=payload["fingerprint"]["settings"],
            ),
            total_steps=int(payload["total_steps"]),
            trainables=trainables,
        )
    except StateError:
        raise
    except FileNotFoundError as error:
        raise StateError(f"the training state {source} does not exist") from error
    except Exception as error:  # truncated, foreign or damaged: never half-read
        raise StateError(f"the training state {source.name} cannot be read ({error})") from error


class StateFolder:
    """The state folder of one run: its ``state-stepNNNNNNNN.lctstate`` files and ``run.json``."""

    def __init__(self, folder: str | Path, keep: int = 2):
        self.folder = Path(folder)
        self.keep = max(1, keep)

    @classmethod
    def for_run(cls, output_dir: str | Path, run_name: str, keep: int = 2) -> StateFolder:
        return cls(Path(output_dir) / STATE_FOLDER_NAME / run_name, keep)

    def state_paths(self) -> list[Path]:
        """Finished state files, oldest first (temporary files of an interrupted write never match)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _STATE_NAME.match(p.name) and p.is_file())

    def write_state(self, step: int, data: bytes) -> Path:
        target = self.folder / f"state-step{step:08d}{STATE_SUFFIX}"
        atomic_write_bytes(target, data)
        for old in self.state_paths()[: -self.keep]:
            old.unlink(missing_ok=True)
        return target

    def latest(self) -> LoadedState:
        """The newest state that reads back completely; damaged ones are skipped with a warning."""
        problems = []
        for path in reversed(self.state_paths()):
            try:
                return load_state(path)
            except StateError as error:
                log.warning("%s; trying the one before", error)
                problems.append(str(error))
        raise StateError(
            f"no usable training state in {self.folder}" + (f" ({problems[0]})" if problems else "")
        )

    def remove(self) -> None:
        """A finished run needs no state: remove its files, the folder, and the parent if empty."""
        for path in [*self.state_paths(), self.folder / STATUS_FILE_NAME]:
            path.unlink(missing_ok=True)
        for folder in (self.folder, self.folder.parent):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty

    # --- status: lets the next start see a run that did not finish ----------------------------------
    def write_status(self, status: str, message: str, **progress: Any) -> None:
        latest = self.state_paths()
        record = {
            "status": status,
            "message": message,
            "updated_at": time.time(),
            "latest_state": latest[-1].name if latest else "",
            **progress,
        }
        atomic_write_text(self.folder / STATUS_FILE_NAME, json.dumps(record, indent=2) + "\n")

    def read_status(self) -> dict[str, Any]:
        try:
            record = json.loads((self.folder / STATUS_FILE_NAME).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}


def check_resume(
    resume_from: str | Path, current: RunFingerprint, allow_mismatch: bool
) -> tuple[LoadedState, list[str]]:
    """The state to go on from, and what differs from it (refused unless ``allow_mismatch``)."""
    loaded = load_state(resume_from)
    differences = loaded.fingerprint.differences(current)
    if differences and not allow_mismatch:
        raise ResumeMismatch(
            [f"{d}; resume anyway to go on with it, or start a new run" for d in differences]
        )
    return loaded, differences


def trainables_of(adapters: Any, optimizer: Any, scheduler: Any, scaler: Any) -> dict[str, Any]:
    """What the state file keeps of the optimisation: every trainable adapter parameter exactly as it is
    (whatever the network kind; a file's export may reorient or rescale parts) and every state dict."""
    weights = {
        f"{target.component}|{target.module_name}|{part}": parameter.detach().cpu().clone()
        for target, part, parameter in adapters.named_parameters()
    }
    return {
        "adapters": weights,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
    }


def load_trainables(loaded: LoadedState, adapters: Any, optimizer: Any, scheduler: Any, scaler: Any) -> None:
    saved = loaded.trainables
    try:
        parameters = {
            f"{target.component}|{target.module_name}|{part}": parameter
            for target, part, parameter in adapters.named_parameters()
        }
        missing = sorted(set(parameters) ^ set(saved["adapters"]))
        if missing:
            raise ValueError(f"{len(missing)} adapter parameters differ, e.g. {missing[0]}")
        with torch.no_grad():
            for key, parameter in parameters.items():
                parameter.copy_(saved["adapters"][key])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        if scaler is not None and saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
    except (ValueError, KeyError, RuntimeError) as error:
        raise StateError(
            f"the training state {loaded.path.name} does not fit these settings ({error}); "
            "start a new run instead"
        ) from error


class StateKeeper:
    """A run's state folder as the loop uses it: saving a state never fails the run (the previous one
    is kept and the user told), and the status the next start reads."""

    def __init__(
        self,
        folder: StateFolder,
        config: TrainingConfig,
        fingerprint: RunFingerprint,
        total_steps: int,
        epochs: int,
        on_notice: Any,
        last_path: Path | None = None,
    ):
        self.folder, self.config, self.fingerprint = folder, config, fingerprint
        self.total_steps, self.epochs, self.on_notice = total_steps, epochs, on_notice
        self.last_path = last_path
        self.last_saved_at = time.monotonic()

    def save(self, state: RunState, trainables: dict[str, Any]) -> Path | None:
        try:
            path = state.save(self.folder, trainables, self.config, self.fingerprint, self.total_steps)
        except OSError as error:
            notice = (
                f"The training state of step {state.step} could not be saved "
                f"({error.strerror or error}); the previous one is kept."
            )
            log.warning("%s", notice)
            self.on_notice(notice)
            return None
        self.last_saved_at, self.last_path = time.monotonic(), path
        self.status("training", f"state of step {state.step} saved", state)
        log.info("training state of step %d saved to %s", state.step, path)
        return path

    def status(self, status: str, message: str, state: RunState) -> None:
        try:
            self.folder.write_status(
                status,
                message,
                run_name=self.config.output_name,
                step=state.step,
                total_steps=self.total_steps,
                epoch=state.epoch,
                epochs=self.epochs,
            )
        except OSError as error:
            log.warning("could not write the run's status in %s: %s", self.folder.folder, error)
