"""The tab's handlers take one form (a set of inputs -> one dict), remember the last submitted form for a
reloaded page, stream only what changed, start the Results grid at the run's own size, and accept only
real uploads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gradio as gr
import pytest

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.ui import tab as tab_module
from lib_lora_trainer.ui.form import FIELD_NAMES, values_from_config
from lib_lora_trainer.ui.jobs import EpochResult, JobSnapshot, TrainingJobs
from lib_lora_trainer.ui.tab import FormState, _Tab
from lib_lora_trainer.ui.uploads import RefusedUpload, UploadFile, upload_folder
from tests.ui.conftest import tiny_config


def built_tab(services, jobs=None) -> _Tab:
    tab = _Tab(services, jobs or TrainingJobs(services))
    tab.build()
    return tab


def form_values(tab: _Tab, config: TrainingConfig, **extra) -> dict:
    values = {
        tab.fields[name]: value for name, value in zip(FIELD_NAMES, values_from_config(config), strict=True)
    }
    for name, value in extra.items():
        values[getattr(tab, name)] = value
    return values


def test_handlers_receive_the_whole_form_as_one_dict(services, dataset):
    tab = built_tab(services)
    assert set(tab.fields.values()) <= tab.form_inputs()
    assert tab.form_inputs(tab.preset) - set(tab.fields.values()) == {tab.preset}
    config = tiny_config(dataset, resolution=64)
    report, previews = tab.on_scan(form_values(tab, config))
    assert "2 in 1 folder(s)" in report and len(previews) == 2
    assert FormState(form_values(tab, config), tab.fields).config() == dataclasses.replace(config)

    # a settings handler fills the FIELDS outputs in order
    *values, message = tab.on_apply_preset(form_values(tab, config, preset="Game character"))
    assert "applied" in message and len(values) == len(FIELD_NAMES)
    assert values[FIELD_NAMES.index("network_dim")] == 96


def test_every_form_event_is_wired_with_a_set_of_inputs(services):
    tab = _Tab(services, TrainingJobs(services))
    blocks = tab.build()
    field_ids = {component._id for component in tab.fields.values()}
    form_events = [d for d in blocks.dependencies if field_ids <= set(d["inputs"])]
    assert len(form_events) >= 10  # scan, tagger, captions (5 bulk + select + save + load), settings, train
    train = next(d for d in form_events if tab.train_button._id in d["targets"])
    index = int(train["js"].split("lctStartTraining(")[1].split(",")[0])
    assert train["inputs"][index] == tab.task_id._id  # where the JavaScript puts the task id


def test_the_last_submitted_form_comes_back_after_a_reload(services, dataset):
    tab = built_tab(services)
    config = tiny_config(dataset, epochs=7, trigger_word="ohwx_bob", sample_prompts=["a", "b"])
    tab.on_scan(form_values(tab, config))

    reloaded = built_tab(services)  # a fresh page (or a restarted WebUI)
    restored = reloaded.on_page_load()
    assert restored[FIELD_NAMES.index("epochs")] == 7
    assert restored[FIELD_NAMES.index("trigger_word")] == "ohwx_bob"
    assert restored[FIELD_NAMES.index("sample_prompts")] == "a\nb"
    saved = json.loads(services.form_memory_path().read_text(encoding="utf-8"))
    assert set(saved) == set(FIELD_NAMES)

    services.form_memory_path().write_text(json.dumps({"epochs": 3, "gone_field": 1}), encoding="utf-8")
    assert built_tab(services).on_page_load()[FIELD_NAMES.index("epochs")] == 3  # an old file still loads
    services.form_memory_path().write_text("[", encoding="utf-8")
    assert all(value == gr.update() for value in built_tab(services).on_page_load())


class _FakeJob:
    def __init__(self, snapshots):
        self.snapshots = list(snapshots)

    def snapshot(self):
        return self.snapshots.pop(0) if len(self.snapshots) > 1 else self.snapshots[0]


class _FakeJobs:
    def __init__(self, job):
        self.job = job
        self.on_finished = []  # hooks run after a job (the scoring panel adds one)

    def current(self):
        return self.job

    def is_running(self):
        return True


def test_the_status_stream_sends_only_what_changed(services, tmp_path, monkeypatch):
    monkeypatch.setattr(tab_module, "POLL_SECONDS", 0)
    sample = tmp_path / "alice-000001-00.png"
    result = EpochResult(1, "alice-000001", 4, 0.2, tmp_path / "alice-000001.safetensors", (sample,), True)
    base = JobSnapshot("task(1)", "alice", tmp_path, "training", "epoch 2 of 2", step=5, total_steps=8,
                       epoch=2, epochs=2, losses=((4, 0.2), (5, 0.1)), epoch_results=(result,))  # fmt: skip
    snapshots = [
        dataclasses.replace(base, elapsed_s=1.0, version=3),
        dataclasses.replace(base, elapsed_s=70.0, version=3),  # nothing new but the time
        dataclasses.replace(base, elapsed_s=71.0, version=4, log=("a log line",)),
        dataclasses.replace(base, elapsed_s=72.0, version=5, state="completed"),
    ]
    tab = _Tab(services, _FakeJobs(_FakeJob(snapshots)))
    tab.build()
    first, second, third, last = list(tab.watch())

    status, chart, samples, log, *_, new_cards = first
    assert "0:01" in status and "<svg" in chart and samples[0][0] == str(sample)
    assert json.loads(new_cards) == ["alice-000001"]
    assert "1:10" in second[0]  # Elapsed moves on while a phase reports nothing new
    assert second[1] == second[2] == gr.update()
    assert third[1] == gr.update() and third[2] == gr.update()  # chart and gallery are not resent
    assert third[3] == "a log line" and third[-1] == gr.update()
    assert "Finished" in last[0]


@pytest.mark.slow
def test_the_results_grid_starts_at_the_runs_own_size(services, jobs, dataset):
    assert jobs.start(tiny_config(dataset, epochs=1, resolution=64, sample_every_n_epochs=0,
                                  sample_width=0, sample_height=0, sample_steps=3)).wait(300)  # fmt: skip
    tab = built_tab(services, jobs)
    steps, sampler, cfg, width, height = tab.on_run_chosen("alice")
    assert (width, height, steps) == (64, 64, 3)
    assert tab.on_run_chosen("") == [gr.update()] * 5


def test_an_upload_must_come_from_the_upload_folder(services, tmp_path):
    tab = built_tab(services)
    outside = tmp_path / "secret.json"
    outside.write_text(json.dumps({"epochs": 9}), encoding="utf-8")
    refused = tab.config_file.preprocess({"name": str(outside), "data": None, "is_file": True})
    assert isinstance(refused, RefusedUpload)
    *values, message = tab.on_load_config(form_values(tab, TrainingConfig(), config_file=refused))
    assert "not uploaded through the file box" in message and values == [gr.update()] * len(FIELD_NAMES)

    uploaded = upload_folder() / "lct-test-upload" / "settings.json"
    uploaded.parent.mkdir(parents=True, exist_ok=True)
    uploaded.write_text(json.dumps({"epochs": 9}), encoding="utf-8")
    try:
        accepted = tab.config_file.preprocess({"name": str(uploaded), "data": None, "is_file": True})
        assert not isinstance(accepted, RefusedUpload)
        *values, message = tab.on_load_config(form_values(tab, TrainingConfig(), config_file=accepted))
        assert "Settings loaded." in message and values[FIELD_NAMES.index("epochs")] == 9
    finally:
        uploaded.unlink()
    assert isinstance(tab.kohya_file, UploadFile) and tab.kohya_file.get_block_name() == "file"


def test_the_readme_names_the_stop_button_the_tab_shows(services):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    tab = built_tab(services)
    assert f"**{tab.stop_button.value}**" in readme
    assert "WebUI's own **Interrupt** button, ends" not in readme  # not visible while the tab trains
