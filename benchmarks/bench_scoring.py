"""Benchmark epoch scoring on the tiny model: time and memory per epoch, and the spread of likeness
over seeds (how many evaluation images per prompt are enough).

    python -m benchmarks.bench_scoring                    # tiny model, tiny scoring models, this CPU
    python -m benchmarks.bench_scoring --spread-seeds 8   # more seeds for the spread table

It trains a tiny run through the stand-alone app's services (as the tab does), loads the tiny offline
scoring models the tests build (an ONNX embedder and a small CLIP: real onnxruntime and transformers
code, toy weights), then times :class:`lib_lora_trainer.evaluation.scoring.RunScorer` set by set
(rendering and scoring apart) with the peak resident memory. For the spread it renders the last epoch
with ``--spread-seeds`` seeds per prompt and reports, for k = 1..N seeds, the standard deviation of an
epoch's likeness score over every choice of k of those seeds (what a different set of seeds would give).
Results go to ``benchmarks/results/<tag>.json`` and ``<tag>.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch

from lib_lora_trainer.evaluation import metrics
from lib_lora_trainer.evaluation.clip_scorer import fidelity_text
from lib_lora_trainer.evaluation.prompts import evaluation_prompts, evaluation_requests
from lib_lora_trainer.evaluation.scoring import RunScorer, load_scorers, load_training_images, reference
from lib_lora_trainer.model.standalone import build_random_host
from lib_lora_trainer.ui.jobs import TrainingJobs
from lib_lora_trainer.ui.standalone import StandaloneServices
from tests.evaluation.fixtures import write_models_dir
from tests.ui.conftest import make_dataset, tiny_config

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=3, help="evaluation seeds for the timing")
    parser.add_argument("--spread-seeds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--tag", default="cpu-tiny-scoring")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="bench-scoring-"))
    services = StandaloneServices(build_random_host("tiny", seed=3), root)
    jobs = TrainingJobs(services)
    dataset = make_dataset(services.datasets_dir / "alice", count=4)
    config = tiny_config(
        dataset, epochs=args.epochs, evaluate_epochs=False, sample_every_n_epochs=0,
        evaluation_seeds=args.seeds, evaluation_steps=args.steps, evaluation_size=64,
    )  # fmt: skip
    job = jobs.start(config)
    job.wait()
    assert job.snapshot().state == "completed", job.snapshot().message
    write_models_dir(services.scorer_dir)

    images = load_training_images(job.config)
    reset_peak()
    before = rss_mib()
    started = time.perf_counter()
    scorers = load_scorers(
        job.config,
        images,
        models_dir=services.scorer_dir,
        allow_download=False,
        face_finder=services.face_finder(),
    )
    load_s = time.perf_counter() - started
    scorer = RunScorer(job.run, job.config, scorers, services.lora_renderer(), root / "evaluation")
    training = reference(scorers, images)

    # time per set, rendering and scoring apart
    timings = []
    renderer = scorer.renderer
    for label, stem in [("base model", None)] + [
        (f"epoch {e}", job.run.stem(e)) for e in job.run.saved_epochs()
    ]:
        requests = evaluation_requests(job.config, scorer.prompts, stem)
        t0 = time.perf_counter()
        rendered = [
            renderer.render([r], root / "evaluation", f"t-{i}")[0].image for i, r in enumerate(requests)
        ]
        t1 = time.perf_counter()
        from lib_lora_trainer.evaluation.scoring import score_images

        score_images(rendered, scorer.texts, scorer.groups, scorers, training)
        t2 = time.perf_counter()
        timings.append({"set": label, "images": len(rendered), "render_s": t1 - t0, "score_s": t2 - t1})
    peak = rss_mib("VmHWM")

    # spread of likeness over seeds, on the last epoch
    spread_config = dataclasses.replace(job.config, evaluation_seeds=args.spread_seeds)
    prompts = evaluation_prompts(spread_config)
    last = job.run.saved_epochs()[-1]
    requests = evaluation_requests(spread_config, prompts, job.run.stem(last))
    rendered = [renderer.render([r], root / "spread", f"s-{i}")[0].image for i, r in enumerate(requests)]
    per_image = metrics.likeness(scorers.likeness.embed(rendered), training.likeness).per_image
    grid = np.array(per_image, dtype=float).reshape(len(prompts), args.spread_seeds)  # prompt x seed
    spread = spread_table(grid)
    texts_checked = fidelity_text(prompts[0].text, job.config.trigger_word, job.config.class_token)
    scorers.close()

    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "settings": {"epochs": args.epochs, "seeds": args.seeds, "prompts": len(scorer.prompts),
                     "steps": args.steps, "size": 64, "spread_seeds": args.spread_seeds},
        "load_scorers_s": load_s,
        "rss_before_mib": before,
        "peak_rss_mib": peak,
        "timings": timings,
        "likeness_per_seed_mean": grid.mean(axis=0).tolist(),
        "spread": spread,
        "clip_text_example": texts_checked,
    }  # fmt: skip
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / f"{args.tag}.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    (RESULTS_DIR / f"{args.tag}.md").write_text(markdown(result), encoding="utf-8")
    print(markdown(result))
    return 0


def spread_table(grid: np.ndarray) -> list[dict]:
    """For k seeds: the sd of the epoch's likeness over every k-subset of the measured seeds (it shrinks
    to 0 at k = all seeds by construction), and the standard error sd(per-seed means) / sqrt(k)."""
    seeds = grid.shape[1]
    seed_sd = statistics.stdev(grid.mean(axis=0).tolist()) if seeds > 1 else float("nan")
    rows = []
    for k in range(1, seeds + 1):
        means = [grid[:, list(chosen)].mean() for chosen in itertools.combinations(range(seeds), k)]
        rows.append(
            {
                "seeds": k,
                "images": k * grid.shape[0],
                "sd_of_epoch_likeness": statistics.pstdev(means),
                "standard_error": seed_sd / k**0.5,
            }
        )
    return rows


def markdown(result: dict) -> str:
    lines = [
        f"# Epoch scoring on the tiny model ({result['machine']['platform']}, "
        f"{result['machine']['threads']} threads, torch {result['machine']['torch']})",
        "",
        f"Settings: {result['settings']}. Loading the scoring models: {result['load_scorers_s']:.2f} s. "
        f"Resident memory before loading them {result['rss_before_mib']:.0f} MiB, peak while scoring "
        f"{result['peak_rss_mib']:.0f} MiB.",
        "",
        "| set | images | render s | score s | s per image |",
        "|---|---:|---:|---:|---:|",
    ]
    for row in result["timings"]:
        per = (row["render_s"] + row["score_s"]) / max(1, row["images"])
        lines.append(
            f"| {row['set']} | {row['images']} | {row['render_s']:.2f} | {row['score_s']:.2f} | {per:.2f} |"
        )
    lines += [
        "",
        "Spread of an epoch's likeness over the choice of seeds (standard deviation over every subset of k "
        "seeds, every prompt):",
        "",
        "| seeds per prompt | images | sd over k-subsets of the seeds | sd(seed means) / sqrt(k) |",
        "|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {row['seeds']} | {row['images']} | {row['sd_of_epoch_likeness']:.4f} | "
        f"{row['standard_error']:.4f} |"
        for row in result["spread"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
