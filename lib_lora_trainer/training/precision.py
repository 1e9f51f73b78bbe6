"""What a run really computes in, per device: the one place that knows CUDA, the CPU and Apple MPS.

A run's precision is resolved once, before the model is touched, from three facts: the device, the
dtype of the weights the host holds (A1111 loads its UNet in fp16 unless started with ``--no-half``)
and ``mixed_precision`` from the settings. The result, a :class:`PrecisionPolicy`, gives the autocast
the forward passes run under, the loss scaler, and the device rules (fused AdamW, pinned copies, the
safe-attention rule); its ``compute`` is what the epoch file's ``ss_mixed_precision`` says.

The rules, and why:

* ``auto`` (the default) follows the device. CUDA: the weights' own half precision when they are half
  (A1111's default fp16: fp16 autocast with loss scaling, as A1111's own textual-inversion trainer does);
  with fp32 weights bf16 where the GPU has it (no loss scaling needed, no fp16 overflow), else fp32 (an
  older GPU run with ``--no-half`` is usually run so because fp16 fails on it). CPU: fp32, because CPU
  autocast is far slower than fp32 (a step 15-25x slower measured in A1111). MPS: fp32, as the Apple
  Silicon guides train; fp16 there needs torch 2.5 (autocast) and 2.8 (loss scaling).
* Only CUDA trains over half-precision weights: ldm's GroupNorm32 runs in fp32 over the weights, which
  only CUDA's autocast casts; on the CPU and MPS the WebUI must hold the model in fp32 (``--no-half``),
  and the run is refused before anything changes otherwise.
* ``no`` means full precision. Weights held in half precision cannot compute in fp32 without a second,
  fp32 copy of the UNet for the run (twice its memory, and A1111 renders samples on the same model
  meanwhile), so ``no`` on half weights trains in that half precision under autocast, with loss scaling
  for fp16, says so in the log and writes it into the metadata.
* Whenever the compute is fp16 a loss scaler is used (``torch.amp.GradScaler`` for the device from
  torch 2.3, ``torch.cuda.amp.GradScaler`` before that on CUDA); where the device has none on this torch
  (CPU before 2.3, MPS before 2.8) the run is refused with what to do instead.
"""

from __future__ import annotations

import contextlib
import logging
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from lib_lora_trainer.config import ConfigError

log = logging.getLogger(__name__)

HALF_DTYPES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
AUTOCAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# The first release with the fix for the CPU flash-attention backward in bf16/fp16 (pytorch PR #156585;
# issues #132871, #156022): before it, a CPU run in half precision aborts the whole process.
CPU_FLASH_BACKWARD_FIXED_IN = (2, 8)
TORCH_AMP_GRAD_SCALER_SINCE = (2, 3)  # torch.amp.GradScaler(device); before: torch.cuda.amp only


@dataclass(frozen=True)
class DeviceRule:
    """What one device type supports; the table below is the whole per-device policy."""

    pinned_copies: bool  # host-to-device copies through pinned memory (a queued copy, no CPU wait)
    fused_adamw: bool  # torch's fused AdamW may be tried (the CPU's arrives with torch 2.4)
    autocast_since: dict[str, tuple[int, int]]  # half precision -> first torch whose autocast has it
    grad_scaler_since: tuple[int, int]  # first torch with a loss scaler for this device
    auto_for_fp32_weights: str  # what "auto" computes in when the weights are fp32
    half_weights: bool  # can train over weights held in fp16/bf16 (ldm's GroupNorm32 needs autocast's
    # fp32 group_norm with half weights, which only CUDA's autocast gives)


DEVICE_RULES: dict[str, DeviceRule] = {
    "cuda": DeviceRule(
        pinned_copies=True,
        fused_adamw=True,
        autocast_since={"fp16": (2, 0), "bf16": (2, 0)},
        grad_scaler_since=(2, 0),
        auto_for_fp32_weights="bf16",  # where the GPU supports it, else "no"
        half_weights=True,
    ),
    "cpu": DeviceRule(
        pinned_copies=False,
        fused_adamw=True,
        autocast_since={"fp16": (2, 0), "bf16": (2, 0)},
        grad_scaler_since=TORCH_AMP_GRAD_SCALER_SINCE,
        auto_for_fp32_weights="no",
        half_weights=False,  # "mixed dtype (CPU)" in GroupNorm32; A1111 on the CPU needs --no-half anyway
    ),
    # Unified memory: nothing to pin. Fused AdamW is left out: on MPS it ignored the loss scaler's
    # found-inf flag until 2026 (pytorch #186360). Autocast fp16 from 2.5 (#99272); its bf16 is not offered.
    "mps": DeviceRule(
        pinned_copies=False,
        fused_adamw=False,
        autocast_since={"fp16": (2, 5)},
        grad_scaler_since=(2, 8),  # pytorch #150255
        auto_for_fp32_weights="no",
        half_weights=False,
    ),
}


