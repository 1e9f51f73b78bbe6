"""Caption editing for the tab: list, edit one, add/remove/replace a tag everywhere, undo a bulk edit.

Every write is atomic, keeps the caption's encoding, and backs up the previous caption
(``.lora_trainer_backup/`` beside it). A bulk edit is journalled in
``<dataset folder>/.lora_trainer_backup/last_bulk_edit.json`` *before* any caption is written, with the
exact bytes each file had before, so it can be undone even after the page (or the WebUI) was reloaded.
A bulk edit that fails part-way (a read-only file, a full disk) puts back what it had written and
leaves the previous journal in place, so Undo still undoes exactly the last edit that happened. Undo
leaves alone any caption edited again since the bulk edit, and says so.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.dataset.caption_files import (
    CaptionFileError,
    caption_bytes,
    read_caption_file,
    write_caption_file,
)
from lib_lora_trainer.dataset.caption_processing import count_tags, join_tags, split_tags, tag_key
from lib_lora_trainer.dataset.images import is_image_file
from lib_lora_trainer.dataset.scan import KOHYA_FOLDER_PATTERN
from lib_lora_trainer.file_types import caption_extension_problem
from lib_lora_trainer.files import (
    BACKUP_FOLDER_NAME,
    atomic_write_bytes,
    atomic_write_text,
    backup_before_overwrite,
    remove_stale_temporaries,
    write_bytes_with_backup,
)

logger = logging.getLogger(__name__)

JOURNAL_NAME = "last_bulk_edit.json"


class CaptionEditError(ValueError):
    """A caption edit that cannot be done; the message says why."""


@dataclass(frozen=True)
class CaptionedImage:
    image: Path
    caption_path: Path
    caption: str  # "" when there is no caption file
    has_caption_file: bool
    problem: str | None = None  # e.g. the caption file is not UTF-8, or cannot be read
    writable: bool = True  # False: unreadable or not text; edits leave it alone


@dataclass(frozen=True)
class _PlannedWrite:
    path: Path
    before: bytes
    after: bytes


@dataclass(frozen=True)
class EditResult:
    changed: tuple[Path, ...]  # caption files written (or, for undo, restored/removed)
    message: str
    skipped: tuple[Path, ...] = ()  # undo only: captions edited since the bulk edit, left as they are


class CaptionEditor:
    """Captions of the images in ``root`` (flat layout) or in its ``N_name`` subfolders (kohya)."""

    def __init__(self, root: str | Path, *, caption_extension: str = ".txt", layout: str = "flat"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise CaptionEditError(f"the folder {self.root} does not exist")
        extension_problem = caption_extension_problem(caption_extension)
        if extension_problem:
            raise CaptionEditError(extension_problem)
        self.caption_extension = caption_extension
        self.layout = layout
        self.listing_problems: list[str] = []  # subfolders that could not be listed
        for folder in self._folders():
            remove_stale_temporaries(folder)

    @classmethod
    def from_config(cls, config: TrainingConfig) -> CaptionEditor:
        return cls(
            config.train_data_dir, caption_extension=config.caption_extension, layout=config.dataset_layout
        )

    # --- reading -----------------------------------------------------------------------------------
    def image_paths(self) -> list[Path]:
        """The dataset's images; a subfolder that cannot be listed is skipped (``listing_problems``)."""
        self.listing_problems = []
        paths = []
        for folder in self._folders():
            try:
                entries = sorted(folder.iterdir())
            except OSError as error:
                problem = f"cannot list {folder.name} ({error.strerror or error}); its images are not shown"
                logger.warning("Captions: %s", problem)
                self.listing_problems.append(problem)
                continue
            paths += [path for path in entries if _is_image(path)]
        return paths

    def _folders(self) -> list[Path]:
        if self.layout != "kohya":
            return [self.root]
        try:
            entries = sorted(self.root.iterdir())
        except OSError as error:
            raise CaptionEditError(
                f"cannot list the folder {self.root} ({error.strerror or error}); check its permissions"
            ) from error
        return [p for p in entries if KOHYA_FOLDER_PATTERN.match(p.name) and _is_dir(p)]

    def images(self) -> list[CaptionedImage]:
        return [self._captioned(path) for path in self.image_paths()]

    def caption_path(self, image: str | Path) -> Path:  # the extension was checked in __init__
        return Path(image).with_suffix(self.caption_extension)

    def tag_frequency(self) -> dict[str, int]:
        return count_tags(item.caption for item in self.images())

    # --- single edit ------------------------------------------------------------------------------
    def set_caption(self, image: str | Path, caption: str) -> EditResult:
        """Replace one image's caption (created if missing); the old one is backed up first."""
        path = self._own_image(image)
        target = self.caption_path(path)
        try:
            backup = write_caption_file(target, _clean(caption))
        except CaptionFileError as error:
            raise CaptionEditError(str(error)) from error
        except OSError as error:
            raise CaptionEditError(
                f"{target.name} could not be saved ({error.strerror or error}); check that the file is "
                "not read-only or open elsewhere and that the disk has space, then save again"
            ) from error
        logger.info("Caption %s written%s", target, f" (backup {backup})" if backup else "")
        return EditResult((target,), f"saved {target.name}")

    # --- bulk edits -------------------------------------------------------------------------------
    def add_tag(
        self, tag: str, *, at_start: bool = False, images: Iterable[str | Path] | None = None
    ) -> EditResult:
        new = _one_tag(tag)

        def edit(tags: list[str]) -> list[str]:
            if any(tag_key(t) == tag_key(new) for t in tags):
                return tags
            return [new, *tags] if at_start else [*tags, new]

        return self._bulk_edit(f"add tag {new!r}", edit, images)

    def remove_tag(self, tag: str, *, images: Iterable[str | Path] | None = None) -> EditResult:
        key = tag_key(_one_tag(tag))
        return self._bulk_edit(
            f"remove tag {tag.strip()!r}", lambda tags: [t for t in tags if tag_key(t) != key], images
        )

    def replace_tag(self, old: str, new: str, *, images: Iterable[str | Path] | None = None) -> EditResult:
        old_key, replacement = tag_key(_one_tag(old)), _one_tag(new)

        def edit(tags: list[str]) -> list[str]:
            replaced = [replacement if tag_key(t) == old_key else t for t in tags]
            return _dedupe(replaced)

        return self._bulk_edit(f"replace tag {old.strip()!r} with {replacement!r}", edit, images)

    # --- undo -------------------------------------------------------------------------------------
    def can_undo(self) -> bool:
        return self._journal_path().is_file()

    def last_bulk_edit(self) -> str | None:
        """What the last bulk edit did (for an "Undo ..." button label), or None."""
        journal = self._read_journal()
        return journal["operation"] if journal else None

    def undo_last_bulk_edit(self) -> EditResult:
        journal = self._read_journal()
        if journal is None:
            raise CaptionEditError("there is no bulk edit to undo")
        restored, skipped, left = [], [], []
        failure: tuple[Path, OSError] | None = None
        for entry in journal["files"]:
            path = self.root / entry["path"]
            before = base64.b64decode(entry["before"])
            try:
                current = path.read_bytes() if path.is_file() else None
                if current == before:
                    continue  # already as before (a bulk edit stopped before reaching it)
                if current is None or _digest(current) != entry["after_sha256"]:
                    skipped.append(path)
                    continue
                backup_before_overwrite(path)
                atomic_write_bytes(path, before)
                restored.append(path)
            except OSError as error:
                failure = failure or (path, error)
                left.append(entry)
        if failure is not None:
            self._write_journal({"operation": journal["operation"], "files": left})
            path, error = failure
            raise CaptionEditError(
                f"undo of {journal['operation']} stopped: {path.name} could not be restored "
                f"({error.strerror or error}); {len(restored)} caption(s) were restored. Make the file "
                f"writable (or free disk space) and press Undo again for the other {len(left)}"
            )
        self._journal_path().unlink()
        message = f"undid {journal['operation']}: {len(restored)} caption(s) restored"
        if skipped:
            message += f"; {len(skipped)} edited since then were left as they are"
        logger.info("%s", message)
        return EditResult(tuple(restored), message, tuple(skipped))

    # --- internals ----------------------------------------------------------------------------------
    def _captioned(self, image: Path) -> CaptionedImage:
        caption_path = self.caption_path(image)
        try:
            if not caption_path.is_file():
                return CaptionedImage(image, caption_path, "", False)
            text = read_caption_file(caption_path)
        except OSError as error:
            problem = f"{caption_path.name} cannot be read ({error.strerror or error})"
            return CaptionedImage(image, caption_path, "", True, problem, writable=False)
        return CaptionedImage(image, caption_path, text.text, True, text.problem, text.writable)

    def _own_image(self, image: str | Path, known: set[Path] | None = None) -> Path:
        path = Path(image)
        if not path.is_absolute():
            path = self.root / path
        if known is None:
            known = self._known_images()
        if path.resolve() not in known:
            raise CaptionEditError(f"{path.name} is not an image of this dataset")
        return path

    def _known_images(self) -> set[Path]:
        return {path.resolve() for path in self.image_paths()}

    def _bulk_edit(
        self,
        operation: str,
        edit: Callable[[list[str]], list[str]],
        images: Iterable[str | Path] | None,
    ) -> EditResult:
        """Apply ``edit`` to the tags of every caption file (images without one are not touched)."""
        if images is None:
            targets = self.images()
        else:
            known = self._known_images()
            targets = [self._captioned(self._own_image(image, known)) for image in images]
        plan: list[_PlannedWrite] = []
        uncaptioned = 0
        left_alone: list[str] = []  # captions that cannot be rewritten safely, with the reason
        for item in targets:
            if not item.has_caption_file:
                uncaptioned += 1
                continue
            if not item.writable:
                left_alone.append(item.problem or item.caption_path.name)
                continue
            new_caption = join_tags(edit(split_tags(item.caption)))
            if new_caption == join_tags(split_tags(item.caption)):
                continue
            try:
                before = item.caption_path.read_bytes()
                after = caption_bytes(item.caption_path, new_caption)
                plan.append(_PlannedWrite(item.caption_path, before, after))
            except CaptionFileError as error:
                left_alone.append(str(error))
            except OSError as error:
                left_alone.append(f"{item.caption_path.name} cannot be read ({error.strerror or error})")
        if plan:
            self._apply(operation, plan)
        message = f"{operation}: {len(plan)} caption(s) changed"
        if uncaptioned:
            message += f"; {uncaptioned} image(s) without a caption file were not touched"
        if left_alone:
            message += f"; {len(left_alone)} left as they are: " + "; ".join(left_alone)
        logger.info("%s", message)
        return EditResult(tuple(step.path for step in plan), message)

    def _apply(self, operation: str, plan: list[_PlannedWrite]) -> None:
        """Journal ``plan``, then write it; on a failure put back what was written (see the module)."""
        previous = self._journal_bytes()
        try:
            self._write_journal({"operation": operation, "files": [self._entry(step) for step in plan]})
        except OSError as error:
            raise CaptionEditError(
                f"{operation} was not done: the undo journal could not be written "
                f"({error.strerror or error}); nothing was changed. Free disk space or make the dataset "
                "folder writable, then try again"
            ) from error
        written: list[_PlannedWrite] = []
        for step in plan:
            try:
                write_bytes_with_backup(step.path, step.after)
            except OSError as error:
                self._roll_back(operation, written, previous, step.path, error)
            written.append(step)

    def _roll_back(
        self,
        operation: str,
        written: list[_PlannedWrite],
        previous: bytes | None,
        failed: Path,
        error: OSError,
    ) -> None:
        not_restored = []
        for step in reversed(written):
            try:
                atomic_write_bytes(step.path, step.before)
            except OSError:
                not_restored.append(step)
        reason = f"{failed.name} could not be written ({error.strerror or error})"
        advice = "check that it is not read-only or open in another program and that the disk has space"
        if not not_restored:
            self._restore_journal(previous)
            raise CaptionEditError(
                f"{operation} stopped: {reason}; the {len(written)} caption(s) already changed were put "
                f"back, so nothing changed. {advice[0].upper()}{advice[1:]}, then try again"
            ) from error
        self._write_journal({"operation": operation, "files": [self._entry(step) for step in not_restored]})
        raise CaptionEditError(
            f"{operation} stopped: {reason}, and {len(not_restored)} caption(s) already changed could not be "
            f"put back; {advice}, then press Undo last bulk edit to take them back"
        ) from error

    def _entry(self, step: _PlannedWrite) -> dict:
        return {
            "path": step.path.relative_to(self.root).as_posix(),
            "before": base64.b64encode(step.before).decode("ascii"),
            "after_sha256": _digest(step.after),
        }

    def _journal_bytes(self) -> bytes | None:
        try:
            return self._journal_path().read_bytes()
        except OSError:
            return None

    def _restore_journal(self, previous: bytes | None) -> None:
        try:
            if previous is None:
                self._journal_path().unlink(missing_ok=True)
            else:
                atomic_write_bytes(self._journal_path(), previous)
        except OSError as error:
            logger.warning("The undo journal could not be put back (%s)", error)

    def _journal_path(self) -> Path:
        return self.root / BACKUP_FOLDER_NAME / JOURNAL_NAME

    def _write_journal(self, journal: dict) -> None:
        atomic_write_text(self._journal_path(), json.dumps(journal, ensure_ascii=False, indent=1))

    def _read_journal(self) -> dict | None:
        path = self._journal_path()
        if not path.is_file():
            return None
        try:
            journal = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(journal.get("operation"), str) or not isinstance(journal.get("files"), list):
                raise ValueError("unexpected content")
            return journal
        except (ValueError, OSError) as error:
            logger.warning("The undo journal %s is unreadable (%s); nothing to undo", path, error)
            return None


def _is_image(path: Path) -> bool:
    try:
        return is_image_file(path)
    except OSError:
        return False


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:
        return False


def _one_tag(tag: str) -> str:
    cleaned = " ".join(tag.split())
    if not cleaned:
        raise CaptionEditError("the tag is empty")
    if "," in cleaned:
        raise CaptionEditError(f"{tag!r} contains a comma: edit one tag at a time")
    return cleaned


def _clean(caption: str) -> str:
    return join_tags(split_tags(caption.replace("\r", "\n").replace("\n", ",")))


def _dedupe(tags: list[str]) -> list[str]:
    seen: set[str] = set()
    unique = []
    for tag in tags:
        if tag_key(tag) not in seen:
            seen.add(tag_key(tag))
            unique.append(tag)
    return unique


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
