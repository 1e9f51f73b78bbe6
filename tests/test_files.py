"""Safe file writes: the mode, owner and links of what we replace are kept, names stay short, our own
temporaries (and only ours) are cleaned up, and text is read whatever its byte-order mark."""

from __future__ import annotations

import codecs
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from lib_lora_trainer import files

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@posix_only
def test_a_replaced_file_keeps_its_mode(tmp_path: Path):
    for mode in (0o644, 0o664, 0o640, 0o600):
        target = tmp_path / f"caption-{mode:o}.txt"
        target.write_text("old")
        os.chmod(target, mode)
        files.atomic_write_text(target, "new")
        assert target.read_text() == "new" and mode_of(target) == mode


@posix_only
def test_a_new_file_gets_the_umask_default_not_0600(tmp_path: Path):
    previous = os.umask(0o002)
    try:
        files.atomic_write_bytes(tmp_path / "epoch-000001.safetensors", b"x")
        files.atomic_write_bytes(tmp_path / "sub" / "card.json", b"{}")
    finally:
        os.umask(previous)
    assert mode_of(tmp_path / "epoch-000001.safetensors") == 0o664
    assert mode_of(tmp_path / "sub" / "card.json") == 0o664
    assert files.current_umask() == previous


@posix_only
def test_every_writer_goes_through_the_helper_and_keeps_the_umask_default(tmp_path: Path):
    """Cards, previews, epoch files, samples, latents and backups: none ends up 0600."""
    from lib_lora_trainer.dataset.caption_files import write_caption_file

    caption = tmp_path / "a.txt"
    caption.write_text("old")
    os.chmod(caption, 0o644)
    previous = os.umask(0o022)
    try:
        backup = write_caption_file(caption, "new")
    finally:
        os.umask(previous)
    assert mode_of(caption) == 0o644 and backup is not None and mode_of(backup) == 0o644
    source = Path(files.__file__).parent
    words = ("mkstemp", "NamedTemporaryFile", "os.replace")
    offenders = [
        str(path.relative_to(source))
        for path in source.rglob("*.py")
        if path.name not in ("files.py", "install_support.py")
        and any(word in path.read_text(encoding="utf-8") for word in words)
    ]
    assert offenders == []  # one atomic-write helper for the whole library


@posix_only
def test_a_symlinked_caption_is_written_through_and_stays_a_link(tmp_path: Path):
    shared = tmp_path / "shared"
    shared.mkdir()
    real = shared / "alice.txt"
    real.write_text("old")
    os.chmod(real, 0o644)
    link = tmp_path / "a.txt"
    link.symlink_to(real)

    files.atomic_write_text(link, "new")

    assert link.is_symlink() and os.readlink(link) == str(real)
    assert real.read_text() == "new" and mode_of(real) == 0o644
    assert [p.name for p in shared.iterdir()] == ["alice.txt"]  # the temporary lived beside the target


def test_a_dangling_link_whose_folder_is_gone_is_refused_clearly(tmp_path: Path):
    link = tmp_path / "a.txt"
    link.symlink_to(tmp_path / "gone" / "a.txt")
    with pytest.raises(FileNotFoundError, match="is a link to .* whose folder does not exist"):
        files.atomic_write_text(link, "new")


def test_the_temporary_name_is_short_for_a_250_character_name(tmp_path: Path):
    long_name = "a" * 250 + ".txt"  # 254 characters: the old ".<name>.<random>.tmp" could not be made
    files.atomic_write_text(tmp_path / long_name, "caption")
    assert (tmp_path / long_name).read_text() == "caption"
    backup = files.backup_before_overwrite(tmp_path / long_name)
    assert backup is not None and len(backup.name) <= 255 and backup.read_text() == "caption"


