"""Convert a taming-transformers VQGAN (Lightning `.ckpt` + YAML config) to a `diffusers.VQModel`.

The taming VQModel is encoder -> quant_conv -> quantize (VectorQuantizer2) and post_quant_conv -> decoder.
diffusers' VQModel has the same structure, so the conversion is a renaming of parameters plus two reshapes:
taming's attention uses 1x1 convs (q, k, v, proj_out, weights [C, C, 1, 1]) where diffusers' `Attention` uses
Linear layers (to_q, to_k, to_v, to_out.0, weights [C, C]).

Usage:
    pdm convert-vqgan --checkpoint last.ckpt --config model.yaml --output vqgan-diffusers
"""

from __future__ import annotations

import os
import pickle
from typing import Iterator

import torch

# taming's VQModel saves its training loss (LPIPS network and patch discriminator) under `loss.*`. It is not part
# of the tokenizer (only used to train it), so it is dropped instead of being reported as unexpected.
IGNORED_PREFIXES = ("loss.",)

_RESNET_PARTS = ("norm1", "conv1", "norm2", "conv2")
_ATTENTION_PARTS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_ATTENTION_LINEAR_WEIGHTS = (".to_q.weight", ".to_k.weight", ".to_v.weight", ".to_out.0.weight")


# ----------------------------------------------------------------------------------------------------------------
# config


