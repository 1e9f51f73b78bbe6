"""The training config: JSON round trip, typing of values, and messages for bad values."""

from __future__ import annotations

import codecs
import dataclasses
import json
import math

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


@pytest.mark.parametrize("share", [0.0, 0.05, 0.5])
def test_a_held_out_share_from_0_to_half_is_accepted(share):
    assert validate(TrainingConfig(train_data_dir="/d", validation_share=share)) == []


@pytest.mark.parametrize("share", [-0.1, 0.6, 1.0, 20.0])
def test_a_held_out_share_out_of_range_is_refused_clearly(share):
    problems = validate(TrainingConfig(train_data_dir="/d", validation_share=share))
    assert problems == [
        f"held-out share (validation_share) must be between 0 (off) and 0.5, not {share:g}: it is the "
        "part of the training images kept out of training"
    ]


def test_a_held_out_share_and_a_held_out_folder_are_refused_together_naming_both():
    both = TrainingConfig(train_data_dir="/d", validation_share=0.1, validation_dir="/held")
    (problem,) = validate(both)
    assert "validation_share" in problem and "validation_dir" in problem and "cannot both" in problem
    assert validate(dataclasses.replace(both, validation_share=0.0)) == []  # the folder alone is fine
    assert validate(dataclasses.replace(both, validation_dir="  ")) == []  # so is the share alone


def test_a_held_out_share_without_the_validation_loss_is_refused():
    (problem,) = validate(TrainingConfig(train_data_dir="/d", validation_share=0.1, validation_loss=False))
    assert "switch on Validation loss" in problem
    assert validate(TrainingConfig(train_data_dir="/d", validation_loss=False)) == []


# --- values that are not usable at all: one mechanism for every field ---------------------------------
FLOAT_FIELDS = [f.name for f in dataclasses.fields(TrainingConfig) if f.type == "float"]
INT_FIELDS = [f.name for f in dataclasses.fields(TrainingConfig) if f.type == "int"]


@pytest.mark.parametrize("name", FLOAT_FIELDS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_nan_and_infinity_are_refused_as_not_finite_for_every_float(name, value):
    problems = validate(TrainingConfig(train_data_dir="/d", **{name: value}))
    label = name.replace("_", " ")
    assert problems == [f"{label} must be a finite number, not {value}"]  # not "must not be negative"
    with pytest.raises(ConfigError, match=f"{name}: .* is not a number; enter a finite number"):
        TrainingConfig.from_dict({name: str(value)})
    with pytest.raises(ConfigError, match=f"{name}: .* is not a number"):
        TrainingConfig.from_dict({name: value})


@pytest.mark.parametrize("name", INT_FIELDS)
def test_huge_integers_are_refused_for_every_int(name):
    for value in (10**30, 2**63):
        problems = validate(TrainingConfig(train_data_dir="/d", **{name: value}))
        assert len(problems) == 1 and ("must be at most" in problems[0] or "must be between" in problems[0])
    assert TrainingConfig.from_dict({name: 10**400}).to_dict()[name] == 10**400  # no OverflowError
    assert any(
        "out of range" in p or "between" in p
        for p in validate(TrainingConfig(train_data_dir="/d", **{name: -(10**30)}))
    )


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("seed", 2**32, "seed must be between 0 and 4294967295, not 4294967296"),
        ("seed", -1, "seed must be between 0 and 4294967295, not -1"),
        ("flat_repeats", 100_000, "flat repeats must be at most 10000, not 100000"),
        ("epochs", 10**12, "epochs must be at most 10000, not 1000000000000"),
        ("lr_warmup_steps", 1e12, "lr warmup steps must be at most 1e+09, not 1e+12"),
    ],
)
def test_sensible_maxima(name, value, message):
    assert validate(TrainingConfig(train_data_dir="/d", **{name: value})) == [message]


def test_seed_limits_are_what_the_generators_accept():
    import numpy as np
    import torch

    torch.Generator().manual_seed(2**32 - 1)
    np.random.default_rng(2**32 - 1)
    assert validate(TrainingConfig(train_data_dir="/d", seed=2**32 - 1, sample_seed=-1)) == []


def test_a_50_mb_comment_is_refused_before_it_reaches_the_epoch_file():
    problems = validate(TrainingConfig(train_data_dir="/d", training_comment="x" * 50_000_000))
    assert problems == [
        "training comment is 48828 KiB long; at most 64 KiB are kept (it is stored in every epoch file); "
        "shorten it"
    ]
    assert validate(TrainingConfig(train_data_dir="/d", training_comment="x" * 60_000)) == []
    assert validate(TrainingConfig(train_data_dir="/d", sample_prompts=["a" * 40_000, "b" * 40_000]))


def test_an_output_name_too_long_for_a_file_name_is_refused_early():
    assert validate(TrainingConfig(train_data_dir="/d", output_name="a" * 200)) == []
    [problem] = validate(TrainingConfig(train_data_dir="/d", output_name="a" * 230))
    assert problem.startswith("output name is 230 characters long; use at most 200")
    longest = "a" * 200 + "-step00000500" + ".lora_trainer_config.json"
    assert len(longest) <= 255


@pytest.mark.parametrize("extension", [".png", ".JPG", ".webp", ".gif", ".avif", ".heic", ".tiff", ".a.png"])
def test_a_caption_extension_that_is_an_image_format_is_refused(extension):
    problems = validate(TrainingConfig(train_data_dir="/d", caption_extension=extension))
    assert problems and "is an image extension" in problems[0]


def test_a_utf16_or_folder_config_path_is_read_or_explained(tmp_path):
    path = tmp_path / "c.json"
    path.write_bytes(codecs.BOM_UTF16_LE + json.dumps({"epochs": 3}).encode("utf-16-le"))
    assert TrainingConfig.from_json_file(path).epochs == 3
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        TrainingConfig.from_json_file(tmp_path)
    (tmp_path / "binary.json").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ConfigError, match="not text"):
        TrainingConfig.from_json_file(tmp_path / "binary.json")
