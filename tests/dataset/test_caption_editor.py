"""Caption editing for the tab: list, set one (atomic, backed up), bulk tag edits, frequency, undo."""

from __future__ import annotations

import codecs
import errno
import os
from pathlib import Path

import pytest

from lib_lora_trainer import files
from lib_lora_trainer.dataset import CaptionEditError, CaptionEditor
from lib_lora_trainer.files import BACKUP_FOLDER_NAME
from tests.dataset.helpers import config_for, save_photo


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "alice"
    save_photo(root / "a.png", seed=1, caption="ohwx, 1girl, red hair, smiling")
    save_photo(root / "b.jpg", seed=2, caption="1girl, Red Hair, outdoors")
    save_photo(root / "c.png", seed=3)  # no caption yet
    save_photo(root / "d.png", seed=4)
    (root / "d.txt").write_bytes("1girl, café".encode("cp1252"))  # a non-UTF-8 caption
    return root


def backups(root: Path) -> list[Path]:
    folder = root / BACKUP_FOLDER_NAME
    return sorted(p for p in folder.glob("*.bak")) if folder.is_dir() else []


def test_lists_images_with_their_captions(folder: Path):
    items = {item.image.name: item for item in CaptionEditor(folder).images()}

    assert list(items) == ["a.png", "b.jpg", "c.png", "d.png"]
    assert items["a.png"].caption == "ohwx, 1girl, red hair, smiling" and items["a.png"].has_caption_file
    assert items["c.png"].caption == "" and not items["c.png"].has_caption_file
    assert items["c.png"].caption_path == folder / "c.txt"
    assert items["d.png"].caption == "1girl, café" and "not valid UTF-8" in items["d.png"].problem


def test_set_caption_writes_atomically_and_backs_up_the_old_one(folder: Path):
    editor = CaptionEditor(folder)

    editor.set_caption(folder / "a.png", "ohwx,  1girl ,blue dress\n")
    editor.set_caption("c.png", "ohwx, 1girl")  # relative to the dataset folder; creates the file

    assert (folder / "a.txt").read_text(encoding="utf-8") == "ohwx, 1girl, blue dress\n"
    assert (folder / "c.txt").read_text(encoding="utf-8") == "ohwx, 1girl\n"
    [backup] = backups(folder)
    assert backup.name.startswith("a.txt.") and backup.read_text() == "ohwx, 1girl, red hair, smiling"
    assert not [p for p in folder.iterdir() if p.name.startswith(".a.txt")]  # no temporary file left
    with pytest.raises(CaptionEditError, match="not an image of this dataset"):
        editor.set_caption(folder.parent / "elsewhere.png", "x")


def test_bulk_tag_edits_and_frequency(folder: Path):
    editor = CaptionEditor(folder)

    added = editor.add_tag("ohwx", at_start=True)
    assert {p.name for p in added.changed} == {"b.txt", "d.txt"}  # a.txt already had it
    assert "1 image(s) without a caption file were not touched" in added.message
    assert (folder / "b.txt").read_text(encoding="utf-8") == "ohwx, 1girl, Red Hair, outdoors\n"

    replaced = editor.replace_tag("red hair", "auburn hair")  # case-insensitive match
    assert {p.name for p in replaced.changed} == {"a.txt", "b.txt"}

    removed = editor.remove_tag("1GIRL")
    assert len(removed.changed) == 3
    assert editor.tag_frequency() == {"ohwx": 3, "auburn hair": 2, "café": 1, "outdoors": 1, "smiling": 1}
    assert (folder / "a.txt").read_text(encoding="utf-8") == "ohwx, auburn hair, smiling\n"

    only_a = editor.add_tag("solo", images=["a.png", folder / "c.png"])
    assert [p.name for p in only_a.changed] == ["a.txt"]  # c.png has no caption file: not touched

    with pytest.raises(CaptionEditError, match="comma"):
        editor.add_tag("a, b")
    with pytest.raises(CaptionEditError, match="empty"):
        editor.remove_tag("  ")


