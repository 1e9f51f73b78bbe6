"""The training job behind the Train button, over the tiny real model: epochs registered in the Lora
folder with card files and samples, the GPU lock held for the whole run, interrupts, name clashes."""

from __future__ import annotations

import contextlib
import json
import threading
import time

import pytest
from PIL import Image
from safetensors import safe_open

from lib_lora_trainer.outputs import registry as registry_module
from lib_lora_trainer.ui.jobs import JobRefused
from tests.engine.helpers import host_fingerprint
from tests.ui.conftest import tiny_config

WAIT_S = 300


def finished(job):
    assert job.wait(WAIT_S), "the training thread did not end"
    return job.snapshot()


def test_a_run_registers_every_epoch_with_card_json_preview_and_samples(services, jobs, dataset):
    job = jobs.start(tiny_config(dataset))
    snapshot = finished(job)

    assert snapshot.state == "completed", snapshot.message
    assert [r.epoch for r in snapshot.epoch_results] == [1, 2]
    folder = services.lora_dir / "character_trainer"
    for result in snapshot.epoch_results:
        assert result.registered and result.model_path == folder / f"{result.stem}.safetensors"
        card = json.loads((folder / f"{result.stem}.json").read_text(encoding="utf-8"))
        assert card["activation text"] == "ohwx_alice"
        assert card["sd version"] == "SD1"
        assert f"epoch {result.epoch} of 2" in card["notes"] and f"{result.step} steps" in card["notes"]
        preview = Image.open(folder / f"{result.stem}.preview.png")
        assert f"<lora:{result.stem}:1>" in preview.info["parameters"]
        assert len(result.samples) == 1 and result.samples[0].parent == services.samples_root() / "alice"
        assert f"<lora:{result.stem}:1>" in Image.open(result.samples[0]).info["parameters"]
    assert services.announced == ["alice-000001", "alice-000002"]
    saved_config = json.loads((folder / "alice.lora_trainer_config.json").read_text(encoding="utf-8"))
    assert saved_config["output_dir"] == str(folder) and saved_config["epochs"] == 2
    assert snapshot.step == snapshot.total_steps == 8
    assert [step for step, _ in snapshot.losses][-1] == 8
    frame = services.frames[-1]
    assert frame.task_id == job.task_id and frame.reports[-1][:2] == (8, 8)
    assert "loss" in frame.reports[-1][2]


def test_epoch_names_stay_distinct_under_a1111_alias_rules(services, jobs, dataset):
    finished(jobs.start(tiny_config(dataset)))
    # A1111's Lora scan: name = file stem, alias = ss_output_name; an alias seen twice is forbidden.
    available, forbidden = {}, set()
    for path in sorted(services.lora_dir.rglob("*.safetensors")):
        with safe_open(str(path), framework="pt") as reader:
            alias = reader.metadata().get("ss_output_name", path.stem)
        if alias in available:
            forbidden.add(alias)
        available[path.stem] = path
        available[alias] = path
    assert not forbidden
    assert available["alice-000001"] != available["alice-000002"]


def test_a_taken_name_is_refused_with_a_suggestion_or_numbered(services, jobs, dataset):
    finished(jobs.start(tiny_config(dataset, epochs=1)))
    with pytest.raises(JobRefused) as refused:
        jobs.start(tiny_config(dataset, epochs=1))
    assert refused.value.suggestion == "alice_run2"
    assert "alice" in str(refused.value)

    second = finished(jobs.start(tiny_config(dataset, epochs=1), number_if_taken=True))
    assert second.run_name == "alice_run2" and second.state == "completed"
    folder = services.lora_dir / "character_trainer"
    assert (folder / "alice-000001.safetensors").is_file()
    assert (folder / "alice_run2-000001.safetensors").is_file()


