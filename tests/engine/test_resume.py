"""Never lose a run: state saved and resumed exactly, saving by steps, a kill, a full disk, bad files."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lib_lora_trainer.config import ConfigError
from lib_lora_trainer.dataset.base import InMemoryBatchSource
from lib_lora_trainer.training import state as state_module
from lib_lora_trainer.training.loop import (
    ResumeMismatch,
    TrainingCallbacks,
    TrainingOutOfMemory,
    train,
)
from lib_lora_trainer.training.state import STATE_FOLDER_NAME, StateFolder, load_state
from tests.engine.helpers import host_fingerprint, make_images, tiny_config, tiny_host

CAPTIONS = ["alice, red scarf", "alice smiling", "alice, outdoors", "alice, portrait"]


def source(count: int = 3, batch_size: int = 1) -> InMemoryBatchSource:
    items = list(zip(make_images(count), CAPTIONS, strict=False))
    return InMemoryBatchSource(items, resolution=64, batch_size=batch_size)


def config(folder: Path, **overrides):
    values = dict(batch_size=1, epochs=2, gradient_checkpointing="off", train_text_encoder=True)
    values.update(overrides)
    return tiny_config(folder, **values)


class StopAtBatch(TrainingCallbacks):
    """Says stop the ``batches``-th time it is asked once training began (asked before each batch
    and after each epoch)."""

    def __init__(self, batches: int):
        self.batches, self.asked, self.training = batches, 0, False

    def on_start(self, plan) -> None:
        self.training = True

    def should_stop(self) -> bool:
        self.asked += self.training
        return self.asked >= self.batches


def state_folder(folder: Path, name: str = "alice") -> Path:
    return folder / "Lora" / STATE_FOLDER_NAME / name


def file_tensors(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {path.name: load_file(path) for path in sorted((folder / "Lora").glob("*.safetensors"))}


def assert_same_files(a: Path, b: Path) -> None:
    first, second = file_tensors(a), file_tensors(b)
    assert list(first) == list(second)
    for name in first:
        assert first[name].keys() == second[name].keys()
        for key in first[name]:
            assert torch.equal(first[name][key], second[name][key]), (name, key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """2 epochs of 3 steps, batch 1: the reference every resumed run must equal."""
    folder = tmp_path_factory.mktemp("whole")
    result = train(tiny_host(), config(folder), source())
    assert result.status == "completed"
    return folder, result


@pytest.mark.slow
@pytest.mark.parametrize(
    "stop_at_ask, stopped_at_step",
    [(2, 1), (4, 3), (6, 4)],  # Stop is asked before each batch and after each epoch (ask 4)
    ids=["mid-epoch", "epoch-boundary", "last-epoch"],
)
def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(
    tmp_path, uninterrupted, stop_at_ask, stopped_at_step
):
    reference, whole = uninterrupted
    first = train(tiny_host(), config(tmp_path), source(), StopAtBatch(stop_at_ask))
    assert first.status == "interrupted"
    assert first.state_path is not None and first.state_path.suffix == ".lctstate"
    assert load_state(first.state_path).run.step == stopped_at_step
    resumed = train(tiny_host(), config(tmp_path), source(), resume_from=state_folder(tmp_path))
    assert resumed.status == "completed", resumed.message
    assert resumed.losses == whole.losses
    assert_same_files(reference, tmp_path)
    assert [s.step for s in resumed.epochs] == [3, 6]
    with safe_open(str(tmp_path / "Lora" / "alice-000002.safetensors"), "pt") as reader:
        metadata = reader.metadata()
    assert (metadata["ss_steps"], metadata["ss_epoch"]) == ("6", "2")
    assert not (tmp_path / "Lora" / STATE_FOLDER_NAME).exists()  # a finished run keeps no state


@pytest.mark.slow
def test_interrupt_during_gradient_accumulation_resumes_exactly(tmp_path):
    settings = dict(gradient_accumulation_steps=2, epochs=2)
    whole = train(tiny_host(), config(tmp_path / "whole", **settings), source(4))
    # stop before batch 4: batch 3 was accumulated into step 2, which is redone after the resume
    first = train(tiny_host(), config(tmp_path / "run", **settings), source(4), StopAtBatch(4))
    assert first.status == "interrupted" and load_state(first.state_path).run.batches_done == 2
    resumed = train(
        tiny_host(), config(tmp_path / "run", **settings), source(4), resume_from=first.state_path
    )
    assert resumed.losses == whole.losses
    assert_same_files(tmp_path / "whole", tmp_path / "run")


class Killed(BaseException):
    """The process ends (no except clause of ours runs)."""


@pytest.mark.slow
def test_a_kill_between_the_temporary_write_and_the_rename_keeps_the_previous_state(
    tmp_path, uninterrupted, monkeypatch
):
    reference, whole = uninterrupted
    real_replace = state_module.atomic_write_bytes.__globals__["os"].replace
    writes = []

    def replace_then_die(temp, target):
        writes.append(target)
        if str(target).endswith("state-step00000004.lctstate"):
            # what a kill leaves: half of the temporary file, never renamed
            Path(temp).with_name(Path(temp).name + "-left").write_bytes(Path(temp).read_bytes()[:1000])
            raise Killed()
        return real_replace(temp, target)

    monkeypatch.setattr(state_module.atomic_write_bytes.__globals__["os"], "replace", replace_then_die)
    with pytest.raises(Killed):
        train(tiny_host(), config(tmp_path, save_state_every_n_steps=2), source())
    monkeypatch.undo()
    folder = StateFolder(state_folder(tmp_path))
    assert [p.name for p in folder.state_paths()] == ["state-step00000002.lctstate"]
    assert StateFolder(state_folder(tmp_path)).read_status()["status"] == "training"  # did not finish
    resumed = train(tiny_host(), config(tmp_path), source(), resume_from=folder.folder)
    assert resumed.losses == whole.losses
    assert_same_files(reference, tmp_path)


def test_a_damaged_newest_state_is_skipped_for_the_one_before(tmp_path):
    result = train(
        tiny_host(), config(tmp_path, epochs=1, save_state_every_n_steps=1), source(), StopAtBatch(3)
    )
    folder = StateFolder(state_folder(tmp_path))
    newest = folder.state_paths()[-1]
    newest.write_bytes(newest.read_bytes()[:500])
    assert result.status == "interrupted"
    assert load_state(folder.folder).run.step == 1


@pytest.mark.parametrize(
    "change, named",
    [
        ("dataset", "the dataset changed"),
        ("settings", "unet_lr 0.001 -> 0.002"),
        ("checkpoint", "the checkpoint changed"),
    ],
)
def test_resume_refuses_a_changed_run_and_names_the_difference(tmp_path, change, named):
    first = train(tiny_host(), config(tmp_path, epochs=1), source(), StopAtBatch(3))
    host, settings, data = tiny_host(), config(tmp_path, epochs=1), source()
    if change == "dataset":
        data = InMemoryBatchSource(
            list(zip(make_images(4, seed=5), CAPTIONS, strict=False)), resolution=64, batch_size=1
        )
    elif change == "settings":
        settings = config(tmp_path, epochs=1, unet_lr=2e-3)
    else:
        info = host.base_model_info()
        host.base_model_info = lambda: type(info)(name="other.safetensors", hash_sha256="abc")
    before = host_fingerprint(host)
    with pytest.raises(ResumeMismatch, match=named):
        train(host, settings, data, resume_from=first.state_path)
    assert host_fingerprint(host) == before  # refused before the model was touched

    notices = []

    class Notices(TrainingCallbacks):
        def on_notice(self, message):
            notices.append(message)

    going_on = train(host, settings, data, Notices(), resume_from=first.state_path, allow_mismatch=True)
    assert going_on.status == "completed"
    assert any(named in notice for notice in notices)


def test_max_train_steps_and_step_files(tmp_path):
    settings = config(
        tmp_path,
        epochs=1,
        max_train_steps=10,
        save_every_n_steps=3,
        save_last_n_steps=4,
        save_last_n_epochs=2,
    )
    removed = []

    class Removed(TrainingCallbacks):
        def on_file_removed(self, saved):
            removed.append(saved.path.name)

    result = train(tiny_host(), settings, source(4), Removed())  # 4 steps per epoch: 3 epochs, the last cut
    assert result.status == "completed" and len(result.losses) == 10
    names = sorted(p.name for p in (tmp_path / "Lora").iterdir() if p.is_file())
    assert names == [
        "alice-000002.safetensors",
        "alice-000003.safetensors",
        "alice-step00000006.safetensors",
        "alice-step00000009.safetensors",
    ]
    # save_last_n_steps=4 keeps the step files of steps 6..9 at step 9; save_last_n_epochs=2 drops epoch 1
    assert removed == ["alice-step00000003.safetensors", "alice-000001.safetensors"]
    expected = {
        "alice-step00000006.safetensors": ("6", "2", "alice-step00000006"),
        "alice-000002.safetensors": ("8", "2", "alice-000002"),
        "alice-000003.safetensors": ("10", "3", "alice-000003"),
        "alice-step00000009.safetensors": ("9", "3", "alice-step00000009"),
    }
    for name, (steps, epoch, stem) in expected.items():
        with safe_open(str(tmp_path / "Lora" / name), "pt") as reader:
            metadata = reader.metadata()
        assert (metadata["ss_steps"], metadata["ss_epoch"], metadata["ss_output_name"]) == (
            steps,
            epoch,
            stem,
        )
        assert metadata["ss_max_train_steps"] == "10"


def test_files_of_another_run_are_never_removed(tmp_path):
    (tmp_path / "Lora").mkdir()
    theirs = tmp_path / "Lora" / "alice-000009.safetensors"
    theirs.write_bytes(b"someone else's epoch 9")
    train(tiny_host(), config(tmp_path, epochs=2, save_last_n_epochs=1), source(count=2))
    assert theirs.read_bytes() == b"someone else's epoch 9"
    assert not (tmp_path / "Lora" / "alice-000001.safetensors").exists()
    assert (tmp_path / "Lora" / "alice-000002.safetensors").exists()


def fail_writes_of(monkeypatch, marker: str):
    """Every atomic write whose target's name contains ``marker`` fails half-way with ENOSPC."""
    import lib_lora_trainer.files as files

    real_write_target, real_fdopen = files._write_target, files.os.fdopen
    doomed = []  # set by the target's name, taken by the next file opened: the temporary

    def write_target(path):
        target = real_write_target(path)
        if marker in target.name:
            doomed.append(True)
        return target

    class FullDisk:
        def __init__(self, stream):
            self.stream = stream

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.stream.close()

        def write(self, data):
            self.stream.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    def fdopen(handle, *args, **kwargs):
        stream = real_fdopen(handle, *args, **kwargs)
        if doomed:
            doomed.pop()
            return FullDisk(stream)
        return stream

    monkeypatch.setattr(files, "_write_target", write_target)
    monkeypatch.setattr(files.os, "fdopen", fdopen)


