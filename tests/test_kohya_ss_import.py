import codecs
import json
import math
from pathlib import Path
from typing import Any

import pytest

from lib_lora_trainer.config import ConfigError, TrainingConfig, validate
from lib_lora_trainer.kohya_ss_import import (
    KohyaImport,
    import_kohya_ss_config,
    load_kohya_ss_json,
    migrate_old_fields,
)

# An old-style kohya_ss GUI file (numbers stored as strings, lora_network_weights, boolean xformers),
# shaped like the SD1.5 LoCon preset kohya_ss ships.
OLD_LOCON: dict[str, Any] = {
    "LoRA_type": "LoCon",
    "bucket_no_upscale": True,
    "bucket_reso_steps": 64.0,
    "cache_latents": True,
    "caption_extension": ".txt",
    "clip_skip": 2,
    "conv_alpha": 1,
    "conv_dim": 32,
    "enable_bucket": False,
    "epoch": 1,
    "gradient_accumulation_steps": 1.0,
    "keep_tokens": "0",
    "learning_rate": "0.0001",
    "lora_network_weights": "/loras/start.safetensors",
    "lr_scheduler": "constant",
    "lr_scheduler_num_cycles": "",
    "lr_warmup": "0",
    "max_resolution": "512,650",
    "max_token_length": "75",
    "mem_eff_attn": True,
    "mixed_precision": "bf16",
    "network_alpha": 64,
    "network_dim": 64,
    "noise_offset": "0.05",
    "optimizer_args": "",
    "prior_loss_weight": 1.0,
    "save_every_n_epochs": 1,
    "save_precision": "bf16",
    "seed": "1234",
    "shuffle_caption": False,
    "text_encoder_lr": "5e-05",
    "train_batch_size": 3,
    "unet_lr": "0.0001",
    "use_8bit_adam": True,
    "v2": False,
    "xformers": True,
}

# A current-style file (numbers as numbers), trimmed to a representative subset of the ~190 keys.
NEW_STANDARD: dict[str, Any] = {
    "LoRA_type": "Standard",
    "adaptive_noise_scale": 0,
    "additional_parameters": "",
    "bucket_no_upscale": True,
    "cache_latents": True,
    "caption_dropout_rate": 0.05,
    "caption_extension": ".txt",
    "clip_skip": 2,
    "color_aug": False,
    "enable_bucket": True,
    "epoch": 4,
    "flip_aug": False,
    "flux1_checkbox": False,
    "flux1_t5xxl": "",
    "gradient_accumulation_steps": 1,
    "huber_c": 0.1,
    "huggingface_token": "",
    "keep_tokens": 0,
    "learning_rate": 0.0001,
    "logging_dir": "./test/logs",
    "loss_type": "l2",
    "lr_scheduler": "cosine",
    "lr_scheduler_num_cycles": 1,
    "lr_warmup": 10,
    "lr_warmup_steps": 0,
    "max_bucket_reso": 2048,
    "max_resolution": "512,512",
    "max_train_epochs": 0,
    "max_train_steps": 0,
    "min_bucket_reso": 256,
    "min_snr_gamma": 5,
    "mixed_precision": "fp16",
    "model_list": "runwayml/stable-diffusion-v1-5",
    "multires_noise_discount": 0.2,
    "multires_noise_iterations": 8,
    "network_alpha": 8,
    "network_dim": 16,
    "network_weights": "",
    "noise_offset": 0.05,
    "noise_offset_type": "Multires",
    "optimizer": "AdamW",
    "output_dir": "./test/output",
    "output_name": "Standard-Adamw",
    "pretrained_model_name_or_path": "runwayml/stable-diffusion-v1-5",
    "reg_data_dir": "",
    "sample_every_n_epochs": 0,
    "sample_every_n_steps": 20,
    "sample_prompts": "a painting of alice_chr, red scarf --n lowres --w 512 --h 768\nalice_chr smiling",
    "sample_sampler": "euler_a",
    "save_every_n_epochs": 1,
    "save_model_as": "safetensors",
    "save_precision": "float",
    "sdxl": False,
    "seed": 1234,
    "text_encoder_lr": 0.00005,
    "train_batch_size": 4,
    "train_data_dir": "./test/img",
    "unet_lr": 0.0001,
    "v2": False,
    "v_parameterization": False,
    "xformers": "xformers",
}


