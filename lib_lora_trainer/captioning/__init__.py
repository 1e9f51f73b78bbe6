"""Automatic captions: WD14 (SmilingWolf) tagger models run with onnxruntime.

Typical use::

    tagger = WD14Tagger.from_registry("wd-swinv2-tagger-v3", models_dir)
    summary = tag_folder(tagger, "dataset/10_alice", TaggingOptions(trigger_word="alice"))
    tagger.unload()
"""

from lib_lora_trainer.captioning.tag_files import (
    IMAGE_EXTENSIONS,
    TaggingOptions,
    TaggingSummary,
    caption_path_for,
    list_images,
    tag_folder,
    tag_images,
)
from lib_lora_trainer.captioning.tag_text import (
    KAOMOJI,
    ExistingCaptionMode,
    compose_caption,
    display_tag,
    parse_tag_list,
    tag_key,
    unique_tags,
)
from lib_lora_trainer.captioning.wd14_models import (
    DEFAULT_MODEL,
    WD14_MODELS,
    TaggerModelUnavailable,
    WD14ModelInfo,
    ensure_model_files,
    get_model_info,
    model_folder,
)
from lib_lora_trainer.captioning.wd14_preprocess import ImageReadError, prepare_image, read_image
from lib_lora_trainer.captioning.wd14_tagger import (
    TaggerModelError,
    TagLabels,
    TagSelection,
    WD14Tagger,
    choose_providers,
    load_tag_labels,
)

__all__ = [
    "DEFAULT_MODEL",
    "IMAGE_EXTENSIONS",
    "KAOMOJI",
    "WD14_MODELS",
    "ExistingCaptionMode",
    "ImageReadError",
    "TagLabels",
    "TagSelection",
    "TaggerModelError",
    "TaggerModelUnavailable",
    "TaggingOptions",
    "TaggingSummary",
    "WD14ModelInfo",
    "WD14Tagger",
    "caption_path_for",
    "choose_providers",
    "compose_caption",
    "display_tag",
    "ensure_model_files",
    "get_model_info",
    "list_images",
    "load_tag_labels",
    "model_folder",
    "parse_tag_list",
    "prepare_image",
    "read_image",
    "tag_folder",
    "tag_images",
    "tag_key",
    "unique_tags",
]
