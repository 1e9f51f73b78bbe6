"""Device settings a run needs, and the torch versions they must work on.

A1111 v1.10.1 installs torch 2.1.2 by default, and users upgrade it; everything here works from 2.1 on:

* TF32 matmuls on CUDA for the length of the run;
* host-to-device copies that do not make the CPU wait for the GPU;
* the fp16 gradient scaler (``torch.amp.GradScaler`` only exists from torch 2.3; the per-device rules
  live in :mod:`~lib_lora_trainer.training.precision`);
* no CPU flash attention backward in bf16/fp16 on the torch releases where it corrupts the heap
  (pytorch issues #132871 and #156022, fixed in 2.8): a training run would kill the whole WebUI.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from lib_lora_trainer.training.precision import (
    CPU_FLASH_BACKWARD_FIXED_IN,
    device_rule,
    maths_attention_kernel,
    resolve_precision,
)


@contextlib.contextmanager
def tf32_matmul(device: torch.device) -> Iterator[None]:
    """Let fp32 matmuls and convolutions use TF32 on CUDA for the run (the WebUI sets the same on Ampere+);
    the previous flags come back afterwards. A no-op on other devices."""
    if device.type != "cuda":
        yield
        return
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def to_device_async(tensor: torch.Tensor, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Copy a CPU batch tensor to ``device`` without making the CPU wait for the GPU.

    A plain ``.to("cuda")`` of pageable memory synchronises the stream, so the CPU would wait for the
    previous step's kernels before queueing this one; a pinned copy is queued and returns at once.
    """
    if device_rule(device).pinned_copies and tensor.device.type == "cpu":
        return tensor.to(dtype).pin_memory().to(device, non_blocking=True)
    return tensor.to(device, dtype)


def fp16_grad_scaler(device: torch.device, mixed_precision: str) -> torch.amp.GradScaler | None:
    """The loss scaler an fp16 run on ``device`` needs, or None (bf16 and fp32 need none); see
    :mod:`~lib_lora_trainer.training.precision` for the per-device rule."""
    if mixed_precision != "fp16":
        return None
    return resolve_precision(device, torch.float32, "fp16").grad_scaler()


def cpu_flash_backward_unsafe(device: torch.device, mixed_precision: str, torch_version=None) -> bool:
    """True where torch's CPU flash-attention backward corrupts memory: bf16/fp16 inputs, torch < 2.8.

    Seen here with torch 2.1.2 (A1111 v1.10.1's default): cross-attention with 77 tokens and head size
    32 or 160 (SD1.5's deepest level) aborts the process with "double free or corruption".
    """
    version = torch.__version__ if torch_version is None else torch_version
    return device.type == "cpu" and mixed_precision != "no" and version < CPU_FLASH_BACKWARD_FIXED_IN


@contextlib.contextmanager
def safe_cpu_attention(device: torch.device, mixed_precision: str) -> Iterator[None]:
    """Route scaled-dot-product attention to its maths kernel where the flash one is unsafe (the
    policy's :meth:`~lib_lora_trainer.training.precision.PrecisionPolicy.attention_guard` does the same
    for a resolved run)."""
    if not cpu_flash_backward_unsafe(device, mixed_precision):
        yield
        return
    with maths_attention_kernel(mixed_precision):
        yield
