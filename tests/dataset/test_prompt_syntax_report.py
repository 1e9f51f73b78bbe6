"""The dataset report names the captions that hold A1111 prompt syntax and says how they are trained."""

from __future__ import annotations

from pathlib import Path

from lib_lora_trainer.dataset import build_report, scan_dataset
from tests.dataset.helpers import config_for, make_folder


def prompt_syntax_warning(folder: Path, **options):
    config = config_for(folder, trigger_word="ohwx", **options)
    report = build_report(scan_dataset(config), config)
    return next((w for w in report.warnings if w.code == "prompt_syntax"), None)


def test_captions_with_prompt_syntax_are_named(tmp_path: Path):
    folder = make_folder(tmp_path / "alice", 4, caption="ohwx, smiling")
    (folder / "img_001.txt").write_text("ohwx, ganyu (genshin impact)", encoding="utf-8")
    (folder / "img_002.txt").write_text("ohwx, (smile:1.2) BREAK outdoors", encoding="utf-8")
    (folder / "img_003.txt").write_text(r"ohwx, ganyu \(genshin impact\)", encoding="utf-8")  # escaped

    literal = prompt_syntax_warning(folder)
    assert literal is not None
    assert literal.files == ("alice/img_001.png", "alice/img_002.png")
    assert "(...)" in literal.message and "(...:w)" in literal.message and "BREAK" in literal.message
    assert "plain text" in literal.message and "Weighted captions" in literal.message

    weighted = prompt_syntax_warning(folder, weighted_captions=True)
    assert "read as weights" in weighted.message


def test_plain_captions_give_no_warning(tmp_path: Path):
    assert prompt_syntax_warning(make_folder(tmp_path / "alice", 3, caption="ohwx, smiling")) is None
