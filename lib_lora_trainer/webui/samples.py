"""Epoch samples through A1111's own txt2img pipeline (its samplers, its VAE), during training.

The adapters are attached to the live model while the samples render, so ``p.disable_extra_networks``
keeps the Lora extension from loading anything. The model cannot change underneath: the checkpoint is
pinned in ``override_settings`` and :func:`~lib_lora_trainer.webui.model_guard.model_changes_refused`
turns the reloads ``process_images`` asks for into no-ops (a renamed checkpoint, FP8 switched on in the
settings meanwhile); after each render the checkpoint is checked. The prompt cache is reset (it does not
know about the text encoder's adapters), and the random number generators are put back so sampling
does not change the training run.

The infotext. A1111 v1.10.1 builds it from ``p.prompts``, the prompts with extra-network tags already
removed (``parse_extra_network_prompts``), and puts the full prompts back only when scripts are attached
(``processing.process_images_inner``, before ``postprocess_batch_list``); the Lora extension adds
"Lora hashes" only when it activates the tag. Neither happens here, so the infotext is built again with
A1111's ``create_infotext`` from ``p.all_prompts`` (the prompts as requested, ``<lora:STEM:1>``
included) and "Lora hashes" is set from the epoch file, exactly as the Lora extension writes it: the
image's PNG Info, "Send to txt2img" and Infinite Image Browser then reproduce the sample from the epoch
file, and find the epoch by name.
"""

from __future__ import annotations

import json
import logging
import random
import re
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import torch

from lib_lora_trainer.outputs.samples import RenderedSample, SampleError, SampleRequest, free_path
from lib_lora_trainer.webui.model_guard import model_changes_refused

logger = logging.getLogger(__name__)

LORA_TAG_NAME = re.compile(r"<lora:([^:>]+)(?::[^>]*)?>")
LORA_NAME_REMOVED_SYMBOLS = str.maketrans("", "", ":,")  # ExtraNetworkLora.remove_symbols
SHORTHASH_LENGTH = 12  # network.NetworkOnDisk.set_hash: shorthash = hash[0:12]


def loaded_checkpoint_title() -> str:
    from modules import shared

    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    if info is None:
        raise SampleError("No checkpoint is loaded.")
    return info.title


def pinned_checkpoint_settings() -> dict[str, str]:
    """``override_settings`` that keep A1111 on the checkpoint that is loaded now."""
    return {"sd_model_checkpoint": loaded_checkpoint_title()}


def reset_conditioning_cache() -> None:
    from modules import processing

    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]


@contextmanager
def _overrides_left_out_of_settings(overrides: dict) -> Iterator[None]:
    """A1111's ``override_settings_restore_afterwards`` restores only the keys ``opts.data`` already had
    (``modules/processing.py`` ``process_images``); a key it lacked would stay written into the settings a
    later save persists. Such keys are taken out again afterwards."""
    from modules import shared

    absent = [key for key in overrides if key not in shared.opts.data]
    try:
        yield
    finally:
        for key in absent:
            shared.opts.data.pop(key, None)


