"""The per-device precision policy (training/precision.py): every device type's rule is checked with
device objects alone (no CUDA or MPS needed), and a run writes what it computed into its metadata."""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.kohya_ss_import import import_kohya_ss_config
from lib_lora_trainer.network.adapters import attached_adapters
from lib_lora_trainer.network.kohya_format import load_kohya_lora, load_network_file
from lib_lora_trainer.network.plan import load_saved_network, plan_network
from lib_lora_trainer.training import memory, precision
from lib_lora_trainer.training.device_settings import to_device_async
from lib_lora_trainer.training.loop import TrainingCallbacks, train
from lib_lora_trainer.training.optim import ParamGroup, build_optimizer
from lib_lora_trainer.training.precision import PrecisionRefused, host_weight_dtype, resolve_precision
from tests.engine.helpers import tiny_config, tiny_host
from tests.engine.test_training import small_source

CPU, CUDA, MPS = torch.device("cpu"), torch.device("cuda"), torch.device("mps")
FP16, BF16, FP32 = torch.float16, torch.bfloat16, torch.float32
TORCH_21, TORCH_25, TORCH_28 = (2, 1), (2, 5), (2, 8)


def resolve(device, weights, requested, version=TORCH_28, bf16=True):
    return resolve_precision(device, weights, requested, torch_version=version, bf16_available=bf16)


@pytest.mark.parametrize(
    ("device", "weights", "requested", "bf16", "compute", "scaler"),
    [
        # auto follows the device and the weights A1111 holds
        (CUDA, FP16, "auto", True, "fp16", True),  # A1111's default: its own half precision, scaled
        (CUDA, FP32, "auto", True, "bf16", False),  # --no-half on an RTX 30xx+
        (CUDA, FP32, "auto", False, "no", False),  # --no-half on an older GPU
        (CPU, FP32, "auto", True, "no", False),  # CPU autocast is 15-25x slower than fp32
        (MPS, FP32, "auto", False, "no", False),
        # "no" on half-precision weights computes in that half precision, scaled when fp16
        (CUDA, FP16, "no", True, "fp16", True),
        (CUDA, BF16, "no", True, "bf16", False),
        (CPU, FP32, "no", True, "no", False),
        # explicit choices
        (CUDA, FP32, "fp16", False, "fp16", True),
        (CUDA, FP16, "bf16", True, "bf16", False),
        (CPU, FP32, "bf16", True, "bf16", False),
        (CPU, FP32, "fp16", True, "fp16", True),
        (MPS, FP32, "fp16", False, "fp16", True),
    ],
)
def test_each_device_resolves_to_what_it_can_compute(device, weights, requested, bf16, compute, scaler):
    policy = resolve(device, weights, requested, bf16=bf16)
    assert policy.compute == compute
    assert (policy.scaler is not None) is scaler
    assert policy.autocast_dtype == {"no": None, "fp16": FP16, "bf16": BF16}[compute]


def test_no_on_half_weights_tells_the_user_what_really_happens():
    policy = resolve(CUDA, FP16, "no")
    assert "--no-half" in policy.notice and "fp16" in policy.notice
    assert not resolve(CUDA, FP32, "no").notice


@pytest.mark.parametrize(
    ("device", "weights", "requested", "version", "bf16", "message"),
    [
        (CUDA, FP32, "bf16", TORCH_28, False, "does not compute in bf16"),
        (MPS, FP32, "bf16", TORCH_28, False, "not offered on Apple MPS"),
        (MPS, FP32, "fp16", TORCH_21, False, "needs torch 2.5"),  # no MPS autocast before 2.5
        (MPS, FP32, "fp16", TORCH_25, False, "loss scaling"),  # MPS GradScaler from 2.8
        (CPU, FP32, "fp16", TORCH_21, True, "loss scaling"),  # torch.amp.GradScaler("cpu") from 2.3
        (CPU, FP16, "no", TORCH_28, True, "--no-half"),  # ldm's GroupNorm32 fails over half weights
        (MPS, FP16, "auto", TORCH_28, False, "--no-half"),  # A1111's Mac default: restart with --no-half
    ],
)
def test_what_a_device_cannot_do_is_refused(device, weights, requested, version, bf16, message):
    with pytest.raises(PrecisionRefused, match=message):
        resolve(device, weights, requested, version=version, bf16=bf16)


