"""kohya names for the full SD1.5 layout, checked against an independent model of A1111's key lookup.

The UNet is ldm's real ``UNetModel`` with SD1.5's config and the text encoder transformers' real
``CLIPTextModel`` with its default (SD1.5) config, both built on the meta device: no memory, no weights.
"""

from __future__ import annotations

import re

import pytest
import torch
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import Downsample, ResBlock, UNetModel, Upsample
from safetensors import safe_open
from transformers import CLIPTextConfig, CLIPTextModel

from lib_lora_trainer.network.kohya_format import LoraModuleWeights, load_kohya_lora, save_kohya_lora
from lib_lora_trainer.network.kohya_names import kohya_name, module_name_from_kohya

TRANSFORMER_TARGETS = ("proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
RESBLOCK_TARGETS = ("in_layers.2", "out_layers.3", "emb_layers.1", "skip_connection")


@pytest.fixture(scope="module")
def sd15() -> tuple[UNetModel, CLIPTextModel]:
    with torch.device("meta"):
        unet = UNetModel(
            image_size=32,
            in_channels=4,
            out_channels=4,
            model_channels=320,
            attention_resolutions=[4, 2, 1],
            num_res_blocks=2,
            channel_mult=[1, 2, 4, 4],
            num_heads=8,
            use_spatial_transformer=True,
            transformer_depth=1,
            context_dim=768,
            use_checkpoint=False,
            legacy=False,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig())
    return unet, text_encoder


def _children(parent_name: str, parent: torch.nn.Module):
    for name, module in parent.named_modules():
        if name:
            yield f"{parent_name}.{name}", name, module


def lora_unet_targets(unet: UNetModel) -> dict[str, torch.nn.Module]:
    """kohya's LoRA set: the Linear/Conv2d layers of every SpatialTransformer with a target name."""
    targets = {}
    for name, module in unet.named_modules():
        if isinstance(module, SpatialTransformer):
            for full_name, inner, layer in _children(name, module):
                if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d) and inner.endswith(
                    TRANSFORMER_TARGETS
                ):
                    targets[full_name] = layer
    return targets


def locon_extra_targets(unet: UNetModel) -> dict[str, torch.nn.Module]:
    """LoCon adds the ResBlock layers (skip_connection when it is a conv) and the sampler convs."""
    targets = {}
    for name, module in unet.named_modules():
        if isinstance(module, ResBlock):
            for full_name, inner, layer in _children(name, module):
                if inner in RESBLOCK_TARGETS and isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                    targets[full_name] = layer
        elif isinstance(module, Downsample):
            targets[f"{name}.op"] = module.op
        elif isinstance(module, Upsample):
            targets[f"{name}.conv"] = module.conv
    return targets


def text_encoder_targets(text_encoder: CLIPTextModel) -> dict[str, torch.nn.Module]:
    return {
        name: module
        for name, module in text_encoder.named_modules()
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TEXT_ENCODER_TARGETS
    }


def a1111_layer_mapping(unet: UNetModel, text_encoder: CLIPTextModel) -> dict[str, torch.nn.Module]:
    """A1111's ``network_layer_mapping``: dotted names with '.'->'_' over ``sd_model.model`` (whose
    child is ``diffusion_model``) and over the CLIP wrapper (whose child is ``transformer``)."""
    mapping = {}
    for name, module in unet.named_modules():
        mapping["diffusion_model" + ("_" + name.replace(".", "_") if name else "")] = module
    for name, module in text_encoder.named_modules():
        mapping["transformer" + ("_" + name.replace(".", "_") if name else "")] = module
    return mapping


_A1111_RESNET_SUFFIXES = {
    "conv1": "in_layers_2",
    "conv2": "out_layers_3",
    "norm1": "in_layers_0",
    "norm2": "out_layers_0",
    "time_emb_proj": "emb_layers_1",
    "conv_shortcut": "skip_connection",
}


