"""The whole path on the tiny model through the stand-alone app's services: train, score every epoch
automatically, write the scores and the recommendation; Stop and missing models leave everything intact."""

from __future__ import annotations

import html as html_module
import json
import time

import pytest

from lib_lora_trainer.evaluation.scoring import load_scores, scores_path
from lib_lora_trainer.outputs.registry import RunOutputs
from lib_lora_trainer.ui.actions import TabActions
from lib_lora_trainer.ui.scoring import ScoringPanel, scores_html, scoring_for
from tests.evaluation.fixtures import write_models_dir
from tests.ui.conftest import tiny_config

WAIT_S = 300
SCORING = dict(
    evaluation_near_prompts=["ohwx_alice, portrait"],
    evaluation_far_prompts=["pencil drawing of ohwx_alice"],
    evaluation_seeds=2,
    evaluation_steps=2,
    evaluation_size=64,
    sample_every_n_epochs=0,
)


def wait_for_scoring(scoring, run_name):
    deadline = time.time() + WAIT_S
    while time.time() < deadline:
        job = scoring.current()
        if job is not None and job.run.name == run_name and job.wait(1):
            return job.snapshot()
    raise AssertionError("scoring did not end")


def trained(jobs, dataset, **overrides):
    job = jobs.start(tiny_config(dataset, **SCORING, **overrides))
    assert job.wait(WAIT_S)
    assert job.snapshot().state == "completed", job.snapshot().message
    return job


@pytest.mark.slow
def test_training_scores_every_epoch_and_the_recommended_card_carries_the_weight(services, jobs, dataset):
    write_models_dir(services.scorer_dir)
    scoring = scoring_for(services, jobs)
    job = trained(jobs, dataset)
    snapshot = wait_for_scoring(scoring, job.run.name)
    assert snapshot.state == "completed", snapshot.message

    data = load_scores(job.run)
    assert [row["epoch"] for row in data["epochs"]] == [1, 2]
    assert data["scorer"] == "character" and "0 of 2" in data["scorer_reason"]  # discs: no faces
    assert data["baseline"]["fidelity"] is not None and data["baseline"]["likeness"] is not None
    for row in data["epochs"]:
        assert row["likeness"] is not None and row["fidelity_change"] is not None
        assert row["variety"] is not None and row["validation_loss"] is not None  # from training
    recommended = data["recommended"]
    assert recommended["epoch"] in (1, 2) and recommended["rule"]
    assert set(data["sweep"]) == {"0.5", "0.75", "1"}
    card = json.loads(job.run.metadata_path(recommended["epoch"]).read_text(encoding="utf-8"))
    assert card["preferred weight"] == recommended["weight"]
    assert "Recommended epoch" in card["notes"] and card["activation text"] == "ohwx_alice"
    other = 3 - recommended["epoch"]
    assert "Recommended" not in json.loads(job.run.metadata_path(other).read_text(encoding="utf-8"))["notes"]
    assert services.interrupt_event.is_set() is False

    html = scores_html(data)
    assert f'data-epoch="{recommended["epoch"]}"' in html and "lct-score-table" in html
    assert html_module.escape(recommended["rule"]) in html

    # "Compare in txt2img" starts from the recommended epoch, at its weight
    comparison = TabActions(services, jobs).comparison(job.run.name)
    assert comparison.stems[0] == recommended["stem"]
    assert f"<lora:{recommended['stem']}:{recommended['weight']:g}>" in comparison.prompt

    # the chart shows the validation loss beside the training loss
    from lib_lora_trainer.ui.views import chart_html

    assert 'data-validation="2"' in chart_html(job.snapshot())


@pytest.mark.slow
def test_stop_during_scoring_leaves_the_epochs_and_cards_intact(services, jobs, dataset):
    write_models_dir(services.scorer_dir)
    job = trained(jobs, dataset, evaluate_epochs=False, epochs=1)
    run: RunOutputs = job.run
    before = {path.name: path.read_bytes() for path in run.folder.iterdir()}
    scoring = scoring_for(services, jobs)
    scoring_job = scoring.start(run)
    deadline = time.time() + WAIT_S
    while scoring_job.snapshot().done < 1 and time.time() < deadline:
        time.sleep(0.05)
    assert "Stopping" in scoring.stop()
    assert scoring_job.wait(WAIT_S)
    assert scoring_job.snapshot().state == "stopped"
    assert not scores_path(run).exists()
    assert {path.name: path.read_bytes() for path in run.folder.iterdir()} == before
    assert "stopped" in scores_html(None, scoring_job.snapshot()).lower()

    # Score epochs from Results, on the finished run: the panel streams progress, then the table
    panel = ScoringPanel(services, jobs, lambda: run.folder)
    shown = list(panel.on_score(run.name))
    table, cards = shown[-1]
    assert "Recommended" in table and 'data-state="completed"' in table
    data = load_scores(run)
    assert [row["epoch"] for row in data["epochs"]] == [1]
    # the page is told once which card to fetch again: the recommended epoch's
    assert json.loads(cards) == {"job": scoring.current().task_id, "stems": [data["recommended"]["stem"]]}


@pytest.mark.slow
def test_a_missing_scoring_model_offline_lets_training_finish_and_says_what_to_do(services, jobs, dataset):
    scoring = scoring_for(services, jobs)  # no model in the scorer folder, downloads off
    job = trained(jobs, dataset, epochs=1)
    snapshot = wait_for_scoring(scoring, job.run.name)
    assert job.snapshot().state == "completed" and run_files(job.run)
    assert snapshot.state == "unavailable"
    assert "downloads are off" in snapshot.message and "huggingface.co" in snapshot.message
    assert not scores_path(job.run).exists()


def run_files(run: RunOutputs) -> list[str]:
    return [path.name for path in run.folder.iterdir() if path.name.endswith(".safetensors")]
