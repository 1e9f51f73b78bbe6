"""sd-scripts --config_file TOML (and --dataset_config) import: every key mapped or reported once."""

import sys
import types
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from lib_lora_trainer.config import ConfigError, TrainingConfig, validate
from lib_lora_trainer.kohya_ss_import import KohyaImport
from lib_lora_trainer.sd_scripts_import import (
    SD_SCRIPTS_DEFAULTS,
    flatten_sections,
    import_sd_scripts_config,
    load_kohya_config,
    load_sd_scripts_toml,
    parse_toml,
)

# A train_network.py --config_file as people write them (sections as in sd-scripts' docs): kohya LoCon
# (networks.lora with conv_dim) with dropout, LoRA+ and block weights, AdamW8bit with arguments.
REALISTIC = """
[model_arguments]
pretrained_model_name_or_path = "/models/v1-5-pruned-emaonly.safetensors"
v2 = false
v_parameterization = false

[additional_network_arguments]
network_module = "networks.lora"
network_dim = 32
network_alpha = 16
network_dropout = 0.1
network_args = [
    "conv_dim=8", "conv_alpha=4", "rank_dropout=0.05", "module_dropout=0.02",
    "loraplus_lr_ratio=16", "down_lr_weight=sine+.5", "mid_lr_weight=0.5", "up_lr_weight=cosine",
    "block_lr_zero_threshold=0.1",
]
unet_lr = 0.0002
text_encoder_lr = 0.0001
scale_weight_norms = 1.0

[optimizer_arguments]
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.1", "betas=0.9, 0.99"]
learning_rate = 0.0001
max_grad_norm = 1.0
lr_scheduler = "cosine_with_restarts"
lr_scheduler_num_cycles = 4
lr_warmup_steps = 0.05

[dataset_arguments]
train_data_dir = "/data/alice/img"
reg_data_dir = "/data/alice/reg"
resolution = "512,512"
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1
enable_bucket = true
min_bucket_reso = 320
max_bucket_reso = 960
cache_latents = true
flip_aug = true

[training_arguments]
output_dir = "/out"
output_name = "alice_locon"
save_precision = "fp16"
save_model_as = "safetensors"
save_every_n_epochs = 2
train_batch_size = 2
max_train_epochs = 10
mixed_precision = "bf16"
xformers = true
seed = 0
clip_skip = 2
noise_offset = 0.05
multires_noise_iterations = 6
multires_noise_discount = 0.3
min_snr_gamma = 5.0
gradient_checkpointing = true
max_data_loader_n_workers = 2
persistent_data_loader_workers = true
logging_dir = "/out/logs"
log_with = "tensorboard"

[sample_prompt_arguments]
sample_prompts = "prompts.txt"
sample_every_n_epochs = 1
sample_sampler = "euler_a"
"""

PROMPTS = "# prompts for alice\nalice_chr, smiling --n lowres --w 512 --h 768\n\nalice_chr in a park\n"


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def file_keys(text: str) -> list[str]:
    """The keys of a --config_file as the report should name them: network_args entries one by one."""
    flat, _notes = flatten_sections(parse_toml(text, "test"))
    keys = [key for key in flat if key != "network_args"]
    keys += [str(entry).partition("=")[0] for entry in flat.get("network_args", [])]
    return keys


def reported(result: KohyaImport) -> Counter:
    """How often each key is named: applied, not supported, ignored or unreadable."""
    counts = Counter(result.read_from)
    counts.update(item.key for item in result.unsupported)
    counts.update(item.key for item in result.ignored)
    counts.update(result.problem_keys)
    return counts


@pytest.fixture
def realistic(tmp_path: Path) -> KohyaImport:
    write(tmp_path / "prompts.txt", PROMPTS)
    return load_sd_scripts_toml(write(tmp_path / "alice.toml", REALISTIC), TrainingConfig())


