"""The training config: JSON round trip, typing of values, and messages for bad values."""

from __future__ import annotations

import json

import pytest

from lib_lora_trainer.config import ConfigError, TrainingConfig, validate, validate_for_dataset


def test_defaults_are_valid_once_a_dataset_is_chosen():
    assert validate(TrainingConfig(train_data_dir="/data")) == []
    assert "choose a training image folder" in validate(TrainingConfig())


def test_json_round_trip(tmp_path):
    config = TrainingConfig(train_data_dir="/d", sample_prompts=["alice", "alice smiling"], network_dim=64)
    config.save_json(tmp_path / "c.json")
    assert TrainingConfig.from_json_file(tmp_path / "c.json") == config


def test_values_from_forms_and_old_files_are_typed():
    config = TrainingConfig.from_dict(
        {
            "network_dim": "32",
            "flip_aug": "true",
            "unet_lr": "2e-4",
            "epochs": 8.0,
            "sample_prompts": "a\nb\n",
        }
    )
    assert (config.network_dim, config.flip_aug, config.unet_lr, config.epochs) == (32, True, 2e-4, 8)
    assert config.sample_prompts == ["a", "b"]


def test_unknown_and_mistyped_values_are_named():
    with pytest.raises(ConfigError) as error:
        TrainingConfig.from_dict({"netwrk_dim": 4, "epochs": "many", "flip_aug": "perhaps"})
    text = str(error.value)
    assert "netwrk_dim" in text
    with pytest.raises(ConfigError, match="epochs"):
        TrainingConfig.from_dict({"epochs": "many"})
    with pytest.raises(ConfigError, match="epochs"):
        TrainingConfig.from_dict({"epochs": 2.5})


def test_bad_json_file_is_explained(tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        TrainingConfig.from_json_file(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text(json.dumps([1]))
    with pytest.raises(ConfigError, match="JSON object"):
        TrainingConfig.from_json_file(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="does not exist"):
        TrainingConfig.from_json_file(tmp_path / "missing.json")


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        ("network_dim", 0, "rank"),
        ("unet_lr", -1.0, "must not be negative"),
        ("optimizer", "DAdaptLion", "unknown optimizer"),
        ("lr_scheduler", "cosine_forever", "unknown LR scheduler"),
        ("resolution", 500, "multiple of 64"),
        ("output_name", "..", "'..'"),
        ("output_name", "a\\b", "folder separator"),
        ("output_name", ".hidden", "hidden"),
        ("output_name", "ä", "letters, digits"),
        ("caption_extension", "txt", "must start with '.'"),
        ("clip_skip", 13, "clip skip"),
        ("lr_warmup_steps", 2.5, "whole number"),
        ("mixed_precision", "fp8", "mixed precision"),
    ],
)
def test_each_bad_value_has_its_message(field, value, fragment):
    problems = validate(TrainingConfig(train_data_dir="/d", **{field: value}))
    assert any(fragment in p for p in problems), problems


def test_dataset_dependent_checks():
    assert validate_for_dataset(TrainingConfig(batch_size=4), 0) == ["the dataset has no usable images"]
    assert "larger than the dataset" in validate_for_dataset(TrainingConfig(batch_size=4), 3)[0]
    assert validate_for_dataset(TrainingConfig(batch_size=3), 3) == []
