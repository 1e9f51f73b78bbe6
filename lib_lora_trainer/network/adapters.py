"""LoRA / LoCon adapters on the live UNet and text encoder, made by peft and always taken off again.

The target set is kohya's: in the UNet every Linear and 1x1 conv of the transformer blocks
(``to_q/k/v``, ``to_out.0``, ``proj_in``, ``proj_out``, ``ff.net.0.proj``, ``ff.net.2``), in the text
encoder every attention and MLP projection; LoCon adds the ResBlock convolutions (3x3 included),
``emb_layers.1`` (diffusers' ``time_emb_proj``), conv skip connections and the down/up-samplers.
3x3 convolutions take the conv rank/alpha, everything else the network rank/alpha.

peft replaces each target with a wrapper around the original module. :meth:`AttachedAdapters.detach`
puts the original modules back (peft's own ``unload``), so the WebUI sees its module tree unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from lib_lora_trainer.network.kohya_format import LoraModuleWeights

ADAPTER_NAME = "default"
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
    locon: bool = False
    conv_dim: int = 8
    conv_alpha: float = 4.0
    train_text_encoder: bool = True


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


def plan_targets(unet: nn.Module, text_encoder: nn.Module, spec: AdapterSpec) -> list[AdapterTarget]:
    """Every module to adapt, with the rank and alpha it gets."""
    targets = []
    for name in unet_target_names(unet, spec.locon):
        conv = _is_3x3_or_larger_conv(unet.get_submodule(name))
        rank, alpha = (spec.conv_dim, spec.conv_alpha) if conv else (spec.network_dim, spec.network_alpha)
        targets.append(AdapterTarget("unet", name, rank, alpha))
    if spec.train_text_encoder:
        for name in text_encoder_target_names(text_encoder):
            targets.append(AdapterTarget("text_encoder", name, spec.network_dim, spec.network_alpha))
    return targets


class AttachedAdapters:
    """Adapters attached to a UNet and text encoder; use :func:`attached_adapters` to be sure they go."""

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, targets: list[AdapterTarget]):
        from peft import LoraConfig
        from peft.tuners.lora import LoraModel

        if not targets:
            raise ValueError("no module to adapt was found in the model")
        self.targets = list(targets)
        # peft needs one root; a throw-away container makes the names "unet.<ldm name>" etc.
        self._root = nn.ModuleDict({"unet": unet, "text_encoder": text_encoder})
        most_common = max(
            set((t.rank, t.alpha) for t in targets), key=[(t.rank, t.alpha) for t in targets].count
        )
        config = LoraConfig(
            r=most_common[0],
            lora_alpha=most_common[1],
            target_modules=[self._full_name(t) for t in targets],
            rank_pattern={self._full_name(t): t.rank for t in targets if t.rank != most_common[0]},
            alpha_pattern={self._full_name(t): t.alpha for t in targets if t.alpha != most_common[1]},
            lora_dropout=0.0,
            bias="none",
            init_lora_weights=True,  # kohya's init: down kaiming-uniform, up zeros
        )
        # peft marks every base parameter frozen; remember the flags so detach() leaves no trace.
        self._base_flags = [(p, p.requires_grad) for p in self._root.parameters()]
        self._model = LoraModel(self._root, config, ADAPTER_NAME)
        self._attached = True
        try:
            for layer in self._layers():
                # peft follows the base layer's dtype (fp16 in A1111); train and keep adapters in fp32.
                for part in (layer.lora_A[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]):
                    part.float()
                    part.requires_grad_(True)
            self._check_ranks()
        except BaseException:
            self.detach()
            raise

    @staticmethod
    def _full_name(target: AdapterTarget) -> str:
        return f"{target.component}.{target.module_name}"

    def _layer(self, target: AdapterTarget) -> nn.Module:
        return self._root.get_submodule(self._full_name(target))

    def _layers(self) -> Iterator[nn.Module]:
        for target in self.targets:
            yield self._layer(target)

    def _check_ranks(self) -> None:
        for target in self.targets:
            layer = self._layer(target)
            if layer.r[ADAPTER_NAME] != target.rank or layer.lora_alpha[ADAPTER_NAME] != target.alpha:
                raise RuntimeError(f"peft gave {target.module_name} the wrong rank or alpha")

    def parameters(self, component: str) -> list[nn.Parameter]:
        """The trainable adapter parameters of one component, in a stable order."""
        params = []
        for target in self.targets:
            if target.component == component:
                layer = self._layer(target)
                params += [layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight]
        return params

    def export(self) -> dict[tuple[str, str], LoraModuleWeights]:
        """Every adapter as kohya-oriented tensors (down = peft's A, up = peft's B), detached on the CPU."""
        weights = {}
        for target in self.targets:
            layer = self._layer(target)
            weights[(target.component, target.module_name)] = LoraModuleWeights(
                down=layer.lora_A[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                up=layer.lora_B[ADAPTER_NAME].weight.detach().float().cpu().clone(),
                alpha=float(target.alpha),
            )
        return weights

    @torch.no_grad()
    def load(self, weights: dict[tuple[str, str], LoraModuleWeights]) -> None:
        """Set adapter values from saved weights (e.g. to continue from a file); shapes must match."""
        by_key = {(t.component, t.module_name): t for t in self.targets}
        for key, module in weights.items():
            target = by_key.get(key)
            if target is None:
                raise ValueError(f"the saved LoRA has a module the current settings do not train: {key[1]}")
            layer = self._layer(target)
            down, up = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            if tuple(module.down.shape) != tuple(down.shape) or tuple(module.up.shape) != tuple(up.shape):
                raise ValueError(
                    f"the saved LoRA's {key[1]} has shapes {tuple(module.down.shape)} / "
                    f"{tuple(module.up.shape)}, the current settings need {tuple(down.shape)} / "
                    f"{tuple(up.shape)} (a different rank?)"
                )
            down.copy_(module.down)
            up.copy_(module.up)

    def detach(self) -> None:
        """Put every original module back where peft's wrapper was."""
        if self._attached:
            self._model.unload()
            self._attached = False
            for parameter, flag in self._base_flags:
                parameter.requires_grad_(flag)


@contextlib.contextmanager
def attached_adapters(unet: nn.Module, text_encoder: nn.Module, targets: list[AdapterTarget]):
    adapters = AttachedAdapters(unet, text_encoder, targets)
    try:
        yield adapters
    finally:
        adapters.detach()


def targets_from_weights(weights: dict[tuple[str, str], LoraModuleWeights]) -> list[AdapterTarget]:
    """The adapter layout a saved file implies (its own ranks and alphas)."""
    return [
        AdapterTarget(component, name, int(module.down.shape[0]), float(module.alpha))
        for (component, name), module in weights.items()
    ]
