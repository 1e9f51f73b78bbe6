"""kohya's UNet blocks: per-block learning-rate weights and per-block ranks (sd-scripts ``networks/lora.py``).

SD1.5 has 25 blocks: IN00-IN11 (ldm ``input_blocks.N``), MID (``middle_block``), OUT00-OUT11
(``output_blocks.N``); kohya numbers them 0-24 in that order. ``down_lr_weight``/``up_lr_weight`` have 12
values (or a preset: ``sine``, ``cosine``, ``linear``, ``reverse_linear``, ``zeros``, each with an optional
``+offset`` such as ``sine+.5``), ``mid_lr_weight`` one; a module's learning rate is multiplied by its
block's weight, and a block whose weight is at or below ``block_lr_zero_threshold`` is not trained at all
(its modules are left out, as kohya does). ``block_dims``/``block_alphas`` (and ``conv_block_dims``/
``conv_block_alphas`` for 3x3 convolutions) give 25 ranks/alphas; a rank of 0 leaves the block out. Text
encoder modules have no block: they keep the network rank and learning rate.
"""

from __future__ import annotations

import math
import re

BLOCKS_PER_SIDE = 12
BLOCK_COUNT = 2 * BLOCKS_PER_SIDE + 1
MID_BLOCK = BLOCKS_PER_SIDE
LR_WEIGHT_PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")


def block_index(component: str, module_name: str) -> int:
    """kohya's block number (0-24) of a UNet module, -1 outside the blocks (and for the text encoder)."""
    if component != "unet":
        return -1
    match = re.match(r"(input_blocks|output_blocks)\.(\d+)\.", module_name)
    if match:
        number = int(match[2])
        return number if match[1] == "input_blocks" else MID_BLOCK + 1 + number
    return MID_BLOCK if module_name.startswith("middle_block.") else -1


def block_label(index: int) -> str:
    if index == MID_BLOCK:
        return "MID"
    if index < MID_BLOCK:
        return f"IN{index:02d}"
    return f"OUT{index - MID_BLOCK - 1:02d}"


def _numbers(text: str, what: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise ValueError(f"{what} must be numbers separated by commas, got {text!r}") from None


def lr_weight_list(text: str, what: str) -> list[float] | None:
    """12 weights from a comma list (padded with 1.0 as kohya does) or a preset name; None when empty."""
    text = text.strip()
    if not text:
        return None
    name, _, offset_text = text.partition("+")
    if name.strip() in LR_WEIGHT_PRESETS:
        try:
            offset = float(offset_text) if offset_text.strip() else 0.0
        except ValueError:
            raise ValueError(f"{what}: the offset after '+' must be a number, got {text!r}") from None
        return [value + offset for value in _preset(name.strip())]
    values = _numbers(text, what)
    if len(values) > BLOCKS_PER_SIDE:
        raise ValueError(f"{what} has {len(values)} values; give at most {BLOCKS_PER_SIDE}, one per block")
    if any(value < 0 or not math.isfinite(value) for value in values):
        raise ValueError(f"{what} must not hold negative or infinite weights, got {text!r}")
    return values + [1.0] * (BLOCKS_PER_SIDE - len(values))


def _preset(name: str) -> list[float]:
    last = BLOCKS_PER_SIDE - 1
    steps = list(range(BLOCKS_PER_SIDE))
    if name == "sine":
        return [math.sin(math.pi * (i / last) / 2) for i in steps]
    if name == "cosine":
        return [math.sin(math.pi * (i / last) / 2) for i in reversed(steps)]
    if name == "linear":
        return [i / last for i in steps]
    if name == "reverse_linear":
        return [i / last for i in reversed(steps)]
    return [0.0] * BLOCKS_PER_SIDE  # zeros


def block_lr_weights(down: str, mid: str, up: str) -> list[float] | None:
    """The 25 blocks' learning-rate weights, or None when no block weight is set."""
    down_weights = lr_weight_list(down, "down_lr_weight")
    up_weights = lr_weight_list(up, "up_lr_weight")
    mid_text = mid.strip()
    if down_weights is None and up_weights is None and not mid_text:
        return None
    mid_weight = 1.0
    if mid_text:
        values = _numbers(mid_text, "mid_lr_weight")
        if len(values) != 1 or values[0] < 0 or not math.isfinite(values[0]):
            raise ValueError(f"mid_lr_weight must be one number of at least 0, got {mid!r}")
        mid_weight = values[0]
    ones = [1.0] * BLOCKS_PER_SIDE
    return (down_weights or ones) + [mid_weight] + (up_weights or ones)


def block_values(text: str, what: str, *, integer: bool) -> list[float] | None:
    """25 per-block values (``block_dims`` and the like), or None when empty."""
    if not text.strip():
        return None
    values = _numbers(text, what)
    if len(values) != BLOCK_COUNT:
        raise ValueError(
            f"{what} needs {BLOCK_COUNT} values (IN00-IN11, MID, OUT00-OUT11), got {len(values)}"
        )
    if any(value < 0 or not math.isfinite(value) for value in values):
        raise ValueError(f"{what} must not hold negative or infinite values")
    if integer and any(not value.is_integer() for value in values):
        raise ValueError(f"{what} must be whole numbers (ranks)")
    return values
