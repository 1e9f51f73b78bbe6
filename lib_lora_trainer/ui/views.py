"""HTML and gallery contents the tab shows (pure functions of the job and file state)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

from lib_lora_trainer.evaluation.scoring import split_recommendation
from lib_lora_trainer.ui.jobs import JobSnapshot
from lib_lora_trainer.ui.loss_chart import loss_chart_svg

STATE_LABELS = {
    "queued": "Waiting for the GPU",
    "preparing": "Preparing",
    "training": "Training",
    "sampling": "Rendering samples",
    "completed": "Finished",
    "interrupted": "Stopped",
    "stopped_nonfinite_loss": "Stopped: the loss diverged",
    "failed": "Failed",
}


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "–"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def status_html(snapshot: JobSnapshot | None) -> str:
    """Progress bar, step, epoch, ETA and last loss of the job (or a hint when there is none)."""
    if snapshot is None:
        return '<div class="lct-status" data-state="idle">No training has run since the WebUI started.</div>'
    if snapshot.phase:  # preparing: the phase's own progress, not the steps'
        fraction = snapshot.phase_done / snapshot.phase_total if snapshot.phase_total else 0.0
    else:
        fraction = snapshot.step / snapshot.total_steps if snapshot.total_steps else 0.0
    loss = f"{snapshot.last_loss:.4f}" if snapshot.last_loss is not None else "–"
    label = STATE_LABELS.get(snapshot.state, snapshot.state)
    facts = [
        ("Run", snapshot.run_name),
        ("Step", f"{snapshot.step} / {snapshot.total_steps or '?'}"),
        ("Epoch", f"{snapshot.epoch} / {snapshot.epochs}"),
        ("Elapsed", format_duration(snapshot.elapsed_s)),
        ("ETA", format_duration(snapshot.eta_s)),
        ("Loss", loss),
    ]
    cells = "".join(
        f'<span class="lct-fact" data-fact="{name.lower()}"><b>{name}</b> {html.escape(str(value))}</span>'
        for name, value in facts
    )
    return (
        f'<div class="lct-status" data-state="{html.escape(snapshot.state)}" data-step="{snapshot.step}" '
        f'data-total="{snapshot.total_steps}" data-phase="{html.escape(snapshot.phase)}">'
        f'<div class="lct-state">{html.escape(label)}: {html.escape(snapshot.message)}</div>'
        f'<progress class="lct-progress" max="1" value="{fraction:.4f}"></progress>'
        f'<div class="lct-facts">{cells}</div></div>'
    )


def chart_html(snapshot: JobSnapshot | None) -> str:
    if snapshot is None:
        return loss_chart_svg([])
    epochs = [(result.step, result.mean_loss) for result in snapshot.epoch_results]
    validation = [
        (r.step, r.validation_loss) for r in snapshot.epoch_results if r.validation_loss is not None
    ]
    return loss_chart_svg(
        snapshot.losses, epochs, total_steps=snapshot.total_steps, validation_losses=validation
    )


def samples_gallery(snapshot: JobSnapshot | None) -> list[tuple[str, str]]:
    """Every sample of the run so far, newest epoch first, captioned with its epoch file."""
    if snapshot is None:
        return []
    items = []
    for result in reversed(snapshot.epoch_results):
        items += [(str(path), f"{result.stem} ({index + 1})") for index, path in enumerate(result.samples)]
    return items


def log_text(snapshot: JobSnapshot | None) -> str:
    return "\n".join(snapshot.log) if snapshot else ""


def epochs_table(rows: Sequence[tuple[str, str]]) -> str:
    """An HTML list of a run's epochs: (file stem, notes); the scored recommendation as a short badge
    (its reason is beside the score table)."""
    if not rows:
        return '<div class="lct-epochs" data-count="0">No saved epochs yet.</div>'
    items = []
    for stem, notes in rows:
        text, weight = split_recommendation(notes)
        badge, marker = "", ""
        if weight is not None:
            badge = f' <b class="lct-recommended-badge">recommended, weight {html.escape(weight)}</b>'
            marker = ' class="lct-recommended"'
        items.append(
            f'<li data-stem="{html.escape(stem)}"{marker}><code>{html.escape(stem)}</code> '
            f"{html.escape(text)}{badge}</li>"
        )
    return f'<ol class="lct-epochs" data-count="{len(rows)}">{"".join(items)}</ol>'


def caption_gallery(items: Sequence[tuple[Path, str]], max_caption: int = 80) -> list[tuple[str, str]]:
    out = []
    for image, caption in items:
        text = caption if len(caption) <= max_caption else caption[: max_caption - 1] + "…"
        out.append((str(image), f"{image.name}: {text or '(no caption)'}"))
    return out
