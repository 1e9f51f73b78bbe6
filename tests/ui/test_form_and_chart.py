"""The training form covers every option and gives back exactly the config it shows; the loss chart
draws what it is given."""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import pytest

from lib_lora_trainer.config import ConfigError, TrainingConfig
from lib_lora_trainer.presets import GAME_CHARACTER, apply_preset
from lib_lora_trainer.ui.form import (
    FIELD_NAMES,
    FIELDS,
    NOT_IN_FORM,
    config_from_values,
    describe_fields_markdown,
    values_from_config,
)
from lib_lora_trainer.ui.loss_chart import loss_chart_svg, moving_average

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_config_field_has_exactly_one_form_field():
    config_fields = {f.name for f in dataclasses.fields(TrainingConfig)}
    assert set(FIELD_NAMES) == config_fields - set(NOT_IN_FORM)
    assert len(FIELD_NAMES) == len(set(FIELD_NAMES))
    assert len({spec.elem_id for spec in FIELDS}) == len(FIELDS)


def test_form_values_give_back_the_same_config():
    config = apply_preset(TrainingConfig(train_data_dir="/data/alice", trigger_word="ohwx"), GAME_CHARACTER)
    config = dataclasses.replace(config, sample_prompts=["ohwx, smiling", "ohwx, full body"], output_dir="/x")
    values = values_from_config(config)
    assert values[FIELD_NAMES.index("sample_prompts")] == "ohwx, smiling\nohwx, full body"
    assert config_from_values(values, base=config) == config


def test_form_values_are_converted_like_gradio_sends_them():
    values = values_from_config(TrainingConfig())
    values[FIELD_NAMES.index("epochs")] = 4.0  # gr.Number sends floats
    values[FIELD_NAMES.index("train_data_dir")] = "  /data/alice  "
    values[FIELD_NAMES.index("network_dim")] = None  # an emptied number box keeps the value
    config = config_from_values(values)
    assert config.epochs == 4 and isinstance(config.epochs, int)
    assert config.train_data_dir == "/data/alice"
    assert config.network_dim == TrainingConfig().network_dim

    values[FIELD_NAMES.index("epochs")] = 2.5
    with pytest.raises(ConfigError, match="epochs"):
        config_from_values(values)
    with pytest.raises(ValueError, match="form values"):
        config_from_values(values[:-1])


def test_the_readme_explains_every_option():
    text = README.read_text(encoding="utf-8")
    missing = [spec.label for spec in FIELDS if f"*{spec.label}*" not in text]
    assert not missing, f"README.md does not explain: {missing}"
    assert describe_fields_markdown().count("\n- ") == len(FIELDS)


def test_moving_average():
    assert moving_average([1.0, 3.0, 5.0, 7.0], window=2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([], window=3) == []


def _points(svg: str, name: str) -> list[tuple[float, float]]:
    match = re.search(rf'class="lct-{name}" data-points="(\d+)" points="([^"]*)"', svg)
    assert match, f"no {name} series"
    pairs = [tuple(map(float, pair.split(","))) for pair in match.group(2).split()]
    assert len(pairs) == int(match.group(1))
    return pairs


def test_loss_chart_draws_steps_average_and_epoch_means():
    losses = [(step, 1.0 / step) for step in range(1, 11)]
    svg = loss_chart_svg(losses, [(5, 0.4), (10, 0.15)], window=3, total_steps=20)
    raw, average = _points(svg, "step-loss"), _points(svg, "average-loss")
    assert len(raw) == len(average) == 10
    assert [x for x, _ in raw] == sorted(x for x, _ in raw)
    assert raw[0][1] < raw[-1][1]  # the highest loss is drawn highest (smaller y)
    assert svg.count('class="lct-epoch-loss"') == 2
    assert "step 20" in svg  # the axis spans the whole run, not just the steps so far


def test_loss_chart_without_data_or_with_non_finite_values():
    assert 'data-points="0"' in loss_chart_svg([])
    svg = loss_chart_svg([(1, 0.5), (2, math.nan), (3, math.inf), (4, 0.25)])
    assert len(_points(svg, "step-loss")) == 2
