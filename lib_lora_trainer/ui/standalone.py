"""The tab outside A1111: host services over the stand-alone model host, and a small gradio app.

The app hosts the real tab over a tiny random model (or any :class:`StandaloneHost`) next to a
stand-in for A1111's txt2img tab (prompt, sampling fields and the X/Y/Z plot fields), so the whole
workflow, "Compare in txt2img" included, runs in a browser without A1111: the browser test drives it,
and ``python -m lib_lora_trainer.ui.standalone --root FOLDER`` lets a person try the tab.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from lib_lora_trainer.dataset.crop import FaceFinder, HaarFaceFinder
from lib_lora_trainer.model.host import HostOptions
from lib_lora_trainer.model.standalone import StandaloneHost, build_random_host
from lib_lora_trainer.network.adapters import attached_adapters, settings_from_weights, targets_from_weights
from lib_lora_trainer.network.plan import load_saved_network
from lib_lora_trainer.outputs.compare import (
    NOTHING_LABEL,
    PROMPT_SR_LABEL,
    SEED_LABEL,
    XYZ_SCRIPT_TITLE,
    EpochComparison,
    to_infotext,
)
from lib_lora_trainer.outputs.samples import (
    EulerSampleRenderer,
    RenderedSample,
    SampleRequest,
    format_infotext,
    save_sample,
)
from lib_lora_trainer.paths import PathPolicy
from lib_lora_trainer.ui.jobs import TrainingJobs
from lib_lora_trainer.ui.services import GridResult, GridSettings, JobFrame, TabDefaults

logger = logging.getLogger(__name__)

# The first axis options of A1111 v1.10.1's txt2img X/Y/Z plot, in its order.
AXIS_LABELS = (
    NOTHING_LABEL,
    SEED_LABEL,
    "Var. seed",
    "Var. strength",
    "Steps",
    "Hires steps",
    "CFG scale",
    PROMPT_SR_LABEL,
    "Prompt order",
    "Sampler",
)
SCRIPT_CHOICES = ("None", XYZ_SCRIPT_TITLE)
PASTE_FIELDS = (
    "Prompt",
    "Negative prompt",
    "Steps",
    "Sampler",
    "CFG scale",
    "Seed",
    "Script",
    "X Type",
    "X Values",
    "Y Type",
    "Y Values",
    "Z Type",
    "Z Values",
)
FORM_MEMORY_NAME = "lora_char_trainer-last-form.json"
STYLE_SHEET = Path(__file__).resolve().parents[2] / "style.css"  # the extension's own, as A1111 loads it
LORA_TAG = re.compile(r"<lora:([^:>]+):([0-9.]+)>")
KEY_VALUE = re.compile(r'\s*([\w][\w \-/]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Generation parameters text -> {"Prompt", "Negative prompt", key: value ...} (JSON quotes undone)."""
    lines = text.strip().split("\n")
    parameters = lines.pop() if lines and KEY_VALUE.match(lines[-1]) and ":" in lines[-1] else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in KEY_VALUE.findall(parameters):
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            with contextlib.suppress(ValueError):
                value = json.loads(value)
        result[key.strip()] = value
    return result


@dataclass
class _Frame:
    task_id: str
    services: StandaloneServices
    reports: list[tuple[int, int, str]] = field(default_factory=list)
    phases_begun: int = 0

    def progress(self, step: int, total: int, text: str) -> None:
        self.reports.append((step, total, text))

    def begin_phase(self) -> None:
        self.phases_begun += 1

    def interrupted(self) -> bool:
        return self.services.interrupt_event.is_set()


@dataclass
class Generation:
    """A stand-in txt2img request: when it waited for the lock and when it ran."""

    prompt: str
    requested_at: float
    started_at: float = 0.0
    finished_at: float = 0.0