def accounted_keys(result: KohyaImport) -> set[str]:
    return (
        result.read_from
        | {item.key.split()[0] for item in result.unsupported}
        | {item.key for item in result.ignored}
    )


def test_old_file_is_migrated_and_string_numbers_are_read() -> None:
    result = import_kohya_ss_config(OLD_LOCON)
    config = result.config
    assert config.network_type == "locon"
    assert (config.network_dim, config.network_alpha, config.conv_dim, config.conv_alpha) == (
        64,
        64.0,
        32,
        1.0,
    )
    assert config.optimizer == "AdamW8bit"
    assert (config.unet_lr, config.text_encoder_lr, config.train_text_encoder) == (1e-4, 5e-5, True)
    assert config.network_weights == "/loras/start.safetensors"
    assert (config.keep_tokens, config.seed, config.noise_offset, config.clip_skip) == (0, 1234, 0.05, 2)
    assert config.lr_scheduler_num_cycles == 1  # "" reads as 1, as kohya_ss does on load
    assert (config.mixed_precision, config.save_precision, config.batch_size) == ("bf16", "bf16", 3)
    assert config.resolution == 576  # 512x650 has the area of a 576 square
    assert any("512x650" in note for note in result.notes)
    assert any("lora_network_weights" in note for note in result.notes)
    assert any("use_8bit_adam" in note for note in result.notes)
    assert result.problems == []
    assert result.unsupported == []
    assert {item.key for item in result.ignored} >= {"xformers", "mem_eff_attn", "learning_rate"}


def test_new_file_every_key_is_applied_or_reported() -> None:
    result = import_kohya_ss_config(NEW_STANDARD)
    assert accounted_keys(result) == set(NEW_STANDARD)
    config = result.config
    assert config.network_type == "lora"
    assert (config.output_name, config.train_data_dir, config.dataset_layout) == (
        "Standard-Adamw",
        "./test/img",
        "kohya",
    )
    assert config.epochs == 4 and config.batch_size == 4
    assert config.lr_warmup_steps == pytest.approx(0.1)  # 10 % of all steps
    assert config.save_precision == "fp32"
    assert config.min_snr_gamma == 5.0 and config.caption_dropout_rate == 0.05
    assert config.sample_prompts == ["a painting of alice_chr, red scarf", "alice_chr smiling"]
    assert config.sample_sampler == "Euler a"
    unsupported = {item.key: item for item in result.unsupported}
    assert set(unsupported) == {"sample_every_n_steps"}
    assert (config.multires_noise_iterations, config.multires_noise_discount) == (8, 0.2)
    assert config.noise_offset == TrainingConfig().noise_offset, "kohya_ss ignores it with Multires noise"
    ignored = {item.key: item.reason for item in result.ignored}
    assert "checkpoint loaded in the WebUI" in ignored["pretrained_model_name_or_path"]
    assert "Lora folder" in ignored["output_dir"]
    assert "Flux" in ignored["flux1_t5xxl"]
    assert any("--n lowres" in note for note in result.notes)
    assert validate(config) == []


def test_the_summary_lists_what_was_not_taken_over() -> None:
    summary = import_kohya_ss_config(NEW_STANDARD).summary()
    assert "Not supported here" in summary
    assert "sample_every_n_steps = 20" in summary
    assert "logging_dir" in summary


