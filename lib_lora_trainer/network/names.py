"""File names of the epochs and step files (sd-scripts' ``name-000001`` / ``name-step00000500``)."""

from __future__ import annotations

from lib_lora_trainer.config import output_name_problem


def epoch_file_name(output_name: str, epoch: int) -> str:
    """``name-000001.safetensors``: sd-scripts' epoch name, used for every epoch, the last one too."""
    _check(output_name, epoch, "epochs")
    return f"{output_name}-{epoch:06d}.safetensors"


def step_file_name(output_name: str, step: int) -> str:
    """``name-step00000500.safetensors``: sd-scripts' name for a file saved every N steps."""
    _check(output_name, step, "steps")
    return f"{output_name}-step{step:08d}.safetensors"


def _check(output_name: str, number: int, counted: str) -> None:
    problem = output_name_problem(output_name)
    if problem:
        raise ValueError(problem)
    if number < 1:
        raise ValueError(f"{counted} are counted from 1, got {number}")
