"""kohya/LyCORIS network files: the tensors written and read, checked part by part.

A file holds, for every adapted module (key stem from :mod:`.kohya_names`), the parts of its kind
(:mod:`.kinds`): ``<stem>.lora_down.weight`` ``[r, in]`` or ``[r, in, kh, kw]``, ``<stem>.lora_up.weight``
``[out, r]`` or ``[out, r, 1, 1]`` and a 0-dim ``<stem>.alpha`` for LoRA/LoCon (the module adds
``up @ down * alpha / r`` to the layer's weight), ``dora_scale`` for DoRA, ``hada_*`` for LoHa, ``lokr_*``
for LoKr. All tensors share the save precision, as in sd-scripts.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import safetensors
import safetensors.torch
import torch

from lib_lora_trainer.files import atomic_write_bytes
from lib_lora_trainer.network.hashing import safetensors_hashes
from lib_lora_trainer.network.kinds import KINDS, kind_of_parts
from lib_lora_trainer.network.kohya_names import kohya_name, module_name_from_kohya

logger = logging.getLogger(__name__)

Precision = Literal["fp16", "bf16", "fp32"]
SAVE_DTYPES: dict[str, torch.dtype] = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

DOWN_SUFFIX = "lora_down.weight"
UP_SUFFIX = "lora_up.weight"
ALPHA_SUFFIX = "alpha"
# peft-style names that kohya-format readers (A1111 included) also accept.
_SUFFIX_ALIASES = {"lora_A.weight": DOWN_SUFFIX, "lora_B.weight": UP_SUFFIX}
# Parts of other network types A1111 knows, so such a file gets a message that names its type.
_OTHER_NETWORK_PARTS = (
    (("hada_",), "LoHa"),
    (("lokr_",), "LoKr"),
    (("oft_",), "OFT"),
    (("lora_mid.",), "LoCon with a Tucker (lora_mid) layer"),
    (("dora_scale",), "DoRA"),
    (("diff",), "full weight difference"),
    (("w_norm", "b_norm"), "norm"),
    (("a1.", "a2.", "b1.", "b2."), "GLoRA"),
    (("weight", "on_input"), "IA3"),
)


_Function = TypeVar("_Function", bound=Callable[..., Any])


def _log_refusals(function: _Function) -> _Function:
    """Log every refusal (bad file, bad input, existing file) before the caller sees the exception."""

    @functools.wraps(function)
    def logged(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (ValueError, TypeError, OSError) as error:
            logger.warning("%s: %s", function.__name__, error)
            raise

    return logged  # type: ignore[return-value]


@dataclass
class LoraModuleWeights:
    """One adapted module in kohya orientation: the layer gains ``up @ down * alpha / rank``."""

    down: torch.Tensor  # [r, in] (Linear) or [r, in, kh, kw] (Conv2d)
    up: torch.Tensor  # [out, r] or [out, r, 1, 1]
    alpha: float

    def parts(self) -> dict[str, torch.Tensor]:
        """The module as file parts (the form every network kind uses)."""
        return {DOWN_SUFFIX: self.down, UP_SUFFIX: self.up, ALPHA_SUFFIX: torch.tensor(float(self.alpha))}

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank



# --------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------


class NonFiniteWeights(ValueError):
    """A LoRA file would hold NaN or infinite values (after the cast to its save precision)."""


@_log_refusals
def save_kohya_lora(
    path: str | Path,
    modules: Mapping[str, LoraModuleWeights | Mapping[str, torch.Tensor]],
    metadata: Mapping[str, str],
    precision: Precision,
    *,
    overwrite: bool = False,
) -> Path:
    """Write ``modules`` (keyed by kohya stem) as a kohya LoRA file, atomically; returns the path.

    Every tensor, alpha included, is cast to ``precision``. ``sshs_model_hash``/``sshs_legacy_hash`` are
    added to ``metadata``. An existing file is refused with FileExistsError unless ``overwrite``.
    """
    target = Path(path)
    if target.suffix != ".safetensors":
        raise ValueError(f"a LoRA file name must end in .safetensors, got {target.name!r}")
    if precision not in SAVE_DTYPES:
        raise ValueError(f"save precision must be one of {', '.join(SAVE_DTYPES)}, got {precision!r}")
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} already exists; choose another output name or allow overwriting it")
    tensors = kohya_state_dict(modules, SAVE_DTYPES[precision])
    bad = [key for key, tensor in tensors.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        raise NonFiniteWeights(
            f"{target.name} was not saved: {len(bad)} tensors hold NaN or infinite values in {precision} "
            f"(first: {bad[0]})"
        )
    header = _checked_metadata(metadata)
    model_hash, legacy_hash = safetensors_hashes(tensors, header)
    header["sshs_model_hash"] = model_hash
    header["sshs_legacy_hash"] = legacy_hash
    atomic_write_bytes(target, safetensors.torch.save(tensors, metadata=header))
    logger.info("Saved %d LoRA modules to %s (%s)", len(modules), target, precision)
    return target


def kohya_state_dict(
    modules: Mapping[str, LoraModuleWeights | Mapping[str, torch.Tensor]], dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """The file's tensors, every part of every module in ``dtype`` on the CPU (alpha 0-dim).

    A module is a :class:`LoraModuleWeights` or the file parts of any kind (``{"hada_w1_a": ...}``).
    """
    if not modules:
        raise ValueError("there are no LoRA modules to save")
    tensors: dict[str, torch.Tensor] = {}
    for stem, module in modules.items():
        _check_stem(stem)
        if isinstance(module, LoraModuleWeights):
            _check_module_shapes(stem, module)
            module = module.parts()
        else:
            kind_of_parts(stem, module)
        for part, tensor in module.items():
            if part == ALPHA_SUFFIX:
                tensors[f"{stem}.{part}"] = torch.tensor(float(tensor), dtype=dtype)
            else:
                tensors[f"{stem}.{part}"] = _to_file_tensor(tensor, dtype)
    return tensors


def _to_file_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.detach().to(device="cpu", dtype=dtype).contiguous()


def _check_stem(stem: str) -> None:
    component, module_name = module_name_from_kohya(stem)
    if kohya_name(component, module_name) != stem:
        expected = kohya_name(component, module_name)
        raise ValueError(f"{stem!r} is not in kohya's naming; save it as {expected!r}")


def _checked_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    bad = [key for key, value in metadata.items() if not isinstance(key, str) or not isinstance(value, str)]
    if bad:
        raise TypeError(f"metadata values must be text; these are not: {', '.join(map(str, bad))}")
    return dict(metadata)



# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------


@_log_refusals
def load_kohya_lora(
    path: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, LoraModuleWeights], dict[str, str]]:
    """Read a kohya LoRA/LoCon file: ``({stem: weights}, metadata)``, tensors as ``dtype`` on the CPU.

    Stems are returned as written in the file (map them with ``module_name_from_kohya``). peft-style
    ``lora_A``/``lora_B`` names are accepted; a missing alpha means alpha = rank (scale 1.0, as A1111
    uses). Anything that is not a LoRA gets a ValueError that says what is wrong.
    """
    source = _safetensors_path(path)
    try:
        with safetensors.safe_open(str(source), framework="pt", device="cpu") as reader:
            metadata = dict(reader.metadata() or {})
            keys = reader.keys()
            parts = _group_by_stem(source.name, {key: reader.get_tensor(key) for key in keys})
    except safetensors.SafetensorError as error:
        raise ValueError(f"{source.name} is not a readable safetensors file ({error})") from error
    modules = {stem: _module_from_parts(source.name, stem, tensors, dtype) for stem, tensors in parts.items()}
    logger.info("Loaded %d LoRA modules from %s", len(modules), source)
    return modules, metadata


def _group_by_stem(file_name: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown: list[str] = []
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        if stem == "bundle_emb":
            logger.warning("%s: skipping the embedding bundled in the LoRA file (%s)", file_name, key)
            continue
        part = _SUFFIX_ALIASES.get(part, part)
        if part in (DOWN_SUFFIX, UP_SUFFIX, ALPHA_SUFFIX):
            groups.setdefault(stem, {})[part] = tensor
            continue
        other = _other_network_type(stem, part)
        if other:
            raise ValueError(f"{file_name} is a {other} network ({key}); only LoRA/LoCon files can be loaded")
        unknown.append(key)
    if unknown:
        raise ValueError(
            f"{file_name} is not a kohya-format LoRA: keys like {', '.join(unknown[:3])} are not "
            "'<name>.lora_down.weight', '<name>.lora_up.weight' or '<name>.alpha' (a checkpoint, an "
            "embedding or a diffusers-format LoRA?)"
        )
    if not any(DOWN_SUFFIX in parts for parts in groups.values()):
        raise ValueError(f"{file_name} holds no LoRA weights (no '<name>.lora_down.weight' keys)")
    return groups


def _other_network_type(stem: str, part: str) -> str | None:
    if not stem.startswith(("lora_", "oft_")):
        return None
    return next((kind for prefixes, kind in _OTHER_NETWORK_PARTS if part.startswith(prefixes)), None)


def _module_from_parts(
    file_name: str, stem: str, parts: Mapping[str, torch.Tensor], dtype: torch.dtype
) -> LoraModuleWeights:
    missing = [part for part in (DOWN_SUFFIX, UP_SUFFIX) if part not in parts]
    if missing:
        raise ValueError(
            f"{file_name}: module {stem!r} has no {' or '.join(missing)}; the file is incomplete"
        )
    down = parts[DOWN_SUFFIX].to(dtype)
    up = parts[UP_SUFFIX].to(dtype)
    rank = int(down.shape[0]) if down.ndim else 0
    if ALPHA_SUFFIX in parts:
        alpha_tensor = parts[ALPHA_SUFFIX]
        if alpha_tensor.numel() != 1:
            raise ValueError(f"{file_name}: alpha of {stem!r} must be a single number")
        alpha = float(alpha_tensor.float().item())
    else:
        logger.info("%s: %s has no alpha; using alpha = rank (scale 1.0, as A1111 does)", file_name, stem)
        alpha = float(rank)
    module = LoraModuleWeights(down=down, up=up, alpha=alpha)
    _check_module_shapes(f"{file_name}: {stem!r}", module)
    return module


def _check_module_shapes(label: str, module: LoraModuleWeights) -> None:
    down, up = module.down, module.up
    if down.ndim not in (2, 4) or up.ndim != down.ndim:
        raise ValueError(
            f"{label}: lora_down {tuple(down.shape)} and lora_up {tuple(up.shape)} must both be 2-D "
            "(Linear) or both 4-D (Conv2d)"
        )
    if up.shape[1] != down.shape[0] or down.shape[0] == 0:
        raise ValueError(
            f"{label}: rank mismatch, lora_down {tuple(down.shape)} has {down.shape[0]} rows but lora_up "
            f"{tuple(up.shape)} has {up.shape[1]} columns"
        )
    if up.ndim == 4 and tuple(up.shape[2:]) != (1, 1):
        raise ValueError(f"{label}: lora_up of a conv must be 1x1, got {tuple(up.shape)}")
    if not math.isfinite(module.alpha):
        raise ValueError(f"{label}: alpha must be a finite number, got {module.alpha}")



# --------------------------------------------------------------------------------------------
# any network kind
# --------------------------------------------------------------------------------------------

# Parts any A1111 module type reads besides its own factors.
_COMMON_PARTS = (ALPHA_SUFFIX, "dora_scale")


@_log_refusals
def load_network_file(
    path: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """Read a LoRA, LoCon, DoRA, LoHa or LoKr file: ``({stem: {part: tensor}}, metadata)``.

    Each module's parts must make one of the kinds A1111 loads (:mod:`.kinds`); peft-style
    ``lora_A``/``lora_B`` names are renamed to kohya's. Anything else gets a ValueError that says what.
    """
    source = _readable_safetensors(path)
    with safetensors.safe_open(str(source), framework="pt", device="cpu") as reader:
        metadata = dict(reader.metadata() or {})
        keys = reader.keys()
        tensors = {key: reader.get_tensor(key) for key in keys}
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        if stem == "bundle_emb":
            logger.warning("%s: skipping the embedding bundled in the network file (%s)", source.name, key)
            continue
        modules.setdefault(stem, {})[_SUFFIX_ALIASES.get(part, part)] = tensor.to(dtype)
    if not modules:
        raise ValueError(f"{source.name} holds no network weights")
    known = set(_COMMON_PARTS).union(*(kind.file_parts for kind in KINDS.values()))
    for stem, parts in modules.items():
        unknown = sorted(set(parts) - known)
        if unknown:
            raise ValueError(
                f"{source.name}: {stem} has parts {', '.join(unknown)} that no LoRA, LoCon, LoHa or LoKr "
                "module has (OFT, GLoRA, IA3 or a full-weight file cannot be continued)"
            )
        kind_of_parts(f"{source.name}: {stem}", parts)
    logger.info("Loaded %d network modules from %s", len(modules), source)
    return modules, metadata


def _safetensors_path(path: str | Path) -> Path:
    """``path`` when it names an existing .safetensors file (the only kind that cannot run code)."""
    source = Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"LoRA file {source} does not exist")
    if source.suffix.lower() != ".safetensors":
        raise ValueError(
            f"{source.name}: only .safetensors LoRA files can be loaded "
            "(.pt/.ckpt files can run code when they are read)"
        )
    return source


def _readable_safetensors(path: str | Path) -> Path:
    source = _safetensors_path(path)
    try:
        with safetensors.safe_open(str(source), framework="pt", device="cpu"):
            pass
    except safetensors.SafetensorError as error:
        raise ValueError(f"{source.name} is not a readable safetensors file ({error})") from error
    return source