def test_undo_restores_the_exact_bytes_even_from_a_new_editor(folder: Path):
    original = {name: (folder / name).read_bytes() for name in ("a.txt", "b.txt", "d.txt")}
    CaptionEditor(folder).remove_tag("1girl")
    assert CaptionEditor(folder).last_bulk_edit() == "remove tag '1girl'"

    result = CaptionEditor(folder).undo_last_bulk_edit()  # e.g. after the page was reloaded

    assert {p.name for p in result.changed} == {"a.txt", "b.txt", "d.txt"}
    assert {name: (folder / name).read_bytes() for name in original} == original  # cp1252 bytes included
    assert not CaptionEditor(folder).can_undo()
    with pytest.raises(CaptionEditError, match="no bulk edit to undo"):
        CaptionEditor(folder).undo_last_bulk_edit()


def test_undo_only_undoes_the_last_bulk_edit_and_spares_later_edits(folder: Path):
    editor = CaptionEditor(folder)
    editor.add_tag("solo")
    after_first = (folder / "b.txt").read_bytes()
    editor.add_tag("happy")
    editor.set_caption("a.png", "hand edited")  # after the bulk edit: must survive the undo

    result = editor.undo_last_bulk_edit()

    assert [p.name for p in result.skipped] == ["a.txt"]
    assert "1 edited since then were left as they are" in result.message
    assert (folder / "a.txt").read_text(encoding="utf-8") == "hand edited\n"
    assert (folder / "b.txt").read_bytes() == after_first  # back to the state after "add solo"


def test_kohya_layout_edits_every_subfolder(tmp_path: Path):
    save_photo(tmp_path / "10_alice" / "a.png", caption="1girl")
    save_photo(tmp_path / "3_alice" / "b.png", seed=1, caption="1girl, hat")
    save_photo(tmp_path / "notes" / "c.png", seed=2, caption="1girl")  # not an N_name folder: ignored
    editor = CaptionEditor.from_config(config_for(tmp_path, dataset_layout="kohya"))

    assert [item.image.name for item in editor.images()] == ["a.png", "b.png"]
    assert len(editor.add_tag("ohwx", at_start=True).changed) == 2
    assert (tmp_path / "notes" / "c.txt").read_text(encoding="utf-8") == "1girl"
    editor.undo_last_bulk_edit()
    assert (tmp_path / "3_alice" / "b.txt").read_text(encoding="utf-8") == "1girl, hat"


def test_missing_folder_is_a_clear_error(tmp_path: Path):
    with pytest.raises(CaptionEditError, match="does not exist"):
        CaptionEditor(tmp_path / "missing")


# --- the user's files: encodings, failures part-way, links, extensions ---------------------------------
def fail_writes_to(monkeypatch, name: str, code: int = errno.EACCES) -> None:
    """Make replacing the file called ``name`` fail as a read-only/locked file or a full disk would
    (tests run as root, where chmod does not stop a write)."""
    real_replace = files.os.replace

    def replace(source, target, *args, **kwargs):
        if Path(target).name == name:
            raise OSError(code, os.strerror(code), str(target))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(files.os, "replace", replace)


@pytest.mark.parametrize("code", [errno.EACCES, errno.ENOSPC])
def test_a_bulk_edit_that_fails_part_way_changes_nothing_and_undo_stays_exact(folder, monkeypatch, code):
    editor = CaptionEditor(folder)
    editor.add_tag("solo")  # the previous bulk edit, which Undo must still undo afterwards
    before = {name: (folder / name).read_bytes() for name in ("a.txt", "b.txt", "d.txt")}
    fail_writes_to(monkeypatch, "d.txt", code)  # a.txt and b.txt are written first

    with pytest.raises(CaptionEditError) as raised:
        editor.add_tag("happy")

    message = str(raised.value)
    assert "d.txt could not be written" in message and "nothing changed" in message
    assert {name: (folder / name).read_bytes() for name in before} == before
    assert editor.last_bulk_edit() == "add tag 'solo'"
    monkeypatch.undo()
    editor.undo_last_bulk_edit()
    assert (folder / "a.txt").read_text(encoding="utf-8") == "ohwx, 1girl, red hair, smiling"


