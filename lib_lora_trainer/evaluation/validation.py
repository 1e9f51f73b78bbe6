"""A deterministic validation loss, measured by the training loop at the end of every epoch.

Everything random is fixed once, with the validation's own generator: which images (held-out ones, or
the first batches of a fixed pass over the training images), their captions, the noise, and the
timesteps (spread evenly over the schedule, every image at every one of them). So the number moves only
when the weights do: computed twice on the same weights it is bit-identical, and epoch N and N+1 compare
like for like. Training's random state is left exactly as it was (exact resume depends on it): the
global torch generators are restored after every call, and dropout is off while measuring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.dataset.base import BatchSource, TrainingBatch
from lib_lora_trainer.dataset.crop import FaceFinder
from lib_lora_trainer.dataset.scan import ScannedDataset, scan_dataset
from lib_lora_trainer.dataset.source import DatasetError, build_batch_source
from lib_lora_trainer.model.host import TrainingHost

logger = logging.getLogger(__name__)

DEFAULT_SEED = 20240601
DEFAULT_TIMESTEPS = 4
DEFAULT_MAX_IMAGES = 8
MEASURE_BATCH = 4  # images of one shape measured in one forward pass (no gradients: little memory)


@dataclass(frozen=True)
class _Item:
    latents: torch.Tensor  # (B, 4, h, w) on the CPU
    captions: tuple[str, ...]
    noise: torch.Tensor  # (T, B, 4, h, w): one noise per timestep


@contextlib.contextmanager
def kept_torch_random_state(device: torch.device) -> Iterator[None]:
    """Put the global CPU (and CUDA) generators back as they were."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


@contextlib.contextmanager
def evaluation_mode(*modules: torch.nn.Module) -> Iterator[None]:
    """Dropout off (adapters' too); every module's training flag put back afterwards."""
    flags = [(m, m.training) for root in modules for m in root.modules()]
    try:
        for root in modules:
            root.eval()
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _merged(items: list[_Item]) -> list[_Item]:
    """Consecutive items of one latent shape joined into batches of up to MEASURE_BATCH images."""
    merged: list[_Item] = []
    for item in items:
        last = merged[-1] if merged else None
        if (
            last is not None
            and last.latents.shape[1:] == item.latents.shape[1:]
            and last.latents.shape[0] + item.latents.shape[0] <= MEASURE_BATCH
        ):
            merged[-1] = _Item(
                torch.cat([last.latents, item.latents]),
                last.captions + item.captions,
                torch.cat([last.noise, item.noise], dim=1),
            )
        else:
            merged.append(item)
    return merged


class DeterministicValidation:
    """Called as ``validation(host, source, mixed_precision) -> loss`` (what ``train`` accepts).

    ``held_out`` is a batch source over images kept out of training; without it the first
    ``max_images`` images of one fixed pass over the training source are used.
    """

    def __init__(
        self,
        held_out: BatchSource | None = None,
        *,
        seed: int = DEFAULT_SEED,
        timesteps: int = DEFAULT_TIMESTEPS,
        max_images: int = DEFAULT_MAX_IMAGES,
        parameterization: str = "auto",
    ):
        if timesteps < 1 or max_images < 1:
            raise ValueError("validation needs at least one timestep and one image")
        self.held_out = held_out
        self.seed = seed
        self.timesteps = timesteps
        self.max_images = max_images
        self.parameterization = parameterization
        self.history: list[float] = []
        self._items: list[_Item] | None = None
        self._timesteps: torch.Tensor | None = None

    @property
    def uses_held_out_images(self) -> bool:
        return self.held_out is not None

    def __call__(self, host: TrainingHost, source: BatchSource, mixed_precision: str = "no") -> float:
        with kept_torch_random_state(host.device):
            if self._items is None:
                self._prepare(host, source)
            loss = self._measure(host, mixed_precision)
        self.history.append(loss)
        return loss

    # --- the fixed set ------------------------------------------------------------------------------
    def _prepare(self, host: TrainingHost, source: BatchSource) -> None:
        torch.manual_seed(self.seed)  # the VAE samples its posterior from the global generator
        if self.held_out is not None:
            self.held_out.prepare(host.encode_images)
            batches = self.held_out.epoch(0, random.Random(self.seed))
        else:
            batches = source.epoch(0, random.Random(self.seed))
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        items, images = [], 0
        for batch in batches:
            items.append(self._item(batch, generator))
            images += len(batch.captions)
            if images >= self.max_images:
                break
        if not items:
            raise ValueError("the validation set has no images")
        self._items = _merged(items)
        schedule = len(host.alphas_cumprod())
        # the centres of ``timesteps`` equal slices of the schedule: from low to high noise
        centres = [int((index + 0.5) * schedule / self.timesteps) for index in range(self.timesteps)]
        self._timesteps = torch.tensor(centres, dtype=torch.long)
        where = "held-out images" if self.held_out is not None else "training images"
        logger.info("validation loss: %d %s at timesteps %s", images, where, centres)

    def _item(self, batch: TrainingBatch, generator: torch.Generator) -> _Item:
        latents = batch.latents.detach().float().cpu()
        noise = torch.randn((self.timesteps, *latents.shape), generator=generator)
        return _Item(latents, tuple(batch.captions), noise)

    # --- the measurement ----------------------------------------------------------------------------
    @torch.no_grad()
    def _measure(self, host: TrainingHost, mixed_precision: str) -> float:
        assert self._items is not None and self._timesteps is not None
        alphas = host.alphas_cumprod().float().to(host.device)
        parameterization = (
            host.parameterization() if self.parameterization == "auto" else self.parameterization
        )
        total, count = torch.zeros((), dtype=torch.float64), 0
        with evaluation_mode(host.unet(), host.text_encoder()):
            for item in self._items:
                latents = item.latents.to(host.device)
                with host.autocast(mixed_precision):
                    cond = host.encode_text(list(item.captions))
                for index, timestep in enumerate(self._timesteps.tolist()):
                    noise = item.noise[index].to(host.device)
                    alpha_bar = alphas[timestep]
                    noisy = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
                    t = torch.full((latents.shape[0],), timestep, dtype=torch.long, device=host.device)
                    with host.autocast(mixed_precision):
                        prediction = host.predict(noisy, t, cond)
                    if parameterization == "v":
                        target = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
                    else:
                        target = noise
                    per_sample = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3))
                    total += per_sample.double().sum().cpu()
                    count += latents.shape[0]
        return float(total / count)