def test_a_realistic_config_maps_to_the_expected_settings(realistic: KohyaImport) -> None:
    config = realistic.config
    assert (config.network_type, config.network_dim, config.network_alpha) == ("locon", 32, 16.0)
    assert (config.conv_dim, config.conv_alpha) == (8, 4.0)
    assert (config.network_dropout, config.rank_dropout, config.module_dropout) == (0.1, 0.05, 0.02)
    assert config.loraplus_lr_ratio == 16.0
    assert (config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight) == ("sine+.5", "0.5", "cosine")
    assert config.block_lr_zero_threshold == 0.1 and config.scale_weight_norms == 1.0
    assert (config.optimizer, config.weight_decay, config.optimizer_args) == (
        "AdamW8bit",
        0.1,
        "betas=0.9,0.99",
    )
    assert (config.lr_scheduler, config.lr_scheduler_num_cycles) == ("cosine_with_restarts", 4)
    assert config.lr_warmup_steps == pytest.approx(0.05)  # a float below 1 is a fraction of all steps
    assert (config.unet_lr, config.text_encoder_lr, config.train_text_encoder) == (2e-4, 1e-4, True)
    assert (config.epochs, config.max_train_steps, config.batch_size) == (10, 0, 2)
    assert (config.train_data_dir, config.dataset_layout, config.reg_data_dir) == (
        "/data/alice/img",
        "kohya",
        "/data/alice/reg",
    )
    assert (config.resolution, config.min_bucket_reso, config.max_bucket_reso) == (512, 320, 960)
    assert (config.caption_extension, config.keep_tokens, config.shuffle_caption, config.flip_aug) == (
        ".txt",
        1,
        True,
        True,
    )
    assert (config.mixed_precision, config.save_precision, config.save_every_n_epochs) == ("bf16", "fp16", 2)
    assert config.seed == 0, "sd-scripts uses seed 0 as a seed (only a missing seed is random)"
    assert config.clip_skip == 2 and config.min_snr_gamma == 5.0 and config.gradient_checkpointing == "on"
    # sd-scripts adds the noise offset and the multires noise side by side
    assert (config.noise_offset, config.multires_noise_iterations, config.multires_noise_discount) == (
        0.05,
        6,
        0.3,
    )
    assert config.sample_prompts == ["alice_chr, smiling", "alice_chr in a park"]
    assert config.sample_sampler == "Euler a"
    assert config.output_name == "alice_locon"
    assert realistic.problems == [] and realistic.unsupported == []
    assert validate(config) == []


def test_every_key_of_the_file_is_reported_exactly_once(realistic: KohyaImport) -> None:
    counts = reported(realistic)
    expected = file_keys(REALISTIC)
    assert {key: counts[key] for key in expected} == dict.fromkeys(expected, 1)
    assert set(counts) == set(expected), set(counts) ^ set(expected)


def test_the_summary_names_the_source_and_what_was_not_taken(realistic: KohyaImport) -> None:
    summary = realistic.summary()
    assert summary.startswith(f"Imported {len(realistic.applied)} settings from the sd-scripts config.")
    assert "pretrained_model_name_or_path" in summary and "checkpoint loaded in the WebUI" in summary
    assert "--n lowres --w 512 --h 768" in summary  # the dropped per-prompt options are named


def test_a_sectioned_and_a_flat_file_give_the_same_result(tmp_path: Path) -> None:
    flat_text = "\n".join(line for line in REALISTIC.splitlines() if not line.startswith("["))
    write(tmp_path / "prompts.txt", PROMPTS)
    sectioned = load_sd_scripts_toml(write(tmp_path / "a.toml", REALISTIC))
    flat = load_sd_scripts_toml(write(tmp_path / "b.toml", flat_text))
    assert flat.config == sectioned.config
    assert flat.summary() == sectioned.summary()


def test_a_key_given_in_two_sections_takes_the_later_one_with_a_note() -> None:
    result = import_sd_scripts_config({"a": {"network_dim": 8}, "b": {"network_dim": 24}})
    assert result.config.network_dim == 24
    assert any("network_dim is given in [a] and in [b]" in note for note in result.notes)


# --- network_module and network_args ---------------------------------------------------------------------
def network(module: str, *args: str, **extra: Any) -> dict[str, Any]:
    return {
        "network_module": module,
        "network_dim": 16,
        "network_alpha": 8,
        "network_args": list(args),
        **extra,
    }


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (network("networks.lora"), {"network_type": "lora"}),
        (
            network("networks.lora", "conv_dim=8"),
            {"network_type": "locon", "conv_dim": 8, "conv_alpha": 1.0},  # networks.lora's conv_alpha default
        ),
        (network("networks.lora", "conv_dim=0", "conv_alpha=4"), {"network_type": "lora"}),
        (
            network("lycoris.kohya", "algo=locon", "conv_dim=8", "conv_alpha=4"),
            {"network_type": "locon", "conv_dim": 8, "conv_alpha": 4.0},
        ),
        (  # LyCORIS' default algo is its LoCon; conv rank and alpha default to the linear ones
            network("lycoris.kohya"),
            {"network_type": "locon", "conv_dim": 16, "conv_alpha": 8.0},
        ),
        (
            network("lycoris.kohya", "algo=locon", "preset=attn-mlp"),
            {"network_type": "lora"},  # a preset without convolutions
        ),
        (
            network("lycoris.kohya", "algo=loha", "conv_dim=4", "conv_alpha=2", "use_tucker=True"),
            {
                "network_type": "loha",
                "conv_layers": True,
                "conv_dim": 4,
                "conv_alpha": 2.0,
                "use_tucker": True,
            },
        ),
        (
            network("lycoris.kohya", "algo=lokr", "factor=8", "preset=attn-mlp"),
            {"network_type": "lokr", "conv_layers": False, "lokr_factor": 8},
        ),
        (
            network("lycoris.kohya", "algo=locon", "conv_dim=8", "dora_wd=True"),
            {"network_type": "locon", "dora_wd": True},
        ),
        (  # LyCORIS' old name, and LyCORIS' own reading of booleans
            network("lycoris.kohya", "algo=loha", "use_cp=1"),
            {"network_type": "loha", "use_tucker": True},
        ),
        (
            network("lycoris.kohya", "algo=locon", "dropout=0.2", network_dropout=0.05),
            {"network_dropout": 0.2},  # network_args dropout overrides network_dropout for LyCORIS
        ),
    ],
)
def test_each_network_module_and_algo_maps_to_its_network(data: dict, expected: dict) -> None:
    base = TrainingConfig(network_type="lokr", conv_layers=True, conv_dim=2, conv_alpha=2.0)
    result = import_sd_scripts_config(data, base)
    assert {name: getattr(result.config, name) for name in expected} == expected
    assert result.unsupported == [] and result.problems == [], (result.unsupported, result.problems)
    counts = reported(result)
    keys = [key for key in data if key != "network_args"] + [
        a.partition("=")[0] for a in data["network_args"]
    ]
    assert {key: counts[key] for key in keys} == dict.fromkeys(keys, 1)


