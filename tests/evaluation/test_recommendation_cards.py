"""The recommendation in the Lora cards: written into the chosen epoch's card, taken out of the card an
earlier scoring chose, and the user's own card edits kept."""

from __future__ import annotations

import json

from lib_lora_trainer.evaluation.scoring import RunScores, write_results
from lib_lora_trainer.evaluation.verdict import EpochScores, Verdict
from lib_lora_trainer.outputs.registry import RunOutputs


def make_run(tmp_path, epochs=3) -> RunOutputs:
    run = RunOutputs("alice", tmp_path)
    for epoch in range(1, epochs + 1):
        run.model_path(epoch).write_bytes(b"model")
        card = {"activation text": "ohwx_alice", "preferred weight": 1.0, "notes": f"epoch {epoch}, 10 steps"}
        run.metadata_path(epoch).write_text(json.dumps(card), encoding="utf-8")
    return run


def scores(epoch: int, weight: float) -> RunScores:
    rows = [EpochScores(epoch=e, likeness=0.5, fidelity=0.3) for e in (1, 2, 3)]
    verdict = Verdict(epoch, f"Epoch {epoch} is the earliest close to the best likeness.", weight)
    return RunScores("alice", "character", "test", [], [1], EpochScores(0, 0.1, 0.3), rows, verdict)


def card(run: RunOutputs, epoch: int) -> dict:
    return json.loads(run.metadata_path(epoch).read_text(encoding="utf-8"))


def test_the_chosen_card_gets_the_weight_and_only_its_stem_is_reported(tmp_path):
    run = make_run(tmp_path)
    untouched = run.metadata_path(3).read_bytes()
    assert write_results(run, scores(2, 0.75)) == ["alice-000002"]
    assert card(run, 2)["preferred weight"] == 0.75
    assert card(run, 2)["notes"].startswith("epoch 2, 10 steps | Recommended epoch of the run at weight 0.75")
    assert card(run, 2)["activation text"] == "ohwx_alice"
    assert run.metadata_path(3).read_bytes() == untouched  # a card without a recommendation is not rewritten


def test_scoring_again_moves_the_recommendation_and_clears_the_old_card(tmp_path):
    run = make_run(tmp_path)
    write_results(run, scores(2, 0.75))
    changed = write_results(run, scores(3, 1.0))
    assert sorted(changed) == ["alice-000002", "alice-000003"]
    assert card(run, 2) == {
        "activation text": "ohwx_alice",
        "preferred weight": 1.0,
        "notes": "epoch 2, 10 steps",
    }
    assert "Recommended" in card(run, 3)["notes"]
    # the same verdict once more: the note is replaced, not appended
    write_results(run, scores(3, 1.0))
    assert card(run, 3)["notes"].count("Recommended") == 1


def test_a_weight_the_user_changed_after_the_recommendation_is_kept(tmp_path):
    run = make_run(tmp_path)
    write_results(run, scores(1, 0.5))
    edited = card(run, 1) | {"preferred weight": 0.65, "description": "mine"}
    run.metadata_path(1).write_text(json.dumps(edited), encoding="utf-8")
    write_results(run, scores(2, 1.0))
    assert card(run, 1)["preferred weight"] == 0.65 and card(run, 1)["description"] == "mine"
    assert "Recommended" not in card(run, 1)["notes"]


def test_no_recommended_epoch_clears_every_card_and_a_broken_card_is_skipped(tmp_path):
    run = make_run(tmp_path)
    write_results(run, scores(1, 0.5))
    run.metadata_path(2).write_text("{not json", encoding="utf-8")
    assert write_results(run, scores(None, 1.0)) == ["alice-000001"]
    assert card(run, 1)["preferred weight"] == 1.0 and "Recommended" not in card(run, 1)["notes"]
    assert run.metadata_path(2).read_text(encoding="utf-8") == "{not json"
