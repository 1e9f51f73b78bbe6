"""Epoch samples through A1111's own txt2img pipeline (its samplers, its VAE), during training.

The adapters are attached to the live model while the samples render, so ``p.disable_extra_networks``
keeps the Lora extension from loading anything: the ``<lora:STEM:w>`` tag stays in the prompt and the
infotext (A1111 strips it before the text encoder), which is how Infinite Image Browser finds the
epoch. The checkpoint is pinned (a checkpoint chosen in the dropdown meanwhile must not be loaded into
the model being trained), the prompt cache is reset (it does not know about the text encoder's
adapters), and the random number generators are put back so sampling does not change the training run.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path

import numpy as np
import torch

from lib_lora_trainer.outputs.samples import RenderedSample, SampleError, SampleRequest, free_path

logger = logging.getLogger(__name__)


def pinned_checkpoint_settings() -> dict[str, str]:
    """``override_settings`` that keep A1111 on the checkpoint that is loaded now."""
    from modules import shared

    info = getattr(shared.sd_model, "sd_checkpoint_info", None)
    if info is None:
        raise SampleError("No checkpoint is loaded.")
    return {"sd_model_checkpoint": info.title}


def reset_conditioning_cache() -> None:
    from modules import processing

    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]


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


class A1111SampleRenderer:
    """:class:`~lib_lora_trainer.outputs.samples.SampleRenderer` over ``modules.processing``.

    ``apply_lora_tags``: the Lora extension loads each prompt's ``<lora:stem:w>`` from disk (epoch
    scoring after training); by default the adapters in memory are rendered and nothing is loaded.
    """

    def __init__(self, apply_lora_tags: bool = False):
        self.apply_lora_tags = apply_lora_tags

    def render(self, requests: Sequence[SampleRequest], folder: Path, file_stem: str) -> list[RenderedSample]:
        results = []
        with kept_random_state():
            try:
                for index, request in enumerate(requests):
                    results.append(self._render_one(request, folder, f"{file_stem}-{index:02d}"))
            finally:
                reset_conditioning_cache()
        return results

    def _render_one(self, request: SampleRequest, folder: Path, name: str) -> RenderedSample:
        from modules import images, processing, shared

        reset_conditioning_cache()
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
            override_settings=pinned_checkpoint_settings(),
            override_settings_restore_afterwards=True,
        )
        p.disable_extra_networks = not self.apply_lora_tags  # else: the adapters in memory, nothing loaded
        with closing(p):
            processed = processing.process_images(p)
        if not processed.images:
            raise SampleError(f"txt2img returned no image for {name} (interrupted?)")
        image, infotext = processed.images[0], processed.infotexts[0]
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