@pytest.mark.parametrize(
    ("module", "args", "reason"),
    [
        ("networks.dylora", ["unit=4"], "DyLoRA is not trained here"),
        ("lycoris.kohya", ["algo=glora"], "glora is not trained here"),
        ("lycoris.kohya", ["algo=ia3"], "ia3 is not trained here"),
        ("networks.lora_flux", [], "another model family"),
        ("networks.oft", [], "trained here: networks.lora"),
    ],
)
def test_networks_we_do_not_train_are_reported_with_the_reason(module: str, args: list, reason: str) -> None:
    base = TrainingConfig(network_type="loha")
    result = import_sd_scripts_config(network(module, *args), base)
    assert result.config.network_type == "loha"
    reasons = {item.key: item.reason for item in result.unsupported}
    assert reason in reasons["network_module"]


def test_network_args_a_module_does_not_read_are_ignored_and_unknown_ones_reported() -> None:
    tab = TrainingConfig(dora_wd=True, network_dropout=0.2)
    lora = import_sd_scripts_config(
        network("networks.lora", "algo=loha", "dora_wd=True", "dropout=0.3", "foo=1"), tab
    )
    ignored = {item.key: item.reason for item in lora.ignored}
    assert {"algo", "dora_wd", "dropout", "foo"} <= set(ignored)
    assert ignored["dora_wd"] == "networks.lora does not read it"
    assert (lora.config.network_type, lora.config.dora_wd, lora.config.network_dropout) == (
        "lora",
        False,
        0.0,
    )

    lycoris = import_sd_scripts_config(
        network(
            "lycoris.kohya", "algo=loha", "block_dims=" + ",".join(["4"] * 25), "use_scalar=True", "bar=2"
        )
    )
    assert lycoris.config.block_dims == ""
    assert "lycoris.kohya does not read it" in {i.key: i.reason for i in lycoris.ignored}["block_dims"]
    unsupported = {item.key: item.reason for item in lycoris.unsupported}
    assert set(unsupported) == {"use_scalar", "bar"}


def test_block_alphas_without_block_dims_or_weights_are_not_read_as_in_networks_lora() -> None:
    result = import_sd_scripts_config(network("networks.lora", "block_alphas=" + ",".join(["2"] * 25)))
    assert result.config.block_alphas == ""
    assert "only together with block_dims" in {i.key: i.reason for i in result.ignored}["block_alphas"]


def test_a_network_args_entry_at_the_top_level_is_not_read() -> None:
    result = import_sd_scripts_config({"network_module": "networks.lora", "conv_dim": 8})
    assert result.config.network_type == "lora"
    assert "top level" in {item.key: item.reason for item in result.ignored}["conv_dim (top level)"]


def test_a_broken_network_args_entry_is_a_problem_not_a_crash() -> None:
    result = import_sd_scripts_config(network("networks.lora", "conv_dim"))
    assert any("network_args 'conv_dim' is not key=value" in problem for problem in result.problems)