@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({"learning_rate": 3e-4, "unet_lr": 0, "text_encoder_lr": 0}, (3e-4, 3e-4, True)),
        ({"learning_rate": 3e-4, "unet_lr": 2e-4, "text_encoder_lr": 0}, (2e-4, 0.0, False)),
        ({"learning_rate": 3e-4, "unet_lr": 0, "text_encoder_lr": 1e-4}, (0.0, 1e-4, True)),
        ({"learning_rate": 3e-4, "unet_lr": "", "text_encoder_lr": "1e-4"}, (0.0, 1e-4, True)),
        ({"learning_rate": 3e-4, "unet_lr": 2e-4, "text_encoder_lr": 1e-4}, (2e-4, 1e-4, True)),
    ],
)
def test_learning_rates_follow_kohya_ss_rules(rates: dict, expected: tuple) -> None:
    config = import_kohya_ss_config(rates).config
    assert (config.unet_lr, config.text_encoder_lr, config.train_text_encoder) == expected


def test_warmup_steps_win_over_percent_and_max_epochs_over_epoch() -> None:
    result = import_kohya_ss_config(
        {"lr_warmup": 10, "lr_warmup_steps": 300, "epoch": 5, "max_train_epochs": 9}
    )
    assert result.config.lr_warmup_steps == 300
    assert result.config.epochs == 9
    assert any("lr_warmup_steps wins" in note for note in result.notes)
    assert {item.key for item in result.ignored} >= {"lr_warmup", "epoch"}


def test_adafactor_options_and_scheduler() -> None:
    result = import_kohya_ss_config(
        {
            "optimizer": "Adafactor",
            "optimizer_args": "scale_parameter=False relative_step=False warmup_init=False weight_decay=0.1",
            "lr_scheduler": "adafactor",
        }
    )
    config = result.config
    assert config.optimizer == "Adafactor"
    assert config.weight_decay == 0.1
    assert config.adafactor_relative_step is True  # the 'adafactor' scheduler means relative steps
    assert config.lr_scheduler == "constant"
    assert result.unsupported == []
    # arguments without a field of their own are passed to the optimizer (checked before training)
    assert config.optimizer_args == "scale_parameter=False warmup_init=False"


def test_unsupported_network_optimizer_and_model_family_are_reported_not_applied() -> None:
    base = TrainingConfig(optimizer="AdamW", network_type="lora", lr_scheduler="cosine")
    result = import_kohya_ss_config(
        {
            "LoRA_type": "LyCORIS/GLoRA",
            "optimizer": "DAdaptLion",
            "lr_scheduler": "rex",
            "sdxl": True,
            "decompose_both": True,
            "some_future_option": "on",
        },
        base,
    )
    assert (result.config.network_type, result.config.optimizer, result.config.lr_scheduler) == (
        "lora",
        "AdamW",
        "cosine",
    )
    reasons = {item.key: item.reason for item in result.unsupported}
    assert set(reasons) == {
        "LoRA_type",
        "optimizer",
        "lr_scheduler",
        "sdxl",
        "decompose_both",
        "some_future_option",
    }
    assert "SD1.5" in reasons["sdxl"]


def test_unreadable_values_keep_the_previous_value_and_are_reported() -> None:
    base = TrainingConfig(network_dim=32, output_name="alice")
    result = import_kohya_ss_config(
        {"network_dim": "lots", "output_name": "my lora!", "max_resolution": "big", "flip_aug": "maybe"}, base
    )
    assert result.config.network_dim == 32
    assert result.config.output_name == "alice"
    assert result.config.resolution == base.resolution
    assert len(result.problems) == 4
    for key in ("network_dim", "output_name", "max_resolution", "flip_aug"):
        assert any(problem.startswith(key) for problem in result.problems), key
    assert result.ignored == [] and result.unsupported == [], "each key is reported once"


def test_values_our_checks_refuse_are_reported_as_problems() -> None:
    result = import_kohya_ss_config({"max_resolution": "500,500"})
    assert result.config.resolution == 500
    assert any("multiple of 64" in problem for problem in result.problems)


