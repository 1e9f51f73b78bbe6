"""kohya LoRA files: tensors, precision, metadata, hashes, atomic and non-overwriting writes, loading."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import safe_open

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.network.kohya_format import (
    LoraModuleWeights,
    TrainingRunInfo,
    build_metadata,
    count_tags,
    epoch_file_name,
    load_kohya_lora,
    save_kohya_lora,
)
from lib_lora_trainer.network.kohya_names import kohya_name
from tests.network.a1111_merge import merge_into_weight

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
LINEAR = kohya_name("text_encoder", "text_model.encoder.layers.0.mlp.fc1")
CONV_1X1 = kohya_name("unet", "input_blocks.1.1.proj_in")
CONV_3X3 = kohya_name("unet", "input_blocks.1.0.in_layers.2")


def sample_modules(seed: int = 0, *, big: bool = False) -> dict[str, LoraModuleWeights]:
    """A Linear, a 1x1 conv and a 3x3 conv LoRA, with different ranks and alphas."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(shape, generator=generator)

    rank = 128 if big else 4  # big: a file over 1.1 MiB, so the legacy hash covers real data
    return {
        LINEAR: LoraModuleWeights(down=randn(rank, 768), up=randn(3072, rank), alpha=rank / 2),
        CONV_1X1: LoraModuleWeights(down=randn(8, 320, 1, 1), up=randn(320, 8, 1, 1), alpha=4.0),
        CONV_3X3: LoraModuleWeights(down=randn(2, 320, 3, 3), up=randn(320, 2, 1, 1), alpha=1.0),
    }


def sample_run() -> TrainingRunInfo:
    return TrainingRunInfo(
        num_batches_per_epoch=23,
        max_train_steps=230,
        dataset_dirs={"10_alice": {"n_repeats": 10, "img_count": 23}},
        tag_frequency={"10_alice": count_tags(["Alice, 1girl, red scarf", "alice, 1girl", "1girl, smile"])},
        bucket_info={"buckets": {"0": {"resolution": [512, 512], "count": 230}}, "mean_img_ar_error": 0.0},
        reg_dataset_dirs={"1_woman": {"n_repeats": 1, "img_count": 5}},
        session_id=1234,
        training_started_at=1_700_000_000.5,
        sd_model_name="v1-5-pruned-emaonly.safetensors",
        sd_model_hash="6ce0161689",
        new_sd_model_hash="6ce0161689b3853acaa03779ec93eafe75a02f4ced659bee03f50797806fa2fa",
    )


def sample_metadata(epoch: int = 3, **config_values) -> dict[str, str]:
    config = TrainingConfig(output_name="alice", trigger_word="alice", **config_values)
    return build_metadata(
        output_name="alice",
        epoch=epoch,
        steps=69,
        config=config,
        run=sample_run(),
        finished_at=1_700_000_600.0,
    )


def addnet_hash(path) -> str:
    """A1111's hash of a LoRA file: sha256 of everything after the 8-byte length and the JSON header."""
    data = path.read_bytes()
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(data[8 + header_length :]).hexdigest()


# --------------------------------------------------------------------------------------------
# save and load
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_round_trip_keeps_tensors_alpha_and_metadata(tmp_path, precision):
    modules = sample_modules()
    metadata = sample_metadata()
    path = save_kohya_lora(tmp_path / "alice-000003.safetensors", modules, metadata, precision)

    loaded, loaded_metadata = load_kohya_lora(path)
    assert set(loaded) == set(modules)
    for stem, module in modules.items():
        expected_down = module.down.to(DTYPES[precision]).float()
        expected_up = module.up.to(DTYPES[precision]).float()
        assert torch.equal(loaded[stem].down, expected_down)
        assert torch.equal(loaded[stem].up, expected_up)
        assert loaded[stem].alpha == module.alpha  # these alphas are exact in every precision
        assert loaded[stem].down.dtype == torch.float32
    assert {k: v for k, v in loaded_metadata.items() if not k.startswith("sshs_")} == metadata
    for key in ("ss_tag_frequency", "ss_dataset_dirs", "ss_bucket_info", "ss_reg_dataset_dirs"):
        assert isinstance(json.loads(loaded_metadata[key]), dict)


