import csv
import io
import itertools
import json
import re

import pytest

from lib_lora_trainer.outputs.compare import (
    DEFAULT_WEIGHTS,
    MAX_SEED,
    ComparisonError,
    build_comparison,
    find_axis_index,
    parse_xyz_values,
    random_seeds,
    to_infotext,
    xyz_script_args,
    xyz_values,
)

# The first axis labels of X/Y/Z plot's txt2img list in A1111 v1.10.1, and Forge's (one more entry).
A1111_LABELS = [
    "Nothing",
    "Seed",
    "Var. seed",
    "Var. strength",
    "Steps",
    "Hires steps",
    "CFG Scale",
    "Prompt S/R",
]
FORGE_LABELS = A1111_LABELS[:7] + ["Distilled CFG Scale", "Prompt S/R"]
STEMS = ["alice-000001", "alice-000002", "alice-000003"]


def split_values(text: str) -> list[str]:
    """How X/Y/Z plot reads a values field: CSV, spaces after commas skipped, each value stripped."""
    return [value.strip() for row in csv.reader(io.StringIO(text), skipinitialspace=True) for value in row]


def prompt_sr(prompt: str, values: list[str], value: str) -> str:
    """X/Y/Z's Prompt S/R: the first value must be in the prompt and is replaced everywhere."""
    assert values[0] in prompt
    return prompt.replace(values[0], value)


def test_prompt_carries_the_first_epoch_and_x_sweeps_every_stem() -> None:
    comparison = build_comparison(STEMS, "alice_chr", extra_prompt="red scarf", rng_seed=1)
    assert comparison.prompt == "alice_chr, red scarf <lora:alice-000001:1>"
    xs = split_values(comparison.x_values)
    assert xs == STEMS
    cells = [prompt_sr(comparison.prompt, xs, x) for x in xs]
    assert cells == [f"alice_chr, red scarf <lora:{stem}:1>" for stem in STEMS]


def test_z_sweeps_the_weight_with_a_second_prompt_sr() -> None:
    comparison = build_comparison(STEMS, "alice_chr", weights=DEFAULT_WEIGHTS, rng_seed=1)
    assert comparison.prompt == "alice_chr <lora:alice-000001:0.6>"
    xs, zs = split_values(comparison.x_values), split_values(comparison.z_values)
    assert zs == [":0.6>", ":0.8>", ":1>"]
    x_cases = zip(xs, STEMS, strict=True)
    z_cases = zip(zs, ("0.6", "0.8", "1"), strict=True)
    for (x, stem), (z, weight) in itertools.product(x_cases, z_cases):
        cell = prompt_sr(prompt_sr(comparison.prompt, xs, x), zs, z)
        assert cell == f"alice_chr <lora:{stem}:{weight}>"


def test_the_weight_text_is_made_unique_when_another_lora_uses_it() -> None:
    comparison = build_comparison(
        STEMS, "alice_chr", extra_prompt="<lora:style:0.6>", weights=(0.6, 1.0), rng_seed=1
    )
    zs = split_values(comparison.z_values)
    assert zs[0] == ":0.60>"
    cell = prompt_sr(comparison.prompt, zs, zs[1])
    assert cell == "alice_chr, <lora:style:0.6> <lora:alice-000001:1>"


def test_values_that_need_quotes_survive_the_round_trip() -> None:
    values = ["odd,name-000001", 'quote"d-000002', "plain-000003"]
    text = xyz_values(values)
    assert split_values(text) == values == parse_xyz_values(text)
    assert xyz_values(["a", "b"]) == "a, b"
    with pytest.raises(ComparisonError):
        xyz_values([" padded"])


def test_names_that_would_confuse_prompt_sr_are_refused() -> None:
    with pytest.raises(ComparisonError, match="no saved epochs"):
        build_comparison([], "alice")
    with pytest.raises(ComparisonError, match="already in the prompt"):
        build_comparison(STEMS, "alice-000001")
    with pytest.raises(ComparisonError, match="already in the prompt"):
        build_comparison(STEMS, "alice", negative_prompt="alice-000001")
    with pytest.raises(ComparisonError, match="cannot hold"):
        build_comparison(["bad:name"], "alice")


