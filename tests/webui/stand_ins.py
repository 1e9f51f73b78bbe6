"""Stand-ins for the parts of A1111 v1.10.1's ``modules`` the tab's services use, with the behaviour read
from its source (see /work/a1111/FACTS.md §4-5): ``shared.state`` begin/end/interrupt, the FIFO
``call_queue.queue_lock`` (one non-reentrant lock), ``progress``' task bookkeeping, paste-params
bindings, ``processing``/``images`` for txt2img renders, ``sd_models`` reloads and unloads, and the
X/Y/Z plot script.

``processing.process_images`` follows v1.10.1's order: the checkpoint override (``reload_model_weights``
when the pinned title is not in ``checkpoint_aliases``, and after setting it), one more
``reload_model_weights`` per batch, ``p.prompts`` stripped of extra-network tags
(``parse_extra_network_prompts``), the full prompts put back only when ``p.scripts`` is set, and the
infotext made by ``create_infotext`` from ``p.prompts``. ``sd_models.reload_model_weights`` reloads
(records it and changes the model) when the chosen checkpoint is not the loaded one or FP8 storage
changed; ``unload_model_weights`` calls ``send_model_to_cpu`` by its module name, as A1111 does."""

from __future__ import annotations

import functools
import json
import re
import sys
import tempfile
import threading
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn


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
    reloads: list = field(default_factory=list)  # (reason, checkpoint title) of every weights reload
    moved_to_cpu: list = field(default_factory=list)
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
            title="random-sd15.safetensors [ac6f958213]", sha256="ac6f95" * 10, name_for_extra="random-sd15"
        ),
        sd_model_hash="ac6f958213",
        fp8=False,
    )
    shared.opts.data["sd_model_checkpoint"] = shared.sd_model.sd_checkpoint_info.title
    shared.opts.data["fp8_storage"] = "Disable"

    devices = module("devices")
    devices.fp8 = False

    sd_models = module("sd_models")
    sd_models.checkpoint_aliases = {
        shared.sd_model.sd_checkpoint_info.title: shared.sd_model.sd_checkpoint_info,
    }

    def reload_model_weights(sd_model=None, info=None, forced_reload=False):
        model = sd_model or shared.sd_model
        wanted = info.title if info is not None else shared.opts.data["sd_model_checkpoint"]
        fp8_wanted = shared.opts.data["fp8_storage"] != "Disable"
        if model.fp8 != fp8_wanted:  # check_fp8(sd_model) != devices.fp8: load from the file again
            recorder.reloads.append(("fp8", wanted))
            model.fp8 = devices.fp8 = fp8_wanted
        elif model.sd_checkpoint_info.title != wanted:
            recorder.reloads.append(("checkpoint", wanted))
            model.sd_checkpoint_info = types.SimpleNamespace(title=wanted, name_for_extra=wanted)
        return model

    def send_model_to_cpu(m):
        recorder.moved_to_cpu.append(m)

    def unload_model_weights(sd_model=None, info=None):
        sd_models.send_model_to_cpu(sd_model or shared.sd_model)
        return sd_model

    sd_models.reload_model_weights = reload_model_weights
    sd_models.send_model_to_cpu = send_model_to_cpu
    sd_models.unload_model_weights = unload_model_weights

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
    re_extra_net = re.compile(r"<(\w+):([^>]+)>")  # modules.extra_networks.re_extra_net

    class StableDiffusionProcessing:
        cached_c = [None, None]
        cached_uc = [None, None]

    class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
        def __init__(self, **kwargs):
            self.override_settings = {}
            self.extra_generation_params = {}
            self.__dict__.update(kwargs)
            self.extra_generation_params = dict(self.extra_generation_params or {})
            self.disable_extra_networks = False
            self.scripts = None
            self.batch_size = 1
            self.closed = False
            recorder.processings.append(self)

        def close(self):
            self.closed = True

    def quote(text):  # infotext_utils.quote
        text = str(text)
        if "," not in text and "\n" not in text and ":" not in text:
            return text
        return json.dumps(text, ensure_ascii=False)

    def create_infotext(
        p,
        all_prompts,
        all_seeds,
        all_subseeds,
        comments=None,
        iteration=0,
        position_in_batch=0,
        use_main_prompt=False,
        index=None,
        all_negative_prompts=None,
    ):
        index = position_in_batch + iteration * p.batch_size if index is None else index
        negatives = p.all_negative_prompts if all_negative_prompts is None else all_negative_prompts
        params = {
            "Steps": p.steps,
            "Sampler": p.sampler_name,
            "CFG scale": p.cfg_scale,
            "Seed": all_seeds[index],
            "Size": f"{p.width}x{p.height}",
            "Model hash": p.sd_model_hash,
            "Model": p.sd_model_name,
            **p.extra_generation_params,
        }
        text = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
        negative = f"\nNegative prompt: {negatives[index]}" if negatives[index] else ""
        return f"{all_prompts[index]}{negative}\n{text}".strip()

    def process_images(p):
        # as A1111 v1.10.1: only the keys the settings already hold are restored afterwards
        stored = {k: shared.opts.data[k] for k in p.override_settings if k in shared.opts.data}
        try:
            if sd_models.checkpoint_aliases.get(p.override_settings.get("sd_model_checkpoint")) is None:
                p.override_settings.pop("sd_model_checkpoint", None)
                sd_models.reload_model_weights()
            for key, value in p.override_settings.items():
                shared.opts.data[key] = value
                if key == "sd_model_checkpoint":
                    sd_models.reload_model_weights()
            return process_images_inner(p)
        finally:
            if p.override_settings_restore_afterwards:
                shared.opts.data.update(stored)

    def process_images_inner(p):
        p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
        p.sd_model_hash = getattr(shared.sd_model, "sd_model_hash", None)
        p.all_prompts, p.all_negative_prompts = [p.prompt], [p.negative_prompt]
        p.all_seeds, p.all_subseeds = [p.seed], [p.seed + 1]
        sd_models.reload_model_weights()  # model can be changed for example by refiner
        p.prompts, p.negative_prompts, p.seeds = (
            list(p.all_prompts),
            list(p.all_negative_prompts),
            p.all_seeds,
        )
        p.prompts = [re_extra_net.sub("", prompt) for prompt in p.prompts]  # parse_extra_network_prompts
        if not p.disable_extra_networks:
            names = [m.group(2).split(":")[0] for m in re_extra_net.finditer(p.all_prompts[0])]
            p.extra_generation_params["Lora hashes"] = ", ".join(f"{n}: {'0' * 12}" for n in names)
        recorder.cached_c_at_render.append(list(StableDiffusionProcessing.cached_c))
        image = Image.new("RGB", (p.width, p.height), (p.seed % 256, 0, 0))
        StableDiffusionProcessing.cached_c = ["cond of " + p.prompt, 1]  # what a real render leaves behind
        if p.scripts is not None:
            p.prompts = p.all_prompts[:1]
        infotext = create_infotext(
            p, p.prompts, p.seeds, p.all_subseeds, index=0, all_negative_prompts=p.negative_prompts
        )
        return Processed([image], [infotext])

    processing.StableDiffusionProcessing = StableDiffusionProcessing
    processing.StableDiffusionProcessingTxt2Img = StableDiffusionProcessingTxt2Img
    processing.process_images = process_images
    processing.create_infotext = create_infotext

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

    ui_extra_networks = module("ui_extra_networks")

    class Lister:  # util.MassFileLister
        def __init__(self):
            self.resets = 0

        def reset(self):
            self.resets += 1

    ui_extra_networks.extra_pages = [
        types.SimpleNamespace(name=name, lister=Lister())
        for name in ("textual inversion", "lora", "checkpoints")
    ]

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