class StandaloneServices:
    """:class:`~lib_lora_trainer.ui.services.HostServices` over a :class:`StandaloneHost`."""

    title = "stand-alone test model"

    def __init__(
        self,
        host: StandaloneHost,
        root: str | Path,
        *,
        confined: bool = False,
        decode=None,
        face_finder: FaceFinder | None = None,
    ):
        self.host = host
        self.root = Path(root)
        self.lora_dir = self.root / "models" / "Lora"
        self.samples_dir = self.root / "outputs" / "txt2img-images"
        self.grids_dir = self.root / "outputs" / "txt2img-grids"
        self.datasets_dir = self.root / "datasets"
        self.tagger_dir = self.root / "models" / "wd14_tagger"
        self.scorer_dir = self.root / "models" / "lora_trainer_scorers"
        for folder in (self.lora_dir, self.samples_dir, self.grids_dir, self.datasets_dir, self.tagger_dir):
            folder.mkdir(parents=True, exist_ok=True)
        self.confined = confined
        self._decode = decode or _vae_decoder(host)
        self._face_finder = face_finder
        self.gpu_lock = threading.Lock()
        self.interrupt_event = threading.Event()
        self.announced: list[str] = []
        self.generations: list[Generation] = []
        self.frames: list[_Frame] = []
        self.txt2img_fields: list[Any] = []
        self.txt2img_tabs: Any = None

    # --- model and folders --------------------------------------------------------------------------
    def training_host(self) -> StandaloneHost:
        return self.host

    def face_finder(self) -> FaceFinder | None:
        return self._face_finder or HaarFaceFinder()

    def vae_id(self) -> str:
        return self.host.base_model_info().name

    def defaults(self) -> TabDefaults:
        return TabDefaults(
            dataset_dir=str(self.datasets_dir),
            tagger_models_dir=str(self.tagger_dir),
            allow_tagger_download=False,
            scorer_models_dir=str(self.scorer_dir),
            allow_scorer_download=False,
        )

    def lora_roots(self) -> list[Path]:
        return [self.lora_dir]

    def samples_root(self) -> Path:
        return self.samples_dir / self.defaults().samples_subfolder

    def path_policy(self) -> PathPolicy:
        return PathPolicy.create(self.confined, [self.datasets_dir, self.lora_dir])

    def form_memory_path(self) -> Path:
        return self.root / FORM_MEMORY_NAME

    # --- jobs ---------------------------------------------------------------------------------------
    def new_task_id(self, kind: str) -> str:
        return f"task({kind}-{time.time_ns() % 10**10:010d})"

    @contextlib.contextmanager
    def exclusive_job(self, task_id: str, title: str) -> Iterator[JobFrame]:
        with self.gpu_lock:
            self.interrupt_event.clear()
            frame = _Frame(task_id, self)
            self.frames.append(frame)
            logger.info("%s (%s) holds the model", title, task_id)
            yield frame

    def request_interrupt(self) -> None:
        self.interrupt_event.set()

    def generate(self, prompt: str, seed: int = 1, size: int = 64, steps: int = 4) -> Image.Image:
        """A stand-in txt2img generation: waits for the model like A1111's queue does."""
        record = Generation(prompt, requested_at=time.time())
        self.generations.append(record)
        with self.gpu_lock:
            record.started_at = time.time()
            request = SampleRequest(prompt, "", seed, steps, "Euler", 7.0, size, size)
            image = self.sample_renderer().render_image(request)
            record.finished_at = time.time()
        return image

    # --- outputs ------------------------------------------------------------------------------------
    def sample_renderer(self) -> EulerSampleRenderer:
        return EulerSampleRenderer(self.host, self._decode, model_name=self.host.base_model_info().name)

    def lora_renderer(self) -> _LoraTagRenderer:
        """Renders with each prompt's ``<lora:stem:w>`` loaded from the Lora folder (epoch scoring)."""
        return _LoraTagRenderer(self)

    def notify_lora_added(self, stem: str, path: Path) -> None:
        self.announced.append(stem)

    def txt2img_axis_labels(self) -> Sequence[str]:
        return AXIS_LABELS

    def connect_send_to_txt2img(self, button: Any, infotext: Any) -> None:
        if not self.txt2img_fields:
            return
        outputs = list(self.txt2img_fields) + ([self.txt2img_tabs] if self.txt2img_tabs is not None else [])

        def paste(text: str):
            import gradio as gr

            values = parse_infotext(text or "")
            updates = [_typed(name, values[name]) if name in values else gr.update() for name in PASTE_FIELDS]
            if self.txt2img_tabs is not None:
                updates.append(gr.Tabs.update(selected="txt2img"))
            return updates

        button.click(paste, [infotext], outputs)

    def render_grid(self, comparison: EpochComparison, settings: GridSettings, frame: JobFrame) -> GridResult:
        """The X/Y/Z grid of the comparison, each cell rendered with that epoch's file loaded."""
        renderer = self.sample_renderer()
        weights = comparison.weight_tokens or (None,)
        cells: list[list[list[Image.Image]]] = []
        total, done = len(weights) * len(comparison.seeds) * len(comparison.stems), 0
        for weight_token in weights:
            rows = []
            for seed in comparison.seeds:
                row = []
                for stem in comparison.stems:
                    prompt = comparison.prompt.replace(comparison.stems[0], stem)
                    if weight_token:
                        prompt = prompt.replace(comparison.weight_tokens[0], weight_token)
                    request = SampleRequest(
                        prompt,
                        comparison.negative_prompt,
                        seed,
                        settings.steps,
                        settings.sampler,
                        settings.cfg_scale,
                        settings.width,
                        settings.height,
                    )
                    row.append(self._render_with_lora(renderer, request))
                    done += 1
                    frame.progress(done, total, f"Grid cell {done}/{total}")
                    if frame.interrupted():
                        raise RuntimeError("The grid was interrupted.")
                rows.append(row)
            cells.append(rows)
        grid = _compose_grid(cells, list(comparison.stems), [str(s) for s in comparison.seeds], weights)
        infotext = to_infotext(
            comparison,
            steps=settings.steps,
            sampler=settings.sampler,
            cfg_scale=settings.cfg_scale,
            width=settings.width,
            height=settings.height,
        )
        path = save_sample(grid, infotext, self.grids_dir, "xyz_grid")
        return GridResult(grid, path, infotext)

    def _render_with_lora(self, renderer: EulerSampleRenderer, request: SampleRequest) -> Image.Image:
        match = LORA_TAG.search(request.prompt)
        if match is None:
            return renderer.render_image(request)
        stem, weight = match.group(1), float(match.group(2))
        files = [path for root in self.lora_roots() for path in root.rglob(f"{stem}.safetensors")]
        if not files:
            raise RuntimeError(f"LoRA {stem} was not found in the Lora folder")
        saved = load_saved_network(files[0])
        if weight <= 0:
            return renderer.render_image(request)
        with self.host.session(HostOptions(train_text_encoder=True)):
            targets = targets_from_weights(saved.weights)
            settings = settings_from_weights(saved.weights, saved.network_args)
            with attached_adapters(self.host.unet(), self.host.text_encoder(), targets, settings) as adapters:
                adapters.load(saved.weights)
                if weight != 1:
                    for _, layer in adapters.layers():
                        adapters.kind.scale_update(layer, weight)
                return renderer.render_image(request)  # it leaves the <lora:...> tag out of the prompt


