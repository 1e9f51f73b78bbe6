"""The engine end to end on a tiny ldm UNet + CLIP text encoder: learning, files, equivalence, restore."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from lib_lora_trainer.config import ConfigError
from lib_lora_trainer.dataset.base import InMemoryBatchSource
from lib_lora_trainer.network import kohya_format
from lib_lora_trainer.training.loop import TrainingCallbacks, train
from tests.engine.helpers import fixed_inputs, host_fingerprint, make_images, tiny_config, tiny_host

CAPTIONS = ["alice, red scarf", "alice smiling", "alice, outdoors", "alice, portrait"]


def small_source(count: int = 4, batch_size: int = 2, repeats: int = 1) -> InMemoryBatchSource:
    images = make_images(count)
    return InMemoryBatchSource(
        list(zip(images, CAPTIONS * 4, strict=False)), resolution=64, batch_size=batch_size, repeats=repeats
    )


# --- independent kohya merge (no peft) -------------------------------------------------------------
def merge_kohya_file(path, unet, text_encoder) -> None:
    """W += up @ down * alpha / rank, for Linear, 1x1 and 3x3 convs: kohya's maths, written here."""
    modules, _ = kohya_format.load_kohya_lora(path)
    roots = {"unet": unet, "text_encoder": text_encoder}
    with torch.no_grad():
        for stem, weights in modules.items():
            component, name = kohya_format.module_name_from_kohya(stem)
            layer = roots[component].get_submodule(name)
            down, up = weights.down.float(), weights.up.float()
            scale = weights.alpha / down.shape[0]
            if down.dim() == 2:
                delta = up @ down
            elif down.shape[2:] == (1, 1):
                delta = (up.flatten(1) @ down.flatten(1))[:, :, None, None]
            else:
                delta = F.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
            layer.weight += delta * scale


class OutputsAtEpoch(TrainingCallbacks):
    """Records the adapted model's UNet and text-encoder outputs while the adapters are attached."""

    def __init__(self, host):
        self.host = host
        self.outputs = {}

    def on_epoch_saved(self, saved):
        latents, timesteps, token_ids = fixed_inputs(self.host)
        with torch.no_grad():
            te = self.host.text_encoder()(input_ids=token_ids).last_hidden_state
            unet = self.host.unet()(latents, timesteps, context=te)
        self.outputs[saved.epoch] = (te.clone(), unet.clone())


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("network_type", ["lora", "locon"])
def test_saved_files_merge_to_the_trained_model(tmp_path, network_type):
    host = tiny_host()
    base_unet, base_te = copy.deepcopy(host.unet()), copy.deepcopy(host.text_encoder())
    recorder = OutputsAtEpoch(host)
    config = tiny_config(tmp_path, network_type=network_type, epochs=2)
    result = train(host, config, small_source(), recorder)

    assert result.status == "completed", result.message
    assert [s.path.name for s in result.epochs] == ["alice-000001.safetensors", "alice-000002.safetensors"]
    for saved in result.epochs:
        unet, te = copy.deepcopy(base_unet), copy.deepcopy(base_te)
        merge_kohya_file(saved.path, unet, te)
        latents, timesteps, token_ids = fixed_inputs(host)
        with torch.no_grad():
            merged_te = te(input_ids=token_ids).last_hidden_state
            merged_unet = unet(latents, timesteps, context=merged_te)
        trained_te, trained_unet = recorder.outputs[saved.epoch]
        assert relative_error(merged_te, trained_te) < 1e-4
        assert relative_error(merged_unet, trained_unet) < 1e-4
        # and the adapters really changed the model, so the comparison means something
        with torch.no_grad():
            plain = base_unet(latents, timesteps, context=base_te(input_ids=token_ids).last_hidden_state)
        assert relative_error(plain, trained_unet) > 1e-4


def test_model_is_restored_exactly_after_success(tmp_path):
    host = tiny_host()
    before = host_fingerprint(host)
    train(host, tiny_config(tmp_path, epochs=1, gradient_checkpointing="on"), small_source())
    assert host_fingerprint(host) == before


class StopAfter(TrainingCallbacks):
    def __init__(self, steps):
        self.steps, self.seen = steps, 0

    def on_step(self, progress):
        self.seen = progress.step

    def should_stop(self):
        return self.seen >= self.steps


def test_interrupt_keeps_finished_epochs_and_restores(tmp_path):
    host = tiny_host()
    before = host_fingerprint(host)
    source = small_source()  # 2 steps per epoch
    result = train(host, tiny_config(tmp_path, epochs=3), source, StopAfter(3))
    assert result.status == "interrupted"
    assert [s.epoch for s in result.epochs] == [1]
    assert (tmp_path / "Lora" / "alice-000001.safetensors").is_file()
    assert not (tmp_path / "Lora" / "alice-000002.safetensors").exists()
    assert host_fingerprint(host) == before


class FailingHost:
    """Wraps a host and raises inside the UNet forward at a chosen call."""

    def __init__(self, host, fail_at_call):
        self._host, self._fail_at, self._calls = host, fail_at_call, 0

    def __getattr__(self, name):
        return getattr(self._host, name)

    def predict(self, noisy, timesteps, cond):
        self._calls += 1
        if self._calls == self._fail_at:
            raise RuntimeError("simulated CUDA error mid-step")
        return self._host.predict(noisy, timesteps, cond)