def test_zero_means_defaults_kohya_style() -> None:
    result = import_kohya_ss_config({"epoch": 6, "save_every_n_epochs": 0, "seed": 0, "clip_skip": 0})
    config = result.config
    assert config.save_every_n_epochs == 6  # kohya_ss then saves only the last epoch
    assert config.seed == TrainingConfig().seed
    assert config.clip_skip == 1
    assert any("seed 0" in note for note in result.notes)


def test_migration_does_not_change_its_input() -> None:
    original = json.loads(json.dumps(OLD_LOCON))
    migrated, _notes = migrate_old_fields(OLD_LOCON)
    assert original == OLD_LOCON
    assert migrated["LoRA_type"] == "LyCORIS/LoCon"
    assert migrated["xformers"] == "xformers"
    assert "lora_network_weights" not in migrated and "use_8bit_adam" not in migrated


def test_load_from_file_and_bad_files(tmp_path: Path) -> None:
    good = tmp_path / "alice.json"
    good.write_text(json.dumps(NEW_STANDARD), encoding="utf-8-sig")
    assert load_kohya_ss_json(good).config.network_dim == 16
    broken = tmp_path / "broken.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_kohya_ss_json(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_kohya_ss_json(tmp_path / "missing.json")
    listing = tmp_path / "list.json"
    listing.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(ConfigError, match="JSON object"):
        load_kohya_ss_json(listing)


# --- bad files and values: one sentence each, and the previous value really kept -----------------------
@pytest.mark.parametrize("content", ["[1, 2]", "42", '"text"', "null", "true"])
def test_a_json_that_is_not_an_object_is_one_clear_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "kohya.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_kohya_ss_json(path)


def test_a_utf16_file_is_read_and_a_folder_is_explained(tmp_path: Path) -> None:
    path = tmp_path / "kohya.json"
    path.write_bytes(codecs.BOM_UTF16_LE + json.dumps({"network_dim": 8}).encode("utf-16-le"))
    assert load_kohya_ss_json(path).config.network_dim == 8
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_kohya_ss_json(tmp_path)


INFINITE_KEYS = [
    "epoch",
    "max_train_epochs",
    "seed",
    "clip_skip",
    "network_dim",
    "network_alpha",
    "learning_rate",
    "unet_lr",
    "text_encoder_lr",
    "lr_warmup",
    "lr_warmup_steps",
    "lr_scheduler_num_cycles",
    "noise_offset",
    "max_resolution",
    "train_batch_size",
    "save_every_n_epochs",
    "keep_tokens",
    "prior_loss_weight",
]


@pytest.mark.parametrize("key", INFINITE_KEYS)
@pytest.mark.parametrize("text", ["Infinity", "-Infinity", "NaN", "1e999", "1" + "0" * 400])
def test_an_infinite_or_huge_number_keeps_the_previous_value(tmp_path: Path, key: str, text: str) -> None:
    path = tmp_path / "kohya.json"
    path.write_text(f'{{"LoRA_type": "Standard", "{key}": {text}}}')  # json.dumps(inf) writes Infinity
    base = TrainingConfig(train_data_dir="/d")

    result = load_kohya_ss_json(path, base)  # no exception (the UI answered HTTP 500)

    assert result.config == base
    assert any(problem.startswith(key) and "kept" in problem for problem in result.problems)
    assert validate(result.config) == []


def test_an_infinite_unet_lr_is_not_applied_as_zero() -> None:
    base = TrainingConfig(unet_lr=2e-4, text_encoder_lr=1e-4)
    result = import_kohya_ss_config({"unet_lr": math.inf, "text_encoder_lr": 5e-5, "learning_rate": 1e-4})
    assert (result.config.unet_lr, result.config.text_encoder_lr) == (base.unet_lr, base.text_encoder_lr)
    assert result.config.train_text_encoder
    assert any("unet_lr = inf" in problem and "previous value kept" in problem for problem in result.problems)
    assert any("all learning rates keep their previous values" in note for note in result.notes)


