"""Training-time caption rules: trigger word first, keep tokens, shuffle, dropout, tag counting."""

from __future__ import annotations

import random

from lib_lora_trainer.dataset.caption_processing import (
    CaptionAugmentation,
    augment_caption,
    count_tags,
    has_trigger,
    put_trigger_first,
    split_tags,
)


def test_trigger_word_goes_first_once():
    assert put_trigger_first("1girl, smiling", "ohwx") == "ohwx, 1girl, smiling"
    assert put_trigger_first("1girl, OHWX , smiling", "ohwx") == "ohwx, 1girl, smiling"  # moved, not doubled
    assert put_trigger_first("", "ohwx") == "ohwx"
    assert put_trigger_first(" 1girl ,, smiling ", "") == "1girl, smiling"
    assert put_trigger_first("woman, smiling, ohwx", "ohwx, woman") == "ohwx, woman, smiling"
    assert has_trigger("woman, smiling, OHWX", "ohwx, woman") and not has_trigger("woman", "ohwx, woman")


def test_without_augmentation_the_caption_is_untouched():
    caption = "ohwx, 1girl, smiling"
    assert augment_caption(caption, CaptionAugmentation(keep_tokens=1), random.Random(0)) == caption
    assert not CaptionAugmentation(keep_tokens=3).varies


def test_shuffle_keeps_the_first_keep_tokens_in_place():
    caption = "ohwx, woman, a, b, c, d, e"
    settings = CaptionAugmentation(shuffle=True, keep_tokens=2)
    rng = random.Random(1)
    results = [split_tags(augment_caption(caption, settings, rng)) for _ in range(200)]

    assert all(tags[:2] == ["ohwx", "woman"] for tags in results)
    assert all(sorted(tags[2:]) == ["a", "b", "c", "d", "e"] for tags in results)
    assert len({tuple(tags) for tags in results}) > 50  # 120 possible orders


def test_caption_dropout_empties_the_whole_caption_at_the_given_rate():
    settings = CaptionAugmentation(caption_dropout_rate=0.25)
    rng = random.Random(2)
    results = [augment_caption("ohwx, 1girl", settings, rng) for _ in range(2000)]

    assert set(results) == {"", "ohwx, 1girl"}
    assert 0.21 < results.count("") / 2000 < 0.29


def test_count_tags_lowercases_and_sorts_by_frequency():
    assert count_tags(["Red Hair, smiling", "red hair", "ohwx, smiling, red hair"]) == {
        "red hair": 3,
        "smiling": 2,
        "ohwx": 1,
    }
