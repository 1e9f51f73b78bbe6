"""The headless entry: one training from a config, on a host, from the dataset folder to epoch files.

The tab calls :func:`run_training`; so do the tests. ``python -m lib_lora_trainer.training.run
config.json`` runs it outside any WebUI on a randomly initialised model (to try settings and
datasets, or measure speed), since no weights can be loaded without a WebUI here. ``--resume STATE``
goes on from a training state (a ``.lctstate`` file, or the run's ``.lora_trainer_state/<name>``
folder) at its exact step.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import dataclass
from pathlib import Path

from lib_lora_trainer.config import ConfigError, TrainingConfig, ensure_valid
from lib_lora_trainer.dataset.crop import FaceFinder
from lib_lora_trainer.dataset.report import DatasetReport, build_report
from lib_lora_trainer.dataset.scan import scan_dataset
from lib_lora_trainer.dataset.source import DatasetError, build_batch_source
from lib_lora_trainer.files import remove_stale_temporaries
from lib_lora_trainer.model.host import HostRefused, TrainingHost
from lib_lora_trainer.training.loop import (
    DatasetFacts,
    TrainingCallbacks,
    TrainingOutOfMemory,
    TrainingResult,
    Validation,
    train,
)
from lib_lora_trainer.training.memory import is_out_of_memory
from lib_lora_trainer.training.state import StateError

log = logging.getLogger(__name__)


@dataclass
class PreparedDataset:
    report: DatasetReport
    image_count: int


def prepare_dataset(config: TrainingConfig) -> tuple[PreparedDataset, object]:
    """Scan the dataset folders; refuse (DatasetError) when nothing can be trained on."""
    dataset = scan_dataset(config)
    report = build_report(dataset, config)
    if not report.usable:
        raise DatasetError(report.errors or ["the dataset has no usable training images"])
    images = sum(len(subset.images) for subset in dataset.train_subsets)
    return PreparedDataset(report, images), dataset


def run_training(
    host: TrainingHost,
    config: TrainingConfig,
    callbacks: TrainingCallbacks | None = None,
    *,
    face_finder: FaceFinder | None = None,
    vae_id: str = "",
    cache_dir: str | Path | None = None,
    resume_from: str | Path | None = None,
    allow_mismatch: bool = False,
    validation: Validation | None = None,
) -> TrainingResult:
    """Scan, plan and train (or go on from a training state). Every check runs before the host's
    model is touched."""
    ensure_valid(config)
    if config.output_dir:
        remove_stale_temporaries(config.output_dir)  # what a killed save of an earlier run left
    prepared, dataset = prepare_dataset(config)
    for warning in prepared.report.warnings:
        log.warning("dataset: %s", warning.message)
    source = build_batch_source(
        config,
        dataset,
        vae_id=vae_id or host.base_model_info().vae_identity(),
        cache_dir=cache_dir,
        face_finder=face_finder,
    )
    report = prepared.report
    facts = DatasetFacts(
        dataset_dirs=report.ss_dataset_dirs,
        reg_dataset_dirs=report.ss_reg_dataset_dirs,
        tag_frequency=report.ss_tag_frequency,
        bucket_info=report.ss_bucket_info,
    )
    return train(
        host,
        config,
        source,
        callbacks,
        dataset_facts=facts,
        image_count=prepared.image_count,
        resume_from=resume_from,
        allow_mismatch=allow_mismatch,
        validation=validation,
    )


class _PrintProgress(TrainingCallbacks):
    def on_step(self, progress) -> None:
        for step, loss in progress.new_losses:
            print(f"step {step}/{progress.total_steps} epoch {progress.epoch} loss {loss:.4f}", flush=True)

    def on_epoch_saved(self, saved) -> None:
        validation = "" if saved.validation_loss is None else f", validation loss {saved.validation_loss:.4f}"
        print(
            f"saved {saved.path} (epoch {saved.epoch}, mean loss {saved.mean_loss:.4f}{validation})",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a JSON file of TrainingConfig fields")
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny", help="random model size")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--resume", metavar="STATE", help="a training state file, or a run's state folder")
    parser.add_argument(
        "--allow-mismatch",
        action="store_true",
        help="resume even when the dataset, checkpoint or settings changed (each difference is named)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # the entry point composes what the tab's job composes: the validation loss the settings ask for
    from lib_lora_trainer.evaluation.validation import validation_for
    from lib_lora_trainer.model.standalone import build_random_host

    try:
        config = TrainingConfig.from_json_file(args.config)
        host = build_random_host(args.model, device=args.device)
        result = run_training(
            host,
            config,
            _PrintProgress(),
            resume_from=args.resume,
            allow_mismatch=args.allow_mismatch,
            validation=validation_for(config),
        )
    except (Exception, KeyboardInterrupt) as error:  # every failure ends as one message, never a traceback
        return report_failure(error)
    print(json.dumps({"status": result.status, "message": result.message}))
    return 0 if result.status == "completed" else 1


def report_failure(error: BaseException) -> int:
    """Print what went wrong as one message (what is wrong, what to do) and return the exit code:
    2 for bad settings, files or data, 1 for a failure while training, 130 when interrupted."""
    code, message = _describe(error)
    log.debug("headless run failed", exc_info=error)  # the traceback, for --log-level debug readers
    print(f"error: {message}", file=sys.stderr)
    return code


def _describe(error: BaseException) -> tuple[int, str]:
    if isinstance(error, KeyboardInterrupt):
        return 130, "interrupted; the epochs saved so far are kept"
    if isinstance(error, (ConfigError, DatasetError, StateError)):
        return 2, str(error)
    if isinstance(error, HostRefused):
        return 2, f"this model cannot be trained here: {error}"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        reason = error.strerror or str(error)
        return 2, f"{where}{reason}; check the path, its permissions and the free disk space"
    if isinstance(error, TrainingOutOfMemory):
        return 1, str(error)  # what to change, and what was kept
    if isinstance(error, MemoryError) or is_out_of_memory(error):
        return 1, "out of memory; lower the batch size or the resolution"
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    if isinstance(error, ValueError):
        return 2, f"{first_line}; check the settings and the --device/--model options"
    if isinstance(error, (RuntimeError, AssertionError)) and _is_device_error(first_line):
        return (
            2,
            f"the device cannot be used ({first_line}); choose one this torch supports, like --device cpu",
        )
    kind = type(error).__name__
    return 1, f"training failed ({kind}: {first_line}); please report this with the log above"


def _is_device_error(text: str) -> bool:
    lowered = text.lower()
    return any(word in lowered for word in ("device", "cuda", "mps", "not compiled with"))


if __name__ == "__main__":
    sys.exit(main())
