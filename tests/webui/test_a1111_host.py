"""The A1111 host on a stand-in for A1111's ``modules`` (its API as read from v1.10.1), over real tiny
ldm/CLIP modules: the model goes back exactly as it was, merged LoRAs are cleared first, refusals
happen before any change."""

from __future__ import annotations

import contextlib
import sys
import types

import pytest
import torch
from torch import nn

from lib_lora_trainer.dataset.base import InMemoryBatchSource
from lib_lora_trainer.dataset.prompt_syntax import parse_weighted
from lib_lora_trainer.model.host import HostRefused
from lib_lora_trainer.model.ldm_parts import sd_alphas_cumprod
from lib_lora_trainer.model.standalone import build_random_host
from lib_lora_trainer.training.loop import TrainingCallbacks, train
from tests.engine.helpers import make_images, state_fingerprint, tiny_config
from tests.webui.stand_ins import FrozenCLIPEmbedderWithCustomWords, tiny_clip_tokenizer


def a1111_cond_stage(transformer, shared):
    """A1111's FrozenCLIPEmbedderWithCustomWords over the tiny CLIP and a real (tiny) CLIP tokenizer."""
    return FrozenCLIPEmbedderWithCustomWords(tiny_clip_tokenizer(), transformer, shared.opts, parse_weighted)


class FakeSdModel(nn.Module):
    def __init__(self, shared):
        super().__init__()
        parts = build_random_host("tiny", seed=1)
        self.model = nn.Module()
        self.model.diffusion_model = parts.unet()
        self.model.conditioning_key = "crossattn"
        self.first_stage_model = parts.vae()
        text_encoder = parts.text_encoder()
        with torch.no_grad():
            # A trained CLIP's final layer norm has a bias; at init it has none, so every token's output
            # has mean 0 and A1111's emphasis rescaling (mean / z.mean()) can divide 0 by 0 (torch 2.1).
            text_encoder.text_model.final_layer_norm.bias.fill_(0.05)
        self.cond_stage_model = a1111_cond_stage(text_encoder, shared)
        self.alphas_cumprod_original = sd_alphas_cumprod()
        self.register_buffer("alphas_cumprod", self.alphas_cumprod_original.half())
        self.parameterization = "eps"
        self.is_sd1, self.is_sdxl, self.lowvram = True, False, False
        self.sd_checkpoint_info = types.SimpleNamespace(model_name="tiny", hash="0123abcd", sha256="ab" * 32)

    def apply_model(self, x, t, cond):
        return self.model.diffusion_model(x, t, context=cond)

    def encode_first_stage(self, x):
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, posterior):
        return posterior.sample() * 0.18215


@pytest.fixture
def webui(monkeypatch):
    """Installs stand-ins for modules.shared/devices/sd_hijack/sd_unet/processing and the Lora
    extension's top-level ``networks`` module."""
    calls = []
    shared = types.ModuleType("modules.shared")
    shared.cmd_opts = types.SimpleNamespace(lowvram=False)
    shared.opts = types.SimpleNamespace(data={"CLIP_stop_at_last_layers": 1})
    shared.loaded_hypernetworks = ["user's hypernetwork"]
    shared.sd_model = FakeSdModel(shared)

    devices = types.ModuleType("modules.devices")
    devices.device = torch.device("cpu")
    devices.dtype_unet = devices.dtype_vae = torch.float32
    devices.fp8 = False
    devices.autocast = contextlib.nullcontext
    devices.torch_gc = lambda: calls.append("torch_gc")

    class Optimization:
        def __init__(self, name, label):
            self.name, self.label = name, label

        def title(self):
            return f"{self.name} - {self.label}"

        def is_available(self):
            return True

    sd_hijack = types.ModuleType("modules.sd_hijack")
    sd_hijack.optimizers = [Optimization("Doggettx", "split"), Optimization("sdp", "scaled dot product")]
    sd_hijack.model_hijack = types.SimpleNamespace(
        apply_optimizations=lambda option=None: calls.append(("attention", option))
    )
    sd_unet = types.ModuleType("modules.sd_unet")
    sd_unet.current_unet = None
    processing = types.ModuleType("modules.processing")
    processing.StableDiffusionProcessing = type("P", (), {"cached_c": ["old", 1], "cached_uc": ["old", 1]})

    networks = types.ModuleType("networks")
    networks.loaded_networks = []

    def restore(module):
        module.weight.copy_(module.network_weights_backup)

    def reset(module):
        module.network_current_names = ()
        module.network_weights_backup = None
        module.network_bias_backup = None

    networks.network_restore_weights_from_backup = restore
    networks.network_reset_cached_weight = reset

    package = types.ModuleType("modules")
    for module in (shared, devices, sd_hijack, sd_unet, processing):
        short = module.__name__.split(".")[1]
        setattr(package, short, module)
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setitem(sys.modules, "modules", package)
    monkeypatch.setitem(sys.modules, "networks", networks)
    return types.SimpleNamespace(
        shared=shared, devices=devices, sd_unet=sd_unet, processing=processing, networks=networks, calls=calls
    )


