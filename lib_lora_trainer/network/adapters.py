"""Adapters (LoRA, LoCon, DoRA, LoHa, LoKr) on the live UNet and text encoder, made by peft and always
taken off again.

The target set is kohya's: in the UNet every Linear and 1x1 conv of the transformer blocks
(``to_q/k/v``, ``to_out.0``, ``proj_in``, ``proj_out``, ``ff.net.0.proj``, ``ff.net.2``), in the text
encoder every attention and MLP projection; LoCon (and LoHa/LoKr with ``conv`` on) adds the ResBlock
convolutions (3x3 included), ``emb_layers.1`` (diffusers' ``time_emb_proj``), conv skip connections and
the down/up-samplers. 3x3 convolutions take the conv rank/alpha, everything else the network rank/alpha;
per-block ranks (``block_dims``) and blocks left out by their LR weight follow kohya (:mod:`.blocks`).

peft replaces each target with a wrapper around the original module. Attaching is all or nothing: the
original modules and their ``requires_grad`` flags are noted first, and any failure half-way (in peft or
after it) puts them all back before the error goes on; :meth:`AttachedAdapters.detach` does the same at
the end, so the WebUI sees its module tree unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from lib_lora_trainer.network.blocks import block_index
from lib_lora_trainer.network.dropout import DropoutSettings, install_dropout
from lib_lora_trainer.network.kinds import KindSettings, ModuleTensors, kind_for, kind_of_parts
from lib_lora_trainer.network.kinds.base import ALPHA_PART, AdapterKind, PeftTarget
from lib_lora_trainer.network.kinds.lora import DORA_PART, DOWN_PART, UP_PART, check_dora_scale

UNET_ATTENTION_SUFFIXES = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
)
TEXT_ENCODER_SUFFIXES = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
RESBLOCK_LOCON_CHILDREN = ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection")
COMPONENTS = ("unet", "text_encoder")


@dataclass(frozen=True)
class AdapterTarget:
    component: str  # "unet" or "text_encoder"
    module_name: str  # relative to the component (ldm / transformers names)
    rank: int
    alpha: float


@dataclass(frozen=True)
class AdapterSpec:
    network_dim: int
    network_alpha: float
    locon: bool = False  # also the convolutions (LoCon's layer set)
    conv_dim: int = 8
    conv_alpha: float = 4.0
    train_text_encoder: bool = True
    # kohya's per-block ranks: 25 values each (IN00-IN11, MID, OUT00-OUT11), None = the network's
    block_dims: tuple[float, ...] | None = None
    block_alphas: tuple[float, ...] | None = None
    conv_block_dims: tuple[float, ...] | None = None
    conv_block_alphas: tuple[float, ...] | None = None
    skipped_blocks: frozenset[int] = field(default_factory=frozenset)  # LR weight at or below the threshold


def _is_3x3_or_larger_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d) and tuple(module.kernel_size) != (1, 1)


def unet_target_names(unet: nn.Module, locon: bool) -> list[str]:
    """Names (relative to the UNet) of the modules kohya's LoRA, or LoCon, adapts."""
    from ldm.modules.attention import SpatialTransformer
    from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, Upsample

    names: list[str] = []
    for name, module in unet.named_modules():
        if isinstance(module, SpatialTransformer):
            for child_name, child in module.named_modules():
                wanted = child_name in ("proj_in", "proj_out") or child_name.endswith(UNET_ATTENTION_SUFFIXES)
                if wanted and isinstance(child, (nn.Linear, nn.Conv2d)):
                    names.append(f"{name}.{child_name}")
        elif locon and isinstance(module, ResBlock):
            for child_name in RESBLOCK_LOCON_CHILDREN:
                child = module.get_submodule(child_name)
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    names.append(f"{name}.{child_name}")
        elif locon and isinstance(module, Downsample) and isinstance(module.op, nn.Conv2d):
            names.append(f"{name}.op")
        elif locon and isinstance(module, Upsample) and getattr(module, "use_conv", False):
            names.append(f"{name}.conv")
    return names


