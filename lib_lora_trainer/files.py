"""Safe file writes: nothing a user owns is lost, left half-written, or changes its mode.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` write to a short hidden temporary name in the
  same folder and rename it into place, so a crash leaves either the old file or the new one. The new
  file keeps the old one's mode (and owner, where we may set it); a new file gets the umask's default,
  as ``open()`` would give it. A symlink is written through: its target is replaced, the link stays.
* Our temporaries are named ``.lora_trainer-<pid>-<random>.tmp``; :func:`remove_stale_temporaries`
  deletes the ones a killed process left behind (and only those: never a user's file).
* :func:`backup_before_overwrite` keeps a copy of a file before we replace it (captions above all).
* :func:`decode_text` / :func:`read_text_file` read a text file whatever its byte-order mark
  (UTF-8, UTF-16 and UTF-32, with or without a BOM for UTF-16), so a file saved by PowerShell or
  Notepad is read as what the user wrote.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import hashlib
import os
import re
import secrets
import shutil
import stat
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

BACKUP_FOLDER_NAME = ".lora_trainer_backup"
TEMP_PREFIX = ".lora_trainer-"
TEMP_SUFFIX = ".tmp"
_TEMP_PATTERN = re.compile(r"^\.lora_trainer-(\d+)-[0-9a-f]{8}\.tmp$")
# A temporary of another live process (a second WebUI) is left alone unless it is this old.
STALE_TEMP_AGE_S = 6 * 3600
MAX_FILE_NAME_BYTES = 255  # ext4, NTFS, APFS, btrfs: a name (not a path) of at most 255 bytes

_in_flight: set[str] = set()  # temporaries this process is writing right now
_in_flight_lock = threading.Lock()
_umask_lock = threading.Lock()


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that readers never see a partial file; returns ``path``.

    The temporary file starts with '.' and ends with ``.tmp``: A1111's Lora scan lists only
    ``.safetensors``/``.pt``/``.ckpt`` names, so it never picks up a file still being written.
    """
    link = Path(path)
    target = _write_target(link)
    target.parent.mkdir(parents=True, exist_ok=True)
    existing = _stat_or_none(target)
    if existing is not None and not os.access(target, os.W_OK):  # the user made it read-only
        raise PermissionError(errno.EACCES, "the file is read-only", str(target))
    temp = target.parent / f"{TEMP_PREFIX}{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}"
    with _in_flight_lock:
        _in_flight.add(str(temp))
    try:
        handle = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o600)
        with os.fdopen(handle, "wb") as stream:
            stream.write(data)
            stream.flush()
            os.fsync(stream.fileno())
        _copy_ownership(existing, temp)
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    finally:
        with _in_flight_lock:
            _in_flight.discard(str(temp))
    return link


def atomic_write_text(path: str | Path, text: str, *, encoding: str = "utf-8") -> Path:
    return atomic_write_bytes(path, text.encode(encoding))


def _write_target(path: Path) -> Path:
    """The file a write to ``path`` replaces: the target of a symlink (so the link is kept)."""
    if not path.is_symlink():
        return path
    target = Path(os.path.realpath(path))
    if not target.parent.is_dir():
        raise FileNotFoundError(
            f"{path.name} is a link to {target}, whose folder does not exist; fix or remove the link"
        )
    return target


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return path.stat()
    except OSError:
        return None


