"""Parity of the taming-transformers VQGAN -> diffusers VQModel conversion against the original modules."""

import os
import runpy
import sys

import pytest
import torch
import yaml

from progressive_denoising import convert_vqgan
from progressive_denoising.vq import decode_codes, encode_to_codes

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two tiny architectures: attention only in the mid blocks (as in the f16/f8 configs, where attention sits at
# the bottom level only), and attention inside a non-bottom down/up level with three levels and shortcuts.
ARCHITECTURES = {
    "mid-only": dict(ch=32, ch_mult=[1, 2], num_res_blocks=1, attn_resolutions=[], resolution=32,
                     z_channels=8, embed_dim=4, n_embed=32),
    "level-attention": dict(ch=32, ch_mult=[1, 1, 2], num_res_blocks=2, attn_resolutions=[16, 8],
                            resolution=32, z_channels=4, embed_dim=6, n_embed=64),
}


class TamingVQGAN(torch.nn.Module):
    """The tokenizer part of taming's VQModel (taming.models.vqgan needs Lightning, so assemble it here)."""

    def __init__(self, ddconfig, n_embed, embed_dim):
        super().__init__()
        self.encoder = taming_model.Encoder(**ddconfig)
        self.decoder = taming_model.Decoder(**ddconfig)
        self.quantize = taming_quantize.VectorQuantizer2(n_embed, embed_dim, beta=0.25)
        self.quant_conv = torch.nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
        self.post_quant_conv = torch.nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)

    def encode(self, x):
        quant, _, (_, _, indices) = self.quantize(self.quant_conv(self.encoder(x)))
        return quant, indices.view(x.shape[0], -1)

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))


def _ddconfig(arch):
    return dict(double_z=False, z_channels=arch["z_channels"], resolution=arch["resolution"], in_channels=3,
                out_ch=3, ch=arch["ch"], ch_mult=arch["ch_mult"], num_res_blocks=arch["num_res_blocks"],
                attn_resolutions=arch["attn_resolutions"], dropout=0.0)


def _perturb(model, seed):
    # Move every weight (norms and biases included) away from its init, so a swapped or missed tensor shows up.
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("embedding.weight"):
                param.copy_(noise)  # codes spread over the latent scale so many entries are used
            elif "norm" in name and name.endswith("weight"):
                param.copy_(1 + 0.3 * noise)
            else:
                param.add_(0.05 * noise)
    return model.eval()


def _write_taming(tmp_path, arch, seed=0, extra_keys=None, drop_keys=()):
    ddconfig = _ddconfig(arch)
    torch.manual_seed(seed)
    model = _perturb(TamingVQGAN(ddconfig, arch["n_embed"], arch["embed_dim"]), seed)
    state_dict = dict(model.state_dict())
    state_dict["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)  # training-only, must be ignored
    state_dict.update(extra_keys or {})
    for key in drop_keys:
        del state_dict[key]
    checkpoint, config = tmp_path / "model.ckpt", tmp_path / "model.yaml"
    torch.save({"state_dict": state_dict, "global_step": 7}, checkpoint)
    params = {"embed_dim": arch["embed_dim"], "n_embed": arch["n_embed"], "ddconfig": ddconfig,
              "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator"}}
    config.write_text(yaml.safe_dump({"model": {"target": "taming.models.vqgan.VQModel", "params": params}}))
    return model, str(checkpoint), str(config)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_conversion_matches_taming(tmp_path, name):
    arch = ARCHITECTURES[name]
    taming, checkpoint, config = _write_taming(tmp_path, arch)
    converted = convert_vqgan.convert_taming_vqgan(checkpoint, config)
    # float64 on both sides: a wrong mapping shows up as O(1) errors, while float32 kernel differences
    # (SDPA vs bmm attention) would otherwise sit right at the 1e-5 tolerance.
    taming, converted = taming.double(), converted.double()

    images = torch.rand(2, 3, arch["resolution"], arch["resolution"], generator=torch.Generator().manual_seed(1))
    images = (images * 2 - 1).double()
    with torch.no_grad():
        quant, taming_codes = taming.encode(images)
        taming_images = taming.decode(quant)
    codes, _ = encode_to_codes(converted, images)
    assert torch.equal(codes, taming_codes)
    assert len(codes.unique()) > 1, "degenerate test: every position got the same code"
    decoded = decode_codes(converted, codes)
    torch.testing.assert_close(decoded, taming_images, atol=1e-5, rtol=0)


