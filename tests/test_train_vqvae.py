"""training/train_vqvae.py: a few steps on a tiny PDM-Shapes set give a loadable VQModel and its metrics."""

import importlib.util
import json
import os

import pytest
import torch

from progressive_denoising.pdm_shapes import data as shapes_data

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "training", "train_vqvae.py")


@pytest.fixture(scope="module")
def train_vqvae():
    spec = importlib.util.spec_from_file_location("train_vqvae", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--resolution", "32", "--block_out_channels", "16,16,16", "--norm_num_groups", "8", "--num_codes", "32",
        "--code_dim", "4", "--latent_channels", "4", "--batch_size", "8", "--log_every", "2"]


def test_a_few_steps_write_a_loadable_vqmodel(train_vqvae, tmp_path, capsys):
    from diffusers import VQModel

    data = tmp_path / "shapes"
    shapes_data.make_shapes_dataset(24, seed=0, size=32, num_validation=8, num_test=1).save_to_disk(str(data))
    out = tmp_path / "vq"
    assert train_vqvae.main(["--data", str(data), "--output", str(out), "--steps", "4", *TINY]) == 0
    assert os.path.isfile(out / "diffusion_pytorch_model.safetensors")
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["psnr"] > 0 and 0 < metrics["codebook_usage"] <= 1
    assert metrics["token_grid"] == [8, 8]  # three blocks: downsampling factor 4
    printed = capsys.readouterr().out
    assert "PSNR" in printed and "codebook usage" in printed
    model = VQModel.from_pretrained(str(out))
    with torch.no_grad():
        recon = model(torch.zeros(1, 3, 32, 32)).sample
    assert recon.shape == (1, 3, 32, 32)


def test_default_architecture_gives_16x16_codes_at_64(train_vqvae):
    args = train_vqvae.parse_args(["--data", "unused", "--output", "unused"])
    model = train_vqvae.build_model(args)
    with torch.no_grad():
        latents = model.encode(torch.zeros(1, 3, 64, 64)).latents
    assert latents.shape[-2:] == (16, 16)
    assert 256 <= model.config.num_vq_embeddings <= 512


def test_dead_codes_are_reset_to_recent_encoder_outputs(train_vqvae):
    guard = train_vqvae.DeadCodeGuard(num_codes=4, dead_after=3)
    embedding = torch.nn.Embedding(4, 2)
    latents = torch.full((1, 2, 1, 2), 7.0)
    guard.observe(1, latents, torch.tensor([[[0, 1]]]))
    assert guard.reset_dead(2, embedding, torch.Generator().manual_seed(0)) == 0
    guard.observe(3, latents, torch.tensor([[[0, 0]]]))
    assert guard.reset_dead(4, embedding, torch.Generator().manual_seed(0)) == 3  # codes 1, 2, 3
    assert torch.equal(embedding.weight[1:], torch.full((3, 2), 7.0))


def test_bad_options_are_rejected(train_vqvae):
    with pytest.raises(SystemExit):
        train_vqvae.parse_args(["--data", "d", "--output", "o", "--block_out_channels", "a,b"])
    with pytest.raises(SystemExit):
        train_vqvae.parse_args(["--data", "d", "--output", "o", "--steps", "0"])
