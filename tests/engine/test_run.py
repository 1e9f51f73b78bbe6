"""The headless entry: a JSON config and a dataset folder in, numbered epoch files out."""

from __future__ import annotations

import codecs
import errno
import json

import pytest

from lib_lora_trainer.model import standalone
from lib_lora_trainer.model.host import HostRefused
from lib_lora_trainer.network.kohya_format import load_kohya_lora
from lib_lora_trainer.training.callbacks import TrainingOutOfMemory
from lib_lora_trainer.training.run import main
from tests.engine.helpers import make_images, tiny_config


def write_dataset(folder, count=4):
    folder.mkdir(parents=True)
    for index, image in enumerate(make_images(count, size=80)):
        image.save(folder / f"photo_{index}.png")
        (folder / f"photo_{index}.txt").write_text(f"alice, pose {index}", encoding="utf-8")


def snapshot(folder):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_main_trains_from_a_json_config(tmp_path, capsys):
    write_dataset(tmp_path / "data" / "5_alice")
    config = tiny_config(
        tmp_path,
        train_data_dir=str(tmp_path / "data"),
        dataset_layout="kohya",
        epochs=2,
        trigger_word="alice",
    )
    path = tmp_path / "config.json"
    config.save_json(path)
    before = snapshot(tmp_path / "data")

    assert main([str(path)]) == 0

    out = capsys.readouterr().out
    assert json.loads(out.strip().splitlines()[-1])["status"] == "completed"
    assert out.count("validation loss") == 2  # measured after each epoch, as in the tab
    files = sorted(p.name for p in (tmp_path / "Lora").glob("*.safetensors"))
    assert files == ["alice-000001.safetensors", "alice-000002.safetensors"]
    _, metadata = load_kohya_lora(tmp_path / "Lora" / files[-1])
    assert json.loads(metadata["ss_dataset_dirs"]) == {"5_alice": {"n_repeats": 5, "img_count": 4}}
    assert metadata["ss_output_name"] == "alice-000002" and metadata["ss_epoch"] == "2"
    assert json.loads(metadata["ss_tag_frequency"])["5_alice"]["alice"] == 4
    assert snapshot(tmp_path / "data") == before  # user's files untouched


def test_main_reports_bad_settings_clearly(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"output_name": "a/b", "network_dim": 0, "train_data_dir": str(tmp_path)}))
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "folder separator" in err and "rank" in err


def test_main_reports_an_empty_dataset(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    path = tmp_path / "config.json"
    tiny_config(tmp_path, train_data_dir=str(tmp_path / "empty")).save_json(path)
    assert main([str(path)]) == 2
    assert "error:" in capsys.readouterr().err


def test_a_utf16_config_is_read_and_a_folder_is_one_line(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    path = tmp_path / "config.json"
    text = json.dumps({"train_data_dir": str(tmp_path / "empty"), "output_dir": str(tmp_path / "Lora")})
    path.write_bytes(codecs.BOM_UTF16_LE + text.encode("utf-16-le"))  # PowerShell's "> config.json"
    assert main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "has no images" in err and "Traceback" not in err  # read: the dataset is what is wrong
    assert main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is a folder, not a file" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("error", "code", "fragment"),
    [
        (ValueError("resolution 500 does not fit"), 2, "resolution 500 does not fit; check the settings"),
        (
            PermissionError(errno.EACCES, "Permission denied", "/data/Lora"),
            2,
            "/data/Lora: Permission denied;",
        ),
        (OSError(errno.ENOSPC, "No space left on device"), 2, "No space left on device; check the path"),
        (HostRefused("clip skip 13 is outside 1..12"), 2, "this model cannot be trained here: clip skip 13"),
        (RuntimeError("Torch not compiled with CUDA enabled"), 2, "the device cannot be used (Torch not"),
        (MemoryError(), 1, "out of memory; lower the batch size"),
        # Apple MPS: the message names the device, but this is memory, not an unusable device
        (RuntimeError("MPS backend out of memory (MPS allocated: 17.5 GiB)"), 1, "out of memory; lower"),
        (
            TrainingOutOfMemory("Out of MPS memory at step 3. Lower the batch size."),
            1,
            "Out of MPS memory at",
        ),
        (KeyError("unet"), 1, "training failed (KeyError: 'unet'); please report this"),
        (KeyboardInterrupt(), 130, "interrupted; the epochs saved so far are kept"),
    ],
)
def test_every_failure_of_the_headless_entry_is_one_line(
    tmp_path, capsys, monkeypatch, error, code, fragment
):
    path = tmp_path / "config.json"
    tiny_config(tmp_path, train_data_dir=str(tmp_path)).save_json(path)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(standalone, "build_random_host", fail)
    assert main([str(path)]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and fragment in err, err
