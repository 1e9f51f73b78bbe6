"""How much memory a training step needs, and so whether gradient checkpointing must be on.

Checkpointing recomputes each UNet block's forward during backward: 30-49 % more time per step for
35-41 % less extra memory (``benchmarks/results/ablations``). ``"auto"``, the default, pays that only
when a step would not fit otherwise:

1. a probe runs the live UNet (adapters attached) forward at two small latent sizes and adds up the
   bytes autograd keeps for backward. With scaled-dot-product attention they grow linearly with the
   latent area (no attention matrix is kept), so the two points give a line, read at the largest batch:
   batch size x (resolution / 8)², the area every bucket stays within;
2. need = the part that grows with the image x 1.45 (backward's own buffers) + the part that does not
   (autocast's copies of the weights, the text encoder's activations) + the gradients and optimizer state
   of the trainable parameters + 448 MiB (latents, conditioning, allocator slack);
3. free = what the device has free plus what torch's allocator holds unused (CUDA), the system's
   available memory (CPU), or Metal's recommended working set less what torch holds (Apple MPS);
4. checkpointing goes on when need > 90 % of free.

A step that still runs out of memory with checkpointing off switches it on and is done again (loop.py).
Running out of memory is told apart from other errors by :func:`is_out_of_memory` alone, the same on
CUDA and Apple MPS and on every torch release the extension runs on.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import torch

from lib_lora_trainer.config import TrainingConfig
from lib_lora_trainer.model.host import TrainingHost

GIB = 1024**3
PROBE_LATENT_SIDES = (8, 16)  # 64 and 128 px: cheap; on SD1.5 the same line as 128/256 px to the byte
# Calibrated on the CPU benchmark (benchmarks/results/cpu-sd15-memory.md, SD1.5, rank 32): with these two
# the estimate is at or above the measured extra memory of every scenario, 256 and 512 px, batch 1 and 2.
BACKWARD_HEADROOM = 1.45  # backward's own buffers: gradients of the activations it is working through
FIXED_HEADROOM_BYTES = 448 * 1024**2  # latents, conditioning, allocator slack
USABLE_FRACTION = 0.9
GRADIENT_BYTES = 4  # adapters train in fp32
OPTIMIZER_STATE_BYTES = {
    "AdamW": 8,
    "AdamW8bit": 2,
    "PagedAdamW8bit": 2,
    "Lion8bit": 1,
    "Lion": 4,
    "Adafactor": 4,
    "Prodigy": 16,
    "AdamWScheduleFree": 8,
}


# torch's own out-of-memory errors: CUDA's (torch 1.13+) and every device's (torch 2.5+, of which CUDA's is
# an alias); Apple MPS raises a plain RuntimeError that starts with MPS_OUT_OF_MEMORY.
OUT_OF_MEMORY_ERRORS: tuple[type[BaseException], ...] = tuple(
    error
    for error in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
    if error is not None
)
MPS_OUT_OF_MEMORY = "MPS backend out of memory"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is the device running out of memory (CUDA or Apple MPS), not another failure."""
    if OUT_OF_MEMORY_ERRORS and isinstance(error, OUT_OF_MEMORY_ERRORS):
        return True
    return isinstance(error, RuntimeError) and str(error).lstrip().startswith(MPS_OUT_OF_MEMORY)


class CatchOutOfMemory:
    """``with CatchOutOfMemory() as memory:`` swallows an out-of-memory error of the block and sets
    ``memory.ran_out``; any other error goes on. The error and its traceback, which hold the failed
    work's tensors, are dropped on leaving the block, so what they held can be freed right after it."""

    def __init__(self) -> None:
        self.ran_out = False

    def __enter__(self) -> CatchOutOfMemory:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        self.ran_out = error is not None and is_out_of_memory(error)
        return self.ran_out


@dataclass(frozen=True)
class ActivationLine:
    """Bytes kept for backward by one sample: ``fixed + per_latent_pixel x latent pixels``."""

    fixed_bytes: float
    bytes_per_latent_pixel: float

    def bytes_for(self, batch_size: int, latent_pixels: int, growth_factor: float = 1.0) -> int:
        """The line at ``batch_size`` x ``latent_pixels``; ``growth_factor`` scales only the growing part."""
        growing = batch_size * self.bytes_per_latent_pixel * latent_pixels * growth_factor
        return int(max(0.0, self.fixed_bytes) + growing)


@dataclass(frozen=True)
class CheckpointingChoice:
    enabled: bool
    reason: str  # for the log and the Run panel


