"""The bucketed batch source: single-bucket batches, loss weights, flips, captions, caching."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from lib_lora_trainer.dataset import (
    BatchSource,
    BucketedBatchSource,
    DatasetError,
    build_batch_source,
    load_image,
    preview_crop,
    scan_dataset,
)
from lib_lora_trainer.dataset.base import pil_to_pixels
from lib_lora_trainer.dataset.crop import crop_to_bucket
from lib_lora_trainer.dataset.source import color_augment
from tests.dataset.helpers import PoolingEncoder, config_for, make_folder, photo, save_photo


def mixed_dataset(root: Path, *, reg: bool = False) -> dict:
    """3 portraits (448x576 bucket at 512) and 2 squares, captioned; optionally 2 reg squares."""
    train = root / "train"
    for index in range(3):
        save_photo(train / f"portrait_{index}.png", 640, 768, seed=index, caption=f"smiling, pose {index}")
    for index in range(2):
        save_photo(train / f"square_{index}.png", 512, 512, seed=10 + index, caption=f"ohwx, square {index}")
    overrides = {"train_data_dir": str(train), "flat_repeats": 2, "trigger_word": "ohwx"}
    if reg:
        make_folder(root / "reg", 2, start_seed=100, size=(512, 512), caption="woman")
        overrides.update(reg_data_dir=str(root / "reg"), prior_loss_weight=0.25)
    return overrides


def prepared(config, dataset=None, encoder=None, **kwargs) -> tuple[BucketedBatchSource, PoolingEncoder]:
    encoder = encoder or PoolingEncoder()
    source = build_batch_source(config, dataset or scan_dataset(config), **kwargs)
    source.prepare(encoder)
    return source, encoder


def test_it_is_a_batch_source_yielding_single_bucket_batches_with_loss_weights(tmp_path: Path):
    config = config_for(tmp_path, batch_size=2, **mixed_dataset(tmp_path, reg=True))
    source, encoder = prepared(config)

    protocol_methods = [name for name in vars(BatchSource) if not name.startswith("_")]
    expected = {"prepare", "batches_per_epoch", "epoch", "captions", "captions_vary", "fingerprint"}
    assert set(protocol_methods) == expected
    assert all(callable(getattr(source, name)) for name in protocol_methods)
    batches = list(source.epoch(0, random.Random(1)))

    # 6 portrait samples; 4 square samples + 10 reg samples (2 reg images cycled up to the 10 training
    # samples) share the 512x512 bucket: ceil(6/2) + ceil(14/2)
    assert len(batches) == source.batches_per_epoch() == 3 + 7
    assert encoder.images_encoded == 5 + 2  # each distinct image once, not once per repeat
    samples = 0
    weights = Counter()
    for batch in batches:
        assert batch.latents.ndim == 4 and batch.latents.shape[1] == 4
        assert batch.latents.shape[0] == len(batch.captions) == batch.loss_weights.shape[0]
        assert batch.latents.shape[2:] in ((72, 56), (64, 64))  # 576x448 or 512x512, / 8
        samples += batch.latents.shape[0]
        for caption, weight in zip(batch.captions, batch.loss_weights.tolist(), strict=True):
            weights[(caption == "woman", weight)] += 1
    assert samples == 20
    assert weights == {(False, 1.0): 10, (True, 0.25): 10}


def test_latents_are_the_encoded_crops_and_flips_are_cached_too(tmp_path: Path):
    config = config_for(tmp_path, flip_aug=True, batch_size=1, **mixed_dataset(tmp_path))
    source, encoder = prepared(config)

    assert encoder.calls == 5 and encoder.images_encoded == 10  # each image and its mirror, once
    planned = source.plan.images[0]
    crop = crop_to_bucket(load_image(planned.record.path).image, planned.choice).image
    expected = encoder(pil_to_pixels(crop)[None])[0]
    seen = {"plain": 0, "flipped": 0}
    for epoch in range(4):
        for batch in source.epoch(epoch, random.Random(epoch)):
            for latent in batch.latents:
                if latent.shape == expected.shape and torch.allclose(latent, expected, atol=1e-5):
                    seen["plain"] += 1
                elif latent.shape == expected.shape and torch.allclose(latent, expected.flip(-1), atol=1e-5):
                    seen["flipped"] += 1
    assert encoder.calls == 5 + 1  # epochs only read the cache (the +1 is the expectation above)
    assert seen["plain"] > 0 and seen["flipped"] > 0 and sum(seen.values()) == 2 * 4


def test_same_seed_same_epoch(tmp_path: Path):
    config = config_for(
        tmp_path, flip_aug=True, shuffle_caption=True, batch_size=2, **mixed_dataset(tmp_path)
    )
    source, _ = prepared(config)

    def run(seed):
        return [(b.captions, b.latents) for b in source.epoch(0, random.Random(seed))]

    first, again, other = run(5), run(5), run(6)
    assert [c for c, _ in first] == [c for c, _ in again]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(first, again, strict=True))
    assert [c for c, _ in first] != [c for c, _ in other]


def test_captions_trigger_first_keep_tokens_shuffle_and_dropout(tmp_path: Path):
    folder = tmp_path / "set"
    save_photo(folder / "a.png", 512, 512, caption="red hair, smiling, outdoors, hat, ohwx")
    base = {"train_data_dir": str(folder), "flat_repeats": 400, "trigger_word": "ohwx", "batch_size": 1}

    plain, _ = prepared(config_for(folder, **base))
    assert plain.captions() == ["ohwx, red hair, smiling, outdoors, hat"]
    assert not plain.captions_vary()

    augmented, _ = prepared(
        config_for(
            folder,
            **base,
            shuffle_caption=True,
            keep_tokens=1,
            caption_dropout_rate=0.1,
            caption_tag_dropout_rate=0.2,
        )
    )
    assert augmented.captions_vary()
    captions = [c for batch in augmented.epoch(0, random.Random(0)) for c in batch.captions]
    assert len(captions) == 400
    dropped = sum(1 for c in captions if c == "")
    kept = [c.split(", ") for c in captions if c]
    assert 20 <= dropped <= 65  # ~10% of 400
    assert all(tags[0] == "ohwx" for tags in kept)  # keep_tokens=1 keeps the trigger first, never dropped
    tag_counts = Counter(tag for tags in kept for tag in tags[1:])
    for tag in ("red hair", "smiling", "outdoors", "hat"):
        assert 0.7 * len(kept) <= tag_counts[tag] <= 0.9 * len(kept)  # ~80% survive tag dropout
    assert len({tuple(tags[1:]) for tags in kept if len(tags) == 5}) > 10  # shuffled orders


def test_colour_augmentation_encodes_every_step_and_says_so(tmp_path: Path):
    config = config_for(tmp_path, color_aug=True, flip_aug=True, batch_size=2, **mixed_dataset(tmp_path))
    source, encoder = prepared(config)

    assert encoder.calls == 0  # nothing can be cached
    assert any("latents cannot be cached" in warning for warning in source.warnings)
    batches = list(source.epoch(0, random.Random(3)))
    assert encoder.calls == len(batches) == source.batches_per_epoch()
    assert encoder.images_encoded == 10


def test_latent_caching_off_encodes_every_step(tmp_path: Path):
    config = config_for(tmp_path, cache_latents=False, batch_size=2, **mixed_dataset(tmp_path))
    source, encoder = prepared(config)

    assert encoder.calls == 0
    assert source.warnings == ["Latent caching is off: every step encodes its images with the VAE (slower)"]
    for epoch in range(2):
        batches = list(source.epoch(epoch, random.Random(epoch)))
        assert all(batch.latents.shape[0] == len(batch.captions) for batch in batches)
    assert encoder.calls == 2 * source.batches_per_epoch() and encoder.images_encoded == 2 * 10


def test_colour_augmentation_is_weak_and_occasional():
    pixels = np.asarray(photo(64, 64, seed=4))
    rng = random.Random(0)
    outputs = [color_augment(pixels, rng) for _ in range(600)]

    changed = [out for out in outputs if not np.array_equal(out, pixels)]
    assert all(out.shape == pixels.shape and out.dtype == np.uint8 for out in outputs)
    assert 0.25 * 600 <= len(changed) <= 0.42 * 600  # a third of the samples, as in kohya
    mean_changes = [np.abs(out.astype(int) - pixels).mean() for out in changed]
    assert max(mean_changes) < 12  # weak: a small hue or gamma change, not a different picture


def test_disk_cache_is_reused_and_invalidated(tmp_path: Path):
    overrides = mixed_dataset(tmp_path)
    config = config_for(tmp_path, flip_aug=True, cache_latents_to_disk=True, **overrides)
    cache = tmp_path / "latent_cache"

    first, encoder = prepared(config, vae_id="vae-A", cache_dir=cache)
    assert encoder.images_encoded == 10 and first.cache_hits == 0
    assert len(list(cache.rglob("*.safetensors"))) == 5

    rerun, encoder = prepared(config, vae_id="vae-A", cache_dir=cache)
    assert encoder.calls == 0 and rerun.cache_hits == 5  # a rerun skips encoding entirely
    for a, b in zip(first.epoch(0, random.Random(0)), rerun.epoch(0, random.Random(0)), strict=True):
        assert torch.equal(a.latents, b.latents)

    other_vae, encoder = prepared(config, vae_id="vae-B", cache_dir=cache)
    assert encoder.images_encoded == 10 and other_vae.cache_hits == 0

    edited = Path(overrides["train_data_dir"]) / "square_0.png"
    save_photo(edited, 512, 512, seed=99)  # same name and size, new content
    after_edit, encoder = prepared(config, vae_id="vae-A", cache_dir=cache)
    assert encoder.calls == 1 and after_edit.cache_hits == 4

    no_flip = config_for(tmp_path, flip_aug=False, cache_latents_to_disk=True, **overrides)
    _, encoder = prepared(no_flip, vae_id="vae-A", cache_dir=cache)
    assert encoder.calls == 0  # entries holding both latents serve a run without flipping


def test_corrupt_cache_file_is_re_encoded(tmp_path: Path):
    config = config_for(tmp_path, cache_latents_to_disk=True, **mixed_dataset(tmp_path))
    cache = tmp_path / "cache"
    prepared(config, vae_id="v", cache_dir=cache)
    victim = sorted(cache.rglob("*.safetensors"))[0]
    victim.write_bytes(b"not safetensors")

    _, encoder = prepared(config, vae_id="v", cache_dir=cache)

    assert encoder.calls == 1


def test_unusable_dataset_and_bad_batch_size_raise_clear_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match="does not exist"):
        build_batch_source(config_for(tmp_path / "missing"), scan_dataset(config_for(tmp_path / "missing")))
    folder = make_folder(tmp_path / "two", 2)
    config = config_for(folder, batch_size=4)
    with pytest.raises(DatasetError, match="batch size 4 is larger than the dataset"):
        build_batch_source(config, scan_dataset(config))
    with pytest.raises(ValueError, match="vae_id"):
        build_batch_source(config_for(folder, cache_latents_to_disk=True), scan_dataset(config))


def test_image_changed_after_scan_is_reported(tmp_path: Path):
    folder = make_folder(tmp_path / "set", 2)
    config = config_for(folder)
    dataset = scan_dataset(config)
    (folder / "img_001.png").write_bytes(b"")
    source = build_batch_source(config, dataset)

    with pytest.raises(DatasetError, match="img_001.png: the file is empty"):
        source.prepare(PoolingEncoder())


def test_pixels_given_to_the_encoder_are_the_crop(tmp_path: Path):
    folder = tmp_path / "set"
    save_photo(folder / "wide.png", 768, 640, seed=3)
    config = config_for(folder, flat_repeats=1)
    seen = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(pixels.clone())
        return PoolingEncoder()(pixels)

    build_batch_source(config, scan_dataset(config)).prepare(encode)

    expected = crop_to_bucket(load_image(folder / "wide.png").image, source_choice(config, folder)).image
    assert seen[0].shape == (1, 3, 448, 576)
    np.testing.assert_allclose(seen[0][0].numpy(), pil_to_pixels(expected).numpy(), atol=1e-6)


def source_choice(config, folder):
    return build_batch_source(config, scan_dataset(config)).plan.images[0].choice


def test_big_jpegs_are_decoded_reduced_and_the_preview_is_exactly_what_is_encoded(tmp_path: Path):
    folder = tmp_path / "set"
    save_photo(folder / "big.jpg", 2400, 1800, seed=6)
    config = config_for(folder, flat_repeats=1)
    seen = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        seen.append(pixels.clone())
        return PoolingEncoder()(pixels)

    build_batch_source(config, scan_dataset(config)).prepare(encode)

    preview = preview_crop(folder / "big.jpg", config)
    assert torch.equal(seen[0][0], pil_to_pixels(preview))
    full_decode = crop_to_bucket(load_image(folder / "big.jpg").image, source_choice(config, folder)).image
    difference = np.abs(np.asarray(preview, dtype=np.int16) - np.asarray(full_decode, dtype=np.int16))
    assert difference.mean() < 2.0  # reduced-scale decoding is visually the same