def test_exception_mid_step_restores_model(tmp_path):
    host = tiny_host()
    before = host_fingerprint(host)
    with pytest.raises(RuntimeError, match="simulated"):
        config = tiny_config(tmp_path, gradient_checkpointing="on")
        train(FailingHost(host, fail_at_call=3), config, small_source())
    assert host_fingerprint(host) == before


class NanHost(FailingHost):
    def predict(self, noisy, timesteps, cond):
        self._calls += 1
        out = self._host.predict(noisy, timesteps, cond)
        return out * float("nan") if self._calls >= self._fail_at else out


def test_nan_loss_stops_with_message_and_keeps_last_good_epoch(tmp_path):
    host = tiny_host()
    before = host_fingerprint(host)
    config = tiny_config(tmp_path, epochs=3, gradient_checkpointing="off")  # no probe: calls counted
    result = train(NanHost(host, fail_at_call=4), config, small_source())
    assert result.status == "stopped_nonfinite_loss"
    assert "alice-000001.safetensors" in result.message and "learning rate" in result.message
    assert [s.epoch for s in result.epochs] == [1]
    assert not (tmp_path / "Lora" / "alice-000002.safetensors").exists()
    assert host_fingerprint(host) == before


class FixedNoiseLoss(TrainingCallbacks):
    """The denoising loss on the training latents at fixed noise and timesteps, at start and at the end:
    a learning signal free of the per-step randomness of the training loss."""

    def __init__(self, host, source, captions):
        self.host, self.source, self.captions = host, source, captions
        self.values = []

    def measure(self):
        latents = torch.stack(self.source._latents)
        generator = torch.Generator().manual_seed(5)
        total = 0.0
        with torch.no_grad():
            cond = self.host.encode_text(self.captions)
            for t in (100, 300, 500, 700, 900):
                noise = torch.randn(latents.shape, generator=generator)
                alpha_bar = self.host.alphas_cumprod()[t]
                noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
                prediction = self.host.predict(noisy, torch.full((len(latents),), t), cond)
                total += float(F.mse_loss(prediction, noise))
        self.values.append(total / 5)

    def on_start(self, plan):
        self.measure()

    def on_epoch_saved(self, saved):
        self.measure()


def test_loss_falls_on_a_tiny_overfit_set(tmp_path):
    host = tiny_host()
    source = small_source(count=2, batch_size=2)
    probe = FixedNoiseLoss(host, source, CAPTIONS[:2])
    config = tiny_config(
        tmp_path, epochs=40, save_every_n_epochs=40, unet_lr=1e-2, text_encoder_lr=3e-3, seed=3
    )
    result = train(host, config, source, probe)
    assert len(result.losses) == 40
    before, after = probe.values  # measured: 1.05 -> 0.62
    assert after < 0.75 * before, (before, after)
    assert sum(result.losses[-10:]) < 0.85 * sum(result.losses[:10])


def test_same_seed_repeats_the_run(tmp_path):
    first = train(tiny_host(), tiny_config(tmp_path / "a", epochs=1), small_source())
    second = train(tiny_host(), tiny_config(tmp_path / "b", epochs=1), small_source())
    assert first.losses == second.losses


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"network_dim": 0}, "rank"),
        ({"unet_lr": -1e-4}, "learning rate"),
        ({"optimizer": "SGD-magic"}, "unknown optimizer"),
        ({"resolution": 500}, "multiple of 64"),
        ({"output_name": "../evil"}, "output name"),
        ({"output_name": "a/b"}, "folder separator"),
        ({"output_name": "alice smile"}, "letters, digits"),
    ],
)
def test_bad_settings_are_refused_before_the_model_is_touched(tmp_path, overrides, expected):
    host = tiny_host()
    before = host_fingerprint(host)
    with pytest.raises(ConfigError, match=expected):
        train(host, tiny_config(tmp_path, **overrides), small_source())
    assert host_fingerprint(host) == before
    assert not (tmp_path / "Lora").exists()


def test_batch_larger_than_dataset_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="larger than the dataset"):
        train(tiny_host(), tiny_config(tmp_path, batch_size=8), small_source(), image_count=4)


def test_existing_epoch_file_is_never_overwritten(tmp_path):
    (tmp_path / "Lora").mkdir()
    (tmp_path / "Lora" / "alice-000002.safetensors").write_bytes(b"user's file")
    with pytest.raises(ConfigError, match="already exists"):
        train(tiny_host(), tiny_config(tmp_path), small_source())
    assert (tmp_path / "Lora" / "alice-000002.safetensors").read_bytes() == b"user's file"


def test_continue_from_a_saved_file(tmp_path):
    host = tiny_host()
    first = train(host, tiny_config(tmp_path, epochs=1), small_source())
    saved = first.epochs[0].path
    recorder = OutputsAtEpoch(host)

    class CheckStart(TrainingCallbacks):
        def on_start(self, plan):
            # before any step, the adapters hold the file's values: the model equals the merged file
            recorder.on_epoch_saved(type("S", (), {"epoch": 0})())

    config = tiny_config(tmp_path, output_name="alice_more", epochs=1, network_weights=str(saved))
    result = train(host, config, small_source(), CheckStart())
    assert result.status == "completed"
    unet, te = copy.deepcopy(host.unet()), copy.deepcopy(host.text_encoder())
    merge_kohya_file(saved, unet, te)
    latents, timesteps, token_ids = fixed_inputs(host)
    with torch.no_grad():
        merged_te = te(input_ids=token_ids).last_hidden_state
        merged = unet(latents, timesteps, context=merged_te)
    assert relative_error(merged, recorder.outputs[0][1]) < 1e-4
