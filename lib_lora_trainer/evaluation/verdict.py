"""Which epoch, which weight: a rule over the per-epoch score table, stated in one sentence.

The epoch: among the epochs whose prompt fidelity stays within ``fidelity_margin`` of the base model's
(the LoRA still lets prompts change clothing, setting and style), the earliest whose likeness is within
``likeness_margin`` of the best of them (later epochs that are not clearly more alike only add
overfitting). When no epoch keeps fidelity, the one that keeps most of it; when likeness could not be
measured (no face found), the lowest validation loss, else the last epoch.

The weight: in a strength sweep of that epoch, the lowest weight whose likeness is within the margin of
the sweep's best (a lower weight leaves more room for the prompt).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LIKENESS_MARGIN = 0.02
FIDELITY_MARGIN = 0.03


@dataclass(frozen=True)
class EpochScores:
    epoch: int
    likeness: float | None
    fidelity: float | None
    variety: float | None = None
    validation_loss: float | None = None
    subject_found_share: float = 1.0
    memorised: int = 0  # evaluation images nearly identical to a training image


@dataclass(frozen=True)
class Verdict:
    epoch: int | None
    rule: str  # one sentence for the UI
    weight: float = 1.0
    weight_rule: str = ""


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def choose_epoch(
    table: Sequence[EpochScores],
    baseline_fidelity: float | None,
    *,
    likeness_margin: float = LIKENESS_MARGIN,
    fidelity_margin: float = FIDELITY_MARGIN,
) -> Verdict:
    rows = sorted(table, key=lambda row: row.epoch)
    if not rows:
        return Verdict(None, "No epoch was scored.")
    measured = [row for row in rows if row.likeness is not None]
    if not measured:
        with_loss = [row for row in rows if row.validation_loss is not None]
        if with_loss:
            best = min(with_loss, key=lambda row: (row.validation_loss, row.epoch))
            return Verdict(
                best.epoch,
                f"Likeness could not be measured (no subject found in the images), so epoch {best.epoch} "
                f"is chosen for the lowest validation loss ({best.validation_loss:.4f}).",
            )
        return Verdict(
            rows[-1].epoch,
            f"Likeness could not be measured (no subject found in the images), so the last epoch "
            f"({rows[-1].epoch}) is suggested; compare the epochs by eye.",
        )
    floor = None if baseline_fidelity is None else baseline_fidelity - fidelity_margin
    keeping = [
        row for row in measured if floor is None or (row.fidelity is not None and row.fidelity >= floor)
    ]
    if not keeping:
        best = max(measured, key=lambda row: (row.fidelity if row.fidelity is not None else -1.0, -row.epoch))
        return Verdict(
            best.epoch,
            f"Every epoch lost prompt fidelity (more than {fidelity_margin:g} below the base model's "
            f"{_fmt(baseline_fidelity)}): epoch {best.epoch} keeps most of it ({_fmt(best.fidelity)}); "
            "the run is probably overtrained: lower the learning rate or the epochs.",
        )
    best_likeness = max(row.likeness for row in keeping if row.likeness is not None)
    chosen = next(row for row in keeping if row.likeness >= best_likeness - likeness_margin)
    among = (
        ""
        if baseline_fidelity is None
        else f" among the epochs whose prompt fidelity stays within {fidelity_margin:g} of the base model's "
        f"({baseline_fidelity:.3f})"
    )
    return Verdict(
        chosen.epoch,
        f"Epoch {chosen.epoch} is the earliest epoch whose likeness ({chosen.likeness:.3f}) is within "
        f"{likeness_margin:g} of the best ({best_likeness:.3f}){among}.",
    )


def choose_weight(
    sweep: dict[float, float | None], *, likeness_margin: float = LIKENESS_MARGIN
) -> tuple[float, str]:
    """The preferred weight from {weight: likeness} of one epoch, and the sentence saying why."""
    measured = {weight: value for weight, value in sweep.items() if value is not None}
    if not measured:
        return 1.0, "The weight sweep found no subject to compare; weight 1 is the default."
    best = max(measured.values())
    weight = min(w for w, value in measured.items() if value >= best - likeness_margin)
    return weight, (
        f"Weight {weight:g} is the lowest of {', '.join(f'{w:g}' for w in sorted(measured))} whose likeness "
        f"({measured[weight]:.3f}) is within {likeness_margin:g} of the best ({best:.3f})."
    )
