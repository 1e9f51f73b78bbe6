"""Buckets match kohya's sd-scripts for the sizes the seeds use (512 and 768, 640x768 portraits)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lib_lora_trainer.dataset import Bucketer, build_report, make_bucket_resolutions, scan_dataset
from lib_lora_trainer.dataset.buckets import bucket_info
from tests.dataset.helpers import config_for, save_photo

# sd-scripts make_bucket_resolutions((512, 512), 256, 1024, 64), as listed in the peers notes §3
KOHYA_512 = [
    (256, 832), (256, 896), (256, 960), (256, 1024), (320, 704), (320, 768), (384, 640), (448, 576),
    (512, 512), (576, 448), (640, 384), (704, 320), (768, 320), (832, 256), (896, 256), (960, 256),
    (1024, 256),
]  # fmt: skip
# the same rule at 768: area 589824, heights capped at 1024
KOHYA_768 = [
    (256, 1024), (320, 1024), (384, 1024), (448, 1024), (512, 1024), (576, 960), (576, 1024),
    (640, 896), (704, 832), (768, 768), (832, 704), (896, 640), (960, 576), (1024, 256), (1024, 320),
    (1024, 384), (1024, 448), (1024, 512), (1024, 576),
]  # fmt: skip


def test_predefined_buckets_match_kohya():
    assert make_bucket_resolutions(512) == KOHYA_512
    assert make_bucket_resolutions(768) == KOHYA_768
    for resolution, buckets in ((512, KOHYA_512), (768, KOHYA_768)):
        assert all(w % 64 == 0 and h % 64 == 0 for w, h in buckets)
        assert all(w * h <= resolution * resolution for w, h in buckets)


@pytest.mark.parametrize(
    ("resolution", "size", "bucket", "resized"),
    [
        (512, (640, 768), (448, 576), (480, 576)),  # the seeds' portraits
        (768, (640, 768), (704, 832), (704, 845)),
        (512, (768, 640), (576, 448), (576, 480)),
        (512, (512, 512), (512, 512), (512, 512)),
        (512, (3000, 4000), (448, 576), (448, 597)),  # a phone photo, 3:4
        (768, (1024, 1024), (768, 768), (768, 768)),
        (512, (448, 576), (448, 576), (448, 576)),  # already a bucket size: kept as is
    ],
)
def test_select_bucket_scales_to_cover_and_matches_kohya(resolution, size, bucket, resized):
    choice = Bucketer(resolution).select(*size)
    assert choice.bucket == bucket
    assert choice.resized == resized
    assert choice.resized[0] >= bucket[0] and choice.resized[1] >= bucket[1]
    assert choice.ar_error == pytest.approx(bucket[0] / bucket[1] - size[0] / size[1])


@pytest.mark.parametrize(
    ("resolution", "size", "bucket", "resized"),
    [
        (768, (640, 768), (640, 768), (640, 768)),  # fits in 768², never upscaled
        (512, (640, 768), (448, 512), (448, 538)),  # shrunk to about 512² pixels, floored to 64s
        (512, (300, 200), (256, 192), (300, 200)),  # small images stay small
    ],
)
def test_no_upscale_buckets_match_kohya(resolution, size, bucket, resized):
    choice = Bucketer(resolution, no_upscale=True).select(*size)
    assert choice.bucket == bucket
    assert choice.resized == resized


def test_without_buckets_everything_is_square():
    bucketer = Bucketer(512, enabled=False)
    assert bucketer.select(640, 768).bucket == (512, 512)
    assert bucketer.select(640, 768).resized == (512, 614)
    assert bucket_info([(bucketer.select(640, 768), 3)], enabled=False) is None


def test_bucket_info_from_a_real_folder_has_kohyas_shape(tmp_path: Path):
    folder = tmp_path / "10_alice"
    for index in range(3):
        save_photo(folder / f"portrait_{index}.png", 640, 768, seed=index)
    for index in range(2):
        save_photo(folder / f"square_{index}.png", 512, 512, seed=10 + index)
    config = config_for(tmp_path, dataset_layout="kohya", resolution=512)

    info = build_report(scan_dataset(config), config).ss_bucket_info

    assert info["buckets"] == {
        "0": {"resolution": [448, 576], "count": 30},  # repeats included, as kohya counts
        "1": {"resolution": [512, 512], "count": 20},
    }
    portrait_error = abs(448 / 576 - 640 / 768)
    assert info["mean_img_ar_error"] == pytest.approx(3 * portrait_error / 5)
