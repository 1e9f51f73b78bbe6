"""What a user waits through: every check before "started", a Stop while queued that touches nothing,
each preparation phase with its own progress, an Elapsed that stops with the run, and a status line
that follows the epochs."""

from __future__ import annotations

import time

import pytest

from lib_lora_trainer.training.loop import TrainingResult
from lib_lora_trainer.ui import jobs as jobs_module
from lib_lora_trainer.ui import views
from lib_lora_trainer.ui.jobs import JobRefused, TrainingJob
from tests.ui.conftest import tiny_config

WAIT_S = 300


def test_train_refuses_a_missing_folder_or_unusable_dataset_before_it_starts(services, jobs, dataset):
    with pytest.raises(JobRefused, match="does not exist"):
        jobs.start(tiny_config(dataset / "missing"))
    empty = services.datasets_dir / "empty"
    empty.mkdir()
    with pytest.raises(JobRefused, match="dataset cannot be used"):
        jobs.start(tiny_config(empty))
    with pytest.raises(JobRefused, match="continue from does not exist"):
        jobs.start(tiny_config(dataset, network_weights=str(services.lora_dir / "nothing.safetensors")))
    assert jobs.current() is None and not list(services.lora_dir.rglob("*"))


def test_stop_while_waiting_in_the_queue_never_prepares_the_model(services, jobs, dataset, monkeypatch):
    trained = []
    monkeypatch.setattr(jobs_module, "run_training", lambda *args, **kwargs: trained.append(args))
    with services.gpu_lock:  # a txt2img generation holds the model
        job = jobs.start(tiny_config(dataset))
        time.sleep(0.2)
        assert job.snapshot().state == "queued"
        assert "Stopping" in jobs.stop()
    assert job.wait(WAIT_S)
    snapshot = job.snapshot()
    assert snapshot.state == "interrupted" and "before it started" in snapshot.message
    assert trained == []
    assert not (services.lora_dir / "character_trainer" / "alice.lora_trainer_config.json").exists()


def _run_with_phases(services, jobs, dataset, monkeypatch, phases):
    """A run whose engine reports ``phases`` (TrainingCallbacks.on_phase), then finishes."""
    seen = []

    def fake_training(host, config, callbacks, **kwargs):
        for phase, done, total in phases:
            callbacks.on_phase(phase, done, total)
            snapshot = jobs.current().snapshot()
            seen.append(
                (snapshot.phase, snapshot.phase_done, snapshot.phase_total, views.status_html(snapshot))
            )
            time.sleep(0.05)
        return TrainingResult(status="completed", message="done")

    monkeypatch.setattr(jobs_module, "run_training", fake_training)
    job = jobs.start(tiny_config(dataset))
    assert job.wait(WAIT_S)
    return job, seen


def test_each_preparation_phase_reports_its_own_progress(services, jobs, dataset, monkeypatch):
    phases = [("caching latents", 0, 4), ("caching latents", 3, 4), ("memory probe", 1, 2)]
    job, seen = _run_with_phases(services, jobs, dataset, monkeypatch, phases)

    assert [entry[:3] for entry in seen] == [
        ("Caching latents", 0, 4), ("Caching latents", 3, 4), ("Measuring memory", 1, 2),
    ]  # fmt: skip
    assert 'value="0.7500"' in seen[1][3] and 'data-phase="Caching latents"' in seen[1][3]
    frame = services.frames[-1]
    assert frame.reports.pop(0) == (0, 0, "Preparing alice: reading the dataset")
    assert frame.reports[:3] == [
        (0, 4, "Preparing alice: Caching latents 0/4"),
        (3, 4, "Preparing alice: Caching latents 3/4"),
        (1, 2, "Preparing alice: Measuring memory 1/2"),
    ]
    assert frame.phases_begun == 2  # the host's ETA restarts with each phase


def test_elapsed_stops_when_the_run_ends(services, jobs, dataset, monkeypatch):
    job, _ = _run_with_phases(services, jobs, dataset, monkeypatch, [("attaching adapters", 1, 1)])
    first = job.snapshot().elapsed_s
    time.sleep(1.2)
    assert job.snapshot().elapsed_s == first > 0


@pytest.mark.slow
def test_the_status_line_moves_on_after_an_epochs_samples(services, jobs, dataset, monkeypatch):
    messages = []
    on_step = TrainingJob.on_step

    def recording_on_step(self, progress):
        on_step(self, progress)
        messages.append((progress.epoch, self.snapshot().message))

    monkeypatch.setattr(TrainingJob, "on_step", recording_on_step)
    job = jobs.start(tiny_config(dataset, epochs=2, sample_every_n_epochs=1))
    assert job.wait(WAIT_S) and job.snapshot().state == "completed"
    second_epoch = [message for epoch, message in messages if epoch == 2]
    assert second_epoch and all(message == "epoch 2 of 2" for message in second_epoch)
