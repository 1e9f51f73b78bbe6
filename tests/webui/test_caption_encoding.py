"""Captions in the A1111 host: encoded literally by our encoder over A1111's tokenizer and CLIP, giving
exactly A1111's tensor for a caption without prompt syntax; weighted captions through A1111's own parser
and emphasis; clip skip applied by us, never written into the WebUI's settings."""

from __future__ import annotations

import pytest
import torch

from lib_lora_trainer.dataset.base import InMemoryBatchSource
from lib_lora_trainer.dataset.prompt_syntax import parse_weighted
from lib_lora_trainer.model.host import HostOptions
from lib_lora_trainer.network.kohya_format import load_kohya_lora
from lib_lora_trainer.training.loop import TrainingCallbacks, train
from tests.engine.helpers import make_images, tiny_config
from tests.webui.stand_ins import install_prompt_modules
from tests.webui.test_a1111_host import host, source

# The tiny tokenizer has one token per character: 18 tags of 11-12 tokens need three 75-token chunks.
LONG_CAPTION = ", ".join(f"tag{index} detail" for index in range(18))


def a1111_encode(webui, captions, clip_skip=1):
    """What A1111's own encoder gives for ``captions`` with clip skip ``clip_skip`` in its settings."""
    saved = dict(webui.shared.opts.data)
    webui.shared.opts.data["CLIP_stop_at_last_layers"] = clip_skip
    try:
        with torch.no_grad():
            return webui.shared.sd_model.cond_stage_model(list(captions))
    finally:
        webui.shared.opts.data.clear()
        webui.shared.opts.data.update(saved)


def our_encode(captions, clip_skip=1, weighted=False):
    training_host = host()
    options = HostOptions(train_text_encoder=False, clip_skip=clip_skip, weighted_captions=weighted)
    with training_host.session(options), torch.no_grad():
        return training_host.encode_text(list(captions)), training_host.max_token_length()


