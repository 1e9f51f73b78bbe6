"""Safe file writes: nothing a user owns is lost or left half-written.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` write to a hidden temporary name in the same
  folder and rename it into place, so a crash leaves either the old file or the new one.
* :func:`backup_before_overwrite` keeps a copy of a file before we replace it (captions above all).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

BACKUP_FOLDER_NAME = ".lora_trainer_backup"


def atomic_write_bytes(path: str | Path, data: bytes, *, temp_suffix: str = ".tmp") -> Path:
    """Write ``data`` to ``path`` so that readers never see a partial file.

    The temporary file starts with '.' and ends with ``temp_suffix``: A1111's Lora scan lists only
    ``.safetensors``/``.pt``/``.ckpt`` names, so it never picks up a file still being written.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=temp_suffix, dir=target.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temp_name, target)
    except BaseException:
        Path(temp_name).unlink(missing_ok=True)
        raise
    return target


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def backup_before_overwrite(path: str | Path) -> Path | None:
    """Copy ``path`` into a backup folder beside it, under a timestamped name; None if it is absent.

    Backups go to ``<folder>/.lora_trainer_backup/<name>.<YYYYmmdd-HHMMSS-ffffff>.bak`` so the user's
    folder keeps only their own files and no scanner mistakes a backup for a caption.
    """
    source = Path(path)
    if not source.is_file():
        return None
    backup_dir = source.parent / BACKUP_FOLDER_NAME
    backup_dir.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S") + f"-{time.time_ns() % 1_000_000_000:09d}"
    backup = backup_dir / f"{source.name}.{stamp}.bak"
    shutil.copy2(source, backup)
    return backup


def write_text_with_backup(path: str | Path, text: str) -> Path | None:
    """Atomically replace ``path`` with ``text``, backing up any previous content that differs."""
    target = Path(path)
    backup = None
    if target.is_file():
        if target.read_bytes() == text.encode("utf-8"):
            return None
        backup = backup_before_overwrite(target)
    atomic_write_text(target, text)
    return backup
