"""The training benchmark runs at a tiny size and writes a consistent report (no timing asserted)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from benchmarks.bench_training import (
    ALPHA,
    CAPTIONS,
    RANK,
    BareLoop,
    MemoryMeter,
    Scenario,
    Settings,
    main,
    make_picture,
)
from benchmarks.checkpoint import CheckpointError, load_checkpoint_host
from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.dataset.base import InMemoryBatchSource
from lib_lora_trainer.model.host import HostOptions
from lib_lora_trainer.model.standalone import build_random_host
from lib_lora_trainer.network.adapters import AdapterSpec, attached_adapters, plan_targets
from lib_lora_trainer.training.loop import LOSS_READ_INTERVAL, TrainingCallbacks, train
from lib_lora_trainer.training.optim import ParamGroup, build_optimizer


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
        assert len(row["ours_samples"]) == len(row["bare_samples"]) == 2  # one pair per timing window
        assert row["ours_s_per_step"] == pytest.approx(np.median(row["ours_samples"]))
        ratio = row["ours_s_per_step"] / row["bare_s_per_step"]
        assert row["ratio_ours_over_bare"] == pytest.approx(ratio)
        pairs = [o / b for o, b in zip(row["ours_samples"], row["bare_samples"], strict=True)]
        assert row["paired_ratio_median"] == pytest.approx(np.median(pairs))
        assert row["peak_bytes"] > 0
    # the probe's estimate grows with the step: batch 2 with a trained text encoder needs more
    estimates = [row["estimated_extra_bytes"] for row in results["scenarios"]]
    assert 0 < estimates[0] < estimates[1]
    model = results["model"]
    assert model["total_tensor_bytes"] == sum(model["tensor_bytes"].values())
    startup = results["startup"]
    assert startup["images"] == 3 and startup["images_encoded"] == 3  # every image cached once, no flips
    assert startup["seconds_to_first_step"] >= startup["latent_caching_s"]

    markdown = (tmp_path / "smoke.md").read_text(encoding="utf-8")
    assert "| 64px b2 locon TE trained |" in markdown
    assert "to the first optimizer step" in markdown


def test_bare_loop_trains_the_adapters_our_loop_attached():
    """The reference loop steps exactly the adapter parameters (base weights stay frozen)."""
    host = build_random_host("tiny")
    scenario = Scenario(64, 1, "lora", "trained")
    settings = Settings(torch.device("cpu"), "no", False, warmup=1, steps=1, window=1)
    options = HostOptions(train_text_encoder=True)
    with host.session(options):
        unet, text_encoder = host.unet(), host.text_encoder()
        spec = AdapterSpec(RANK, ALPHA, train_text_encoder=True)
        with attached_adapters(unet, text_encoder, plan_targets(unet, text_encoder, spec)) as adapters:
            bare = BareLoop(host, scenario, settings)
            stepped = [p for group in bare.optimizer.param_groups for p in group["params"]]
            expected = adapters.parameters("unet") + adapters.parameters("text_encoder")
            assert {id(p) for p in stepped} == {id(p) for p in expected}
            before = [p.detach().clone() for p in expected]
            bare.run(2)
            assert any(not torch.equal(b, p) for b, p in zip(before, expected, strict=True))


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
        ("first_stage_model.", host.vae()),
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
        (source.vae(), loaded.vae()),
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


def test_ablation_switches_are_recorded_and_startup_can_be_skipped(tmp_path):
    argv = [
        "--model", "tiny", "--device", "cpu", "--scenario", "64:1:lora:frozen",
        "--warmup", "1", "--steps", "1", "--startup-images", "0",
        "--no-sdp-attention", "--channels-last", "--captions-vary", "--gradient-checkpointing",
        "--output-dir", str(tmp_path), "--tag", "ablation",
    ]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((tmp_path / "ablation.json").read_text(encoding="utf-8"))
    meta = results["meta"]
    assert (meta["sdp_attention"], meta["channels_last"], meta["captions_vary"]) == (False, True, True)
    assert meta["gradient_checkpointing"] is True
    assert results["startup"] is None
    assert "SDP attention off" in (tmp_path / "ablation.md").read_text(encoding="utf-8")


# --- the speed measures the benchmark relies on, on CPU-safe paths -----------------------------------

_OPTIM_FOLDER = str(Path(torch.optim.__file__).parent)
_READBACKS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


class _ReadbacksPerStep(TrainingCallbacks):
    """Counts tensor read-backs (what forces a GPU-to-CPU synchronisation) between optimizer steps."""

    def __init__(self, counter: list[int]):
        self.counter = counter
        self.per_step: dict[int, int] = {}
        self.mark = 0

    def on_start(self, plan) -> None:
        self.mark = self.counter[0]

    def on_step(self, progress) -> None:
        self.per_step[progress.step] = self.counter[0] - self.mark
        self.mark = self.counter[0]


def test_a_training_step_reads_nothing_back_except_the_loss_every_ten_steps(tmp_path, monkeypatch):
    counter = [0]
    for name in _READBACKS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            # torch < 2.4 has no fused CPU AdamW; its loop version reads its step counter, a CPU tensor
            # even in a CUDA run (no synchronisation), so reads from inside torch.optim don't count.
            if _OPTIM_FOLDER not in sys._getframe(1).f_code.co_filename:
                counter[0] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    host = build_random_host("tiny")
    items = [(make_picture(64, 64, seed), CAPTIONS[seed % 2]) for seed in range(2)]
    source = InMemoryBatchSource(items, resolution=64, batch_size=1, repeats=12)  # 24 steps
    config = TrainingConfig(
        output_name="sync",
        output_dir=str(tmp_path),
        train_data_dir="unused",
        resolution=64,
        min_bucket_reso=64,
        network_dim=4,
        network_alpha=2.0,
        train_text_encoder=True,
        lr_scheduler="constant",
        epochs=1,
        batch_size=1,
        mixed_precision="no",
        min_snr_gamma=5.0,
        noise_offset=0.05,
    )
    callbacks = _ReadbacksPerStep(counter)
    assert train(host, config, source, callbacks).status == "completed"

    reads = {step for step, count in callbacks.per_step.items() if count}
    # the first step's loss at once (the chart is not empty for an epoch), then every ten, and the last
    assert reads == {1, LOSS_READ_INTERVAL, 2 * LOSS_READ_INTERVAL, 24}
    # one transfer of all pending losses: .cpu() then .tolist() on the stacked tensor
    assert all(callbacks.per_step[step] == 2 for step in reads)


def test_adamw_is_fused_where_torch_has_the_kernel():
    config = TrainingConfig(optimizer="AdamW")
    parameter = torch.nn.Parameter(torch.zeros(4))
    optimizer = build_optimizer(config, [ParamGroup("unet", [parameter], 1e-3)], torch.device("cpu"))
    # torch has a fused CPU kernel from 2.4 on (A1111's default torch 2.1 has it for CUDA only)
    assert bool(optimizer.param_groups[0]["fused"]) is (torch.__version__ >= (2, 4))
    assert optimizer.param_groups[0]["name"] == "unet"
