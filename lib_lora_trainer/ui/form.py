"""Every training option as a form field: label, kind, section and a one-line explanation.

The tab builds its inputs from :data:`FIELDS` and turns the submitted values back into a
:class:`~lib_lora_trainer.config.TrainingConfig` with :func:`config_from_values`, so no option can be
forgotten on the way (a test checks that every config field but ``output_dir`` has a form field).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lib_lora_trainer.config import (
    DATASET_LAYOUTS,
    EVALUATION_SCORERS,
    GRADIENT_CHECKPOINTING,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    NETWORK_TYPES,
    OPTIMIZERS,
    PARAMETERIZATIONS,
    SAVE_PRECISIONS,
    TrainingConfig,
)
from lib_lora_trainer.dataset.crop import CROP_MODES

# Where each field appears in the tab.
DATASET, CAPTIONS, BASIC, ADVANCED, SAMPLES = "dataset", "captions", "basic", "advanced", "samples"
NOT_IN_FORM = ("output_dir",)  # always the Lora folder (+ subfolder from settings), never typed


@dataclass(frozen=True)
class FieldSpec:
    name: str  # the TrainingConfig field
    label: str
    kind: str  # text, textarea, int, float, bool, choice
    section: str
    info: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None
    maximum: float | None = None

    @property
    def elem_id(self) -> str:
        return f"lct_{self.name}"


def _f(name: str, label: str, kind: str, section: str, info: str = "", **extra: Any) -> FieldSpec:
    return FieldSpec(name, label, kind, section, info, **extra)


FIELDS: tuple[FieldSpec, ...] = (
    # --- dataset ----------------------------------------------------------------------------------
    _f("train_data_dir", "Training images folder", "text", DATASET,
       "The folder with your photos (and their .txt captions)."),
    _f("dataset_layout", "Folder layout", "choice", DATASET,
       "flat: the images are directly in the folder; kohya: N_name subfolders (N = repeats).",
       choices=DATASET_LAYOUTS),
    _f("flat_repeats", "Repeats", "int", DATASET,
       "How often each image is seen per epoch (flat layout; kohya folders carry their own N).", minimum=1),
    _f("reg_data_dir", "Regularisation images folder (optional)", "text", DATASET,
       "Generic pictures of the class (e.g. other women) that keep the model from forgetting it."),
    _f("class_token", "Class word", "text", DATASET,
       "What the character is (woman, man, girl ...): the caption of an image without one."),
    _f("crop_mode", "Crop", "choice", DATASET,
       "How an image is cut to its bucket: around the centre, or around the detected face.",
       choices=CROP_MODES),
    # --- captions ---------------------------------------------------------------------------------
    _f("trigger_word", "Trigger word", "text", CAPTIONS,
       "A rare word (e.g. ohwx_alice) put first in every caption; you type it to call the character."),
    _f("caption_extension", "Caption file extension", "text", CAPTIONS,
       "The captions' file type beside each image.", ),
    # --- training: basic --------------------------------------------------------------------------
    _f("output_name", "LoRA name", "text", BASIC,
       "File name of the epochs: NAME-000001.safetensors ... (letters, digits, _ . -)."),
    _f("network_type", "Network", "choice", BASIC,
       "lora: attention layers; locon: also the convolutions (more detail, bigger file).",
       choices=NETWORK_TYPES),
    _f("network_dim", "Rank (dim)", "int", BASIC, "Capacity of the LoRA: 16-32 for a face, up to 128.",
       minimum=1),
    _f("network_alpha", "Alpha", "float", BASIC,
       "Scales the learned change by alpha / rank; half the rank is common.", minimum=0),
    _f("conv_dim", "Conv rank (LoCon)", "int", BASIC,
       "Rank of the 3x3 convolutions (LoCon only).", minimum=1),
    _f("conv_alpha", "Conv alpha (LoCon)", "float", BASIC, "Alpha of the 3x3 convolutions.", minimum=0),
    _f("epochs", "Epochs", "int", BASIC, "Passes over the dataset; an epoch file is saved after each.",
       minimum=1),
    _f("batch_size", "Batch size", "int", BASIC, "Images per step; more needs more GPU memory.", minimum=1),
    _f("resolution", "Resolution", "int", BASIC, "Training size in pixels: 512 for SD1.5, 768 for detail.",
       minimum=64),
    _f("unet_lr", "UNet learning rate", "float", BASIC, "How fast the image model learns (1e-4 to 3e-4).",
       minimum=0),
    _f("text_encoder_lr", "Text encoder learning rate", "float", BASIC,
       "How fast the prompt model learns; usually half the UNet rate.", minimum=0),
    _f("train_text_encoder", "Train the text encoder", "bool", BASIC,
       "Also adapt the prompt model: ties the trigger word more strongly."),
    _f("optimizer", "Optimizer", "choice", BASIC, "AdamW is the safe default; Adafactor saves memory.",
       choices=OPTIMIZERS),
    _f("lr_scheduler", "LR schedule", "choice", BASIC, "How the learning rate changes over the run.",
       choices=LR_SCHEDULERS),
    _f("lr_scheduler_num_cycles", "Restarts (cycles)", "int", BASIC,
       "Cycles of cosine_with_restarts.", minimum=1),
    _f("lr_warmup_steps", "Warmup steps", "float", BASIC,
       "Steps with a rising learning rate at the start (a value below 1 is a fraction of all steps).",
       minimum=0),
    _f("save_every_n_epochs", "Save every N epochs", "int", BASIC, "The last epoch is always saved.",
       minimum=1),
    _f("flip_aug", "Flip images", "bool", BASIC,
       "Mirror images at random (not for asymmetric characters: hair parting, logos)."),
    _f("color_aug", "Colour augmentation", "bool", BASIC,
       "Small random hue changes (slower: no latent cache)."),
    # --- samples ----------------------------------------------------------------------------------
    _f("sample_every_n_epochs", "Samples every N epochs", "int", SAMPLES,
       "Render the sample prompts after every N epochs (0 = never); the last epoch always gets samples.",
       minimum=0),
    _f("sample_prompts", "Sample prompts (one per line)", "textarea", SAMPLES,
       "Empty: the trigger word alone, as a portrait and full body. <lora:...> is added for you."),
    _f("sample_negative_prompt", "Sample negative prompt", "text", SAMPLES, ""),
    _f("sample_steps", "Sample steps", "int", SAMPLES, "", minimum=1),
    _f("sample_sampler", "Sample sampler", "text", SAMPLES,
       "A sampler name as txt2img lists it (Euler a ...)."),
    _f("sample_cfg_scale", "Sample CFG scale", "float", SAMPLES, "", minimum=0),
    _f("sample_seed", "Sample seed", "int", SAMPLES, "The first prompt's seed; the next prompts count up."),
    _f("sample_width", "Sample width", "int", SAMPLES, "0 = the training resolution.", minimum=0),
    _f("sample_height", "Sample height", "int", SAMPLES, "0 = the training resolution.", minimum=0),
    # --- samples: epoch scoring and validation loss ------------------------------------------------
    _f("evaluate_epochs", "Score every epoch after training", "bool", SAMPLES,
       "Render the evaluation prompts for each epoch and the base model, score likeness, prompt fidelity "
       "and variety, and recommend an epoch and a weight (needs the scoring models; training is "
       "unaffected)."),
    _f("evaluation_scorer", "Likeness scorer", "choice", SAMPLES,
       "auto: the face model when most training images show a face, else the drawn-character model.",
       choices=EVALUATION_SCORERS),
    _f("evaluation_near_prompts", "Evaluation prompts close to the captions (one per line)", "textarea",
       SAMPLES, "Empty: trigger word + class word as a portrait, upper body and full body."),
    _f("evaluation_far_prompts", "Evaluation prompts far from the captions (one per line)", "textarea",
       SAMPLES, "Empty: as an astronaut on the moon, a pencil drawing, in a kimono at a temple. Write the "
       "trigger word where the character goes."),
    _f("evaluation_seeds", "Evaluation seeds", "int", SAMPLES,
       "Images per prompt and epoch (2-4 is enough: see the README's measured spread).", minimum=1,
       maximum=16),
    _f("evaluation_steps", "Evaluation steps", "int", SAMPLES, "Sampling steps of each evaluation image.",
       minimum=1),
    _f("evaluation_size", "Evaluation size", "int", SAMPLES, "Side of the evaluation images (0 = training "
       "resolution).", minimum=0),
    _f("validation_loss", "Validation loss", "bool", SAMPLES,
       "After every epoch, a loss with fixed noise, timesteps and captions (comparable epoch to epoch)."),
    _f("validation_dir", "Held-out images folder (optional)", "text", SAMPLES,
       "Images kept out of training for the validation loss; empty: a fixed few of the training images."),
    # --- training: advanced -----------------------------------------------------------------------
    _f("save_precision", "Save precision", "choice", ADVANCED,
       "fp16 halves the file size at no visible cost.",
       choices=SAVE_PRECISIONS),
    _f("training_comment", "Comment", "text", ADVANCED, "Stored in the file's metadata."),
    _f("prior_loss_weight", "Prior loss weight", "float", ADVANCED, "Weight of regularisation images.",
       minimum=0),
    _f("enable_bucket", "Aspect-ratio buckets", "bool", ADVANCED,
       "Train each image at its own aspect ratio instead of a square crop."),
    _f("min_bucket_reso", "Smallest bucket side", "int", ADVANCED, "", minimum=64),
    _f("max_bucket_reso", "Largest bucket side", "int", ADVANCED, "", minimum=64),
    _f("bucket_no_upscale", "Never upscale into a bucket", "bool", ADVANCED,
       "Small images get a smaller bucket instead of being enlarged."),
    _f("shuffle_caption", "Shuffle tags", "bool", ADVANCED, "Shuffle the caption's tags each time."),
    _f("keep_tokens", "Keep first N tags", "int", ADVANCED,
       "Tags kept in place when shuffling (1 keeps the trigger word first).", minimum=0),
    _f("caption_dropout_rate", "Caption dropout", "float", ADVANCED,
       "Share of steps trained with an empty caption.", minimum=0, maximum=1),
    _f("caption_tag_dropout_rate", "Tag dropout", "float", ADVANCED,
       "Chance to drop each tag (not the kept ones).", minimum=0, maximum=1),
    _f("cache_latents", "Cache latents", "bool", ADVANCED,
       "Encode each image once (faster; off with colour augmentation)."),
    _f("cache_latents_to_disk", "Cache latents on disk", "bool", ADVANCED,
       "Keep the encoded images between runs on the same dataset."),
    _f("network_weights", "Continue from a LoRA file", "text", ADVANCED,
       "Start from an existing kohya LoRA (its rank and layers are used)."),
    _f("weight_decay", "Weight decay", "float", ADVANCED, "", minimum=0),
    _f("adafactor_relative_step", "Adafactor picks its own LR", "bool", ADVANCED,
       "Adafactor's relative step (the learning rates above are then ignored)."),
    _f("lr_scheduler_power", "Polynomial power", "float", ADVANCED,
       "For the polynomial schedule.", minimum=0),
    _f("gradient_accumulation_steps", "Gradient accumulation", "int", ADVANCED,
       "Add up N batches per step: a bigger effective batch without more memory.", minimum=1),
    _f("max_grad_norm", "Max gradient norm", "float", ADVANCED, "Gradient clipping (0 = off).", minimum=0),
    _f("min_snr_gamma", "Min-SNR gamma", "float", ADVANCED,
       "Balances the loss over noise levels (5 is usual, 0 = off).", minimum=0),
    _f("noise_offset", "Noise offset", "float", ADVANCED,
       "Helps very dark/bright images (0.05-0.1; 0 = off).", minimum=0),
    _f("parameterization", "Prediction type", "choice", ADVANCED,
       "auto = the loaded model's own (eps for SD1.5).",
       choices=PARAMETERIZATIONS),
    _f("clip_skip", "Clip skip", "int", ADVANCED, "1 for realistic models, 2 for most anime models.",
       minimum=1, maximum=12),
    _f("mixed_precision", "Mixed precision", "choice", ADVANCED,
       "fp16 (most GPUs) or bf16 (RTX 30xx and newer).",
       choices=MIXED_PRECISIONS),
    _f("gradient_checkpointing", "Gradient checkpointing", "choice", ADVANCED,
       "Less memory, 30-50% slower. auto = on only when a step would not fit in free memory.",
       choices=GRADIENT_CHECKPOINTING),
    _f("seed", "Seed", "int", ADVANCED, "Makes a run repeatable."),
)  # fmt: skip

FIELD_NAMES: tuple[str, ...] = tuple(spec.name for spec in FIELDS)
SPECS: dict[str, FieldSpec] = {spec.name: spec for spec in FIELDS}


def fields_in(section: str) -> list[FieldSpec]:
    return [spec for spec in FIELDS if spec.section == section]


def value_for_form(spec: FieldSpec, config: TrainingConfig) -> Any:
    value = getattr(config, spec.name)
    if spec.kind == "textarea" and isinstance(value, list):
        return "\n".join(value)
    return value


def values_from_config(config: TrainingConfig) -> list[Any]:
    """The form's values, in :data:`FIELDS` order."""
    return [value_for_form(spec, config) for spec in FIELDS]


