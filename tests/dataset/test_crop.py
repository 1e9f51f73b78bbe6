"""Centre and face-aware crops, the pluggable face finder and the crop preview."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from lib_lora_trainer.dataset import (
    Bucketer,
    FaceBox,
    HaarFaceFinder,
    build_batch_source,
    crop_to_bucket,
    preview_crop,
    scan_dataset,
)
from tests.dataset.helpers import PoolingEncoder, config_for, drawn_face


class AltCascadeFaceFinder:
    """A second detector (OpenCV's 'alt2' cascade) plugged in through the FaceFinder protocol, the way the
    A1111 adapter plugs in A1111's autocrop."""

    name = "opencv-haar-frontalface-alt2"

    def find_faces(self, image: Image.Image) -> list[FaceBox]:
        cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_alt2.xml")
        grey = np.asarray(image.convert("L"))
        return [
            FaceBox(int(x), int(y), int(w), int(h)) for x, y, w, h in cascade.detectMultiScale(grey, 1.1, 3)
        ]


def wide_scene_with_face_on_the_left() -> Image.Image:
    scene = Image.new("RGB", (1200, 600), (90, 110, 140))
    scene.paste(drawn_face(200), (0, 0))  # face centred near (200, 260)
    return scene


def tall_scene_with_face_at_the_top() -> Image.Image:
    scene = Image.new("RGB", (600, 1400), (90, 110, 140))
    scene.paste(drawn_face(200), (100, 0))  # face centred near (300, 260)
    return scene


def test_haar_finder_finds_the_face():
    faces = HaarFaceFinder().find_faces(drawn_face(200))

    assert len(faces) == 1
    center_x, center_y = faces[0].center
    assert abs(center_x - 200) < 30 and abs(center_y - 260) < 40
    assert 150 < faces[0].width < 300


def test_face_crop_keeps_the_face_that_a_centre_crop_cuts():
    finder = HaarFaceFinder()

    for scene in (wide_scene_with_face_on_the_left(), tall_scene_with_face_at_the_top()):
        choice = Bucketer(512, enabled=False).select(*scene.size)
        centre = crop_to_bucket(scene, choice)
        face = crop_to_bucket(scene, choice, face_finder=finder)

        assert centre.image.size == face.image.size == (512, 512)
        assert face.face is not None
        assert finder.find_faces(centre.image) == []  # the centre crop loses the face
        found = finder.find_faces(face.image)
        assert len(found) == 1  # the face crop keeps it whole
        left, top, right, bottom = face.box
        assert left <= face.face.left and face.face.left + face.face.width <= right
        assert top <= face.face.top and face.face.top + face.face.height <= bottom


def test_no_face_falls_back_to_the_centre():
    scene = Image.new("RGB", (1000, 500), (120, 120, 120))
    choice = Bucketer(512, enabled=False).select(*scene.size)

    result = crop_to_bucket(scene, choice, face_finder=HaarFaceFinder())

    assert result.face is None
    assert result.box == crop_to_bucket(scene, choice).box == (256, 0, 768, 512)


def test_preview_shows_exactly_the_training_crop(tmp_path: Path):
    path = tmp_path / "scene.png"
    wide_scene_with_face_on_the_left().save(path)
    face_config = config_for(tmp_path, crop_mode="face", enable_bucket=False)
    centre_config = config_for(tmp_path, crop_mode="center", enable_bucket=False)

    face_preview = preview_crop(path, face_config)
    centre_preview = preview_crop(path, centre_config)

    choice = Bucketer(512, enabled=False).select(1200, 600)
    expected = crop_to_bucket(Image.open(path).convert("RGB"), choice, face_finder=HaarFaceFinder()).image
    assert face_preview.size == centre_preview.size == (512, 512)
    assert np.array_equal(np.asarray(face_preview), np.asarray(expected))
    assert not np.array_equal(np.asarray(face_preview), np.asarray(centre_preview))

    bucketed = preview_crop(path, config_for(tmp_path, resolution=512))
    assert bucketed.size == Bucketer(512).select(1200, 600).bucket


def test_a_plugged_in_face_finder_is_used_and_keys_the_cache(tmp_path: Path):
    folder = tmp_path / "set"
    folder.mkdir()
    wide_scene_with_face_on_the_left().save(folder / "scene.png")
    config = config_for(folder, crop_mode="face", enable_bucket=False, cache_latents_to_disk=True)
    cache = tmp_path / "cache"
    dataset = scan_dataset(config)

    default = build_batch_source(config, dataset, vae_id="v", cache_dir=cache)
    default.prepare(PoolingEncoder())
    plugged = build_batch_source(
        config, dataset, vae_id="v", cache_dir=cache, face_finder=AltCascadeFaceFinder()
    )
    encoder = PoolingEncoder()
    plugged.prepare(encoder)

    assert isinstance(default.face_finder, HaarFaceFinder)
    assert isinstance(plugged.face_finder, AltCascadeFaceFinder)
    assert encoder.calls == 1  # latents cropped by another detector are not reused
    assert len(list(cache.rglob("*.safetensors"))) == 2
