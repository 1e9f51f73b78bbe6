import json
import math
import os
from pathlib import Path

import pytest
from PIL import Image

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.outputs import registry as registry_module
from lib_lora_trainer.outputs.registry import (
    EpochCard,
    EpochRegistry,
    OutputNameError,
    RegistrationError,
    card_metadata,
    epoch_stem,
)

MODEL_EXTENSIONS = (".pt", ".ckpt", ".safetensors")


def write_model(path: Path) -> Path:
    """Stand-in for the engine's save: the registry only needs the file to exist."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"model bytes")
    return path


def a1111_network_names(roots: list[Path]) -> list[str]:
    """The names A1111's Lora scan would register: each model file's stem, without subfolder."""
    names = []
    for root in roots:
        for _folder, _dirs, files in os.walk(root, followlinks=True):
            names += [
                os.path.splitext(f)[0] for f in files if os.path.splitext(f)[1].lower() in MODEL_EXTENSIONS
            ]
    return names


def sample_image(width: int = 24, height: int = 16, infotext: str | None = None) -> Image.Image:
    """An image as A1111 returns a sample: its infotext sits in ``image.info["parameters"]``."""
    image = Image.new("RGB", (width, height), (200, 30, 90))
    if infotext is not None:
        image.info["parameters"] = infotext
    return image


@pytest.fixture()
def lora_root(tmp_path: Path) -> Path:
    root = tmp_path / "models" / "Lora"
    root.mkdir(parents=True)
    return root


def test_plan_run_places_epochs_in_the_subfolder_with_kohya_names(lora_root: Path) -> None:
    run = EpochRegistry([lora_root], subfolder="character_trainer").plan_run("alice")
    assert run.folder == lora_root / "character_trainer"
    assert run.model_path(1) == lora_root / "character_trainer" / "alice-000001.safetensors"
    assert run.metadata_path(12).name == "alice-000012.json"
    assert run.preview_path(3).name == "alice-000003.preview.png"
    assert run.stem(7) == epoch_stem("alice", 7) == "alice-000007"


def test_a_name_used_in_any_subfolder_or_root_is_refused_with_the_next_free_name(
    lora_root: Path, tmp_path: Path
) -> None:
    lyco_root = tmp_path / "models" / "LyCORIS"
    write_model(lora_root / "someone_elses" / "alice-000004.safetensors")
    write_model(lyco_root / "bob-000001.ckpt")
    registry = EpochRegistry([lora_root, lyco_root], subfolder="character_trainer")

    with pytest.raises(OutputNameError) as error:
        registry.plan_run("alice")
    assert error.value.suggestion == "alice_run2"
    assert "alice_run2" in str(error.value)
    with pytest.raises(OutputNameError) as error:
        registry.plan_run("bob")
    assert error.value.suggestion == "bob_run2"

    write_model(lora_root / "old" / "alice_run2-000001.safetensors")
    assert registry.suggest_free_name("alice") == "alice_run3"
    assert registry.suggest_free_name("alice_run2") == "alice_run3"
    assert registry.plan_run("alice_run3").name == "alice_run3"


def test_clashes_are_found_case_insensitively_and_by_sidecar_files(lora_root: Path) -> None:
    registry = EpochRegistry([lora_root])
    (lora_root / "Alice-000002.safetensors").write_bytes(b"x")
    (lora_root / "carol-000001.json").write_text("{}")
    for name in ("alice", "carol"):
        with pytest.raises(OutputNameError):
            registry.plan_run(name)


def test_files_that_cannot_clash_do_not_block_a_name(lora_root: Path) -> None:
    for name in (
        "alice.safetensors",
        "alice-01.safetensors",
        "alice_v2-000001.safetensors",
        "xalice-000001.pt",
    ):
        (lora_root / name).write_bytes(b"x")
    assert EpochRegistry([lora_root]).plan_run("alice").name == "alice"


def test_bad_names_and_settings_are_refused(lora_root: Path) -> None:
    registry = EpochRegistry([lora_root])
    for bad in ("../escape", "two words", "", ".hidden"):
        with pytest.raises(OutputNameError):
            registry.plan_run(bad)
    with pytest.raises(ValueError):
        EpochRegistry([lora_root], subfolder="../outside")
    with pytest.raises(ValueError):
        EpochRegistry([])


def test_a_symlink_loop_under_the_root_does_not_hang(lora_root: Path) -> None:
    (lora_root / "loop").symlink_to(lora_root, target_is_directory=True)
    write_model(lora_root / "alice-000001.safetensors")
    assert len(EpochRegistry([lora_root]).existing_epoch_files("alice")) == 1


def test_register_epoch_writes_the_card_json_and_preview_then_announces(lora_root: Path) -> None:
    announced: list[tuple[str, Path]] = []
    registry = EpochRegistry([lora_root], "trainer", on_registered=lambda s, p: announced.append((s, p)))
    run = registry.plan_run("alice")
    write_model(run.model_path(2))
    card = EpochCard(
        epoch=2, steps=840, loss=0.08123, trigger_word="alice_chr", total_epochs=8, preferred_weight=0.8
    )
    infotext = "alice_chr <lora:alice-000002:0.8>\nSteps: 20, Sampler: Euler a, Seed: 1"

    model = registry.register_epoch(run, card, sample_image(infotext=infotext))

    assert model == run.model_path(2)
    metadata = json.loads(run.metadata_path(2).read_text(encoding="utf-8"))
    assert metadata == {
        "description": "Character LoRA 'alice', epoch 2 of 8",
        "sd version": "SD1",
        "activation text": "alice_chr",
        "preferred weight": 0.8,
        "negative text": "",
        "notes": "epoch 2 of 8, 840 steps, loss 0.0812",
    }
    with Image.open(run.preview_path(2)) as preview:
        assert preview.size == (24, 16)
        assert preview.format == "PNG"
        assert preview.info["parameters"] == infotext
    assert announced == [("alice-000002", run.model_path(2))]
    assert sorted(p.name for p in run.folder.iterdir()) == [
        "alice-000002.json",
        "alice-000002.preview.png",
        "alice-000002.safetensors",
    ]


def test_register_without_preview_and_with_unknown_loss(lora_root: Path) -> None:
    registry = EpochRegistry([lora_root])
    run = registry.plan_run("dave")
    write_model(run.model_path(1))
    registry.register_epoch(run, EpochCard(epoch=1, steps=10, loss=math.nan, trigger_word="dave"))
    assert json.loads(run.metadata_path(1).read_text())["notes"] == "epoch 1, 10 steps, loss n/a"
    assert not run.preview_path(1).exists()


def test_nothing_is_written_when_the_model_file_is_missing(lora_root: Path) -> None:
    registry = EpochRegistry([lora_root], "trainer")
    run = registry.plan_run("alice")
    with pytest.raises(RegistrationError, match="no model file"):
        registry.register_epoch(run, EpochCard(1, 5, 0.1, "alice"), sample_image())
    assert not run.folder.exists() or not any(run.folder.iterdir())


def test_existing_card_files_are_never_overwritten(lora_root: Path) -> None:
    registry = EpochRegistry([lora_root])
    run = registry.plan_run("alice")
    write_model(run.model_path(1))
    run.metadata_path(1).write_text('{"notes": "mine"}', encoding="utf-8")
    with pytest.raises(RegistrationError, match="already exists"):
        registry.register_epoch(run, EpochCard(1, 5, 0.1, "alice"), sample_image())
    assert run.metadata_path(1).read_text(encoding="utf-8") == '{"notes": "mine"}'
    assert not run.preview_path(1).exists()


def test_a_preview_that_cannot_be_read_leaves_nothing_behind(lora_root: Path, tmp_path: Path) -> None:
    complete = tmp_path / "sample.png"
    sample_image(64, 64).save(complete)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(complete.read_bytes()[:60])
    registry = EpochRegistry([lora_root])
    run = registry.plan_run("alice")
    write_model(run.model_path(1))
    with Image.open(truncated) as broken, pytest.raises(RegistrationError, match="preview"):
        registry.register_epoch(run, EpochCard(1, 5, 0.1, "alice"), broken)
    assert sorted(p.name for p in run.folder.iterdir()) == ["alice-000001.safetensors"]


def test_a_failed_preview_write_removes_the_json_written_before_it(lora_root: Path, monkeypatch) -> None:
    real_write = registry_module.atomic_write_bytes

    def write_failing_on_png(path, data, **kwargs):
        if str(path).endswith(".png"):
            raise OSError(28, "No space left on device")
        return real_write(path, data, **kwargs)

    monkeypatch.setattr(registry_module, "atomic_write_bytes", write_failing_on_png)
    registry = EpochRegistry([lora_root])
    run = registry.plan_run("alice")
    write_model(run.model_path(1))
    with pytest.raises(RegistrationError, match="No space left"):
        registry.register_epoch(run, EpochCard(1, 5, 0.1, "alice"), sample_image())
    assert sorted(p.name for p in run.folder.iterdir()) == ["alice-000001.safetensors"]


def test_a_failing_announcement_keeps_the_epoch(lora_root: Path, caplog) -> None:
    def refuse(stem: str, path: Path) -> None:
        raise RuntimeError("Lora extension not loaded")

    registry = EpochRegistry([lora_root], on_registered=refuse)
    run = registry.plan_run("alice")
    write_model(run.model_path(1))
    registry.register_epoch(run, EpochCard(1, 5, 0.1, "alice"), sample_image())
    assert run.metadata_path(1).is_file() and run.preview_path(1).is_file()
    assert "refresh" in caplog.text


def test_every_epoch_of_two_runs_gets_its_own_a1111_name(lora_root: Path, tmp_path: Path) -> None:
    lyco_root = tmp_path / "models" / "LyCORIS"
    write_model(lyco_root / "alice-000001.safetensors")
    registry = EpochRegistry([lora_root, lyco_root], "trainer")
    with pytest.raises(OutputNameError) as error:
        registry.plan_run("alice")
    first = registry.plan_run(error.value.suggestion)
    for epoch in (1, 2, 3):
        write_model(first.model_path(epoch))
        registry.register_epoch(first, EpochCard(epoch, epoch * 10, 0.1, "alice"), sample_image())
    second = registry.plan_run(registry.suggest_free_name(first.name))
    assert second.name == "alice_run3"
    for epoch in (1, 2):
        write_model(second.model_path(epoch))

    names = a1111_network_names([lora_root, lyco_root])
    assert len(names) == len(set(names)) == 6
    assert first.saved_stems() == ["alice_run2-000001", "alice_run2-000002", "alice_run2-000003"]
    assert second.saved_epochs() == [1, 2]


def test_the_run_config_is_saved_once_and_reserves_the_name(lora_root: Path) -> None:
    registry = EpochRegistry([lora_root], "trainer")
    run = registry.plan_run("erin")
    config = TrainingConfig(output_name="erin", trigger_word="erin_chr", network_dim=16)
    path = registry.save_run_config(run, config)
    assert path == run.config_path
    assert TrainingConfig.from_json_file(path) == config
    with pytest.raises(RegistrationError):
        registry.save_run_config(run, config)
    with pytest.raises(OutputNameError):
        registry.plan_run("erin")


def test_card_metadata_uses_the_given_description() -> None:
    card = EpochCard(3, 99, 0.5, "x", description="my notes", negative_text="blurry")
    metadata = card_metadata("x", card)
    assert metadata["description"] == "my notes"
    assert metadata["negative text"] == "blurry"
    assert metadata["notes"] == "epoch 3, 99 steps, loss 0.5000"