# --- what the file leaves out: sd-scripts' defaults --------------------------------------------------------
def test_what_the_file_leaves_out_takes_sd_scripts_defaults_not_the_tabs() -> None:
    base = TrainingConfig(
        network_alpha=16.0,
        lr_scheduler="cosine",
        lr_warmup_steps=300,
        keep_tokens=1,
        caption_extension=".txt",
        max_train_steps=0,
        unet_lr=3e-4,
        trigger_word="alice_chr",
        reg_data_dir="/reg",
    )
    result = import_sd_scripts_config({"network_module": "networks.lora", "network_dim": 8}, base)
    config = result.config
    assert (config.network_dim, config.network_alpha) == (8, 1.0)
    assert (config.lr_scheduler, config.lr_warmup_steps) == ("constant", 0)
    assert (config.keep_tokens, config.max_train_steps) == (0, 1600)
    assert config.caption_extension == ".txt", "the caption files on disk, not sd-scripts' .caption"
    assert (config.unet_lr, config.text_encoder_lr) == (2e-6, 2e-6)
    assert config.reg_data_dir == "", "no reg_data_dir: sd-scripts trains without regularisation images"
    assert config.trigger_word == "alice_chr", "settings sd-scripts has no argument for are kept"
    note = next(note for note in result.notes if note.startswith("not in the file"))
    assert "network_alpha 1.0 (was 16.0)" in note and "caption_extension" not in note
    assert any("learning_rate is not in the file" in note for note in result.notes)


def test_the_defaults_table_names_real_fields() -> None:
    fields = TrainingConfig().to_dict()
    assert all(name in fields for name, _keys, _value in SD_SCRIPTS_DEFAULTS)


# --- rates, optimizer, schedule, noise ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("rates", "expected"),
    [
        ({"learning_rate": 3e-4}, (3e-4, 3e-4, True)),
        ({"learning_rate": 3e-4, "unet_lr": 2e-4}, (2e-4, 3e-4, True)),  # text_encoder_lr falls back
        ({"learning_rate": 3e-4, "text_encoder_lr": 0}, (3e-4, 0.0, False)),  # 0 trains no text encoder
        ({"learning_rate": 3e-4, "network_train_unet_only": True}, (3e-4, None, False)),
        ({"learning_rate": 3e-4, "network_train_text_encoder_only": True}, (0.0, 3e-4, True)),
        ({"unet_lr": 2e-4, "text_encoder_lr": [5e-5, 4e-5]}, (2e-4, 5e-5, True)),  # newer sd-scripts: a list
    ],
)
def test_learning_rates_follow_sd_scripts_rules(rates: dict, expected: tuple) -> None:
    base = TrainingConfig(unet_lr=9e-4, text_encoder_lr=8e-4, train_text_encoder=False)
    config = import_sd_scripts_config({"network_module": "networks.lora", **rates}, base).config
    unet, text, train_text = expected
    assert (config.unet_lr, config.train_text_encoder) == (unet, train_text)
    if text is not None:
        assert config.text_encoder_lr == text


@pytest.mark.parametrize(
    ("value", "expected"),
    [(150, 150), (0.1, 0.1), ("10%", 0.1), ("200", 200), (200.0, 200), (0, 0)],
)
def test_warmup_steps_are_a_count_or_a_fraction(value: Any, expected: float) -> None:
    result = import_sd_scripts_config({"lr_scheduler": "cosine", "lr_warmup_steps": value})
    assert result.config.lr_warmup_steps == pytest.approx(expected)
    assert result.problems == []


def test_an_unreadable_warmup_keeps_the_previous_value() -> None:
    base = TrainingConfig(lr_warmup_steps=300)
    result = import_sd_scripts_config({"lr_scheduler": "cosine", "lr_warmup_steps": "soon"}, base)
    assert result.config.lr_warmup_steps == 300
    assert any(problem.startswith("lr_warmup_steps = 'soon'") for problem in result.problems)


def test_optimizer_names_are_case_insensitive_and_their_own_defaults_apply() -> None:
    prodigy = import_sd_scripts_config(
        {"optimizer_type": "prodigy", "optimizer_args": ["d_coef=2", "decouple=True"], "learning_rate": 1.0},
        TrainingConfig(weight_decay=0.1, prodigy_use_bias_correction=True),
    )
    config = prodigy.config
    assert (config.optimizer, config.prodigy_d_coef, config.optimizer_args) == (
        "Prodigy",
        2.0,
        "decouple=True",
    )
    assert (config.weight_decay, config.prodigy_use_bias_correction) == (0.0, False)  # Prodigy's defaults
    adafactor = import_sd_scripts_config({"optimizer_type": "AdaFactor"}).config
    assert (adafactor.optimizer, adafactor.adafactor_relative_step) == (
        "Adafactor",
        True,
    )  # sd-scripts' default
    old_flag = import_sd_scripts_config({"use_8bit_adam": True}).config
    assert old_flag.optimizer == "AdamW8bit"
    custom = import_sd_scripts_config({"optimizer_type": "bitsandbytes.optim.AdEMAMix8bit"})
    assert custom.config.optimizer == TrainingConfig().optimizer
    assert "available here" in {item.key: item.reason for item in custom.unsupported}["optimizer_type"]


