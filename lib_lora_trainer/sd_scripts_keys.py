"""What train_network.py's arguments, the network modules' ``network_args`` and sd-scripts' defaults
are, as read from kohya-ss/sd-scripts (``train_network.py``, ``library/train_util.py``, ``networks/lora.py``)
and LyCORIS (``lycoris/kohya.py``, ``lycoris/config.py``): the tables :mod:`.sd_scripts_import` maps with.
"""

from __future__ import annotations

from typing import Any

# --- network_args: what each network module reads ------------------------------------------------------
# networks/lora.py create_network (kwargs.get ...)
KOHYA_LORA_ARGS = frozenset(
    {
        "conv_dim", "conv_alpha", "rank_dropout", "module_dropout", "loraplus_lr_ratio",
        "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio", "down_lr_weight", "mid_lr_weight",
        "up_lr_weight", "block_lr_zero_threshold", "block_dims", "block_alphas", "conv_block_dims",
        "conv_block_alphas",
    }
)  # fmt: skip
# LyCORIS lycoris/kohya.py create_network; the options without a field here and their defaults
LYCORIS_UNSUPPORTED_DEFAULTS: dict[str, Any] = {
    "use_scalar": False,
    "block_size": 4,
    "train_norm": False,
    "constraint": 0,
    "constrain": 0,
    "rescaled": False,
    "wd_on_output": True,
    "full_matrix": False,
    "bypass_mode": False,
    "rs_lora": False,
    "unbalanced_factorization": False,
    "train_t5xxl": False,
}
LYCORIS_ARGS = frozenset(
    {
        "conv_dim", "conv_alpha", "dropout", "rank_dropout", "module_dropout", "algo", "preset", "use_tucker",
        "use_cp", "use_conv_cp", "disable_conv_cp", "dora_wd", "decompose_both", "factor",
        "loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio",
        *LYCORIS_UNSUPPORTED_DEFAULTS,
    }
)  # fmt: skip
NETWORK_ARG_NAMES = KOHYA_LORA_ARGS | LYCORIS_ARGS
LYCORIS_BOOLS = ("dora_wd", "use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp", "decompose_both")
LYCORIS_ALGOS = {"lora": "locon", "locon": "locon", "loha": "loha", "lokr": "lokr"}
# LyCORIS presets whose "enable_conv" is on (lycoris/config.py)
LYCORIS_PRESETS_WITH_CONVS = ("full", "unet-only", "unet-convblock-only")
LYCORIS_PRESETS = (
    *LYCORIS_PRESETS_WITH_CONVS,
    "full-lin",
    "attn-mlp",
    "attn-only",
    "unet-transformer-only",
    "ia3",
)
BLOCK_WEIGHT_KEYS = ("block_dims", "down_lr_weight", "mid_lr_weight", "up_lr_weight")

# Weight decay each optimizer uses when optimizer_args give none (torch, bitsandbytes, lion-pytorch,
# prodigyopt, transformers, schedulefree defaults).
OPTIMIZER_WEIGHT_DECAY = {
    "AdamW": 0.01,
    "AdamW8bit": 0.01,
    "PagedAdamW8bit": 0.01,
    "Lion": 0.0,
    "Lion8bit": 0.0,
    "Prodigy": 0.0,
    "Adafactor": 0.0,
    "AdamWScheduleFree": 0.0,
}

# kohya_ss GUI keys that are not train_network.py arguments: sd-scripts does not read them from a TOML.
GUI_ONLY_KEYS = frozenset(
    {
        "LoRA_type", "LyCORIS_preset", "epoch", "max_resolution", "optimizer", "lr_warmup",
        "noise_offset_type", "model_list", "additional_parameters", "use_wandb", "stop_text_encoder_training",
        "num_cpu_threads_per_process", "gpu_ids", "multi_gpu", "num_processes", "num_machines",
        "main_process_port", "extra_accelerate_launch_args", "sdxl", "sd3_checkbox", "flux1_checkbox",
        "hunyuan_image_checkbox", "training_preset", "unit",
    }
)  # fmt: skip

