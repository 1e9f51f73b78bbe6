"""What "Compare in txt2img" and "Render grid" need to sweep the epochs of a run with X/Y/Z plot.

* X = Prompt S/R over the epoch stems. X/Y/Z replaces the *first* value wherever it occurs in the
  prompt, so the prompt carries ``<lora:FIRST_STEM:w>`` and the first value is that stem; it must not
  occur anywhere else in the prompt.
* Y = Seed with a few random seeds.
* Z (optional) = LoRA weight, as a second Prompt S/R on ``:w>``: the prompt carries the first weight and
  the values are ``:0.6>, :0.8>, :1>``. The weight is written so that this text occurs only once.

Values are written the way X/Y/Z parses them (``csv.reader`` with ``skipinitialspace``, each value
stripped), so a value with a comma or quote is quoted. Axis indices differ between A1111 and Forge and
extensions may add options, so an axis is always found by its label (:func:`find_axis_index`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

PROMPT_SR_LABEL = "Prompt S/R"
SEED_LABEL = "Seed"
NOTHING_LABEL = "Nothing"
XYZ_SCRIPT_TITLE = "X/Y/Z plot"
DEFAULT_WEIGHTS = (0.6, 0.8, 1.0)
MAX_SEED = 4294967294  # A1111's random seeds are drawn below this


class ComparisonError(ValueError):
    """The comparison cannot be built as asked; the message says why."""


def xyz_values(values: Sequence[str]) -> str:
    """Values joined the way X/Y/Z's text field parses them back (quoted only where needed)."""
    fields = []
    for value in values:
        if not value or value != value.strip():
            raise ComparisonError(f"X/Y/Z strips spaces around values, so {value!r} cannot be used")
        needs_quotes = any(char in value for char in ',"\r\n')
        fields.append('"' + value.replace('"', '""') + '"' if needs_quotes else value)
    return ", ".join(fields)


def parse_xyz_values(text: str) -> list[str]:
    """The inverse of :func:`xyz_values`, exactly as ``scripts/xyz_grid.py`` splits a values field."""
    rows = csv.reader(io.StringIO(text), skipinitialspace=True)
    return [value.strip() for row in rows for value in row]


def format_weight(weight: float) -> str:
    return f"{weight:g}"


def random_seeds(count: int, rng_seed: int | None = None) -> list[int]:
    """``count`` distinct seeds in A1111's range; the same ``rng_seed`` gives the same seeds."""
    if count < 1:
        raise ComparisonError("the number of seeds must be at least 1")
    rng = random.Random(rng_seed)
    seeds: list[int] = []
    while len(seeds) < count:
        seed = rng.randrange(MAX_SEED)
        if seed not in seeds:
            seeds.append(seed)
    return seeds


@dataclass(frozen=True)
class EpochComparison:
    prompt: str
    negative_prompt: str
    stems: tuple[str, ...]
    seeds: tuple[int, ...]
    weight_tokens: tuple[str, ...] | None  # (":0.6>", ":0.8>", ":1>") when Z is used

    @property
    def x_values(self) -> str:
        return xyz_values(self.stems)

    @property
    def y_values(self) -> str:
        return ", ".join(str(seed) for seed in self.seeds)

    @property
    def z_values(self) -> str:
        return xyz_values(self.weight_tokens) if self.weight_tokens else ""


def _weight_token(weight: float, other_text: str) -> str:
    """``:0.6>``, or ``:0.60>`` etc. when ``:0.6>`` already appears in ``other_text``."""
    text = format_weight(weight)
    decimals = len(text.split(".", 1)[1]) if "." in text else 0
    for extra_zeros in range(6):
        digits = text if extra_zeros == 0 else f"{weight:.{decimals + extra_zeros}f}"
        token = f":{digits}>"
        if token not in other_text:
            return token
    raise ComparisonError(f"the prompt already contains the weight text for {weight}; remove other LoRAs")