def test_a_failed_write_leaves_no_temporary(tmp_path: Path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", full_disk)
    with pytest.raises(OSError):
        files.atomic_write_text(tmp_path / "a.txt", "x")
    assert list(tmp_path.iterdir()) == []


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_only_our_stale_temporaries_are_removed(tmp_path: Path):
    stale = tmp_path / f".lora_trainer-{_dead_pid()}-0123abcd.tmp"  # a killed save's
    live = tmp_path / f".lora_trainer-{os.getppid()}-0123abcd.tmp"  # another live process is writing it
    user_files = [
        tmp_path / ".a.txt.tmp",
        tmp_path / "notes.tmp",
        tmp_path / ".lora_trainer-notes.tmp",
        tmp_path / f".lora_trainer-{_dead_pid()}-0123abcd.tmp.txt",
    ]
    for path in (stale, live, *user_files):
        path.write_text("x")

    removed = files.remove_stale_temporaries(tmp_path)

    assert removed == [stale] and not stale.exists() and live.exists()
    assert all(path.exists() for path in user_files)
    assert files.remove_stale_temporaries(tmp_path / "missing") == []


def test_a_killed_save_is_cleaned_up_at_the_next_scan(tmp_path: Path):
    from lib_lora_trainer.dataset import CaptionEditor, scan_dataset
    from tests.dataset.helpers import config_for, save_photo

    save_photo(tmp_path / "a.png", seed=1, caption="alice")
    left = tmp_path / f".lora_trainer-{_dead_pid()}-0123abcd.tmp"
    left.write_text("half a caption")
    scan_dataset(config_for(tmp_path, flat_repeats=1))
    assert not left.exists()
    left.write_text("half a caption")
    CaptionEditor(tmp_path)
    assert not left.exists()


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        (codecs.BOM_UTF8 + "1girl, café".encode(), "UTF-8"),
        (codecs.BOM_UTF16_LE + "1girl, café".encode("utf-16-le"), "UTF-16 LE"),
        (codecs.BOM_UTF16_BE + "1girl, café".encode("utf-16-be"), "UTF-16 BE"),
        (codecs.BOM_UTF32_LE + "1girl, café".encode("utf-32-le"), "UTF-32 LE"),
        (codecs.BOM_UTF32_BE + "1girl, café".encode("utf-32-be"), "UTF-32 BE"),
        ("1girl, café".encode("utf-16-le"), "UTF-16 LE without a byte-order mark"),
        ("1girl, café".encode("utf-16-be"), "UTF-16 BE without a byte-order mark"),
        ("1girl, café".encode(), "UTF-8"),
    ],
)
def test_text_is_decoded_whatever_its_byte_order_mark(raw: bytes, label: str):
    decoded = files.decode_text(raw)
    assert decoded.text == "1girl, café" and decoded.label == label and decoded.exact
    assert decoded.encode(decoded.text) == raw  # written back exactly as it was


def test_binary_content_is_not_text():
    decoded = files.decode_text(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x01")
    assert not decoded.is_text and "NUL" in decoded.problem


def test_settings_files_in_utf16_or_a_folder_are_read_or_refused_in_one_sentence(tmp_path: Path):
    utf16 = tmp_path / "config.json"
    utf16.write_bytes(codecs.BOM_UTF16_LE + '{"epochs": 3}'.encode("utf-16-le"))  # PowerShell's ">"
    assert files.read_text_file(utf16) == '{"epochs": 3}'
    with pytest.raises(IsADirectoryError, match="is a folder, not a file"):
        files.read_text_file(tmp_path)


def test_a_read_only_file_is_not_replaced(tmp_path: Path, monkeypatch):
    target = tmp_path / "a.txt"
    target.write_text("mine")
    real_access = os.access
    monkeypatch.setattr(files.os, "access", lambda p, m: False if Path(p) == target else real_access(p, m))
    with pytest.raises(PermissionError, match="read-only"):
        files.atomic_write_text(target, "new")
    assert target.read_text() == "mine" and [p.name for p in tmp_path.iterdir()] == ["a.txt"]
