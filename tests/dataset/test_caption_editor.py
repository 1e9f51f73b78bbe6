"""Caption editing for the tab: list, set one (atomic, backed up), bulk tag edits, frequency, undo."""

from __future__ import annotations

from pathlib import Path

import pytest

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
