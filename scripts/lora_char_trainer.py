"""A1111 glue for the Character LoRA Trainer: the tab, its settings, a start-up note. Nothing else."""

from modules import script_callbacks

from lib_lora_trainer.webui import extension

script_callbacks.on_ui_settings(extension.on_ui_settings)
script_callbacks.on_ui_tabs(extension.on_ui_tabs)
script_callbacks.on_app_started(extension.on_app_started)
