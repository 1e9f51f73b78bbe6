"""The headless entry: one training from a config, on a host, from the dataset folder to epoch files.

The tab calls :func:`run_training`; so do the tests. ``python -m lib_lora_trainer.training.run
config.json`` runs it outside any WebUI on a randomly initialised model (to try settings and
datasets, or measure speed), since no weights can be loaded without a WebUI here.
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
from lib_lora_trainer.model.host import TrainingHost
from lib_lora_trainer.training.loop import DatasetFacts, TrainingCallbacks, TrainingResult, Validation, train

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
    validation: Validation | None = None,
) -> TrainingResult:
    """Scan, plan and train. Every check runs before the host's model is touched."""
    ensure_valid(config)
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
        validation=validation,
    )


class _PrintProgress(TrainingCallbacks):
    def on_step(self, progress) -> None:
        for step, loss in progress.new_losses:
            print(f"step {step}/{progress.total_steps} epoch {progress.epoch} loss {loss:.4f}", flush=True)

    def on_epoch_saved(self, saved) -> None:
        print(f"saved {saved.path} (epoch {saved.epoch}, mean loss {saved.mean_loss:.4f})", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="a JSON file of TrainingConfig fields")
    parser.add_argument("--model", choices=("tiny", "sd15"), default="tiny", help="random model size")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from lib_lora_trainer.model.standalone import build_random_host

    try:
        config = TrainingConfig.from_json_file(args.config)
        host = build_random_host(args.model, device=args.device)
        result = run_training(host, config, _PrintProgress())
    except (ConfigError, DatasetError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({"status": result.status, "message": result.message}))
    return 0 if result.status == "completed" else 1


if __name__ == "__main__":
    sys.exit(main())
