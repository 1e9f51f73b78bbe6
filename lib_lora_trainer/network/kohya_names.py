"""kohya LoRA key names for SD1.5, from and to the module names of A1111's loaded model.

A1111 holds the UNet as ldm's ``UNetModel`` (``input_blocks.1.1.transformer_blocks.0.attn1.to_q``) and
the text encoder as transformers' ``CLIPTextModel`` (``text_model.encoder.layers.0.self_attn.q_proj``).
kohya's sd-scripts names SD1.5 LoRA modules after *diffusers'* UNet layout, dots turned into underscores:
``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`` and
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``. A1111's built-in Lora extension maps those names
back onto its ldm modules (``convert_diffusers_name_to_compvis``), so we write exactly that form.

SD1.5 block layout (two ResBlocks per level, three levels with attention):

==================================  ==========================================
ldm (UNetModel)                      diffusers (kohya)
==================================  ==========================================
``input_blocks.{1+3b+j}.0`` / ``.1``  ``down_blocks.b.resnets.j`` / ``attentions.j``
``input_blocks.{3+3b}.0.op``          ``down_blocks.b.downsamplers.0.conv``
``middle_block.0`` / ``.1`` / ``.2``  ``mid_block.resnets.0`` / ``attentions.0`` / ``resnets.1``
``output_blocks.{3b+j}.0`` / ``.1``   ``up_blocks.b.resnets.j`` / ``attentions.j``
``output_blocks.{3b+2}.{1|2}.conv``   ``up_blocks.b.upsamplers.0.conv`` (index 1 only for b == 0)
``input_blocks.0.0``, ``out.2``       ``conv_in``, ``conv_out``
``time_embed.0`` / ``.2``             ``time_embedding.linear_1`` / ``linear_2``
==================================  ==========================================

Inside a ResBlock ``in_layers.2``/``out_layers.3``/``emb_layers.1``/``skip_connection`` are
``conv1``/``conv2``/``time_emb_proj``/``conv_shortcut``; inside a SpatialTransformer the names are equal.
"""

from __future__ import annotations

import re
from typing import Literal

Component = Literal["unet", "text_encoder"]

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"

# ResBlock layers that can carry a LoRA: ldm name -> diffusers name.
_RESNET_LAYERS = {
    "in_layers.2": "conv1",
    "out_layers.3": "conv2",
    "emb_layers.1": "time_emb_proj",
    "skip_connection": "conv_shortcut",
}
_RESNET_LAYERS_FROM_DIFFUSERS = {diffusers: ldm for ldm, diffusers in _RESNET_LAYERS.items()}

# Whole-UNet layers outside the blocks (LyCORIS "full" targets them; A1111 maps them).
_UNET_OUTER_LAYERS = {
    "input_blocks.0.0": "conv_in",
    "out.2": "conv_out",
    "time_embed.0": "time_embedding.linear_1",
    "time_embed.2": "time_embedding.linear_2",
}
_UNET_OUTER_LAYERS_FROM_KOHYA = {d.replace(".", "_"): ldm for ldm, d in _UNET_OUTER_LAYERS.items()}
_UNET_OUTER_LAYERS_FROM_LDM_STYLE = {ldm.replace(".", "_"): ldm for ldm in _UNET_OUTER_LAYERS}

# Linear/Conv2d layers inside a SpatialTransformer: underscored pattern -> dotted name.
_TRANSFORMER_LAYERS = (
    (re.compile(r"proj_(in|out)"), "proj_{0}"),
    (re.compile(r"transformer_blocks_(\d+)_attn([12])_to_([qkv])"), "transformer_blocks.{0}.attn{1}.to_{2}"),
    (re.compile(r"transformer_blocks_(\d+)_attn([12])_to_out_0"), "transformer_blocks.{0}.attn{1}.to_out.0"),
    (re.compile(r"transformer_blocks_(\d+)_ff_net_0_proj"), "transformer_blocks.{0}.ff.net.0.proj"),
    (re.compile(r"transformer_blocks_(\d+)_ff_net_2"), "transformer_blocks.{0}.ff.net.2"),
)

# Linear layers of CLIPTextModel's encoder: underscored pattern -> dotted name.
_TEXT_ENCODER_LAYERS = (
    (
        re.compile(r"text_model_encoder_layers_(\d+)_self_attn_(q|k|v|out)_proj"),
        "text_model.encoder.layers.{0}.self_attn.{1}_proj",
    ),
    (re.compile(r"text_model_encoder_layers_(\d+)_mlp_fc([12])"), "text_model.encoder.layers.{0}.mlp.fc{1}"),
)