def config_from_values(values: Sequence[Any], base: TrainingConfig | None = None) -> TrainingConfig:
    """A config from the form's values (in :data:`FIELDS` order); fields not in the form come from
    ``base``. Raises :class:`~lib_lora_trainer.config.ConfigError` for a value of the wrong type."""
    if len(values) != len(FIELDS):
        raise ValueError(f"expected {len(FIELDS)} form values, got {len(values)}")
    data = (base or TrainingConfig()).to_dict()
    for spec, value in zip(FIELDS, values, strict=True):
        if value is None:
            continue  # an emptied number box: keep the current value
        data[spec.name] = value.strip() if isinstance(value, str) and spec.kind == "text" else value
    return TrainingConfig.from_dict(data)


def describe_fields_markdown() -> str:
    """Every option with its explanation, grouped as in the tab (for the README)."""
    titles = {
        DATASET: "Dataset",
        CAPTIONS: "Captions",
        BASIC: "Training",
        SAMPLES: "Samples",
        ADVANCED: "Advanced",
    }
    lines = []
    for section, title in titles.items():
        lines.append(f"**{title}**\n")
        for spec in fields_in(section):
            lines.append(f"- *{spec.label}* (`{spec.name}`): {spec.info or 'as in kohya_ss.'}")
        lines.append("")
    return "\n".join(lines)


def changed_fields(before: TrainingConfig, after: TrainingConfig) -> list[str]:
    return [
        f.name
        for f in dataclasses.fields(TrainingConfig)
        if getattr(before, f.name) != getattr(after, f.name)
    ]