def saved_tensor_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of the tensors autograd keeps while ``forward`` runs, each storage counted once.

    Storages of ``exclude`` (the model's own weights, which exist anyway) are not counted.
    """
    excluded = {tensor.untyped_storage().data_ptr() for tensor in exclude}
    kept: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            kept[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        result = forward()
    del result  # the graph, and what it kept, goes with it
    return sum(kept.values())


def probe_activation_line(
    forward_at: Callable[[int], object],
    exclude: Iterable[torch.Tensor],
    sides: tuple[int, int] = PROBE_LATENT_SIDES,
) -> ActivationLine:
    """The activation line from two probes; ``forward_at(side)`` runs one sample at side x side latents."""
    weights = list(exclude)
    small, large = sides
    small_bytes = saved_tensor_bytes(lambda: forward_at(small), weights)
    large_bytes = saved_tensor_bytes(lambda: forward_at(large), weights)
    slope = max(0.0, (large_bytes - small_bytes) / (large * large - small * small))
    return ActivationLine(fixed_bytes=small_bytes - slope * small * small, bytes_per_latent_pixel=slope)


def parameter_state_bytes(trainable_parameters: int, optimizer: str) -> int:
    """Gradients plus optimizer state for the trainable parameters."""
    per_parameter = GRADIENT_BYTES + OPTIMIZER_STATE_BYTES.get(optimizer, 8)
    return trainable_parameters * per_parameter


def step_need_bytes(
    line: ActivationLine, batch_size: int, latent_pixels: int, trainable_parameters: int, optimizer: str
) -> int:
    """What one training step needs beyond the loaded model and the adapters themselves."""
    # Backward's buffers follow the activations it works through; what does not grow with the image (e.g.
    # autocast's low-precision copies of fp32 weights, 1.6 GiB for SD1.5's UNet) is kept, not doubled.
    activations = line.bytes_for(batch_size, latent_pixels, growth_factor=BACKWARD_HEADROOM)
    return activations + parameter_state_bytes(trainable_parameters, optimizer) + FIXED_HEADROOM_BYTES


def estimate_step_bytes(
    host: TrainingHost,
    conditioning: Callable[[], torch.Tensor],
    *,
    mixed_precision: str,
    batch_size: int,
    resolution: int,
    trainable_parameters: int,
    optimizer: str,
) -> int:
    """Probe ``host``'s UNet (adapters attached, inside a session) and estimate one step's extra memory.

    ``conditioning()`` gives one caption's conditioning as training makes it: through the text encoder
    with gradients when it is trained, so its activations count too.
    """
    device = host.device
    last_timestep = len(host.alphas_cumprod()) - 1

    def forward_at(side: int) -> torch.Tensor:
        latents = torch.zeros(1, 4, side, side, device=device)
        timesteps = torch.full((1,), last_timestep, dtype=torch.long, device=device)
        with host.autocast(mixed_precision):
            return host.predict(latents, timesteps, conditioning())

    weights = [p for module in (host.unet(), host.text_encoder()) for p in module.parameters()]
    line = probe_activation_line(forward_at, weights)
    side = resolution // 8
    return step_need_bytes(line, batch_size, side * side, trainable_parameters, optimizer)


def free_cached_memory(device: torch.device) -> None:
    """Give back what a failed step left in torch's allocator."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


def available_bytes(device: torch.device) -> int | None:
    """Memory a step can still use on ``device``, or None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        held_unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + held_unused)
    if device.type == "cpu":
        return _linux_available_memory()
    if device.type == "mps":
        return _mps_available_memory()
    return None


def _mps_available_memory() -> int | None:
    """Apple MPS: what Metal recommends this process may use, less what torch's driver holds already
    (torch 2.5+ tells the first; before, the free memory is unknown and "auto" leaves checkpointing off)."""
    recommended = getattr(torch.mps, "recommended_max_memory", None)
    if recommended is None:
        return None
    return max(0, int(recommended()) - int(torch.mps.driver_allocated_memory()))


def _linux_available_memory(meminfo: Path = Path("/proc/meminfo")) -> int | None:
    try:
        for line in meminfo.read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def choose_checkpointing(mode: str, need_bytes: int | None, free_bytes: int | None) -> CheckpointingChoice:
    """Whether to checkpoint, for ``mode`` "on", "off" or "auto" (from the estimate and free memory)."""
    if mode == "on":
        return CheckpointingChoice(True, "on (chosen in the settings)")
    if mode == "off":
        return CheckpointingChoice(False, "off (chosen in the settings)")
    if need_bytes is None or free_bytes is None:
        return CheckpointingChoice(False, "auto: off (free memory unknown on this device)")
    enabled = need_bytes > USABLE_FRACTION * free_bytes
    estimate = f"a step needs about {need_bytes / GIB:.1f} GiB, {free_bytes / GIB:.1f} GiB free"
    return CheckpointingChoice(enabled, f"auto: {'on' if enabled else 'off'} ({estimate})")


def out_of_memory_advice(
    device: torch.device, config: TrainingConfig, during: str, checkpointing: bool
) -> str:
    """What to change after running out of memory ``during`` (e.g. "at step 12", "while caching latents")."""
    where = "GPU" if device.type == "cuda" else device.type.upper()
    return (
        f"Out of {where} memory {during} (batch size {config.batch_size}, {config.resolution} px, "
        f"gradient checkpointing {'on' if checkpointing else 'off'}). Lower the batch size or the "
        "resolution, use a lower rank, keep the text encoder frozen, or close other programs that use "
        f"the {where}. Epoch files saved so far are kept."
    )