def test_a_bulk_edit_whose_rollback_fails_journals_exactly_what_was_written(folder, monkeypatch):
    editor = CaptionEditor(folder)
    original_a = (folder / "a.txt").read_bytes()
    real_replace = files.os.replace
    calls = {"a.txt": 0}

    def replace(source, target, *args, **kwargs):
        name = Path(target).name
        if name == "b.txt":
            raise OSError(errno.EACCES, "Permission denied", str(target))
        if name == "a.txt":
            calls["a.txt"] += 1
            if calls["a.txt"] > 1:  # the roll-back of a.txt fails too (the disk is now full)
                raise OSError(errno.ENOSPC, "No space left on device", str(target))
        return real_replace(source, target, *args, **kwargs)

    monkeypatch.setattr(files.os, "replace", replace)
    with pytest.raises(CaptionEditError, match="1 caption.s. already changed could not be put back"):
        editor.add_tag("happy")
    monkeypatch.undo()

    assert (folder / "a.txt").read_bytes() != original_a
    result = editor.undo_last_bulk_edit()
    assert [p.name for p in result.changed] == ["a.txt"] and (folder / "a.txt").read_bytes() == original_a


def test_an_undo_that_fails_part_way_keeps_the_rest_for_the_next_undo(folder, monkeypatch):
    editor = CaptionEditor(folder)
    original = {name: (folder / name).read_bytes() for name in ("a.txt", "b.txt", "d.txt")}
    editor.add_tag("happy")
    fail_writes_to(monkeypatch, "b.txt")
    with pytest.raises(CaptionEditError, match="b.txt could not be restored"):
        editor.undo_last_bulk_edit()
    monkeypatch.undo()
    assert editor.can_undo()
    editor.undo_last_bulk_edit()
    assert {name: (folder / name).read_bytes() for name in original} == original


def test_a_failed_single_save_is_one_sentence(folder, monkeypatch):
    fail_writes_to(monkeypatch, "a.txt")
    with pytest.raises(CaptionEditError, match=r"a.txt could not be saved \(Permission denied\); check"):
        CaptionEditor(folder).set_caption("a.png", "x")


UTF16_CAPTIONS = {
    "utf16le_bom": codecs.BOM_UTF16_LE + "1girl, café, 着物\r\n".encode("utf-16-le"),  # PowerShell '>'
    "utf16be_bom": codecs.BOM_UTF16_BE + "1girl, café, 着物\r\n".encode("utf-16-be"),
    "utf16le_bare": "1girl, café, 着物\n".encode("utf-16-le"),
    "utf8_bom": codecs.BOM_UTF8 + "1girl, café, 着物\n".encode(),
    "utf32le_bom": codecs.BOM_UTF32_LE + "1girl, café, 着物\n".encode("utf-32-le"),
}


@pytest.mark.parametrize("kind", sorted(UTF16_CAPTIONS))
def test_utf16_captions_are_read_and_rewritten_in_their_own_encoding(tmp_path: Path, kind: str):
    save_photo(tmp_path / "a.png", seed=1)
    raw = UTF16_CAPTIONS[kind]
    (tmp_path / "a.txt").write_bytes(raw)
    editor = CaptionEditor(tmp_path)

    [item] = editor.images()
    assert item.caption == "1girl, café, 着物" and item.problem is None

    editor.add_tag("smile")
    decoded = files.decode_text((tmp_path / "a.txt").read_bytes())
    assert decoded.text.strip() == "1girl, café, 着物, smile"
    assert decoded.bom == files.decode_text(raw).bom and decoded.encoding == files.decode_text(raw).encoding
    assert decoded.text.endswith("\r\n") == files.decode_text(raw).text.endswith("\r\n")  # its line ending
    editor.undo_last_bulk_edit()
    assert (tmp_path / "a.txt").read_bytes() == raw


