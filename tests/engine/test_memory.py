"""Gradient checkpointing "auto": the memory probe, the choice, and the out-of-memory fallback."""

from __future__ import annotations

import pytest
import torch

from lib_lora_trainer.config import ConfigError, TrainingConfig
from lib_lora_trainer.kohya_ss_import import import_kohya_ss_config
from lib_lora_trainer.model.host import HostOptions
from lib_lora_trainer.model.ldm_parts import checkpointable_blocks
from lib_lora_trainer.network import kohya_format
from lib_lora_trainer.network.adapters import AdapterSpec, attached_adapters, plan_targets
from lib_lora_trainer.training import loop as loop_module
from lib_lora_trainer.training.loop import TrainingCallbacks, TrainingOutOfMemory, train
from lib_lora_trainer.training.memory import (
    BACKWARD_HEADROOM,
    FIXED_HEADROOM_BYTES,
    GIB,
    ActivationLine,
    _linux_available_memory,
    choose_checkpointing,
    probe_activation_line,
    saved_tensor_bytes,
    step_need_bytes,
)
from tests.engine.helpers import host_fingerprint, tiny_config, tiny_host
from tests.engine.test_training import small_source


def test_saved_bytes_count_activations_once_and_leave_out_the_weights():
    weight = torch.nn.Parameter(torch.randn(64, 64), requires_grad=False)
    x = torch.randn(8, 64, requires_grad=True)

    def forward():
        # matmul keeps only the weight (x's gradient needs it, the frozen weight needs none);
        # relu keeps its output, and mul keeps that same tensor twice: one storage
        hidden = torch.relu(x @ weight)
        return (hidden * hidden).sum()

    assert saved_tensor_bytes(forward, [weight]) == 8 * 64 * 4


def test_the_probe_line_predicts_a_larger_step_exactly():
    host = tiny_host()
    with host.session(HostOptions(train_text_encoder=False)):
        unet, text_encoder = host.unet(), host.text_encoder()
        spec = AdapterSpec(network_dim=4, network_alpha=2.0, train_text_encoder=False)
        with attached_adapters(unet, text_encoder, plan_targets(unet, text_encoder, spec)):
            with torch.no_grad():
                cond = host.encode_text(["alice"])
            weights = list(unet.parameters()) + list(text_encoder.parameters())

            def forward_at(side: int, batch: int = 1):
                return host.predict(
                    torch.zeros(batch, 4, side, side), torch.full((batch,), 999), cond.expand(batch, -1, -1)
                )

            line = probe_activation_line(forward_at, weights)
            measured = saved_tensor_bytes(lambda: forward_at(32, 2), weights)
    assert line.bytes_per_latent_pixel > 0
    assert line.bytes_for(2, 32 * 32) == pytest.approx(measured, rel=0.02)


def test_the_backward_margin_applies_to_what_grows_with_the_image_only():
    weights_copy = ActivationLine(fixed_bytes=GIB, bytes_per_latent_pixel=0.0)  # autocast's weight copies
    per_image = ActivationLine(fixed_bytes=0.0, bytes_per_latent_pixel=GIB / 4096)
    base = step_need_bytes(ActivationLine(0.0, 0.0), 1, 4096, 1000, "AdamW")
    assert base == 1000 * 12 + FIXED_HEADROOM_BYTES  # fp32 gradients and AdamW's two moments
    assert step_need_bytes(weights_copy, 2, 4096, 1000, "AdamW") - base == GIB
    assert step_need_bytes(per_image, 2, 4096, 1000, "AdamW") - base == int(2 * GIB * BACKWARD_HEADROOM)


@pytest.mark.parametrize(
    ("mode", "need", "free", "enabled", "says"),
    [
        ("on", None, None, True, "on (chosen"),
        ("off", 100 * GIB, GIB, False, "off (chosen"),
        ("auto", None, None, False, "unknown"),
        ("auto", 5 * GIB, 8 * GIB, False, "auto: off (a step needs about 5.0 GiB, 8.0 GiB free)"),
        ("auto", int(7.5 * GIB), 8 * GIB, True, "auto: on"),
    ],
)
def test_checkpointing_choice(mode, need, free, enabled, says):
    choice = choose_checkpointing(mode, need, free)
    assert choice.enabled is enabled and says in choice.reason