@pytest.mark.parametrize("precision", ["fp16", "bf16", "fp32"])
def test_file_layout_is_kohyas(tmp_path, precision):
    path = save_kohya_lora(tmp_path / "a.safetensors", sample_modules(), {}, precision)
    with safe_open(str(path), framework="pt") as reader:
        keys = set(reader.keys())
        tensors = {key: reader.get_tensor(key) for key in keys}
    expected = {
        f"{stem}.{part}"
        for stem in sample_modules()
        for part in ("lora_down.weight", "lora_up.weight", "alpha")
    }
    assert keys == expected
    assert {tensor.dtype for tensor in tensors.values()} == {DTYPES[precision]}
    alphas = {key: tensor for key, tensor in tensors.items() if key.endswith(".alpha")}
    assert all(alpha.dim() == 0 for alpha in alphas.values())
    assert float(alphas[f"{CONV_1X1}.alpha"]) == 4.0
    assert tuple(tensors[f"{CONV_3X3}.lora_down.weight"].shape) == (2, 320, 3, 3)
    assert tuple(tensors[f"{CONV_3X3}.lora_up.weight"].shape) == (320, 2, 1, 1)


def test_hashes_equal_independent_computations(tmp_path):
    metadata = sample_metadata()
    path = save_kohya_lora(tmp_path / "alice-000003.safetensors", sample_modules(big=True), metadata, "fp32")
    assert path.stat().st_size > 0x110000
    with safe_open(str(path), framework="pt") as reader:
        header = reader.metadata()
        tensors = {key: reader.get_tensor(key) for key in reader.keys()}  # noqa: SIM118 (a reader)

    assert header["sshs_model_hash"] == addnet_hash(path)
    # kohya's legacy hash: the file as written with only the ss_* keys, 64 KiB from offset 1 MiB
    training_only = {key: value for key, value in header.items() if key.startswith("ss_")}
    replay = safetensors.torch.save(tensors, metadata=training_only)
    assert header["sshs_legacy_hash"] == hashlib.sha256(replay[0x100000:0x110000]).hexdigest()[:8]
    assert len(header["sshs_model_hash"]) == 64 and len(header["sshs_legacy_hash"]) == 8


def test_only_training_metadata_takes_part_in_the_hashes(tmp_path):
    modules = sample_modules(big=True)
    metadata = sample_metadata()
    first = save_kohya_lora(tmp_path / "a.safetensors", modules, metadata, "fp32")
    retitled = dict(metadata, **{"modelspec.title": "another title", "modelspec.author": "someone"})
    second = save_kohya_lora(tmp_path / "b.safetensors", modules, retitled, "fp32")
    changed = dict(metadata, ss_training_comment="x" * 5000)  # shifts the data by a whole header page
    third = save_kohya_lora(tmp_path / "c.safetensors", modules, changed, "fp32")

    first_header, second_header, third_header = (load_kohya_lora(p)[1] for p in (first, second, third))
    assert (
        first_header["sshs_model_hash"] == second_header["sshs_model_hash"] == third_header["sshs_model_hash"]
    )
    assert first_header["sshs_legacy_hash"] == second_header["sshs_legacy_hash"]
    assert first_header["sshs_legacy_hash"] != third_header["sshs_legacy_hash"]


def test_write_is_atomic_and_never_overwrites(tmp_path):
    path = tmp_path / "alice-000001.safetensors"
    save_kohya_lora(path, sample_modules(seed=1), {"ss_epoch": "1"}, "fp16")
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind
    original = path.read_bytes()

    with pytest.raises(FileExistsError, match="already exists"):
        save_kohya_lora(path, sample_modules(seed=2), {"ss_epoch": "1"}, "fp16")
    assert path.read_bytes() == original

    save_kohya_lora(path, sample_modules(seed=2), {"ss_epoch": "1"}, "fp16", overwrite=True)
    assert path.read_bytes() != original
    assert torch.equal(load_kohya_lora(path)[0][LINEAR].up, sample_modules(seed=2)[LINEAR].up.half().float())
    assert sorted(os.listdir(tmp_path)) == [path.name]


@pytest.mark.parametrize(
    "change, error, message",
    [
        (
            lambda m, md: ({"lora_unet_input_blocks_1_1_proj_in": m[CONV_1X1]}, md),
            ValueError,
            "kohya's naming",
        ),
        (lambda m, md: ({"lora_unet_input_blocks_1_1_norm": m[CONV_1X1]}, md), ValueError, "SD1.5 UNet"),
        (lambda m, md: ({}, md), ValueError, "no LoRA modules"),
        (lambda m, md: (m, {"ss_epoch": 3}), TypeError, "ss_epoch"),
        (
            lambda m, md: (
                {LINEAR: LoraModuleWeights(down=torch.zeros(4, 8), up=torch.zeros(8, 3), alpha=1)},
                md,
            ),
            ValueError,
            "rank mismatch",
        ),
        (
            lambda m, md: (
                {CONV_3X3: LoraModuleWeights(torch.zeros(2, 8, 3, 3), torch.zeros(8, 2, 3, 3), 1)},
                md,
            ),
            ValueError,
            "1x1",
        ),
        (
            lambda m, md: (
                {LINEAR: LoraModuleWeights(torch.zeros(4, 8), torch.zeros(8, 4), float("nan"))},
                md,
            ),
            ValueError,
            "finite",
        ),
    ],
)
def test_bad_saves_are_refused_and_write_nothing(tmp_path, change, error, message):
    modules, metadata = change(sample_modules(), {"ss_epoch": "3"})
    with pytest.raises(error, match=message):
        save_kohya_lora(tmp_path / "x.safetensors", modules, metadata, "fp16")
    assert os.listdir(tmp_path) == []