@contextmanager
def kept_random_state() -> Iterator[None]:
    """Put torch's (CPU and CUDA), Python's and numpy's generators back as they were."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    python = random.getstate()
    numpy_state = np.random.get_state()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        random.setstate(python)
        np.random.set_state(numpy_state)


def lora_shorthash(path: Path) -> str:
    """The short hash A1111's Lora extension shows for a file: its ``sshs_model_hash`` (the sha256 of the
    tensor bytes, as kohya writes it), first 12 characters; empty when the file has none."""
    try:
        with path.open("rb") as stream:
            header_size = int.from_bytes(stream.read(8), "little")
            header = json.loads(stream.read(header_size))
    except (OSError, ValueError) as error:
        logger.warning("no Lora hash for %s: %s", path.name, error)
        return ""
    model_hash = str((header.get("__metadata__") or {}).get("sshs_model_hash", ""))
    return model_hash[:SHORTHASH_LENGTH]


def lora_hashes_text(prompt: str, lora_folder: Path | None) -> str:
    """``Lora hashes`` for the prompt's ``<lora:...>`` tags whose files are in ``lora_folder``, written as
    ``ExtraNetworkLora.activate`` writes them ("name: shorthash, ...")."""
    if lora_folder is None:
        return ""
    hashes = {}
    for name in LORA_TAG_NAME.findall(prompt):
        shorthash = lora_shorthash(lora_folder / f"{name}.safetensors")
        if shorthash:
            hashes[name.translate(LORA_NAME_REMOVED_SYMBOLS)] = shorthash
    return ", ".join(f"{name}: {shorthash}" for name, shorthash in hashes.items())


class A1111SampleRenderer:
    """:class:`~lib_lora_trainer.outputs.samples.SampleRenderer` over ``modules.processing``.

    ``lora_folder`` is where the epoch files are (for "Lora hashes" in the infotext). ``apply_lora_tags``: the
    Lora extension loads each prompt's ``<lora:stem:w>`` from disk (epoch scoring after training); by
    default the adapters in memory are rendered and nothing is loaded.
    """

    def __init__(self, lora_folder: Path | None = None, apply_lora_tags: bool = False):
        self.lora_folder = lora_folder
        self.apply_lora_tags = apply_lora_tags

    def render(self, requests: Sequence[SampleRequest], folder: Path, file_stem: str) -> list[RenderedSample]:
        results = []
        with kept_random_state(), model_changes_refused():
            try:
                for index, request in enumerate(requests):
                    results.append(self._render_one(request, folder, f"{file_stem}-{index:02d}"))
            finally:
                reset_conditioning_cache()
        return results

    def _render_one(self, request: SampleRequest, folder: Path, name: str) -> RenderedSample:
        from modules import images, processing, shared

        reset_conditioning_cache()
        pinned = loaded_checkpoint_title()
        hashes = lora_hashes_text(request.prompt, self.lora_folder)
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model,
            outpath_samples=str(folder),
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            seed=request.seed,
            steps=request.steps,
            sampler_name=request.sampler,
            cfg_scale=request.cfg_scale,
            width=request.width,
            height=request.height,
            do_not_save_samples=True,
            do_not_save_grid=True,
            # clip skip reaches the render through the override, never the WebUI's settings themselves
            override_settings={"sd_model_checkpoint": pinned, "CLIP_stop_at_last_layers": request.clip_skip},
            override_settings_restore_afterwards=True,
            extra_generation_params={"Lora hashes": hashes} if hashes else {},
        )
        p.disable_extra_networks = not self.apply_lora_tags  # else: the adapters in memory, nothing loaded
        with closing(p), _overrides_left_out_of_settings(p.override_settings):
            processed = processing.process_images(p)
            if loaded_checkpoint_title() != pinned:
                raise SampleError(f"The checkpoint changed while {name} rendered; the sample is not kept.")
            if not processed.images:
                raise SampleError(f"txt2img returned no image for {name} (interrupted?)")
            # the infotext of the prompt as requested, <lora:...> included (see the module's docstring)
            infotext = processing.create_infotext(
                p, p.all_prompts, p.all_seeds, p.all_subseeds,
                index=0, all_negative_prompts=p.all_negative_prompts,
            )  # fmt: skip
        image = processed.images[0]
        folder.mkdir(parents=True, exist_ok=True)
        target = free_path(folder, name)
        saved, _ = images.save_image(
            image,
            str(folder),
            "",
            request.seed,
            request.prompt,
            "png",
            info=infotext,
            p=p,
            forced_filename=target.stem,
            save_to_dirs=False,
        )
        image.info["parameters"] = infotext
        shared.state.assign_current_image(image)
        return RenderedSample(request, image, infotext, Path(saved))
