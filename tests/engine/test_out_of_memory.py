"""Running out of memory is one thing on every device: Apple MPS's plain RuntimeError gets the handling of
CUDA's OutOfMemoryError at each place the loop catches it, and any other RuntimeError is not taken for it."""

from __future__ import annotations

import pytest
import torch
import torch.optim

from lib_lora_trainer.training import loop as loop_module
from lib_lora_trainer.training.loop import TrainingCallbacks, TrainingOutOfMemory, train
from lib_lora_trainer.training.memory import CatchOutOfMemory, is_out_of_memory
from lib_lora_trainer.training.state import load_state
from tests.engine.helpers import host_fingerprint, tiny_config, tiny_host
from tests.engine.test_training import small_source

MPS_MESSAGE = (  # as torch's MPS allocator words it
    "MPS backend out of memory (MPS allocated: 17.50 GiB, other allocations: 1.20 GiB, max allowed: "
    "18.13 GiB). Tried to allocate 512.00 MiB on private pool. Use PYTORCH_MPS_HIGH_WATERMARK_RATIO=0.0 "
    "to disable upper limit for memory allocations (may cause system failure)."
)
OUT_OF_MEMORY = {
    "cuda": lambda: torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "mps": lambda: RuntimeError(MPS_MESSAGE),
}
UNRELATED = "mat1 and mat2 shapes cannot be multiplied (2x4 and 8x8)"


def test_out_of_memory_is_told_by_type_or_by_the_mps_message_only():
    assert is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory"))
    if hasattr(torch, "OutOfMemoryError"):  # torch 2.5+: every device's
        assert is_out_of_memory(torch.OutOfMemoryError("XPU out of memory"))
    assert is_out_of_memory(RuntimeError(MPS_MESSAGE))
    assert not is_out_of_memory(RuntimeError(UNRELATED))
    assert not is_out_of_memory(RuntimeError("the MPS backend out of memory check failed"))  # not its start
    assert not is_out_of_memory(ValueError(MPS_MESSAGE))
    assert not is_out_of_memory(MemoryError())  # the host's RAM, not the device: not the loop's remedy


def test_the_catch_swallows_only_out_of_memory():
    with CatchOutOfMemory() as memory:
        raise RuntimeError(MPS_MESSAGE)
    assert memory.ran_out
    with CatchOutOfMemory() as memory:
        pass
    assert not memory.ran_out
    with pytest.raises(RuntimeError, match="mat1"), CatchOutOfMemory():
        raise RuntimeError(UNRELATED)


class Failing:
    """The tiny host, with one of its calls raising ``error()`` where ``when`` says."""

    def __init__(self, host, method, error, when=lambda *args: True):
        self._host, self._method, self._error, self._when = host, method, error, when

    def __getattr__(self, name):
        value = getattr(self._host, name)
        if name != self._method:
            return value

        def failing(*args):
            if self._when(*args):
                raise self._error()
            return value(*args)

        return failing


def _real_step(noisy, timesteps, cond):  # the probe's latents are zeros, a step's are not
    return torch.is_grad_enabled() and bool(noisy.abs().sum())


class Notices(TrainingCallbacks):
    def __init__(self):
        self.notices, self.plan = [], None

    def on_notice(self, message):
        self.notices.append(message)

    def on_start(self, plan):
        self.plan = plan


# --- the same handling at each place ----------------------------------------------------------


@pytest.mark.parametrize("device", list(OUT_OF_MEMORY))
def test_while_caching_latents(tmp_path, device):
    host = Failing(tiny_host(), "encode_images", OUT_OF_MEMORY[device])
    with pytest.raises(TrainingOutOfMemory, match="while caching latents.*Lower the batch size"):
        train(host, tiny_config(tmp_path, epochs=1), small_source())


@pytest.mark.parametrize("device", list(OUT_OF_MEMORY))
def test_while_caching_captions(tmp_path, device):
    host = Failing(tiny_host(), "encode_text", OUT_OF_MEMORY[device])
    config = tiny_config(tmp_path, epochs=1, train_text_encoder=False)
    with pytest.raises(TrainingOutOfMemory, match="while encoding the captions.*Lower the batch size"):
        train(host, config, small_source())


