"""The verdict rule on hand-made score tables."""

from __future__ import annotations

from lib_lora_trainer.evaluation.verdict import EpochScores, choose_epoch, choose_weight

BASE_FIDELITY = 0.30


def table(likeness, fidelity, losses=None):
    losses = losses or [None] * len(likeness)
    return [
        EpochScores(epoch=i + 1, likeness=like, fidelity=fid, validation_loss=loss)
        for i, (like, fid, loss) in enumerate(zip(likeness, fidelity, losses, strict=True))
    ]


def test_a_monotone_run_gives_the_earliest_epoch_near_the_best_likeness():
    rows = table([0.40, 0.55, 0.62, 0.635, 0.64], [0.30, 0.30, 0.29, 0.29, 0.285])
    verdict = choose_epoch(rows, BASE_FIDELITY)
    assert verdict.epoch == 3  # 0.62 is within 0.02 of 0.64; epochs 4 and 5 add nothing clear
    assert "Epoch 3" in verdict.rule and verdict.rule.count(".") >= 1


def test_ties_go_to_the_earliest_epoch():
    rows = table([0.5, 0.6, 0.6, 0.6], [0.3] * 4)
    assert choose_epoch(rows, BASE_FIDELITY).epoch == 2


def test_an_overcooked_run_whose_prompt_fidelity_collapses_is_cut_before_the_collapse():
    rows = table([0.40, 0.55, 0.70, 0.80], [0.30, 0.29, 0.22, 0.15])
    verdict = choose_epoch(rows, BASE_FIDELITY)
    assert verdict.epoch == 2  # epochs 3 and 4 look more alike but no longer follow the prompts
    assert "prompt fidelity" in verdict.rule


def test_when_every_epoch_lost_fidelity_the_least_damaged_is_named_with_a_warning():
    rows = table([0.6, 0.7, 0.8], [0.25, 0.22, 0.18])
    verdict = choose_epoch(rows, BASE_FIDELITY)
    assert verdict.epoch == 1 and "overtrained" in verdict.rule


def test_no_face_found_falls_back_to_the_validation_loss_then_to_the_last_epoch():
    rows = table([None, None, None], [0.3, 0.3, 0.3], losses=[0.20, 0.15, 0.17])
    verdict = choose_epoch(rows, BASE_FIDELITY)
    assert verdict.epoch == 2 and "no subject found" in verdict.rule
    assert choose_epoch(table([None, None], [0.3, 0.3]), BASE_FIDELITY).epoch == 2
    assert choose_epoch([], BASE_FIDELITY).epoch is None


def test_without_a_baseline_fidelity_only_likeness_decides():
    rows = table([0.4, 0.6, 0.61], [None, None, None])
    assert choose_epoch(rows, None).epoch == 2


def test_the_weight_is_the_lowest_whose_likeness_stays_near_the_best():
    weight, rule = choose_weight({0.5: 0.40, 0.75: 0.59, 1.0: 0.60})
    assert weight == 0.75 and "0.75" in rule
    assert choose_weight({0.5: 0.6, 0.75: 0.6, 1.0: 0.6})[0] == 0.5
    assert choose_weight({0.5: None, 1.0: None})[0] == 1.0
