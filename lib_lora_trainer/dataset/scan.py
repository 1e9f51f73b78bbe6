"""Reading a dataset folder: which images, which captions, how many repeats — and what is wrong.

Two layouts: "flat" (images in one folder, repeats chosen by the user) and kohya's "N_name" folders
(``10_alice/``: 10 repeats, class token "alice", used as the caption of an image that has none). An
optional regularisation folder may use either layout (detected). The scan only reads: nothing in the
user's folders is created or changed (it only deletes the temporaries a killed save of ours left). Every
file that cannot be used, images in formats that are not trained on included, is reported by name with
the reason and left out; so is a folder that cannot be listed, and N_name folders nested where the
scan does not look are named. The scan itself never raises for bad input.

With a held-out share (``validation_share``), the images it picks (``held_out.py``) are taken out of
their training folders here, before anything counts them, and kept in ``held_out``: the plan, the
report, the ``ss_*`` metadata and the batches all see only the images that are trained on.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lib_lora_trainer.config import INT_LIMITS, TrainingConfig
from lib_lora_trainer.dataset.caption_files import read_caption_file
from lib_lora_trainer.dataset.held_out import held_out_names
from lib_lora_trainer.dataset.images import (
    DEFAULT_BACKGROUND,
    IMAGE_EXTENSIONS,
    ImageLoadError,
    is_image_file,
    probe_image,
)
from lib_lora_trainer.dataset.masks import is_mask_file  # photo.mask.png is a loss mask, not a picture
from lib_lora_trainer.file_types import caption_extension_problem, skipped_image_reason
from lib_lora_trainer.files import remove_stale_temporaries

logger = logging.getLogger(__name__)

KOHYA_FOLDER_PATTERN = re.compile(r"^(\d+)_(.*)$")
MAX_REPEATS = INT_LIMITS["flat_repeats"][1]  # an N_name folder's count is bounded as the flat one is
SUPPORTED_TYPES = ", ".join(ext.lstrip(".") for ext in IMAGE_EXTENSIONS)

ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    width: int  # after EXIF orientation
    height: int
    caption: str  # the caption file's text, or the class token when there is no caption
    caption_file: Path | None  # the caption file that was read, None when there was none
    dhash: int
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Subset:
    name: str  # the folder's name ("10_alice"): the key kohya's metadata uses
    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool
    images: tuple[ImageRecord, ...]


@dataclass(frozen=True)
class FileProblem:
    path: Path
    message: str


@dataclass
class ScannedDataset:
    subsets: list[Subset] = field(default_factory=list)
    problems: list[FileProblem] = field(default_factory=list)  # files left out, with the reason
    notes: list[str] = field(default_factory=list)  # conversions and ignored things worth telling
    errors: list[str] = field(default_factory=list)  # why the dataset cannot be trained on, if it can't
    # the images the held-out share keeps out of training, per training folder (only those folders)
    held_out: list[Subset] = field(default_factory=list)

    @property
    def train_subsets(self) -> list[Subset]:
        return [subset for subset in self.subsets if not subset.is_reg]

    @property
    def reg_subsets(self) -> list[Subset]:
        return [subset for subset in self.subsets if subset.is_reg]

    @property
    def usable(self) -> bool:
        return not self.errors and any(subset.images for subset in self.train_subsets)


def scan_dataset(
    config: TrainingConfig,
    *,
    background: tuple[int, int, int] = DEFAULT_BACKGROUND,
    progress: ProgressCallback | None = None,
) -> ScannedDataset:
    """Scan the training folder (and the regularisation folder, if set) described by ``config``."""
    result = ScannedDataset()
    extension_problem = caption_extension_problem(config.caption_extension)
    if extension_problem:
        result.errors.append(extension_problem)
        return result
    folders = _plan_folders(config, result)
    total = sum(len(images) for _, images in folders)
    done = 0
    for spec, images in folders:
        remove_stale_temporaries(spec.folder)
        _note_skipped_images(spec.folder, result)
        records = []
        for image_path in images:
            record = _scan_image(image_path, spec, config.caption_extension, background, result)
            if record is not None:
                records.append(record)
            done += 1
            if progress is not None:
                progress(done, total)
        if not records:
            result.notes.append(f"{spec.name}: every image was left out, so the folder is not used")
            continue
        subset = Subset(spec.name, spec.folder, spec.repeats, spec.class_tokens, spec.is_reg, tuple(records))
        result.subsets.append(subset)
        _note_shared_captions(subset, config.caption_extension, result)
    _check_usable(config, result)
    if not result.errors:
        _hold_out(result, config.validation_share)
    for message in result.errors:
        logger.error("Dataset: %s", message)
    return result


def _hold_out(result: ScannedDataset, share: float) -> None:
    """Move the images ``share`` picks from each training folder into ``result.held_out``."""
    if share <= 0:
        return
    subsets = []
    for subset in result.subsets:
        picked = set() if subset.is_reg else held_out_names((r.path.name for r in subset.images), share)
        if picked:
            kept = tuple(record for record in subset.images if record.path.name not in picked)
            held = tuple(record for record in subset.images if record.path.name in picked)
            result.held_out.append(replace(subset, images=held))
            subset = replace(subset, images=kept)
        subsets.append(subset)
    result.subsets = subsets
    if not result.held_out:
        result.notes.append(
            f"the held-out share {share:g} holds out no image: no training folder has 2 images or more, "
            "so the validation loss is measured on the training images"
        )


@dataclass(frozen=True)
class _FolderSpec:
    name: str
    folder: Path
    repeats: int
    class_tokens: str
    is_reg: bool


def _plan_folders(config: TrainingConfig, result: ScannedDataset) -> list[tuple[_FolderSpec, list[Path]]]:
    folders: list[tuple[_FolderSpec, list[Path]]] = []
    train_root = _existing_folder(config.train_data_dir, "training", result)
    if train_root is not None:
        if config.dataset_layout == "kohya":
            folders += _kohya_folders(train_root, config, is_reg=False, result=result)
        else:
            folders += _flat_folder(train_root, config.flat_repeats, config, is_reg=False, result=result)
    if config.reg_data_dir.strip():
        reg_root = _existing_folder(config.reg_data_dir, "regularisation", result)
        if reg_root is not None:
            if _kohya_subfolders(reg_root):
                folders += _kohya_folders(reg_root, config, is_reg=True, result=result)
            else:
                folders += _flat_folder(reg_root, 1, config, is_reg=True, result=result)
    return folders


def _existing_folder(text: str, role: str, result: ScannedDataset) -> Path | None:
    if not text.strip():
        result.errors.append(f"choose a {role} image folder")
        return None
    folder = Path(text.strip()).expanduser()
    if not folder.exists():
        result.errors.append(f"the {role} folder {folder} does not exist")
        return None
    if not folder.is_dir():
        result.errors.append(f"the {role} folder {folder} is a file, not a folder")
        return None
    return folder


def _entries(folder: Path, result: ScannedDataset | None = None) -> list[Path]:
    """The folder's entries, sorted; a folder that cannot be listed is reported (once) and is empty."""
    try:
        return sorted(folder.iterdir())
    except OSError as error:
        message = (
            f"cannot list the folder {folder} ({error.strerror or error}); check that it exists and "
            "that the WebUI may read it"
        )
        if result is not None and message not in result.errors:
            result.errors.append(message)
        return []


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except OSError:  # a folder we may not look into (permission denied) counts as none
        return False


