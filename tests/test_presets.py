import dataclasses

import pytest

from lib_lora_trainer.config import ConfigError, TrainingConfig, validate
from lib_lora_trainer.presets import (
    FACE_PERSON,
    GAME_CHARACTER,
    LOCON_CHARACTER,
    PRESETS,
    apply_preset,
    preset_names,
    preset_overrides,
)


@pytest.fixture()
def user_config() -> TrainingConfig:
    return TrainingConfig(
        output_name="alice",
        trigger_word="alice_chr",
        train_data_dir="/data/alice",
        reg_data_dir="/data/reg",
        epochs=12,
    )


def test_face_person_reproduces_the_recipe(user_config: TrainingConfig) -> None:
    config = apply_preset(user_config, FACE_PERSON)
    assert (config.network_dim, config.network_alpha) == (32, 16.0)
    assert (config.unet_lr, config.text_encoder_lr) == (2e-4, 1e-4)
    assert (config.lr_scheduler, config.lr_scheduler_num_cycles) == ("cosine_with_restarts", 4)
    assert config.warmup_steps_for(5000) == 300
    assert (config.batch_size, config.resolution) == (2, 512)
    assert config.network_type == "lora"


def test_game_character_reproduces_the_recipe(user_config: TrainingConfig) -> None:
    config = apply_preset(user_config, GAME_CHARACTER)
    assert (config.network_dim, config.network_alpha) == (96, 72.0)
    assert config.optimizer == "Adafactor"
    assert (config.resolution, config.flat_repeats, config.epochs) == (768, 10, 8)
    assert config.flip_aug and config.color_aug
    assert config.reg_data_dir == ""
    assert not config.cache_latents, "colour augmentation needs fresh latents every step"
    assert config.min_bucket_reso <= config.resolution <= config.max_bucket_reso


def test_locon_character_adapts_convolutions_at_a_lower_rank(user_config: TrainingConfig) -> None:
    config = apply_preset(user_config, LOCON_CHARACTER)
    assert config.network_type == "locon"
    assert 1 <= config.conv_dim < config.network_dim
    assert config.conv_alpha <= config.conv_dim
    assert config.network_alpha <= config.network_dim


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_is_valid_and_keeps_the_users_choices(user_config: TrainingConfig, name: str) -> None:
    before = dataclasses.replace(user_config)
    config = apply_preset(user_config, name)
    assert validate(config) == []
    assert user_config == before, "the input config is not modified"
    for kept in ("output_name", "trigger_word", "train_data_dir"):
        assert getattr(config, kept) == getattr(user_config, kept)
    changed = {key for key, value in config.to_dict().items() if value != user_config.to_dict()[key]}
    assert changed <= set(preset_overrides(name))
    assert TrainingConfig.from_dict({**user_config.to_dict(), **preset_overrides(name)}) == config


def test_preset_names_and_unknown_preset() -> None:
    assert preset_names() == [FACE_PERSON, GAME_CHARACTER, LOCON_CHARACTER]
    overrides = preset_overrides(FACE_PERSON)
    overrides["network_dim"] = 1
    assert PRESETS[FACE_PERSON]["network_dim"] == 32, "callers get a copy"
    with pytest.raises(ConfigError, match="unknown preset"):
        apply_preset(TrainingConfig(), "Anime style")
