"""What LoHa and LoKr share: peft's LyCORIS tuners take the same config options and keep every file
part as a parameter of the same name, one ``ParameterDict`` per part, holding only the parts in use."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lib_lora_trainer.network.kinds.base import (
    ADAPTER_NAME,
    AdapterKind,
    KindSettings,
    PeftTarget,
    peft_target_options,
)


class LycorisKind(AdapterKind):
    """A kind trained by one of peft's LyCORIS tuners; a subclass names the tuner and its own options."""

    def peft_classes(self) -> tuple[type, type]:
        """peft's config and model class (imported on use: peft loads only when a run starts)."""
        raise NotImplementedError

    def own_options(self, settings: KindSettings) -> dict[str, object]:
        """The config options only this kind has."""
        return {}

    def peft_model(self, root: nn.Module, targets: Sequence[PeftTarget], settings: KindSettings) -> nn.Module:
        config_class, model_class = self.peft_classes()
        config = config_class(
            **peft_target_options(targets),
            rank_dropout=settings.rank_dropout,
            module_dropout=0.0,  # network/dropout.py skips modules, the same way for every kind
            use_effective_conv2d=settings.use_tucker,
            init_weights=True,
            **self.own_options(settings),
        )
        return model_class(root, config, ADAPTER_NAME)

    def parameters(self, layer: nn.Module) -> dict[str, nn.Parameter]:
        return {
            name: getattr(layer, name)[ADAPTER_NAME]
            for name in self.file_parts
            if ADAPTER_NAME in getattr(layer, name)
        }