@pytest.mark.parametrize("clip_skip", [1, 2])
def test_a_caption_without_prompt_syntax_gives_a1111s_own_tensor(webui, clip_skip):
    captions = ["alice, red scarf", LONG_CAPTION, ""]  # one chunk, three chunks (comma backtrack), empty
    ours, longest = our_encode(captions, clip_skip)
    theirs = a1111_encode(webui, captions, clip_skip)
    assert ours.shape == theirs.shape and theirs.shape[1] >= 3 * 77  # nothing cut
    assert torch.equal(ours, theirs)
    assert longest == 75 * (theirs.shape[1] // 77)


def test_brackets_in_a_caption_are_plain_text(webui):
    # A WD14 tag with underscores replaced; the user prompts it escaped, as A1111 needs.
    ours, _ = our_encode(["ganyu (genshin impact), [smile]"])
    typed_as_prompt = a1111_encode(webui, [r"ganyu \(genshin impact\), \[smile\]"])
    assert torch.equal(ours, typed_as_prompt)
    # ... and a caption already written with escapes trains as the same text
    escaped, _ = our_encode([r"ganyu \(genshin impact\), \[smile\]"])
    assert torch.equal(escaped, ours)
    # what the old encoding did: the brackets read as emphasis, the characters gone
    assert not torch.equal(ours, a1111_encode(webui, ["ganyu (genshin impact), [smile]"]))


def test_break_and_weights_are_words_unless_weighted_captions_are_on(webui, monkeypatch):
    install_prompt_modules(monkeypatch, parse_weighted)
    caption = "alice (red scarf:1.5) BREAK smiling"
    literal, literal_longest = our_encode([caption])
    weighted, weighted_longest = our_encode([caption], weighted=True)
    assert literal.shape[1] == 77 and literal_longest is None  # BREAK is a word here
    assert weighted.shape[1] == 2 * 77 and weighted_longest == 150  # BREAK starts a chunk
    assert torch.equal(weighted, a1111_encode(webui, [caption]))


def test_weighted_captions_follow_the_webuis_emphasis_setting(webui, monkeypatch):
    install_prompt_modules(monkeypatch, parse_weighted)
    webui.shared.opts.emphasis = "None"  # A1111 then reads prompts as plain text
    caption = "alice (red scarf:1.5)"
    weighted, _ = our_encode([caption], weighted=True)
    assert torch.equal(weighted, a1111_encode(webui, [caption]))


def test_each_weighted_caption_is_encoded_as_if_alone(webui, monkeypatch):
    install_prompt_modules(monkeypatch, parse_weighted)
    captions = ["alice (red scarf:1.5)", "alice [smiling]"]
    batch, _ = our_encode(captions, weighted=True)
    for row, caption in enumerate(captions):
        assert torch.allclose(batch[row : row + 1], a1111_encode(webui, [caption]), atol=1e-6)


def test_clip_skip_is_never_written_into_the_webuis_settings(webui, tmp_path):
    seen, user_choice = [], 3

    class UserSavesSettings(TrainingCallbacks):
        def on_step(self, progress):
            seen.append(webui.shared.opts.data["CLIP_stop_at_last_layers"])
            if progress.step == 1:  # the user changes clip skip in Settings while training runs
                webui.shared.opts.data["CLIP_stop_at_last_layers"] = user_choice

    result = train(host(), tiny_config(tmp_path, clip_skip=2, epochs=1), source(), UserSavesSettings())

    assert result.status == "completed"
    assert seen[0] == 1  # the user's value throughout, not the run's 2
    assert webui.shared.opts.data["CLIP_stop_at_last_layers"] == user_choice  # their change is kept
    _, metadata = load_kohya_lora(result.epochs[-1].path)
    assert metadata["ss_clip_skip"] == "2"


def test_clip_skip_of_the_run_is_what_the_text_encoder_computes(webui):
    skipped, _ = our_encode(["alice, red scarf"], clip_skip=2)
    assert torch.equal(skipped, a1111_encode(webui, ["alice, red scarf"], clip_skip=2))
    assert not torch.equal(skipped, a1111_encode(webui, ["alice, red scarf"], clip_skip=1))


def test_textual_inversion_fixes_are_cleared_before_each_chunk(webui):
    # A1111's token embedding splices embedding vectors at hijack.fixes; a stale entry must not reach
    # a literal caption.
    cond_stage = webui.shared.sd_model.cond_stage_model
    embeddings = cond_stage.wrapped.transformer.text_model.embeddings
    seen = []
    handle = embeddings.token_embedding.register_forward_pre_hook(
        lambda module, args: seen.append(cond_stage.hijack.fixes)
    )
    cond_stage.hijack.fixes = [[("stale", "embedding")]]
    try:
        our_encode([LONG_CAPTION])
    finally:
        handle.remove()
    assert len(seen) >= 3 and seen == [None] * len(seen)


def test_the_epoch_file_records_the_longest_caption(webui, tmp_path):
    images = make_images(2)
    long_source = InMemoryBatchSource(
        list(zip(images, ["alice", LONG_CAPTION], strict=True)), resolution=64, batch_size=1
    )
    result = train(host(), tiny_config(tmp_path, epochs=1, batch_size=1), long_source)
    _, metadata = load_kohya_lora(result.epochs[-1].path)
    chunks = a1111_encode(webui, [LONG_CAPTION]).shape[1] // 77
    assert metadata["ss_max_token_length"] == str(75 * chunks)


def test_samples_render_with_the_runs_clip_skip_through_the_override(monkeypatch, tmp_path):
    from lib_lora_trainer.outputs.samples import sample_requests
    from lib_lora_trainer.webui.samples import A1111SampleRenderer
    from tests.webui import stand_ins

    stand_in = stand_ins.install(monkeypatch, tmp_path)
    (request,) = sample_requests(tiny_config(tmp_path, clip_skip=2, sample_prompts=["ohwx"]), "alice-000001")
    A1111SampleRenderer().render([request], tmp_path / "samples", "alice-000001")
    (p,) = stand_in.recorder.processings
    assert p.override_settings["CLIP_stop_at_last_layers"] == 2 and p.override_settings_restore_afterwards
    assert "CLIP_stop_at_last_layers" not in stand_in.shared.opts.data
