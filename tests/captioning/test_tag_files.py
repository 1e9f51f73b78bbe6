"""Writing captions for a folder: thresholds, exclusions, trigger word, existing captions, bad files."""

from __future__ import annotations

import codecs
import io

import numpy as np
import pytest
from PIL import Image

from lib_lora_trainer.captioning import (
    TaggingOptions,
    WD14Tagger,
    list_images,
    parse_tag_list,
    tag_folder,
    tag_images,
)
from lib_lora_trainer.files import BACKUP_FOLDER_NAME
from tests.captioning.conftest import file_digests, save_image
from tests.captioning.wd14_fixtures import write_model_folder

# STANDARD_TAGS at convnext v2's defaults (general 0.3685, character 0.85), characters first, best first
DEFAULT_TAGS = "hatsune miku, 1girl, long hair, ^_^, smile, blue eyes"
EXISTING = "red dress, alice, 1girl"


def caption_of(folder, stem="a", extension=".txt"):
    return (folder / f"{stem}{extension}").read_text(encoding="utf-8")


def backups_of(folder):
    backup_dir = folder / BACKUP_FOLDER_NAME
    return sorted(backup_dir.iterdir()) if backup_dir.is_dir() else []


def test_model_default_thresholds_ratings_left_out(tagger, dataset):
    save_image(dataset / "a.png")
    summary = tag_folder(tagger, dataset)
    assert caption_of(dataset) == DEFAULT_TAGS + "\n"
    assert summary.written == ["a.txt"]
    assert summary.provider == "CPUExecutionProvider"


def test_thresholds_can_be_overridden(tagger, dataset):
    save_image(dataset / "a.png")
    tag_folder(tagger, dataset, TaggingOptions(general_threshold=0.6, character_threshold=0.5))
    assert caption_of(dataset) == "hatsune miku, alice (wonderland), 1girl, long hair, ^_^\n"


def test_unregistered_model_uses_the_common_035_threshold(tmp_path, dataset):
    tagger = WD14Tagger(write_model_folder(tmp_path / "my-own-tagger"), use_gpu=False)
    save_image(dataset / "a.png")
    tag_folder(tagger, dataset)
    assert caption_of(dataset) == DEFAULT_TAGS + ", solo\n"  # solo scores 0.36


def test_rating_only_when_asked_and_underscores_kept_when_asked(tagger, dataset):
    save_image(dataset / "a.png")
    options = TaggingOptions(include_rating=True, replace_underscores=False)
    tag_folder(tagger, dataset, options)
    assert caption_of(dataset) == "hatsune_miku, 1girl, long_hair, ^_^, smile, blue_eyes, general\n"


def test_undesired_tags_with_odd_spacing_and_underscores_are_removed(tagger, dataset):
    save_image(dataset / "a.png")
    options = TaggingOptions(undesired_tags=" Long_Hair ,smile,,  blue  eyes ,\nhatsune miku ,")
    tag_folder(tagger, dataset, options)
    assert caption_of(dataset) == "1girl, ^_^\n"


@pytest.mark.parametrize(
    ("trigger", "undesired", "expected"),
    [
        ("alice", "", "alice, " + DEFAULT_TAGS),
        ("alice", "alice, smile", "alice, hatsune miku, 1girl, long hair, ^_^, blue eyes"),
        ("1girl", "", "1girl, hatsune miku, long hair, ^_^, smile, blue eyes"),
        ("alice, alice outfit", "", "alice, alice outfit, " + DEFAULT_TAGS),
    ],
)
def test_trigger_word_is_always_first_and_never_repeated(tagger, dataset, trigger, undesired, expected):
    save_image(dataset / "a.png")
    tag_folder(tagger, dataset, TaggingOptions(trigger_word=trigger, undesired_tags=undesired))
    assert caption_of(dataset) == expected + "\n"


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("append", "alice, red dress, 1girl, " + DEFAULT_TAGS.replace("1girl, ", "")),
        ("prepend", "alice, " + DEFAULT_TAGS + ", red dress"),
        ("overwrite", "alice, " + DEFAULT_TAGS),
    ],
)
def test_existing_caption_is_merged_per_mode_and_backed_up(tagger, dataset, mode, expected):
    save_image(dataset / "a.png")
    (dataset / "a.txt").write_text(EXISTING + "\n", encoding="utf-8")
    summary = tag_folder(tagger, dataset, TaggingOptions(trigger_word="alice", existing_captions=mode))
    assert caption_of(dataset) == expected + "\n"
    [backup] = backups_of(dataset)
    assert backup.read_text(encoding="utf-8") == EXISTING + "\n"
    assert summary.backups == [str(backup)]