def test_a_caption_that_is_not_text_is_never_rewritten(tmp_path: Path):
    save_photo(tmp_path / "a.png", seed=1, caption="1girl")
    save_photo(tmp_path / "b.png", seed=2)
    garbage = b"\x00\x01\x02binary\x00\xff\x00" * 3
    (tmp_path / "b.txt").write_bytes(garbage)
    editor = CaptionEditor(tmp_path)

    items = {item.image.name: item for item in editor.images()}
    assert not items["b.png"].writable and "not text" in items["b.png"].problem
    result = editor.add_tag("solo")
    assert [p.name for p in result.changed] == ["a.txt"] and "1 left as they are" in result.message
    with pytest.raises(CaptionEditError, match="b.txt is not a text file .* not rewritten"):
        editor.set_caption("b.png", "1girl")
    assert (tmp_path / "b.txt").read_bytes() == garbage


def test_a_cp1252_caption_that_cannot_hold_the_new_tag_is_refused_not_garbled(folder: Path):
    editor = CaptionEditor(folder)
    before = (folder / "d.txt").read_bytes()
    result = editor.add_tag("着物")
    assert "d.txt is Windows-1252 and cannot hold '着物'" in result.message
    assert (folder / "d.txt").read_bytes() == before
    assert "a.txt" in {p.name for p in result.changed}


@pytest.mark.parametrize("extension", [".png", ".PNG", ".jpg", ".webp", ".gif", ".heic", ".x.png", "txt"])
def test_a_caption_extension_that_names_an_image_is_refused(folder: Path, extension: str):
    image_bytes = (folder / "a.png").read_bytes()
    with pytest.raises(CaptionEditError, match="caption extension"):
        CaptionEditor(folder, caption_extension=extension)
    assert (folder / "a.png").read_bytes() == image_bytes


def test_an_unreadable_caption_is_reported_alone(folder: Path, monkeypatch):
    real_read = Path.read_bytes

    def read_bytes(self):
        if self.name == "b.txt":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    items = {item.image.name: item for item in CaptionEditor(folder).images()}
    assert items["a.png"].caption.startswith("ohwx")
    assert (
        items["b.jpg"].problem == "b.txt cannot be read (Permission denied)" and not items["b.jpg"].writable
    )


def test_an_unreadable_kohya_subfolder_is_skipped_and_named(tmp_path: Path, monkeypatch):
    save_photo(tmp_path / "10_alice" / "a.png", caption="1girl")
    save_photo(tmp_path / "3_alice" / "b.png", seed=1, caption="1girl, hat")
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self.name == "3_alice":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    editor = CaptionEditor.from_config(config_for(tmp_path, dataset_layout="kohya"))
    assert [item.image.name for item in editor.images()] == ["a.png"]
    assert editor.listing_problems == ["cannot list 3_alice (Permission denied); its images are not shown"]


def test_a_symlinked_caption_stays_a_link_after_save(tmp_path: Path):
    shared = tmp_path / "shared.txt"
    shared.write_text("1girl\n", encoding="utf-8")
    root = tmp_path / "alice"
    save_photo(root / "a.png", seed=1)
    (root / "a.txt").symlink_to(shared)

    CaptionEditor(root).set_caption("a.png", "1girl, smile")

    assert (root / "a.txt").is_symlink()
    assert shared.read_text(encoding="utf-8") == "1girl, smile\n"


def test_a_250_character_image_name_can_be_captioned(tmp_path: Path):
    name = "a" * 246 + ".png"
    save_photo(tmp_path / name, seed=1)
    editor = CaptionEditor(tmp_path)
    editor.set_caption(name, "1girl")
    editor.set_caption(name, "1girl, smile")  # replaces: a backup with a bounded name
    assert (tmp_path / ("a" * 246 + ".txt")).read_text(encoding="utf-8") == "1girl, smile\n"
