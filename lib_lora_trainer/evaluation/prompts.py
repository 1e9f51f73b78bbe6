"""The evaluation prompt set of a run: near prompts (like the captions) and far ones (new clothing,
setting and style), each rendered with the same seeds for every epoch and for the base model."""

from __future__ import annotations

import re
from dataclasses import dataclass

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.outputs.samples import SampleRequest, lora_tag

NEAR_FRAMINGS = ("portrait, looking at viewer", "upper body", "full body, standing")
FAR_TEMPLATES = (
    "{subject} as an astronaut on the moon",
    "pencil drawing of {subject}",
    "{subject} in a kimono at a temple",
)
TRIGGER_PLACEHOLDER = "trigger"  # in a far prompt typed by the user, the word that stands for the character
EVALUATION_SEED = 1000  # the first seed; the n-th seed of every prompt is EVALUATION_SEED + n


@dataclass(frozen=True)
class EvaluationPrompt:
    text: str  # without any <lora:...> tag
    kind: str  # "near" or "far"


def subject(config: TrainingConfig) -> str:
    """How a prompt calls the character: the trigger word with the class word."""
    parts = [part.strip() for part in (config.trigger_word, config.class_token) if part.strip()]
    return " ".join(parts) or "a person"


def evaluation_prompts(config: TrainingConfig) -> list[EvaluationPrompt]:
    near = [p.strip() for p in config.evaluation_near_prompts if p.strip()] or [
        f"{subject(config)}, {framing}" for framing in NEAR_FRAMINGS
    ]
    far = [_with_subject(p.strip(), config) for p in config.evaluation_far_prompts if p.strip()] or [
        template.format(subject=subject(config)) for template in FAR_TEMPLATES
    ]
    return [EvaluationPrompt(text, "near") for text in near] + [EvaluationPrompt(text, "far") for text in far]


def _with_subject(prompt: str, config: TrainingConfig) -> str:
    """A far prompt written with the placeholder word gets the real trigger word in its place."""
    trigger = config.trigger_word.strip()
    if trigger and trigger not in prompt:
        return re.sub(rf"\b{TRIGGER_PLACEHOLDER}\b", subject(config), prompt)
    return prompt


def seeds(config: TrainingConfig) -> list[int]:
    return [EVALUATION_SEED + index for index in range(config.evaluation_seeds)]


def evaluation_requests(
    config: TrainingConfig, prompts: list[EvaluationPrompt], stem: str | None, weight: float = 1.0
) -> list[SampleRequest]:
    """Every prompt x seed, prompt-major; ``stem`` None renders the base model (the baseline)."""
    size = config.evaluation_size or config.resolution
    tag = f" {lora_tag(stem, weight)}" if stem else ""
    return [
        SampleRequest(
            prompt=f"{prompt.text}{tag}",
            negative_prompt=config.sample_negative_prompt.strip(),
            seed=seed,
            steps=config.evaluation_steps,
            sampler=config.sample_sampler,
            cfg_scale=config.sample_cfg_scale,
            width=size,
            height=size,
        )
        for prompt in prompts
        for seed in seeds(config)
    ]
