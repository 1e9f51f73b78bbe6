"""Reading and writing caption files without losing a byte of what the user wrote."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib_lora_trainer.files import write_text_with_backup


@dataclass(frozen=True)
class CaptionText:
    text: str
    problem: str | None = None  # set when the file was not clean UTF-8 and a fallback was used
    has_bom: bool = False  # the file started with a UTF-8 byte-order mark (Windows Notepad), not kept


def read_caption_file(path: str | Path) -> CaptionText:
    """The caption in ``path`` (UTF-8, BOM or not); a non-UTF-8 file is read as cp1252/latin-1 and
    reported, never refused. Line breaks become ", " so a multi-line caption stays one prompt."""
    raw = Path(path).read_bytes()
    problem = None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        try:
            text = raw.decode("cp1252")
        except UnicodeDecodeError:
            text = raw.decode("latin-1")
        problem = f"{Path(path).name} is not valid UTF-8; read it as Windows-1252/Latin-1"
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return CaptionText(", ".join(line for line in lines if line), problem, raw.startswith(b"\xef\xbb\xbf"))


def write_caption_file(path: str | Path, text: str) -> Path | None:
    """Replace the caption atomically, backing up the old one; returns the backup path, if any."""
    return write_text_with_backup(path, text.strip() + "\n")