def build_comparison(
    stems: Sequence[str],
    trigger_word: str,
    *,
    extra_prompt: str = "",
    negative_prompt: str = "",
    seed_count: int = 4,
    rng_seed: int | None = None,
    weight: float = 1.0,
    weights: Sequence[float] | None = None,
) -> EpochComparison:
    """The prompt and axis values for comparing ``stems`` (first epoch first).

    ``weight`` is the LoRA weight when no Z axis is wanted; ``weights`` (e.g. ``DEFAULT_WEIGHTS``)
    adds the Z axis and then the prompt carries ``weights[0]``.
    """
    ordered = tuple(dict.fromkeys(stem.strip() for stem in stems if stem.strip()))
    if not ordered:
        raise ComparisonError("there are no saved epochs to compare yet")
    if weights is not None:
        weights = list(dict.fromkeys(weights))
        if not weights:
            raise ComparisonError("give at least one LoRA weight for the weight axis")
    for stem in ordered:
        if any(char in stem for char in ":<>\r\n"):
            raise ComparisonError(f"epoch name {stem!r} contains a character a <lora:...> tag cannot hold")
    first = ordered[0]
    text = ", ".join(part.strip() for part in (trigger_word, extra_prompt) if part.strip())
    if first in text or first in negative_prompt:
        raise ComparisonError(f"{first!r} is already in the prompt text; X/Y/Z needs it only in the LoRA tag")

    tokens: tuple[str, ...] | None = None
    prompt_weight = weights[0] if weights else weight
    weight_token = _weight_token(prompt_weight, f"{text}\n{negative_prompt}")
    if weights:
        tokens = (weight_token,) + tuple(f":{format_weight(w)}>" for w in weights[1:])
    tag = f"<lora:{first}{weight_token}"
    prompt = f"{text} {tag}" if text else tag
    return EpochComparison(
        prompt=prompt,
        negative_prompt=negative_prompt.strip(),
        stems=ordered,
        seeds=tuple(random_seeds(seed_count, rng_seed)),
        weight_tokens=tokens,
    )


def _quote_infotext(value: str) -> str:
    """Quote an infotext value the way A1111's ``infotext_utils.quote`` does."""
    if "," not in value and "\n" not in value and ":" not in value:
        return value
    return json.dumps(value, ensure_ascii=False)


def to_infotext(
    comparison: EpochComparison,
    *,
    steps: int = 20,
    sampler: str = "Euler a",
    cfg_scale: float = 7.0,
    width: int = 512,
    height: int = 512,
) -> str:
    """Generation parameters text for A1111's paste-params ("Send to txt2img") mechanism.

    It fills the prompt, the sampling fields and the X/Y/Z plot script by label. ``Model hash`` and
    ``Lora hashes`` are left out on purpose: the first would switch the checkpoint, the second would
    rewrite the LoRA names through their aliases.
    """
    fields: list[tuple[str, Any]] = [
        ("Steps", steps),
        ("Sampler", sampler),
        ("CFG scale", format_weight(cfg_scale)),
        ("Seed", comparison.seeds[0]),
        ("Size", f"{width}x{height}"),
        ("Script", XYZ_SCRIPT_TITLE),
        ("X Type", PROMPT_SR_LABEL),
        ("X Values", comparison.x_values),
        ("Y Type", SEED_LABEL),
        ("Y Values", comparison.y_values),
    ]
    if comparison.weight_tokens:
        fields += [("Z Type", PROMPT_SR_LABEL), ("Z Values", comparison.z_values)]
    parameters = ", ".join(f"{key}: {_quote_infotext(str(value))}" for key, value in fields)
    lines = [comparison.prompt]
    if comparison.negative_prompt:
        lines.append(f"Negative prompt: {comparison.negative_prompt}")
    lines.append(parameters)
    return "\n".join(lines)


def find_axis_index(labels: Sequence[str], label: str) -> int:
    """Index of the X/Y/Z axis option called ``label`` (exact, else ignoring case and spaces)."""
    if label in labels:
        return list(labels).index(label)
    wanted = label.strip().casefold()
    for index, candidate in enumerate(labels):
        if candidate.strip().casefold() == wanted:
            return index
    message = f"X/Y/Z plot has no axis called {label!r} (it has: {', '.join(labels)})"
    logger.error(message)
    raise ComparisonError(message)


def xyz_script_args(comparison: EpochComparison, axis_labels: Sequence[str]) -> list[Any]:
    """The 18 X/Y/Z plot script arguments of A1111 v1.10.1 for rendering the grid server-side.

    ``axis_labels`` are the labels of the script's current axis options, in order.
    """
    prompt_sr = find_axis_index(axis_labels, PROMPT_SR_LABEL)
    seed = find_axis_index(axis_labels, SEED_LABEL)
    if comparison.weight_tokens:
        z_type, z_values = prompt_sr, comparison.z_values
    else:
        z_type, z_values = find_axis_index(axis_labels, NOTHING_LABEL), ""
    draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds = True, False, False, False
    vary_seeds_x = vary_seeds_y = vary_seeds_z = False
    margin_size, csv_mode = 0, False
    return [
        prompt_sr, comparison.x_values, [],
        seed, comparison.y_values, [],
        z_type, z_values, [],
        draw_legend, include_lone_images, include_sub_grids, no_fixed_seeds,
        vary_seeds_x, vary_seeds_y, vary_seeds_z, margin_size, csv_mode,
    ]  # fmt: skip