# --- A1111's SD1 prompt encoder (precision helper) ---------------------------------------------------
@functools.lru_cache(maxsize=1)
def tiny_clip_tokenizer():
    """A real transformers ``CLIPTokenizer`` over CLIP's 512 byte-level base tokens (no merges): each
    character is one token, ``,</w>`` exists (so A1111's comma backtrack can be exercised). Fits the tiny
    text encoder's 1000-word vocabulary."""
    import json

    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    characters = list(bytes_to_unicode().values())
    vocab = characters + [c + "</w>" for c in characters] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


class FrozenCLIPEmbedderWithCustomWords(nn.Module):
    """A1111 v1.10.1's SD1 prompt encoder (``modules/sd_hijack_clip.py``), written here from its source:
    prompt parsing unless ``opts.emphasis`` is "None", 75-token chunks of BOS + tokens + EOS padding
    + EOS with the comma backtrack (``opts.comma_padding_backtrack``), BREAK starts a chunk, the batch
    padded with empty chunks, clip skip from ``opts.CLIP_stop_at_last_layers`` (hidden_states[-N] and the
    final layer norm), "Original" emphasis (weights, then the mean restored) on every chunk.

    ``parse`` stands in for ``prompt_parser.parse_prompt_attention``; ``opts`` is ``shared.opts``."""

    def __init__(self, tokenizer, transformer, opts, parse, hijack=None):
        super().__init__()
        self.wrapped = nn.Module()  # ldm's FrozenCLIPEmbedder: .tokenizer and .transformer
        self.wrapped.tokenizer = tokenizer
        self.wrapped.transformer = transformer
        self.opts = opts
        self.parse = parse
        self.hijack = hijack or types.SimpleNamespace(fixes=None)
        self.chunk_length = 75
        self.comma_token = tokenizer.get_vocab().get(",</w>")
        self.id_start = tokenizer.bos_token_id
        self.id_end = tokenizer.eos_token_id
        self.calls = 0

    def _opt(self, key, default):
        return getattr(self.opts, key, self.opts.data.get(key, default))

    def tokenize(self, texts):
        return self.wrapped.tokenizer(texts, truncation=False, add_special_tokens=False)["input_ids"]

    def tokenize_line(self, line):
        parsed = self.parse(line) if self._opt("emphasis", "Original") != "None" else [[line, 1.0]]
        tokenized = self.tokenize([text for text, _ in parsed])
        chunks = []
        tokens, multipliers = [], []
        backtrack = self._opt("comma_padding_backtrack", 20)
        last_comma = -1

        def next_chunk():
            nonlocal tokens, multipliers, last_comma
            to_add = self.chunk_length - len(tokens)
            if to_add > 0:
                tokens += [self.id_end] * to_add
                multipliers += [1.0] * to_add
            chunks.append(([self.id_start] + tokens + [self.id_end], [1.0] + multipliers + [1.0]))
            tokens, multipliers, last_comma = [], [], -1

        for ids, (text, weight) in zip(tokenized, parsed, strict=True):
            if text == "BREAK" and weight == -1:
                next_chunk()
                continue
            for token in ids:
                if token == self.comma_token:
                    last_comma = len(tokens)
                elif (
                    backtrack != 0
                    and len(tokens) == self.chunk_length
                    and last_comma != -1
                    and len(tokens) - last_comma <= backtrack
                ):
                    moved_tokens, moved_mults = tokens[last_comma + 1 :], multipliers[last_comma + 1 :]
                    tokens, multipliers = tokens[: last_comma + 1], multipliers[: last_comma + 1]
                    next_chunk()
                    tokens, multipliers = moved_tokens, moved_mults
                if len(tokens) == self.chunk_length:
                    next_chunk()
                tokens.append(token)
                multipliers.append(weight)
        if tokens or not chunks:
            next_chunk()
        return chunks

    def forward(self, texts):
        self.calls += 1
        batch = [self.tokenize_line(text) for text in texts]
        empty = ([self.id_start] + [self.id_end] * 76, [1.0] * 77)
        outputs = []
        for index in range(max(len(chunks) for chunks in batch)):
            chunk = [chunks[index] if index < len(chunks) else empty for chunks in batch]
            ids = torch.tensor([tokens for tokens, _ in chunk])
            skip = self._opt("CLIP_stop_at_last_layers", 1)
            out = self.wrapped.transformer(input_ids=ids, output_hidden_states=True)
            z = out.last_hidden_state
            if skip > 1:
                z = self.wrapped.transformer.text_model.final_layer_norm(out.hidden_states[-skip])
            multipliers = torch.tensor([mults for _, mults in chunk])
            mean = z.mean()
            z = z * multipliers.reshape(multipliers.shape + (1,)).expand(z.shape)
            outputs.append(z * (mean / z.mean()))
        return torch.hstack(outputs)