def load_taming_config(config_path: str) -> tuple[dict, int, int]:
    """Read a taming YAML config; returns (ddconfig, n_embed, embed_dim).

    Accepts the full training config (`model.params.{ddconfig, n_embed, embed_dim}`) or just its `params` part.
    """
    import yaml

    with open(config_path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected a YAML mapping, got {type(config).__name__}")
    model = config.get("model", config)
    target = str(model.get("target", ""))
    if "Gumbel" in target:
        raise ValueError(
            f"{config_path}: {target} uses a Gumbel quantizer, which diffusers' VQModel cannot represent"
        )
    params = model.get("params", model)
    missing = [key for key in ("ddconfig", "n_embed", "embed_dim") if key not in params]
    if missing:
        raise ValueError(f"{config_path}: model.params lacks {missing} (not a taming VQGAN config?)")
    if params.get("remap") is not None:
        raise ValueError(f"{config_path}: codebook remapping (`remap`) is not supported by diffusers' VQModel")
    return dict(params["ddconfig"]), int(params["n_embed"]), int(params["embed_dim"])


def _level_resolutions_encoder(ddconfig: dict) -> list[int]:
    # taming halves the resolution after each encoder level but the last (integer division).
    resolutions, current = [], int(ddconfig["resolution"])
    for _ in ddconfig["ch_mult"]:
        resolutions.append(current)
        current //= 2
    return resolutions


def _level_resolutions_decoder(ddconfig: dict) -> list[int]:
    # taming's decoder starts at resolution // 2**(levels-1) and doubles, so for resolutions that are not a
    # multiple of 2**(levels-1) its attention levels can differ from the encoder's: compute them separately.
    levels = len(ddconfig["ch_mult"])
    bottom = int(ddconfig["resolution"]) // 2 ** (levels - 1)
    return [bottom * 2 ** (levels - 1 - level) for level in range(levels)]  # indexed by taming level


def _check_representable(ddconfig: dict) -> None:
    required = ("ch", "ch_mult", "num_res_blocks", "attn_resolutions", "resolution", "z_channels")
    missing = [key for key in required if key not in ddconfig]
    if missing:
        raise ValueError(f"ddconfig lacks {missing}")
    problems = []
    if ddconfig["ch_mult"][0] != 1:
        problems.append(
            f"ch_mult[0] = {ddconfig['ch_mult'][0]} (diffusers' encoder conv_in outputs block_out_channels[0], "
            "taming's outputs ch; they agree only when ch_mult[0] == 1)"
        )
    if ddconfig.get("double_z", False):
        problems.append("double_z = True (a VQGAN encoder outputs z_channels, not 2 * z_channels)")
    if not ddconfig.get("resamp_with_conv", True):
        problems.append("resamp_with_conv = False (diffusers' encoder/decoder blocks always resample with a conv)")
    if ddconfig.get("give_pre_end", False):
        problems.append("give_pre_end = True (the decoder would skip its output layers)")
    if ddconfig.get("attn_type", "vanilla") != "vanilla":
        problems.append(f"attn_type = {ddconfig['attn_type']!r} (only taming's vanilla AttnBlock maps to Attention)")
    if ddconfig.get("tanh_out", False):
        problems.append("tanh_out = True (diffusers' decoder has no output tanh)")
    odd = [c for c in _block_out_channels(ddconfig) if c % 32]
    if odd:
        problems.append(f"channels {odd} are not multiples of 32 (taming's GroupNorm uses 32 groups)")
    if problems:
        raise ValueError("taming config cannot be represented exactly by diffusers' VQModel: " + "; ".join(problems))


def _block_out_channels(ddconfig: dict) -> list[int]:
    return [int(ddconfig["ch"]) * int(mult) for mult in ddconfig["ch_mult"]]


def vqmodel_config_from_taming(ddconfig: dict, n_embed: int, embed_dim: int) -> dict:
    """The `diffusers.VQModel` kwargs that reproduce a taming VQGAN (ddconfig, n_embed, embed_dim).

    Raises ValueError naming every setting that diffusers' VQModel cannot represent exactly.
    """
    _check_representable(ddconfig)
    attn_resolutions = {int(r) for r in ddconfig["attn_resolutions"]}
    levels = len(ddconfig["ch_mult"])
    down_attention = [res in attn_resolutions for res in _level_resolutions_encoder(ddconfig)]
    decoder_res = _level_resolutions_decoder(ddconfig)
    # diffusers' up_blocks[i] is taming's up[levels - 1 - i] (taming stores its up levels bottom-last).
    up_attention = [decoder_res[levels - 1 - i] in attn_resolutions for i in range(levels)]
    return {
        "in_channels": int(ddconfig.get("in_channels", 3)),
        "out_channels": int(ddconfig.get("out_ch", 3)),
        "down_block_types": ["AttnDownEncoderBlock2D" if a else "DownEncoderBlock2D" for a in down_attention],
        "up_block_types": ["AttnUpDecoderBlock2D" if a else "UpDecoderBlock2D" for a in up_attention],
        "block_out_channels": _block_out_channels(ddconfig),
        "layers_per_block": int(ddconfig["num_res_blocks"]),
        "act_fn": "silu",
        "latent_channels": int(ddconfig["z_channels"]),
        "sample_size": int(ddconfig["resolution"]),
        "num_vq_embeddings": int(n_embed),
        "norm_num_groups": 32,
        "vq_embed_dim": int(embed_dim),
        # Codes index the codebook directly; latents are never scaled for a diffusion model.
        "scaling_factor": 1.0,
        "norm_type": "group",
        "mid_block_add_attention": True,
        "lookup_from_codebook": True,
        # GAN-trained decoders overflow in float16; keep VAE-style upcasting on.
        "force_upcast": True,
    }


# ----------------------------------------------------------------------------------------------------------------
# key mapping


def _resnet(taming: str, diffusers: str, has_shortcut: bool) -> Iterator[tuple[str, str]]:
    for part in _RESNET_PARTS:
        yield f"{taming}.{part}", f"{diffusers}.{part}"
    if has_shortcut:
        yield f"{taming}.nin_shortcut", f"{diffusers}.conv_shortcut"


def _attention(taming: str, diffusers: str) -> Iterator[tuple[str, str]]:
    for part, new in _ATTENTION_PARTS.items():
        yield f"{taming}.{part}", f"{diffusers}.{new}"


def _mid(prefix: str) -> Iterator[tuple[str, str]]:
    yield from _resnet(f"{prefix}.mid.block_1", f"{prefix}.mid_block.resnets.0", False)
    yield from _attention(f"{prefix}.mid.attn_1", f"{prefix}.mid_block.attentions.0")
    yield from _resnet(f"{prefix}.mid.block_2", f"{prefix}.mid_block.resnets.1", False)


def _encoder_modules(config: dict) -> Iterator[tuple[str, str]]:
    channels = config["block_out_channels"]
    yield "encoder.conv_in", "encoder.conv_in"
    in_channels = channels[0]
    for level, block_type in enumerate(config["down_block_types"]):
        src, dst = f"encoder.down.{level}", f"encoder.down_blocks.{level}"
        for i in range(config["layers_per_block"]):
            block_in = in_channels if i == 0 else channels[level]
            yield from _resnet(f"{src}.block.{i}", f"{dst}.resnets.{i}", block_in != channels[level])
            if block_type.startswith("Attn"):
                yield from _attention(f"{src}.attn.{i}", f"{dst}.attentions.{i}")
        if level != len(channels) - 1:
            yield f"{src}.downsample.conv", f"{dst}.downsamplers.0.conv"
        in_channels = channels[level]
    yield from _mid("encoder")
    yield "encoder.norm_out", "encoder.conv_norm_out"
    yield "encoder.conv_out", "encoder.conv_out"


def _decoder_modules(config: dict) -> Iterator[tuple[str, str]]:
    channels = config["block_out_channels"]
    levels = len(channels)
    yield "decoder.conv_in", "decoder.conv_in"
    yield from _mid("decoder")
    in_channels = channels[-1]
    for i, block_type in enumerate(config["up_block_types"]):
        level = levels - 1 - i  # taming's index of this up level
        src, dst = f"decoder.up.{level}", f"decoder.up_blocks.{i}"
        # taming's decoder has num_res_blocks + 1 resnets per level.
        for j in range(config["layers_per_block"] + 1):
            block_in = in_channels if j == 0 else channels[level]
            yield from _resnet(f"{src}.block.{j}", f"{dst}.resnets.{j}", block_in != channels[level])
            if block_type.startswith("Attn"):
                yield from _attention(f"{src}.attn.{j}", f"{dst}.attentions.{j}")
        if level != 0:
            yield f"{src}.upsample.conv", f"{dst}.upsamplers.0.conv"
        in_channels = channels[level]
    yield "decoder.norm_out", "decoder.conv_norm_out"
    yield "decoder.conv_out", "decoder.conv_out"


def taming_to_diffusers_keys(config: dict) -> dict[str, str]:
    """Map every taming parameter name to its diffusers name for a VQModel `config` (from
    `vqmodel_config_from_taming`)."""
    modules = [*_encoder_modules(config), *_decoder_modules(config)]
    modules += [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]
    mapping = {f"{src}.{param}": f"{dst}.{param}" for src, dst in modules for param in ("weight", "bias")}
    mapping["quantize.embedding.weight"] = "quantize.embedding.weight"
    return mapping


def _is_attention_linear_weight(diffusers_key: str) -> bool:
    return diffusers_key.endswith(_ATTENTION_LINEAR_WEIGHTS)


def _format_keys(keys) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:50])
    return shown + (f", ... ({len(keys) - 50} more)" if len(keys) > 50 else "")