def _list_images(folder: Path, result: ScannedDataset) -> list[Path]:
    return [path for path in _entries(folder, result) if _is_image(path) and not is_mask_file(path)]


def _is_image(path: Path) -> bool:
    try:
        return is_image_file(path)
    except OSError:
        return False


def _note_skipped_images(folder: Path, result: ScannedDataset) -> None:
    """Report the images in ``folder`` whose format is not trained on (GIF, AVIF, HEIC ...)."""
    for path in _entries(folder):
        reason = skipped_image_reason(path.suffix)
        if reason and not path.name.startswith(".") and not _is_dir(path):
            result.problems.append(FileProblem(path, f"{path.name}: {reason}"))


def _kohya_subfolders(root: Path, result: ScannedDataset | None = None) -> list[tuple[Path, int, str]]:
    found = []
    for path in _entries(root, result):
        match = KOHYA_FOLDER_PATTERN.match(path.name)
        if match and _is_dir(path):
            found.append((path, int(match.group(1)), match.group(2).strip()))
    return found


def _nested_kohya_parents(root: Path, depth: int = 2) -> list[Path]:
    """Folders below ``root`` (at most ``depth`` levels down) that hold N_name subfolders."""
    found: list[Path] = []
    level = [root]
    for _ in range(depth):
        level = [p for folder in level for p in _entries(folder) if _is_dir(p) and not p.name.startswith(".")]
        found += [folder for folder in level if _kohya_subfolders(folder)]
    return found


def _nested_kohya_hint(root: Path) -> str:
    parents = _nested_kohya_parents(root)
    if not parents:
        return ""
    names = ", ".join(str(parent) for parent in parents[:3])
    return f"; N_name subfolders were found deeper, in {names}: choose that folder (kohya layout)"


def _flat_folder(
    root: Path, repeats: int, config: TrainingConfig, *, is_reg: bool, result: ScannedDataset
) -> list[tuple[_FolderSpec, list[Path]]]:
    images = _list_images(root, result)
    role = "regularisation" if is_reg else "training"
    if not images:
        hint = ""
        if not is_reg and _kohya_subfolders(root):
            hint = "; it has N_name subfolders (like 10_alice), so choose the kohya folder layout"
        elif not is_reg:
            hint = _nested_kohya_hint(root)
        result.errors.append(f"the {role} folder {root} has no images ({SUPPORTED_TYPES}){hint}")
        return []
    spec = _FolderSpec(root.name, root, repeats, config.class_token.strip(), is_reg)
    return [(spec, images)]