def a1111_compvis_name(key: str) -> str:
    """Our own rendering of the rules of A1111's ``convert_diffusers_name_to_compvis`` (SD1)."""
    rules = [
        (r"lora_unet_conv_in(.*)", lambda g: f"diffusion_model_input_blocks_0_0{g[0]}"),
        (r"lora_unet_conv_out(.*)", lambda g: f"diffusion_model_out_2{g[0]}"),
        (
            r"lora_unet_time_embedding_linear_(\d+)(.*)",
            lambda g: f"diffusion_model_time_embed_{int(g[0]) * 2 - 2}{g[1]}",
        ),
        (
            r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda g: "diffusion_model_input_blocks_{}_{}_{}".format(
                1 + int(g[0]) * 3 + int(g[2]), 1 if g[1] == "attentions" else 0, _a1111_suffix(g[1], g[3])
            ),
        ),
        (
            r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
            lambda g: "diffusion_model_middle_block_{}_{}".format(
                1 if g[0] == "attentions" else int(g[1]) * 2, _a1111_suffix(g[0], g[2])
            ),
        ),
        (
            r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
            lambda g: "diffusion_model_output_blocks_{}_{}_{}".format(
                int(g[0]) * 3 + int(g[2]), 1 if g[1] == "attentions" else 0, _a1111_suffix(g[1], g[3])
            ),
        ),
        (
            r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv",
            lambda g: f"diffusion_model_input_blocks_{3 + int(g[0]) * 3}_0_op",
        ),
        (
            r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv",
            lambda g: f"diffusion_model_output_blocks_{2 + int(g[0]) * 3}_{2 if int(g[0]) > 0 else 1}_conv",
        ),
        (
            r"lora_te_text_model_encoder_layers_(\d+)_(.+)",
            lambda g: f"transformer_text_model_encoder_layers_{g[0]}_{g[1]}",
        ),
    ]
    for pattern, convert in rules:
        match = re.match(pattern, key)  # A1111 uses re.match: anchored at the start only
        if match:
            return convert(match.groups())
    return key


def _a1111_suffix(kind: str, suffix: str) -> str:
    return _A1111_RESNET_SUFFIXES.get(suffix, suffix) if kind == "resnets" else suffix


