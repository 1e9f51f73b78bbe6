"""File names of the epochs and step files (sd-scripts' ``name-000001`` / ``name-step00000500``)."""

from __future__ import annotations

from lib_lora_trainer.config import output_name_problem


def epoch_file_name(output_name: str, epoch: int) -> str:
    """``name-000001.safetensors``: sd-scripts' epoch name, used for every epoch, the last one too."""
    problem = output_name_problem(output_name)
    if problem:
        raise ValueError(problem)
    if epoch < 1:
        raise ValueError(f"epochs are counted from 1, got {epoch}")
    return f"{output_name}-{epoch:06d}.safetensors"


def step_file_name(output_name: str, step: int) -> str:
    """``name-step00000500.safetensors``: sd-scripts' name for a file saved every N steps."""
    problem = output_name_problem(output_name)
    if problem:
        raise ValueError(problem)
    if step < 1:
        raise ValueError(f"steps are counted from 1, got {step}")
    return f"{output_name}-step{step:08d}.safetensors"