@pytest.mark.skipif(precision.torch_release() < (2, 3), reason="torch.amp.GradScaler arrived in 2.3")
def test_the_scaler_is_the_device_one_and_torch_21_on_cuda_uses_the_cuda_one(monkeypatch):
    assert resolve(MPS, FP32, "fp16").scaler == "torch.amp"
    assert resolve(CPU, FP32, "fp16").scaler == "torch.amp"
    assert resolve(CUDA, FP16, "fp16", version=TORCH_21).scaler == "torch.cuda.amp"
    scaler = resolve(CPU, FP32, "fp16").grad_scaler()
    assert isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled()  # a working CPU scaler
    assert resolve(CPU, FP32, "bf16").grad_scaler() is None


def test_device_rules_pinned_copies_and_fused_adamw():
    assert resolve(CUDA, FP16, "auto").pinned_copies and resolve(CUDA, FP16, "auto").fused_adamw
    assert not resolve(CPU, FP32, "auto").pinned_copies
    mps = resolve(MPS, FP32, "auto")
    assert not mps.pinned_copies and not mps.fused_adamw
    # the copy and the optimizer read the same table: no pin_memory (CUDA-only on torch 2.1) for MPS
    latents = torch.randn(1, 4, 2, 2)
    moved = to_device_async(latents, CPU, torch.float32)
    assert torch.equal(moved, latents)
    parameter = torch.nn.Parameter(torch.zeros(3))
    optimizer = build_optimizer(TrainingConfig(), [ParamGroup("unet", [parameter], 1e-4)], MPS)
    assert not optimizer.defaults.get("fused")


def test_safe_attention_rule_only_for_half_precision_on_the_cpu():
    assert resolve(CPU, FP32, "bf16", version=(2, 7)).math_attention
    assert not resolve(CPU, FP32, "bf16", version=(2, 8)).math_attention
    assert not resolve(CPU, FP32, "no", version=(2, 1)).math_attention
    assert not resolve(CUDA, FP16, "fp16", version=(2, 1)).math_attention


def test_mps_memory_is_metal_s_working_set_less_what_torch_holds(monkeypatch):
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: 24 * 1024**3, raising=False)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: 4 * 1024**3)
    assert memory.available_bytes(MPS) == 20 * 1024**3
    monkeypatch.delattr(torch.mps, "recommended_max_memory")
    assert memory.available_bytes(MPS) is None  # torch < 2.5: unknown, "auto" leaves checkpointing off


def test_the_weight_dtype_is_read_from_the_unet():
    unet = torch.nn.Sequential(torch.nn.Linear(8, 8).half(), torch.nn.Linear(2, 2))  # mostly fp16
    assert host_weight_dtype(unet) == FP16


def test_the_default_is_auto_and_on_the_cpu_it_trains_in_fp32():
    assert TrainingConfig().mixed_precision == "auto"
    assert resolve_precision(CPU, FP32, "auto").compute == "no"


@pytest.mark.skipif(precision.torch_release() < (2, 3), reason="no CPU loss scaler before torch 2.3")
def test_an_fp16_run_is_loss_scaled_and_the_file_says_what_was_computed(tmp_path, monkeypatch):
    scaled = []
    original = torch.amp.GradScaler.scale
    monkeypatch.setattr(
        torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(1) or original(self, loss)
    )
    config = tiny_config(tmp_path, epochs=1, mixed_precision="fp16", gradient_checkpointing="off")
    result = train(tiny_host(), config, small_source())

    assert result.status == "completed" and all(math.isfinite(v) for v in result.losses)
    assert scaled  # fp16 compute is always loss-scaled (it was not on the CPU before)
    _, metadata = load_kohya_lora(result.epochs[-1].path)
    assert metadata["ss_mixed_precision"] == "fp16"


def test_no_on_half_weights_writes_the_precision_that_was_computed(tmp_path, monkeypatch):
    # A CUDA run over A1111's fp16 model, with the device's facts given (this machine has no GPU): the
    # policy the loop resolves is what goes into the file.
    from lib_lora_trainer.training import loop

    policies = []

    def resolved_for_cuda_fp16(device, weight_dtype, requested):
        policy = resolve(CUDA, FP16, requested)
        policies.append(policy)
        return dataclasses.replace(policy, device=device, scaler=None)  # runs here, on the CPU

    monkeypatch.setattr(loop, "resolve_precision", resolved_for_cuda_fp16)
    notices = []

    class Notices(TrainingCallbacks):
        def on_notice(self, message):
            notices.append(message)

    config = tiny_config(tmp_path, epochs=1, mixed_precision="no", gradient_checkpointing="off")
    host = tiny_host()
    # the CUDA fp16 compute stands in on this CPU: torch 2.1's CPU autocast knows only bf16
    host.autocast = lambda compute: contextlib.nullcontext()
    result = train(host, config, small_source(), Notices())
    _, metadata = load_kohya_lora(result.epochs[-1].path)
    assert policies[0].scaler is not None and policies[0].compute == "fp16"
    assert metadata["ss_mixed_precision"] == "fp16"  # the truth, not the setting's "no"
    assert any("--no-half" in notice for notice in notices)