def _kohya_folders(
    root: Path, config: TrainingConfig, *, is_reg: bool, result: ScannedDataset
) -> list[tuple[_FolderSpec, list[Path]]]:
    role = "regularisation" if is_reg else "training"
    errors_before = len(result.errors)
    subfolders = _kohya_subfolders(root, result)
    if len(result.errors) > errors_before:  # the folder cannot be listed
        return []
    _note_ignored_entries(root, result)
    if not subfolders:
        hint = (
            "; it has images directly inside, so choose the flat layout"
            if _list_images(root, result)
            else _nested_kohya_hint(root)
        )
        result.errors.append(
            f"the {role} folder {root} has no N_name subfolders (like 10_alice: 10 repeats, "
            f"class token 'alice'){hint}"
        )
        return []
    folders = []
    for folder, repeats, class_tokens in subfolders:
        if repeats < 1:
            result.notes.append(f"{folder.name}: 0 repeats, so this folder is not used (as in kohya)")
            continue
        if repeats > MAX_REPEATS:
            result.notes.append(
                f"{folder.name}: {repeats} repeats is more than {MAX_REPEATS}, so this folder is not used; "
                "rename it with a smaller count"
            )
            continue
        for nested, _, _ in _kohya_subfolders(folder):
            result.notes.append(
                f"{folder.name}/{nested.name} is not used: N_name folders are read only directly inside "
                f"{root}; move it there to train on it"
            )
        images = _list_images(folder, result)
        if not images:
            result.notes.append(f"{folder.name}: no images ({SUPPORTED_TYPES}), so it is skipped")
            continue
        tokens = class_tokens or config.class_token.strip()
        folders.append((_FolderSpec(folder.name, folder, repeats, tokens, is_reg), images))
    if not folders:
        result.errors.append(f"the {role} folder {root}: none of its N_name subfolders has images")
    return folders


def _note_ignored_entries(root: Path, result: ScannedDataset) -> None:
    loose_images = _list_images(root, result)
    if loose_images:
        result.notes.append(
            f"{len(loose_images)} image(s) directly in {root.name} are not used in the kohya layout; "
            "move them into an N_name subfolder to train on them"
        )
    for path in _entries(root):
        if _is_dir(path) and not path.name.startswith(".") and not KOHYA_FOLDER_PATTERN.match(path.name):
            nested = " (it holds N_name folders itself; choose it as the training folder?)"
            result.notes.append(
                f"folder {path.name} is ignored: its name does not start with a repeat count and '_' "
                f"(like 10_alice){nested if _kohya_subfolders(path) else ''}"
            )


def _scan_image(
    path: Path,
    spec: _FolderSpec,
    caption_extension: str,
    background: tuple[int, int, int],
    result: ScannedDataset,
) -> ImageRecord | None:
    try:
        probe = probe_image(path, background=background)
    except ImageLoadError as error:
        result.problems.append(FileProblem(path, str(error)))
        logger.warning("Left out: %s", error)
        return None
    notes = list(probe.notes)
    caption, caption_file = _read_caption(path, spec, caption_extension, notes)
    result.notes.extend(notes)
    for note in notes:
        logger.info("Dataset: %s", note)
    return ImageRecord(path, probe.width, probe.height, caption, caption_file, probe.dhash, tuple(notes))


def _read_caption(
    image: Path, spec: _FolderSpec, caption_extension: str, notes: list[str]
) -> tuple[str, Path | None]:
    caption_path = image.with_suffix(caption_extension)
    if not caption_path.is_file():
        return spec.class_tokens, None
    try:
        caption = read_caption_file(caption_path)
    except OSError as error:
        notes.append(f"{caption_path.name}: cannot be read ({error.strerror or error}); class token used")
        return spec.class_tokens, None
    if not caption.writable:
        notes.append(f"{caption.problem}; the class token is used instead")
        return spec.class_tokens, None
    if caption.problem:
        notes.append(f"{caption.problem}; check the accents and symbols in it")
    elif caption.has_bom:
        notes.append(
            f"{caption_path.name}: starts with a {caption.encoding} byte-order mark; read as "
            f"{caption.encoding} (kept so when it is rewritten)"
        )
    elif caption.encoding != "UTF-8":
        notes.append(f"{caption_path.name}: read as {caption.encoding} (kept so when it is rewritten)")
    if not caption.text:
        notes.append(f"{caption_path.name}: is empty; the class token is used instead")
        return spec.class_tokens, None
    return caption.text, caption_path


def _note_shared_captions(subset: Subset, caption_extension: str, result: ScannedDataset) -> None:
    by_caption: dict[Path, list[str]] = {}
    for record in subset.images:
        if record.caption_file is not None:
            by_caption.setdefault(record.caption_file, []).append(record.path.name)
    for caption_path, names in by_caption.items():
        if len(names) > 1:
            result.notes.append(f"{' and '.join(names)} share the caption file {caption_path.name}")


def _check_usable(config: TrainingConfig, result: ScannedDataset) -> None:
    if result.errors:
        return
    if not any(subset.images for subset in result.train_subsets):
        result.errors.append(
            f"no usable training images in {config.train_data_dir}: every image was left out "
            "(see the list of problems)"
        )
    elif config.reg_data_dir.strip() and not any(subset.images for subset in result.reg_subsets):
        result.errors.append(f"no usable regularisation images in {config.reg_data_dir}")
