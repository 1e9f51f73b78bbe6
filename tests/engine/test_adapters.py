"""peft adapters on ldm/CLIP modules: the target set, fp32 weights, gradients, clean removal."""

from __future__ import annotations

import pytest
import torch

from lib_lora_trainer.model.host import HostOptions
from lib_lora_trainer.network.adapters import AdapterSpec, attached_adapters, plan_targets
from tests.engine.helpers import state_fingerprint, tiny_host


def targets_for(host, **spec):
    return plan_targets(host.unet(), host.text_encoder(), AdapterSpec(network_dim=4, network_alpha=2, **spec))


def test_target_set_matches_kohya_layout():
    host = tiny_host()
    lora = targets_for(host)
    unet = [t for t in lora if t.component == "unet"]
    text = [t for t in lora if t.component == "text_encoder"]
    assert len(unet) == 192  # 16 transformer blocks x 12 modules, as in SD1.5
    assert len(text) == 6 * host.text_encoder().config.num_hidden_layers
    locon = targets_for(host, locon=True, conv_dim=2, conv_alpha=1)
    extra = [t for t in locon if t.component == "unet" and t.module_name not in {u.module_name for u in unet}]
    assert len(extra) == 86
    three_by_three = [t for t in extra if t.rank == 2]
    assert {t.module_name.rsplit(".", 2)[-2] + "." + t.module_name.rsplit(".", 1)[-1] for t in extra} >= {
        "in_layers.2",
        "out_layers.3",
        "emb_layers.1",
    }
    assert all(t.alpha == 1 for t in three_by_three)
    assert len(three_by_three) == 22 * 2 + 3 + 3  # ResBlock conv1/conv2 and the samplers


def test_adapters_are_float32_on_a_half_precision_model_and_detach_cleanly():
    host = tiny_host()
    host.unet().half()
    before = state_fingerprint(host.unet(), host.text_encoder())
    with attached_adapters(host.unet(), host.text_encoder(), targets_for(host, locon=True)) as adapters:
        params = adapters.parameters("unet") + adapters.parameters("text_encoder")
        assert params and all(p.dtype == torch.float32 and p.requires_grad for p in params)
        assert type(host.unet().get_submodule("input_blocks.1.1.proj_in")).__module__.startswith("peft")
    assert state_fingerprint(host.unet(), host.text_encoder()) == before
    assert type(host.unet().get_submodule("input_blocks.1.1.proj_in")) is torch.nn.Conv2d


@pytest.mark.parametrize("checkpointing", [False, True])
def test_every_adapter_gets_a_gradient_with_a_frozen_text_encoder(checkpointing):
    host = tiny_host()
    options = HostOptions(train_text_encoder=False)
    with host.session(options), host.gradient_checkpointing(checkpointing):
        targets = targets_for(host, locon=True, train_text_encoder=False)
        with attached_adapters(host.unet(), host.text_encoder(), targets) as adapters:
            params = adapters.parameters("unet")
            # kohya's init leaves "up" at zero, so "down" would get no gradient; give "up" values
            with torch.no_grad():
                for p in params[1::2]:
                    p.normal_(std=0.01)
            with torch.no_grad():
                cond = host.encode_text(["alice"])  # frozen text encoder: conditioning without grad
            latents = torch.randn(1, 4, 8, 8)  # inputs that do not require grad
            out = host.predict(latents, torch.tensor([500]), cond)
            out.square().mean().backward()
            downs = zip(targets, params[::2], strict=True)
            missing = [t.module_name for t, p in downs if not p.grad.abs().sum()]
            assert not missing, f"no gradient reached {missing[:5]}"
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_text_encoder_adapters_get_gradients_through_encode_text():
    host = tiny_host()
    options = HostOptions(train_text_encoder=True, clip_skip=2)
    with (
        host.session(options),
        host.gradient_checkpointing(True),
        attached_adapters(host.unet(), host.text_encoder(), targets_for(host)) as adapters,
    ):
        params = adapters.parameters("text_encoder")
        with torch.no_grad():
            for p in params[1::2]:
                p.normal_(std=0.01)
        cond = host.encode_text(["alice, red scarf"])
        host.predict(torch.randn(1, 4, 8, 8), torch.tensor([10]), cond).square().mean().backward()
        # clip skip 2 skips the last layer, so its adapters get nothing; all others must
        last = host.text_encoder().config.num_hidden_layers - 1
        for target, param in zip(
            [t for t in adapters.targets if t.component == "text_encoder"], params[::2], strict=True
        ):
            has_grad = param.grad is not None and bool(param.grad.abs().sum())
            assert has_grad == (f"layers.{last}." not in target.module_name), target.module_name
