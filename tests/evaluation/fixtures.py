"""Tiny scoring models built offline: ONNX embedders (onnx.helper) and a small transformers CLIP.

The ONNX embedder averages the image over a 4x4 grid, removes each image's mean (so cosines are not all
near 1) and projects the 48 numbers with a fixed random matrix: a real function of the pixels, so a copy
embeds identically, a light edit nearly so, and an unrelated picture differently.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from lib_lora_trainer.evaluation.models import CHARACTER_MODEL, CLIP_MODEL, FACE_MODEL

GRID = 4
DIMS = 16


def build_embedder(size: int, *, fixed_batch: bool = False, seed: int = 0) -> onnx.ModelProto:
    projection = np.random.default_rng(seed).standard_normal((3 * GRID * GRID, DIMS)).astype(np.float32)
    batch = 1 if fixed_batch else "batch"
    kernel = size // GRID
    nodes = [
        helper.make_node(
            "AveragePool", ["data"], ["pooled"], kernel_shape=[kernel, kernel], strides=[kernel, kernel]
        ),
        helper.make_node("Flatten", ["pooled"], ["flat"], axis=1),
        helper.make_node("ReduceMean", ["flat"], ["mean"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["flat", "mean"], ["centred"]),
        helper.make_node("MatMul", ["centred", "projection"], ["fc1"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny_embedder",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, [batch, DIMS])],
        [
            helper.make_tensor(
                "projection", TensorProto.FLOAT, list(projection.shape), projection.ravel().tolist()
            )
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def write_embedder(path: Path, size: int, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(build_embedder(size, **options), path)
    return path


def write_tiny_clip(folder: Path, image_size: int = 32) -> Path:
    """A random-weight CLIP with a byte-level BPE vocabulary (no merges), saved like a real checkpoint."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    folder.mkdir(parents=True, exist_ok=True)
    characters = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(characters + [c + "</w>" for c in characters])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tokenizer = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=77,
        ),
        vision_config=dict(
            image_size=image_size, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2,
        ),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder, safe_serialization=False)
    tokenizer.save_pretrained(folder)
    processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor.save_pretrained(folder)
    return folder


def write_models_dir(models_dir: Path) -> Path:
    """Every scoring model where :mod:`lib_lora_trainer.evaluation.models` looks for it."""
    write_embedder(FACE_MODEL.model_path(models_dir), 112, fixed_batch=True, seed=1)
    write_embedder(CHARACTER_MODEL.model_path(models_dir), 384, seed=2)
    write_tiny_clip(CLIP_MODEL.folder(models_dir))
    for name in CLIP_MODEL.files:  # a checkpoint saved by this transformers may lack an optional file
        target = CLIP_MODEL.folder(models_dir) / name
        if not target.exists():
            target.write_text("{}", encoding="utf-8")
    return models_dir