def a1111_lookup(key_stem: str, mapping: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    """What A1111's ``load_network`` finds for one key stem (its diffusers rules, then the ldm fallback)."""
    module = mapping.get(a1111_compvis_name(key_stem))
    if module is None and "lora_unet" in key_stem:
        module = mapping.get(key_stem.replace("lora_unet", "diffusion_model"))
    return module


# --------------------------------------------------------------------------------------------


def test_target_sets_have_kohya_sizes(sd15):
    unet, text_encoder = sd15
    assert len(lora_unet_targets(unet)) == 192
    assert len(text_encoder_targets(text_encoder)) == 72
    assert len(locon_extra_targets(unet)) == 86


@pytest.mark.parametrize("network", ["lora", "locon"])
def test_every_exported_name_maps_back_onto_its_own_module_in_a1111(sd15, network):
    unet, text_encoder = sd15
    unet_targets = dict(lora_unet_targets(unet))
    if network == "locon":
        unet_targets.update(locon_extra_targets(unet))
    exported = {kohya_name("unet", name): module for name, module in unet_targets.items()}
    exported |= {
        kohya_name("text_encoder", name): m for name, m in text_encoder_targets(text_encoder).items()
    }

    assert len(exported) == len(unet_targets) + 72  # no two modules share a name
    assert len(exported) == (264 if network == "lora" else 350)
    mapping = a1111_layer_mapping(unet, text_encoder)
    unmatched = [stem for stem, module in exported.items() if a1111_lookup(stem, mapping) is not module]
    assert unmatched == []
    # kohya's own naming is diffusers', not ldm's (an ldm-style key would also load in A1111, but
    # not in kohya's tools)
    assert not any("input_blocks" in stem or "output_blocks" in stem for stem in exported)


def test_names_are_kohyas_documented_names(sd15):
    assert (
        kohya_name("unet", "input_blocks.1.1.transformer_blocks.0.attn1.to_q")
        == "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    )
    assert kohya_name("unet", "input_blocks.1.1.proj_in") == "lora_unet_down_blocks_0_attentions_0_proj_in"
    assert kohya_name("unet", "middle_block.1.proj_out") == "lora_unet_mid_block_attentions_0_proj_out"
    assert (
        kohya_name("unet", "output_blocks.11.1.transformer_blocks.0.ff.net.2")
        == "lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2"
    )
    assert kohya_name("unet", "input_blocks.1.0.in_layers.2") == "lora_unet_down_blocks_0_resnets_0_conv1"
    assert (
        kohya_name("unet", "input_blocks.4.0.skip_connection")
        == "lora_unet_down_blocks_1_resnets_0_conv_shortcut"
    )
    assert kohya_name("unet", "input_blocks.3.0.op") == "lora_unet_down_blocks_0_downsamplers_0_conv"
    assert kohya_name("unet", "output_blocks.2.1.conv") == "lora_unet_up_blocks_0_upsamplers_0_conv"
    assert (
        kohya_name("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj")
        == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    )
    assert (
        kohya_name("text_encoder", "text_model.encoder.layers.11.mlp.fc1")
        == "lora_te_text_model_encoder_layers_11_mlp_fc1"
    )


def test_outer_unet_layers_map_like_lycoris_full(sd15):
    unet, text_encoder = sd15
    mapping = a1111_layer_mapping(unet, text_encoder)
    outer = {"input_blocks.0.0": "lora_unet_conv_in", "out.2": "lora_unet_conv_out"}
    outer |= {
        "time_embed.0": "lora_unet_time_embedding_linear_1",
        "time_embed.2": "lora_unet_time_embedding_linear_2",
    }
    for name, stem in outer.items():
        assert kohya_name("unet", name) == stem
        assert a1111_lookup(stem, mapping) is unet.get_submodule(name)
        assert module_name_from_kohya(stem) == ("unet", name)


def test_among_all_linear_and_conv_layers_exactly_the_targets_get_a_name(sd15):
    unet, text_encoder = sd15
    expected_unet = set(lora_unet_targets(unet)) | set(locon_extra_targets(unet))
    expected_unet |= {"input_blocks.0.0", "out.2", "time_embed.0", "time_embed.2"}
    assert _named_layers("unet", unet) == expected_unet
    assert _named_layers("text_encoder", text_encoder) == set(text_encoder_targets(text_encoder))


def _named_layers(component: str, model: torch.nn.Module) -> set[str]:
    layers = (torch.nn.Linear, torch.nn.Conv2d)
    return {
        name
        for name, module in model.named_modules()
        if isinstance(module, layers) and _accepts(component, name)
    }


def _accepts(component: str, name: str) -> bool:
    try:
        kohya_name(component, name)
    except ValueError:
        return False
    return True


def test_module_name_from_kohya_inverts_kohya_name_for_every_target(sd15):
    unet, text_encoder = sd15
    unet_names = set(lora_unet_targets(unet)) | set(locon_extra_targets(unet))
    for name in unet_names:
        assert module_name_from_kohya(kohya_name("unet", name)) == ("unet", name)
        # the ldm-style keys some tools write (A1111's fallback) are read too
        assert module_name_from_kohya("lora_unet_" + name.replace(".", "_")) == ("unet", name)
    for name in text_encoder_targets(text_encoder):
        assert module_name_from_kohya(kohya_name("text_encoder", name)) == ("text_encoder", name)


@pytest.mark.parametrize(
    "name",
    [
        "input_blocks.1.0.in_layers.0",  # GroupNorm
        "input_blocks.1.1.norm",
        "input_blocks.1.1.transformer_blocks.0.norm1",
        "input_blocks.3.0.in_layers.2",  # position 3 is the downsampler in SD1.5
        "output_blocks.5.1.conv",  # the upsampler of up_blocks.1 is at .2
        "output_blocks.2.2.conv",
        "input_blocks.2.0.op",
        "time_embed.1",
        "middle_block.3.in_layers.2",
        "diffusion_model.input_blocks.1.1.proj_in",
        "",
    ],
)
def test_unsupported_unet_names_are_refused(name):
    with pytest.raises(ValueError, match="no kohya LoRA name"):
        kohya_name("unet", name)


@pytest.mark.parametrize(
    "name",
    [
        "text_model.embeddings.token_embedding",
        "text_model.encoder.layers.0.layer_norm1",
        "text_model.final_layer_norm",
    ],
)
def test_unsupported_text_encoder_names_are_refused(name):
    with pytest.raises(ValueError, match="no kohya LoRA name"):
        kohya_name("text_encoder", name)


def test_unknown_component_is_refused():
    with pytest.raises(ValueError, match="component"):
        kohya_name("vae", "encoder.conv_in")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "stem, message",
    [
        ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", "SDXL"),
        ("lora_te_text_model_embeddings_token_embedding", "text-encoder layer"),
        ("lora_unet_down_blocks_0_resnets_2_conv1", "SD1.5 UNet"),  # the downsampler's slot
        ("lora_unet_mid_block_attentions_1_proj_in", "SD1.5 UNet"),
        ("lora_unet_down_blocks_00_attentions_0_proj_in", "SD1.5 UNet"),
        ("lora_unet_down_blocks_0_resnets_0_norm1", "SD1.5 UNet"),
        ("lora_unet_input_blocks_3_0_in_layers_2", "SD1.5 UNet"),
        ("unet.down_blocks.0.attentions.0.proj_in", "must start with"),
    ],
)
def test_unknown_stems_are_refused(stem, message):
    with pytest.raises(ValueError, match=message):
        module_name_from_kohya(stem)


def test_a_full_saved_locon_file_loads_in_a1111_without_unmatched_keys(sd15, tmp_path):
    """Every key of a real file (rank 1, shapes from the real layers) finds its layer, as A1111 reads it:
    split at the first '.', map the stem, and the tensors fit the layer."""
    unet, text_encoder = sd15
    targets = {
        kohya_name("unet", n): m for n, m in (lora_unet_targets(unet) | locon_extra_targets(unet)).items()
    }
    targets |= {kohya_name("text_encoder", n): m for n, m in text_encoder_targets(text_encoder).items()}
    generator = torch.Generator().manual_seed(0)
    modules = {stem: _rank_one_weights(layer, generator) for stem, layer in targets.items()}
    path = save_kohya_lora(tmp_path / "full.safetensors", modules, {"ss_network_dim": "1"}, "fp16")

    loaded, _ = load_kohya_lora(path)
    mapping = a1111_layer_mapping(unet, text_encoder)
    parts_by_module: dict[int, set[str]] = {}
    unmatched = []
    with safe_open(str(path), framework="pt") as reader:
        for key in reader.keys():  # noqa: SIM118 (a reader, not a dict)
            stem, _, part = key.partition(".")
            layer = a1111_lookup(stem, mapping)
            if layer is None:
                unmatched.append(key)
                continue
            parts_by_module.setdefault(id(layer), set()).add(part)
            _assert_fits(layer, part, reader.get_tensor(key))
    assert unmatched == []
    assert len(parts_by_module) == 350
    assert all(parts == {"lora_down.weight", "lora_up.weight", "alpha"} for parts in parts_by_module.values())
    assert set(loaded) == set(modules)


def _rank_one_weights(layer: torch.nn.Module, generator: torch.Generator) -> LoraModuleWeights:
    if isinstance(layer, torch.nn.Linear):
        down_shape, up_shape = (1, layer.in_features), (layer.out_features, 1)
    else:
        down_shape, up_shape = (1, layer.in_channels, *layer.kernel_size), (layer.out_channels, 1, 1, 1)
    return LoraModuleWeights(
        down=torch.randn(down_shape, generator=generator),
        up=torch.randn(up_shape, generator=generator),
        alpha=1.0,
    )


def _assert_fits(layer: torch.nn.Module, part: str, tensor: torch.Tensor) -> None:
    if part == "alpha":
        assert tensor.shape == ()
    elif isinstance(layer, torch.nn.Linear):
        expected = (1, layer.in_features) if part == "lora_down.weight" else (layer.out_features, 1)
        assert tuple(tensor.shape) == expected
    else:
        if part == "lora_down.weight":
            assert tuple(tensor.shape) == (1, layer.in_channels, *layer.kernel_size)
        else:
            assert tuple(tensor.shape) == (layer.out_channels, 1, 1, 1)