def test_disk_full_while_saving_an_epoch(tmp_path, monkeypatch):
    host = tiny_host()
    before = host_fingerprint(host)
    first = {}

    class FailSecondEpoch(TrainingCallbacks):
        def on_epoch_saved(self, saved):
            first["saved"] = saved.path
            fail_writes_of(monkeypatch, "alice-000002.safetensors")

    result = train(host, config(tmp_path, epochs=3), source(), FailSecondEpoch())
    assert result.status == "stopped_save_failed"
    assert "alice-000002.safetensors could not be saved: the disk is full" in result.message
    assert "Resume" in result.message
    names = sorted(p.name for p in (tmp_path / "Lora").iterdir())
    assert names == [STATE_FOLDER_NAME, "alice-000001.safetensors"]  # no partial or temporary file
    assert load_state(result.state_path).run.step == 6
    assert host_fingerprint(host) == before


def test_disk_full_while_saving_a_state_keeps_the_previous_one(tmp_path, monkeypatch):
    notices = []

    class FailSecondState(TrainingCallbacks):
        def on_step(self, progress):
            if progress.step == 3:
                fail_writes_of(monkeypatch, ".lctstate")

        def on_notice(self, message):
            notices.append(message)

        def should_stop(self):
            return len(notices) > 0

    settings = config(tmp_path, epochs=2, save_state_every_n_steps=2)
    result = train(tiny_host(), settings, source(), FailSecondState())
    assert result.status == "interrupted"
    assert any("could not be saved (No space left on device); the previous one is kept" in n for n in notices)
    folder = StateFolder(state_folder(tmp_path))
    assert [p.name for p in folder.state_paths()] == ["state-step00000002.lctstate"]
    assert [p.name for p in folder.folder.iterdir() if p.name.startswith(".")] == []
    assert load_state(folder.folder).run.step == 2


