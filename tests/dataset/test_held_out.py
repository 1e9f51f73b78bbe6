"""A held-out share: the same images every time, taken out of the plan, the batches, the step count and
the metadata, and named in the report."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from lib_lora_trainer.dataset import build_batch_source, build_report, plan_epoch, scan_dataset
from lib_lora_trainer.dataset.held_out import held_out_count, held_out_names
from tests.dataset.helpers import PoolingEncoder, config_for, save_photo

SIZE = 96  # small files: the scan is what is tested, not the pictures


def captioned_folder(folder: Path, count: int, start_seed: int = 0) -> Path:
    """``count`` images, each captioned "folder/name", so a batch's captions say which images it holds."""
    for index in range(count):
        save_photo(
            folder / f"img_{index:03d}.png",
            SIZE,
            SIZE,
            seed=start_seed + index,
            caption=f"{folder.name}/img_{index:03d}",
        )
    return folder


def names_of(subsets) -> set[str]:
    return {f"{subset.name}/{record.path.name}" for subset in subsets for record in subset.images}


def kohya_dataset(root: Path) -> Path:
    captioned_folder(root / "10_alice", 10)
    captioned_folder(root / "3_alice", 4, start_seed=100)
    captioned_folder(root / "5_solo", 1, start_seed=200)  # one image: never held out
    captioned_folder(root.parent / "reg", 6, start_seed=300)  # regularisation images: never held out
    return root


@pytest.mark.parametrize(
    ("share", "images", "held"),
    [
        (0.0, 10, 0),
        (0.1, 10, 1),
        (0.2, 10, 2),
        (0.25, 10, 3),
        (0.1, 3, 1),
        (0.5, 2, 1),
        (0.5, 3, 2),
        (0.5, 1, 0),
    ],
)
def test_how_many_images_a_share_holds_out(share, images, held):
    # rounded half up, at least one when on, never a folder's every image
    assert held_out_count(share, images) == held


def test_the_pick_depends_only_on_the_names():
    names = [f"photo_{index}.png" for index in range(20)]
    picked = held_out_names(names, 0.2)
    assert len(picked) == 4
    shuffled = names[:]
    random.Random(3).shuffle(shuffled)
    assert held_out_names(shuffled, 0.2) == picked  # the listing order does not matter
    assert held_out_names(reversed(names), 0.2) == picked
    # another image: the same count, so at most the new one takes the place of one picked before
    with_one_more = held_out_names([*names, "photo_new.png"], 0.2)
    assert len(with_one_more) == 4 and with_one_more <= picked | {"photo_new.png"}
    assert len(with_one_more & picked) >= 3


def test_held_out_images_leave_the_plan_the_batches_and_the_step_count(tmp_path: Path):
    root = kohya_dataset(tmp_path / "train")
    settings = dict(dataset_layout="kohya", reg_data_dir=str(tmp_path / "reg"), batch_size=2, epochs=3)
    everything = config_for(root, **settings)
    config = config_for(root, validation_share=0.2, **settings)

    dataset = scan_dataset(config)
    held = names_of(dataset.held_out)
    # 0.2 of 10 = 2, of 4 = 0.8 -> 1, of 1 -> none; the regularisation folder is left whole
    assert [(s.name, len(s.images)) for s in dataset.held_out] == [("10_alice", 2), ("3_alice", 1)]
    assert held == names_of(scan_dataset(config).held_out)  # the same images on every scan
    assert not held & names_of(dataset.subsets)
    assert [len(s.images) for s in dataset.reg_subsets] == [6]

    full_plan, plan = plan_epoch(scan_dataset(everything), everything), plan_epoch(dataset, config)
    planned = {f"{p.subset.name}/{p.record.path.name}" for p in plan.images}
    assert not held & planned and planned | held == {
        f"{p.subset.name}/{p.record.path.name}" for p in full_plan.images
    }
    assert full_plan.num_train_images == 10 * 10 + 4 * 3 + 1 * 5 == 117
    assert plan.num_train_images == 8 * 10 + 3 * 3 + 1 * 5 == 94
    # the regularisation images are cycled up to the smaller number of training images
    assert plan.reg_samples_per_epoch == 94 and full_plan.reg_samples_per_epoch == 117
    assert plan.steps_per_epoch == (94 + 94) // 2 < full_plan.steps_per_epoch == 117

    source = build_batch_source(config, dataset)
    source.prepare(PoolingEncoder())
    seen = [caption for batch in source.epoch(0, random.Random(1)) for caption in batch.captions]
    assert len(seen) == plan.samples_per_epoch
    assert not {name.removesuffix(".png") for name in held} & set(seen)
    assert {name.removesuffix(".png") for name in planned} <= set(seen)
    # resume checks the dataset by the source's fingerprint: the same split gives the same lines
    again = build_batch_source(config, scan_dataset(config))
    assert again.fingerprint() == source.fingerprint()
    assert not any(f"{name}|" in line for line in source.fingerprint() for name in held)
    assert all(any(f"{name}|" in line for line in source.fingerprint()) for name in planned)


def test_renaming_a_folder_to_change_its_repeats_keeps_the_split(tmp_path: Path):
    captioned_folder(tmp_path / "train" / "10_alice", 12)
    config = config_for(tmp_path / "train", dataset_layout="kohya", validation_share=0.25)
    before = {r.path.name for r in scan_dataset(config).held_out[0].images}
    (tmp_path / "train" / "10_alice").rename(tmp_path / "train" / "4_alice")
    assert {r.path.name for r in scan_dataset(config).held_out[0].images} == before


def test_the_report_says_how_many_images_are_held_out_and_which(tmp_path: Path):
    root = kohya_dataset(tmp_path / "train")
    config = config_for(root, dataset_layout="kohya", validation_share=0.2, trigger_word="ohwx")

    dataset = scan_dataset(config)
    report = build_report(dataset, config)

    held = sorted(names_of(dataset.held_out))
    assert sorted(report.held_out) == held and len(held) == 3
    line = next(line for line in report.text().splitlines() if line.startswith("Held out"))
    assert "3 image(s)" in line and all(name in line for name in held)
    assert json.loads(report.to_json())["held_out"] == report.held_out
    assert report.ss_dataset_dirs["10_alice"] == {"n_repeats": 10, "img_count": 8}
    assert report.kohya_metadata()["ss_num_train_images"] == str(8 * 10 + 3 * 3 + 1 * 5)
    assert [(s.name, s.image_count) for s in report.subsets] == [
        ("10_alice", 8),
        ("3_alice", 3),
        ("5_solo", 1),
    ]


def test_a_share_with_only_single_image_folders_holds_out_nothing_and_says_so(tmp_path: Path):
    captioned_folder(tmp_path / "train" / "5_a", 1)
    captioned_folder(tmp_path / "train" / "5_b", 1, start_seed=9)
    config = config_for(tmp_path / "train", dataset_layout="kohya", validation_share=0.3)

    dataset = scan_dataset(config)

    assert dataset.held_out == [] and sum(len(s.images) for s in dataset.train_subsets) == 2
    assert any("holds out no image" in note for note in dataset.notes)
    assert "Held out" not in build_report(dataset, config).text()


def test_no_share_holds_out_nothing(tmp_path: Path):
    captioned_folder(tmp_path / "flat", 6)
    dataset = scan_dataset(config_for(tmp_path / "flat"))
    assert dataset.held_out == [] and len(dataset.subsets[0].images) == 6