def install_prompt_modules(monkeypatch, parse) -> types.SimpleNamespace:
    """``modules.prompt_parser`` (with ``parse``) and ``modules.sd_emphasis`` ("Original", "None")."""
    prompt_parser = types.ModuleType("modules.prompt_parser")
    prompt_parser.parse_prompt_attention = lambda text: [[piece, weight] for piece, weight in parse(text)]
    sd_emphasis = types.ModuleType("modules.sd_emphasis")

    class Original:
        def after_transformers(self):
            mean = self.z.mean()
            self.z = self.z * self.multipliers.reshape(self.multipliers.shape + (1,)).expand(self.z.shape)
            self.z = self.z * (mean / self.z.mean())

    class NoEmphasis:
        def after_transformers(self):
            pass

    options = {"Original": Original, "None": NoEmphasis, "Ignore": NoEmphasis}
    sd_emphasis.get_current_option = lambda name: options.get(name, Original)
    package = sys.modules.get("modules")
    for made in (prompt_parser, sd_emphasis):
        monkeypatch.setitem(sys.modules, made.__name__, made)
        if package is not None:
            monkeypatch.setattr(package, made.__name__.split(".")[1], made, raising=False)
    return types.SimpleNamespace(prompt_parser=prompt_parser, sd_emphasis=sd_emphasis)
