"""The training benchmark runs at a tiny size and writes a consistent report (no timing asserted)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmarks.bench_training import MemoryMeter, WindowTimer, main
from benchmarks.checkpoint import CheckpointError, load_checkpoint_host
from lib_lora_trainer.model.standalone import build_random_host


def test_tiny_benchmark_writes_json_and_markdown(tmp_path):
    argv = [
        "--model", "tiny", "--device", "cpu",
        "--scenario", "64:1:lora:frozen", "--scenario", "64:2:locon:trained",
        "--warmup", "1", "--steps", "2", "--window", "1",
        "--startup-images", "3", "--startup-resolution", "64",
        "--output-dir", str(tmp_path), "--tag", "smoke",
    ]  # fmt: skip
    assert main(argv) == 0

    results = json.loads((tmp_path / "smoke.json").read_text(encoding="utf-8"))
    assert results["meta"]["device"] == "cpu"
    assert results["meta"]["mixed_precision"] == "no"
    labels = [row["label"] for row in results["scenarios"]]
    assert labels == ["64px b1 lora TE frozen", "64px b2 locon TE trained"]
    for row in results["scenarios"]:
        for loop in ("ours", "bare"):
            assert len(row[loop]["seconds_per_step"]) == 2  # one sample per timing window
            assert row[loop]["peak_bytes"] > 0
        ratio = row["ours_s_per_step"] / row["bare_s_per_step"]
        assert row["ratio_ours_over_bare"] == pytest.approx(ratio)
        assert row["ours_s_per_step"] == pytest.approx(np.median(row["ours"]["seconds_per_step"]))
    model = results["model"]
    assert model["total_tensor_bytes"] == sum(model["tensor_bytes"].values())
    startup = results["startup"]
    assert startup["images"] == 3 and startup["images_encoded"] == 3  # every image cached once, no flips
    assert startup["seconds_to_first_step"] >= startup["latent_caching_s"]

    markdown = (tmp_path / "smoke.md").read_text(encoding="utf-8")
    assert "| 64px b2 locon TE trained |" in markdown
    assert "to the first optimizer step" in markdown


def test_window_timer_skips_warmup_and_averages_windows():
    timer = WindowTimer(torch.device("cpu"), warmup=2, window=3)
    for _ in range(2 + 3 * 2 + 1):  # the last, incomplete window gives no sample
        timer.tick()
    assert len(timer.samples) == 2
    with pytest.raises(ValueError):
        WindowTimer(torch.device("cpu"), warmup=0, window=1)


def test_memory_meter_sees_a_new_peak_after_reset():
    meter = MemoryMeter(torch.device("cpu"))
    meter.reset()
    before = meter.current()
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    assert meter.peak() >= before + 48 * 2**20
    del block


def _sd_checkpoint(host, *, old_text_layout: bool = False) -> dict[str, torch.Tensor]:
    state = {}
    for prefix, module in (
        ("model.diffusion_model.", host.unet()),
        ("first_stage_model.", host._vae),
        ("cond_stage_model.transformer.", host.text_encoder()),
    ):
        for key, tensor in module.state_dict().items():
            if old_text_layout and key.startswith("text_model."):
                key = key[len("text_model.") :]
            state[prefix + key] = tensor.detach().clone().contiguous()
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    return state


@pytest.mark.parametrize("old_text_layout", [False, True])
def test_checkpoint_keys_map_onto_ldm_and_clip(tmp_path, old_text_layout):
    source = build_random_host("tiny", seed=3)
    path = tmp_path / "model.safetensors"
    save_file(_sd_checkpoint(source, old_text_layout=old_text_layout), str(path))

    loaded = load_checkpoint_host(path, size="tiny")

    for original, copy in (
        (source.unet(), loaded.unet()),
        (source.text_encoder(), loaded.text_encoder()),
        (source._vae, loaded._vae),
    ):
        theirs = copy.state_dict()
        for key, tensor in original.state_dict().items():
            assert torch.equal(tensor, theirs[key]), key
    assert torch.allclose(loaded.alphas_cumprod(), torch.linspace(0.99, 0.01, 1000))
    assert loaded.base_model_info().name == "model"


def test_checkpoint_errors_are_explained(tmp_path):
    source = build_random_host("tiny")
    state = _sd_checkpoint(source)
    no_vae = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    save_file(no_vae, str(tmp_path / "no_vae.safetensors"))
    with pytest.raises(CheckpointError, match="no vae weights"):
        load_checkpoint_host(tmp_path / "no_vae.safetensors", size="tiny")

    sd2 = {**state, "cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}
    save_file(sd2, str(tmp_path / "sd2.safetensors"))
    with pytest.raises(CheckpointError, match="SD2"):
        load_checkpoint_host(tmp_path / "sd2.safetensors", size="tiny")

    missing_key = dict(state)
    del missing_key["model.diffusion_model.out.2.weight"]
    save_file(missing_key, str(tmp_path / "missing_key.safetensors"))
    with pytest.raises(CheckpointError, match="UNet weights do not fit"):
        load_checkpoint_host(tmp_path / "missing_key.safetensors", size="tiny")

    wrong_shape = {**state, "model.diffusion_model.out.2.bias": torch.zeros(5)}
    save_file(wrong_shape, str(tmp_path / "wrong_shape.safetensors"))
    with pytest.raises(CheckpointError, match="UNet weights do not fit"):
        load_checkpoint_host(tmp_path / "wrong_shape.safetensors", size="tiny")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint_host(tmp_path / "missing.safetensors")