def convert_state_dict(state_dict: dict, config: dict) -> dict[str, torch.Tensor]:
    """Rename a taming VQGAN state dict to diffusers' VQModel names (attention 1x1 conv weights -> Linear).

    Raises ValueError listing the missing and the unexpected keys (`loss.*` keys are ignored).
    """
    mapping = taming_to_diffusers_keys(config)
    present = {key for key in state_dict if not key.startswith(IGNORED_PREFIXES)}
    missing, unexpected = sorted(set(mapping) - present), sorted(present - set(mapping))
    if missing or unexpected:
        message = ["checkpoint does not match the taming VQGAN described by the config:"]
        if missing:
            message.append(f"missing keys ({len(missing)}): {_format_keys(missing)}")
        if unexpected:
            message.append(f"unexpected keys ({len(unexpected)}): {_format_keys(unexpected)}")
        raise ValueError("\n".join(message))
    converted = {}
    for taming_key, diffusers_key in mapping.items():
        tensor = state_dict[taming_key]
        if _is_attention_linear_weight(diffusers_key) and tensor.ndim == 4:
            tensor = tensor.reshape(tensor.shape[0], tensor.shape[1])
        converted[diffusers_key] = tensor
    return converted


def _load_exactly(model, converted: dict) -> None:
    expected = model.state_dict()
    wrong = [
        f"{key}: checkpoint {tuple(converted[key].shape)} vs config {tuple(value.shape)}"
        for key, value in expected.items()
        if key in converted and converted[key].shape != value.shape
    ]
    if wrong:
        raise ValueError(
            f"checkpoint shapes do not match the config ({len(wrong)} tensors):\n" + "\n".join(wrong[:50])
        )
    # strict=True: the mapping must produce exactly the model's keys; a gap here is a bug in this module.
    model.load_state_dict(converted, strict=True)


def vqmodel_from_taming_state_dict(state_dict: dict, ddconfig: dict, n_embed: int, embed_dim: int):
    """Build a `diffusers.VQModel` (float32, eval mode) from a taming VQGAN state dict and its config."""
    from diffusers import VQModel

    config = vqmodel_config_from_taming(ddconfig, n_embed, embed_dim)
    converted = convert_state_dict(state_dict, config)
    model = VQModel(**config)
    _load_exactly(model, converted)
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# files


def load_taming_state_dict(checkpoint_path: str) -> dict[str, torch.Tensor]:
    """Load the state dict of a taming checkpoint: a Lightning `.ckpt` ({"state_dict": ...}), a bare state dict,
    or a `.safetensors` file. Never unpickles arbitrary objects (`weights_only=True`)."""
    if not os.path.isfile(checkpoint_path):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint_path}")
    if checkpoint_path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(checkpoint_path)
    try:
        checkpoint = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ValueError(
            f"{checkpoint_path} holds objects other than tensors and cannot be loaded safely "
            "(weights_only=True). In a trusted environment, re-save only its weights: "
            "torch.save({'state_dict': ckpt['state_dict']}, 'weights.ckpt')."
            f"\nOriginal error: {error}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{checkpoint_path}: expected a dict, got {type(checkpoint).__name__}")
    state_dict = checkpoint.get("state_dict", checkpoint)
    non_tensors = [key for key, value in state_dict.items() if not torch.is_tensor(value)]
    if non_tensors:
        raise ValueError(f"{checkpoint_path}: not a state dict, non-tensor entries {_format_keys(non_tensors)}")
    return state_dict


def convert_taming_vqgan(checkpoint_path: str, config_path: str):
    """Convert a taming VQGAN checkpoint + YAML config into a `diffusers.VQModel` (float32, eval mode)."""
    ddconfig, n_embed, embed_dim = load_taming_config(config_path)
    state_dict = load_taming_state_dict(checkpoint_path)
    return vqmodel_from_taming_state_dict(state_dict, ddconfig, n_embed, embed_dim)