def test_bad_settings_and_a_second_run_are_refused_before_anything_is_written(services, jobs, dataset):
    with pytest.raises(JobRefused, match="rank"):
        jobs.start(tiny_config(dataset, network_dim=0))
    with pytest.raises(JobRefused, match="no folder"):
        jobs.start(tiny_config(dataset, train_data_dir=""))
    assert not list(services.lora_dir.rglob("*"))

    job = jobs.start(tiny_config(dataset, epochs=1))
    with pytest.raises(JobRefused, match="already in progress"):
        jobs.start(tiny_config(dataset, output_name="bob"))
    finished(job)


def test_interrupt_keeps_the_last_finished_epoch_and_restores_the_model(services, jobs, dataset, tiny_host):
    before = host_fingerprint(tiny_host)
    announced = services.notify_lora_added

    def interrupt_after_first_epoch(stem, path):
        announced(stem, path)
        services.request_interrupt()  # what A1111's Interrupt button does through shared.state

    services.notify_lora_added = interrupt_after_first_epoch
    snapshot = finished(jobs.start(tiny_config(dataset, epochs=3)))

    assert snapshot.state == "interrupted"
    folder = services.lora_dir / "character_trainer"
    assert sorted(p.name for p in folder.glob("alice-*")) == [
        "alice-000001.json", "alice-000001.preview.png", "alice-000001.safetensors",
    ]  # fmt: skip
    assert host_fingerprint(tiny_host) == before


def test_the_stop_button_ends_the_run_after_the_current_step(services, jobs, dataset, tiny_host):
    before = host_fingerprint(tiny_host)
    job = jobs.start(tiny_config(dataset, epochs=50, sample_every_n_epochs=0))
    deadline = time.time() + WAIT_S
    while job.snapshot().step < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert "Stopping" in jobs.stop()
    snapshot = finished(job)
    assert snapshot.state == "interrupted" and snapshot.step < snapshot.total_steps
    assert host_fingerprint(tiny_host) == before
    assert jobs.stop() == "No training is running."


class _RecordingLockServices:
    """Records when the training job held the GPU lock."""

    def __init__(self, services):
        self.services = services
        self.held: list[tuple[float, float]] = []
        original = services.exclusive_job

        @contextlib.contextmanager
        def exclusive_job(task_id, title):
            with original(task_id, title) as frame:
                acquired = time.time()
                try:
                    yield frame
                finally:
                    self.held.append((acquired, time.time()))

        services.exclusive_job = exclusive_job


def test_a_generation_requested_during_training_waits_until_training_ends(services, jobs, dataset):
    recorder = _RecordingLockServices(services)
    started = threading.Event()
    announced = services.notify_lora_added

    def on_first_epoch(stem, path):
        announced(stem, path)
        started.set()

    services.notify_lora_added = on_first_epoch
    job = jobs.start(tiny_config(dataset))
    assert started.wait(WAIT_S)
    generation = threading.Thread(target=services.generate, args=("a photo",))
    generation.start()
    generation.join(WAIT_S)
    snapshot = finished(job)

    assert snapshot.state == "completed"
    ((acquired, released),) = recorder.held
    request = services.generations[0]
    assert acquired < request.requested_at < released  # asked while the run held the model
    assert request.started_at >= released  # and ran only after the run had let go


def test_card_files_are_all_or_nothing_when_writing_fails(services, jobs, dataset, monkeypatch):
    real_write = registry_module.atomic_write_bytes

    def fail_on_previews(target, payload):
        if str(target).endswith(".preview.png"):
            raise OSError("disk full")
        return real_write(target, payload)

    monkeypatch.setattr(registry_module, "atomic_write_bytes", fail_on_previews)
    snapshot = finished(jobs.start(tiny_config(dataset)))

    assert snapshot.state == "completed"
    folder = services.lora_dir / "character_trainer"
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith("alice-")) == [
        "alice-000001.safetensors", "alice-000002.safetensors",
    ]  # fmt: skip
    assert all(not r.registered and "disk full" in r.problem for r in snapshot.epoch_results)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left