SD_IGNORED: dict[str, str] = {
    **dict.fromkeys(
        ("config_file", "output_config"), "the --config_file options themselves have no effect in a TOML"
    ),
    **dict.fromkeys(
        (
            "torch_compile",
            "ddp_timeout",
            "ddp_gradient_as_bucket_view",
            "ddp_static_graph",
            "deepspeed",
            "zero_stage",
            "offload_optimizer_device",
            "offload_optimizer_nvme_path",
            "offload_param_device",
            "offload_param_nvme_path",
            "zero3_init_flag",
            "zero3_save_16bit_model",
            "fp16_master_weights_and_gradients",
            "no_half_vae",
            "tokenizer_cache_dir",
            "cache_info",
            "debug_dataset",
            "use_safetensors",
            "console_log_level",
            "console_log_file",
            "console_log_simple",
            "lr_scheduler_timescale",
        ),
        "a process setting of sd-scripts/accelerate; training runs inside the WebUI",
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "huggingface_repo_id",
            "huggingface_repo_type",
            "huggingface_path_in_repo",
            "huggingface_token",
            "huggingface_repo_visibility",
            "save_state_to_huggingface",
            "resume_from_huggingface",
        ),
        "uploads are not made from here",
    ),  # fmt: skip
    **dict.fromkeys(
        (
            "metadata_title",
            "metadata_author",
            "metadata_description",
            "metadata_license",
            "metadata_tags",
            "metadata_usage_hint",
            "metadata_thumbnail",
            "metadata_merged_from",
            "metadata_trigger_phrase",
            "metadata_preprocessor",
            "metadata_is_negative_embedding",
            "ckpt",
        ),
        "model-card text of sd-scripts' files; the epoch files carry this trainer's own metadata",
    ),  # fmt: skip
    "no_metadata": "the epoch files always carry their ss_* metadata (A1111 and the tab read it)",
    "datasets": "sd-scripts reads [[datasets]] only from the file that dataset_config names",
    "validation_seed": "held-out images are chosen by a hash of their file names (validation_share)",
    **dict.fromkeys(
        GUI_ONLY_KEYS, "a kohya_ss GUI key, not a train_network.py argument: sd-scripts ignores it"
    ),
}
SD_UNSUPPORTED: dict[str, str] = {
    "base_weights": "LoRAs merged into the model before training are not supported; merge them in the WebUI",
    "base_weights_multiplier": "only used with base_weights",
    "in_json": "fine-tuning metadata (captions in a JSON) is not read; captions come from text files",
    "dataset_class": "custom dataset classes cannot be loaded",
    "initial_epoch": "resume a run of this trainer from its Results section",
    "initial_step": "resume a run of this trainer from its Results section",
    "skip_until_initial_step": "resume a run of this trainer from its Results section",
    "save_n_epoch_ratio": "use save_every_n_epochs",
    "sample_at_first": "samples are made after epochs",
    "scale_v_pred_loss_like_noise_pred": "not supported here",
    "v_pred_like_loss": "not supported here",
    "validate_every_n_steps": "the validation loss is computed after every epoch here",
    "validate_every_n_epochs": "the validation loss is computed after every epoch here",
    "max_validation_steps": "the validation loss uses the tab's validation options",
    "face_crop_aug_range": "the tab's crop mode 'face' crops around the detected face",
    "caption_separator": "tags are separated by commas here",
    "keep_tokens_separator": "use keep_tokens (a count of leading tags)",
    "secondary_separator": "tags are separated by commas here",
    "enable_wildcard": "captions are used as written",
    "caption_prefix": "add the text to the captions (the tab's bulk edit) or use the trigger word",
    "caption_suffix": "add the text to the captions (the tab's bulk edit)",
    "resize_interpolation": "images are resized with this trainer's own filter",
    "token_warmup_step": "not supported here",
    "token_warmup_min": "not supported here",
    "network_multiplier": "the network is trained at multiplier 1",
}
SD_NEUTRAL: dict[str, Any] = {
    "caption_separator": ",",
    "token_warmup_min": 1,
    "network_multiplier": 1.0,
    "max_data_loader_n_workers": 8,
    "dynamo_backend": "inductor",
    "dataset_repeats": 1,
    "vae_batch_size": 1,
    "validation_split": 0.0,
}

