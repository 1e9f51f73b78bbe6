from __future__ import annotations

import pytest

from lib_lora_trainer.captioning import (
    ExistingCaptionMode,
    compose_caption,
    display_tag,
    parse_tag_list,
    tag_key,
    unique_tags,
)


def test_tag_list_ignores_spacing_empty_entries_and_line_breaks():
    text = "  long_hair ,smile,, \n Blue  Eyes  ,\r\n^_^ ,"
    assert parse_tag_list(text) == ["long_hair", "smile", "Blue Eyes", "^_^"]
    assert parse_tag_list("") == []
    assert parse_tag_list(None) == []


def test_tag_key_treats_underscores_case_and_spacing_alike():
    assert tag_key("Long_Hair") == tag_key(" long  hair ") == "long hair"
    assert tag_key("^_^") == tag_key("^ ^")
    assert tag_key("smile") != tag_key("smiles")


@pytest.mark.parametrize(
    ("tag", "shown"),
    [
        ("long_hair", "long hair"),
        ("alice_(wonderland)", "alice (wonderland)"),
        ("^_^", "^_^"),
        ("(o)_(o)", "(o)_(o)"),
        ("||_||", "||_||"),
        ("x_x", "x_x"),
        ("1girl", "1girl"),
    ],
)
def test_underscores_become_spaces_except_in_kaomoji(tag, shown):
    assert display_tag(tag) == shown
    assert display_tag(tag, replace_underscores=False) == tag


def test_unique_tags_keeps_first_spelling_and_order():
    tags = ["alice", "long hair", "Long_Hair", "smile", "ALICE"]
    assert unique_tags(tags) == ["alice", "long hair", "smile"]


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        (ExistingCaptionMode.OVERWRITE, ["alice", "smile", "1girl"]),
        (ExistingCaptionMode.SKIP, ["alice", "smile", "1girl"]),
        (ExistingCaptionMode.APPEND, ["alice", "red dress", "1girl", "smile"]),
        (ExistingCaptionMode.PREPEND, ["alice", "smile", "1girl", "red dress"]),
    ],
)
def test_compose_caption_puts_trigger_first_in_every_mode(mode, expected):
    existing = ["red dress", "alice", "1girl"]
    new = ["smile", "1girl"]
    assert compose_caption(["alice"], new, existing, mode) == expected


def test_existing_caption_mode_parse_accepts_strings_and_rejects_unknown():
    assert ExistingCaptionMode.parse(" Append ") is ExistingCaptionMode.APPEND
    assert ExistingCaptionMode.parse(ExistingCaptionMode.SKIP) is ExistingCaptionMode.SKIP
    with pytest.raises(ValueError, match="skip, append, prepend, overwrite"):
        ExistingCaptionMode.parse("replace")
