"""Stand-ins for the parts of A1111 v1.10.1's ``modules`` the tab's services use, with the behaviour read
from its source (see /work/a1111/FACTS.md §4-5): ``shared.state`` begin/end/interrupt, the FIFO
``call_queue.queue_lock`` (one non-reentrant lock), ``progress``' task bookkeeping, paste-params
bindings, ``processing``/``images`` for txt2img renders, and the X/Y/Z plot script."""

from __future__ import annotations

import sys
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image


class State:
    """``modules.shared_state.State``: what begin/end/interrupt do to the fields the API reports."""

    def __init__(self):
        self.interrupted = False
        self.stopping_generation = False
        self.job = ""
        self.job_no = 0
        self.job_count = 0
        self.sampling_step = 0
        self.sampling_steps = 0
        self.textinfo = None
        self.current_image = None
        self.history: list[tuple[str, str]] = []

    def begin(self, job: str = "(unknown)"):
        self.interrupted = self.stopping_generation = False
        self.job, self.job_no, self.job_count, self.textinfo = job, 0, -1, None
        self.history.append(("begin", job))

    def end(self):
        self.history.append(("end", self.job))
        self.job, self.job_count = "", 0

    def interrupt(self):
        self.interrupted = True

    def assign_current_image(self, image):
        self.current_image = image


@dataclass
class ParamBinding:
    paste_button: Any
    tabname: str
    source_text_component: Any = None
    source_image_component: Any = None
    source_tabname: Any = None
    override_settings_component: Any = None
    paste_field_names: Any = None


@dataclass
class Processed:
    images: list
    infotexts: list


@dataclass
class Recorder:
    """What the fake processing/images/X/Y/Z saw."""

    processings: list = field(default_factory=list)
    saved: list = field(default_factory=list)
    xyz_runs: list = field(default_factory=list)
    cached_c_at_render: list = field(default_factory=list)
    grids_dir: Path | None = None


class AxisOption:
    def __init__(self, label):
        self.label = label