def test_huge_integers_are_refused_with_the_previous_value_kept() -> None:
    base = TrainingConfig()
    result = import_kohya_ss_config({"epoch": 10**30, "seed": 2**40, "train_batch_size": 10**9})
    assert (result.config.epochs, result.config.seed, result.config.batch_size) == (
        base.epochs,
        base.seed,
        base.batch_size,
    )
    for key in ("epoch", "seed", "train_batch_size"):
        assert any(p.startswith(f"{key} = ") and "previous value kept" in p for p in result.problems), key


def test_a_huge_comment_and_an_image_caption_extension_are_not_applied() -> None:
    result = import_kohya_ss_config({"training_comment": "x" * 100_000, "caption_extension": ".png"})
    assert result.config.training_comment == "" and result.config.caption_extension == ".txt"
    summary = result.summary()
    assert "training_comment = 'xxxx" in summary and "at most 64 KiB" in summary
    assert "caption_extension = '.png': caption extension '.png' is an image extension" in summary


def test_values_applied_but_refused_by_our_checks_are_not_called_kept() -> None:
    result = import_kohya_ss_config({"max_resolution": "500,500"})
    summary = result.summary()
    assert "Applied, but must be changed before training:\n- resolution 500 must be" in summary
    assert "Could not be read" not in summary


def test_length_in_steps_and_saving_by_steps_are_mapped() -> None:
    result = import_kohya_ss_config(
        {
            "max_train_steps": 1600,
            "save_every_n_steps": 500,
            "save_last_n_epochs": 3,
            "save_last_n_steps": 1000,
            "save_state": True,
        },
        TrainingConfig(),
    )
    config = result.config
    assert (config.max_train_steps, config.save_every_n_steps) == (1600, 500)
    assert (config.save_last_n_epochs, config.save_last_n_steps) == (3, 1000)
    assert not result.unsupported and not result.problems
    assert "always saved" in {item.key: item.reason for item in result.ignored}["save_state"]
    overridden = import_kohya_ss_config({"max_train_steps": 1600, "max_train_epochs": 4}, TrainingConfig())
    assert (overridden.config.max_train_steps, overridden.config.epochs) == (0, 4)


def test_loss_noise_mask_optimizer_and_schedule_options_are_applied() -> None:
    result = import_kohya_ss_config(
        {
            "loss_type": "huber",
            "huber_schedule": "exponential",
            "huber_c": 0.2,
            "huber_scale": 1.5,
            "debiased_estimation_loss": True,
            "min_timestep": 100,
            "max_timestep": 900,
            "ip_noise_gamma": 0.1,
            "ip_noise_gamma_random_strength": True,
            "noise_offset_type": "Original",
            "noise_offset": 0.05,
            "adaptive_noise_scale": 0.01,
            "noise_offset_random_strength": True,
            "masked_loss": True,
            "optimizer": "Prodigy",
            "learning_rate": 1.0,
            "unet_lr": 1.0,
            "text_encoder_lr": 1.0,
            "optimizer_args": "d_coef=2 use_bias_correction=True safeguard_warmup=True decouple=True",
            "lr_scheduler": "cosine_with_min_lr",
            "lr_scheduler_args": "min_lr_rate=0.1",
        }
    )
    config = result.config
    assert (config.loss_type, config.huber_schedule, config.huber_c, config.huber_scale) == (
        "huber",
        "exponential",
        0.2,
        1.5,
    )
    assert config.debiased_estimation_loss and config.masked_loss
    assert (config.min_timestep, config.max_timestep) == (100, 900)
    assert (config.ip_noise_gamma, config.ip_noise_gamma_random_strength) == (0.1, True)
    assert (config.noise_offset, config.adaptive_noise_scale, config.noise_offset_random_strength) == (
        0.05,
        0.01,
        True,
    )
    assert config.optimizer == "Prodigy" and config.prodigy_d_coef == 2.0
    assert config.prodigy_use_bias_correction and config.prodigy_safeguard_warmup
    assert config.optimizer_args == "decouple=True"
    assert (config.lr_scheduler, config.lr_scheduler_args) == ("cosine_with_min_lr", "min_lr_rate=0.1")
    assert result.unsupported == [] and result.problems == []


