"""The A1111 callbacks behind ``scripts/lora_char_trainer.py``.

The services and the training job live at module level: A1111's "Reload UI" rebuilds the tab but
keeps this package imported, so a run in progress is still there (and its page picks it up again).
"""

from __future__ import annotations

import logging

from lib_lora_trainer.ui.jobs import TrainingJobs
from lib_lora_trainer.webui.services import A1111Services

logger = logging.getLogger(__name__)

_services: A1111Services | None = None
_jobs: TrainingJobs | None = None


def services() -> A1111Services:
    global _services
    if _services is None:
        _services = A1111Services()
    return _services


def jobs() -> TrainingJobs:
    global _jobs
    if _jobs is None:
        _jobs = TrainingJobs(services())
    return _jobs


def on_ui_settings() -> None:
    from lib_lora_trainer.webui import settings

    settings.register()


def on_ui_tabs():
    from lib_lora_trainer.ui.tab import TAB_ID, TAB_TITLE, build_tab

    return [(build_tab(services(), jobs()), TAB_TITLE, TAB_ID)]


def on_app_started(demo, app) -> None:
    """Say once, in the console, whether typed folders are confined and to which roots."""
    from lib_lora_trainer.webui.services import FORGE_MESSAGE, is_forge

    if is_forge():
        logger.warning("Character LoRA trainer: %s", FORGE_MESSAGE)
    policy = services().path_policy()
    if policy.confined:
        roots = ", ".join(str(root) for root in policy.roots)
        logger.warning(
            "Character LoRA trainer: the WebUI is reachable from other machines, so dataset and output "
            "folders are limited to: %s",
            roots,
        )
    else:
        logger.info(
            "Character LoRA trainer: ready (datasets default to %s)", services().defaults().dataset_dir
        )
