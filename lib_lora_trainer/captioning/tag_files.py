"""Tagging a set of images and writing their caption files.

Images are only read. A caption file is written only when its text changes, and the previous file is
backed up first. One unreadable image is reported by name and the others are still tagged.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lib_lora_trainer.captioning.tag_text import (
    ExistingCaptionMode,
    compose_caption,
    join_tags,
    parse_tag_list,
)
from lib_lora_trainer.captioning.wd14_preprocess import ImageReadError, prepare_image, read_image
from lib_lora_trainer.captioning.wd14_tagger import WD14Tagger
from lib_lora_trainer.dataset.caption_files import (
    CaptionFileError,
    caption_unchanged,
    read_caption_file,
    write_caption_file,
)
from lib_lora_trainer.dataset.caption_files import caption_path_for as _caption_path_for
from lib_lora_trainer.file_types import IMAGE_EXTENSIONS, caption_extension_problem
from lib_lora_trainer.files import remove_stale_temporaries

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], None]  # (images done, images in total, current image)


@dataclass
class TaggingOptions:
    general_threshold: float | None = None  # None: the model's own default
    character_threshold: float | None = None
    include_rating: bool = False
    replace_underscores: bool = True
    undesired_tags: str = ""  # "long hair,  blue_eyes , smile": spacing and underscores don't matter
    trigger_word: str = ""  # put first in every caption; a comma list puts several tags first
    existing_captions: ExistingCaptionMode | str = ExistingCaptionMode.SKIP
    caption_extension: str = ".txt"
    batch_size: int = 4

    def problems(self) -> list[str]:
        found = []
        for label, value in (("general", self.general_threshold), ("character", self.character_threshold)):
            if value is not None and not 0.0 <= value <= 1.0:
                found.append(f"The {label} threshold must be between 0 and 1, not {value}")
        extension_problem = caption_extension_problem(self.caption_extension)
        if extension_problem:
            found.append(extension_problem[0].upper() + extension_problem[1:])
        if self.batch_size < 1:
            found.append(f"The batch size must be 1 or more, not {self.batch_size}")
        try:
            ExistingCaptionMode.parse(self.existing_captions)
        except ValueError as error:
            found.append(str(error))
        return found

    def validated(self) -> TaggingOptions:
        """A copy with the mode parsed; raises ValueError listing every problem."""
        problems = self.problems()
        if problems:
            raise ValueError("Tagging settings need fixing:\n- " + "\n- ".join(problems))
        return dataclasses.replace(self, existing_captions=ExistingCaptionMode.parse(self.existing_captions))


@dataclass
class TaggingSummary:
    model: str = ""
    provider: str = ""
    written: list[str] = field(default_factory=list)  # caption files created or changed
    unchanged: list[str] = field(default_factory=list)  # caption already had exactly this text
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, why)
    failed: list[tuple[str, str]] = field(default_factory=list)  # (image, why)
    not_processed: list[str] = field(default_factory=list)  # left when the run was cancelled
    backups: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    cancelled: bool = False

    def text(self) -> str:
        """A short report for the UI."""
        lines = [f"WD14 tagger {self.model} on {self.provider or 'no device (nothing to tag)'}"]
        lines.append(
            f"Captions written: {len(self.written)}, already up to date: {len(self.unchanged)}, "
            f"skipped: {len(self.skipped)}, failed: {len(self.failed)}"
        )
        if self.backups:
            lines.append(f"Previous captions backed up: {len(self.backups)}")
        if self.cancelled:
            lines.append(f"Stopped by the user; {len(self.not_processed)} images were not tagged")
        lines += [f"Skipped {name}: {why}" for name, why in self.skipped if "already has" not in why]
        lines += [f"Failed {name}: {why}" for name, why in self.failed]
        lines += [f"Warning: {warning}" for warning in self.warnings]
        return "\n".join(lines)


@dataclass
class _Job:
    image: Path
    caption: Path
    label: str
    caption_label: str
    existing_tags: list[str]


def caption_path_for(image: str | Path, caption_extension: str = ".txt") -> Path:
    return _caption_path_for(image, caption_extension)


def list_images(folder: str | Path, *, recursive: bool = False) -> list[Path]:
    """The images in ``folder`` (and its subfolders if ``recursive``, hidden ones left out), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"The image folder {folder} does not exist or is not a folder")
    if not recursive:
        candidates: Iterable[Path] = folder.iterdir()
    else:
        candidates = []
        for directory, subdirectories, files in os.walk(folder):
            subdirectories[:] = sorted(name for name in subdirectories if not name.startswith("."))
            candidates += [Path(directory) / name for name in files]
    return sorted(
        path
        for path in candidates
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def tag_folder(
    tagger: WD14Tagger,
    folder: str | Path,
    options: TaggingOptions | None = None,
    *,
    recursive: bool = False,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TaggingSummary:
    """Tag every image in ``folder`` (see :func:`tag_images`)."""
    images = list_images(folder, recursive=recursive)
    for image_folder in sorted({image.parent for image in images}):
        remove_stale_temporaries(image_folder)
    summary = tag_images(tagger, images, options, root=folder, progress=progress, should_cancel=should_cancel)
    if not images:
        summary.warnings.append(f"No images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    return summary


def tag_images(
    tagger: WD14Tagger,
    images: Sequence[str | Path],
    options: TaggingOptions | None = None,
    *,
    root: str | Path | None = None,
    progress: ProgressCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> TaggingSummary:
    """Tag ``images`` in batches and write their captions next to them.

    ``progress(done, total, name)`` is called as images finish; ``should_cancel()`` is checked before
    each batch, and a cancelled run reports what it did not reach. Names in the summary are relative
    to ``root`` when given.
    """
    options = (options or TaggingOptions()).validated()
    summary = TaggingSummary(model=tagger.name)
    jobs = _plan(images, options, summary, root)
    total, done = len(images), len(images) - len(jobs)
    if progress and done:
        progress(done, total, "")
    if not jobs:
        return summary
    tagger.load()
    summary.provider = tagger.providers[0]
    trigger_tags = parse_tag_list(options.trigger_word)
    for start in range(0, len(jobs), options.batch_size):
        batch = jobs[start : start + options.batch_size]
        if should_cancel is not None and should_cancel():
            summary.cancelled = True
            summary.not_processed = [job.label for job in jobs[start:]]
            logger.info("WD14 tagging stopped by the user; %d images not tagged", len(jobs) - start)
            break
        for job, scores in _score_batch(tagger, batch, summary):
            selection = tagger.select(
                scores,
                general_threshold=options.general_threshold,
                character_threshold=options.character_threshold,
                undesired_tags=options.undesired_tags,
            )
            new_tags = selection.tags(
                include_rating=options.include_rating, replace_underscores=options.replace_underscores
            )
            tags = compose_caption(trigger_tags, new_tags, job.existing_tags, options.existing_captions)
            _write(job, join_tags(tags), summary)
        done += len(batch)
        if progress:
            progress(done, total, batch[-1].label)
    logger.info("WD14 tagging finished: %s", summary.text().replace("\n", "; "))
    return summary


def _label(path: Path, root: str | Path | None) -> str:
    if root is not None:
        try:
            return path.relative_to(root).as_posix()
        except ValueError:
            pass
    return path.name


def _plan(
    images: Sequence[str | Path], options: TaggingOptions, summary: TaggingSummary, root: str | Path | None
) -> list[_Job]:
    jobs = []
    caption_owner: dict[Path, str] = {}
    for image in map(Path, images):
        label = _label(image, root)
        caption = caption_path_for(image, options.caption_extension)
        if caption in caption_owner:
            owner = caption_owner[caption]
            why = f"it shares the caption file {caption.name} with {owner}; rename one of them"
            summary.skipped.append((label, why))
            continue
        caption_owner[caption] = label
        try:
            existing = _existing_tags(caption, summary)
        except OSError as error:
            reason = error.strerror or error
            summary.failed.append((label, f"its caption {caption.name} could not be read ({reason})"))
            continue
        except CaptionFileError as error:
            summary.failed.append((label, str(error)))
            continue
        if existing and options.existing_captions is ExistingCaptionMode.SKIP:
            summary.skipped.append((label, f"it already has a caption ({caption.name})"))
            continue
        jobs.append(_Job(image, caption, label, _label(caption, root), existing))
    return jobs


def _existing_tags(caption: Path, summary: TaggingSummary) -> list[str]:
    if not caption.is_file():
        return []
    read = read_caption_file(caption)
    if not read.writable:
        raise CaptionFileError(f"{read.problem}; it is left as it is, so check it, then delete or replace it")
    if read.problem:
        summary.warnings.append(read.problem)
    return parse_tag_list(read.text)


def _score_batch(
    tagger: WD14Tagger, batch: list[_Job], summary: TaggingSummary
) -> list[tuple[_Job, np.ndarray]]:
    """Each readable image of ``batch`` with its scores; unreadable ones go to ``summary.failed``."""
    ready, arrays = [], []
    for job in batch:
        try:
            arrays.append(prepare_image(read_image(job.image), tagger.input_size))
            ready.append(job)
        except ImageReadError as error:
            _fail(summary, job, str(error))
        except (OSError, ValueError, MemoryError) as error:
            _fail(summary, job, f"{job.image.name} could not be prepared for tagging ({error})")
    if not ready:
        return []
    try:
        scores = tagger.predict_prepared(np.stack(arrays))
    except Exception as error:  # onnxruntime's errors have their own types; keep tagging the rest
        logger.exception("WD14 model failed on a batch")
        for job in ready:
            _fail(summary, job, f"the tagger model failed on this batch ({error})")
        return []
    return list(zip(ready, scores, strict=True))


def _fail(summary: TaggingSummary, job: _Job, why: str) -> None:
    logger.warning("WD14 tagging: %s: %s", job.label, why)
    summary.failed.append((job.label, why))


def _write(job: _Job, text: str, summary: TaggingSummary) -> None:
    if caption_unchanged(job.caption, text):
        summary.unchanged.append(job.caption_label)
        return
    try:
        backup = write_caption_file(job.caption, text)
    except OSError as error:
        reason = error.strerror or error
        _fail(summary, job, f"its caption {job.caption.name} could not be written ({reason})")
        return
    except CaptionFileError as error:
        _fail(summary, job, str(error))
        return
    summary.written.append(job.caption_label)
    if backup is not None:
        summary.backups.append(str(backup))
