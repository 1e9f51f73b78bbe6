"""An independent implementation of A1111 v1.10.1's merge formulas (``extensions-builtin/Lora``), for tests.

Written from A1111's ``network_lora.py``, ``network_hada.py``, ``network_lokr.py``, ``lyco_helpers.py`` and
``network.py`` (``calc_scale``, ``finalize_updown``, ``apply_weight_decompose``) without peft, so it can
check what peft trained and what the file holds.
"""

from __future__ import annotations

import torch

from lib_lora_trainer.network.kohya_format import LoraModuleWeights

# The parts each of A1111's module types reads (besides alpha and dora_scale, read by every type).
A1111_PARTS = {
    "lora": {"lora_up.weight", "lora_down.weight", "lora_mid.weight"},
    "hada": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"},
    "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"},
}
COMMON_PARTS = {"alpha", "dora_scale"}


def a1111_module_type(parts: set[str]) -> str | None:
    """Which of A1111's module types takes a module with these parts (its create_module tests)."""
    if {"lora_up.weight", "lora_down.weight"} <= parts:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return "hada"
    has_1 = "lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts
    has_2 = "lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts
    return "lokr" if has_1 and has_2 else None


def _cp(t: torch.Tensor, wa: torch.Tensor, wb: torch.Tensor) -> torch.Tensor:
    """lyco_helpers.make_weight_cp: the Tucker core times its two mode matrices."""
    temp = torch.einsum("i j k l, j r -> i r k l", t, wb)
    return torch.einsum("i j k l, i r -> r j k l", temp, wa)


def _product(up: torch.Tensor, down: torch.Tensor, shape) -> torch.Tensor:
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(shape)


def a1111_updown(parts: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """What A1111 adds to ``weight`` at multiplier 1 for one saved module."""
    p = {k: v.float() for k, v in parts.items()}
    kind = a1111_module_type(set(p))
    shape = weight.shape
    dim = None
    if kind == "lora":
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        dim = down.shape[0]
        updown = _product(up, down, shape)  # rebuild_conventional
    elif kind == "hada":
        dim = p["hada_w1_b"].shape[0]
        if "hada_t1" in p:
            first = _cp(p["hada_t1"], p["hada_w1_a"], p["hada_w1_b"])
            second = _cp(p["hada_t2"], p["hada_w2_a"], p["hada_w2_b"])
        else:
            flat = (p["hada_w1_a"].shape[0], p["hada_w1_b"].shape[1])
            first = _product(p["hada_w1_a"], p["hada_w1_b"], flat)
            second = _product(p["hada_w2_a"], p["hada_w2_b"], flat)
        updown = (first * second).reshape(shape)
    elif kind == "lokr":
        if "lokr_w1" in p:
            w1 = p["lokr_w1"]
        else:
            w1 = p["lokr_w1_a"] @ p["lokr_w1_b"]
            dim = p["lokr_w1_b"].shape[0]
        if "lokr_w2" in p:
            w2 = p["lokr_w2"]
        elif "lokr_t2" in p:
            w2 = _cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
            dim = p["lokr_w2_b"].shape[0]
        else:
            w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
            dim = p["lokr_w2_b"].shape[0]
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        updown = torch.kron(w1, w2.contiguous()).reshape(shape)
    else:
        raise AssertionError(f"A1111 has no module type for parts {sorted(p)}")
    scale = p["alpha"].item() / dim if (dim is not None and "alpha" in p) else 1.0
    updown = updown * scale
    if "dora_scale" in p:
        merged = weight.float() + updown
        norm = (
            merged.transpose(0, 1)
            .reshape(merged.shape[1], -1)
            .norm(dim=1, keepdim=True)
            .reshape(merged.shape[1], *[1] * (weight.dim() - 1))
            .transpose(0, 1)
        )
        updown = merged * (p["dora_scale"] / norm) - weight.float()
    return updown


def lora_delta_weight(module: LoraModuleWeights) -> torch.Tensor:
    """``up @ down * alpha / rank`` in float32, shaped like the adapted layer's weight."""
    down = module.down.float()
    up = module.up.float()
    if down.ndim == 2:
        delta = up @ down
    else:  # conv: a kh x kw down conv followed by a 1x1 up conv
        delta = torch.einsum("or,rikl->oikl", up.flatten(1), down)
    return delta * module.scale


def merge_into_weight(
    weight: torch.Tensor, module: LoraModuleWeights, multiplier: float = 1.0
) -> torch.Tensor:
    """A new weight tensor equal to ``weight + multiplier * up @ down * alpha / rank``."""
    delta = lora_delta_weight(module)
    if delta.shape != weight.shape:
        raise ValueError(
            f"LoRA of shape up {tuple(module.up.shape)} / down {tuple(module.down.shape)} does not fit "
            f"a weight of shape {tuple(weight.shape)}"
        )
    return (weight.float() + multiplier * delta.to(weight.device)).to(weight.dtype)
