"""Caption editing for the tab: list, edit one, add/remove/replace a tag everywhere, undo a bulk edit.

Every write is atomic and backs up the previous caption (``.lora_trainer_backup/`` beside it). The last
bulk edit is journalled in ``<dataset folder>/.lora_trainer_backup/last_bulk_edit.json`` with the exact
bytes each file had before, so it can be undone even after the page (or the WebUI) was reloaded. Undo
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
from lib_lora_trainer.dataset.caption_files import read_caption_file, write_caption_file
from lib_lora_trainer.dataset.caption_processing import count_tags, join_tags, split_tags, tag_key
from lib_lora_trainer.dataset.images import is_image_file
from lib_lora_trainer.dataset.scan import KOHYA_FOLDER_PATTERN
from lib_lora_trainer.files import (
    BACKUP_FOLDER_NAME,
    atomic_write_bytes,
    atomic_write_text,
    backup_before_overwrite,
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
    problem: str | None = None  # e.g. the caption file is not UTF-8


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
        if not caption_extension.startswith(".") or len(caption_extension) < 2:
            raise CaptionEditError("caption extension must start with '.', like .txt")
        self.caption_extension = caption_extension
        self.layout = layout

    @classmethod
    def from_config(cls, config: TrainingConfig) -> CaptionEditor:
        return cls(
            config.train_data_dir, caption_extension=config.caption_extension, layout=config.dataset_layout
        )

    # --- reading -----------------------------------------------------------------------------------
    def image_paths(self) -> list[Path]:
        folders = [self.root]
        if self.layout == "kohya":
            folders = sorted(
                p for p in self.root.iterdir() if p.is_dir() and KOHYA_FOLDER_PATTERN.match(p.name)
            )
        return [path for folder in folders for path in sorted(folder.iterdir()) if is_image_file(path)]

    def images(self) -> list[CaptionedImage]:
        return [self._captioned(path) for path in self.image_paths()]

    def caption_path(self, image: str | Path) -> Path:
        return Path(image).with_suffix(self.caption_extension)

    def tag_frequency(self) -> dict[str, int]:
        return count_tags(item.caption for item in self.images())

    # --- single edit ------------------------------------------------------------------------------
    def set_caption(self, image: str | Path, caption: str) -> EditResult:
        """Replace one image's caption (created if missing); the old one is backed up first."""
        path = self._own_image(image)
        target = self.caption_path(path)
        backup = write_caption_file(target, _clean(caption))
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
        restored, skipped = [], []
        for entry in journal["files"]:
            path = self.root / entry["path"]
            current = path.read_bytes() if path.is_file() else None
            if current is None or _digest(current) != entry["after_sha256"]:
                skipped.append(path)
                continue
            backup_before_overwrite(path)
            atomic_write_bytes(path, base64.b64decode(entry["before"]))
            restored.append(path)
        self._journal_path().unlink()
        message = f"undid {journal['operation']}: {len(restored)} caption(s) restored"
        if skipped:
            message += f"; {len(skipped)} edited since then were left as they are"
        logger.info("%s", message)
        return EditResult(tuple(restored), message, tuple(skipped))

    # --- internals ----------------------------------------------------------------------------------
    def _captioned(self, image: Path) -> CaptionedImage:
        caption_path = self.caption_path(image)
        if not caption_path.is_file():
            return CaptionedImage(image, caption_path, "", False)
        text = read_caption_file(caption_path)
        return CaptionedImage(image, caption_path, text.text, True, text.problem)

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
        entries, changed = [], []
        uncaptioned = 0
        for item in targets:
            if not item.has_caption_file:
                uncaptioned += 1
                continue
            new_caption = join_tags(edit(split_tags(item.caption)))
            if new_caption == join_tags(split_tags(item.caption)):
                continue
            before = item.caption_path.read_bytes()
            write_caption_file(item.caption_path, new_caption)
            after = item.caption_path.read_bytes()
            entries.append(
                {
                    "path": item.caption_path.relative_to(self.root).as_posix(),
                    "before": base64.b64encode(before).decode("ascii"),
                    "after_sha256": _digest(after),
                }
            )
            changed.append(item.caption_path)
        if entries:
            self._write_journal({"operation": operation, "files": entries})
        message = f"{operation}: {len(changed)} caption(s) changed"
        if uncaptioned:
            message += f"; {uncaptioned} image(s) without a caption file were not touched"
        logger.info("%s", message)
        return EditResult(tuple(changed), message)

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