def test_skip_leaves_captioned_images_untouched_and_tags_the_rest(tagger, dataset):
    save_image(dataset / "a.png")
    save_image(dataset / "b.png")
    save_image(dataset / "c.png")
    (dataset / "a.txt").write_bytes(b"my own words,  exactly\r\n")
    (dataset / "c.txt").write_text("  \n", encoding="utf-8")  # blank: counts as no caption
    summary = tag_folder(tagger, dataset, TaggingOptions(trigger_word="alice"))
    assert (dataset / "a.txt").read_bytes() == b"my own words,  exactly\r\n"
    assert summary.skipped == [("a.png", "it already has a caption (a.txt)")]
    assert caption_of(dataset, "b") == caption_of(dataset, "c") == "alice, " + DEFAULT_TAGS + "\n"
    assert summary.written == ["b.txt", "c.txt"]


def test_rerun_with_the_same_result_changes_nothing(tagger, dataset):
    save_image(dataset / "a.png")
    options = TaggingOptions(trigger_word="alice", existing_captions="overwrite")
    tag_folder(tagger, dataset, options)
    second = tag_folder(tagger, dataset, options)
    assert second.unchanged == ["a.txt"] and second.written == []
    assert backups_of(dataset) == []


def test_caption_that_is_not_utf8_is_reported_and_its_bytes_kept_in_the_backup(tagger, dataset):
    save_image(dataset / "a.png")
    original = "café, 1girl\n".encode("cp1252")
    (dataset / "a.txt").write_bytes(original)
    summary = tag_folder(tagger, dataset, TaggingOptions(existing_captions="append"))
    assert any("a.txt is not valid UTF-8" in warning for warning in summary.warnings)
    # rewritten in the file's own encoding, so the user's accents keep their bytes
    assert (dataset / "a.txt").read_bytes().decode("cp1252").startswith("café, 1girl, hatsune miku")
    [backup] = backups_of(dataset)
    assert backup.read_bytes() == original


def _truncated_jpeg() -> bytes:
    buffer = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    return buffer.getvalue()[:300]


def test_broken_images_are_reported_by_name_and_the_rest_are_tagged(tagger, dataset):
    save_image(dataset / "good1.png")
    save_image(dataset / "good2.webp")
    (dataset / "empty.png").write_bytes(b"")
    (dataset / "notes.png").write_text("not an image", encoding="utf-8")
    (dataset / "cut.jpg").write_bytes(_truncated_jpeg())
    before = file_digests(dataset)
    summary = tag_folder(tagger, dataset, TaggingOptions(batch_size=2))
    failed = dict(summary.failed)
    assert sorted(failed) == ["cut.jpg", "empty.png", "notes.png"]
    assert "empty.png is empty" in failed["empty.png"]
    assert "notes.png is not an image" in failed["notes.png"]
    assert "cut.jpg is damaged or truncated" in failed["cut.jpg"]
    assert sorted(summary.written) == ["good1.txt", "good2.txt"]
    assert not (dataset / "cut.txt").exists() and not (dataset / "empty.txt").exists()
    after = file_digests(dataset)
    assert {name: after[name] for name in before} == before  # no image (or other file) was changed
    report = summary.text()
    assert "Captions written: 2" in report and "failed: 3" in report and "Failed notes.png" in report


def test_probe_tags_show_the_whole_pipeline_feeds_bgr_pixels(tmp_path, dataset):
    tagger = WD14Tagger(write_model_folder(tmp_path / "probe-model", size=96), use_gpu=False)
    save_image(dataset / "blue.png", (40, 40), (0, 0, 255))
    save_image(dataset / "red.jpg", (40, 40), (255, 0, 0))
    tag_folder(tagger, dataset, TaggingOptions(general_threshold=0.99, character_threshold=0.99))
    assert set(parse_tag_list(caption_of(dataset, "blue"))) == {"probe full c0", "probe corner c0"}
    assert set(parse_tag_list(caption_of(dataset, "red"))) == {"probe full c2", "probe corner c2"}


def test_progress_reaches_the_total_and_cancel_stops_between_batches(tagger, dataset):
    for index in range(5):
        save_image(dataset / f"{index}.png")
    calls = []
    tag_folder(tagger, dataset, TaggingOptions(batch_size=2), progress=lambda *call: calls.append(call))
    assert [(done, total) for done, total, _ in calls] == [(2, 5), (4, 5), (5, 5)]
    assert calls[-1][2] == "4.png"

    for caption in dataset.glob("*.txt"):
        caption.unlink()
    seen = []
    summary = tag_folder(
        tagger,
        dataset,
        TaggingOptions(batch_size=2),
        progress=lambda *call: seen.append(call),
        should_cancel=lambda: len(seen) >= 1,
    )
    assert summary.cancelled
    assert summary.written == ["0.txt", "1.txt"]
    assert summary.not_processed == ["2.png", "3.png", "4.png"]
    assert sorted(path.name for path in dataset.glob("*.txt")) == ["0.txt", "1.txt"]