def test_available_memory_is_read_from_meminfo(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24000000 kB\nMemAvailable:   12000000 kB\n", encoding="ascii")
    assert _linux_available_memory(meminfo) == 12000000 * 1024
    meminfo.write_text("MemTotal: 1 kB\n", encoding="ascii")
    assert _linux_available_memory(meminfo) is None
    assert _linux_available_memory(tmp_path / "missing") is None


# --- the loop --------------------------------------------------------------------------------------


def _checkpointing_active(host) -> bool:
    return all("forward" in vars(block) for block in checkpointable_blocks(host.unet()))


class Watch(TrainingCallbacks):
    def __init__(self, host):
        self.host, self.active, self.notices, self.plan = host, [], [], None

    def on_start(self, plan) -> None:
        self.plan = plan

    def on_step(self, progress) -> None:
        self.active.append(_checkpointing_active(self.host))

    def on_notice(self, message: str) -> None:
        self.notices.append(message)


def _saved_flag(result) -> str:
    _, metadata = kohya_format.load_kohya_lora(result.epochs[-1].path)
    return metadata["ss_gradient_checkpointing"]


@pytest.mark.parametrize(("free_bytes", "expected"), [(1024**2, True), (1024**4, False)])
def test_auto_turns_checkpointing_on_only_when_the_step_does_not_fit(
    monkeypatch, tmp_path, free_bytes, expected
):
    monkeypatch.setattr(loop_module, "available_bytes", lambda device: free_bytes)
    host = tiny_host()
    before = host_fingerprint(host)
    watch = Watch(host)
    result = train(host, tiny_config(tmp_path, epochs=1), small_source(), watch)
    assert result.status == "completed"
    assert watch.plan.gradient_checkpointing.enabled is expected
    assert "auto: " in watch.plan.gradient_checkpointing.reason
    assert watch.active and all(active is expected for active in watch.active)
    assert _saved_flag(result) == str(expected)
    assert host_fingerprint(host) == before  # the patches are gone afterwards


class OutOfMemoryUnlessCheckpointed:
    """A host whose device fits a training step only with checkpointing on (as a small GPU would)."""

    def __init__(self, host):
        self._host, self.failures, self.predict_calls = host, 0, 0

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict(self, noisy, timesteps, cond):
        self.predict_calls += 1
        # the memory probe's zero latents fit (so it finds "off"); real steps do not
        if torch.is_grad_enabled() and bool(noisy.abs().sum()) and not _checkpointing_active(self._host):
            self.failures += 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self._host.predict(noisy, timesteps, cond)


def test_a_step_out_of_memory_switches_checkpointing_on_and_is_done_again(monkeypatch, tmp_path):
    monkeypatch.setattr(loop_module, "available_bytes", lambda device: 1024**4)  # the probe says it fits
    inner = tiny_host()
    before = host_fingerprint(inner)
    host = OutOfMemoryUnlessCheckpointed(inner)
    watch = Watch(inner)
    # batch 1 and 2 batches per step: the failure hits the second batch of the first step's window
    config = tiny_config(tmp_path, epochs=2, batch_size=1, gradient_accumulation_steps=2)
    result = train(host, config, small_source(batch_size=1), watch)

    assert result.status == "completed"
    assert host.failures == 1 and len(watch.notices) == 1 and "switched it on" in watch.notices[0]
    assert not watch.plan.gradient_checkpointing.enabled  # chosen off, switched on by the failure
    assert all(watch.active)
    # 4 images, 2 per step, 2 epochs: 4 steps; every batch's loss once, none from the failed try
    assert len(watch.active) == 4 and len(result.losses) == 8
    assert _saved_flag(result) == "True"
    assert host_fingerprint(inner) == before


@pytest.mark.parametrize("mode", ["on", "off"])
def test_out_of_memory_without_a_remedy_left_stops_with_advice(tmp_path, mode):
    class AlwaysOutOfMemory(OutOfMemoryUnlessCheckpointed):
        def predict(self, noisy, timesteps, cond):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    inner = tiny_host()
    before = host_fingerprint(inner)
    with pytest.raises(TrainingOutOfMemory, match="Lower the batch size"):
        train(AlwaysOutOfMemory(inner), tiny_config(tmp_path, gradient_checkpointing=mode), small_source())
    assert host_fingerprint(inner) == before


def test_a_probe_that_runs_out_of_memory_means_checkpointing_on(tmp_path):
    class ProbeOutOfMemory(OutOfMemoryUnlessCheckpointed):
        def predict(self, noisy, timesteps, cond):
            if not bool(noisy.abs().sum()):
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return self._host.predict(noisy, timesteps, cond)

    host = tiny_host()
    watch = Watch(host)
    result = train(ProbeOutOfMemory(host), tiny_config(tmp_path, epochs=1), small_source(), watch)
    assert result.status == "completed" and all(watch.active)
    assert watch.plan.gradient_checkpointing.reason.startswith("auto: on (the memory probe")


def test_no_probe_runs_when_the_user_chose(tmp_path):
    host = OutOfMemoryUnlessCheckpointed(tiny_host())
    result = train(host, tiny_config(tmp_path, epochs=1, gradient_checkpointing="on"), small_source())
    assert result.status == "completed" and host.predict_calls == 2  # 4 images, batch 2: the steps only


def test_configs_from_before_auto_and_kohya_ss_files_map_onto_the_modes():
    assert TrainingConfig.from_dict({"gradient_checkpointing": True}).gradient_checkpointing == "on"
    assert TrainingConfig.from_dict({"gradient_checkpointing": False}).gradient_checkpointing == "off"
    assert TrainingConfig().gradient_checkpointing == "auto"
    with pytest.raises(ConfigError, match="gradient checkpointing must be one of"):
        from lib_lora_trainer.config import ensure_valid

        ensure_valid(TrainingConfig(gradient_checkpointing="sometimes"), need_dataset=False)
    for kohya_value, ours in ((True, "on"), (False, "auto")):
        imported = import_kohya_ss_config({"gradient_checkpointing": kohya_value})
        assert imported.config.gradient_checkpointing == ours
