"""The tab's host services inside A1111 v1.10.1.

* Jobs run under ``call_queue.queue_lock`` (the lock every txt2img, API call and checkpoint switch
  takes) and are framed like A1111's own: the task is announced to the progress API first (so the
  page shows "in queue"), then ``shared.state.begin``/``end``; A1111's Interrupt button sets
  ``shared.state.interrupted``, which the job reads.
* New epochs are announced to the built-in Lora extension (``networks``) by stem.
* "Compare in txt2img" is A1111's paste-params mechanism; "Render grid here" runs the X/Y/Z plot
  script on the server, which saves the grid where A1111 saves grids.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lib_lora_trainer.dataset.crop import FaceFinder, HaarFaceFinder
from lib_lora_trainer.model.host import HostRefused
from lib_lora_trainer.outputs.compare import XYZ_SCRIPT_TITLE, EpochComparison, xyz_script_args
from lib_lora_trainer.paths import PathPolicy, safe_relative_subfolder
from lib_lora_trainer.ui.services import GridResult, GridSettings, JobFrame, TabDefaults
from lib_lora_trainer.webui import settings
from lib_lora_trainer.webui.samples import A1111SampleRenderer, pinned_checkpoint_settings

logger = logging.getLogger(__name__)


@dataclass
class A1111JobFrame:
    """Progress and interrupts of a job through ``shared.state`` (what /internal/progress reports)."""

    task_id: str

    def progress(self, step: int, total: int, text: str) -> None:
        from modules import shared

        state = shared.state
        state.job_count = max(int(total), 1)
        state.job_no = min(int(step), state.job_count)
        state.sampling_step = 0  # a preview render leaves its sampler progress behind
        state.sampling_steps = 0
        state.textinfo = text

    def begin_phase(self) -> None:
        # /internal/progress reckons the ETA from state.time_start: each phase (latent caching,
        # training) gets its own, instead of the preparation's minutes inflating the training ETA
        from modules import shared

        shared.state.time_start = time.time()

    def interrupted(self) -> bool:
        from modules import shared

        return bool(shared.state.interrupted or getattr(shared.state, "stopping_generation", False))


FORM_MEMORY_NAME = "lora_char_trainer-last-form.json"
FORGE_MESSAGE = (
    "This is Stable Diffusion WebUI Forge, whose model backend the trainer cannot train on; use it in "
    "AUTOMATIC1111 v1.10 (the trainer refuses to start here)."
)


def is_forge() -> bool:
    """Forge (and reForge) ship the ``modules_forge`` package beside ``modules``; A1111 does not."""
    if "modules_forge" in sys.modules:
        return True
    try:
        return importlib.util.find_spec("modules_forge") is not None
    except (ImportError, ValueError):
        return False


class A1111Services:
    """:class:`~lib_lora_trainer.ui.services.HostServices` over the running WebUI."""

    title = "AUTOMATIC1111"

    # --- model ------------------------------------------------------------------------------------
    def training_host(self):
        from modules import shared

        from lib_lora_trainer.webui.host import A1111Host

        if is_forge():
            raise HostRefused(FORGE_MESSAGE)
        if shared.sd_model is None:
            raise HostRefused("No Stable Diffusion checkpoint is loaded; load an SD1.5 checkpoint first.")
        return A1111Host()

    def face_finder(self) -> FaceFinder | None:
        # A1111's own autocrop needs the YuNet model (downloaded) and its Haar fallback fails on the
        # first face it finds; OpenCV's Haar cascade ships with cv2 and works offline.
        return HaarFaceFinder()

    def vae_id(self) -> str:
        from modules import sd_vae, shared

        info = getattr(shared.sd_model, "sd_checkpoint_info", None)
        checkpoint = (
            getattr(info, "sha256", None) or getattr(info, "shorthash", None) or getattr(info, "title", "")
        )
        vae = getattr(sd_vae, "loaded_vae_file", None) or "checkpoint VAE"
        return f"{checkpoint}|{vae}"

    # --- folders ----------------------------------------------------------------------------------
    def defaults(self) -> TabDefaults:
        # When the WebUI is reachable from other machines, the folders that confine paths (and the one
        # ONNX models are loaded from) are the fixed defaults: any user of the UI, or of
        # /sdapi/v1/options without --api-auth, can change a setting.
        folder = settings.default if self._confined() else settings.value
        return TabDefaults(
            dataset_dir=str(folder("lct_datasets_dir")),
            tagger_models_dir=str(folder("lct_tagger_models_dir")),
            lora_subfolder=str(settings.value("lct_lora_subfolder")),
            samples_subfolder=str(settings.value("lct_samples_subfolder")),
            allow_tagger_download=bool(settings.value("lct_allow_tagger_download")),
            scorer_models_dir=str(settings.value("lct_scorer_models_dir")),
            allow_scorer_download=bool(settings.value("lct_allow_scorer_download")),
        )

    def lora_roots(self) -> list[Path]:
        from modules import shared

        roots = [
            getattr(shared.cmd_opts, "lora_dir", ""),
            getattr(shared.cmd_opts, "lyco_dir_backcompat", ""),
        ]
        return [Path(root) for root in roots if root]

    def txt2img_root(self) -> Path:
        from modules import shared

        opts = shared.opts
        base = (
            opts.data.get("outdir_samples")
            or opts.data.get("outdir_txt2img_samples")
            or "outputs/txt2img-images"
        )
        return Path(os.path.abspath(base))

    def samples_root(self) -> Path:
        """Under the txt2img output folder, where Infinite Image Browser looks without any setup."""
        return self.txt2img_root() / safe_relative_subfolder(self.defaults().samples_subfolder)

    def grids_root(self) -> Path:
        from modules import shared

        opts = shared.opts
        base = (
            opts.data.get("outdir_grids") or opts.data.get("outdir_txt2img_grids") or "outputs/txt2img-grids"
        )
        return Path(os.path.abspath(base))

    @staticmethod
    def _confined() -> bool:
        """A1111 sets ``disable_extension_access`` for --listen, --share and --server-name unless
        --enable-insecure-extension-access is given."""
        from modules import shared

        return bool(getattr(shared.cmd_opts, "disable_extension_access", False))

    def path_policy(self) -> PathPolicy:
        """Confined when the WebUI listens beyond localhost and insecure extension access is off; the
        roots are then the WebUI's own datasets folder and the Lora folders of the command line."""
        return PathPolicy.create(self._confined(), [self.defaults().dataset_dir, *self.lora_roots()])

    def form_memory_path(self) -> Path:
        """Beside the WebUI's config.json (in --data-dir)."""
        from modules.paths_internal import data_path

        return Path(data_path) / FORM_MEMORY_NAME

    # --- jobs -------------------------------------------------------------------------------------
    def new_task_id(self, kind: str) -> str:
        from modules import progress

        return progress.create_task_id(kind)

    @contextlib.contextmanager
    def exclusive_job(self, task_id: str, title: str) -> Iterator[JobFrame]:
        from modules import call_queue, progress, shared

        progress.add_task_to_queue(task_id)
        with call_queue.queue_lock:
            shared.state.begin(job=task_id)
            shared.state.textinfo = title
            progress.start_task(task_id)
            try:
                yield A1111JobFrame(task_id)
            finally:
                progress.finish_task(task_id)
                shared.state.end()

    def request_interrupt(self) -> None:
        from modules import shared

        shared.state.interrupt()

    # --- outputs ----------------------------------------------------------------------------------
    def sample_renderer(self) -> A1111SampleRenderer:
        roots = self.lora_roots()
        folder = roots[0] / safe_relative_subfolder(self.defaults().lora_subfolder) if roots else None
        return A1111SampleRenderer(lora_folder=folder)

    def lora_renderer(self) -> A1111SampleRenderer:
        """txt2img with the Lora extension loading each prompt's epoch from disk (epoch scoring)."""
        return A1111SampleRenderer(apply_lora_tags=True)

    def notify_lora_added(self, stem: str, path: Path) -> None:
        networks = sys.modules.get("networks")
        if networks is None:
            logger.info("the built-in Lora extension is not loaded; %s is on disk", stem)
            return
        networks.update_available_networks_by_names([stem])
        _forget_lora_page_listing()

    def connect_send_to_txt2img(self, button: Any, infotext: Any) -> None:
        from modules import infotext_utils

        binding = infotext_utils.ParamBinding(
            paste_button=button, tabname="txt2img", source_text_component=infotext
        )
        infotext_utils.register_paste_params_button(binding)

    @staticmethod
    def _xyz_script():
        from modules import scripts

        runner = scripts.scripts_txt2img
        for script in getattr(runner, "selectable_scripts", []):
            if script.title() == XYZ_SCRIPT_TITLE:
                return script
        raise RuntimeError("The X/Y/Z plot script is not loaded in txt2img.")

    def txt2img_axis_labels(self) -> Sequence[str]:
        script = self._xyz_script()
        options = getattr(script, "current_axis_options", None)
        if options is None:
            raise RuntimeError("The X/Y/Z plot script has no axis list yet (its UI was not built).")
        return [option.label for option in options]

    def render_grid(self, comparison: EpochComparison, settings: GridSettings, frame: JobFrame) -> GridResult:
        from contextlib import closing

        from modules import processing, shared

        script = self._xyz_script()
        args = xyz_script_args(comparison, self.txt2img_axis_labels())
        started = time.time()
        p = processing.StableDiffusionProcessingTxt2Img(
            sd_model=shared.sd_model,
            outpath_samples=str(self.txt2img_root()),
            outpath_grids=str(self.grids_root()),
            prompt=comparison.prompt,
            negative_prompt=comparison.negative_prompt,
            seed=comparison.seeds[0],
            steps=settings.steps,
            sampler_name=settings.sampler,
            cfg_scale=settings.cfg_scale,
            width=settings.width,
            height=settings.height,
            override_settings=pinned_checkpoint_settings(),
            override_settings_restore_afterwards=True,
        )
        with closing(p):
            processed = script.run(p, *args)
        if processed is None or not processed.images:
            raise RuntimeError("X/Y/Z plot produced no grid (interrupted, or see the WebUI console).")
        return GridResult(
            processed.images[0], _newest_grid(self.grids_root(), started), processed.infotexts[0]
        )


def _newest_grid(folder: Path, since: float) -> Path | None:
    """The grid X/Y/Z plot just saved (it does not return its path); None when grids are not saved."""
    newest: tuple[float, Path] | None = None
    if not folder.is_dir():
        return None
    for path in folder.rglob("xyz_grid-*"):
        mtime = path.stat().st_mtime
        if mtime >= since - 1 and (newest is None or mtime > newest[0]):
            newest = (mtime, path)
    return newest[1] if newest else None


def _forget_lora_page_listing() -> None:
    """The Lora cards page caches its folder listings (``util.MassFileLister``): forget them, so that the
    page's single-card route (what the tab's JavaScript asks for the new epoch) sees the new file's preview
    and card JSON. Only the Lora page: embeddings and checkpoints are left alone."""
    try:
        from modules import ui_extra_networks
    except ImportError:
        return
    for page in getattr(ui_extra_networks, "extra_pages", []):
        lister = getattr(page, "lister", None)
        if getattr(page, "name", "") == "lora" and lister is not None:
            lister.reset()
