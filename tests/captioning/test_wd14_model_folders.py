"""Tagger model folders: a failed download leaves nothing behind, and a model placed by hand is found in
any folder (one or two levels below the tagger folder) that holds model.onnx and selected_tags.csv."""

from __future__ import annotations

import contextlib

import pytest

from lib_lora_trainer.captioning.wd14_models import (
    TaggerModelUnavailable,
    ensure_model_files,
    installed_models,
)
from lib_lora_trainer.ui.actions import default_tagger_thresholds, tagger_models
from tests.captioning.wd14_fixtures import write_model_folder


def test_a_failed_download_leaves_no_lock_file_behind(tmp_path):
    (tmp_path / "notes.txt").write_text("the user's own file", encoding="utf-8")
    with pytest.raises(TaggerModelUnavailable):
        ensure_model_files("wd-swinv2-tagger-v3", tmp_path, endpoint="http://127.0.0.1:9")  # offline
    assert not list(tmp_path.rglob("*.lock"))
    assert sorted(path.name for path in tmp_path.rglob("*")) == ["notes.txt"]


def test_a_failed_download_into_an_existing_folder_keeps_its_files(tmp_path):
    folder = tmp_path / "wd-swinv2-tagger-v3"
    folder.mkdir()
    (folder / "selected_tags.csv").write_text("tag_id,name,category,count\n", encoding="utf-8")
    with contextlib.suppress(TaggerModelUnavailable):
        ensure_model_files("wd-swinv2-tagger-v3", tmp_path, endpoint="http://127.0.0.1:9")
    assert sorted(path.name for path in folder.rglob("*")) == ["selected_tags.csv"]


def test_a_model_placed_by_hand_is_found_under_its_folders_name(tmp_path):
    write_model_folder(tmp_path / "my-anime-tagger", size=64)
    write_model_folder(tmp_path / "SmilingWolf" / "wd-v1-4-convnext-tagger-v2", size=64)
    (tmp_path / "half-copied").mkdir()
    (tmp_path / "half-copied" / "model.onnx").write_bytes(b"x")

    found = installed_models(tmp_path)
    assert list(found) == ["wd-v1-4-convnext-tagger-v2", "my-anime-tagger"]  # built-in ones first
    assert found["wd-v1-4-convnext-tagger-v2"] == tmp_path / "SmilingWolf" / "wd-v1-4-convnext-tagger-v2"
    assert (
        ensure_model_files("my-anime-tagger", tmp_path, allow_download=False) == tmp_path / "my-anime-tagger"
    )
    assert ensure_model_files("wd-v1-4-convnext-tagger-v2", tmp_path, allow_download=False) == (
        tmp_path / "SmilingWolf" / "wd-v1-4-convnext-tagger-v2"
    )
    choices = tagger_models(tmp_path)
    assert (
        choices[:2] == ["wd-v1-4-convnext-tagger-v2", "my-anime-tagger"] and "wd-swinv2-tagger-v3" in choices
    )
    assert default_tagger_thresholds("my-anime-tagger") == (0.35, 0.85)
