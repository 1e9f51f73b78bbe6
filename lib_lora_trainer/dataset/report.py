"""The dataset report: what will be trained, how many steps that makes, and what looks wrong.

Shown in the tab before training (``text()``), saved next to the outputs (``to_json()``), and the
source of the dataset fields of the LoRA file's kohya metadata (``kohya_metadata()``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.dataset.caption_processing import count_tags, has_trigger
from lib_lora_trainer.dataset.images import LOW_RESOLUTION_SIDE
from lib_lora_trainer.dataset.plan import EpochPlan, plan_epoch
from lib_lora_trainer.dataset.prompt_syntax import prompt_syntax
from lib_lora_trainer.dataset.scan import ImageRecord, ScannedDataset, Subset
from lib_lora_trainer.dataset.source import latent_cache_warnings, settings_for

MIN_CHARACTER_IMAGES = 15
USUAL_TOTAL_STEPS = (1500, 4000)
TARGET_TOTAL_STEPS = 2500
ELONGATED_RATIO = 2.5
NEAR_DUPLICATE_BITS = 8  # dHash Hamming distance (of 128) at or below which two images look the same
MAX_NAMES_SHOWN = 8
MAX_NOTES_SHOWN = 15
MAX_HELD_OUT_SHOWN = 30  # the user should see which images are not trained on; the JSON lists them all


@dataclass(frozen=True)
class DatasetWarning:
    code: str  # stable identifier, e.g. "near_duplicates"
    message: str
    files: tuple[str, ...] = ()


@dataclass(frozen=True)
class SubsetSummary:
    name: str
    folder: str
    repeats: int
    image_count: int
    samples_per_epoch: int  # for regularisation folders: after cycling to match the training images
    captioned: int  # images with their own caption file
    is_reg: bool


@dataclass
class DatasetReport:
    usable: bool
    errors: list[str]
    subsets: list[SubsetSummary]
    num_train_images: int  # training images x repeats
    num_reg_images: int  # regularisation images x repeats (kohya's count, before cycling)
    reg_samples_per_epoch: int
    batch_size: int
    gradient_accumulation_steps: int
    epochs: int
    batches_per_epoch: int
    steps_per_epoch: int
    total_steps: int
    buckets: list[dict[str, Any]]  # [{"resolution": [w, h], "count": n}], repeats included
    warnings: list[DatasetWarning]
    problems: list[dict[str, str]]  # files left out: {"file", "path", "message"}
    notes: list[str]
    tag_frequency: dict[str, int]  # over all training captions as trained (trigger word included)
    held_out: list[str] = field(default_factory=list)  # "folder/name" of each image the share keeps out
    ss_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    ss_reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    ss_tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    ss_bucket_info: dict[str, Any] | None = None

    def kohya_metadata(self) -> dict[str, str]:
        """The dataset's ``ss_*`` keys, as strings ready for safetensors metadata (as kohya writes them)."""
        return {
            "ss_num_train_images": str(self.num_train_images),
            "ss_num_reg_images": str(self.num_reg_images),
            "ss_num_batches_per_epoch": str(self.batches_per_epoch),
            "ss_dataset_dirs": json.dumps(self.ss_dataset_dirs, ensure_ascii=False),
            "ss_reg_dataset_dirs": json.dumps(self.ss_reg_dataset_dirs, ensure_ascii=False),
            "ss_tag_frequency": json.dumps(self.ss_tag_frequency, ensure_ascii=False),
            "ss_bucket_info": json.dumps(self.ss_bucket_info),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False, indent=2)

    def text(self) -> str:
        return "\n".join(_report_lines(self))


def build_report(dataset: ScannedDataset, config: TrainingConfig) -> DatasetReport:
    plan = plan_epoch(dataset, config)
    return DatasetReport(
        usable=dataset.usable,
        errors=list(dataset.errors),
        subsets=_subset_summaries(dataset, plan),
        num_train_images=plan.num_train_images,
        num_reg_images=plan.num_reg_images,
        reg_samples_per_epoch=plan.reg_samples_per_epoch,
        batch_size=plan.batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        epochs=plan.epochs,
        batches_per_epoch=plan.batches_per_epoch,
        steps_per_epoch=plan.steps_per_epoch,
        total_steps=plan.total_steps,
        buckets=[{"resolution": list(reso), "count": n} for reso, n in plan.bucket_counts().items()],
        warnings=dataset_warnings(dataset, config, plan) if dataset.usable else [],
        problems=[{"file": p.path.name, "path": str(p.path), "message": p.message} for p in dataset.problems],
        notes=list(dataset.notes),
        tag_frequency=count_tags(p.caption for p in plan.images if not p.is_reg),
        held_out=[_display_name(subset, record) for subset in dataset.held_out for record in subset.images],
        ss_dataset_dirs=_dataset_dirs(dataset, is_reg=False),
        ss_reg_dataset_dirs=_dataset_dirs(dataset, is_reg=True),
        ss_tag_frequency=_tag_frequency_by_folder(plan),
        ss_bucket_info=plan.bucket_info(),
    )