def _copy_ownership(existing: os.stat_result | None, temp: Path) -> None:
    """Give ``temp`` the replaced file's mode and owner, or a new file's default mode."""
    if existing is None:
        os.chmod(temp, 0o666 & ~current_umask())
        return
    if hasattr(os, "chown"):
        with contextlib.suppress(OSError):  # only root may give a file away; the mode still follows
            os.chown(temp, existing.st_uid, existing.st_gid)
    os.chmod(temp, stat.S_IMODE(existing.st_mode))


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def is_our_temporary(path: str | Path) -> bool:
    return _TEMP_PATTERN.match(Path(path).name) is not None


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporaries a killed save left in ``folder`` (ours only); returns what was removed.

    A temporary is stale when its process is gone (or it is older than :data:`STALE_TEMP_AGE_S`) and
    this process is not writing it now. Never raises: cleaning up must not stop the work.
    """
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_PATTERN.match(entry.name)
        if match is None or not _is_stale(entry, int(match.group(1))):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except OSError:
            pass
    return removed


def _is_stale(path: Path, pid: int) -> bool:
    with _in_flight_lock:
        if str(path) in _in_flight:
            return False
    if pid == os.getpid():
        return True  # not being written by us now, so left by an earlier failure
    try:
        age = time.time() - path.lstat().st_mtime
    except OSError:
        return False
    return age > STALE_TEMP_AGE_S or not _process_alive(pid)


def _process_alive(pid: int) -> bool:
    if sys.platform == "win32":  # os.kill(pid, 0) would send CTRL_C there; rely on the age instead
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, but another user's
        return True
    return True


def bounded_file_name(name: str, suffix: str) -> str:
    """``name + suffix``, with ``name`` shortened (and a hash of it added) when the whole would pass
    the 255-byte limit of a file name."""
    whole = name + suffix
    if len(os.fsencode(whole)) <= MAX_FILE_NAME_BYTES:
        return whole
    tag = "~" + hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    room = MAX_FILE_NAME_BYTES - len(os.fsencode(suffix + tag))
    short = name
    while len(os.fsencode(short)) > room:
        short = short[:-1]
    return short + tag + suffix


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
    backup = backup_dir / bounded_file_name(source.name, f".{stamp}.bak")
    shutil.copy2(source, backup)
    return backup


def write_bytes_with_backup(path: str | Path, data: bytes) -> Path | None:
    """Atomically replace ``path`` with ``data``, backing up any previous content that differs."""
    target = Path(path)
    backup = None
    if target.is_file():
        if target.read_bytes() == data:
            return None
        backup = backup_before_overwrite(target)
    atomic_write_bytes(target, data)
    return backup


def write_text_with_backup(path: str | Path, text: str) -> Path | None:
    """Atomically replace ``path`` with ``text`` (UTF-8), backing up previous content that differs."""
    return write_bytes_with_backup(path, text.encode("utf-8"))


# --- reading text whatever its encoding ------------------------------------------------------------
_BOMS = (  # longest first: UTF-32 LE starts with the UTF-16 LE mark
    (codecs.BOM_UTF32_LE, "utf-32-le", "UTF-32 LE"),
    (codecs.BOM_UTF32_BE, "utf-32-be", "UTF-32 BE"),
    (codecs.BOM_UTF8, "utf-8", "UTF-8"),
    (codecs.BOM_UTF16_LE, "utf-16-le", "UTF-16 LE"),
    (codecs.BOM_UTF16_BE, "utf-16-be", "UTF-16 BE"),
)


@dataclass(frozen=True)
class DecodedText:
    text: str
    encoding: str  # the codec that writes the text back as the file had it (without the BOM)
    bom: bytes = b""  # the byte-order mark the file started with, written back with it
    label: str = "UTF-8"  # the encoding in words, for messages
    exact: bool = True  # False: the bytes were not valid in any encoding we know (a guess was used)
    is_text: bool = True  # False: NUL bytes are left after decoding (an image, a binary file)
    problem: str | None = None  # why the text may not be what the user wrote

    def encode(self, text: str) -> bytes:
        """``text`` in this file's own encoding, with its BOM; UnicodeEncodeError if it cannot hold it."""
        return self.bom + text.encode(self.encoding)


def decode_text(raw: bytes) -> DecodedText:
    """Decode a text file's bytes: BOM first, then BOM-less UTF-16 (its NUL pattern), then UTF-8, then
    Windows-1252/Latin-1 (a guess, reported). Binary content (NUL bytes left) is reported as such."""
    for bom, encoding, label in _BOMS:
        if raw.startswith(bom):
            try:
                return _checked(raw[len(bom) :].decode(encoding), encoding, bom, label)
            except UnicodeDecodeError:
                return _guess(raw, f"starts with a {label} byte-order mark but is not valid {label}")
    utf16 = _bomless_utf16(raw)
    if utf16 is not None:
        try:
            label = f"UTF-16 {utf16[-2:].upper()} without a byte-order mark"
            return _checked(raw.decode(utf16), utf16, b"", label)
        except UnicodeDecodeError:
            pass
    try:
        return _checked(raw.decode("utf-8"), "utf-8", b"", "UTF-8")
    except UnicodeDecodeError:
        return _guess(raw, "is not valid UTF-8")


def _checked(text: str, encoding: str, bom: bytes, label: str) -> DecodedText:
    if "\x00" in text:
        why = f"holds NUL bytes, so it is not {label} text"
        return DecodedText(text, encoding, bom, label, exact=False, is_text=False, problem=why)
    return DecodedText(text, encoding, bom, label)


def _guess(raw: bytes, why: str) -> DecodedText:
    try:
        text, encoding, label = raw.decode("cp1252"), "cp1252", "Windows-1252"
    except UnicodeDecodeError:
        text, encoding, label = raw.decode("latin-1"), "latin-1", "Latin-1"
    if "\x00" in text:
        problem = f"{why} and holds NUL bytes, so it is not text"
        return DecodedText(text, encoding, b"", label, exact=False, is_text=False, problem=problem)
    problem = f"{why}; read it as Windows-1252/Latin-1"
    return DecodedText(text, encoding, b"", label, exact=False, problem=problem)


def _bomless_utf16(raw: bytes) -> str | None:
    """'utf-16-le'/'utf-16-be' when ``raw`` has UTF-16's pattern of NULs (one in every pair, on the
    same side), as text with Latin letters has; None otherwise."""
    if len(raw) < 2 or len(raw) % 2 or b"\x00" not in raw:
        return None
    pairs = len(raw) // 2
    odd_nuls = raw[1::2].count(0)
    even_nuls = raw[0::2].count(0)
    if odd_nuls >= pairs / 2 and even_nuls == 0:
        return "utf-16-le"
    if even_nuls >= pairs / 2 and odd_nuls == 0:
        return "utf-16-be"
    return None


def read_text_file(path: str | Path) -> str:
    """The text of a settings file, whatever its encoding; ValueError (one sentence) when it is a
    folder, or not text."""
    file = Path(path)
    if file.is_dir():
        raise IsADirectoryError(f"{file} is a folder, not a file; choose the .json file inside it")
    decoded = decode_text(file.read_bytes())
    if not decoded.exact:
        raise ValueError(f"{file.name} {decoded.problem}; save it as UTF-8")
    return decoded.text
