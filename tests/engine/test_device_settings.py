"""Device settings for a run, on every torch from A1111's default 2.1 on."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lib_lora_trainer.training import device_settings, precision
from lib_lora_trainer.training.device_settings import (
    cpu_flash_backward_unsafe,
    fp16_grad_scaler,
    safe_cpu_attention,
    tf32_matmul,
    to_device_async,
)
from lib_lora_trainer.training.loop import train
from tests.engine.helpers import tiny_config, tiny_host
from tests.engine.test_training import small_source

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def test_tf32_is_switched_on_for_a_cuda_run_and_restored():
    matmul, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    saved = matmul.allow_tf32, cudnn.allow_tf32
    try:
        matmul.allow_tf32 = cudnn.allow_tf32 = False
        with tf32_matmul(CPU):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
        with pytest.raises(RuntimeError), tf32_matmul(CUDA):
            assert (matmul.allow_tf32, cudnn.allow_tf32) == (True, True)
            raise RuntimeError("a failed run")
        assert (matmul.allow_tf32, cudnn.allow_tf32) == (False, False)
    finally:
        matmul.allow_tf32, cudnn.allow_tf32 = saved


def test_batch_tensors_reach_the_device_with_the_training_dtype():
    latents = torch.randn(2, 4, 8, 8, dtype=torch.float16)
    moved = to_device_async(latents, CPU, torch.float32)
    assert moved.dtype == torch.float32 and torch.equal(moved, latents.float())


def test_only_fp16_gets_a_loss_scaler():
    if precision.torch_release() >= (2, 3):  # fp16 on the CPU is scaled too
        assert isinstance(fp16_grad_scaler(CPU, "fp16"), torch.amp.GradScaler)
    else:  # ... and refused where this torch has no CPU scaler
        with pytest.raises(precision.PrecisionRefused, match="loss scaling"):
            fp16_grad_scaler(CPU, "fp16")
    assert fp16_grad_scaler(CPU, "bf16") is None
    assert fp16_grad_scaler(CUDA, "bf16") is None
    assert fp16_grad_scaler(CUDA, "no") is None
    with pytest.warns(UserWarning):  # this machine has no CUDA, so the scaler disables itself
        assert fp16_grad_scaler(CUDA, "fp16") is not None


def test_loss_scaler_on_a_torch_without_torch_amp_grad_scaler(monkeypatch):
    # torch.amp.GradScaler came with torch 2.3; A1111 v1.10.1 installs 2.1.2, which has only the CUDA one.
    monkeypatch.delattr(torch.amp, "GradScaler", raising=False)
    with pytest.warns((UserWarning, FutureWarning)):
        scaler = fp16_grad_scaler(CUDA, "fp16")
    assert isinstance(scaler, torch.cuda.amp.GradScaler)


@pytest.mark.parametrize(
    ("device", "precision", "version", "unsafe"),
    [
        (CPU, "bf16", "2.1.2+cu121", True),
        (CPU, "fp16", "2.7.1", True),
        (CPU, "bf16", "2.8.0", False),
        (CPU, "bf16", "2.13.0+cpu", False),
        (CPU, "no", "2.1.2", False),
        (CUDA, "bf16", "2.1.2", False),
        (CUDA, "fp16", "2.1.2", False),
    ],
)
def test_cpu_flash_backward_is_avoided_only_where_it_corrupts_memory(device, precision, version, unsafe):
    assert cpu_flash_backward_unsafe(device, precision, torch.torch_version.TorchVersion(version)) is unsafe


def _attention_backward_kind() -> str:
    q = torch.randn(1, 2, 8, 16, requires_grad=True)
    return F.scaled_dot_product_attention(q, q, q).grad_fn.name()


def test_unsafe_torch_trains_with_the_maths_kernel_and_the_flag_comes_back(monkeypatch):
    monkeypatch.setattr(device_settings, "CPU_FLASH_BACKWARD_FIXED_IN", (99, 0))
    flash = _attention_backward_kind()
    with safe_cpu_attention(CPU, "bf16"):
        assert _attention_backward_kind() != flash and "Flash" not in _attention_backward_kind()
    assert torch.backends.cuda.flash_sdp_enabled()
    with safe_cpu_attention(CPU, "no"):
        assert _attention_backward_kind() == flash


def test_a_bf16_run_on_an_unsafe_torch_completes(monkeypatch, tmp_path):
    monkeypatch.setattr(precision, "CPU_FLASH_BACKWARD_FIXED_IN", (99, 0))
    seen = []
    original = F.scaled_dot_product_attention

    def recording(*args, **kwargs):
        seen.append(torch.backends.cuda.flash_sdp_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    config = tiny_config(tmp_path, epochs=1, mixed_precision="bf16", save_precision="bf16")
    result = train(tiny_host(), config, small_source())
    assert result.status == "completed"
    assert seen and not any(seen)
    assert torch.backends.cuda.flash_sdp_enabled()