def host():
    from lib_lora_trainer.webui.host import A1111Host

    return A1111Host()


def source():
    images = make_images(4)
    captions = ["alice, red scarf", "alice smiling", "alice, outdoors", "alice"]
    return InMemoryBatchSource(list(zip(images, captions, strict=True)), resolution=64, batch_size=2)


def attention_calls(webui):
    return [call for call in webui.calls if isinstance(call, tuple)]


def fingerprint(webui):
    return state_fingerprint(webui.shared.sd_model)


def test_training_gives_the_model_back_exactly(webui, tmp_path):
    before = fingerprint(webui)
    clip_skip_seen = []

    class Spy(TrainingCallbacks):
        def on_start(self, plan):
            clip_skip_seen.append(webui.shared.opts.data["CLIP_stop_at_last_layers"])
            clip_skip_seen.append(list(webui.shared.loaded_hypernetworks))

    config = tiny_config(tmp_path, clip_skip=2, gradient_checkpointing="on")
    result = train(host(), config, source(), Spy())

    assert result.status == "completed"
    assert fingerprint(webui) == before
    assert clip_skip_seen == [1, []]  # clip skip 2 is applied by our encoder, not through the settings
    assert webui.shared.opts.data["CLIP_stop_at_last_layers"] == 1
    assert webui.shared.loaded_hypernetworks == ["user's hypernetwork"]
    assert attention_calls(webui) == [("attention", "sdp - scaled dot product"), ("attention", None)]
    assert webui.processing.StableDiffusionProcessing.cached_c == [None, None]
    meta = result.epochs[-1].path
    from lib_lora_trainer.network.kohya_format import load_kohya_lora

    _, metadata = load_kohya_lora(meta)
    assert metadata["ss_sd_model_name"] == "tiny"