def test_scheduler_arguments_of_sd_scripts_become_schedule_arguments() -> None:
    min_lr = import_sd_scripts_config(
        {"lr_scheduler": "cosine_with_min_lr", "lr_scheduler_min_lr_ratio": 0.2}
    )
    assert min_lr.config.lr_scheduler_args == "min_lr_rate=0.2"
    wsd = import_sd_scripts_config(
        {
            "lr_scheduler": "warmup_stable_decay",
            "lr_decay_steps": 0.25,
            "lr_scheduler_args": ["decay_type=linear"],
        }
    )
    assert wsd.config.lr_scheduler_args == "decay_type=linear num_decay_steps=0.25"
    assert min_lr.problems == [] and wsd.problems == []


def test_noise_offset_without_multires_and_seed_zero() -> None:
    result = import_sd_scripts_config({"noise_offset": 0.1, "adaptive_noise_scale": 0.01, "seed": 0})
    config = result.config
    assert (config.noise_offset, config.adaptive_noise_scale, config.multires_noise_iterations) == (
        0.1,
        0.01,
        0,
    )
    assert config.seed == 0


def test_validation_split_becomes_the_held_out_share() -> None:
    base = TrainingConfig(validation_dir="/data/held-out")
    result = import_sd_scripts_config({"validation_split": 0.2, "validation_seed": 7}, base)
    assert (result.config.validation_share, result.config.validation_dir) == (0.2, "")
    assert result.config.validation_loss and not result.to_fix
    assert any("hash of their" in note for note in result.notes)
    assert reported(result)["validation_split"] == 1 and reported(result)["validation_seed"] == 1

    too_much = import_sd_scripts_config({"validation_split": 0.8})
    assert too_much.config.validation_share == 0.0
    assert any("at most 0.5" in line for line in too_much.problems)
    assert import_sd_scripts_config({"validation_split": 0.0}).config.validation_share == 0.0


def test_gui_only_keys_in_a_toml_are_ignored_as_sd_scripts_ignores_them() -> None:
    result = import_sd_scripts_config({"LoRA_type": "LyCORIS/LoHa", "epoch": 7, "max_resolution": "768,768"})
    assert (result.config.network_type, result.config.epochs, result.config.resolution) == ("lora", 10, 512)
    reasons = {item.key: item.reason for item in result.ignored}
    assert all(
        "not a train_network.py argument" in reasons[key] for key in ("LoRA_type", "epoch", "max_resolution")
    )


# --- sample prompts ----------------------------------------------------------------------------------------
def test_sample_prompts_from_a_toml_prompt_file(tmp_path: Path) -> None:
    write(
        tmp_path / "prompts.toml",
        '[prompt]\nwidth = 512\n[[prompt.subset]]\nprompt = "alice_chr waving"\n'
        '[[prompt.subset]]\nprompt = "alice_chr reading"\nnegative_prompt = "blurry"\n',
    )
    result = load_sd_scripts_toml(write(tmp_path / "c.toml", 'sample_prompts = "prompts.toml"\n'))
    assert result.config.sample_prompts == ["alice_chr waving", "alice_chr reading"]
    assert any("negative_prompt, width dropped" in note for note in result.notes)


def test_a_missing_sample_prompt_file_is_a_problem_not_a_crash(tmp_path: Path) -> None:
    base = TrainingConfig(sample_prompts=["kept"])
    result = load_sd_scripts_toml(write(tmp_path / "c.toml", 'sample_prompts = "nowhere.txt"\n'), base)
    assert result.config.sample_prompts == ["kept"]
    assert any(
        p.startswith("sample_prompts = 'nowhere.txt'") and "does not exist" in p for p in result.problems
    )


# --- dataset config -----------------------------------------------------------------------------------------
def dataset_toml(
    tmp_path: Path, dataset: str, main: str = 'network_module = "networks.lora"\n'
) -> KohyaImport:
    write(tmp_path / "cfg" / "dataset.toml", dataset)
    main_file = write(tmp_path / "cfg" / "main.toml", main + 'dataset_config = "dataset.toml"\n')
    return load_sd_scripts_toml(
        main_file, TrainingConfig(train_data_dir="/before", reg_data_dir="/reg_before")
    )


