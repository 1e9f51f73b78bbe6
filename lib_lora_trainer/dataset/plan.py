"""What one epoch contains: every usable image with its bucket, repeats, loss weight and caption.

Both the dataset report (steps arithmetic, ``ss_*`` metadata) and the batch source are built from the
same :class:`EpochPlan`, so the numbers the user reads are the numbers training runs.
Arithmetic as in kohya's sd-scripts: a batch never mixes buckets, so an epoch has, per bucket,
ceil(images-with-repeats / batch size) batches; regularisation images are cycled (one more repeat
each, in order) until they match the number of training images with repeats, and their loss is
weighted by ``prior_loss_weight``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.dataset.buckets import BucketChoice, bucket_info
from lib_lora_trainer.dataset.caption_processing import put_trigger_first
from lib_lora_trainer.dataset.crop import bucketer_for
from lib_lora_trainer.dataset.scan import ImageRecord, ScannedDataset, Subset


@dataclass(frozen=True)
class PlannedImage:
    record: ImageRecord
    subset: Subset
    choice: BucketChoice
    repeats: int  # samples per epoch (for regularisation images: after cycling)
    loss_weight: float
    caption: str  # the training caption before augmentation (trigger word first for training images)

    @property
    def is_reg(self) -> bool:
        return self.subset.is_reg


@dataclass(frozen=True)
class EpochPlan:
    images: tuple[PlannedImage, ...]
    batch_size: int
    gradient_accumulation_steps: int
    epochs: int
    num_train_images: int  # training images x repeats (kohya's ss_num_train_images)
    num_reg_images: int  # regularisation images x their folder's repeats (kohya's ss_num_reg_images)
    enable_bucket: bool

    def bucket_counts(self) -> dict[tuple[int, int], int]:
        """Samples per bucket in one epoch, repeats included, sorted by resolution."""
        counts: dict[tuple[int, int], int] = {}
        for planned in self.images:
            counts[planned.choice.bucket] = counts.get(planned.choice.bucket, 0) + planned.repeats
        return dict(sorted(counts.items()))

    @property
    def samples_per_epoch(self) -> int:
        return sum(planned.repeats for planned in self.images)

    @property
    def reg_samples_per_epoch(self) -> int:
        return sum(planned.repeats for planned in self.images if planned.is_reg)

    @property
    def batches_per_epoch(self) -> int:
        return sum(math.ceil(count / self.batch_size) for count in self.bucket_counts().values())

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch (batches divided by gradient accumulation, rounded up)."""
        return math.ceil(self.batches_per_epoch / self.gradient_accumulation_steps)

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.epochs

    def bucket_info(self) -> dict[str, object] | None:
        return bucket_info([(p.choice, p.repeats) for p in self.images], enabled=self.enable_bucket)


def plan_epoch(dataset: ScannedDataset, config: TrainingConfig) -> EpochPlan:
    bucketer = bucketer_for(config)
    planned: list[PlannedImage] = []
    for subset in dataset.train_subsets:
        for record in subset.images:
            caption = put_trigger_first(record.caption, config.trigger_word)
            choice = bucketer.select(record.width, record.height)
            planned.append(PlannedImage(record, subset, choice, subset.repeats, 1.0, caption))
    num_train = sum(p.repeats for p in planned)
    reg_entries = [(subset, record) for subset in dataset.reg_subsets for record in subset.images]
    num_reg = sum(subset.repeats for subset, _ in reg_entries)
    for (subset, record), repeats in zip(
        reg_entries, cycle_reg_repeats([s.repeats for s, _ in reg_entries], num_train), strict=True
    ):
        if repeats > 0:
            choice = bucketer.select(record.width, record.height)
            caption = put_trigger_first(record.caption, "")
            planned.append(PlannedImage(record, subset, choice, repeats, config.prior_loss_weight, caption))
    return EpochPlan(
        images=tuple(planned),
        batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        epochs=config.epochs,
        num_train_images=num_train,
        num_reg_images=num_reg,
        enable_bucket=config.enable_bucket,
    )


def cycle_reg_repeats(folder_repeats: list[int], num_train_images: int) -> list[int]:
    """Repeats per regularisation image so that they add up to the training images (kohya's rule).

    First pass: images are taken in order with their folder's repeats until the count is reached (the
    rest are unused, 0); later passes add one repeat to each image in turn.
    """
    repeats = [0] * len(folder_repeats)
    if not folder_repeats:
        return repeats
    total = 0
    first_pass = True
    while total < num_train_images:
        for index, folder_repeat in enumerate(folder_repeats):
            added = folder_repeat if first_pass else 1
            if not first_pass and repeats[index] == 0:
                continue  # never registered in the first pass
            repeats[index] += added
            total += added
            if total >= num_train_images:
                break
        first_pass = False
    return repeats