def test_an_fp32_run_writes_no(tmp_path):
    result = train(tiny_host(), tiny_config(tmp_path, epochs=1, mixed_precision="auto"), small_source())
    _, metadata = load_kohya_lora(result.epochs[-1].path)
    assert metadata["ss_mixed_precision"] == "no"


def test_the_kohya_importer_maps_no_with_the_same_rule():
    result = import_kohya_ss_config({"mixed_precision": "no"})
    assert result.config.mixed_precision == "no"
    assert any("mixed_precision no" in note and "fp16 with loss scaling" in note for note in result.notes)


# --- every adapter kind over A1111's fp16 weights ------------------------------------------------

FP16_KINDS = {
    "loha-tucker": dict(network_type="loha", conv_layers=True, use_tucker=True),
    "lokr": dict(network_type="lokr", conv_layers=True, lokr_factor=4),
    "dora": dict(network_type="locon", dora_wd=True),
}
NORM_LAYERS = (torch.nn.GroupNorm, torch.nn.LayerNorm)


def fp16_weight_host():
    """The tiny host with its UNet and text encoder held in fp16, as A1111 holds them without --no-half.

    The norm layers stay fp32: CUDA's autocast computes group and layer norm in fp32 over half weights,
    the CPU's refuses fp16 norm weights with fp32 input (ldm's GroupNorm32), so this is the CUDA
    computation on this CPU. Every layer an adapter targets is fp16.
    """
    host = tiny_host()
    for root in (host.unet(), host.text_encoder()):
        for module in root.modules():
            if not isinstance(module, NORM_LAYERS):
                for parameter in module.parameters(recurse=False):
                    parameter.data = parameter.data.half()
    return host


@pytest.mark.slow
@pytest.mark.skipif(precision.torch_release() < (2, 3), reason="no CPU loss scaler before torch 2.3")
@pytest.mark.parametrize("network", list(FP16_KINDS))
def test_no_on_fp16_weights_trains_every_kind_in_fp16_with_fp32_adapters(tmp_path, monkeypatch, network):
    from lib_lora_trainer.training import loop

    def resolved_for_cuda(device, weight_dtype, requested):  # CUDA's rule for these weights, run here
        policy = resolve(CUDA, weight_dtype, requested, version=precision.torch_release())
        return dataclasses.replace(policy, device=device)

    monkeypatch.setattr(loop, "resolve_precision", resolved_for_cuda)
    trained_dtypes, scaled = set(), []
    original_build, original_scale = loop.build_optimizer, torch.amp.GradScaler.scale

    def recording_build(config, groups, device):
        trained_dtypes.update(p.dtype for group in groups for p in group.params)
        return original_build(config, groups, device)

    monkeypatch.setattr(loop, "build_optimizer", recording_build)
    monkeypatch.setattr(
        torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(1) or original_scale(self, loss)
    )
    host = fp16_weight_host()
    assert host_weight_dtype(host.unet()) == FP16
    config = tiny_config(tmp_path, epochs=1, mixed_precision="no", **FP16_KINDS[network])
    result = train(host, config, small_source(count=2))

    assert result.status == "completed", result.message
    assert result.losses and all(math.isfinite(v) for v in result.losses)
    assert trained_dtypes == {FP32}  # fp32 master weights: the scaler refuses to unscale fp16 gradients
    assert scaled  # the policy's fp16 compute is loss-scaled
    path = result.epochs[-1].path
    modules, metadata = load_network_file(path)
    assert metadata["ss_mixed_precision"] == "fp16"
    assert all(torch.isfinite(t).all() for parts in modules.values() for t in parts.values())

    saved = load_saved_network(path, config)  # continue from the file on the same fp16 model
    plan = plan_network(config, host.unet(), host.text_encoder(), train_text_encoder=True, saved=saved)
    with attached_adapters(host.unet(), host.text_encoder(), plan.targets, plan.settings) as adapters:
        adapters.load(saved.weights)
        exported = adapters.export()
        changed = [
            float(adapters.kind.delta_weight(layer).detach().float().norm()) for _, layer in adapters.layers()
        ]
    assert exported.keys() == saved.weights.keys()
    for key, parts in saved.weights.items():
        assert exported[key].keys() == parts.keys()
    assert max(changed) > 0  # it trained: the update is not the zero it starts as
