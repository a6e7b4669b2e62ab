"""training/train_vqvae.py: a few steps on a tiny PDM-Shapes set give a loadable VQModel and its metrics."""

import json
import os

import pytest
import torch

from progressive_denoising.pdm_shapes import data as shapes_data
from training import options, train_vqvae

TINY = ["--resolution", "32", "--block_out_channels", "16", "16", "16", "--norm_num_groups", "8", "--num_codes", "32",
        "--code_dim", "4", "--latent_channels", "4", "--train_batch_size", "8"]


def test_a_few_steps_write_a_loadable_vqmodel(tmp_path, capsys):
    from diffusers import VQModel

    data = tmp_path / "shapes"
    shapes_data.make_shapes_dataset(24, seed=0, size=32, num_validation=8, num_test=1).save_to_disk(str(data))
    out = tmp_path / "vq"
    assert train_vqvae.main(["--dataset", str(data), "--output_dir", str(out), "--max_train_steps", "4", *TINY]) == 0
    assert os.path.isfile(out / "diffusion_pytorch_model.safetensors")
    metrics = json.loads((out / "training_metrics.json").read_text())
    assert metrics["psnr"] > 0 and 0 < metrics["codebook_usage"] <= 1
    assert metrics["token_grid"] == [8, 8]  # three blocks: downsampling factor 4
    printed = capsys.readouterr()
    assert "PSNR" in printed.out and "codebook usage" in printed.out and f"saved the VQModel to {out}" in printed.out
    assert "steps: 100%" in printed.err and "resets=" in printed.err  # the progress bar
    model = VQModel.from_pretrained(str(out))
    with torch.no_grad():
        recon = model(torch.zeros(1, 3, 32, 32)).sample
    assert recon.shape == (1, 3, 32, 32)


def test_default_architecture_gives_16x16_codes_at_64():
    model = train_vqvae.build_model(train_vqvae.Options())
    with torch.no_grad():
        latents = model.encode(torch.zeros(1, 3, 64, 64)).latents
    assert latents.shape[-2:] == (16, 16)
    assert 256 <= model.config.num_vq_embeddings <= 512


def test_dead_codes_are_reset_to_recent_encoder_outputs():
    guard = train_vqvae.DeadCodeGuard(num_codes=4, dead_after=3)
    embedding = torch.nn.Embedding(4, 2)
    latents = torch.full((1, 2, 1, 2), 7.0)
    guard.observe(1, latents, torch.tensor([[[0, 1]]]))
    assert guard.reset_dead(2, embedding, torch.Generator().manual_seed(0)) == 0
    guard.observe(3, latents, torch.tensor([[[0, 0]]]))
    assert guard.reset_dead(4, embedding, torch.Generator().manual_seed(0)) == 3  # codes 1, 2, 3
    assert torch.equal(embedding.weight[1:], torch.full((3, 2), 7.0))


@pytest.mark.parametrize("argv, words", [
    (["--block_out_channels", "a", "b"], ["--block_out_channels", "'a'"]),
    (["--max_train_steps", "0"], ["'max_train_steps'", "positive"]),
    (["--merge_purity", "0.9", "--merge_steps", "20000"], ["'merge_steps'"]),
    (["--codebook_init", "zeros"], ["'codebook_init'"]),
    (["--steps", "3"], ["--steps is now --max_train_steps"]),
    (["--output", "o"], ["--output is now --output_dir"]),
    (["--lr", "1"], ["--lr is now --learning_rate"]),
])
def test_bad_options_are_rejected(argv, words):
    with pytest.raises(ValueError) as error:
        options.parse_options(train_vqvae.Options, ["--dataset", "d", "--output_dir", "o", *argv],
                              check=train_vqvae.check_options)
    assert all(word in str(error.value) for word in words), str(error.value)


def test_mid_block_attention_takes_a_boolean():
    for argv, expected in (([], True), (["--mid_block_attention", "0"], False), (["--no_mid_block_attention"], False)):
        assert options.parse_options(train_vqvae.Options, argv).mid_block_attention is expected