def test_a_stem_that_is_part_of_another_still_sweeps_correctly() -> None:
    comparison = build_comparison(["a-1", "a-12", "xa-1"], "alice", rng_seed=2)
    xs = split_values(comparison.x_values)
    cells = [prompt_sr(comparison.prompt, xs, x) for x in xs]
    assert cells == ["alice <lora:a-1:1>", "alice <lora:a-12:1>", "alice <lora:xa-1:1>"]


def test_duplicate_stems_are_listed_once_in_order() -> None:
    comparison = build_comparison(["b-000002", "b-000001", "b-000002"], "bob", rng_seed=3)
    assert comparison.stems == ("b-000002", "b-000001")


def test_seeds_are_distinct_repeatable_and_in_a1111_range() -> None:
    seeds = random_seeds(8, rng_seed=42)
    assert len(set(seeds)) == 8
    assert seeds == random_seeds(8, rng_seed=42)
    assert all(0 <= seed < MAX_SEED for seed in seeds)
    comparison = build_comparison(STEMS, "alice", seed_count=3, rng_seed=42)
    assert [int(value) for value in split_values(comparison.y_values)] == list(comparison.seeds)
    assert list(comparison.seeds) == random_seeds(3, rng_seed=42)
    with pytest.raises(ComparisonError):
        random_seeds(0)


def parse_parameters_line(line: str) -> dict[str, str]:
    """Read 'Key: value, Key: "quoted, value"' pairs (values quoted as JSON strings)."""
    pairs = re.findall(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', line)
    return {key: json.loads(value) if value.startswith('"') else value for key, value in pairs}


def test_infotext_fills_prompt_sampling_and_the_xyz_script_by_label() -> None:
    comparison = build_comparison(
        STEMS, "alice_chr", negative_prompt="lowres, blurry", weights=DEFAULT_WEIGHTS, rng_seed=7
    )
    text = to_infotext(comparison, steps=25, sampler="DPM++ 2M", cfg_scale=6.5, width=512, height=768)
    prompt, negative, parameters = text.split("\n")
    assert prompt == comparison.prompt
    assert negative == "Negative prompt: lowres, blurry"
    fields = parse_parameters_line(parameters)
    assert fields == {
        "Steps": "25",
        "Sampler": "DPM++ 2M",
        "CFG scale": "6.5",
        "Seed": str(comparison.seeds[0]),
        "Size": "512x768",
        "Script": "X/Y/Z plot",
        "X Type": "Prompt S/R",
        "X Values": comparison.x_values,
        "Y Type": "Seed",
        "Y Values": comparison.y_values,
        "Z Type": "Prompt S/R",
        "Z Values": comparison.z_values,
    }
    assert "Lora hashes" not in text and "Model hash" not in text


def test_infotext_without_weight_axis_or_negative_prompt() -> None:
    comparison = build_comparison(STEMS, "alice_chr", rng_seed=7)
    lines = to_infotext(comparison).split("\n")
    assert len(lines) == 2
    assert "Z Type" not in parse_parameters_line(lines[1])


def test_axis_is_found_by_label_wherever_it_is() -> None:
    assert find_axis_index(A1111_LABELS, "Prompt S/R") == 7
    assert find_axis_index(FORGE_LABELS, "Prompt S/R") == 8
    assert find_axis_index(A1111_LABELS, "  prompt s/r ") == 7
    with pytest.raises(ComparisonError, match="Nothing, Seed"):
        find_axis_index(A1111_LABELS, "LoRA weight")


def test_script_args_for_rendering_the_grid_server_side() -> None:
    comparison = build_comparison(STEMS, "alice_chr", weights=DEFAULT_WEIGHTS, rng_seed=5)
    args = xyz_script_args(comparison, FORGE_LABELS)
    assert len(args) == 18
    assert args[0:3] == [8, comparison.x_values, []]
    assert args[3:6] == [1, comparison.y_values, []]
    assert args[6:9] == [8, comparison.z_values, []]
    assert args[9] is True  # legend
    plain = xyz_script_args(build_comparison(STEMS, "alice_chr", rng_seed=5), A1111_LABELS)
    assert plain[0] == 7 and plain[6:9] == [0, "", []]