def validation_for(
    config: TrainingConfig, face_finder: FaceFinder | None = None
) -> DeterministicValidation | None:
    """The validation ``config`` asks for: over its held-out folder, or over the images its held-out
    share keeps out of training, else over the training images.

    Held-out images are measured as training sees them (captions with the trigger word first, the same
    crop and masks) but without augmentation or repeats. Raises
    :class:`~lib_lora_trainer.dataset.source.DatasetError` when the held-out folder is unusable.
    """
    if not config.validation_loss:
        return None
    if config.validation_dir.strip():
        held_out = _held_out_folder(config)
    elif config.validation_share > 0:
        held_out = _held_out_share(config)
    else:
        held_out = None
    if held_out is None:
        return DeterministicValidation(parameterization=config.parameterization)
    source = build_batch_source(_measuring_config(config), held_out, face_finder=face_finder)
    return DeterministicValidation(source, parameterization=config.parameterization)


def _measuring_config(config: TrainingConfig, folder: str = "") -> TrainingConfig:
    """``config`` for reading held-out images (from ``folder``, a flat one, when given): every image
    once, unaugmented, none held out again."""
    where = {"train_data_dir": folder, "dataset_layout": "flat"} if folder else {}
    return dataclasses.replace(
        config,
        **where,
        flat_repeats=1,
        reg_data_dir="",
        batch_size=1,
        flip_aug=False,
        color_aug=False,
        shuffle_caption=False,
        caption_dropout_rate=0.0,
        caption_tag_dropout_rate=0.0,
        cache_latents=True,
        cache_latents_to_disk=False,
        validation_share=0.0,
    )


def _held_out_folder(config: TrainingConfig) -> ScannedDataset:
    dataset = scan_dataset(_measuring_config(config, config.validation_dir))
    if not dataset.usable:
        raise DatasetError(
            [f"the held-out images folder {config.validation_dir} has no usable images; "
             "empty the field to measure the validation loss on the training images"]
        )  # fmt: skip
    return dataset


def _held_out_share(config: TrainingConfig) -> ScannedDataset | None:
    """The images the share keeps out of training (the training scan picks the same ones), each once;
    None when it keeps none out (every folder has a single image)."""
    dataset = scan_dataset(dataclasses.replace(config, reg_data_dir=""))  # reg images are never held out
    if not dataset.usable:
        raise DatasetError(dataset.errors or ["the dataset has no usable training images"])
    if not dataset.held_out:
        logger.info("validation loss: the held-out share keeps no image out; the training images are used")
        return None
    return ScannedDataset(subsets=[dataclasses.replace(subset, repeats=1) for subset in dataset.held_out])
