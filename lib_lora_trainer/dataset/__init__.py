"""From a folder of photos to training batches: scan, report, crop, caption editing, batch source.

Typical use::

    dataset = scan_dataset(config)                 # never raises for bad files; see dataset.problems
    report = build_report(dataset, config)         # report.text(), report.to_json(), report.kohya_metadata()
    source = build_batch_source(config, dataset, vae_id=vae_hash, cache_dir=cache_folder)
    source.prepare(encode)                         # then source.epoch(i, rng) in the training loop
"""

from lib_lora_trainer.dataset.base import BatchSource, InMemoryBatchSource, TrainingBatch
from lib_lora_trainer.dataset.buckets import BucketChoice, Bucketer, make_bucket_resolutions
from lib_lora_trainer.dataset.caption_editor import (
    CaptionedImage,
    CaptionEditError,
    CaptionEditor,
    EditResult,
)
from lib_lora_trainer.dataset.crop import FaceBox, FaceFinder, HaarFaceFinder, crop_to_bucket, preview_crop
from lib_lora_trainer.dataset.images import ImageLoadError, load_image, probe_image
from lib_lora_trainer.dataset.plan import EpochPlan, plan_epoch
from lib_lora_trainer.dataset.report import DatasetReport, DatasetWarning, build_report
from lib_lora_trainer.dataset.scan import FileProblem, ImageRecord, ScannedDataset, Subset, scan_dataset
from lib_lora_trainer.dataset.source import BucketedBatchSource, DatasetError, build_batch_source

__all__ = [
    "BatchSource",
    "BucketChoice",
    "BucketedBatchSource",
    "Bucketer",
    "CaptionEditError",
    "CaptionEditor",
    "CaptionedImage",
    "DatasetError",
    "DatasetReport",
    "DatasetWarning",
    "EditResult",
    "EpochPlan",
    "FaceBox",
    "FaceFinder",
    "FileProblem",
    "HaarFaceFinder",
    "ImageLoadError",
    "ImageRecord",
    "InMemoryBatchSource",
    "ScannedDataset",
    "Subset",
    "TrainingBatch",
    "build_batch_source",
    "build_report",
    "crop_to_bucket",
    "load_image",
    "make_bucket_resolutions",
    "plan_epoch",
    "preview_crop",
    "probe_image",
    "scan_dataset",
]
