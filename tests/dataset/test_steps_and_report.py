"""Steps arithmetic on the seeds' own examples, regularisation cycling, warnings and kohya metadata."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from lib_lora_trainer.dataset import build_report, plan_epoch, scan_dataset
from lib_lora_trainer.dataset.plan import cycle_reg_repeats
from tests.dataset.helpers import config_for, make_folder, photo, save_photo


def warning_codes(report) -> set[str]:
    return {warning.code for warning in report.warnings}


def test_42_images_10_repeats_8_epochs_is_3360_steps(tmp_path: Path):
    make_folder(tmp_path / "alice", 42, caption="ohwx, smiling")
    config = config_for(tmp_path / "alice", flat_repeats=10, epochs=8, batch_size=1, trigger_word="ohwx")

    report = build_report(scan_dataset(config), config)

    assert report.num_train_images == 420
    assert report.steps_per_epoch == 420
    assert report.total_steps == 3360
    assert "steps_out_of_range" not in warning_codes(report)
    assert report.ss_dataset_dirs == {"alice": {"n_repeats": 10, "img_count": 42}}
    assert "1 folder(s), 420 with repeats" in report.text() and "8 epoch(s) = 3360 steps" in report.text()


def test_58_primaries_x5_and_164_supporting_x1_is_454_per_epoch(tmp_path: Path):
    make_folder(tmp_path / "5_alice", 58, start_seed=0)
    make_folder(tmp_path / "1_alice", 164, start_seed=1000)
    config = config_for(tmp_path, dataset_layout="kohya", batch_size=1, epochs=5)

    report = build_report(scan_dataset(config), config)

    assert report.steps_per_epoch == 58 * 5 + 164 * 1 == 454
    assert report.total_steps == 454 * 5
    assert report.ss_dataset_dirs == {
        "1_alice": {"n_repeats": 1, "img_count": 164},
        "5_alice": {"n_repeats": 5, "img_count": 58},
    }
    assert report.kohya_metadata()["ss_num_train_images"] == "454"


def test_batches_never_mix_buckets_so_each_bucket_rounds_up(tmp_path: Path):
    folder = tmp_path / "mixed"
    for index in range(5):
        save_photo(folder / f"portrait_{index}.png", 640, 768, seed=index)
    for index in range(3):
        save_photo(folder / f"square_{index}.png", 512, 512, seed=20 + index)
    config = config_for(folder, flat_repeats=1, batch_size=2, gradient_accumulation_steps=2, epochs=3)

    plan = plan_epoch(scan_dataset(config), config)

    assert plan.bucket_counts() == {(448, 576): 5, (512, 512): 3}
    assert plan.batches_per_epoch == 3 + 2  # ceil(5/2) + ceil(3/2), not ceil(8/2)
    assert plan.steps_per_epoch == 3  # ceil(5 batches / 2 accumulated)
    assert plan.total_steps == 9


def test_regularisation_images_are_cycled_to_match_training_images(tmp_path: Path):
    make_folder(tmp_path / "train", 10, caption="ohwx, woman")
    make_folder(tmp_path / "reg", 4, start_seed=500, caption="woman")
    config = config_for(
        tmp_path / "train",
        flat_repeats=3,
        reg_data_dir=str(tmp_path / "reg"),
        prior_loss_weight=0.5,
        trigger_word="ohwx",
    )

    dataset = scan_dataset(config)
    plan = plan_epoch(dataset, config)
    report = build_report(dataset, config)

    reg = [p for p in plan.images if p.is_reg]
    assert [p.repeats for p in reg] == [8, 8, 7, 7]  # 4 + one more each in turn until 30
    assert all(p.loss_weight == 0.5 and p.caption == "woman" for p in reg)  # no trigger on reg images
    assert report.num_train_images == 30 and report.num_reg_images == 4
    assert report.reg_samples_per_epoch == 30
    assert report.steps_per_epoch == 60  # reg doubles the steps, as in kohya
    assert report.ss_reg_dataset_dirs == {"reg": {"n_repeats": 1, "img_count": 4}}


def test_cycle_reg_repeats_follows_kohyas_rule():
    assert cycle_reg_repeats([1, 1, 1], 7) == [3, 2, 2]
    assert cycle_reg_repeats([2, 2], 3) == [2, 2]  # first pass overshoots: all registered images stay
    assert cycle_reg_repeats([1] * 5, 3) == [1, 1, 1, 0, 0]  # more reg than train: the rest unused
    assert cycle_reg_repeats([], 10) == []


def test_warnings_explain_what_is_wrong(tmp_path: Path):
    folder = tmp_path / "set"
    save_photo(folder / "a.png", 320, 320, seed=1, caption="ohwx, smiling")
    save_photo(folder / "b.png", 320, 320, seed=2, caption="smiling, red hair")  # no trigger word
    save_photo(folder / "c.png", 320, 320, seed=3)  # no caption
    save_photo(folder / "small.png", 200, 150, seed=4, caption="ohwx")
    save_photo(folder / "banner.png", 900, 300, seed=5, caption="ohwx")
    near_copy = photo(320, 320, seed=1).resize((300, 300)).resize((320, 320))
    near_copy.save(folder / "a_copy.jpg", quality=80)
    (folder / "a_copy.txt").write_text("ohwx, smiling", encoding="utf-8")
    config = config_for(folder, flat_repeats=2, epochs=2, trigger_word="ohwx", class_token="woman")

    report = build_report(scan_dataset(config), config)
    by_code = {warning.code: warning for warning in report.warnings}

    assert set(by_code) >= {
        "too_few_images",
        "steps_out_of_range",
        "low_resolution",
        "elongated",
        "near_duplicates",
        "missing_captions",
        "captions_without_trigger",
    }
    assert "Only 6 training image(s)" in by_code["too_few_images"].message
    assert "24 total steps is below the usual 1500–4000" in by_code["steps_out_of_range"].message
    assert "208 epoch(s) would give 2496 steps" in by_code["steps_out_of_range"].message
    assert by_code["low_resolution"].files == ("set/small.png",)
    assert by_code["elongated"].files == ("set/banner.png",)
    assert by_code["near_duplicates"].files == ("set/a.png", "set/a_copy.jpg")
    assert by_code["missing_captions"].files == ("set/c.png",)
    assert "the class token ('woman') plus the trigger word 'ohwx'" in by_code["missing_captions"].message
    assert by_code["captions_without_trigger"].files == ("set/b.png",)


def test_settings_warnings(tmp_path: Path):
    make_folder(tmp_path / "set", 20)
    config = config_for(
        tmp_path / "set", shuffle_caption=True, keep_tokens=0, trigger_word="ohwx", color_aug=True
    )

    codes = warning_codes(build_report(scan_dataset(config), config))

    assert {"trigger_shuffled", "latents_not_cached"} <= codes
    no_trigger = config_for(tmp_path / "set")
    assert "no_trigger_word" in warning_codes(build_report(scan_dataset(no_trigger), no_trigger))


def test_tag_frequency_and_metadata_are_kohya_shaped(tmp_path: Path):
    folder = tmp_path / "10_alice"
    save_photo(folder / "a.png", caption="Smiling, red hair")
    save_photo(folder / "b.png", seed=1, caption="smiling, blue eyes")
    save_photo(folder / "c.png", seed=2)  # falls back to the class token "alice"
    config = config_for(tmp_path, dataset_layout="kohya", trigger_word="ohwx")

    report = build_report(scan_dataset(config), config)

    assert report.ss_tag_frequency == {
        "10_alice": {"ohwx": 3, "smiling": 2, "alice": 1, "blue eyes": 1, "red hair": 1}
    }
    assert report.tag_frequency == report.ss_tag_frequency["10_alice"]
    metadata = report.kohya_metadata()
    assert json.loads(metadata["ss_dataset_dirs"]) == {"10_alice": {"n_repeats": 10, "img_count": 3}}
    assert json.loads(metadata["ss_tag_frequency"]) == report.ss_tag_frequency
    assert json.loads(metadata["ss_bucket_info"]) == report.ss_bucket_info
    assert all(isinstance(value, str) for value in metadata.values())
    round_trip = json.loads(report.to_json())
    assert round_trip["total_steps"] == report.total_steps and round_trip["warnings"]


def test_report_lists_left_out_files(tmp_path: Path):
    folder = make_folder(tmp_path / "set", 3)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    Image.new("RGB", (320, 320)).save(folder / "fine.webp")
    config = config_for(folder)

    report = build_report(scan_dataset(config), config)

    assert [p["file"] for p in report.problems] == ["broken.png"]
    assert "Left out (1 file(s)):" in report.text() and "broken.png" in report.text()
    assert report.subsets[0].image_count == 4


def test_regularisation_folder_in_kohya_layout_is_detected(tmp_path: Path):
    make_folder(tmp_path / "train", 4, caption="ohwx")
    make_folder(tmp_path / "reg" / "2_woman", 3, start_seed=300)  # no captions: the class token is used
    (tmp_path / "reg" / "not_a_subset").mkdir()
    config = config_for(tmp_path / "train", flat_repeats=5, reg_data_dir=str(tmp_path / "reg"))

    dataset = scan_dataset(config)
    report = build_report(dataset, config)

    assert [s.name for s in dataset.reg_subsets] == ["2_woman"]
    assert {r.caption for r in dataset.reg_subsets[0].images} == {"woman"}
    assert report.ss_reg_dataset_dirs == {"2_woman": {"n_repeats": 2, "img_count": 3}}
    assert report.num_reg_images == 6 and report.reg_samples_per_epoch == 20
    assert any("not_a_subset is ignored" in note for note in dataset.notes)
