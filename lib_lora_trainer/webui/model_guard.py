"""While a LoRA trains on ``shared.sd_model``, nothing in A1111 may reload, replace or move that model.

Several A1111 paths would, without waiting for the GPU queue or despite it:

* ``processing.process_images`` calls ``sd_models.reload_model_weights()`` for every render, and once
  more per batch; it reloads the checkpoint's weights *into the model being trained* when the pinned
  checkpoint title is gone from ``checkpoint_aliases`` (the list was refreshed, the file renamed) or
  when the FP8 setting changed since the model was loaded (``check_fp8(model) != devices.fp8``).
* Settings > Actions > "Unload SD checkpoint" (and ``/sdapi/v1/unload-checkpoint``) moves the model to
  the CPU in the middle of a step; the gradio button does not take the queue lock.

:func:`model_changes_refused` replaces these ``sd_models``/``sd_vae`` functions for the session (they
are looked up by module attribute, also from the functions A1111's buttons hold), so that a reload
leaves the model as it is and an unload or a load is refused with a sentence.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Any

logger = logging.getLogger(__name__)

REFUSED = (
    "A LoRA is being trained on the loaded checkpoint, so it cannot be unloaded, reloaded or replaced "
    "now; stop the run in the Train Character LoRA tab (or wait for it to end) and try again."
)
# sd_models functions that load, replace or move the model (A1111 v1.10.1)
REFUSED_MODEL_FUNCTIONS = (
    "load_model",
    "load_model_weights",
    "reuse_model_from_already_loaded",
    "unload_model_weights",
    "send_model_to_cpu",
    "send_model_to_device",
    "send_model_to_trash",
)
REFUSED_VAE_FUNCTIONS = ("load_vae", "reload_vae_weights")


class ModelInUse(RuntimeError):
    """Something asked to change the model a LoRA is being trained on."""


def _refuse(name: str) -> Callable[..., Any]:
    def refused(*args: Any, **kwargs: Any) -> Any:
        logger.warning("%s refused during training: %s", name, REFUSED)
        raise ModelInUse(REFUSED)

    refused.__name__ = name
    return refused


def _keep_model(*args: Any, **kwargs: Any) -> Any:
    """``reload_model_weights`` while training: the model stays exactly as it is."""
    shared = sys.modules.get("modules.shared")
    return getattr(shared, "sd_model", None)


def _module(name: str):
    try:
        return __import__(f"modules.{name}", fromlist=[name])
    except ImportError:
        return None


@contextlib.contextmanager
def model_changes_refused() -> Iterator[None]:
    """For the block: reloads of ``shared.sd_model`` do nothing, loads and unloads are refused."""
    replaced: list[tuple[Any, str, Any]] = []
    sd_models, sd_vae = _module("sd_models"), _module("sd_vae")
    plan: list[tuple[Any, str, Callable[..., Any]]] = []
    if sd_models is not None:
        plan.append((sd_models, "reload_model_weights", _keep_model))
        plan += [(sd_models, name, _refuse(f"sd_models.{name}")) for name in REFUSED_MODEL_FUNCTIONS]
    if sd_vae is not None:
        plan += [(sd_vae, name, _refuse(f"sd_vae.{name}")) for name in REFUSED_VAE_FUNCTIONS]
    for module, name, replacement in plan:
        if hasattr(module, name):
            replaced.append((module, name, getattr(module, name)))
            setattr(module, name, replacement)
    try:
        yield
    finally:
        for module, name, original in reversed(replaced):
            setattr(module, name, original)
