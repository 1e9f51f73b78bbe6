"""File names of the epochs (sd-scripts' ``name-000001.safetensors``)."""

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