def install(
    monkeypatch, root: Path, *, cmd_opts: dict | None = None, sd_model: Any = None
) -> types.SimpleNamespace:
    """Put the stand-ins into ``sys.modules`` (undone by ``monkeypatch``) and return them."""
    recorder = Recorder(grids_dir=root / "outputs" / "txt2img-grids")
    modules = {}

    def module(name: str) -> types.ModuleType:
        made = types.ModuleType(f"modules.{name}")
        modules[name] = made
        return made

    shared = module("shared")
    options = {
        "lora_dir": str(root / "models" / "Lora"),
        "lyco_dir_backcompat": str(root / "models" / "LyCORIS"),
        "disable_extension_access": False,
        "lowvram": False,
    }
    options.update(cmd_opts or {})
    shared.cmd_opts = types.SimpleNamespace(**options)
    shared.opts = types.SimpleNamespace(
        data={
            "outdir_samples": "",
            "outdir_txt2img_samples": str(root / "outputs" / "txt2img-images"),
            "outdir_grids": "",
            "outdir_txt2img_grids": str(recorder.grids_dir),
        },
        data_labels={},
    )
    shared.opts.add_option = lambda key, info: (
        shared.opts.data_labels.__setitem__(key, info),
        shared.opts.data.setdefault(key, info.default),
    )
    shared.OptionInfo = lambda default, label, **kwargs: types.SimpleNamespace(
        default=default, label=label, **kwargs
    )
    shared.hide_dirs = {"visible": True}
    shared.restricted_opts = {"outdir_samples"}
    shared.state = State()
    shared.sd_model = sd_model or types.SimpleNamespace(
        sd_checkpoint_info=types.SimpleNamespace(
            title="random-sd15.safetensors [ac6f958213]", sha256="ac6f95" * 10
        )
    )

    call_queue = module("call_queue")
    call_queue.queue_lock = threading.Lock()  # A1111's FIFOLock wraps one threading.Lock

    progress = module("progress")
    progress.current_task = None
    progress.pending_tasks = {}
    progress.finished_tasks = []

    def add_task_to_queue(task_id):
        progress.pending_tasks[task_id] = True

    def start_task(task_id):
        progress.current_task = task_id
        progress.pending_tasks.pop(task_id, None)

    def finish_task(task_id):
        if progress.current_task == task_id:
            progress.current_task = None
        progress.finished_tasks.append(task_id)

    progress.add_task_to_queue, progress.start_task, progress.finish_task = (
        add_task_to_queue,
        start_task,
        finish_task,
    )
    progress.create_task_id = lambda kind: f"task({kind}-TEST{len(progress.finished_tasks)})"

    infotext_utils = module("infotext_utils")
    infotext_utils.ParamBinding = ParamBinding
    infotext_utils.registered_param_bindings = []
    infotext_utils.register_paste_params_button = infotext_utils.registered_param_bindings.append

    paths_internal = module("paths_internal")
    paths_internal.data_path = str(root)
    paths_internal.models_path = str(root / "models")

    sd_vae = module("sd_vae")
    sd_vae.loaded_vae_file = None

    processing = module("processing")

    class StableDiffusionProcessing:
        cached_c = [None, None]
        cached_uc = [None, None]

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)
            self.disable_extra_networks = False
            self.closed = False
            recorder.processings.append(self)

        def close(self):
            self.closed = True

    def process_images(p):
        recorder.cached_c_at_render.append(list(StableDiffusionProcessing.cached_c))
        image = Image.new("RGB", (p.width, p.height), (p.seed % 256, 0, 0))
        infotext = f"{p.prompt}\nSteps: {p.steps}, Seed: {p.seed}, Size: {p.width}x{p.height}"
        StableDiffusionProcessing.cached_c = ["cond of " + p.prompt, 1]  # what a real render leaves behind
        return Processed([image], [infotext])

    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    processing.process_images = process_images

    images = module("images")

    def save_image(
        image,
        path,
        basename,
        seed=None,
        prompt=None,
        extension="png",
        info=None,
        p=None,
        forced_filename=None,
        save_to_dirs=None,
        **_,
    ):
        target = Path(path) / f"{forced_filename}.{extension}"
        target.parent.mkdir(parents=True, exist_ok=True)
        image.save(target)
        recorder.saved.append((target, info))
        return str(target), None

    images.save_image = save_image

    class XyzScript:
        # Prompt S/R deliberately not at A1111's index 7: the services must find axes by label.
        current_axis_options = [
            AxisOption(label)
            for label in (
                "Nothing",
                "Seed",
                "Var. seed",
                "Steps",
                "Distilled CFG Scale",
                "CFG Scale",
                "Hires steps",
                "Sampler",
                "Prompt S/R",
            )
        ]

        def title(self):
            return "X/Y/Z plot"

        def run(self, p, *args):
            recorder.xyz_runs.append((p, args))
            recorder.grids_dir.joinpath("2026-01-01").mkdir(parents=True, exist_ok=True)
            grid = Image.new("RGB", (16, 8))
            grid.save(recorder.grids_dir / "2026-01-01" / "xyz_grid-0000-1.png")
            return Processed([grid], ["grid infotext"])

    class PromptMatrix:
        def title(self):
            return "Prompt matrix"

    scripts = module("scripts")
    scripts.scripts_txt2img = types.SimpleNamespace(selectable_scripts=[PromptMatrix(), XyzScript()])

    script_callbacks = module("script_callbacks")
    script_callbacks.registered = []
    for name in ("on_ui_settings", "on_ui_tabs", "on_app_started"):
        setattr(
            script_callbacks,
            name,
            lambda callback, _name=name: script_callbacks.registered.append((_name, callback)),
        )

    networks = types.ModuleType("networks")
    networks.announced = []
    networks.update_available_networks_by_names = networks.announced.extend

    package = types.ModuleType("modules")
    for name, made in modules.items():
        setattr(package, name, made)
        monkeypatch.setitem(sys.modules, made.__name__, made)
    monkeypatch.setitem(sys.modules, "modules", package)
    monkeypatch.setitem(sys.modules, "networks", networks)
    return types.SimpleNamespace(recorder=recorder, networks=networks, **modules)