def test_one_training_subset_becomes_a_flat_folder_and_the_reg_subset_the_reg_folder(tmp_path: Path) -> None:
    result = dataset_toml(
        tmp_path,
        """
[general]
shuffle_caption = true
caption_extension = ".txt"
keep_tokens = 2

[[datasets]]
resolution = [768, 768]
batch_size = 3
enable_bucket = true
max_bucket_reso = 1536

  [[datasets.subsets]]
  image_dir = "/photos/alice"
  num_repeats = 12
  class_tokens = "alice woman"
  flip_aug = true

  [[datasets.subsets]]
  image_dir = "/photos/reg"
  is_reg = true
  num_repeats = 1
  flip_aug = true
""",
        main='network_module = "networks.lora"\ntrain_data_dir = "/ignored"\nkeep_tokens = 5\n',
    )
    config = result.config
    assert (config.train_data_dir, config.dataset_layout, config.flat_repeats) == (
        "/photos/alice",
        "flat",
        12,
    )
    assert (config.class_token, config.reg_data_dir) == ("alice woman", "/photos/reg")
    assert (config.shuffle_caption, config.caption_extension, config.keep_tokens, config.flip_aug) == (
        True,
        ".txt",
        2,
        True,
    )
    assert (config.resolution, config.batch_size, config.enable_bucket, config.max_bucket_reso) == (
        768,
        3,
        True,
        1536,
    )
    assert result.problems == [] and result.unsupported == [], (result.problems, result.unsupported)
    ignored = {item.key: item.reason for item in result.ignored}
    assert "ignores it when a dataset_config is given" in ignored["train_data_dir"]
    assert "sets keep_tokens" in ignored["keep_tokens"]  # the top-level value gives way
    assert "keep_tokens (dataset_config)" in result.read_from


def test_n_name_subsets_of_one_folder_become_the_kohya_layout(tmp_path: Path) -> None:
    for name in ("10_alice", "4_alice smiling"):
        (tmp_path / "img" / name).mkdir(parents=True)
    img = (tmp_path / "img").as_posix()
    result = dataset_toml(
        tmp_path,
        f"""
[[datasets]]
  [[datasets.subsets]]
  image_dir = "{img}/10_alice"
  num_repeats = 10
  [[datasets.subsets]]
  image_dir = "{img}/4_alice smiling"
  num_repeats = 4
  class_tokens = "alice smiling"
""",
    )
    assert (result.config.train_data_dir, result.config.dataset_layout) == (img, "kohya")
    assert result.config.reg_data_dir == "", "no is_reg subset: sd-scripts trains without one"
    assert result.unsupported == [] and result.problems == []


@pytest.mark.parametrize(
    ("subsets", "reason"),
    [
        (
            [("/a/10_alice", 10), ("/b/5_alice", 5)],
            "these image_dir are in different folders",
        ),
        ([("/a/10_alice", 10), ("/a/5_alice", 3)], "not named N_name with N = its num_repeats 3"),
        ([("/a/alice", 10), ("/a/bob", 10)], "not named N_name"),
    ],
)
def test_subsets_that_are_not_one_folder_are_reported_and_the_folder_kept(
    tmp_path: Path, subsets: list, reason: str
) -> None:
    text = "[[datasets]]\n" + "".join(
        f'[[datasets.subsets]]\nimage_dir = "{folder}"\nnum_repeats = {repeats}\n'
        for folder, repeats in subsets
    )
    result = dataset_toml(tmp_path, text)
    assert result.config.train_data_dir == "/before"
    unsupported = {item.key: item for item in result.unsupported}
    assert reason in unsupported["image_dir (dataset_config)"].reason
    assert "previous one kept" in unsupported["image_dir (dataset_config)"].reason


def test_a_parent_with_other_n_name_folders_is_not_used(tmp_path: Path) -> None:
    for name in ("10_alice", "3_bob"):
        (tmp_path / "img" / name).mkdir(parents=True)
    img = (tmp_path / "img").as_posix()
    result = dataset_toml(
        tmp_path,
        f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "{img}/10_alice"\nnum_repeats = 10\n'
        f'[[datasets.subsets]]\nimage_dir = "{img}/10_alice"\nnum_repeats = 10\n',
    )
    assert result.config.train_data_dir == "/before"
    assert "3_bob" in {item.key: item.reason for item in result.unsupported}["image_dir (dataset_config)"]


def test_an_option_that_differs_between_subsets_is_reported_not_applied(tmp_path: Path) -> None:
    result = dataset_toml(
        tmp_path,
        "[[datasets]]\n"
        '[[datasets.subsets]]\nimage_dir = "/a/10_alice"\nnum_repeats = 10\nflip_aug = true\n'
        '[[datasets.subsets]]\nimage_dir = "/a/2_alice"\nnum_repeats = 2\n',
        main='network_module = "networks.lora"\nflip_aug = false\n',
    )
    assert result.config.flip_aug is False
    item = {item.key: item for item in result.unsupported}["flip_aug (dataset_config)"]
    assert item.value == {"10_alice": True, "2_alice": False}  # the second falls back to the command line
    assert "one value applies to every image here" in item.reason
    assert "flip_aug" in {i.key for i in result.ignored}
    assert result.config.train_data_dir == "/a" and result.config.dataset_layout == "kohya"