@pytest.mark.parametrize("device", list(OUT_OF_MEMORY))
def test_in_the_memory_probe_checkpointing_goes_on(tmp_path, monkeypatch, device):
    monkeypatch.setattr(loop_module, "available_bytes", lambda device: 1024**4)
    probe = lambda noisy, timesteps, cond: not bool(noisy.abs().sum())  # noqa: E731
    host, notices = Failing(tiny_host(), "predict", OUT_OF_MEMORY[device], probe), Notices()
    result = train(host, tiny_config(tmp_path, epochs=1), small_source(), notices)
    assert result.status == "completed"
    assert notices.plan.gradient_checkpointing.reason.startswith("auto: on (the memory probe")


@pytest.mark.parametrize("device", list(OUT_OF_MEMORY))
def test_in_a_step_auto_switches_checkpointing_on_and_does_it_again(tmp_path, monkeypatch, device):
    monkeypatch.setattr(loop_module, "available_bytes", lambda device: 1024**4)  # the probe says it fits
    failures = []

    def first_real_step(*args):
        if _real_step(*args) and not failures:
            failures.append(1)
            return True
        return False

    host, notices = Failing(tiny_host(), "predict", OUT_OF_MEMORY[device], first_real_step), Notices()
    result = train(host, tiny_config(tmp_path, epochs=1), small_source(), notices)
    assert result.status == "completed" and failures == [1]
    assert len(notices.notices) == 1 and "switched it on" in notices.notices[0]


@pytest.mark.parametrize("device", list(OUT_OF_MEMORY))
def test_in_a_step_of_epoch_2_the_epoch_file_and_the_last_step_are_kept(tmp_path, device):
    calls = []

    def third_step(*args):  # 4 images, batch 2: steps 1-2 are epoch 1
        calls.append(1)
        return len(calls) == 3

    inner = tiny_host()
    before = host_fingerprint(inner)
    host = Failing(inner, "predict", OUT_OF_MEMORY[device], third_step)
    config = tiny_config(tmp_path, epochs=2, gradient_checkpointing="on")
    with pytest.raises(TrainingOutOfMemory, match="at step 3.*Epoch files saved so far are kept.*step 2"):
        train(host, config, small_source())
    assert (tmp_path / "Lora" / "alice-000001.safetensors").is_file()
    assert load_state(tmp_path / "Lora" / ".lora_trainer_state" / "alice").run.step == 2
    assert host_fingerprint(inner) == before


@pytest.mark.parametrize("device", list(OUT_OF_MEMORY))
def test_in_the_optimizer_step(tmp_path, monkeypatch, device):
    def step(self, closure=None):
        raise OUT_OF_MEMORY[device]()

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(loop_module, "precheck_optimizer", lambda config, **kwargs: None)  # its dummy step
    with pytest.raises(TrainingOutOfMemory, match="in the optimizer step of step 1.*Lower the batch size"):
        train(tiny_host(), tiny_config(tmp_path, epochs=1), small_source())


# --- anything else is an error, not advice -------------------------------------------------------


def _unrelated():
    return RuntimeError(UNRELATED)


@pytest.mark.parametrize(
    ("method", "when", "overrides"),
    [
        ("encode_images", lambda *args: True, {}),
        ("encode_text", lambda *args: True, {"train_text_encoder": False}),
        ("predict", lambda noisy, timesteps, cond: not bool(noisy.abs().sum()), {}),  # the probe
        ("predict", _real_step, {"gradient_checkpointing": "off"}),
    ],
)
def test_an_unrelated_runtime_error_is_not_taken_for_out_of_memory(
    tmp_path, monkeypatch, method, when, overrides
):
    monkeypatch.setattr(loop_module, "available_bytes", lambda device: 1024**4)  # the probe runs
    host = Failing(tiny_host(), method, _unrelated, when)
    with pytest.raises(RuntimeError, match="mat1 and mat2") as raised:
        train(host, tiny_config(tmp_path, epochs=1, **overrides), small_source())
    assert not isinstance(raised.value, TrainingOutOfMemory)


def test_an_unrelated_runtime_error_in_the_optimizer_step_is_not_taken_for_out_of_memory(
    tmp_path, monkeypatch
):
    def step(self, closure=None):
        raise _unrelated()

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(loop_module, "precheck_optimizer", lambda config, **kwargs: None)
    with pytest.raises(RuntimeError, match="mat1 and mat2") as raised:
        train(tiny_host(), tiny_config(tmp_path, epochs=1), small_source())
    assert not isinstance(raised.value, TrainingOutOfMemory)