@dataclass
class _LoraTagRenderer:
    services: StandaloneServices

    def render(self, requests: Sequence[SampleRequest], folder: Path, file_stem: str) -> list[RenderedSample]:
        renderer = self.services.sample_renderer()
        results = []
        for index, request in enumerate(requests):
            image = self.services._render_with_lora(renderer, request)
            infotext = format_infotext(request, sampler=renderer.sampler_name, model_name=renderer.model_name)
            name = file_stem if len(requests) == 1 else f"{file_stem}-{index:02d}"
            path = save_sample(image, infotext, folder, name)
            results.append(RenderedSample(request, image, infotext, path))
        return results


def _typed(name: str, value: str) -> Any:
    """A pasted value as its stand-in field wants it (numbers for the number boxes)."""
    if name == "Steps":
        return int(float(value))
    if name == "CFG scale":
        return float(value)
    return value


def _vae_decoder(host: StandaloneHost):
    vae = host.vae()

    def decode(latents: torch.Tensor) -> torch.Tensor:
        return vae.decode(latents.to(next(vae.parameters()).dtype))

    return decode


def _compose_grid(cells, x_labels: list[str], y_labels: list[str], z_labels) -> Image.Image:
    tile_w, tile_h = cells[0][0][0].size
    label_w, label_h = 110, 24
    blocks = []
    for z_index, rows in enumerate(cells):
        width = label_w + tile_w * len(x_labels)
        height = label_h * 2 + tile_h * len(y_labels)
        block = Image.new("RGB", (width, height), "white")
        draw = ImageDraw.Draw(block)
        z_text = z_labels[z_index]
        if z_text:
            draw.text((4, 4), f"weight {z_text.strip(':>')}", fill="black")
        for x_index, text in enumerate(x_labels):
            draw.text((label_w + x_index * tile_w + 4, label_h + 4), text, fill="black")
        for y_index, row in enumerate(rows):
            draw.text((4, label_h * 2 + y_index * tile_h + 4), y_labels[y_index], fill="black")
            for x_index, tile in enumerate(row):
                block.paste(tile, (label_w + x_index * tile_w, label_h * 2 + y_index * tile_h))
        blocks.append(block)
    grid = Image.new("RGB", (blocks[0].width, sum(b.height for b in blocks)), "white")
    top = 0
    for block in blocks:
        grid.paste(block, (0, top))
        top += block.height
    return grid


