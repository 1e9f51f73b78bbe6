"""Each scorer's maths on constructed cases, with tiny real ONNX and CLIP models (nothing downloaded)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageEnhance

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.dataset.crop import FaceBox, HaarFaceFinder
from lib_lora_trainer.evaluation import metrics
from lib_lora_trainer.evaluation.clip_scorer import ClipScorer, fidelity_text
from lib_lora_trainer.evaluation.embedders import (
    CharacterEmbedder,
    FaceEmbedder,
    OnnxModel,
    Preprocessing,
    ScorerModelError,
)
from lib_lora_trainer.evaluation.models import (
    CHARACTER_MODEL,
    CLIP_MODEL,
    FACE_MODEL,
    ScorerModelUnavailable,
    ensure_model,
)
from lib_lora_trainer.evaluation.scoring import (
    Scorers,
    ScoringUnavailable,
    load_scorers,
    reference,
    score_images,
)
from tests.engine.helpers import make_images
from tests.evaluation.fixtures import write_embedder, write_models_dir, write_tiny_clip


class WholeImageFace:
    """A face finder that sees one face filling the picture (the Haar cascade finds none in drawings)."""

    name = "whole-image"

    def find_faces(self, image):
        return [FaceBox(0, 0, image.width, image.height)]


def light_edit(image: Image.Image) -> Image.Image:
    return ImageEnhance.Brightness(image).enhance(1.06)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    return write_models_dir(tmp_path_factory.mktemp("scoring_models"))


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    return ClipScorer.from_folder(write_tiny_clip(tmp_path_factory.mktemp("clip")))


def embedders(models_dir):
    character = CharacterEmbedder(OnnxModel(CHARACTER_MODEL.model_path(models_dir)))
    face = FaceEmbedder(OnnxModel(FACE_MODEL.model_path(models_dir)), WholeImageFace())
    return character, face


@pytest.mark.parametrize("kind", ["character", "face"])
def test_copies_and_light_edits_are_more_alike_than_unrelated_images(models_dir, kind):
    embedder = dict(zip(["character", "face"], embedders(models_dir), strict=True))[kind]
    training = make_images(4, seed=1)
    unrelated = make_images(4, seed=2)
    train_rows = embedder.embed(training)
    assert np.allclose(np.linalg.norm(train_rows, axis=1), 1.0)

    copies = metrics.likeness(embedder.embed(training[:2]), train_rows)
    edits = metrics.likeness(embedder.embed([light_edit(image) for image in training]), train_rows)
    others = metrics.likeness(embedder.embed(unrelated), train_rows)
    assert copies.mean == pytest.approx(1.0, abs=1e-6)
    assert copies.mean >= edits.mean > others.mean
    assert edits.mean > 0.95 and copies.found_share == edits.found_share == others.found_share == 1.0


def test_no_detectable_face_gives_no_likeness_and_says_how_many_were_found(models_dir):
    face = FaceEmbedder(OnnxModel(FACE_MODEL.model_path(models_dir)), HaarFaceFinder())
    drawings = make_images(3, seed=4)  # coloured discs: no face for OpenCV
    rows = face.embed(drawings)
    assert rows.shape[0] == 3 and not rows.any()
    result = metrics.likeness(face.embed(make_images(2, seed=5)), rows)
    assert result.mean is None and result.found_share == 0.0 and result.per_image == (None, None)


def test_a_model_with_a_fixed_batch_of_one_runs_image_by_image(models_dir):
    fixed = OnnxModel(write_embedder(models_dir / "fixed" / "m.onnx", 32, fixed_batch=True))
    dynamic = OnnxModel(write_embedder(models_dir / "dynamic" / "m.onnx", 32))
    batch = np.stack([Preprocessing(32).array(image) for image in make_images(3)])
    assert np.allclose(fixed.run(batch), dynamic.run(batch), atol=1e-5)


def test_identical_images_across_seeds_give_variety_zero_and_trigger_memorisation(clip):
    training = make_images(3, seed=7)
    same = [training[0]] * 3
    rows = clip.embed(same)
    assert metrics.variety([rows]) == pytest.approx(0.0, abs=1e-6)
    different = clip.embed(make_images(3, seed=8))
    assert metrics.variety([different]) > 0.0
    found = metrics.memorised(rows, clip.embed(training))
    assert [(m.evaluation_index, m.training_index) for m in found] == [(0, 0), (1, 0), (2, 0)]
    assert not metrics.memorised(different, clip.embed(training), threshold=0.9999)


def test_the_text_side_receives_the_class_word_instead_of_the_trigger(clip):
    assert fidelity_text("ohwx_alice woman, portrait <lora:alice-000002:1>", "ohwx_alice", "woman") == (
        "woman woman, portrait"
    )
    assert fidelity_text("pencil drawing of ohwx_alice", "ohwx_alice", "") == "pencil drawing of person"
    assert fidelity_text("ohwx_alice2 smiling", "ohwx_alice", "woman") == "ohwx_alice2 smiling"

    received = []
    embed_texts = clip.embed_texts

    def spy(texts):
        received.extend(texts)
        return embed_texts(texts)

    scorers = Scorers(None, clip, "character", "test")
    scorers.clip.embed_texts = spy
    images = make_images(2, seed=3)
    texts = [fidelity_text("ohwx_alice, portrait", "ohwx_alice", "woman")] * 2
    try:
        scored = score_images(images, texts, [[0, 1]], scorers, reference(scorers, images))
    finally:
        del scorers.clip.embed_texts
    assert received == ["woman, portrait", "woman, portrait"]
    assert scored.fidelity is not None and scored.likeness is None


def test_a_corrupt_onnx_file_gives_a_clear_message(tmp_path):
    path = tmp_path / "model_feat.onnx"
    path.write_bytes(b"not an onnx model at all")
    with pytest.raises(ScorerModelError, match="corrupt: delete it"):
        OnnxModel(path).session()


def test_a_missing_model_offline_gives_a_clear_message(tmp_path):
    with pytest.raises(ScorerModelUnavailable) as missing:
        ensure_model(FACE_MODEL, tmp_path, allow_download=False)
    text = str(missing.value)
    assert "downloads are off" in text and FACE_MODEL.page_url in text and "training itself" in text

    config = TrainingConfig(evaluation_scorer="face")
    with pytest.raises(ScoringUnavailable, match="arcface"):
        load_scorers(config, make_images(2), models_dir=tmp_path, allow_download=False)


def test_the_scorer_is_chosen_from_the_dataset_and_can_be_overridden(models_dir):
    drawings = make_images(3)
    auto = load_scorers(
        TrainingConfig(), drawings, models_dir=models_dir, allow_download=False, face_finder=HaarFaceFinder()
    )
    assert auto.kind == "character" and "0 of 3" in auto.reason and auto.clip is not None
    faces = load_scorers(
        TrainingConfig(), drawings, models_dir=models_dir, allow_download=False, face_finder=WholeImageFace()
    )
    assert faces.kind == "face" and isinstance(faces.likeness, FaceEmbedder)
    forced = load_scorers(
        TrainingConfig(evaluation_scorer="character"),
        drawings,
        models_dir=models_dir,
        allow_download=False,
        face_finder=WholeImageFace(),
    )
    assert forced.kind == "character" and isinstance(forced.likeness, CharacterEmbedder)
    for scorers in (auto, faces, forced):
        scorers.close()
        assert scorers.likeness is None and scorers.clip is None


def test_a_corrupt_likeness_model_still_leaves_clip_scores(models_dir, tmp_path):
    broken = tmp_path / "models"
    write_models_dir(broken)
    CHARACTER_MODEL.model_path(broken).write_bytes(b"truncated")
    scorers = load_scorers(TrainingConfig(), make_images(2), models_dir=broken, allow_download=False)
    assert scorers.likeness is None and scorers.clip is not None
    assert any("corrupt" in problem for problem in scorers.problems)
    assert CLIP_MODEL.key in str(CLIP_MODEL.folder(broken))
