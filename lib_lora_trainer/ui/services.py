"""What the tab needs from whatever hosts it: the "host services".

The tab (``lib_lora_trainer.ui``) never imports ``modules.*``. It talks to a :class:`HostServices`:
``lib_lora_trainer.webui.services`` implements it with A1111 (its GPU queue lock, ``shared.state``,
the progress API, the Lora extension, paste-params to txt2img, X/Y/Z plot), and
``lib_lora_trainer.ui.standalone`` with the stand-alone model host (tests and the demo app).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from PIL import Image

from lib_lora_trainer.dataset.crop import FaceFinder
from lib_lora_trainer.model.host import TrainingHost
from lib_lora_trainer.outputs.compare import EpochComparison
from lib_lora_trainer.outputs.samples import SampleRenderer
from lib_lora_trainer.paths import PathPolicy


@dataclass(frozen=True)
class TabDefaults:
    """Values from the host's settings that the tab starts from."""

    dataset_dir: str = ""  # default training images folder
    tagger_models_dir: str = ""  # where WD14 models are kept (downloaded once)
    lora_subfolder: str = "character_trainer"  # below the Lora folder
    samples_subfolder: str = "lora-trainer"  # below the txt2img output folder
    allow_tagger_download: bool = True
    scorer_models_dir: str = ""  # where the epoch-scoring models are kept (downloaded once)
    allow_scorer_download: bool = True


@dataclass(frozen=True)
class GridSettings:
    """Sampling settings of a comparison grid (and of the txt2img fields it fills)."""

    steps: int = 20
    sampler: str = "Euler a"
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512


@dataclass(frozen=True)
class GridResult:
    image: Image.Image
    path: Path | None
    infotext: str


class JobFrame(Protocol):
    """A job running under the host's GPU lock: it reports progress and learns about interrupts."""

    task_id: str

    def progress(self, step: int, total: int, text: str) -> None: ...

    def begin_phase(self) -> None:
        """A new phase (latent caching, training ...) starts: the host's ETA counts from now."""
        ...

    def interrupted(self) -> bool: ...


class HostServices(Protocol):
    """Everything host-specific the tab uses."""

    title: str  # shown in the tab ("AUTOMATIC1111", "stand-alone test model")

    def training_host(self) -> TrainingHost:
        """The model host to train on (raises HostRefused with a user message when there is none)."""
        ...

    def face_finder(self) -> FaceFinder | None: ...

    def vae_id(self) -> str:
        """Identifies the VAE for the on-disk latent cache (e.g. the checkpoint's hash)."""
        ...

    def defaults(self) -> TabDefaults: ...

    def lora_roots(self) -> list[Path]:
        """Every folder the host lists LoRAs from; the first is where new epochs go (plus subfolder)."""
        ...

    def samples_root(self) -> Path:
        """Where epoch samples go (a run gets its own subfolder)."""
        ...

    def path_policy(self) -> PathPolicy:
        """Whether typed paths are confined (the WebUI listens beyond localhost), and to which roots.

        When confined, the roots come from what no browser or API user can change (command-line options,
        the host's fixed folders), never from settings."""
        ...

    def form_memory_path(self) -> Path | None:
        """The JSON file that keeps the last submitted form, so a reloaded page gets it back."""
        ...

    def new_task_id(self, kind: str) -> str: ...

    def exclusive_job(self, task_id: str, title: str) -> contextlib.AbstractContextManager[JobFrame]:
        """Wait for the host's GPU lock, frame the job (progress, interrupt), release on exit."""
        ...

    def request_interrupt(self) -> None:
        """Ask the running GPU job to stop (A1111's Interrupt button does the same)."""
        ...

    def sample_renderer(self) -> SampleRenderer: ...

    def lora_renderer(self) -> SampleRenderer:
        """A renderer that loads each prompt's ``<lora:stem:w>`` from the Lora folder (epoch scoring,
        after training: the model is the host's own again)."""
        ...

    def notify_lora_added(self, stem: str, path: Path) -> None:
        """Tell the host's LoRA list about a new file at once (no restart, no refresh click)."""
        ...

    def connect_send_to_txt2img(self, button: Any, infotext: Any) -> None:
        """Wire ``button`` so that clicking it fills txt2img from the text in the ``infotext`` component."""
        ...

    def txt2img_axis_labels(self) -> Sequence[str]:
        """The X/Y/Z plot axis labels of the host's txt2img (to find axes by label)."""
        ...

    def render_grid(self, comparison: EpochComparison, settings: GridSettings, frame: JobFrame) -> GridResult:
        """Render the X/Y/Z comparison on the server (called inside :meth:`exclusive_job`)."""
        ...