# --- defaults sd-scripts uses for what a --config_file leaves out ---------------------------------------
# Not caption_extension: it names the caption files on disk (the tab's tagger writes .txt), and sd-scripts'
# own default (.caption) would silently train without them.
# (our field, the train_network.py arguments that would set it, sd-scripts' value when none is given)
SD_SCRIPTS_DEFAULTS: tuple[tuple[str, tuple[str, ...], Any], ...] = (
    ("network_dim", ("network_dim",), 4),
    ("network_alpha", ("network_alpha",), 1.0),
    ("network_dropout", ("network_dropout", "dropout"), 0.0),
    ("rank_dropout", ("rank_dropout",), 0.0),
    ("module_dropout", ("module_dropout",), 0.0),
    ("dora_wd", ("dora_wd",), False),
    ("use_tucker", ("use_tucker", "use_cp", "use_conv_cp", "disable_conv_cp"), False),
    ("lokr_factor", ("factor",), -1),
    ("loraplus_lr_ratio", ("loraplus_lr_ratio",), 0.0),
    ("loraplus_unet_lr_ratio", ("loraplus_unet_lr_ratio",), 0.0),
    ("loraplus_text_encoder_lr_ratio", ("loraplus_text_encoder_lr_ratio",), 0.0),
    ("down_lr_weight", ("down_lr_weight",), ""),
    ("mid_lr_weight", ("mid_lr_weight",), ""),
    ("up_lr_weight", ("up_lr_weight",), ""),
    ("block_lr_zero_threshold", ("block_lr_zero_threshold",), 0.0),
    ("block_dims", ("block_dims",), ""),
    ("block_alphas", ("block_alphas",), ""),
    ("conv_block_dims", ("conv_block_dims",), ""),
    ("conv_block_alphas", ("conv_block_alphas",), ""),
    ("scale_weight_norms", ("scale_weight_norms",), 0.0),
    ("network_weights", ("network_weights",), ""),
    ("reg_data_dir", ("reg_data_dir",), ""),
    ("optimizer", ("optimizer_type", "use_8bit_adam", "use_lion_optimizer"), "AdamW"),
    ("optimizer_args", ("optimizer_args",), ""),
    ("lr_scheduler", ("lr_scheduler",), "constant"),
    ("lr_scheduler_args", ("lr_scheduler_args",), ""),
    ("lr_scheduler_num_cycles", ("lr_scheduler_num_cycles",), 1),
    ("lr_scheduler_power", ("lr_scheduler_power",), 1.0),
    ("lr_warmup_steps", ("lr_warmup_steps",), 0.0),
    ("batch_size", ("train_batch_size",), 1),
    ("gradient_accumulation_steps", ("gradient_accumulation_steps",), 1),
    ("max_grad_norm", ("max_grad_norm",), 1.0),
    ("keep_tokens", ("keep_tokens",), 0),
    ("shuffle_caption", ("shuffle_caption",), False),
    ("caption_dropout_rate", ("caption_dropout_rate",), 0.0),
    ("caption_tag_dropout_rate", ("caption_tag_dropout_rate",), 0.0),
    ("flip_aug", ("flip_aug",), False),
    ("color_aug", ("color_aug",), False),
    ("enable_bucket", ("enable_bucket",), False),
    ("min_bucket_reso", ("min_bucket_reso",), 256),
    ("max_bucket_reso", ("max_bucket_reso",), 1024),
    ("bucket_no_upscale", ("bucket_no_upscale",), False),
    ("prior_loss_weight", ("prior_loss_weight",), 1.0),
    ("clip_skip", ("clip_skip",), 1),
    ("weighted_captions", ("weighted_captions",), False),
    ("mixed_precision", ("mixed_precision",), "no"),
    ("min_snr_gamma", ("min_snr_gamma",), 0.0),
    ("noise_offset", ("noise_offset",), 0.0),
    ("adaptive_noise_scale", ("adaptive_noise_scale",), 0.0),
    ("noise_offset_random_strength", ("noise_offset_random_strength",), False),
    ("multires_noise_iterations", ("multires_noise_iterations",), 0),
    ("multires_noise_discount", ("multires_noise_discount",), 0.3),
    ("ip_noise_gamma", ("ip_noise_gamma",), 0.0),
    ("ip_noise_gamma_random_strength", ("ip_noise_gamma_random_strength",), False),
    ("min_timestep", ("min_timestep",), 0),
    ("max_timestep", ("max_timestep",), 1000),
    ("loss_type", ("loss_type",), "l2"),
    ("huber_schedule", ("huber_schedule",), "snr"),
    ("huber_c", ("huber_c",), 0.1),
    ("huber_scale", ("huber_scale",), 1.0),
    ("debiased_estimation_loss", ("debiased_estimation_loss",), False),
    ("zero_terminal_snr", ("zero_terminal_snr",), False),
    ("masked_loss", ("masked_loss",), False),
    ("alpha_mask", ("alpha_mask",), False),
    ("conditioning_data_dir", ("conditioning_data_dir",), ""),
)
# the optimizer's own defaults for the options our fields carry, when optimizer_args do not give them
OPTIMIZER_ARGUMENT_FIELDS = {
    "d_coef": ("prodigy_d_coef", 1.0),
    "safeguard_warmup": ("prodigy_safeguard_warmup", False),
    "use_bias_correction": ("prodigy_use_bias_correction", False),
}