def text_encoder_target_names(text_encoder: nn.Module) -> list[str]:
    return [
        name
        for name, module in text_encoder.named_modules()
        if isinstance(module, nn.Linear)
        and ".encoder.layers." in name
        and name.endswith(TEXT_ENCODER_SUFFIXES)
    ]


def _unet_rank_and_alpha(spec: AdapterSpec, block: int, conv: bool) -> tuple[int, float]:
    dims, alphas = (
        (spec.conv_block_dims, spec.conv_block_alphas) if conv else (spec.block_dims, spec.block_alphas)
    )
    rank, alpha = (spec.conv_dim, spec.conv_alpha) if conv else (spec.network_dim, spec.network_alpha)
    if block >= 0 and dims is not None:
        rank = int(dims[block])
    if block >= 0 and alphas is not None:
        alpha = float(alphas[block])
    return rank, alpha


def plan_targets(unet: nn.Module, text_encoder: nn.Module, spec: AdapterSpec) -> list[AdapterTarget]:
    """Every module to adapt, with the rank and alpha it gets (rank 0 or a skipped block: left out)."""
    targets = []
    for name in unet_target_names(unet, spec.locon):
        block = block_index("unet", name)
        if block in spec.skipped_blocks:
            continue
        conv = _is_3x3_or_larger_conv(unet.get_submodule(name))
        rank, alpha = _unet_rank_and_alpha(spec, block, conv)
        if rank > 0:
            targets.append(AdapterTarget("unet", name, rank, alpha))
    if spec.train_text_encoder:
        for name in text_encoder_target_names(text_encoder):
            targets.append(AdapterTarget("text_encoder", name, spec.network_dim, spec.network_alpha))
    return targets


class AttachedAdapters:
    """Adapters attached to a UNet and text encoder; use :func:`attached_adapters` to be sure they go."""

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        targets: list[AdapterTarget],
        settings: KindSettings | None = None,
        dropout: DropoutSettings | None = None,
    ):
        if not targets:
            raise ValueError("no module to adapt was found in the model")
        self.targets = list(targets)
        self.settings = settings or KindSettings()
        self.kind: AdapterKind = kind_for(self.settings.algo)
        # peft needs one root; a throw-away container makes the names "unet.<ldm name>" etc.
        self._root = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
        # What detach() (or a failure half-way) puts back: each target's original module, every flag.
        self._originals = [
            (self._full_name(t), self._root.get_submodule(self._full_name(t))) for t in targets
        ]
        self._base_flags = [(p, p.requires_grad) for p in self._root.parameters()]
        self._hooks: list = []
        self._attached = True
        try:
            peft_targets = [PeftTarget(self._full_name(t), t.rank, t.alpha) for t in targets]
            self._model = self.kind.peft_model(self._root, peft_targets, self.settings)
            for target in self.targets:
                layer = self._layer(target)
                self.kind.prepare_layer(layer, self.settings)
                self._hooks += install_dropout(layer, self.kind.algo, dropout or DropoutSettings())
            self._check_ranks()
        except BaseException:
            self.detach()
            raise

    @staticmethod
    def _full_name(target: AdapterTarget) -> str:
        return f"{target.component}.{target.module_name}"

    def _layer(self, target: AdapterTarget) -> nn.Module:
        return self._root.get_submodule(self._full_name(target))

    def layers(self) -> Iterator[tuple[AdapterTarget, nn.Module]]:
        """Each target with its peft layer."""
        for target in self.targets:
            yield target, self._layer(target)

    def _check_ranks(self) -> None:
        for target, layer in self.layers():
            if self.kind.rank_and_alpha(layer) != (target.rank, float(target.alpha)):
                raise RuntimeError(f"peft gave {target.module_name} the wrong rank or alpha")

    def parameters(self, component: str) -> list[nn.Parameter]:
        """The trainable adapter parameters of one component, in a stable order."""
        return [p for target, _, p in self.named_parameters() if target.component == component]

    def named_parameters(self) -> Iterator[tuple[AdapterTarget, str, nn.Parameter]]:
        """``(target, file part, parameter)`` for every trainable parameter, in a stable order."""
        for target, layer in self.layers():
            for part, parameter in self.kind.parameters(layer).items():
                yield target, part, parameter

    def train(self, mode: bool = True) -> None:
        """Training mode of the adapters only (dropout acts in training mode with autograd on)."""
        for _, layer in self.layers():
            for module in layer.modules():
                if module is not layer.get_base_layer():
                    module.training = mode

    def export(self) -> dict[tuple[str, str], ModuleTensors]:
        """Every adapter's file parts (float32, detached, on the CPU), keyed by ``(component, module)``."""
        return {(t.component, t.module_name): self.kind.export(layer) for t, layer in self.layers()}

    def load(self, weights: Mapping[tuple[str, str], ModuleTensors]) -> None:
        """Set adapter values from saved weights (e.g. to continue from a file); shapes must match."""
        layers = {(t.component, t.module_name): layer for t, layer in self.layers()}
        for key, tensors in weights.items():
            layer = layers.get(key)
            if layer is None:
                raise ValueError(
                    f"the saved network has a module the current settings do not train: {key[1]}"
                )
            self.kind.load(layer, key[1], _as_parts(tensors))

    def detach(self) -> None:
        """Put every original module back where peft's wrapper was, and every flag as it was."""
        if not self._attached:
            return
        self._attached = False
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for full_name, original in self._originals:
            parent_name, _, child_name = full_name.rpartition(".")
            parent = self._root.get_submodule(parent_name)
            if getattr(parent, child_name) is not original:
                setattr(parent, child_name, original)
        for parameter, flag in self._base_flags:
            parameter.requires_grad_(flag)