def test_bad_precision_and_file_name_are_refused(tmp_path):
    with pytest.raises(ValueError, match="save precision"):
        save_kohya_lora(tmp_path / "x.safetensors", sample_modules(), {}, "fp8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=".safetensors"):
        save_kohya_lora(tmp_path / "x.pt", sample_modules(), {}, "fp16")
    assert os.listdir(tmp_path) == []


def test_peft_names_and_missing_alpha_are_read(tmp_path):
    generator = torch.Generator().manual_seed(3)
    down, up = torch.randn(4, 768, generator=generator), torch.randn(3072, 4, generator=generator)
    path = tmp_path / "peft_style.safetensors"
    safetensors.torch.save_file({f"{LINEAR}.lora_A.weight": down, f"{LINEAR}.lora_B.weight": up}, str(path))

    modules, metadata = load_kohya_lora(path)
    assert metadata == {}
    assert torch.equal(modules[LINEAR].down, down) and torch.equal(modules[LINEAR].up, up)
    assert modules[LINEAR].alpha == 4.0 and modules[LINEAR].scale == 1.0  # A1111's scale without alpha


def _write(path, tensors: dict[str, torch.Tensor]):
    safetensors.torch.save_file(tensors, str(path))
    return path


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"model.diffusion_model.out.2.weight": torch.zeros(4, 4)}, "not a kohya-format LoRA"),
        (
            {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 4)},
            "not a kohya-format LoRA",
        ),
        ({f"{LINEAR}.hada_w1_a": torch.zeros(4, 4), f"{LINEAR}.alpha": torch.tensor(1.0)}, "LoHa"),
        ({f"{LINEAR}.lora_down.weight": torch.zeros(4, 8)}, "no lora_up.weight"),
        ({f"{LINEAR}.alpha": torch.tensor(1.0)}, "no LoRA weights"),
        (
            {f"{LINEAR}.lora_down.weight": torch.zeros(4, 8), f"{LINEAR}.lora_up.weight": torch.zeros(8, 2)},
            "rank",
        ),
    ],
)
def test_files_that_are_not_loras_get_clear_errors(tmp_path, tensors, message):
    path = _write(tmp_path / "other.safetensors", tensors)
    with pytest.raises(ValueError, match=message):
        load_kohya_lora(path)


