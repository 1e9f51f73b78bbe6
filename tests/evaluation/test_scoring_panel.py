"""The scoring part of the Results section: built into the real tab, and its HTML."""

from __future__ import annotations

import html

from lib_lora_trainer.ui.scoring import ScoringSnapshot, scores_html

DATA = {
    "run": "alice",
    "scorer": "face",
    "scorer_reason": "faces were found in 9 of 10 training images",
    "baseline": {"likeness": 0.21, "fidelity": 0.31, "variety": 0.4, "subject_found_share": 0.8},
    "epochs": [
        {"epoch": 1, "stem": "alice-000001", "likeness": 0.5, "fidelity_change": -0.01, "variety": 0.3,
         "validation_loss": 0.1234, "subject_found_share": 1.0, "memorised": 0},
        {"epoch": 2, "stem": "alice-000002", "likeness": 0.6, "fidelity_change": -0.08, "variety": 0.0,
         "validation_loss": 0.1111, "subject_found_share": 1.0, "memorised": 2},
    ],
    "recommended": {"epoch": 1, "stem": "alice-000001", "weight": 0.75, "rule": "Epoch 1 is the one.",
                    "weight_rule": "Weight 0.75 is the lowest."},
    "warnings": ["Epoch 2: the image for 'x' is nearly identical to training image a.png"],
    "notes": [],
}  # fmt: skip


def test_the_table_marks_the_recommended_epoch_and_states_the_rule():
    text = scores_html(DATA)
    assert '<tr data-epoch="1" class="lct-recommended">' in text
    assert "alice-000001 at weight 0.75" in text and "Epoch 1 is the one." in text
    assert "-0.080" in text and "0.1111" in text and html.escape("training image a.png") in text
    assert "base model" in text and "What the scores mean" in text


def test_no_scores_yet_and_a_running_job():
    assert "not been scored yet" in scores_html(None)
    running = scores_html(None, ScoringSnapshot("alice", "scoring", "Scoring alice: epoch 1", 3, 12))
    assert 'data-state="scoring"' in running and '<progress max="1" value="0.250">' in running


def test_the_real_tab_has_the_score_button_and_table(services, jobs):
    from lib_lora_trainer.ui.standalone import build_app

    app = build_app(services, jobs)
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"lct_score_epochs", "lct_stop_scoring", "lct_scores"} <= ids
    assert any(hook.__self__.__class__.__name__ == "EpochScoring" for hook in jobs.on_finished)
    build_app(services, jobs)  # a second page layout must not hook the scoring twice
    assert len(jobs.on_finished) == 1


def test_the_loss_chart_draws_the_validation_loss_beside_the_training_loss():
    from lib_lora_trainer.ui.loss_chart import loss_chart_svg

    steps = [(step, 0.5 - step / 100) for step in range(1, 21)]
    epochs = [(10, 0.42), (20, 0.34)]
    svg = loss_chart_svg(steps, epochs, validation_losses=[(10, 0.61), (20, float("nan"))])
    assert 'data-validation="1"' in svg and svg.count('class="lct-validation-loss"') == 1
    assert "validation loss 0.6100 at step 10" in svg and "validation loss</text>" in svg
    assert ">0.61<" in svg  # the axis grows to hold it
    plain = loss_chart_svg(steps, epochs)
    assert 'data-validation="0"' in plain and "lct-validation" not in plain
    only_validation = loss_chart_svg([], [], validation_losses=[(4, 0.2)])
    assert 'data-validation="1"' in only_validation


def test_a_run_name_that_is_a_path_is_refused(services, jobs, tmp_path):
    import gradio as gr

    from lib_lora_trainer.ui.scoring import ScoringPanel

    panel = ScoringPanel(services, jobs, lambda: tmp_path)
    ((shown, cards),) = list(panel.on_score("../../etc"))
    assert 'data-state="failed"' in shown and "must not contain" in shown
    assert cards == gr.update()  # no card to fetch again
    assert "not been scored yet" in list(panel.watch("../x"))[-1][0]


def test_the_epoch_list_shows_the_recommendation_as_a_short_badge(tmp_path):
    from lib_lora_trainer.ui.views import epochs_table

    notes = "epoch 1 of 2, 6 steps, loss 1.0451 | Recommended epoch of the run at weight 0.5: Epoch 1 is ..."
    shown = epochs_table([("alice-000001", notes), ("alice-000002", "epoch 2 of 2, 12 steps, loss 1.1570")])
    first, second = shown.split("</li>")[:2]
    assert 'class="lct-recommended"' in first and "recommended, weight 0.5</b>" in first
    assert "Epoch 1 is" not in first and "loss 1.0451" in first  # the reason stays beside the score table
    assert "lct-recommended" not in second and "loss 1.1570" in second
