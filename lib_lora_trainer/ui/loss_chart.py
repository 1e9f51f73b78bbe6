"""The loss chart of the Run section, drawn as inline SVG (no plotting library, no JavaScript).

Four series on one step axis: the loss of each step as read back (thin), its moving average (thick),
each epoch's mean loss (dots at the epoch's last step) and, when measured, each epoch's deterministic
validation loss (squares joined by a dashed line).
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

WIDTH, HEIGHT = 640, 240
MARGIN_LEFT, MARGIN_RIGHT, MARGIN_TOP, MARGIN_BOTTOM = 56, 16, 16, 36
DEFAULT_WINDOW = 20
RAW_COLOUR, AVERAGE_COLOUR, EPOCH_COLOUR = "#9db4d6", "#1f5fbf", "#d9480f"
VALIDATION_COLOUR = "#2b8a3e"


def moving_average(values: Sequence[float], window: int = DEFAULT_WINDOW) -> list[float]:
    """Mean of the last ``window`` values at each position (fewer at the start)."""
    averages, total = [], 0.0
    for index, value in enumerate(values):
        total += value
        if index >= window:
            total -= values[index - window]
        averages.append(total / min(index + 1, window))
    return averages


def _finite(points: Sequence[tuple[int, float]]) -> list[tuple[int, float]]:
    return [(step, value) for step, value in points if math.isfinite(value)]


def loss_chart_svg(
    step_losses: Sequence[tuple[int, float]],
    epoch_losses: Sequence[tuple[int, float]] = (),
    *,
    window: int = DEFAULT_WINDOW,
    total_steps: int | None = None,
    validation_losses: Sequence[tuple[int, float]] = (),
) -> str:
    """The chart as an ``<svg>`` element; ``epoch_losses`` and ``validation_losses`` are
    (last step of the epoch, loss)."""
    steps = _finite(step_losses)
    epochs = _finite(epoch_losses)
    validation = _finite(validation_losses)
    if not steps and not epochs and not validation:
        return (
            f'<svg class="lct-loss-chart" data-points="0" viewBox="0 0 {WIDTH} {HEIGHT}" '
            f'width="100%" role="img"><text x="{WIDTH / 2}" y="{HEIGHT / 2}" text-anchor="middle" '
            'fill="#888">The loss appears here once training has run a few steps.</text></svg>'
        )
    values = [v for _, v in steps] + [v for _, v in epochs] + [v for _, v in validation]
    low, high = min(values), max(values)
    if high - low < 1e-9:
        low, high = low - 0.5, high + 0.5
    last_step = max([s for s, _ in steps + epochs + validation] + [total_steps or 0, 1])

    def x(step: float) -> float:
        return MARGIN_LEFT + (WIDTH - MARGIN_LEFT - MARGIN_RIGHT) * step / last_step

    def y(value: float) -> float:
        return MARGIN_TOP + (HEIGHT - MARGIN_TOP - MARGIN_BOTTOM) * (high - value) / (high - low)

    def polyline(points: Sequence[tuple[float, float]], colour: str, width: float, name: str) -> str:
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
        return (
            f'<polyline class="lct-{name}" data-points="{len(points)}" points="{coords}" fill="none" '
            f'stroke="{colour}" stroke-width="{width}"/>'
        )

    parts = [
        f'<svg class="lct-loss-chart" data-points="{len(steps)}" data-epochs="{len(epochs)}" '
        f'data-validation="{len(validation)}" '
        f'viewBox="0 0 {WIDTH} {HEIGHT}" width="100%" role="img" aria-label="training loss">',
        f'<rect x="{MARGIN_LEFT}" y="{MARGIN_TOP}" width="{WIDTH - MARGIN_LEFT - MARGIN_RIGHT}" '
        f'height="{HEIGHT - MARGIN_TOP - MARGIN_BOTTOM}" fill="none" stroke="#8884"/>',
        _label(MARGIN_LEFT - 6, MARGIN_TOP + 4, f"{high:.4g}", "end"),
        _label(MARGIN_LEFT - 6, HEIGHT - MARGIN_BOTTOM, f"{low:.4g}", "end"),
        _label(MARGIN_LEFT, HEIGHT - MARGIN_BOTTOM + 16, "0", "middle"),
        _label(WIDTH - MARGIN_RIGHT, HEIGHT - MARGIN_BOTTOM + 16, f"step {last_step}", "end"),
    ]
    if steps:
        parts.append(polyline(steps, RAW_COLOUR, 1, "step-loss"))
        averaged = list(
            zip([s for s, _ in steps], moving_average([v for _, v in steps], window), strict=True)
        )
        parts.append(polyline(averaged, AVERAGE_COLOUR, 2.5, "average-loss"))
    for step, value in epochs:
        parts.append(
            f'<circle class="lct-epoch-loss" cx="{x(step):.1f}" cy="{y(value):.1f}" r="4" '
            f'fill="{EPOCH_COLOUR}"><title>epoch mean {value:.4f} at step {step}</title></circle>'
        )
    if validation:
        coords = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in validation)
        parts.append(
            f'<polyline class="lct-validation-line" points="{coords}" fill="none" '
            f'stroke="{VALIDATION_COLOUR}" stroke-width="1.5" stroke-dasharray="4 3"/>'
        )
    for step, value in validation:
        parts.append(
            f'<rect class="lct-validation-loss" x="{x(step) - 4:.1f}" y="{y(value) - 4:.1f}" width="8" '
            f'height="8" fill="{VALIDATION_COLOUR}"><title>validation loss {value:.4f} at step {step}'
            "</title></rect>"
        )
    parts.append(_legend(bool(validation)))
    parts.append("</svg>")
    return "".join(parts)


def _label(x: float, y: float, text: str, anchor: str) -> str:
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="11" text-anchor="{anchor}" fill="currentColor">'
        f"{html.escape(text)}</text>"
    )


def _legend(with_validation: bool = False) -> str:
    items = [(RAW_COLOUR, "loss per step"), (AVERAGE_COLOUR, "moving average"), (EPOCH_COLOUR, "epoch mean")]
    if with_validation:
        items.append((VALIDATION_COLOUR, "validation loss"))
    out, left = [], MARGIN_LEFT
    for colour, text in items:
        out.append(f'<rect x="{left}" y="{HEIGHT - 14}" width="10" height="10" fill="{colour}"/>')
        out.append(_label(left + 14, HEIGHT - 5, text, "start"))
        left += 130
    return "".join(out)
