"""Reading and writing caption files without losing a byte of what the user wrote.

The one place that reads and writes captions (training's scan, the caption editor, the tagger). A
caption is read whatever its encoding (UTF-8 with or without BOM, UTF-16 from PowerShell's ``>`` or
Notepad's "Unicode", UTF-32) and written back in that same encoding, with its BOM and its line ending.
A file whose encoding had to be guessed is rewritten only if the new text fits that guess byte for
byte; a file that is not text at all is never rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lib_lora_trainer.file_types import caption_extension_problem
from lib_lora_trainer.files import DecodedText, decode_text, write_bytes_with_backup


class CaptionFileError(ValueError):
    """A caption file that cannot be read or written safely; the message says what to do."""


@dataclass(frozen=True)
class CaptionText:
    text: str
    problem: str | None = None  # set when the file was not clean text and a fallback was used
    has_bom: bool = False  # the file started with a byte-order mark (kept when it is rewritten)
    encoding: str = "UTF-8"  # the file's encoding in words
    writable: bool = True  # False: the file is not text; it is never rewritten


def caption_path_for(image: str | Path, caption_extension: str) -> Path:
    """The caption file of ``image``; refuses an extension that would name an image (or a folder)."""
    problem = caption_extension_problem(caption_extension)
    if problem:
        raise CaptionFileError(problem)
    return Path(image).with_suffix(caption_extension)


def read_caption_file(path: str | Path) -> CaptionText:
    """The caption in ``path``; a file that is not clean text is reported, never refused. Line breaks
    become ", " so a multi-line caption stays one prompt. OSError when the file cannot be read."""
    decoded = decode_text(Path(path).read_bytes())
    problem = f"{Path(path).name} {decoded.problem}" if decoded.problem else None
    writable = decoded.is_text
    text = decoded.text if writable else ""
    lines = [line.strip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    caption = ", ".join(line for line in lines if line)
    return CaptionText(caption, problem, bool(decoded.bom), decoded.label, writable)


def caption_bytes(path: str | Path, text: str) -> bytes:
    """``text`` as the bytes the caption file ``path`` should hold: in the file's own encoding (BOM
    and line ending included) when it exists, UTF-8 for a new file. CaptionFileError when the
    existing file is not text, or its guessed encoding cannot hold ``text``."""
    file = Path(path)
    body = text.strip()
    if not file.is_file():
        return (body + "\n").encode("utf-8")
    raw = file.read_bytes()
    decoded = decode_text(raw)
    if not decoded.is_text:
        raise CaptionFileError(
            f"{file.name} is not a text file ({decoded.problem}), so it is not rewritten; "
            "check it, then delete or replace it"
        )
    newline = "\r\n" if "\r\n" in decoded.text else "\n"
    try:
        return decoded.encode(body + newline)
    except UnicodeEncodeError as error:
        raise CaptionFileError(_cannot_hold(file, decoded, body, error)) from error


def _cannot_hold(file: Path, decoded: DecodedText, text: str, error: UnicodeEncodeError) -> str:
    return (
        f"{file.name} is {decoded.label} and cannot hold {text[error.start : error.end]!r}; "
        "save it as UTF-8 in a text editor, then try again"
    )


def write_caption_file(path: str | Path, text: str) -> Path | None:
    """Replace the caption atomically in the file's own encoding, backing up the old one; returns the
    backup path, if any (None also when nothing changed)."""
    return write_bytes_with_backup(path, caption_bytes(path, text))


def caption_unchanged(path: str | Path, text: str) -> bool:
    """Whether writing ``text`` to ``path`` would leave its bytes as they are."""
    file = Path(path)
    try:
        return file.is_file() and file.read_bytes() == caption_bytes(file, text)
    except CaptionFileError:
        return False
