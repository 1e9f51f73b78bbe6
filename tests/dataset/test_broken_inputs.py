"""The broken-input corpus: each bad file gets its own clear message, good files still load, and the
user's folder is byte-for-byte unchanged afterwards."""

from __future__ import annotations

import codecs
import errno
import io
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from lib_lora_trainer.dataset import (
    ImageLoadError,
    build_batch_source,
    build_report,
    load_image,
    preview_crop,
    probe_image,
    scan_dataset,
)
from tests.dataset.helpers import PoolingEncoder, config_for, folder_fingerprint, photo, save_photo

RED_CORNER = (255, 0, 0)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


def write_bomb_header(path: Path, width: int = 20000, height: int = 20000) -> None:
    """A PNG whose header declares width x height RGB pixels, with (almost) no data: costs bytes, not GB."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def exif_rotated_photo(path: Path) -> None:
    """A 400x300 JPEG stored sideways (EXIF orientation 6) with a red block in its stored top-left."""
    image = photo(400, 300, seed=7)
    image.paste(RED_CORNER, (0, 0, 60, 60))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(path, "JPEG", quality=95, exif=exif)


def build_corpus(folder: Path) -> None:
    folder.mkdir()
    save_photo(folder / "good_a.png", seed=1, caption="alice, smiling")
    save_photo(folder / "good_b.jpg", 384, 320, seed=2, caption="alice, outdoors")
    (folder / "zero_bytes.png").write_bytes(b"")
    buffer = io.BytesIO()
    photo(320, 320, seed=3).save(buffer, "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    photo(320, 320, seed=4).save(folder / "really_png.jpg", "PNG")
    (folder / "notes.png").write_text("these are my notes, not a picture\n", encoding="utf-8")
    Image.new("RGB", (1, 1), (10, 20, 30)).save(folder / "one_pixel.png")
    write_bomb_header(folder / "bomb.png")
    Image.new("RGB", (320, 320), (255, 0, 0)).convert("CMYK").save(folder / "cmyk.jpg", "JPEG", quality=95)
    ramp = np.tile(np.linspace(0, 65535, 320).round().astype(np.uint16), (320, 1))
    Image.fromarray(ramp).save(folder / "grey16.png")
    palette = photo(320, 320, seed=5).convert("P")
    palette.putpixel((0, 0), 0)
    palette.save(folder / "palette_transparent.png", transparency=0)
    exif_rotated_photo(folder / "exif_rotated.jpg")
    save_photo(folder / "latin1_caption.png", seed=8)
    (folder / "latin1_caption.txt").write_bytes("alice, café".encode("cp1252"))
    save_photo(folder / "bom_caption.png", seed=9)
    (folder / "bom_caption.txt").write_bytes("\ufeffalice, red dress".encode())
    save_photo(folder / "アリス_01.png", seed=10, caption="alice, 着物")
    save_photo(folder / "émilie.jpg", seed=11, caption="alice, hat")
    save_photo(folder / "powershell_caption.png", seed=12)  # echo "..." > x.txt in Windows PowerShell 5
    (folder / "powershell_caption.txt").write_bytes(
        codecs.BOM_UTF16_LE + "alice, café\r\n".encode("utf-16-le")
    )
    save_photo(folder / "notepad_caption.png", seed=13)
    (folder / "notepad_caption.txt").write_bytes("alice, 着物".encode("utf-16-le"))  # no BOM
    save_photo(folder / "binary_caption.png", seed=14)
    (folder / "binary_caption.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    photo(64, 64, seed=15).save(folder / "animated.gif", "GIF")
    (folder / "iphone.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic")


LEFT_OUT = {
    "zero_bytes.png": "empty (0 bytes)",
    "truncated.jpg": "truncated",
    "notes.png": "not an image — the content is a text file",
    "one_pixel.png": "only 1x1 pixels, too small",
    "bomb.png": "decompression-bomb protection",
    "animated.gif": "GIF (often animated) is not used for training; convert it to PNG or JPEG",
    "iphone.HEIC": "HEIC (iPhone photos) cannot be read without an extra Pillow plugin",
}
LOADED_WITH_NOTE = {
    "really_png.jpg": "really a PNG image despite its .jpg extension",
    "cmyk.jpg": "CMYK (print) colours converted to RGB",
    "grey16.png": "16-bit greyscale reduced to 8 bits",
    "palette_transparent.png": "transparent areas filled with the background colour",
    "exif_rotated.jpg": "rotated upright using its EXIF orientation",
    "latin1_caption.txt": "is not valid UTF-8; read it as Windows-1252/Latin-1",
    "bom_caption.txt": "starts with a UTF-8 byte-order mark",
    "powershell_caption.txt": "starts with a UTF-16 LE byte-order mark; read as UTF-16 LE",
    "notepad_caption.txt": "read as UTF-16 LE without a byte-order mark",
    "binary_caption.txt": "holds NUL bytes, so it is not text; the class token is used instead",
}
GOOD = {
    "good_a.png",
    "good_b.jpg",
    "really_png.jpg",
    "cmyk.jpg",
    "grey16.png",
    "palette_transparent.png",
    "exif_rotated.jpg",
    "latin1_caption.png",
    "bom_caption.png",
    "アリス_01.png",
    "émilie.jpg",
    "powershell_caption.png",
    "notepad_caption.png",
    "binary_caption.png",
}


@pytest.fixture()
def corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    build_corpus(folder)
    return folder


def test_each_broken_file_is_left_out_with_its_own_message(corpus: Path):
    dataset = scan_dataset(config_for(corpus, flat_repeats=1))

    messages = {problem.path.name: problem.message for problem in dataset.problems}
    assert set(messages) == set(LEFT_OUT)
    for name, phrase in LEFT_OUT.items():
        assert name in messages[name] and phrase in messages[name], messages[name]
    assert len(set(messages.values())) == len(messages)  # no two share a generic message


def test_good_files_in_the_same_folder_still_load_with_notes(corpus: Path):
    dataset = scan_dataset(config_for(corpus, flat_repeats=1))

    assert dataset.usable and not dataset.errors
    records = {record.path.name: record for record in dataset.subsets[0].images}
    assert set(records) == GOOD
    for name, phrase in LOADED_WITH_NOTE.items():
        assert any(note.startswith(name) and phrase in note for note in dataset.notes), (name, dataset.notes)
    assert records["latin1_caption.png"].caption == "alice, café"
    assert records["powershell_caption.png"].caption == "alice, café"  # not "ÿþa\x00l\x00..."
    assert records["notepad_caption.png"].caption == "alice, 着物"
    assert records["binary_caption.png"].caption_file is None
    assert records["bom_caption.png"].caption == "alice, red dress"
    assert records["アリス_01.png"].caption == "alice, 着物"
    assert records["émilie.jpg"].caption == "alice, hat"
    assert (records["exif_rotated.jpg"].width, records["exif_rotated.jpg"].height) == (300, 400)


def test_conversions_give_correct_pixels(corpus: Path):
    cmyk = np.asarray(load_image(corpus / "cmyk.jpg").image, dtype=np.int16)
    assert np.abs(cmyk - np.array(RED_CORNER)).max() <= 6

    grey = np.asarray(load_image(corpus / "grey16.png").image)
    assert grey.dtype == np.uint8 and grey.shape == (320, 320, 3)
    assert grey[0, 0].tolist() == [0, 0, 0] and grey[0, -1].tolist() == [255, 255, 255]
    assert abs(int(grey[0, 160, 0]) - 128) <= 1  # a linear 16-bit ramp stays a linear 8-bit ramp

    palette = load_image(corpus / "palette_transparent.png", background=(0, 255, 0)).image
    assert palette.getpixel((0, 0)) == (0, 255, 0)  # the transparent index shows the chosen background

    rotated = np.asarray(load_image(corpus / "exif_rotated.jpg").image, dtype=np.int16)
    assert rotated.shape == (400, 300, 3)  # upright: portrait
    # orientation 6 = stored rotated 90° counter-clockwise; upright, the stored top-left is top-right
    assert np.abs(rotated[10, -10] - np.array(RED_CORNER)).max() <= 40
    assert np.abs(rotated[10, 10] - np.array(RED_CORNER)).max() > 40
    drafted = load_image(corpus / "exif_rotated.jpg", draft_size=(150, 200)).image
    assert drafted.size == (150, 200)  # reduced-scale decoding respects the EXIF rotation too


def test_bomb_and_truncation_refused_even_when_the_host_relaxes_pil(corpus: Path, monkeypatch):
    # A1111 (or another extension) may switch off PIL's pixel limit or accept truncated files.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)

    with pytest.raises(ImageLoadError, match=r"20000x20000 pixels \(400 megapixels\)"):
        probe_image(corpus / "bomb.png")
    with pytest.raises(ImageLoadError, match="truncated"):
        probe_image(corpus / "truncated.jpg")
    with pytest.raises(ImageLoadError, match="truncated"):
        load_image(corpus / "truncated.jpg")


def test_missing_and_empty_folders_are_explained(tmp_path: Path):
    missing = scan_dataset(config_for(tmp_path / "nowhere"))
    assert not missing.usable
    assert missing.errors == [f"the training folder {tmp_path / 'nowhere'} does not exist"]

    empty = tmp_path / "empty"
    empty.mkdir()
    scanned = scan_dataset(config_for(empty))
    assert not scanned.usable
    assert "has no images (png, jpg, jpeg, webp, bmp)" in scanned.errors[0]

    kohya_root = tmp_path / "kohya_root"
    save_photo(kohya_root / "10_alice" / "a.png")
    hinted = scan_dataset(config_for(kohya_root))
    assert "choose the kohya folder layout" in hinted.errors[0]

    only_broken = tmp_path / "only_broken"
    only_broken.mkdir()
    (only_broken / "a.png").write_bytes(b"")
    broken = scan_dataset(config_for(only_broken))
    assert not broken.usable and "every image was left out" in broken.errors[0]
    assert build_report(broken, config_for(only_broken)).text().startswith("Cannot train on this dataset:")


def test_whole_pipeline_leaves_the_users_folder_unchanged(corpus: Path, tmp_path: Path):
    before = folder_fingerprint(corpus)
    config = config_for(
        corpus,
        flat_repeats=2,
        flip_aug=True,
        cache_latents_to_disk=True,
        trigger_word="ohwx",
        crop_mode="face",
    )

    dataset = scan_dataset(config)
    report = build_report(dataset, config)
    report.to_json()
    preview_crop(corpus / "exif_rotated.jpg", config)
    source = build_batch_source(config, dataset, vae_id="test-vae", cache_dir=tmp_path / "cache")
    source.prepare(PoolingEncoder())
    batches = list(source.epoch(0, random.Random(0)))

    assert sum(len(batch.captions) for batch in batches) == 2 * len(GOOD)
    assert folder_fingerprint(corpus) == before
    assert not any(path.name.startswith(".") for path in corpus.rglob("*"))


def test_a_caption_extension_that_names_an_image_is_refused_before_reading(corpus: Path):
    dataset = scan_dataset(config_for(corpus, flat_repeats=1, caption_extension=".png"))
    assert not dataset.usable and "is an image extension" in dataset.errors[0]


def test_an_unreadable_kohya_root_is_one_clear_error(tmp_path: Path, monkeypatch):
    save_photo(tmp_path / "10_alice" / "a.png", seed=1)
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == tmp_path:
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    dataset = scan_dataset(config_for(tmp_path, dataset_layout="kohya"))
    assert dataset.errors == [
        f"cannot list the folder {tmp_path} (Permission denied); check that it exists and that the WebUI "
        "may read it"
    ]


def test_one_unreadable_caption_leaves_the_rest_of_the_scan(tmp_path: Path, monkeypatch):
    save_photo(tmp_path / "a.png", seed=1, caption="alice, hat")
    save_photo(tmp_path / "b.png", seed=2, caption="alice, dress")
    real_read = Path.read_bytes

    def read_bytes(self):
        if self.name == "b.txt":
            raise PermissionError(errno.EACCES, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    dataset = scan_dataset(config_for(tmp_path, flat_repeats=1))
    assert dataset.usable and len(dataset.subsets[0].images) == 2
    assert "b.txt: cannot be read (Permission denied); class token used" in dataset.notes


def test_kohya_folders_nested_where_the_scan_does_not_look_are_named(tmp_path: Path):
    # kohya_ss GUI's folder preparation makes <project>/img/10_alice: choosing <project> finds nothing
    save_photo(tmp_path / "project" / "img" / "10_alice" / "a.png", seed=1)
    for layout in ("kohya", "flat"):
        dataset = scan_dataset(config_for(tmp_path / "project", dataset_layout=layout))
        assert not dataset.usable
        assert f"N_name subfolders were found deeper, in {tmp_path / 'project' / 'img'}" in dataset.errors[0]
    assert any(
        "holds N_name folders itself" in n
        for n in scan_dataset(config_for(tmp_path / "project", dataset_layout="kohya")).notes
    )
    # an N_name folder inside another one is not read either
    save_photo(tmp_path / "k" / "10_alice" / "a.png", seed=1)
    save_photo(tmp_path / "k" / "10_alice" / "5_extra" / "b.png", seed=2)
    dataset = scan_dataset(config_for(tmp_path / "k", dataset_layout="kohya"))
    assert dataset.usable
    assert any(note.startswith("10_alice/5_extra is not used") for note in dataset.notes)


def test_a_huge_repeat_count_in_a_folder_name_is_refused_not_overflowed(tmp_path: Path):
    save_photo(tmp_path / "10_alice" / "a.png", seed=1)
    save_photo(tmp_path / ("9" * 30 + "_alice") / "b.png", seed=2)
    dataset = scan_dataset(config_for(tmp_path, dataset_layout="kohya"))
    assert [subset.name for subset in dataset.subsets] == ["10_alice"]
    assert any("repeats is more than 10000, so this folder is not used" in note for note in dataset.notes)
