"""Benchmark the real training step: our loop against a bare reference loop, in the same run.

    python -m benchmarks.bench_training                         # every scenario, full SD1.5, random weights
    python -m benchmarks.bench_training --cpu-subset            # what finishes in < 20 min on 2 CPU cores
    python -m benchmarks.bench_training --checkpoint sd15.safetensors --device cuda

For each scenario (resolution x batch size x LoRA rank 32 / LoCon x text encoder trained / frozen) it
runs ``training.loop.train`` (the code the tab runs) and a bare loop on the same model and adapters
(forward, backward, optimizer step; no dataset, no callbacks, no logging), and reports the median
seconds per step after warm-up, their ratio, and peak memory over the loaded model. It also times a
40-image dataset folder through ``training.run.run_training`` up to the first optimizer step
(latent caching included). Results go to ``benchmarks/results/<tag>.json`` and ``<tag>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import itertools
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.dataset.base import InMemoryBatchSource
from lib_lora_trainer.model.host import HostOptions
from lib_lora_trainer.training.device_settings import fp16_grad_scaler
from lib_lora_trainer.training.loop import TrainingCallbacks, train
from lib_lora_trainer.training.memory import estimate_step_bytes
from lib_lora_trainer.training.optim import ParamGroup, build_optimizer

log = logging.getLogger("benchmarks.bench_training")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RANK, ALPHA, CONV_RANK, CONV_ALPHA = 32, 16.0, 8, 4.0
UNET_LR, TEXT_ENCODER_LR = 1e-4, 5e-5
CAPTIONS = (
    "bench_character, 1girl, red scarf, smiling, outdoors, looking at viewer",
    "bench_character, 1girl, sitting, indoors, window light, upper body",
)
# What --cpu-subset runs: 256 px across every axis but batch, one batch-2 and one 512 px point.
CPU_SUBSET = (
    (256, 1, "lora", "frozen"),
    (256, 1, "lora", "trained"),
    (256, 1, "locon", "frozen"),
    (256, 2, "lora", "frozen"),
    (512, 1, "lora", "frozen"),
)


# --- what is measured ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    resolution: int
    batch_size: int
    network: str  # "lora" (rank 32) or "locon" (rank 32, conv rank 8)
    text_encoder: str  # "frozen" or "trained"

    @property
    def label(self) -> str:
        return f"{self.resolution}px b{self.batch_size} {self.network} TE {self.text_encoder}"


@dataclass(frozen=True)
class Settings:
    device: torch.device
    mixed_precision: str
    gradient_checkpointing: bool
    warmup: int  # steps before timing starts (first-step allocation, kernel selection)
    steps: int  # timing windows, each of ours followed by one of the bare loop
    window: int  # steps per timing window (the device is synchronised only at window edges)
    captions_vary: bool = False

    @property
    def steps_per_run(self) -> int:
        return self.warmup + self.steps * self.window


@dataclass
class ScenarioResult:
    scenario: Scenario
    ours_s: list[float]  # wall seconds per step of our loop, one value per timing window
    bare_s: list[float]  # the bare loop's window run right after each of ours
    ours_cpu_s: list[float]  # CPU seconds per step (this process, all threads), same windows
    bare_cpu_s: list[float]
    peak_bytes: int  # peak memory over our warm-up steps (the first step included)
    extra_bytes: int  # that peak minus the memory in use before training started (the model alone)
    estimated_extra_bytes: int  # what gradient checkpointing "auto" would estimate for this step

    def to_json(self) -> dict:
        ours, bare = statistics.median(self.ours_s), statistics.median(self.bare_s)
        pairs = [o / b for o, b in zip(self.ours_s, self.bare_s, strict=True)]
        ours_cpu, bare_cpu = statistics.median(self.ours_cpu_s), statistics.median(self.bare_cpu_s)
        return {
            **asdict(self.scenario),
            "label": self.scenario.label,
            "ours_s_per_step": ours,
            "bare_s_per_step": bare,
            "ratio_ours_over_bare": ours / bare,
            "paired_ratio_median": statistics.median(pairs),
            "ours_cpu_s_per_step": ours_cpu,
            "bare_cpu_s_per_step": bare_cpu,
            "cpu_ratio_ours_over_bare": ours_cpu / bare_cpu,
            "ours_samples": self.ours_s,
            "bare_samples": self.bare_s,
            "ours_cpu_samples": self.ours_cpu_s,
            "bare_cpu_samples": self.bare_cpu_s,
            "peak_bytes": self.peak_bytes,
            "extra_bytes": self.extra_bytes,
            "estimated_extra_bytes": self.estimated_extra_bytes,
        }


# --- device helpers -----------------------------------------------------------------------------


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _trim_malloc() -> None:
    """glibc keeps freed memory for reuse; malloc_trim returns it, so RSS shows what is in use."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to trim
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class MemoryMeter:
    """Peak memory between :meth:`reset` and :meth:`peak`: allocated tensors on CUDA, RSS on the CPU.

    On Linux the RSS high-water mark (VmHWM) is reset through ``/proc/self/clear_refs``; where that is
    not possible the peak is the whole process's (``resource.getrusage``), which ``exact_peak`` says.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.exact_peak = device.type == "cuda" or self._can_reset_rss()

    @staticmethod
    def _can_reset_rss() -> bool:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            return "VmHWM" in Path("/proc/self/status").read_text()
        except OSError:
            return False

    @staticmethod
    def _status_bytes(field_name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
        raise OSError(f"{field_name} not in /proc/self/status")

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        try:
            return self._status_bytes("VmRSS")
        except OSError:
            return 0

    def reset(self) -> None:
        """Start a new peak from the memory in use now (freed CPU memory is handed back to the system
        first, so memory the previous scenario left in malloc's free lists does not count)."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        _trim_malloc()
        if self.exact_peak:
            Path("/proc/self/clear_refs").write_text("5")

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        if self.exact_peak:
            return self._status_bytes("VmHWM")
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def clock(device: torch.device) -> tuple[float, float]:
    """(wall, CPU) seconds now, once the device has finished its queued work.

    CPU time (all threads of this process) is what the process itself spent: on a shared machine it
    moves much less than wall time when other processes compete for the cores.
    """
    synchronize(device)
    return time.perf_counter(), time.process_time()


def timed(device: torch.device, run: Callable[[], None]) -> tuple[float, float]:
    """(wall, CPU) seconds ``run`` takes, with the device synchronised before and after."""
    start = clock(device)
    run()
    end = clock(device)
    return end[0] - start[0], end[1] - start[1]


# --- the model ----------------------------------------------------------------------------------


def base_dtype(device: torch.device, mixed_precision: str) -> torch.dtype:
    """The frozen model's dtype as the WebUI holds it: fp16 on a GPU (bf16 for bf16 runs), fp32 on a CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def auto_mixed_precision(device: torch.device) -> str:
    return "fp16" if device.type == "cuda" else "no"


def build_host(args: argparse.Namespace, device: torch.device, mixed_precision: str):
    dtype = base_dtype(device, mixed_precision)
    if args.checkpoint:
        from benchmarks.checkpoint import load_checkpoint_host

        host = load_checkpoint_host(
            args.checkpoint, device=str(device), dtype=dtype, size=args.model, use_sdp_attention=args.sdp
        )
    else:
        from lib_lora_trainer.model.standalone import build_random_host

        host = build_random_host(args.model, device=str(device), use_sdp_attention=args.sdp)
        for module in (host.unet(), host.text_encoder(), host.vae()):
            module.to(dtype)
    if args.channels_last:
        host.unet().to(memory_format=torch.channels_last)
    return host


def module_bytes(module: torch.nn.Module) -> int:
    tensors = itertools.chain(module.parameters(), module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def model_memory(host, resident_bytes: int) -> dict:
    parts = {
        "unet": module_bytes(host.unet()),
        "text_encoder": module_bytes(host.text_encoder()),
        "vae": module_bytes(host.vae()),
    }
    return {
        "tensor_bytes": parts,
        "total_tensor_bytes": sum(parts.values()),
        "resident_bytes": resident_bytes,
    }


# --- the two loops ------------------------------------------------------------------------------


def make_picture(width: int, height: int, seed: int) -> Image.Image:
    """A picture with smooth gradients and shapes (photos compress and decode like this, not like noise)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None, None]
    start, slope_x, slope_y = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    pixels = np.clip(start + slope_x * x * 0.5 + slope_y * y * 0.5, 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        cx, cy = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(min(width, height) // 12, min(width, height) // 4))
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return image


def scenario_config(scenario: Scenario, settings: Settings, output_dir: Path, name: str) -> TrainingConfig:
    return TrainingConfig(
        output_name=name,
        output_dir=str(output_dir),
        train_data_dir="unused",
        resolution=scenario.resolution,
        min_bucket_reso=min(256, scenario.resolution),
        max_bucket_reso=max(1024, scenario.resolution),
        network_type=scenario.network,
        network_dim=RANK,
        network_alpha=ALPHA,
        conv_dim=CONV_RANK,
        conv_alpha=CONV_ALPHA,
        train_text_encoder=scenario.text_encoder == "trained",
        unet_lr=UNET_LR,
        text_encoder_lr=TEXT_ENCODER_LR,
        optimizer="AdamW",
        lr_scheduler="constant",
        epochs=1,
        batch_size=scenario.batch_size,
        mixed_precision=settings.mixed_precision,
        gradient_checkpointing="on" if settings.gradient_checkpointing else "off",
        save_precision="fp16",
        seed=1234,
    )


class _VaryingCaptionsSource(InMemoryBatchSource):
    """Claims its captions change per step (as with shuffling), which turns conditioning caching off."""

    def captions_vary(self) -> bool:
        return True


class BareLoop:
    """The reference: forward, backward and optimizer step on the adapters our loop has attached.

    No dataset, no callbacks, no logging, no gradient clipping: what any trainer must do per step.
    """

    def __init__(self, host, scenario: Scenario, settings: Settings):
        self.host, self.device = host, settings.device
        self.mixed_precision = settings.mixed_precision
        config = scenario_config(scenario, settings, Path("."), "bare")
        # Inside the session the base model is frozen: what still needs gradients are the adapters.
        groups = [ParamGroup("unet", [p for p in host.unet().parameters() if p.requires_grad], UNET_LR)]
        text_params = [p for p in host.text_encoder().parameters() if p.requires_grad]
        if text_params:
            groups.append(ParamGroup("text_encoder", text_params, TEXT_ENCODER_LR))
        self.optimizer = build_optimizer(config, groups, self.device)
        self.scaler = fp16_grad_scaler(self.device, settings.mixed_precision)
        self.alphas = host.alphas_cumprod().float()
        side = scenario.resolution // 8
        self.latents = torch.randn(scenario.batch_size, 4, side, side, device=self.device)
        self.captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(scenario.batch_size)]
        self.frozen_cond = None
        if not text_params:
            with torch.no_grad(), host.autocast(self.mixed_precision):
                self.frozen_cond = host.encode_text(self.captions)

    def step(self) -> None:
        noise = torch.randn_like(self.latents)
        timesteps = torch.randint(0, len(self.alphas), (self.latents.shape[0],), device=self.device)
        alpha_bar = self.alphas[timesteps].view(-1, 1, 1, 1)
        noisy = alpha_bar.sqrt() * self.latents + (1 - alpha_bar).sqrt() * noise
        with self.host.autocast(self.mixed_precision):
            cond = self.frozen_cond if self.frozen_cond is not None else self.host.encode_text(self.captions)
            prediction = self.host.predict(noisy, timesteps, cond)
        loss = F.mse_loss(prediction.float(), noise)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


class _PairedTiming(TrainingCallbacks):
    """Runs inside our loop. After our warm-up it builds the bare loop on the same adapters; after each
    window of our steps it runs one window of bare steps. Both are so timed under the same machine load,
    minutes or seconds apart, which matters on a shared machine.
    """

    def __init__(self, host, scenario: Scenario, settings: Settings, meter: MemoryMeter):
        self.host, self.scenario, self.settings, self.meter = host, scenario, settings, meter
        self.steps = 0
        self.mark = (0.0, 0.0)
        self.peak = 0
        self.ours: list[tuple[float, float]] = []  # (wall, CPU) seconds per step
        self.bare: list[tuple[float, float]] = []
        self.bare_loop: BareLoop | None = None
        self.estimated_extra = 0

    def on_start(self, plan) -> None:
        self.estimated_extra = self._estimate(plan.trainable_parameters)
        self.meter.reset()  # latent caching, setup and the probe before the first step are not steps

    def _estimate(self, trainable_parameters: int) -> int:
        """The memory probe of gradient checkpointing "auto", on this scenario's step."""
        trained = self.scenario.text_encoder == "trained"

        def conditioning() -> torch.Tensor:
            with torch.set_grad_enabled(trained):
                return self.host.encode_text(CAPTIONS[:1])

        return estimate_step_bytes(
            self.host,
            conditioning,
            mixed_precision=self.settings.mixed_precision,
            batch_size=self.scenario.batch_size,
            resolution=self.scenario.resolution,
            trainable_parameters=trainable_parameters,
            optimizer="AdamW",
        )

    def on_step(self, progress) -> None:
        self.steps += 1
        warmup, window, device = self.settings.warmup, self.settings.window, self.settings.device
        if self.steps < warmup:
            return
        if self.steps == warmup:
            synchronize(device)
            self.peak = self.meter.peak()
            self.bare_loop = BareLoop(self.host, self.scenario, self.settings)
            self.bare_loop.run(warmup)
            self.mark = clock(device)
            return
        if (self.steps - warmup) % window:
            return
        now = clock(device)
        self.ours.append(((now[0] - self.mark[0]) / window, (now[1] - self.mark[1]) / window))
        assert self.bare_loop is not None
        bare_loop = self.bare_loop
        wall, cpu = timed(device, lambda: bare_loop.run(window))
        self.bare.append((wall / window, cpu / window))
        self.mark = clock(device)


def measure_scenario(
    host, scenario: Scenario, settings: Settings, meter: MemoryMeter, workdir: Path
) -> ScenarioResult:
    """``training.loop.train`` as the tab runs it, on an in-memory dataset of ``batch_size`` images, with
    the bare loop's windows interleaved."""
    output_dir = workdir / scenario.label.replace(" ", "_")
    config = scenario_config(scenario, settings, output_dir, "bench")
    items = [
        (make_picture(scenario.resolution, scenario.resolution, seed), CAPTIONS[seed % len(CAPTIONS)])
        for seed in range(scenario.batch_size)
    ]
    source_class = _VaryingCaptionsSource if settings.captions_vary else InMemoryBatchSource
    source = source_class(
        items, resolution=scenario.resolution, batch_size=scenario.batch_size, repeats=settings.steps_per_run
    )
    timing = _PairedTiming(host, scenario, settings, meter)
    log.info(
        "%s: %d steps of ours, each window followed by the bare loop's",
        scenario.label,
        settings.steps_per_run,
    )
    meter.reset()
    before = meter.current()
    result = train(host, config, source, timing)
    if result.status != "completed":
        raise RuntimeError(f"our loop did not complete: {result.message}")
    measured = ScenarioResult(
        scenario,
        ours_s=[wall for wall, _ in timing.ours],
        bare_s=[wall for wall, _ in timing.bare],
        ours_cpu_s=[cpu for _, cpu in timing.ours],
        bare_cpu_s=[cpu for _, cpu in timing.bare],
        peak_bytes=timing.peak,
        extra_bytes=timing.peak - before,
        estimated_extra_bytes=timing.estimated_extra,
    )
    row = measured.to_json()
    log.info(
        "%s: ours %.3f s/step, bare %.3f s/step, ratio %.3f (paired %.3f, CPU time %.3f)",
        scenario.label,
        row["ours_s_per_step"],
        row["bare_s_per_step"],
        row["ratio_ours_over_bare"],
        row["paired_ratio_median"],
        row["cpu_ratio_ours_over_bare"],
    )
    return measured


# --- start-up: dataset folder to first optimizer step -------------------------------------------

STARTUP_SIZES = ((768, 1024), (1024, 768), (832, 832), (640, 960))


def write_dataset_folder(folder: Path, count: int) -> None:
    """``count`` JPEG photos-like pictures of several aspect ratios, each with a caption file."""
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        width, height = STARTUP_SIZES[index % len(STARTUP_SIZES)]
        make_picture(width, height, 1000 + index).save(folder / f"img_{index:03d}.jpg", quality=92)
        tags = ", ".join(f"tag{(index * 7 + k) % 23}" for k in range(8))
        (folder / f"img_{index:03d}.txt").write_text(f"bench_character, {tags}\n", encoding="utf-8")


class _TimedHost:
    """Forwards to a host and notes when its session opens and when each image encoding ends."""

    def __init__(self, host):
        self._host = host
        self.device = host.device
        self.session_opened = 0.0
        self.last_encode_end = 0.0
        self.encode_s = 0.0
        self.images_encoded = 0

    def __getattr__(self, name: str):
        return getattr(self._host, name)

    @contextlib.contextmanager
    def session(self, options: HostOptions) -> Iterator[None]:
        with self._host.session(options):
            self.session_opened = time.perf_counter()
            yield

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        latents = self._host.encode_images(pixels)
        synchronize(self.device)
        self.last_encode_end = time.perf_counter()
        self.encode_s += self.last_encode_end - start
        self.images_encoded += pixels.shape[0]
        return latents


class _FirstStepCallbacks(TrainingCallbacks):
    def __init__(self):
        self.started = 0.0
        self.first_step = 0.0

    def on_start(self, plan) -> None:
        self.started = time.perf_counter()

    def on_step(self, progress) -> None:
        if not self.first_step:
            self.first_step = time.perf_counter()

    def should_stop(self) -> bool:
        return bool(self.first_step)


def measure_startup(
    host, images: int, resolution: int, settings: Settings, meter: MemoryMeter, workdir: Path
):
    """Seconds from calling ``run_training`` on a fresh folder to the end of its first optimizer step."""
    from lib_lora_trainer.training.run import run_training

    folder = workdir / "startup_dataset"
    write_dataset_folder(folder, images)
    scenario = Scenario(resolution, 1, "lora", "frozen")
    config = scenario_config(scenario, settings, workdir / "startup_out", "startup")
    config.train_data_dir = str(folder)
    config.flat_repeats = 1
    timed = _TimedHost(host)
    callbacks = _FirstStepCallbacks()
    meter.reset()
    before = meter.current()
    synchronize(settings.device)
    start = time.perf_counter()
    result = run_training(timed, config, callbacks)
    peak = meter.peak()
    if not callbacks.first_step:
        raise RuntimeError(f"the start-up run made no step: {result.message}")
    caching_s = timed.last_encode_end - timed.session_opened
    return {
        "images": images,
        "resolution": resolution,
        "seconds_to_first_step": callbacks.first_step - start,
        "scan_and_plan_s": timed.session_opened - start,
        "latent_caching_s": caching_s,
        "setup_after_caching_s": callbacks.started - timed.last_encode_end,
        "first_step_s": callbacks.first_step - callbacks.started,
        "vae_encode_s": timed.encode_s,
        "images_encoded": timed.images_encoded,
        "caching_images_per_s": timed.images_encoded / caching_s if caching_s > 0 else None,
        "peak_bytes": peak,
        "extra_bytes": peak - before,
    }


# --- reporting ----------------------------------------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f}"


def markdown_report(results: dict) -> str:
    meta, model = results["meta"], results["model"]
    memory = "peak allocated (CUDA)" if meta["device"].startswith("cuda") else "peak RSS"
    checkpointing = "on" if meta["gradient_checkpointing"] else "off"
    sizes = {name: _gib(value) for name, value in model["tensor_bytes"].items()}
    lines = [
        f"# Training benchmark: {meta['model']} on {meta['device_name']}",
        "",
        f"torch {meta['torch']}, {meta['threads']} threads, mixed precision `{meta['mixed_precision']}`, "
        f"base weights {meta['base_dtype']}, gradient checkpointing {checkpointing}, "
        f"SDP attention {'on' if meta['sdp_attention'] else 'off'}, "
        f"channels-last {'on' if meta['channels_last'] else 'off'}, "
        f"text-encoder output cache {'off (captions vary)' if meta['captions_vary'] else 'on when frozen'}, "
        f"{meta['warmup']} warm-up step(s), then the median of {meta['steps']} windows of {meta['window']} "
        "step(s), each window of ours followed by one of the bare loop on the same adapters. "
        f"LoRA rank {RANK}/alpha {ALPHA:g}; "
        f"LoCon adds conv rank {CONV_RANK}/alpha {CONV_ALPHA:g}. Command: `{meta['command']}`",
        "",
        f"Loaded model: {_gib(model['total_tensor_bytes'])} GiB of tensors (UNet {sizes['unet']}, "
        f"text encoder {sizes['text_encoder']}, VAE {sizes['vae']}); "
        f"{_gib(model['resident_bytes'])} GiB resident after loading.",
        "",
        "| scenario | ours s/step | bare s/step | ours / bare | paired ratio | CPU-time ratio "
        f"| {memory} GiB | extra over model GiB | probe's estimate GiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in results["scenarios"]:
        lines.append(
            f"| {row['label']} | {row['ours_s_per_step']:.3f} | {row['bare_s_per_step']:.3f} | "
            f"{row['ratio_ours_over_bare']:.3f} | {row['paired_ratio_median']:.3f} | "
            f"{row['cpu_ratio_ours_over_bare']:.3f} | "
            f"{_gib(row['peak_bytes'])} | {_gib(row['extra_bytes'])} | "
            f"{_gib(row['estimated_extra_bytes'])} |"
        )
    startup = results.get("startup")
    if startup:
        throughput = startup["caching_images_per_s"]
        lines += [
            "",
            f"Start-up, {startup['images']} images at {startup['resolution']} px through `run_training`: "
            f"**{startup['seconds_to_first_step']:.1f} s to the first optimizer step** "
            f"(scan and plan {startup['scan_and_plan_s']:.1f} s, "
            f"latent caching {startup['latent_caching_s']:.1f} s = {throughput:.2f} images/s "
            f"of which VAE encoding {startup['vae_encode_s']:.1f} s, "
            f"setup {startup['setup_after_caching_s']:.1f} s, "
            f"first step {startup['first_step_s']:.1f} s).",
        ]
    return "\n".join(lines) + "\n"


def _git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


# --- command line -------------------------------------------------------------------------------


def _int_list(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def _word_list(allowed: tuple[str, ...]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        words = [part.strip() for part in text.split(",") if part.strip()]
        wrong = [w for w in words if w not in allowed]
        if wrong:
            raise argparse.ArgumentTypeError(f"{', '.join(wrong)} not in {', '.join(allowed)}")
        return words

    return parse


def _scenario(text: str) -> Scenario:
    parts = [part.strip() for part in text.split(":")]
    if len(parts) != 4 or parts[2] not in ("lora", "locon") or parts[3] not in ("frozen", "trained"):
        raise argparse.ArgumentTypeError("a scenario is RESOLUTION:BATCH:lora|locon:frozen|trained")
    return Scenario(int(parts[0]), int(parts[1]), parts[2], parts[3])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_training",
        description="Seconds per training step, ours against a bare loop, memory and start-up time.",
    )
    model = parser.add_argument_group("model")
    model.add_argument("--checkpoint", help="an SD1.x .safetensors checkpoint (default: random weights)")
    model.add_argument("--model", choices=("sd15", "tiny"), default="sd15", help="architecture size")
    model.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    model.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto")
    model.add_argument("--gradient-checkpointing", action="store_true")
    model.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    ablation = parser.add_argument_group("switch a speed measure off or on, to measure what it gives")
    ablation.add_argument(
        "--no-sdp-attention", dest="sdp", action="store_false", help="ldm's own attention instead of SDP"
    )
    ablation.add_argument("--channels-last", action="store_true", help="UNet weights in channels-last layout")
    ablation.add_argument(
        "--captions-vary",
        action="store_true",
        help="our loop's source reports varying captions, so the frozen text encoder runs every step",
    )
    grid = parser.add_argument_group(
        "scenarios (the product of the lists, unless --scenario or --cpu-subset)"
    )
    grid.add_argument("--resolutions", type=_int_list, default=[256, 512])
    grid.add_argument("--batch-sizes", type=_int_list, default=[1, 2])
    grid.add_argument("--networks", type=_word_list(("lora", "locon")), default=["lora", "locon"])
    grid.add_argument("--text-encoder", type=_word_list(("frozen", "trained")), default=["frozen", "trained"])
    grid.add_argument(
        "--scenario", type=_scenario, action="append", help="RES:BATCH:lora|locon:frozen|trained"
    )
    grid.add_argument(
        "--cpu-subset", action="store_true", help=f"run {len(CPU_SUBSET)} scenarios: {CPU_SUBSET}"
    )
    timing = parser.add_argument_group("timing")
    timing.add_argument("--warmup", type=int, help="steps before timing (default 2; 1 with --cpu-subset)")
    timing.add_argument(
        "--steps", type=int, help="timing windows per loop and round (default 5; 6 with --cpu-subset)"
    )
    timing.add_argument(
        "--window", type=int, default=0, help="steps per window (default: 1 on CPU, 5 on CUDA)"
    )
    startup = parser.add_argument_group("start-up")
    startup.add_argument("--startup-images", type=int, default=40, help="0 skips the start-up measurement")
    startup.add_argument("--startup-only", action="store_true", help="measure only the start-up")
    startup.add_argument(
        "--startup-resolution", type=int, default=0, help="default: 512, or 256 with --cpu-subset"
    )
    output = parser.add_argument_group("output")
    output.add_argument("--output-dir", type=Path, default=RESULTS_DIR)
    output.add_argument("--tag", default="", help="file stem of the results (default: device and model)")
    return parser.parse_args(argv)


def choose_scenarios(args: argparse.Namespace) -> list[Scenario]:
    if args.startup_only:
        return []
    if args.scenario:
        return list(args.scenario)
    if args.cpu_subset:
        return [Scenario(*values) for values in CPU_SUBSET]
    return [
        Scenario(*values)
        for values in itertools.product(args.resolutions, args.batch_sizes, args.networks, args.text_encoder)
    ]


def run_benchmark(args: argparse.Namespace, argv: list[str]) -> dict:
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda, but torch sees no CUDA device")
    mixed_precision = auto_mixed_precision(device) if args.mixed_precision == "auto" else args.mixed_precision
    settings = Settings(
        device=device,
        mixed_precision=mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing,
        warmup=args.warmup or (1 if args.cpu_subset else 2),
        steps=args.steps or (6 if args.cpu_subset else 5),
        window=args.window or (5 if device.type == "cuda" else 1),
        captions_vary=args.captions_vary,
    )
    startup_resolution = args.startup_resolution or (256 if args.cpu_subset else 512)
    meter = MemoryMeter(device)
    meter.reset()
    before_model = meter.current()
    started = time.perf_counter()
    host = build_host(args, device, mixed_precision)
    load_s = time.perf_counter() - started
    meter.reset()
    model = model_memory(host, meter.current() - before_model)
    model["load_s"] = load_s
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "CPU"
    )
    meta = {
        "command": " ".join(["python -m benchmarks.bench_training", *argv]),
        "model": f"{args.model} ({Path(args.checkpoint).name if args.checkpoint else 'random weights'})",
        "device": str(device),
        "device_name": f"{device_name} ({os.cpu_count()} CPU cores)",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "mixed_precision": mixed_precision,
        "base_dtype": str(base_dtype(device, mixed_precision)).replace("torch.", ""),
        "gradient_checkpointing": settings.gradient_checkpointing,
        "sdp_attention": args.sdp,
        "channels_last": args.channels_last,
        "captions_vary": args.captions_vary,
        "warmup": settings.warmup,
        "steps": settings.steps,
        "window": settings.window,
        "exact_cpu_peak": meter.exact_peak,
        "git_commit": _git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results: dict = {"meta": meta, "model": model, "scenarios": [], "startup": None}
    with tempfile.TemporaryDirectory(prefix="bench_training_") as tmp:
        workdir = Path(tmp)
        for scenario in choose_scenarios(args):
            measured = measure_scenario(host, scenario, settings, meter, workdir)
            results["scenarios"].append(measured.to_json())
        if args.startup_images > 0:
            log.info("start-up: %d images at %d px", args.startup_images, startup_resolution)
            results["startup"] = measure_startup(
                host, args.startup_images, startup_resolution, settings, meter, workdir
            )
    meta["total_s"] = time.perf_counter() - started
    return results


def write_results(results: dict, output_dir: Path, tag: str) -> tuple[Path, Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = output_dir / f"{tag}.json", output_dir / f"{tag}.md"
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    md_path.write_text(markdown_report(results), encoding="utf-8")
    return json_path, md_path


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    results = run_benchmark(args, argv)
    tag = args.tag or f"{results['meta']['device'].replace(':', '')}-{args.model}"
    json_path, md_path = write_results(results, args.output_dir, tag)
    print(markdown_report(results))
    print(f"wrote {json_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