def dataset_warnings(
    dataset: ScannedDataset, config: TrainingConfig, plan: EpochPlan
) -> list[DatasetWarning]:
    checks = [
        _too_few_images(dataset),
        _steps_out_of_range(plan),
        _low_resolution(dataset),
        _elongated(dataset),
        _near_duplicates(dataset),
        _missing_captions(dataset, config),
        _no_trigger_word(config),
        _captions_without_trigger(dataset, config),
        _trigger_shuffled(config),
        _unused_reg_images(plan),
        _prompt_syntax_in_captions(dataset, config),
    ]
    found = [warning for warning in checks if warning is not None]
    found += [DatasetWarning("latents_not_cached", m) for m in latent_cache_warnings(settings_for(config))]
    return found


def near_duplicate_pairs(
    hashes: list[tuple[str, int]], max_bits: int = NEAR_DUPLICATE_BITS
) -> list[tuple[str, str]]:
    """Pairs of names whose 128-bit perceptual hashes differ in at most ``max_bits`` bits."""
    pairs = []
    for i, (name_a, hash_a) in enumerate(hashes):
        for name_b, hash_b in hashes[i + 1 :]:
            if (hash_a ^ hash_b).bit_count() <= max_bits:
                pairs.append((name_a, name_b))
    return pairs


# --- individual checks ----------------------------------------------------------------------------
def _train_records(dataset: ScannedDataset) -> list[tuple[Subset, ImageRecord]]:
    return [(subset, record) for subset in dataset.train_subsets for record in subset.images]


def _names(records: list[tuple[Subset, ImageRecord]]) -> tuple[str, ...]:
    return tuple(_display_name(subset, record) for subset, record in records)


def _display_name(subset: Subset, record: ImageRecord) -> str:
    return f"{subset.name}/{record.path.name}"


def _shown(names: tuple[str, ...] | list[str], limit: int = MAX_NAMES_SHOWN) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _images_warning(code: str, records: list[tuple[Subset, ImageRecord]], what: str) -> DatasetWarning | None:
    """ "<count> <what>: a.png, b.png and 3 more", naming ``records``; None when there are none."""
    if not records:
        return None
    names = _names(records)
    return DatasetWarning(code, f"{len(records)} {what}: {_shown(names)}", names)


def _too_few_images(dataset: ScannedDataset) -> DatasetWarning | None:
    count = len(_train_records(dataset))
    if count >= MIN_CHARACTER_IMAGES:
        return None
    return DatasetWarning(
        "too_few_images",
        f"Only {count} training image(s): a character LoRA usually needs {MIN_CHARACTER_IMAGES}–50 varied "
        "images (different angles, expressions, outfits and backgrounds) to generalise",
    )


def _steps_out_of_range(plan: EpochPlan) -> DatasetWarning | None:
    low, high = USUAL_TOTAL_STEPS
    if low <= plan.total_steps <= high or plan.steps_per_epoch == 0:
        return None
    side = "below" if plan.total_steps < low else "above"
    risk = (
        "the character may not be learned" if side == "below" else "the LoRA may overfit (stiff, same pose)"
    )
    epochs = max(1, round(TARGET_TOTAL_STEPS / plan.steps_per_epoch))
    return DatasetWarning(
        "steps_out_of_range",
        f"{plan.total_steps} total steps is {side} the usual {low}–{high} for a character LoRA, so {risk}; "
        f"{epochs} epoch(s) would give {epochs * plan.steps_per_epoch} steps (or change the repeats)",
    )


def _low_resolution(dataset: ScannedDataset) -> DatasetWarning | None:
    small = [(s, r) for s, r in _train_records(dataset) if min(r.width, r.height) < LOW_RESOLUTION_SIDE]
    return _images_warning(
        "low_resolution",
        small,
        f"image(s) are under {LOW_RESOLUTION_SIDE} px on the short side and will be upscaled, "
        "which teaches blur",
    )


