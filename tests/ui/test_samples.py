"""Epoch samples: the requests made from the config, the stand-alone Euler sampler on the tiny model,
the PNG infotext (with the epoch's <lora:...> tag), and parsing it back as txt2img's paste does."""

from __future__ import annotations

import numpy as np
from PIL import Image

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.outputs.compare import build_comparison, to_infotext
from lib_lora_trainer.outputs.samples import (
    EulerSampleRenderer,
    default_sample_prompts,
    sample_due,
    sample_requests,
    save_sample,
    strip_lora_tags,
)
from lib_lora_trainer.ui.standalone import parse_infotext


def test_requests_default_to_the_trigger_word_in_a_few_variations():
    config = TrainingConfig(trigger_word="ohwx_alice", class_token="woman", resolution=768, sample_seed=10)
    requests = sample_requests(config, "alice-000003")
    assert [r.prompt for r in requests] == [
        f"{p} <lora:alice-000003:1>" for p in default_sample_prompts("ohwx_alice", "woman")
    ]
    assert requests[0].prompt.startswith("ohwx_alice, woman")
    assert [r.seed for r in requests] == [10, 11, 12]
    assert {(r.width, r.height) for r in requests} == {(768, 768)}
    assert default_sample_prompts("", "")[0] == "a person"


def test_requests_use_the_users_prompts_and_size():
    config = TrainingConfig(sample_prompts=["alice at the beach", "  "], sample_width=512, sample_height=768)
    (request,) = sample_requests(config, "alice-000001", weight=0.8)
    assert request.prompt == "alice at the beach <lora:alice-000001:0.8>"
    assert (request.width, request.height) == (512, 768)


def test_samples_are_due_every_n_epochs_and_after_the_last():
    config = TrainingConfig(epochs=5, sample_every_n_epochs=2)
    assert [e for e in range(1, 6) if sample_due(config, e)] == [2, 4, 5]
    assert not any(sample_due(TrainingConfig(epochs=5, sample_every_n_epochs=0), e) for e in range(1, 6))


def test_euler_renderer_on_the_tiny_model(tmp_path, tiny_host):
    from lib_lora_trainer.ui.standalone import _vae_decoder

    renderer = EulerSampleRenderer(tiny_host, _vae_decoder(tiny_host), model_name="tiny")
    config = TrainingConfig(sample_prompts=["alice"], sample_steps=3, sample_width=64, sample_height=128)
    requests = sample_requests(config, "alice-000002")
    first = renderer.render(requests, tmp_path, "alice-000002")
    second = renderer.render(requests, tmp_path, "alice-000002")

    (sample,) = first
    assert sample.image.size == (64, 128) and sample.path == tmp_path / "alice-000002-00.png"
    assert second[0].path == tmp_path / "alice-000002-00-1.png"  # never over an existing sample
    assert np.array_equal(np.asarray(sample.image), np.asarray(second[0].image))  # same seed, same picture
    stored = Image.open(sample.path).info["parameters"]
    assert stored == sample.infotext
    assert stored.startswith("alice <lora:alice-000002:1>\nNegative prompt: lowres")
    assert "Steps: 3, Sampler: Euler, CFG scale: 7, Seed: 42, Size: 64x128, Model: tiny" in stored


def test_the_lora_tag_is_not_fed_to_the_text_encoder():
    assert strip_lora_tags("alice, smiling <lora:alice-000001:0.8> <lora:x:1>") == "alice, smiling"


def test_infotext_round_trip_through_the_paste_parser(tmp_path):
    comparison = build_comparison(
        ["alice-000001", "alice, 2"], "ohwx, red", negative_prompt="lowres", seed_count=2, rng_seed=1,
        weights=(0.6, 1.0),
    )  # fmt: skip
    fields = parse_infotext(to_infotext(comparison, steps=12, cfg_scale=6.5))
    assert fields["Prompt"] == comparison.prompt == "ohwx, red <lora:alice-000001:0.6>"
    assert fields["Negative prompt"] == "lowres"
    assert fields["Steps"] == "12" and fields["CFG scale"] == "6.5"
    assert fields["X Type"] == "Prompt S/R" and fields["X Values"] == 'alice-000001, "alice, 2"'
    assert fields["Y Type"] == "Seed" and fields["Y Values"] == comparison.y_values
    assert fields["Z Type"] == "Prompt S/R" and fields["Z Values"] == ":0.6>, :1>"
    image = Image.new("RGB", (8, 8))
    path = save_sample(image, "x\nSteps: 1", tmp_path, "grid")
    assert Image.open(path).info["parameters"] == "x\nSteps: 1"
