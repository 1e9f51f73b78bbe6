"""Loss masks: read from a mask image, kohya's mask folder, the alpha channel, or made around the face;
fitted exactly like their picture, at latent size, mirrored with it, shown in the preview."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from lib_lora_trainer.dataset import build_batch_source, scan_dataset
from lib_lora_trainer.dataset.crop import preview_crop
from lib_lora_trainer.dataset.masks import face_region, is_mask_file
from tests.dataset.helpers import PoolingEncoder, config_for, drawn_face, save_photo


def left_half_mask(path: Path, width: int, height: int) -> None:
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, : width // 2] = 255
    Image.fromarray(mask, "L").save(path)


def batches(config):
    source = build_batch_source(config, scan_dataset(config))
    source.prepare(PoolingEncoder())
    return source, list(source.epoch(0, random.Random(0)))


def test_a_mask_image_beside_the_picture_is_fitted_like_it_and_not_trained_on(tmp_path):
    folder = tmp_path / "train"
    # 640 x 512 into the 512 x 512 bucket: resized to 640 x 512 and the centre cropped, 64 px off each side
    save_photo(folder / "a.png", 640, 512, seed=1, caption="alice")
    left_half_mask(folder / "a.mask.png", 640, 512)
    config = config_for(folder, enable_bucket=False, flat_repeats=1, batch_size=1, masked_loss=True)
    assert [record.path.name for record in scan_dataset(config).train_subsets[0].images] == ["a.png"]
    _, [batch] = batches(config)
    assert batch.masks.shape == (1, 1, 64, 64) == (1, 1, *batch.latents.shape[-2:])
    # the mask's edge at x = 320 of 640 lands at 320 - 64 = 256 of the crop: latent column 32
    expected = torch.zeros(64, 64)
    expected[:, :32] = 1
    assert torch.equal(batch.masks[0, 0], expected)


def test_kohya_conditioning_folder_and_the_alpha_channel(tmp_path):
    folder, masks = tmp_path / "train", tmp_path / "masks"
    save_photo(folder / "b.png", 512, 512, seed=2, caption="alice")
    masks.mkdir()
    left_half_mask(masks / "b.png", 512, 512)
    config = config_for(
        folder,
        enable_bucket=False,
        flat_repeats=1,
        batch_size=1,
        masked_loss=True,
        conditioning_data_dir=str(masks),
    )
    _, [batch] = batches(config)
    assert batch.masks[0, 0, :, :32].min() == 1 and batch.masks[0, 0, :, 32:].max() == 0

    rgba = Image.open(folder / "b.png").convert("RGBA")
    alpha = np.zeros((512, 512), dtype=np.uint8)
    alpha[256:, :] = 255  # only the bottom half is opaque
    rgba.putalpha(Image.fromarray(alpha, "L"))
    other = tmp_path / "alpha"
    other.mkdir()
    rgba.save(other / "c.png")
    _, [batch] = batches(
        config_for(other, enable_bucket=False, flat_repeats=1, batch_size=1, alpha_mask=True)
    )
    assert batch.masks[0, 0, 32:].min() == 1 and batch.masks[0, 0, :32].max() == 0


def test_masks_are_mirrored_with_their_image_and_missing_ones_train_everywhere(tmp_path):
    folder = tmp_path / "train"
    save_photo(folder / "a.png", 512, 512, seed=1, caption="alice")
    left_half_mask(folder / "a.mask.png", 512, 512)
    save_photo(folder / "b.png", 512, 512, seed=2, caption="alice")  # no mask
    config = config_for(
        folder, enable_bucket=False, flat_repeats=8, batch_size=1, masked_loss=True, flip_aug=True
    )
    source, epoch = batches(config)
    seen = set()
    for batch in epoch:
        mask = batch.masks[0, 0]
        if mask.min() == 1:
            seen.add("whole")
        elif mask[:, :32].min() == 1:
            seen.add("left")
        else:
            assert mask[:, 32:].min() == 1 and mask[:, :32].max() == 0
            seen.add("mirrored")
    assert seen == {"whole", "left", "mirrored"}
    assert torch.equal(source._latents[0], source._latents[0])  # latents unchanged by masks


def test_no_mask_option_no_masks_and_the_latent_cache_key_is_unchanged(tmp_path):
    folder = tmp_path / "train"
    save_photo(folder / "a.png", 512, 512, seed=1, caption="alice")
    left_half_mask(folder / "a.mask.png", 512, 512)
    _, [batch] = batches(config_for(folder, enable_bucket=False, flat_repeats=1, batch_size=1))
    assert batch.masks is None
    config = config_for(
        folder,
        enable_bucket=False,
        flat_repeats=1,
        batch_size=1,
        masked_loss=True,
        cache_latents_to_disk=True,
    )
    cache = tmp_path / "cache"
    first = build_batch_source(config, scan_dataset(config), vae_id="vae", cache_dir=cache)
    first.prepare(PoolingEncoder())
    left_half_mask(folder / "a.mask.png", 512, 512)
    (folder / "a.mask.png").write_bytes((folder / "a.mask.png").read_bytes())
    second = build_batch_source(config, scan_dataset(config), vae_id="vae", cache_dir=cache)
    second.prepare(PoolingEncoder())
    assert second.cache_hits == 1  # the mask is recomputed, the cached latent reused
    assert torch.equal(first._masks[0], second._masks[0])


def test_automatic_face_mask_keeps_head_and_shoulders_and_drops_the_background(tmp_path):
    folder = tmp_path / "train"
    folder.mkdir()
    drawn_face(170).save(folder / "face.png")  # 510 x 510, face centred at (170, 221)
    config = config_for(folder, enable_bucket=False, flat_repeats=1, batch_size=1, auto_mask="face")
    _, [batch] = batches(config)
    mask = batch.masks[0, 0]  # 64 x 64 over the 512 crop (scaled 512/510)
    face_x, face_y = round(170 * 512 / 510 / 8), round(221 * 512 / 510 / 8)
    assert mask[face_y, face_x] > 0.95  # the face
    assert mask[face_y + 25, face_x] > 0.5  # the shoulders below it
    assert mask[2, 62] < 0.05 and mask[face_y, 62] < 0.05  # background far right
    region = face_region((100, 100), type("Box", (), {"center": (50, 30), "width": 20, "height": 20})())
    assert region.getpixel((50, 30)) == 255 and region.getpixel((2, 2)) == 0


def test_the_preview_dims_what_is_not_trained(tmp_path):
    folder = tmp_path / "train"
    save_photo(folder / "a.png", 512, 512, seed=1, caption="alice")
    left_half_mask(folder / "a.mask.png", 512, 512)
    plain = np.asarray(
        preview_crop(folder / "a.png", config_for(folder, enable_bucket=False)), dtype=np.int16
    )
    masked = np.asarray(
        preview_crop(folder / "a.png", config_for(folder, enable_bucket=False, masked_loss=True)),
        dtype=np.int16,
    )
    assert np.array_equal(masked[:, :250], plain[:, :250])  # trained: as it is
    assert np.abs(masked[:, 262:] - plain[:, 262:]).mean() > 30  # not trained: dimmed


def test_mask_files_are_recognised():
    assert is_mask_file(Path("photo.mask.png")) and not is_mask_file(Path("photo.png"))


def test_a_missing_mask_folder_and_masks_found_nowhere_are_said(tmp_path):
    import pytest

    from lib_lora_trainer.dataset import DatasetError

    folder = tmp_path / "train"
    save_photo(folder / "a.png", 512, 512, seed=1, caption="alice")
    config = config_for(folder, masked_loss=True, conditioning_data_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="mask images folder"):
        build_batch_source(config, scan_dataset(config))
    source, [batch] = batches(
        config_for(folder, enable_bucket=False, flat_repeats=1, batch_size=1, masked_loss=True)
    )
    assert torch.equal(batch.masks, torch.ones(1, 1, 64, 64))
    assert any("no image has a mask" in warning for warning in source.warnings)