def _underscored(name: str) -> str:
    return name.replace(".", "_")


def _dotted(underscored: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> str | None:
    """The dotted layer name whose underscored form is ``underscored``, or None if none fits."""
    for pattern, template in table:
        match = pattern.fullmatch(underscored)
        if match:
            return template.format(*match.groups())
    return None


def _is_layer(dotted: str, table: tuple[tuple[re.Pattern[str], str], ...]) -> bool:
    return _dotted(_underscored(dotted), table) == dotted


# --------------------------------------------------------------------------------------------
# ldm -> kohya
# --------------------------------------------------------------------------------------------


def kohya_name(component: Component, module_name: str) -> str:
    """The kohya key stem of one adapted module (see the module docstring for the layout).

    ``module_name`` is relative to ldm's ``UNetModel`` for ``"unet"`` and to transformers'
    ``CLIPTextModel`` for ``"text_encoder"``. Raises ValueError for a layer kohya/A1111 cannot name.
    """
    if component == "unet":
        stem = _kohya_unet_name_or_none(module_name)
        if stem is None:
            raise ValueError(
                f"UNet module {module_name!r} has no kohya LoRA name: only SpatialTransformer layers "
                "(proj_in, proj_out, to_q/k/v, to_out.0, ff.net.0.proj, ff.net.2), ResBlock layers "
                "(in_layers.2, out_layers.3, emb_layers.1, skip_connection), down/up-sampler convs, "
                "input_blocks.0.0, out.2 and time_embed.0/2 of an SD1.5 UNet can be exported"
            )
        return stem
    if component == "text_encoder":
        if not _is_layer(module_name, _TEXT_ENCODER_LAYERS):
            raise ValueError(
                f"text encoder module {module_name!r} has no kohya LoRA name: only "
                "text_model.encoder.layers.N.self_attn.{q,k,v,out}_proj and .mlp.fc1/fc2 can be exported"
            )
        return TEXT_ENCODER_PREFIX + _underscored(module_name)
    raise ValueError(f"component must be 'unet' or 'text_encoder', got {component!r}")


def _diffusers_unet_name(name: str) -> str | None:
    if name in _UNET_OUTER_LAYERS:
        return _UNET_OUTER_LAYERS[name]

    match = re.fullmatch(r"input_blocks\.(\d+)\.0\.op", name)
    if match:
        index = int(match[1])
        return f"down_blocks.{index // 3 - 1}.downsamplers.0.conv" if index >= 3 and index % 3 == 0 else None

    match = re.fullmatch(r"output_blocks\.(\d+)\.([12])\.conv", name)
    if match:
        level, position = divmod(int(match[1]), 3)
        upsampler_layer = 1 if level == 0 else 2
        if position == 2 and int(match[2]) == upsampler_layer:
            return f"up_blocks.{level}.upsamplers.0.conv"
        return None

    match = re.fullmatch(r"input_blocks\.(\d+)\.([01])\.(.+)", name)
    if match:
        index = int(match[1])
        level, position = divmod(index - 1, 3)
        if index < 1 or position == 2:  # input_blocks.0 is conv_in; every third block is a downsampler
            return None
        return _block_layer_name(f"down_blocks.{level}", match[2] == "1", position, match[3])

    match = re.fullmatch(r"middle_block\.([012])\.(.+)", name)
    if match:
        layer = int(match[1])
        return _block_layer_name("mid_block", layer == 1, 0 if layer == 1 else layer // 2, match[2])

    match = re.fullmatch(r"output_blocks\.(\d+)\.([01])\.(.+)", name)
    if match:
        level, position = divmod(int(match[1]), 3)
        return _block_layer_name(f"up_blocks.{level}", match[2] == "1", position, match[3])
    return None


def _block_layer_name(block: str, is_attention: bool, position: int, layer: str) -> str | None:
    if is_attention:
        return f"{block}.attentions.{position}.{layer}" if _is_layer(layer, _TRANSFORMER_LAYERS) else None
    if layer in _RESNET_LAYERS:
        return f"{block}.resnets.{position}.{_RESNET_LAYERS[layer]}"
    return None


# --------------------------------------------------------------------------------------------
# kohya -> ldm
# --------------------------------------------------------------------------------------------


def module_name_from_kohya(stem: str) -> tuple[Component, str]:
    """``(component, module_name)`` for a kohya key stem: the inverse of :func:`kohya_name`.

    Accepts kohya's diffusers-style stems and also the ldm-style ``lora_unet_input_blocks_1_1_...``
    stems that some tools write and A1111 loads. Raises ValueError for anything else (SDXL's
    ``lora_te1_``/``lora_te2_``, unknown layers).
    """
    if stem.startswith(("lora_te1_", "lora_te2_")):
        raise ValueError(f"{stem!r} is an SDXL text-encoder key; only SD1.x LoRA files are supported")
    if stem.startswith(TEXT_ENCODER_PREFIX):
        module_name = _dotted(stem[len(TEXT_ENCODER_PREFIX) :], _TEXT_ENCODER_LAYERS)
        if module_name is None:
            raise ValueError(f"{stem!r} is not a text-encoder layer a LoRA can adapt")
        return "text_encoder", module_name
    if stem.startswith(UNET_PREFIX):
        rest = stem[len(UNET_PREFIX) :]
        module_name = _ldm_name_from_diffusers_style(rest)
        # The round trip refuses positions outside SD1.5 ("down_blocks_0_resnets_2") and odd numerals.
        if module_name is not None and _kohya_unet_name_or_none(module_name) == stem:
            return "unet", module_name
        module_name = _ldm_name_from_ldm_style(rest)
        if module_name is not None and _kohya_unet_name_or_none(module_name) is not None:
            return "unet", module_name
        raise ValueError(f"{stem!r} is not a layer of an SD1.5 UNet that a LoRA can adapt")
    raise ValueError(f"{stem!r} is not a kohya LoRA key: it must start with 'lora_unet_' or 'lora_te_'")


_DIFFUSERS_BLOCK_LAYER = re.compile(
    r"(down_blocks_(\d+)|mid_block|up_blocks_(\d+))_(attentions|resnets)_(\d+)_(.+)"
)


def _kohya_unet_name_or_none(module_name: str) -> str | None:
    diffusers = _diffusers_unet_name(module_name)
    return None if diffusers is None else UNET_PREFIX + _underscored(diffusers)


def _ldm_name_from_diffusers_style(rest: str) -> str | None:
    if rest in _UNET_OUTER_LAYERS_FROM_KOHYA:
        return _UNET_OUTER_LAYERS_FROM_KOHYA[rest]
    match = re.fullmatch(r"down_blocks_(\d+)_downsamplers_0_conv", rest)
    if match:
        return f"input_blocks.{3 + 3 * int(match[1])}.0.op"
    match = re.fullmatch(r"up_blocks_(\d+)_upsamplers_0_conv", rest)
    if match:
        level = int(match[1])
        return f"output_blocks.{2 + 3 * level}.{1 if level == 0 else 2}.conv"

    match = _DIFFUSERS_BLOCK_LAYER.fullmatch(rest)
    if not match:
        return None
    down_level, up_level, kind, position, layer = match[2], match[3], match[4], int(match[5]), match[6]
    is_attention = kind == "attentions"
    if is_attention:
        ldm_layer = _dotted(layer, _TRANSFORMER_LAYERS)
    else:
        ldm_layer = _RESNET_LAYERS_FROM_DIFFUSERS.get(layer)
    if ldm_layer is None:
        return None
    sub_index = 1 if is_attention else 0
    if down_level is not None:
        return f"input_blocks.{1 + 3 * int(down_level) + position}.{sub_index}.{ldm_layer}"
    if up_level is not None:
        return f"output_blocks.{3 * int(up_level) + position}.{sub_index}.{ldm_layer}"
    return f"middle_block.{1 if is_attention else 2 * position}.{ldm_layer}"


def _ldm_name_from_ldm_style(rest: str) -> str | None:
    if rest in _UNET_OUTER_LAYERS_FROM_LDM_STYLE:
        return _UNET_OUTER_LAYERS_FROM_LDM_STYLE[rest]
    match = re.fullmatch(r"(input_blocks|output_blocks)_(\d+)_(\d+)_(.+)", rest)
    if match:
        block, layer = f"{match[1]}.{match[2]}.{match[3]}", match[4]
    else:
        match = re.fullmatch(r"middle_block_(\d+)_(.+)", rest)
        if not match:
            return None
        block, layer = f"middle_block.{match[1]}", match[2]
    if layer in ("op", "conv"):
        return f"{block}.{layer}"
    for ldm_layer in _RESNET_LAYERS:
        if layer == _underscored(ldm_layer):
            return f"{block}.{ldm_layer}"
    transformer_layer = _dotted(layer, _TRANSFORMER_LAYERS)
    return f"{block}.{transformer_layer}" if transformer_layer else None