def test_a_file_that_overflows_in_fp16_is_never_saved(tmp_path, monkeypatch):
    from lib_lora_trainer.network.adapters import AttachedAdapters

    real_export = AttachedAdapters.export

    def huge(self):
        return {
            key: {part: t * 1e6 + 1.0 if part.endswith("weight") else t for part, t in w.items()}
            for key, w in real_export(self).items()
        }

    monkeypatch.setattr(AttachedAdapters, "export", huge)  # finite in fp32, inf once cast to fp16
    result = train(
        tiny_host(), config(tmp_path, epochs=1, max_train_steps=1, save_precision="fp16"), source()
    )
    assert result.status == "stopped_nonfinite_loss"
    assert "NaN or infinite values in fp16" in result.message and "none yet" in result.message
    assert result.epochs == []
    assert not list((tmp_path / "Lora").glob("*.safetensors"))


def test_nan_latents_are_refused(tmp_path):
    host = tiny_host()

    class NanVae:
        def __getattr__(self, name):
            return getattr(host, name)

        def encode_images(self, pixels):
            return host.encode_images(pixels) * float("nan")

    with pytest.raises(ValueError, match="NaN or infinite latents"):
        train(NanVae(), config(tmp_path, epochs=1), source())


def test_out_of_memory_in_the_first_optimizer_step_gives_the_advice(tmp_path, monkeypatch):
    import torch.optim

    def step(self, closure=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB")

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    # the check before the model is touched steps a dummy optimizer: let it pass, the first real step fails
    from lib_lora_trainer.training import loop as loop_module

    monkeypatch.setattr(loop_module, "precheck_optimizer", lambda config, **kwargs: None)
    host = tiny_host()
    before = host_fingerprint(host)
    with pytest.raises(TrainingOutOfMemory, match="in the optimizer step of step 1.*Lower the batch size"):
        train(host, config(tmp_path, epochs=1), source())
    assert host_fingerprint(host) == before


def test_out_of_memory_while_caching_latents_gives_the_advice(tmp_path):
    host = tiny_host()

    class OutOfMemoryVae:
        def __getattr__(self, name):
            return getattr(host, name)

        def encode_images(self, pixels):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(TrainingOutOfMemory, match="while caching latents.*Lower the batch size"):
        train(OutOfMemoryVae(), config(tmp_path, epochs=1), source())


def test_out_of_memory_in_a_step_saves_the_state_of_the_step_before(tmp_path):
    host = tiny_host()
    calls = []

    class OutOfMemoryAtStep3:
        def __getattr__(self, name):
            return getattr(host, name)

        def predict(self, noisy, timesteps, cond):
            calls.append(1)
            if len(calls) == 3:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
            return host.predict(noisy, timesteps, cond)

    with pytest.raises(TrainingOutOfMemory, match="state of step 2 is saved"):
        train(OutOfMemoryAtStep3(), config(tmp_path, epochs=1, gradient_checkpointing="on"), source())
    assert StateFolder(state_folder(tmp_path)).read_status()["status"] == "failed"
    assert load_state(state_folder(tmp_path)).run.step == 2


class Phases(TrainingCallbacks):
    def __init__(self, stop_while_caching: bool = False):
        self.phases, self.stop_while_caching, self.steps = [], stop_while_caching, []

    def on_phase(self, phase, done, total):
        self.phases.append((phase, done, total))

    def on_step(self, progress):
        self.steps.append((progress.step, progress.new_losses))

    def should_stop(self):
        return self.stop_while_caching and ("caching latents", 2, 3) in self.phases


def test_preparation_reports_its_phases_and_the_first_loss_comes_at_once(tmp_path):
    callbacks = Phases()
    train(tiny_host(), config(tmp_path, epochs=1, train_text_encoder=False), source(), callbacks)
    names = [phase for phase, _, _ in callbacks.phases]
    assert names.index("caching latents") < names.index("attaching adapters") < names.index("training")
    assert ("caching latents", 3, 3) in callbacks.phases and "caching captions" in names
    assert callbacks.steps[0][0] == 1 and len(callbacks.steps[0][1]) == 1  # 3 steps, yet a loss at step 1


def test_stop_while_caching_latents_ends_before_training(tmp_path):
    host = tiny_host()
    before = host_fingerprint(host)
    callbacks = Phases(stop_while_caching=True)
    result = train(host, config(tmp_path, epochs=1), source(), callbacks)
    assert result.status == "interrupted" and "caching latents" in result.message
    assert "training" not in [phase for phase, _, _ in callbacks.phases]
    assert host_fingerprint(host) == before


def test_headless_entry_resumes(tmp_path, monkeypatch, capsys):
    from lib_lora_trainer.training import run as run_module

    calls = {}

    def fake_run_training(host, cfg, callbacks=None, **kwargs):
        calls.update(kwargs)
        from lib_lora_trainer.training.loop import TrainingResult

        return TrainingResult("completed", "ok")

    cfg = tmp_path / "cfg.json"
    config(tmp_path).save_json(cfg)
    monkeypatch.setattr(run_module, "run_training", fake_run_training)
    assert run_module.main([str(cfg), "--resume", str(tmp_path / "state"), "--allow-mismatch"]) == 0
    assert calls["resume_from"] == str(tmp_path / "state") and calls["allow_mismatch"] is True
    shutil.rmtree(tmp_path / "Lora", ignore_errors=True)


def test_a_non_finite_loss_keeps_the_last_good_state(tmp_path):
    host = tiny_host()
    calls = []

    class NanFromStep5:
        def __getattr__(self, name):
            return getattr(host, name)

        def predict(self, noisy, timesteps, cond):
            calls.append(1)
            out = host.predict(noisy, timesteps, cond)
            return out * float("nan") if len(calls) >= 5 else out

    settings = config(tmp_path, epochs=3, save_state_every_n_steps=2)
    result = train(NanFromStep5(), settings, source())
    assert result.status == "stopped_nonfinite_loss"
    assert "state-step00000004.lctstate" in result.message and "alice-000001.safetensors" in result.message
    good = load_state(state_folder(tmp_path))
    assert good.run.step == 4 and len(good.run.losses) == 4
    assert StateFolder(state_folder(tmp_path)).read_status()["status"] == "stopped_nonfinite_loss"


def test_a_new_run_never_mixes_with_an_unfinished_one_of_the_same_name(tmp_path):
    first = train(tiny_host(), config(tmp_path, epochs=1), source(), StopAtBatch(2))
    assert first.status == "interrupted"
    with pytest.raises(ConfigError, match="unfinished run named 'alice'.*resume it"):
        train(tiny_host(), config(tmp_path, epochs=1, save_every_n_epochs=1), source())