def test_attention_levels_follow_attn_resolutions():
    config = convert_vqgan.vqmodel_config_from_taming(_ddconfig(ARCHITECTURES["level-attention"]), 64, 6)
    assert config["down_block_types"] == ["DownEncoderBlock2D", "AttnDownEncoderBlock2D", "AttnDownEncoderBlock2D"]
    assert config["up_block_types"] == ["AttnUpDecoderBlock2D", "AttnUpDecoderBlock2D", "UpDecoderBlock2D"]


def test_readme_f16_16384_config():
    # The taming-transformers ImageNet f16 16384 VQGAN (vqgan_imagenet_f16_16384).
    ddconfig = dict(double_z=False, z_channels=256, resolution=256, in_channels=3, out_ch=3, ch=128,
                    ch_mult=[1, 1, 2, 2, 4], num_res_blocks=2, attn_resolutions=[16], dropout=0.0)
    config = convert_vqgan.vqmodel_config_from_taming(ddconfig, 16384, 256)
    assert config["block_out_channels"] == [128, 128, 256, 256, 512]
    assert config["down_block_types"][-1] == "AttnDownEncoderBlock2D"
    assert config["down_block_types"][:-1] == ["DownEncoderBlock2D"] * 4
    assert config["up_block_types"] == ["AttnUpDecoderBlock2D"] + ["UpDecoderBlock2D"] * 4
    assert (config["num_vq_embeddings"], config["vq_embed_dim"], config["latent_channels"]) == (16384, 256, 256)
    assert config["layers_per_block"] == 2 and config["scaling_factor"] == 1.0
    # Key mapping covers the 2 + 1 decoder resnets per level and the reversed up levels.
    mapping = convert_vqgan.taming_to_diffusers_keys(config)
    assert mapping["decoder.up.4.block.2.conv1.weight"] == "decoder.up_blocks.0.resnets.2.conv1.weight"
    assert mapping["decoder.up.4.attn.2.proj_out.weight"] == "decoder.up_blocks.0.attentions.2.to_out.0.weight"
    assert mapping["decoder.up.1.upsample.conv.bias"] == "decoder.up_blocks.3.upsamplers.0.conv.bias"


def test_unrepresentable_config_is_an_error():
    ddconfig = _ddconfig(ARCHITECTURES["mid-only"])
    with pytest.raises(ValueError, match="ch_mult"):
        convert_vqgan.vqmodel_config_from_taming({**ddconfig, "ch_mult": [2, 2]}, 32, 4)
    with pytest.raises(ValueError, match="resamp_with_conv"):
        convert_vqgan.vqmodel_config_from_taming({**ddconfig, "resamp_with_conv": False}, 32, 4)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    arch = ARCHITECTURES["mid-only"]
    _, checkpoint, config = _write_taming(
        tmp_path, arch, extra_keys={"encoder.extra.weight": torch.zeros(1)},
        drop_keys=("decoder.mid.attn_1.q.bias",),
    )
    with pytest.raises(ValueError) as error:
        convert_vqgan.convert_taming_vqgan(checkpoint, config)
    assert "decoder.mid.attn_1.q.bias" in str(error.value)
    assert "encoder.extra.weight" in str(error.value)
    assert "loss." not in str(error.value)


def test_wrong_shape_is_listed(tmp_path):
    arch = ARCHITECTURES["mid-only"]
    _, checkpoint, config = _write_taming(tmp_path, arch)
    params = yaml.safe_load(open(config))
    params["model"]["params"]["n_embed"] = 16  # the checkpoint holds 32 codes
    with open(config, "w") as handle:
        yaml.safe_dump(params, handle)
    with pytest.raises(ValueError, match="quantize.embedding.weight"):
        convert_vqgan.convert_taming_vqgan(checkpoint, config)


def test_bare_state_dict_and_script(tmp_path, monkeypatch):
    from diffusers import VQModel

    arch = ARCHITECTURES["mid-only"]
    taming, _, config = _write_taming(tmp_path, arch)
    bare = tmp_path / "bare.pt"
    torch.save(taming.state_dict(), bare)
    output = tmp_path / "converted"
    script = os.path.join(REPO_ROOT, "conversion", "convert_taming_vqgan.py")
    argv = [script, "--checkpoint", str(bare), "--config", config, "--output", str(output)]
    # Run the thin script as __main__ in this interpreter (a subprocess would re-import torch: seconds).
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(script, run_name="__main__")
    assert exit_info.value.code == 0
    assert (output / "diffusion_pytorch_model.safetensors").exists()
    reloaded = VQModel.from_pretrained(output)
    torch.testing.assert_close(reloaded.quantize.embedding.weight, taming.quantize.embedding.weight)