def device_rule(device: torch.device) -> DeviceRule:
    """The rule of ``device``'s type; an unknown type (xpu ...) gets the CPU's conservative one."""
    return DEVICE_RULES.get(device.type, DEVICE_RULES["cpu"])


def torch_release(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``version`` (this torch by default): ``"2.1.2+cu121"`` -> (2, 1)."""
    parts = (version or torch.__version__).split("+")[0].split(".")
    return int(parts[0]), int("".join(ch for ch in parts[1] if ch.isdigit()) or 0)


def bf16_supported(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively (CUDA: Ampere and newer); the CPU always can."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device.type == "cpu"


def host_weight_dtype(unet: torch.nn.Module) -> torch.dtype:
    """The dtype most of the UNet's floating-point weights are held in (adapters, if attached, are few)."""
    counts: Counter[torch.dtype] = Counter()
    for parameter in unet.parameters():
        if parameter.is_floating_point():
            counts[parameter.dtype] += parameter.numel()
    return counts.most_common(1)[0][0] if counts else torch.float32


class PrecisionRefused(ConfigError):
    """The asked precision cannot run on this device with this torch; the message says what to choose."""

    def __init__(self, message: str):
        super().__init__([message])


@dataclass(frozen=True)
class PrecisionPolicy:
    """The resolved precision of one run and the device rules that go with it."""

    device: torch.device
    requested: str  # the setting: "auto", "no", "fp16" or "bf16"
    weight_dtype: torch.dtype
    compute: str  # what the forward passes compute in: "no" (fp32), "fp16" or "bf16"
    scaler: str | None  # None, "torch.amp" or "torch.cuda.amp"
    reason: str  # one sentence for the log
    notice: str = ""  # set when the run computes in something else than was asked
    torch_version: tuple[int, int] = (0, 0)

    @property
    def rule(self) -> DeviceRule:
        return device_rule(self.device)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return AUTOCAST_DTYPES.get(self.compute)

    @property
    def fused_adamw(self) -> bool:
        return self.rule.fused_adamw

    @property
    def pinned_copies(self) -> bool:
        return self.rule.pinned_copies

    @property
    def math_attention(self) -> bool:
        """True where the CPU flash-attention backward is unsafe: half precision on torch < 2.8."""
        return (
            self.device.type == "cpu"
            and self.compute != "no"
            and self.torch_version < CPU_FLASH_BACKWARD_FIXED_IN
        )

    def autocast(self) -> contextlib.AbstractContextManager[None]:
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """A fresh loss scaler for an fp16 run, or None."""
        if self.scaler == "torch.amp":
            return torch.amp.GradScaler(self.device.type)
        if self.scaler == "torch.cuda.amp":
            return torch.cuda.amp.GradScaler()
        return None

    @contextlib.contextmanager
    def attention_guard(self) -> Iterator[None]:
        """Route scaled-dot-product attention to its maths kernel where the flash one is unsafe; the flag
        is put back afterwards. A no-op everywhere else."""
        if not self.math_attention:
            yield
            return
        with maths_attention_kernel(self.compute):
            yield


@contextlib.contextmanager
def maths_attention_kernel(compute: str) -> Iterator[None]:
    """Scaled-dot-product attention on its maths kernel for the block (CPU flash attention is unsafe in
    ``compute`` training on this torch); the flag is put back afterwards."""
    log.info(
        "torch %s: CPU flash attention is unsafe in %s training, using the maths kernel",
        torch.__version__,
        compute,
    )
    enabled = torch.backends.cuda.flash_sdp_enabled()
    torch.backends.cuda.enable_flash_sdp(False)  # also governs the CPU kernel choice
    try:
        yield
    finally:
        torch.backends.cuda.enable_flash_sdp(enabled)


def resolve_precision(
    device: torch.device,
    weight_dtype: torch.dtype,
    requested: str,
    *,
    torch_version: tuple[int, int] | None = None,
    bf16_available: bool | None = None,
) -> PrecisionPolicy:
    """The precision a run on ``device`` over weights of ``weight_dtype`` computes in for ``requested``.

    ``torch_version`` and ``bf16_available`` default to this torch and this device; tests pass them so
    that every device's rule is checked without the device.
    """
    version = torch_release() if torch_version is None else torch_version
    bf16 = bf16_supported(device) if bf16_available is None else bf16_available
    rule = device_rule(device)
    weights = HALF_DTYPES.get(weight_dtype, "no")
    notice = ""
    if weights != "no" and not rule.half_weights:
        raise PrecisionRefused(
            f"The loaded model is held in {weights}, which cannot be trained on {_where(device)}; start the "
            "WebUI with --no-half (the model is then held in fp32) and train with mixed precision 'auto'."
        )
    if requested == "auto":
        if weights != "no":
            compute, why = weights, f"the loaded weights are {weights}"
        elif rule.auto_for_fp32_weights == "bf16" and bf16:
            compute, why = "bf16", f"fp32 weights on a {device.type} device with bf16"
        else:
            compute, why = "no", f"fp32 weights on {device.type}"
        reason = f"mixed precision auto: {_describe(compute)} ({why})"
    elif requested == "no" and weights != "no":
        compute = weights
        notice = (
            f"Mixed precision 'no' was chosen, but the loaded model's weights are {weights} (A1111 without "
            f"--no-half), so training computes in {weights}"
            + (" with loss scaling" if weights == "fp16" else "")
            + "; start the WebUI with --no-half to train in fp32."
        )
        reason = f"mixed precision no: {_describe(compute)} (the weights are {weights})"
    else:
        compute = requested
        reason = f"mixed precision {requested}: {_describe(compute)}"
    _refuse_unsupported(device, compute, version, bf16, rule)
    scaler = _scaler_kind(device, compute, version)
    if scaler:
        reason += ", with loss scaling"
    return PrecisionPolicy(
        device=device,
        requested=requested,
        weight_dtype=weight_dtype,
        compute=compute,
        scaler=scaler,
        reason=reason,
        notice=notice,
        torch_version=version,
    )


def _where(device: torch.device) -> str:
    return {"cuda": "this GPU", "cpu": "the CPU", "mps": "Apple MPS"}.get(device.type, device.type)


def _describe(compute: str) -> str:
    return "fp32, no autocast" if compute == "no" else f"{compute} autocast"


def _refuse_unsupported(
    device: torch.device, compute: str, version: tuple[int, int], bf16: bool, rule: DeviceRule
) -> None:
    if compute == "no":
        return
    where = _where(device)
    since = rule.autocast_since.get(compute)
    if since is None:
        raise PrecisionRefused(
            f"{compute} training is not offered on {where}; choose mixed precision 'no' or 'fp16'."
        )
    if compute == "bf16" and not bf16:
        raise PrecisionRefused(
            f"{where} does not compute in bf16 (it needs an RTX 30xx or newer); choose mixed precision "
            "'fp16' or 'auto'."
        )
    if version < since:
        raise PrecisionRefused(
            f"{compute} training on {where} needs torch {since[0]}.{since[1]} or newer (this is torch "
            f"{torch.__version__}); choose mixed precision 'no', or start the WebUI with --no-half if the "
            "model is loaded in half precision."
        )
    if compute == "fp16" and version < rule.grad_scaler_since:
        need = rule.grad_scaler_since
        raise PrecisionRefused(
            f"fp16 training on {where} needs loss scaling, which torch {torch.__version__} does not have "
            f"there (it needs {need[0]}.{need[1]}); choose mixed precision 'no' or 'bf16', or start the "
            "WebUI with --no-half if the model is loaded in fp16."
        )


def _scaler_kind(device: torch.device, compute: str, version: tuple[int, int]) -> str | None:
    if compute != "fp16":
        return None  # bf16 has fp32's range; fp32 needs none
    if version >= TORCH_AMP_GRAD_SCALER_SINCE and hasattr(torch.amp, "GradScaler"):
        return "torch.amp"
    return "torch.cuda.amp"  # torch 2.1/2.2 on CUDA (the other devices were refused above)