def test_datasets_with_different_resolutions_are_reported(tmp_path: Path) -> None:
    result = dataset_toml(
        tmp_path,
        '[[datasets]]\nresolution = 512\n[[datasets.subsets]]\nimage_dir = "/a/1_x"\nnum_repeats = 1\n'
        '[[datasets]]\nresolution = 768\n[[datasets.subsets]]\nimage_dir = "/a/2_x"\nnum_repeats = 2\n',
    )
    assert result.config.resolution == TrainingConfig().resolution
    assert {item.key: item.value for item in result.unsupported}["resolution (dataset_config)"] == {
        "datasets[0]": 512,
        "datasets[1]": 768,
    }


def test_unknown_dataset_keys_and_fine_tuning_subsets_are_reported(tmp_path: Path) -> None:
    result = dataset_toml(
        tmp_path,
        '[general]\nsparkle = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/a"\nnum_repeats = 3\n'
        '[[datasets.subsets]]\nimage_dir = "/b"\nmetadata_file = "/b/meta.json"\n',
    )
    keys = {item.key for item in result.unsupported}
    assert {"sparkle (dataset_config)", "metadata_file (dataset_config)"} <= keys
    assert (result.config.train_data_dir, result.config.flat_repeats) == ("/a", 3)


def test_a_missing_dataset_config_is_a_problem_line_not_a_crash(tmp_path: Path) -> None:
    main = write(tmp_path / "main.toml", 'network_module = "networks.lora"\ndataset_config = "gone.toml"\n')
    result = load_sd_scripts_toml(main, TrainingConfig(train_data_dir="/before"))
    assert result.config.train_data_dir == "/before"
    problem = next(p for p in result.problems if p.startswith("dataset_config"))
    assert "was not found" in problem and str(tmp_path) in problem
    assert reported(result)["dataset_config"] == 1


def test_a_broken_dataset_config_is_a_problem_line(tmp_path: Path) -> None:
    result = dataset_toml(tmp_path, "[[datasets]\n")
    assert any("is not valid TOML" in problem for problem in result.problems)


def test_a_dataset_config_imported_on_its_own_changes_only_the_dataset(tmp_path: Path) -> None:
    path = write(
        tmp_path / "dataset.toml",
        '[general]\ncaption_extension = ".txt"\n[[datasets]]\nresolution = 768\n'
        '[[datasets.subsets]]\nimage_dir = "/photos/alice"\nnum_repeats = 6\n',
    )
    base = TrainingConfig(network_alpha=16, lr_scheduler="cosine")
    result = load_kohya_config(path, base)
    config = result.config
    assert (config.train_data_dir, config.flat_repeats, config.resolution) == ("/photos/alice", 6, 768)
    assert (config.network_alpha, config.lr_scheduler) == (16.0, "cosine")
    assert result.summary().startswith("Imported") and "sd-scripts dataset config" in result.summary()


# --- files ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"network_dim = \n", "is not valid TOML"),
        (b"[a]\nx = 1\n[a]\n", "is not valid TOML"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\x00", "save it as UTF-8"),
    ],
)
def test_bad_toml_files_are_one_clear_error(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=message):
        load_kohya_config(path)


def test_missing_files_and_folders_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_kohya_config(tmp_path / "missing.toml")
    folder = tmp_path / "cfg.toml"
    folder.mkdir()
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        load_kohya_config(folder)


def test_one_entry_point_reads_json_and_toml(tmp_path: Path) -> None:
    gui = load_kohya_config(write(tmp_path / "gui.json", '{"LoRA_type": "Standard", "network_dim": 24}'))
    toml = load_kohya_config(
        write(tmp_path / "run.toml", 'network_module = "networks.lora"\nnetwork_dim = 24\n')
    )
    unnamed_json = load_kohya_config(write(tmp_path / "gui.cfg", '{"network_dim": 12}'))
    unnamed_toml = load_kohya_config(write(tmp_path / "run.cfg", "network_dim = 12\n"))
    assert gui.config.network_dim == toml.config.network_dim == 24
    assert unnamed_json.config.network_dim == unnamed_toml.config.network_dim == 12
    assert gui.summary() == "Imported 2 settings from the kohya_ss config."
    assert toml.summary().startswith(f"Imported {len(toml.applied)} settings from the sd-scripts config.")


def test_without_tomllib_tomli_is_used_and_without_either_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tomllib

    monkeypatch.setitem(sys.modules, "tomllib", None)  # as on Python 3.10
    monkeypatch.setitem(sys.modules, "toml", None)
    fake = types.ModuleType("tomli")
    fake.loads = tomllib.loads  # type: ignore[attr-defined]
    fake.TOMLDecodeError = tomllib.TOMLDecodeError  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tomli", fake)
    assert parse_toml("network_dim = 8", "x") == {"network_dim": 8}
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_toml("network_dim =", "x")
    monkeypatch.setitem(sys.modules, "tomli", None)
    with pytest.raises(ConfigError, match="pip install tomli"):
        parse_toml("network_dim = 8", "x")


