from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lib_lora_trainer.captioning import ImageReadError, prepare_image, read_image
from lib_lora_trainer.captioning.wd14_preprocess import to_rgb_on_background


def test_wide_image_is_padded_with_white_centred_bgr_float_0_255():
    image = Image.new("RGB", (200, 100), (10, 20, 30))
    array = prepare_image(image, 64)
    assert array.shape == (64, 64, 3)
    assert array.dtype == np.float32
    # 200x100 -> 200x200 with 50 white rows above and below -> 64x64: rows 16..47 are the image
    assert array[32, 32].tolist() == [30.0, 20.0, 10.0]  # BGR, not normalised
    assert array[2, 32].tolist() == [255.0, 255.0, 255.0]
    assert array[61, 5].tolist() == [255.0, 255.0, 255.0]
    assert array[17:47].reshape(-1, 3).tolist() == [[30.0, 20.0, 10.0]] * (30 * 64)


def test_tall_image_is_padded_left_and_right():
    image = Image.new("RGB", (50, 100), (200, 0, 0))
    array = prepare_image(image, 100)  # already the right height: only padding, no resize
    assert array[50, 10].tolist() == [255.0, 255.0, 255.0]
    assert array[50, 89].tolist() == [255.0, 255.0, 255.0]
    assert array[50, 50].tolist() == [0.0, 0.0, 200.0]
    assert array[:, 25:75].reshape(-1, 3).tolist() == [[0.0, 0.0, 200.0]] * (100 * 50)


def test_upscaling_stays_in_0_255():
    checker = np.indices((16, 16)).sum(axis=0) % 2 * 255
    image = Image.fromarray(np.stack([checker] * 3, axis=-1).astype(np.uint8))
    array = prepare_image(image, 100)
    assert array.min() >= 0.0 and array.max() <= 255.0
    assert array.min() < 50 and array.max() > 200


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    rgba.putpixel((0, 0), (0, 0, 0, 128))
    rgba.putpixel((1, 0), (0, 0, 255, 255))
    rgb = np.asarray(to_rgb_on_background(rgba))
    assert rgb[3, 3].tolist() == [255, 255, 255]
    assert rgb[0, 0].tolist() == [127, 127, 127]
    assert rgb[0, 1].tolist() == [0, 0, 255]


def test_palette_with_transparency_becomes_white_where_transparent(tmp_path):
    palette_image = Image.new("P", (4, 2), 0)
    palette_image.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    for x in range(2, 4):
        for y in range(2):
            palette_image.putpixel((x, y), 1)
    path = tmp_path / "palette.png"
    palette_image.save(path, transparency=0)
    rgb = np.asarray(to_rgb_on_background(read_image(path)))
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 3].tolist() == [255, 0, 0]


def test_16_bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[65535, 32896], [257, 0]], dtype=np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    rgb = np.asarray(to_rgb_on_background(read_image(path)))
    assert rgb[..., 0].tolist() == [[255, 128], [1, 0]]


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(path)
    red, green, blue = np.asarray(to_rgb_on_background(read_image(path)))[8, 8].tolist()
    assert red > 200 and green < 60 and blue < 60


def test_exif_orientation_is_applied(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 20))  # white stripe on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # camera held rotated: display turned 90 degrees clockwise
    path = tmp_path / "rotated.jpg"
    image.save(path, exif=exif.tobytes(), quality=95)
    upright = read_image(path)
    assert upright.size == (20, 40)
    pixels = np.asarray(upright.convert("L"))
    assert pixels[2, 10] > 200 and pixels[38, 10] < 50  # the stripe is now at the top


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="JPEG")
    return buffer.getvalue()[: len(buffer.getvalue()) // 2]


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.png", b"", "empty.png is empty"),
        ("notes.png", b"this is not an image\n", "notes.png is not an image"),
        ("cut.jpg", _truncated_jpeg(), "cut.jpg is damaged or truncated"),
    ],
)
def test_unreadable_files_get_a_message_naming_them(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=message):
        read_image(path)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "huge.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10 000 px is now "more than twice the limit"
    with pytest.raises(ImageReadError, match="huge.png is too large to open safely"):
        read_image(path)
