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
    AUTO_MASKS,
    DATASET_LAYOUTS,
    EVALUATION_SCORERS,
    GRADIENT_CHECKPOINTING,
    HUBER_SCHEDULES,
    LOSS_TYPES,
    LR_SCHEDULERS,
    MIXED_PRECISIONS,
    NETWORK_TYPES,
    PARAMETERIZATIONS,
    SAVE_PRECISIONS,
    TrainingConfig,
)
from lib_lora_trainer.dataset.crop import CROP_MODES
from lib_lora_trainer.training.optim import available_optimizers

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
       "lora: attention layers; locon: also the convolutions; loha/lokr: LyCORIS' Hadamard/Kronecker forms.",
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
    _f("optimizer", "Optimizer", "choice", BASIC,
       "AdamW is the safe default; Adafactor saves memory; Prodigy wants learning rates of about 1.0. "
       "Optimizers whose package is not installed are not listed (see the README).",
       choices=available_optimizers()),
    _f("lr_scheduler", "LR schedule", "choice", BASIC, "How the learning rate changes over the run.",
       choices=LR_SCHEDULERS),
    _f("lr_scheduler_num_cycles", "Restarts (cycles)", "int", BASIC,
       "Cycles of cosine_with_restarts.", minimum=1),
    _f("lr_warmup_steps", "Warmup steps", "float", BASIC,
       "Steps with a rising learning rate at the start (a value below 1 is a fraction of all steps).",
       minimum=0),
    _f("save_every_n_epochs", "Save every N epochs", "int", BASIC, "The last epoch is always saved.",
       minimum=1),
    # --- resume and saving by steps ---
    _f("max_train_steps", "Length in steps", "int", ADVANCED,
       "Train this many steps instead of the epochs above (0 = use the epochs).", minimum=0),
    _f("save_every_n_steps", "Save every N steps", "int", ADVANCED,
       "Also save NAME-step00000500.safetensors every N steps (0 = off).", minimum=0),
    _f("save_last_n_epochs", "Keep last N epochs", "int", ADVANCED,
       "Remove older epoch files this run wrote (0 = keep all).", minimum=0),
    _f("save_last_n_steps", "Keep step files of the last N steps", "int", ADVANCED,
       "Remove older step files this run wrote (0 = keep all).", minimum=0),
    _f("save_state_every_n_steps", "Save training state every N steps", "int", ADVANCED,
       "For Resume after a stop or crash (0 = about every 5 minutes).", minimum=0),
    _f("save_last_n_states", "Training states kept", "int", ADVANCED,
       "The newest states are kept, older ones removed.", minimum=1),
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
    _f("validation_share", "Held-out share of the training images", "float", SAMPLES,
       "0 = off; 0.1 keeps the same tenth of each folder out of training for the validation loss "
       "(not with a held-out folder).", minimum=0, maximum=0.5),
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
    # --- network kinds, dropout, LoRA+, block weights, max norm (networks) ------------------------
    _f("dora_wd", "DoRA (weight decomposition)", "bool", ADVANCED,
       "LoRA/LoCon learns direction and magnitude apart (LyCORIS dora_wd); closer to full fine-tuning."),
    _f("conv_layers", "LoHa/LoKr: also the convolutions", "bool", ADVANCED,
       "Adapt the ResBlock convolutions too, at the conv rank/alpha (what LoCon does for LoRA)."),
    _f("use_tucker", "Tucker for 3x3 convolutions", "bool", ADVANCED,
       "LoHa/LoKr: a smaller Tucker (CP) form for 3x3 convolutions (LyCORIS use_tucker)."),
    _f("lokr_factor", "LoKr factor", "int", ADVANCED,
       "Size of LoKr's small Kronecker factor; -1 = near the square root (LyCORIS factor)."),
    _f("network_dropout", "Network dropout", "float", ADVANCED,
       "kohya's neuron dropout on the down projection's output (0.1 is common; 0 = off).",
       minimum=0, maximum=1),
    _f("rank_dropout", "Rank dropout", "float", ADVANCED,
       "Chance to drop each rank of the update per step (0 = off).", minimum=0, maximum=1),
    _f("module_dropout", "Module dropout", "float", ADVANCED,
       "Chance to skip a module's adapter for a step (0 = off).", minimum=0, maximum=1),
    _f("loraplus_lr_ratio", "LoRA+ ratio", "float", ADVANCED,
       "The up (B) matrices learn this many times faster (16 is the paper's; 0 = off).", minimum=0),
    _f("loraplus_unet_lr_ratio", "LoRA+ ratio, UNet", "float", ADVANCED,
       "Overrides the LoRA+ ratio for the UNet (0 = the ratio above).", minimum=0),
    _f("loraplus_text_encoder_lr_ratio", "LoRA+ ratio, text encoder", "float", ADVANCED,
       "Overrides the LoRA+ ratio for the text encoder (0 = the ratio above).", minimum=0),
    _f("down_lr_weight", "Down-block LR weights", "text", ADVANCED,
       "12 factors for IN00-IN11, or sine/cosine/linear/reverse_linear/zeros (+offset, e.g. sine+.5)."),
    _f("mid_lr_weight", "Mid-block LR weight", "text", ADVANCED, "One factor for the middle block."),
    _f("up_lr_weight", "Up-block LR weights", "text", ADVANCED,
       "12 factors for OUT00-OUT11, or a preset as for the down blocks."),
    _f("block_lr_zero_threshold", "Block LR zero threshold", "float", ADVANCED,
       "Blocks whose LR weight is at or below this are not trained at all.", minimum=0),
    _f("block_dims", "Block ranks", "text", ADVANCED,
       "25 ranks (IN00-IN11, MID, OUT00-OUT11); 0 leaves a block out; empty = the rank above."),
    _f("block_alphas", "Block alphas", "text", ADVANCED, "25 alphas to go with the block ranks."),
    _f("conv_block_dims", "Conv block ranks", "text", ADVANCED, "25 ranks of the 3x3 convolutions."),
    _f("conv_block_alphas", "Conv block alphas", "text", ADVANCED, "25 alphas of the 3x3 convolutions."),
    _f("scale_weight_norms", "Max norm (scale weight norms)", "float", ADVANCED,
       "Scale down any module whose update norm passes this after each step (1 is usual; 0 = off).",
       minimum=0),
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
       "auto: fp16 on a GPU with A1111's half-precision model, fp32 on the CPU and Apple MPS; "
       "the file's metadata says what was used.",
       choices=MIXED_PRECISIONS),
    _f("gradient_checkpointing", "Gradient checkpointing", "choice", ADVANCED,
       "Less memory, 30-50% slower. auto = on only when a step would not fit in free memory.",
       choices=GRADIENT_CHECKPOINTING),
    _f("seed", "Seed", "int", ADVANCED, "Makes a run repeatable."),
    # --- advanced: loss shaping, masks, optimizer and schedule options ----------------------------
    _f("loss_type", "Loss", "choice", ADVANCED,
       "l2 is standard; huber/smooth_l1 weigh outliers less (robust to odd images); l1: the plain distance.",
       choices=LOSS_TYPES),
    _f("huber_schedule", "Huber schedule", "choice", ADVANCED,
       "How huber_c changes over noise levels (huber/smooth_l1 only): snr is kohya's default.",
       choices=HUBER_SCHEDULES),
    _f("huber_c", "Huber c", "float", ADVANCED,
       "Where the Huber loss turns from quadratic to linear (0.1 is usual).", minimum=0),
    _f("huber_scale", "Huber scale", "float", ADVANCED, "Scales the Huber threshold (1 = as huber_c).",
       minimum=0),
    _f("debiased_estimation_loss", "Debiased estimation", "bool", ADVANCED,
       "Weights each step by 1/sqrt(SNR): less weight on nearly clean images."),
    _f("noise_offset_random_strength", "Random noise offset strength", "bool", ADVANCED,
       "Each step uses a random offset between 0 and the noise offset."),
    _f("adaptive_noise_scale", "Adaptive noise scale", "float", ADVANCED,
       "Adds this x each channel's mean brightness to the noise offset (needs a noise offset; 0 = off)."),
    _f("multires_noise_iterations", "Multires noise iterations", "int", ADVANCED,
       "Adds coarse noise at several scales (6-10 usual; 0 = off).", minimum=0),
    _f("multires_noise_discount", "Multires noise discount", "float", ADVANCED,
       "How much weaker each coarser scale is (0.3 is usual).", minimum=0, maximum=1),
    _f("ip_noise_gamma", "Input perturbation (ip noise gamma)", "float", ADVANCED,
       "Slightly different noise in the input than in the target (0.1 usual; 0 = off).", minimum=0),
    _f("ip_noise_gamma_random_strength", "Random input perturbation strength", "bool", ADVANCED,
       "Each step uses a random strength between 0 and ip noise gamma."),
    _f("min_timestep", "Min timestep", "int", ADVANCED,
       "Train only noise levels from here (0 = the cleanest).", minimum=0, maximum=999),
    _f("max_timestep", "Max timestep", "int", ADVANCED,
       "... up to here, exclusive (1000 = the noisiest).", minimum=1, maximum=1000),
    _f("zero_terminal_snr", "Zero terminal SNR", "bool", ADVANCED,
       "Rescale the noise schedule so the last step is pure noise (v-prediction models only)."),
    _f("masked_loss", "Masked loss (mask images)", "bool", ADVANCED,
       "Learn only where a mask is white: NAME.mask.png beside each picture, or the mask folder below."),
    _f("alpha_mask", "Alpha channel as mask", "bool", ADVANCED,
       "Learn only where a transparent picture is opaque."),
    _f("conditioning_data_dir", "Mask images folder (kohya)", "text", ADVANCED,
       "Optional: a folder of mask images named like the pictures (kohya's conditioning_data_dir)."),
    _f("auto_mask", "Automatic mask", "choice", ADVANCED,
       "face: pictures without a mask learn only a soft head-and-shoulders region around the found face.",
       choices=AUTO_MASKS),
    _f("optimizer_args", "Optimizer arguments", "text", ADVANCED,
       "kohya style key=value, e.g. betas=0.9,0.99 eps=1e-8 (checked before training starts)."),
    _f("prodigy_d_coef", "Prodigy d_coef", "float", ADVANCED,
       "Scales Prodigy's estimated step size (1 = as estimated; 0.5 is gentler).", minimum=0),
    _f("prodigy_safeguard_warmup", "Prodigy safeguard warmup", "bool", ADVANCED,
       "Keeps Prodigy's estimate from overshooting during warmup (use with a warmup)."),
    _f("prodigy_use_bias_correction", "Prodigy bias correction", "bool", ADVANCED,
       "Adam-style bias correction of Prodigy's estimate (often used with it)."),
    _f("lr_scheduler_args", "Schedule arguments", "text", ADVANCED,
       "key=value for the schedule: min_lr_rate=0.1 (cosine_with_min_lr), num_decay_steps=0.2 "
       "(warmup_stable_decay), step_rules=1:500,0.5:1000,0.1 (piecewise_constant)."),
    # --- caption encoding (precision helper) ------------------------------------------------------
    _f("weighted_captions", "Weighted captions", "bool", ADVANCED,
       "Read (tag:1.2), [tag] and BREAK in captions as in a prompt; off: brackets are plain text, "
       "as in ganyu (genshin impact)."),
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
