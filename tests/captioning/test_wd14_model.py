"""The real loading and inference code on WD14-shaped ONNX models generated here."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest
from PIL import Image

from lib_lora_trainer.captioning import (
    WD14_MODELS,
    TaggerModelError,
    TaggerModelUnavailable,
    WD14Tagger,
    choose_providers,
    ensure_model_files,
    get_model_info,
    load_tag_labels,
)
from tests.captioning.conftest import CONVNEXT_V2
from tests.captioning.wd14_fixtures import (
    PROBE_TAGS,
    STANDARD_TAGS,
    V3_NAMES,
    build_model,
    probe_scores,
    write_labels,
    write_model_folder,
)

RED = (255, 0, 0)


@pytest.mark.parametrize(("size", "names"), [(448, ("input_1:0", "predictions_sigmoid")), (320, V3_NAMES)])
def test_preprocessing_seen_by_the_model_is_bgr_white_padded_0_255_at_its_own_size(tmp_path, size, names):
    tagger = WD14Tagger(write_model_folder(tmp_path / "m", size=size, names=names), use_gpu=False)
    assert tagger.input_size == size
    wide_red = Image.new("RGB", (120, 60), RED)  # half of the padded square is image, half white padding
    square_red = Image.new("RGB", (50, 50), RED)
    scores = tagger.predict([wide_red, square_red])
    assert scores.shape == (2, len(STANDARD_TAGS) + len(PROBE_TAGS))

    full, corner = probe_scores(scores[0])
    # channel 0 is blue: 0 in the image, 255 in the padding; channel 2 is red: 255 everywhere
    np.testing.assert_allclose(full, [0.5, 0.5, 1.0], atol=0.01)
    np.testing.assert_allclose(corner, [1.0, 1.0, 1.0], atol=1e-6)  # the corner is white padding

    full, corner = probe_scores(scores[1])
    np.testing.assert_allclose(full, [0.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(corner, [0.0, 0.0, 1.0], atol=1e-6)


def test_a_mid_grey_reaches_the_model_unnormalised(tmp_path):
    tagger = WD14Tagger(write_model_folder(tmp_path / "m", size=64), use_gpu=False)
    full, _ = probe_scores(tagger.predict([Image.new("RGB", (64, 64), (51, 102, 204))])[0])
    np.testing.assert_allclose(full, [204 / 255, 102 / 255, 51 / 255], atol=1e-4)


def test_fixed_scores_come_back_in_label_order(tagger):
    scores = tagger.predict([Image.new("RGB", (30, 30))])[0]
    np.testing.assert_allclose(scores[: len(STANDARD_TAGS)], [tag.score for tag in STANDARD_TAGS], atol=1e-5)
    assert tagger.labels.names[: len(STANDARD_TAGS)] == tuple(tag.name for tag in STANDARD_TAGS)


def test_model_with_fixed_batch_of_one_still_takes_batches(tmp_path):
    tagger = WD14Tagger(write_model_folder(tmp_path / "m", size=64, batch_dim=1), use_gpu=False)
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    scores = tagger.predict([Image.new("RGB", (20, 20), colour) for colour in colours])
    for row, (red, green, blue) in zip(scores, colours, strict=True):
        np.testing.assert_allclose(probe_scores(row)[0], [blue / 255, green / 255, red / 255], atol=1e-6)


def test_provider_in_use_is_logged_and_unload_frees_then_reloads(tagger, caplog):
    with caplog.at_level(logging.INFO, logger="lib_lora_trainer.captioning"):
        tagger.load()
    assert f"runs on {tagger.providers[0]}" in caplog.text
    assert tagger.providers[-1] == "CPUExecutionProvider"
    tagger.unload()
    assert not tagger.is_loaded
    assert tagger.predict([Image.new("RGB", (8, 8))]).shape[0] == 1
    assert tagger.is_loaded


@pytest.mark.parametrize(
    ("available", "use_gpu", "expected"),
    [
        (["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], True, "CUDA"),
        (["CUDAExecutionProvider", "CPUExecutionProvider"], False, "CPU"),
        (["AzureExecutionProvider", "CPUExecutionProvider"], True, "CPU"),
        (["DmlExecutionProvider", "CPUExecutionProvider"], True, "Dml"),
    ],
)
def test_gpu_provider_is_chosen_when_onnxruntime_offers_one(available, use_gpu, expected):
    providers = choose_providers(available, use_gpu)
    assert providers[0] == f"{expected}ExecutionProvider"
    assert providers[-1] == "CPUExecutionProvider"


def test_labels_and_model_from_different_models_are_refused(tmp_path):
    tagger = WD14Tagger(write_model_folder(tmp_path / "m", extra_labels=3), use_gpu=False)
    with pytest.raises(TaggerModelError, match="come from different models"):
        tagger.load()


def test_a_non_wd14_model_is_refused_with_its_input_shape(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    onnx.save(build_model(STANDARD_TAGS, size=64, layout="NCHW"), folder / "model.onnx")
    write_labels(folder / "selected_tags.csv", STANDARD_TAGS)
    with pytest.raises(TaggerModelError, match="is not a WD14 tagger"):
        WD14Tagger(folder, use_gpu=False).load()


def test_missing_files_and_bad_tag_list_are_explained(tmp_path):
    with pytest.raises(TaggerModelError, match="has no model.onnx and no selected_tags.csv"):
        WD14Tagger(tmp_path)
    csv_path = tmp_path / "selected_tags.csv"
    csv_path.write_text("id,label\n1,smile\n", encoding="utf-8")
    with pytest.raises(TaggerModelError, match="needs 'name' and 'category' columns"):
        load_tag_labels(csv_path)


def test_registry_lists_the_smilingwolf_models_with_their_thresholds():
    v2 = [name for name, info in WD14_MODELS.items() if info.dataset_version == 2]
    v3 = [name for name, info in WD14_MODELS.items() if info.dataset_version == 3]
    assert sorted(v2) == sorted(
        f"wd-v1-4-{arch}-tagger-v2" for arch in ("convnext", "convnextv2", "vit", "swinv2", "moat")
    )
    assert sorted(v3) == sorted(
        f"wd-{arch}-tagger-v3" for arch in ("vit", "convnext", "swinv2", "vit-large", "eva02-large")
    )
    assert get_model_info("SmilingWolf/wd-v1-4-vit-tagger-v2").general_threshold == 0.3537
    for info in WD14_MODELS.values():
        assert 0 < info.general_threshold < 1 and info.character_threshold == 0.85
    with pytest.raises(ValueError, match="Choose one of: wd-v1-4-convnext-tagger-v2"):
        get_model_info("wd-v9-tagger")


def test_model_already_on_disk_is_used_without_any_network(models_dir, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("hf_hub_download must not be called when the files are present")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    tagger = WD14Tagger.from_registry(CONVNEXT_V2, models_dir, use_gpu=False)
    assert tagger.default_general_threshold == 0.3685
    assert tagger.model_dir == models_dir / CONVNEXT_V2


def test_missing_model_with_downloads_off_says_where_to_put_the_files(tmp_path):
    with pytest.raises(TaggerModelUnavailable) as raised:
        ensure_model_files("wd-vit-tagger-v3", tmp_path, allow_download=False)
    message = str(raised.value)
    assert str(tmp_path / "wd-vit-tagger-v3") in message
    assert "https://huggingface.co/SmilingWolf/wd-vit-tagger-v3" in message
    assert "model.onnx and selected_tags.csv" in message


def test_download_failure_offline_is_a_clear_message(tmp_path):
    # A closed local port behaves like a machine without internet, instantly and without leaving it.
    with pytest.raises(TaggerModelUnavailable, match="the download failed") as raised:
        ensure_model_files("wd-swinv2-tagger-v3", tmp_path, endpoint="http://127.0.0.1:9")
    assert "If this computer is offline" in str(raised.value)
    assert not (tmp_path / "wd-swinv2-tagger-v3" / "model.onnx").exists()


def test_v3_models_need_a_recent_onnxruntime(tmp_path):
    folder = write_model_folder(tmp_path / "wd-vit-tagger-v3", size=64)
    tagger = WD14Tagger(folder, use_gpu=False)
    assert tagger.info is not None and tagger.info.min_onnxruntime == (1, 17)
    message = "needs onnxruntime 1.17 or newer; this environment has 1.16.3"
    with pytest.raises(TaggerModelError, match=message):
        tagger._check_runtime_version("1.16.3")
    tagger._check_runtime_version("1.20.1")