def test_caption_extension_is_configurable_and_checked(tagger, dataset):
    save_image(dataset / "a.png")
    tag_folder(tagger, dataset, TaggingOptions(caption_extension=".caption"))
    assert caption_of(dataset, extension=".caption") == DEFAULT_TAGS + "\n"
    assert not (dataset / "a.txt").exists()
    bad = TaggingOptions(
        caption_extension=".png", general_threshold=1.5, existing_captions="replace", batch_size=0
    )
    with pytest.raises(ValueError) as raised:
        tag_folder(tagger, dataset, bad)
    message = str(raised.value)
    for fragment in ("image extension", "general threshold", "existing-caption mode", "batch size"):
        assert fragment in message


def test_two_images_sharing_a_caption_file_are_not_mixed(tagger, dataset):
    save_image(dataset / "a.jpg")
    save_image(dataset / "a.png")
    summary = tag_folder(tagger, dataset)
    assert summary.written == ["a.txt"]
    [(name, why)] = summary.skipped
    assert name == "a.png" and "shares the caption file a.txt with a.jpg" in why


def test_kohya_layout_is_tagged_recursively_without_backups_or_hidden_folders(tagger, dataset):
    for folder in ("10_alice", "3_alice", BACKUP_FOLDER_NAME):
        (dataset / folder).mkdir()
    save_image(dataset / "10_alice" / "x.png")
    save_image(dataset / "3_alice" / "y.bmp")
    save_image(dataset / BACKUP_FOLDER_NAME / "z.png")
    (dataset / "3_alice" / "readme.md").write_text("hi", encoding="utf-8")
    assert [path.name for path in list_images(dataset, recursive=True)] == ["x.png", "y.bmp"]
    assert list_images(dataset) == []
    summary = tag_folder(tagger, dataset, recursive=True)
    assert summary.written == ["10_alice/x.txt", "3_alice/y.txt"]


def test_empty_and_missing_folders(tagger, dataset):
    summary = tag_folder(tagger, dataset)
    assert summary.written == [] and "No images" in summary.warnings[0]
    assert not tagger.is_loaded  # nothing to tag: the model was not even loaded
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tag_folder(tagger, dataset / "nope")


def test_explicit_image_list_works_with_one_big_batch(tagger, dataset):
    images = [save_image(dataset / f"{index}.png") for index in range(3)]
    summary = tag_images(tagger, images, TaggingOptions(batch_size=16))
    assert summary.written == ["0.txt", "1.txt", "2.txt"]
    assert {caption_of(dataset, str(index)) for index in range(3)} == {DEFAULT_TAGS + "\n"}


def test_a_utf16_caption_is_appended_to_in_utf16_not_rewritten_as_garbage(tagger, dataset):
    save_image(dataset / "a.png")
    original = codecs.BOM_UTF16_LE + "café, 1girl\r\n".encode("utf-16-le")  # PowerShell 5's '>'
    (dataset / "a.txt").write_bytes(original)
    summary = tag_folder(tagger, dataset, TaggingOptions(existing_captions="append"))
    assert not summary.warnings and summary.written == ["a.txt"]
    raw = (dataset / "a.txt").read_bytes()
    assert raw.startswith(codecs.BOM_UTF16_LE)
    assert raw[2:].decode("utf-16-le") == "café, 1girl, hatsune miku, long hair, ^_^, smile, blue eyes\r\n"
    [backup] = backups_of(dataset)
    assert backup.read_bytes() == original


def test_a_caption_that_is_not_text_is_never_overwritten_by_the_tagger(tagger, dataset):
    save_image(dataset / "a.png")
    garbage = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR"
    (dataset / "a.txt").write_bytes(garbage)
    summary = tag_folder(tagger, dataset, TaggingOptions(existing_captions="overwrite"))
    [(name, why)] = summary.failed
    assert name == "a.png" and "a.txt" in why and "it is left as it is" in why
    assert (dataset / "a.txt").read_bytes() == garbage


@pytest.mark.parametrize("extension", [".gif", ".heic", ".JPG", ".x.webp"])
def test_every_image_format_is_refused_as_caption_extension(extension):
    with pytest.raises(ValueError, match="image extension"):
        TaggingOptions(caption_extension=extension).validated()