def test_a_constant_schedule_with_warmup_drops_the_warmup_with_a_note() -> None:
    result = import_kohya_ss_config({"lr_scheduler": "constant", "lr_warmup_steps": 100})
    assert result.config.lr_warmup_steps == 0
    assert any("constant schedule has no warmup" in note for note in result.notes)
    assert result.problems == []


def test_network_kinds_dropouts_loraplus_block_weights_and_max_norm_are_applied() -> None:
    result = import_kohya_ss_config(
        {
            "LoRA_type": "LyCORIS/LoKr",
            "LyCORIS_preset": "full",
            "conv_dim": 4,
            "conv_alpha": 2,
            "use_tucker": True,
            "factor": 8,
            "dora_wd": False,
            "network_dropout": 0,
            "rank_dropout": 0.1,
            "module_dropout": 0.05,
            "loraplus_lr_ratio": 16,
            "loraplus_unet_lr_ratio": 0,
            "loraplus_text_encoder_lr_ratio": 4,
            "down_lr_weight": "sine+.5",
            "mid_lr_weight": "0.5",
            "up_lr_weight": "",
            "block_lr_zero_threshold": 0.1,
            "block_dims": ",".join(["8"] * 25),
            "block_alphas": ",".join(["4"] * 25),
            "conv_block_dims": "",
            "conv_block_alphas": "",
            "scale_weight_norms": 1,
        }
    )
    config = result.config
    assert (config.network_type, config.conv_layers, config.use_tucker, config.lokr_factor) == (
        "lokr",
        True,
        True,
        8,
    )
    assert (config.rank_dropout, config.module_dropout) == (0.1, 0.05)
    assert (config.loraplus_lr_ratio, config.loraplus_text_encoder_lr_ratio) == (16, 4)
    assert (config.down_lr_weight, config.mid_lr_weight, config.block_lr_zero_threshold) == (
        "sine+.5",
        "0.5",
        0.1,
    )
    assert config.block_dims == ",".join(["8"] * 25) and config.scale_weight_norms == 1
    assert not result.problems and not result.unsupported, (result.problems, result.unsupported)

    dora = import_kohya_ss_config({"LoRA_type": "LyCORIS/LoCon", "dora_wd": True, "conv_dim": 8})
    assert (dora.config.network_type, dora.config.dora_wd) == ("locon", True)
    attention_only = import_kohya_ss_config(
        {"LoRA_type": "LyCORIS/LoHa", "LyCORIS_preset": "attn-mlp", "conv_dim": 8}
    )
    assert (attention_only.config.network_type, attention_only.config.conv_layers) == ("loha", False)
    # LyCORIS' "full-lin" preset is "full" without the convolutions
    for preset, convs in (("full", True), ("full-lin", False), ("unet-convblock-only", True)):
        imported = import_kohya_ss_config(
            {"LoRA_type": "LyCORIS/LoKr", "LyCORIS_preset": preset, "conv_dim": 8}
        )
        assert imported.config.conv_layers is convs, preset


@pytest.mark.parametrize("value", [5, 1.5, True])
@pytest.mark.parametrize("key", ["optimizer_args", "lr_scheduler_args"])
def test_arguments_that_are_not_text_are_reported_not_a_traceback(key: str, value: Any) -> None:
    base = TrainingConfig(optimizer_args="betas=0.9,0.99", lr_scheduler_args="min_lr_rate=0.2")
    result = import_kohya_ss_config({key: value}, base)
    assert getattr(result.config, key) == getattr(base, key)
    assert any(
        problem.startswith(f"{key} = {value!r}: expected key=value text") for problem in result.problems
    )