def _elongated(dataset: ScannedDataset) -> DatasetWarning | None:
    long = [
        (s, r)
        for s, r in _train_records(dataset)
        if max(r.width, r.height) / min(r.width, r.height) > ELONGATED_RATIO
    ]
    return _images_warning(
        "elongated",
        long,
        f"image(s) are more elongated than {ELONGATED_RATIO}:1, so a large part is cropped away; "
        "crop them by hand to what matters",
    )


def _near_duplicates(dataset: ScannedDataset) -> DatasetWarning | None:
    records = _train_records(dataset)
    pairs = near_duplicate_pairs([(_display_name(s, r), r.dhash) for s, r in records])
    if not pairs:
        return None
    shown = [f"{a} ≈ {b}" for a, b in pairs]
    files = tuple(sorted({name for pair in pairs for name in pair}))
    return DatasetWarning(
        "near_duplicates",
        f"{len(pairs)} pair(s) of images look nearly identical; duplicates make the LoRA copy those "
        f"pictures — keep one of each: {_shown(shown)}",
        files,
    )


def _missing_captions(dataset: ScannedDataset, config: TrainingConfig) -> DatasetWarning | None:
    missing = [(s, r) for s, r in _train_records(dataset) if r.caption_file is None]
    if not missing:
        return None
    tokens = sorted({s.class_tokens for s, _ in missing if s.class_tokens})
    fallback = f"the class token ({', '.join(repr(t) for t in tokens)})" if tokens else "no caption at all"
    if config.trigger_word.strip():
        fallback += f" plus the trigger word {config.trigger_word.strip()!r}"
    return _images_warning(
        "missing_captions",
        missing,
        f"image(s) have no {config.caption_extension} caption file, so they train with {fallback}; "
        "caption them (WD14) for better control",
    )


def _no_trigger_word(config: TrainingConfig) -> DatasetWarning | None:
    if config.trigger_word.strip():
        return None
    return DatasetWarning(
        "no_trigger_word",
        "No trigger word is set: choose a rare word (like 'ohwx_alice') so the character is called up "
        "by that word and its features are tied to it",
    )


def _captions_without_trigger(dataset: ScannedDataset, config: TrainingConfig) -> DatasetWarning | None:
    trigger = config.trigger_word.strip()
    if not trigger:
        return None
    lacking = [
        (s, r)
        for s, r in _train_records(dataset)
        if r.caption_file is not None and not has_trigger(r.caption, trigger)
    ]
    return _images_warning(
        "captions_without_trigger",
        lacking,
        f"caption(s) do not contain the trigger word {trigger!r}; it is put first at training time "
        "(the files are not changed)",
    )


def _trigger_shuffled(config: TrainingConfig) -> DatasetWarning | None:
    if not (config.shuffle_caption and config.keep_tokens == 0 and config.trigger_word.strip()):
        return None
    return DatasetWarning(
        "trigger_shuffled",
        "Caption shuffle is on with keep tokens 0, so the trigger word moves around and can be dropped; "
        "set keep tokens to 1 to keep it first",
    )


def _unused_reg_images(plan: EpochPlan) -> DatasetWarning | None:
    if plan.num_reg_images <= plan.num_train_images:
        return None
    used = sum(1 for p in plan.images if p.is_reg)
    return DatasetWarning(
        "reg_images_unused",
        f"There are more regularisation images ({plan.num_reg_images} with repeats) than training images "
        f"({plan.num_train_images} with repeats); only {used} of them are used, as in kohya",
    )


def _prompt_syntax_in_captions(dataset: ScannedDataset, config: TrainingConfig) -> DatasetWarning | None:
    with_syntax = [
        (subset, record, prompt_syntax(record.caption))
        for subset, record in _train_records(dataset)
        if record.caption_file is not None
    ]
    with_syntax = [(s, r, kinds) for s, r, kinds in with_syntax if kinds]
    if not with_syntax:
        return None
    kinds = sorted({kind for _, _, found in with_syntax for kind in found})
    if config.weighted_captions:
        effect = (
            "weighted captions are on, so they are read as weights and chunk breaks; write \\( \\) for a "
            "bracket that is part of a tag"
        )
    else:
        effect = (
            "they are trained as plain text, brackets included (as WD14 tags like ganyu (genshin impact) "
            "need); switch on Weighted captions if you meant them as weights"
        )
    return _images_warning(
        "prompt_syntax",
        [(s, r) for s, r, _ in with_syntax],
        f"caption(s) contain prompt syntax ({', '.join(kinds)}): {effect}",
    )