def test_merged_lora_is_cleared_before_training(webui, tmp_path):
    model = webui.shared.sd_model
    clean = fingerprint(webui)
    # what A1111 leaves after a txt2img with <lora:x:1>: weights changed in place, CPU backup kept
    layer = model.model.diffusion_model.get_submodule("input_blocks.1.1.transformer_blocks.0.attn1.to_q")
    original = layer.weight.detach().clone()
    with torch.no_grad():
        layer.network_weights_backup = layer.weight.detach().clone()
        layer.network_bias_backup = None
        layer.weight += 0.5
    layer.network_current_names = (("x", 1.0, 1.0, None),)
    webui.networks.loaded_networks.append("x")

    seen = {}

    class Spy(TrainingCallbacks):
        def on_start(self, plan):
            base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
            seen["weight"] = base.weight.detach().clone()

    train(host(), tiny_config(tmp_path), source(), Spy())

    assert torch.equal(seen["weight"], original)
    assert webui.networks.loaded_networks == []
    assert layer.network_current_names == () and layer.network_weights_backup is None
    for name in ("network_current_names", "network_weights_backup", "network_bias_backup"):
        delattr(layer, name)
    assert fingerprint(webui) == clean


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda w: setattr(w.shared.cmd_opts, "lowvram", True), "--lowvram"),
        (lambda w: setattr(w.devices, "fp8", True), "FP8"),
        (lambda w: setattr(w.sd_unet, "current_unet", object()), "SD Unet"),
        (lambda w: setattr(w.shared.sd_model, "is_sd1", False), "Stable Diffusion 1"),
        (lambda w: setattr(w.shared.sd_model.model, "conditioning_key", "hybrid"), "Inpainting"),
    ],
)
def test_unsupported_states_are_refused_before_any_change(webui, tmp_path, setup, message):
    setup(webui)
    before = fingerprint(webui)
    with pytest.raises(HostRefused, match=message):
        train(host(), tiny_config(tmp_path), source())
    assert fingerprint(webui) == before
    assert webui.shared.loaded_hypernetworks == ["user's hypernetwork"]
    assert not [c for c in webui.calls if c != "torch_gc"]


def test_exception_mid_step_restores_everything(webui, tmp_path):
    before = fingerprint(webui)
    unet = webui.shared.sd_model.model.diffusion_model
    calls = {"n": 0}

    def failing(module, args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (simulated)")

    handle = unet.register_forward_pre_hook(failing)  # the host runs the UNet itself, under its autocast
    with pytest.raises(RuntimeError, match="simulated"):
        train(host(), tiny_config(tmp_path, clip_skip=2), source())
    handle.remove()
    assert fingerprint(webui) == before
    assert webui.shared.opts.data["CLIP_stop_at_last_layers"] == 1
    assert webui.shared.loaded_hypernetworks == ["user's hypernetwork"]
    assert attention_calls(webui) == [("attention", "sdp - scaled dot product"), ("attention", None)]


def test_an_unset_clip_skip_option_stays_unset(webui, tmp_path):
    del webui.shared.opts.data["CLIP_stop_at_last_layers"]
    train(host(), tiny_config(tmp_path, clip_skip=2, epochs=1), source())
    assert "CLIP_stop_at_last_layers" not in webui.shared.opts.data


def test_no_model_loaded_is_a_clear_refusal(webui, tmp_path):
    webui.shared.sd_model = None
    with pytest.raises(HostRefused, match="No Stable Diffusion checkpoint"):
        train(host(), tiny_config(tmp_path), source())


def test_the_checkpoint_cannot_be_unloaded_or_reloaded_while_training(webui, tmp_path, monkeypatch):
    from lib_lora_trainer.webui.model_guard import ModelInUse

    moved, reloaded = [], []
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.send_model_to_cpu = moved.append
    sd_models.reload_model_weights = lambda *args, **kwargs: reloaded.append(args)

    def unload_model_weights(sd_model=None, info=None):  # A1111: looks send_model_to_cpu up by name
        sd_models.send_model_to_cpu(sd_model or webui.shared.sd_model)

    sd_models.unload_model_weights = unload_model_weights
    monkeypatch.setitem(sys.modules, "modules.sd_models", sd_models)
    unload_button = sd_models.unload_model_weights  # "Unload SD checkpoint" holds the function itself
    seen = {}

    class Spy(TrainingCallbacks):
        def on_start(self, plan):
            with pytest.raises(ModelInUse, match="being trained") as refused:
                unload_button()
            seen["refused"] = str(refused.value)
            sd_models.reload_model_weights()  # what process_images asks for: a no-op now

    result = train(host(), tiny_config(tmp_path, epochs=1), source(), Spy())
    assert result.status == "completed" and seen["refused"]
    assert moved == [] and reloaded == []
    unload_button()
    assert moved == [webui.shared.sd_model]