def _as_parts(tensors) -> ModuleTensors:
    """Accept the older LoRA record (``down``/``up``/``alpha``) as well as file parts."""
    if hasattr(tensors, "down") and hasattr(tensors, "up"):
        return {DOWN_PART: tensors.down, UP_PART: tensors.up, ALPHA_PART: torch.tensor(float(tensors.alpha))}
    return dict(tensors)


@contextlib.contextmanager
def attached_adapters(
    unet: nn.Module,
    text_encoder: nn.Module,
    targets: list[AdapterTarget],
    settings: KindSettings | None = None,
    dropout: DropoutSettings | None = None,
):
    adapters = AttachedAdapters(unet, text_encoder, targets, settings, dropout)
    try:
        yield adapters
    finally:
        adapters.detach()


def targets_from_weights(weights: Mapping[tuple[str, str], ModuleTensors]) -> list[AdapterTarget]:
    """The adapter layout a saved file implies (its own ranks and alphas)."""
    targets = []
    for (component, name), tensors in weights.items():
        parts = _as_parts(tensors)
        kind = kind_of_parts(name, parts)
        rank = kind.saved_rank(parts)
        alpha = float(parts[ALPHA_PART].float().item()) if ALPHA_PART in parts else float(rank)
        targets.append(AdapterTarget(component, name, rank, alpha))
    return targets


def settings_from_weights(
    weights: Mapping[tuple[str, str], ModuleTensors], network_args: Mapping[str, str] | None = None
) -> KindSettings:
    """The kind settings a saved file implies (one kind for all modules, as this trainer writes)."""
    found = set()
    for (_, name), tensors in weights.items():
        parts = _as_parts(tensors)
        kind = kind_of_parts(name, parts)
        if DORA_PART in parts:
            check_dora_scale(name, parts[DORA_PART], parts[DOWN_PART])
        found.add(kind.saved_settings(parts, network_args or {}))
    if not found:
        raise ValueError("the saved network holds no modules")
    by_algo = {s.algo for s in found}
    if len(by_algo) > 1:
        raise ValueError(
            f"the saved network mixes module types ({', '.join(sorted(by_algo))}); it cannot be continued"
        )
    if len({s.dora_wd for s in found}) > 1:
        raise ValueError("the saved network has DoRA on some modules only; it cannot be continued")
    # Tucker shows only on 3x3 convolutions: any such module decides for all.
    algo = by_algo.pop()
    tucker = any(s.use_tucker for s in found)
    template = next(iter(found))
    return KindSettings(
        algo=algo,
        dora_wd=template.dora_wd,
        use_tucker=tucker,
        lokr_factor=template.lokr_factor,
        lokr_decompose_both=any(s.lokr_decompose_both for s in found),
    )
