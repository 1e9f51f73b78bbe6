"""Resume from the Results section: a run that did not finish is listed and goes on at its step; the
temporary files a killed save leaves in the Lora folder are removed at the next start."""

from __future__ import annotations

import json
import os
import time

import pytest
from safetensors.torch import load_file

from lib_lora_trainer.files import TEMP_PREFIX, TEMP_SUFFIX
from lib_lora_trainer.outputs.registry import EpochRegistry, OutputNameError
from lib_lora_trainer.training.state import STATE_FOLDER_NAME
from lib_lora_trainer.ui.resume import ResumeActions
from tests.ui.conftest import tiny_config

WAIT_S = 300


def finished(job):
    assert job.wait(WAIT_S), "the training thread did not end"
    return job.snapshot()


@pytest.mark.slow
def test_an_interrupted_run_is_listed_and_resumed_to_the_same_files(services, jobs, dataset, tmp_path):
    announced = services.notify_lora_added

    def interrupt_after_first_epoch(stem, path):
        announced(stem, path)
        if stem == "alice-000001":
            services.request_interrupt()

    services.notify_lora_added = interrupt_after_first_epoch
    first = finished(jobs.start(tiny_config(dataset, epochs=3, sample_every_n_epochs=0)))
    assert first.state == "interrupted" and "Resume goes on at step" in first.message
    services.notify_lora_added = announced

    actions = ResumeActions(services, jobs)
    (run,) = actions.resumable()
    assert run.name == "alice" and run.status == "interrupted" and 0 < run.step < run.total_steps
    assert "alice: step" in actions.notice()

    message, task_id = actions.resume("alice")
    assert "Resuming alice" in message and task_id
    second = finished(jobs.current())
    assert second.state == "completed", second.message
    assert [r.stem for r in second.epoch_results] == ["alice-000002", "alice-000003"]
    assert all(r.registered for r in second.epoch_results)
    assert actions.resumable() == []

    # the same run without the interruption gives the same files, tensor for tensor
    folder = services.lora_dir / "character_trainer"
    whole = finished(jobs.start(tiny_config(dataset, epochs=3, sample_every_n_epochs=0, output_name="bob")))
    assert whole.state == "completed"
    for epoch in (1, 2, 3):
        resumed = load_file(folder / f"alice-{epoch:06d}.safetensors")
        uninterrupted = load_file(folder / f"bob-{epoch:06d}.safetensors")
        assert resumed.keys() == uninterrupted.keys()
        assert all((resumed[k] == uninterrupted[k]).all() for k in resumed)


def test_a_run_whose_webui_died_is_reported_as_not_finished(services, jobs, tmp_path):
    registry = EpochRegistry(services.lora_roots(), services.defaults().lora_subfolder)
    state_folder = registry.output_folder / STATE_FOLDER_NAME / "carol"
    state_folder.mkdir(parents=True)
    (state_folder / "state-step00000040.lctstate").write_bytes(b"a state")
    status = {"status": "training", "message": "", "step": 40, "total_steps": 100, "updated_at": time.time()}
    (state_folder / "run.json").write_text(json.dumps(status), encoding="utf-8")
    notice = ResumeActions(services, jobs).notice()
    assert "carol: step 40 of 100, did not finish (the WebUI stopped during training)" in notice


def test_temporary_files_left_by_a_killed_save_are_removed_at_the_next_start(services, jobs):
    registry = EpochRegistry(services.lora_roots(), services.defaults().lora_subfolder)
    folder = registry.output_folder
    (folder / STATE_FOLDER_NAME / "alice").mkdir(parents=True)
    gone = 4_194_000  # a process id no process has (above the usual pid range)
    old = [
        folder / f"{TEMP_PREFIX}{gone}-0a1b2c3d{TEMP_SUFFIX}",
        folder / STATE_FOLDER_NAME / "alice" / f"{TEMP_PREFIX}{gone}-ab12cd34{TEMP_SUFFIX}",
    ]
    fresh = folder / f"{TEMP_PREFIX}1-ee99ff88{TEMP_SUFFIX}"  # a live process's save in progress right now
    users = folder / ".my_notes.txt"
    for path in [*old, fresh, users]:
        path.write_bytes(b"partial")
    an_hour_ago = time.time() - 3600
    for path in [*old, users]:
        os.utime(path, (an_hour_ago, an_hour_ago))
    os.utime(fresh, (time.time(), time.time()))
    removed = ResumeActions(services, jobs).clean_up_after_crash()
    assert sorted(removed) == sorted(old)
    assert fresh.exists() and users.exists()
    assert not [p for p in folder.rglob("*.safetensors")]  # and none was ever a LoRA name


def test_a_step_file_takes_the_run_name_like_an_epoch_file(services):
    registry = EpochRegistry(services.lora_roots(), services.defaults().lora_subfolder)
    registry.output_folder.mkdir(parents=True, exist_ok=True)
    (registry.output_folder / "alice-step00000500.safetensors").write_bytes(b"a step file")
    with pytest.raises(OutputNameError, match="alice-step00000500"):
        registry.plan_run("alice")