def test_unreadable_or_unsafe_files_get_clear_errors(tmp_path, caplog):
    garbage = tmp_path / "broken.safetensors"
    garbage.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_kohya_lora(garbage)
    assert "broken.safetensors is not a readable safetensors file" in caplog.text  # logged too
    pickle_file = tmp_path / "old.ckpt"
    pickle_file.write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="only .safetensors"):
        load_kohya_lora(pickle_file)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_kohya_lora(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------------------------
# merge math
# --------------------------------------------------------------------------------------------


def test_merge_equals_the_lora_forward_for_linear():
    generator = torch.Generator().manual_seed(5)
    weight, bias = torch.randn(12, 10, generator=generator), torch.randn(12, generator=generator)
    module = LoraModuleWeights(
        torch.randn(3, 10, generator=generator), torch.randn(12, 3, generator=generator), 1.5
    )
    x = torch.randn(7, 10, generator=generator)

    lora_forward = F.linear(x, weight, bias) + 0.8 * F.linear(F.linear(x, module.down), module.up) * 1.5 / 3
    merged = merge_into_weight(weight, module, multiplier=0.8)
    torch.testing.assert_close(F.linear(x, merged, bias), lora_forward, rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged, weight)  # a new tensor; the input is untouched
    torch.testing.assert_close(merge_into_weight(weight, module, multiplier=0.0), weight)


@pytest.mark.parametrize("kernel, stride, padding", [(1, 1, 0), (3, 1, 1), (3, 2, 1)])
def test_merge_equals_the_lora_forward_for_conv(kernel, stride, padding):
    generator = torch.Generator().manual_seed(kernel * 10 + stride)
    weight = torch.randn(6, 5, kernel, kernel, generator=generator)
    down = torch.randn(2, 5, kernel, kernel, generator=generator)
    up = torch.randn(6, 2, 1, 1, generator=generator)
    module = LoraModuleWeights(down=down, up=up, alpha=4.0)
    x = torch.randn(2, 5, 9, 9, generator=generator)

    # kohya's LoCon forward: a kxk down conv with the layer's stride/padding, then a 1x1 up conv
    lora_path = F.conv2d(F.conv2d(x, down, stride=stride, padding=padding), up) * 4.0 / 2
    expected = F.conv2d(x, weight, stride=stride, padding=padding) + lora_path
    merged = merge_into_weight(weight, module)
    torch.testing.assert_close(
        F.conv2d(x, merged, stride=stride, padding=padding), expected, rtol=1e-4, atol=1e-4
    )


def test_merge_keeps_the_weight_dtype_and_refuses_a_wrong_shape():
    weight = torch.zeros(12, 10, dtype=torch.float16)
    module = LoraModuleWeights(torch.ones(2, 10), torch.ones(12, 2), 2.0)
    merged = merge_into_weight(weight, module)
    assert merged.dtype == torch.float16
    assert torch.all(merged == 2.0)  # each entry: sum over rank 2 of 1*1, times alpha/rank = 1
    with pytest.raises(ValueError, match="does not fit"):
        merge_into_weight(torch.zeros(10, 12), module)


# --------------------------------------------------------------------------------------------
# names and metadata
# --------------------------------------------------------------------------------------------


def test_epoch_file_names_number_every_epoch():
    assert epoch_file_name("alice", 1) == "alice-000001.safetensors"
    assert epoch_file_name("alice_v2.1", 12) == "alice_v2.1-000012.safetensors"
    for bad_name in ("a/b", "../alice", "al ice", ""):
        with pytest.raises(ValueError, match="output name"):
            epoch_file_name(bad_name, 1)
    with pytest.raises(ValueError, match="counted from 1"):
        epoch_file_name("alice", 0)


def test_metadata_describes_the_run_for_a1111():
    metadata = sample_metadata(epoch=3)
    assert all(isinstance(value, str) for value in metadata.values())
    # A1111: alias, version filter, the card's metadata table
    assert (
        metadata["ss_output_name"]
        == "alice-000003"
        == epoch_file_name("alice", 3).removesuffix(".safetensors")
    )
    assert metadata["ss_base_model_version"] == "sd_v1" and metadata["ss_v2"] == "False"
    assert metadata["ss_sd_model_name"] == "v1-5-pruned-emaonly.safetensors"
    assert metadata["ss_new_sd_model_hash"].startswith("6ce0161689b3")
    assert float(metadata["ss_training_started_at"]) == 1_700_000_000.5
    assert metadata["ss_resolution"] == "(512, 512)"
    assert metadata["ss_clip_skip"] == "1"
    assert metadata["ss_epoch"] == "3" and metadata["ss_steps"] == "69"
    assert metadata["ss_network_module"] == "networks.lora"
    assert metadata["ss_network_dim"] == "32" and float(metadata["ss_network_alpha"]) == 16.0
    assert "ss_network_args" not in metadata  # plain LoRA
    assert metadata["ss_num_train_images"] == "230" and metadata["ss_num_reg_images"] == "5"
    assert json.loads(metadata["ss_dataset_dirs"]) == {"10_alice": {"n_repeats": 10, "img_count": 23}}
    assert json.loads(metadata["ss_tag_frequency"]) == {
        "10_alice": {"alice": 2, "1girl": 3, "red scarf": 1, "smile": 1}
    }
    assert json.loads(metadata["ss_bucket_info"])["buckets"]["0"]["resolution"] == [512, 512]
    # A1111 decodes every value that starts with "{" as JSON
    for value in metadata.values():
        if value.startswith("{"):
            json.loads(value)
    # modelspec, for Forge and other readers
    assert metadata["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert metadata["modelspec.title"] == "alice-000003"
    assert metadata["modelspec.prediction_type"] == "epsilon"
    assert metadata["modelspec.resolution"] == "512x512"
    assert metadata["modelspec.trigger_phrase"] == "alice"


def test_metadata_of_locon_and_v_prediction():
    config = TrainingConfig(
        output_name="bob", network_type="locon", conv_dim=8, conv_alpha=4.0, train_text_encoder=False
    )
    run = sample_run()
    run.parameterization = "v"
    metadata = build_metadata(output_name="bob", epoch=10, steps=2300, config=config, run=run)
    assert json.loads(metadata["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "4"}
    assert metadata["ss_text_encoder_lr"] == "0.0"
    assert metadata["modelspec.prediction_type"] == "v"
    assert metadata["ss_output_name"] == "bob-000010"
    assert float(metadata["ss_training_finished_at"]) >= float(metadata["ss_training_started_at"])


def test_count_tags_follows_kohya():
    assert count_tags(["Alice, 1girl,  smile ", "1girl,,smile", ""]) == {"alice": 1, "1girl": 2, "smile": 2}