# The flat TOML kohya_ss GUI writes next to the run (config_lora-<date>.toml) and hands to sd-scripts.
KOHYA_SS_WRITTEN = """
bucket_no_upscale = true
bucket_reso_steps = 64
cache_latents = true
caption_extension = ".txt"
clip_skip = 1
dynamo_backend = "no"
enable_bucket = true
gradient_accumulation_steps = 1
huber_c = 0.1
huber_schedule = "snr"
learning_rate = 0.0001
logging_dir = "/work/alice/log"
loss_type = "l2"
lr_scheduler = "cosine"
lr_scheduler_args = []
lr_scheduler_num_cycles = 1
lr_scheduler_power = 1
lr_warmup_steps = 160
max_bucket_reso = 2048
max_data_loader_n_workers = 0
max_grad_norm = 1
max_timestep = 1000
max_token_length = 75
max_train_steps = 1600
min_bucket_reso = 256
mixed_precision = "fp16"
multires_noise_discount = 0.3
network_alpha = 1
network_args = []
network_dim = 8
network_module = "networks.lora"
network_train_unet_only = false
noise_offset_type = "Original"
optimizer_args = []
optimizer_type = "AdamW8bit"
output_dir = "/work/alice/model"
output_name = "alice"
pretrained_model_name_or_path = "runwayml/stable-diffusion-v1-5"
prior_loss_weight = 1
resolution = "512,512"
save_every_n_epochs = 1
save_model_as = "safetensors"
save_precision = "fp16"
text_encoder_lr = 0.0001
train_batch_size = 1
train_data_dir = "/work/alice/img"
unet_lr = 0.0001
xformers = true
"""


def test_the_toml_kohya_ss_writes_maps_with_every_key_reported_once(tmp_path: Path) -> None:
    result = load_kohya_config(write(tmp_path / "config_lora-20240101.toml", KOHYA_SS_WRITTEN))
    config = result.config
    assert (config.network_type, config.network_dim, config.network_alpha) == ("lora", 8, 1.0)
    assert (config.optimizer, config.lr_scheduler, config.lr_warmup_steps) == ("AdamW8bit", "cosine", 160)
    assert (config.max_train_steps, config.max_bucket_reso, config.train_data_dir) == (
        1600,
        2048,
        "/work/alice/img",
    )
    assert result.problems == [] and result.unsupported == []
    counts = reported(result)
    assert {key: counts[key] for key in file_keys(KOHYA_SS_WRITTEN) + ["network_args"]} == dict.fromkeys(
        file_keys(KOHYA_SS_WRITTEN) + ["network_args"], 1
    )


def test_every_dataset_option_is_reported_once_by_name(tmp_path: Path) -> None:
    result = dataset_toml(
        tmp_path,
        "[general]\nshuffle_caption = true\nkeep_tokens = 2\n[[datasets]]\nresolution = 768\nbatch_size = 2\n"
        '[[datasets.subsets]]\nimage_dir = "/p/alice"\nnum_repeats = 4\ncolor_aug = true\n'
        "random_crop = true\n"
        '[[datasets.subsets]]\nimage_dir = "/p/reg"\nis_reg = true\nnum_repeats = 3\n',
    )
    counts = reported(result)
    options = ["shuffle_caption", "keep_tokens", "resolution", "batch_size", "color_aug", "random_crop"]
    assert {name: counts[f"{name} (dataset_config)"] for name in options} == dict.fromkeys(options, 1)
    unsupported = {item.key: item.reason for item in result.unsupported}
    assert "cropped once" in unsupported["random_crop (dataset_config)"]
    assert (result.config.color_aug, result.config.keep_tokens, result.config.batch_size) == (True, 2, 2)
    assert any(note.startswith("color_aug: the regularisation subsets reg") for note in result.notes)
    # a folder of regularisation images is read with 1 repeat here: 3 cannot be kept
    reg = unsupported["is_reg image_dir (dataset_config)"]
    assert "read with 1 repeat" in reg and result.config.reg_data_dir == "/reg_before"


@pytest.mark.parametrize("repeats", ["nan", "inf", "0", "2.5", '"ten"'])
def test_unusable_repeats_are_a_problem_line(tmp_path: Path, repeats: str) -> None:
    result = dataset_toml(
        tmp_path, f'[[datasets]]\n[[datasets.subsets]]\nimage_dir = "/a"\nnum_repeats = {repeats}\n'
    )
    assert result.config.train_data_dir == "/before"
    assert any("num_repeats" in problem and "not a whole number" in problem for problem in result.problems)
