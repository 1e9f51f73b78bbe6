"""Bytes the Run section's status stream sends per one-second tick, for a run of 8 saved epochs (3 samples
each) at step 1600 of 2000: what changes each tick is sent, the rest goes as gr.update().

    python -m benchmarks.status_stream_bytes
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lib_lora_trainer.ui import views
from lib_lora_trainer.ui.jobs import EpochResult, JobSnapshot


def snapshot() -> JobSnapshot:
    folder = Path("/tmp/samples")
    results = tuple(
        EpochResult(epoch, f"alice-{epoch:06d}", epoch * 200, 0.1, folder / f"alice-{epoch:06d}.safetensors",
                    tuple(folder / f"alice-{epoch:06d}-{i:02d}.png" for i in range(3)), True)
        for epoch in range(1, 9)
    )  # fmt: skip
    losses = tuple((step, 0.1 + (step % 7) / 100) for step in range(1, 1601))
    return JobSnapshot("task(1)", "alice", folder, "training", "epoch 8 of 10", step=1600, total_steps=2000,
                       epoch=8, epochs=10, elapsed_s=900, losses=losses, epoch_results=results,
                       log=tuple(f"line {i}" for i in range(40)), version=5)  # fmt: skip


def size(value) -> int:
    return len(json.dumps(value))


def main() -> None:
    snap = snapshot()
    status, chart = views.status_html(snap), views.chart_html(snap)
    gallery, log = views.samples_gallery(snap), views.log_text(snap)
    print(f"every output (what each new step sent before): {size([status, chart, gallery, log])} bytes")
    print(f"a new step now (status + chart): {size([status, chart])} bytes")
    later = views.status_html(dataclasses.replace(snap, elapsed_s=901))
    print(f"a tick without a new step now (status): {size([later])} bytes")
    print(f"of which chart {size(chart)}, gallery {size(gallery)}, log {size(log)} bytes")


if __name__ == "__main__":
    main()
