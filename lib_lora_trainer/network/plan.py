"""From the training config (or a file to continue) to what is attached: targets, kind, dropouts."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from lib_lora_trainer.config import ConfigError, TrainingConfig
from lib_lora_trainer.network.adapters import (
    AdapterSpec,
    AdapterTarget,
    plan_targets,
    settings_from_weights,
    targets_from_weights,
)
from lib_lora_trainer.network.blocks import BLOCK_COUNT, block_lr_weights, block_values
from lib_lora_trainer.network.dropout import DropoutSettings
from lib_lora_trainer.network.kinds import KindSettings, ModuleTensors
from lib_lora_trainer.network.kohya_file import load_network_file
from lib_lora_trainer.network.kohya_names import module_name_from_kohya


@dataclass(frozen=True)
class SavedNetwork:
    """A network file to continue from: its modules by ``(component, module)`` and its network args."""

    weights: dict[tuple[str, str], ModuleTensors]
    network_args: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class NetworkPlan:
    targets: list[AdapterTarget]
    settings: KindSettings
    dropout: DropoutSettings


def kind_settings(config: TrainingConfig) -> KindSettings:
    lycoris = config.network_type in ("loha", "lokr")
    return KindSettings(
        algo=config.network_type if lycoris else "lora",
        dora_wd=config.dora_wd and not lycoris,
        use_tucker=config.use_tucker and lycoris,
        lokr_factor=config.lokr_factor,
        rank_dropout=config.rank_dropout if lycoris else 0.0,
    )


def dropout_settings(config: TrainingConfig) -> DropoutSettings:
    return DropoutSettings(config.network_dropout, config.rank_dropout, config.module_dropout)


def trains_convolutions(config: TrainingConfig) -> bool:
    return config.network_type == "locon" or (config.network_type in ("loha", "lokr") and config.conv_layers)


def adapter_spec(config: TrainingConfig, *, train_text_encoder: bool) -> AdapterSpec:
    """Ranks per module kind and block, and the blocks left out by their LR weight (kohya's rules)."""

    def values(name: str, integer: bool) -> tuple[float, ...] | None:
        found = block_values(getattr(config, name), name, integer=integer)
        return tuple(found) if found is not None else None

    weights = block_lr_weights(config.down_lr_weight, config.mid_lr_weight, config.up_lr_weight)
    skipped = frozenset(
        i for i in range(BLOCK_COUNT) if weights is not None and weights[i] <= config.block_lr_zero_threshold
    )
    return AdapterSpec(
        network_dim=config.network_dim,
        network_alpha=config.network_alpha,
        locon=trains_convolutions(config),
        conv_dim=config.conv_dim,
        conv_alpha=config.conv_alpha,
        train_text_encoder=train_text_encoder,
        block_dims=values("block_dims", True),
        block_alphas=values("block_alphas", False),
        conv_block_dims=values("conv_block_dims", True),
        conv_block_alphas=values("conv_block_alphas", False),
        skipped_blocks=skipped,
    )


def load_saved_network(path: str | Path, config: TrainingConfig | None = None) -> SavedNetwork:
    """Read a file to continue from; a missing one, or one of another kind than ``config`` trains, is a
    :class:`ConfigError` (checked before the model is touched)."""
    source = Path(path)
    if not source.is_file():
        raise ConfigError([f"the LoRA to continue from, {source}, does not exist"])
    modules, metadata = load_network_file(source)
    try:
        network_args = json.loads(metadata.get("ss_network_args") or "{}")
    except json.JSONDecodeError:
        network_args = {}
    weights = {module_name_from_kohya(stem): parts for stem, parts in modules.items()}
    saved = SavedNetwork(weights, {str(k): str(v) for k, v in dict(network_args).items()})
    if config is not None:
        _check_same_kind(settings_from_weights(saved.weights, saved.network_args), kind_settings(config))
    return saved


def _check_same_kind(saved: KindSettings, wanted: KindSettings) -> None:
    if (saved.algo, saved.dora_wd) != (wanted.algo, wanted.dora_wd):
        raise ConfigError(
            [
                f"the LoRA to continue from is a {_kind_label(saved)} network, the settings say "
                f"{_kind_label(wanted)}; set the network type (and DoRA) to the file's to continue it"
            ]
        )


def plan_network(
    config: TrainingConfig,
    unet: nn.Module,
    text_encoder: nn.Module,
    *,
    train_text_encoder: bool,
    saved: SavedNetwork | None = None,
) -> NetworkPlan:
    """What to attach: the config's layout, or the saved file's own (its ranks, alphas and modules)."""
    dropout = dropout_settings(config)
    if saved is None:
        spec = adapter_spec(config, train_text_encoder=train_text_encoder)
        return NetworkPlan(plan_targets(unet, text_encoder, spec), kind_settings(config), dropout)
    settings = settings_from_weights(saved.weights, saved.network_args)
    wanted = kind_settings(config)
    _check_same_kind(settings, wanted)
    settings = KindSettings(
        algo=settings.algo,
        dora_wd=settings.dora_wd,
        use_tucker=settings.use_tucker,
        lokr_factor=settings.lokr_factor,
        lokr_decompose_both=settings.lokr_decompose_both,
        rank_dropout=wanted.rank_dropout,
    )
    targets = targets_from_weights(saved.weights)
    if not train_text_encoder:
        targets = [t for t in targets if t.component == "unet"]
        for key in [k for k in saved.weights if k[0] == "text_encoder"]:
            del saved.weights[key]
    return NetworkPlan(targets, settings, dropout)


def _kind_label(settings: KindSettings) -> str:
    names = {"lora": "LoRA/LoCon", "loha": "LoHa", "lokr": "LoKr"}
    return names[settings.algo] + (" with DoRA" if settings.dora_wd else "")
