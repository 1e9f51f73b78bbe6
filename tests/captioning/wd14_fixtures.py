"""Tiny WD14-shaped ONNX models built with onnx.helper, and their selected_tags.csv.

The model has WD14's signature (NHWC float32 image in, (batch, n_tags) scores out) and scores that are
checkable functions of its input, so the preprocessing can be verified number by number:

* the first tags get fixed scores chosen by the test (ratings, general and character tags);
* the last six ("probe") tags are pixel means / 255 of channels 0, 1, 2 over the whole image, then of
  channels 0, 1, 2 over the top-left corner (size // 8 square), as the model receives them.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

PROBE_TAGS = (
    "probe_full_c0",
    "probe_full_c1",
    "probe_full_c2",
    "probe_corner_c0",
    "probe_corner_c1",
    "probe_corner_c2",
)
V2_NAMES = ("input_1:0", "predictions_sigmoid")  # the v2 models' input/output names
V3_NAMES = ("input", "output")


@dataclass(frozen=True)
class FakeTag:
    name: str
    category: int  # 9 rating, 0 general, 4 character
    score: float


# Ratings first, as in the real selected_tags.csv; scores straddle the usual thresholds.
STANDARD_TAGS = (
    FakeTag("general", 9, 0.70),
    FakeTag("sensitive", 9, 0.20),
    FakeTag("questionable", 9, 0.05),
    FakeTag("explicit", 9, 0.01),
    FakeTag("1girl", 0, 0.98),
    FakeTag("long_hair", 0, 0.90),
    FakeTag("^_^", 0, 0.80),
    FakeTag("smile", 0, 0.50),
    FakeTag("blue_eyes", 0, 0.45),
    FakeTag("solo", 0, 0.36),  # between the 0.35 fallback and convnext v2's 0.3685
    FakeTag("hat", 0, 0.20),
    FakeTag("hatsune_miku", 4, 0.90),
    FakeTag("alice_(wonderland)", 4, 0.60),
)


def write_model_folder(
    folder: Path,
    tags: Sequence[FakeTag] = STANDARD_TAGS,
    *,
    size: int = 448,
    names: tuple[str, str] = V2_NAMES,
    batch_dim: int | str = "batch",
    extra_labels: int = 0,
) -> Path:
    """``folder`` with model.onnx and selected_tags.csv; ``extra_labels`` adds CSV rows the model lacks."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model(tags, size=size, names=names, batch_dim=batch_dim), folder / "model.onnx")
    write_labels(folder / "selected_tags.csv", tags, extra=extra_labels)
    return folder


def write_labels(path: Path, tags: Sequence[FakeTag], *, extra: int = 0) -> None:
    rows = [(tag.name, tag.category) for tag in tags] + [(name, 0) for name in PROBE_TAGS]
    rows += [(f"extra_{index}", 0) for index in range(extra)]
    with path.open("w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["tag_id", "name", "category", "count"])
        for index, (name, category) in enumerate(rows):
            writer.writerow([1000 + index, name, category, 5000 - index])


def build_model(
    tags: Sequence[FakeTag],
    *,
    size: int,
    names: tuple[str, str] = V2_NAMES,
    batch_dim: int | str = "batch",
    layout: str = "NHWC",
) -> onnx.ModelProto:
    input_name, output_name = names
    n_tags = len(tags) + len(PROBE_TAGS)
    corner = max(1, size // 8)
    scores = np.clip([tag.score for tag in tags], 1e-6, 1 - 1e-6)
    logits = np.log(scores / (1 - scores)).astype(np.float32).reshape(1, -1)
    initializers = [
        helper.make_tensor("inv255", TensorProto.FLOAT, [], [1.0 / 255.0]),
        helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        helper.make_tensor("fixed_logits", TensorProto.FLOAT, list(logits.shape), logits.ravel().tolist()),
        helper.make_tensor("corner_starts", TensorProto.INT64, [2], [0, 0]),
        helper.make_tensor("corner_ends", TensorProto.INT64, [2], [corner, corner]),
        helper.make_tensor("corner_axes", TensorProto.INT64, [2], [1, 2]),
    ]
    nodes = [
        # scaled to 0..1 before averaging: float32 sums of 255s over 448x448 pixels would lose precision
        helper.make_node("Mul", [input_name, "inv255"], ["unit"]),
        helper.make_node("ReduceMean", ["unit"], ["full_mean"], axes=[1, 2], keepdims=0),
        helper.make_node("Slice", ["unit", "corner_starts", "corner_ends", "corner_axes"], ["corner"]),
        helper.make_node("ReduceMean", ["corner"], ["corner_mean"], axes=[1, 2], keepdims=0),
        # (batch, 1) zeros, so the fixed scores get the batch dimension by broadcasting
        helper.make_node("ReduceMean", ["full_mean"], ["per_image"], axes=[1], keepdims=1),
        helper.make_node("Mul", ["per_image", "zero"], ["batch_zeros"]),
        helper.make_node("Add", ["batch_zeros", "fixed_logits"], ["batch_logits"]),
        helper.make_node("Sigmoid", ["batch_logits"], ["fixed_scores"]),
        helper.make_node("Concat", ["fixed_scores", "full_mean", "corner_mean"], [output_name], axis=1),
    ]
    shape = [batch_dim, size, size, 3] if layout == "NHWC" else [batch_dim, 3, size, size]
    graph = helper.make_graph(
        nodes,
        "wd14_probe",
        [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(output_name, TensorProto.FLOAT, [batch_dim, n_tags])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # readable by every onnxruntime >= 1.10
    onnx.checker.check_model(model)
    return model


def probe_scores(scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(full-image channel means, corner channel means), each 0..1, from one image's scores."""
    probes = scores[-len(PROBE_TAGS) :]
    return probes[:3], probes[3:]