def build_app(services: StandaloneServices, jobs: TrainingJobs | None = None):
    """A gradio app with a stand-in txt2img tab and the real "Train Character LoRA" tab."""
    import gradio as gr

    from lib_lora_trainer.ui.tab import TAB_TITLE, build_tab

    jobs = jobs or TrainingJobs(services)
    # System fonts only: the default theme would fetch Google fonts, and the app must work offline.
    theme = gr.themes.Default(font=["Helvetica", "Arial", "sans-serif"], font_mono=["monospace"])
    css = STYLE_SHEET.read_text(encoding="utf-8") if STYLE_SHEET.is_file() else None
    app = gr.Blocks(
        title="Character LoRA Trainer (stand-alone)", analytics_enabled=False, theme=theme, css=css
    )
    with app, gr.Tabs(elem_id="tabs") as tabs:
        with gr.Tab("txt2img (stand-in)", id="txt2img", elem_id="tab_txt2img"):
            services.txt2img_fields = _txt2img_stand_in(services)
        with gr.Tab(TAB_TITLE, id="lora_char_trainer", elem_id="tab_lora_char_trainer"):
            services.txt2img_tabs = tabs
            build_tab(services, jobs)  # created inside the app's Blocks, so rendered into it
    return app


def _txt2img_stand_in(services: StandaloneServices) -> list[Any]:
    import gradio as gr

    prompt = gr.Textbox(label="Prompt", lines=2, elem_id="txt2img_prompt")
    negative = gr.Textbox(label="Negative prompt", elem_id="txt2img_neg_prompt")
    with gr.Row():
        steps = gr.Number(label="Sampling steps", value=20, precision=0, elem_id="txt2img_steps")
        sampler = gr.Textbox(label="Sampler", value="Euler a", elem_id="txt2img_sampler")
        cfg = gr.Number(label="CFG Scale", value=7.0, elem_id="txt2img_cfg_scale")
        seed = gr.Textbox(label="Seed", value="-1", elem_id="txt2img_seed")
    script = gr.Dropdown(label="Script", choices=list(SCRIPT_CHOICES), value="None", elem_id="script_list")
    axes = []
    for axis in ("x", "y", "z"):
        with gr.Row():
            axes.append(
                gr.Dropdown(
                    label=f"{axis.upper()} type",
                    choices=list(AXIS_LABELS),
                    value=NOTHING_LABEL,
                    elem_id=f"script_txt2img_xyz_plot_{axis}_type",
                )
            )
            axes.append(
                gr.Textbox(label=f"{axis.upper()} values", elem_id=f"script_txt2img_xyz_plot_{axis}_values")
            )
    generate = gr.Button("Generate", elem_id="txt2img_generate")
    output = gr.Image(label="Output", type="pil", elem_id="txt2img_gallery")
    generate.click(lambda text: services.generate(text or ""), [prompt], [output])
    return [prompt, negative, steps, sampler, cfg, seed, script, *axes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Try the Train Character LoRA tab on a tiny random model.")
    parser.add_argument("--root", required=True, help="folder for datasets, Lora files and outputs")
    parser.add_argument("--port", type=int, default=7870)
    parser.add_argument("--confined", action="store_true", help="confine paths as a non-local WebUI does")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    services = StandaloneServices(build_random_host("tiny"), args.root, confined=args.confined)
    app = build_app(services)
    app.queue(64)  # as A1111's webui.py: 64 events at once (the browser test runs with 1)
    app.launch(server_name="127.0.0.1", server_port=args.port)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