# --- metadata -----------------------------------------------------------------------------------
def _subset_summaries(dataset: ScannedDataset, plan: EpochPlan) -> list[SubsetSummary]:
    samples: dict[str, int] = {}
    for planned in plan.images:
        samples[str(planned.subset.folder)] = samples.get(str(planned.subset.folder), 0) + planned.repeats
    return [
        SubsetSummary(
            name=subset.name,
            folder=str(subset.folder),
            repeats=subset.repeats,
            image_count=len(subset.images),
            samples_per_epoch=samples.get(str(subset.folder), 0),
            captioned=sum(1 for record in subset.images if record.caption_file is not None),
            is_reg=subset.is_reg,
        )
        for subset in dataset.subsets
    ]


def _dataset_dirs(dataset: ScannedDataset, *, is_reg: bool) -> dict[str, dict[str, int]]:
    subsets = dataset.reg_subsets if is_reg else dataset.train_subsets
    return {s.name: {"n_repeats": s.repeats, "img_count": len(s.images)} for s in subsets}


def _tag_frequency_by_folder(plan: EpochPlan) -> dict[str, dict[str, int]]:
    captions: dict[str, list[str]] = {}
    for planned in plan.images:
        captions.setdefault(planned.subset.name, []).append(planned.caption)
    return {name: count_tags(texts) for name, texts in captions.items()}


# --- text -------------------------------------------------------------------------------------------
def _report_lines(report: DatasetReport) -> list[str]:
    lines: list[str] = []
    if report.errors:
        lines += ["Cannot train on this dataset:", *(f"  - {error}" for error in report.errors), ""]
    train = [s for s in report.subsets if not s.is_reg]
    reg = [s for s in report.subsets if s.is_reg]
    if train:
        images = sum(s.image_count for s in train)
        lines.append(
            f"Training images: {images} in {len(train)} folder(s), {report.num_train_images} with repeats"
        )
        lines += [_subset_line(s) for s in train]
    if report.held_out:
        lines.append(
            f"Held out for the validation loss (not trained on): {len(report.held_out)} image(s): "
            f"{_shown(report.held_out, MAX_HELD_OUT_SHOWN)}"
        )
    if reg:
        images = sum(s.image_count for s in reg)
        lines.append(
            f"Regularisation images: {images}, used {report.reg_samples_per_epoch} times per epoch "
            "(cycled to match the training images)"
        )
        lines += [_subset_line(s) for s in reg]
    if report.usable:
        accumulation = (
            f", gradient accumulation {report.gradient_accumulation_steps}"
            if report.gradient_accumulation_steps > 1
            else ""
        )
        lines.append(
            f"Batch size {report.batch_size}{accumulation}: {report.batches_per_epoch} batches, "
            f"{report.steps_per_epoch} steps per epoch; {report.epochs} epoch(s) = {report.total_steps} "
            "steps in total"
        )
        buckets = ", ".join(
            f"{b['resolution'][0]}x{b['resolution'][1]}: {b['count']}" for b in report.buckets
        )
        lines.append(f"Buckets (images with repeats): {buckets}")
    if report.warnings:
        lines += ["", "Warnings:", *(f"  - {w.message}" for w in report.warnings)]
    if report.problems:
        lines += [
            "",
            f"Left out ({len(report.problems)} file(s)):",
            *(f"  - {p['message']}" for p in report.problems),
        ]
    if report.notes:
        shown = report.notes[:MAX_NOTES_SHOWN]
        lines += ["", "Notes:", *(f"  - {note}" for note in shown)]
        if len(report.notes) > len(shown):
            lines.append(f"  - ... and {len(report.notes) - len(shown)} more (see the JSON report)")
    if report.tag_frequency:
        top = list(report.tag_frequency.items())[:20]
        lines += ["", "Most frequent tags: " + ", ".join(f"{tag} ({n})" for tag, n in top)]
    return lines


def _subset_line(summary: SubsetSummary) -> str:
    captions = f", {summary.captioned} captioned"
    return (
        f"  {summary.name}: {summary.image_count} image(s) x {summary.repeats} repeat(s) "
        f"= {summary.image_count * summary.repeats}{captions}"
    )
