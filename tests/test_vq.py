"""VQ helpers: codes and quantization errors against a direct computation, decoding, image pre/post-processing."""

import numpy as np
import pytest
import torch
from diffusers import VQModel
from PIL import Image

from progressive_denoising.vq import (
    codebook_size,
    decode_codes,
    encode_to_codes,
    nearest_codes,
    postprocess_images,
    preprocess_images,
    vq_grid,
)


@pytest.fixture(scope="module")
def vqvae():
    torch.manual_seed(0)
    model = VQModel(
        block_out_channels=(32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
        num_vq_embeddings=24, vq_embed_dim=3, sample_size=16,
    )
    with torch.no_grad():
        # A codebook on the latents' scale, so that several codes are in use.
        model.quantize.embedding.weight.normal_()
    return model.eval()


def _images(batch=3, size=16, seed=0):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_codes_and_errors_match_direct_computation(vqvae):
    images = _images()
    codes, errors = encode_to_codes(vqvae, images)
    assert codes.shape == errors.shape == (3, 16)
    assert codes.dtype == torch.long and errors.dtype == torch.float32
    with torch.no_grad():
        latents = vqvae.encode(images).latents  # (B, D, h, w)
    flat = latents.permute(0, 2, 3, 1).reshape(3, 16, -1)  # row-major over the grid
    distances = torch.cdist(flat, vqvae.quantize.embedding.weight[None].expand(3, -1, -1))
    torch.testing.assert_close(errors, distances.min(dim=-1).values, atol=1e-5, rtol=1e-5)
    assert torch.equal(codes, distances.argmin(dim=-1))
    assert len(codes.unique()) > 1


def test_decode_matches_vqmodel_decode(vqvae):
    images = _images()
    codes, _ = encode_to_codes(vqvae, images)
    with torch.no_grad():
        reference = vqvae.decode(vqvae.encode(images).latents).sample  # quantizes internally
    torch.testing.assert_close(decode_codes(vqvae, codes), reference, atol=1e-5, rtol=1e-5)


def test_rectangular_grid_and_errors(vqvae):
    images = torch.rand(2, 3, 8, 16) * 2 - 1
    codes, _ = encode_to_codes(vqvae, images)
    assert codes.shape == (2, 8)
    assert decode_codes(vqvae, codes, grid=(2, 4)).shape == (2, 3, 8, 16)
    with pytest.raises(ValueError, match="square"):
        decode_codes(vqvae, codes)
    with pytest.raises(ValueError, match=r"\[0, 24\)"):
        decode_codes(vqvae, torch.full((1, 4), 24))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        encode_to_codes(vqvae, torch.zeros(1, 16, 16))


def test_grid_and_codebook_size(vqvae):
    assert vq_grid(vqvae, 16) == (4, 4)
    assert vq_grid(vqvae, (8, 32)) == (2, 8)
    assert codebook_size(vqvae) == 24
    with pytest.raises(ValueError, match="multiple"):
        vq_grid(vqvae, 18)


def test_nearest_codes_chunks_agree():
    latents, codebook = torch.randn(5000, 3), torch.randn(40, 3)  # more rows than one distance chunk
    codes, errors = nearest_codes(latents, codebook)
    distances = torch.cdist(latents, codebook)
    assert torch.equal(codes, distances.argmin(dim=1))
    torch.testing.assert_close(errors, distances.min(dim=1).values, atol=1e-5, rtol=1e-5)


def test_preprocess_resizes_shorter_side_and_centre_crops():
    # Left third red, middle third green, right third blue: the centre crop of a 3:1 image is all green.
    array = np.zeros((20, 60, 3), dtype=np.uint8)
    array[:, :20, 0], array[:, 20:40, 1], array[:, 40:, 2] = 255, 255, 255
    batch = preprocess_images([Image.fromarray(array), Image.fromarray(array).convert("L")], 10)
    assert batch.shape == (2, 3, 10, 10) and batch.dtype == torch.float32
    assert batch.min() >= -1 and batch.max() <= 1
    green = batch[0, :, 2:8, 2:8].mean(dim=(1, 2))
    torch.testing.assert_close(green, torch.tensor([-1.0, 1.0, -1.0]), atol=0.02, rtol=0)


def test_postprocess_output_types():
    images = torch.tensor([-2.0, -1.0, 0.0, 1.0, 3.0]).view(1, 1, 1, 5).expand(2, 3, 1, 5)
    pt = postprocess_images(images, "pt")
    assert torch.equal(pt[0, 0, 0], torch.tensor([0.0, 0.0, 0.5, 1.0, 1.0]))
    assert postprocess_images(images, "np").shape == (2, 1, 5, 3)
    pil = postprocess_images(images, "pil")
    assert len(pil) == 2 and pil[0].size == (5, 1) and pil[0].getpixel((4, 0)) == (255, 255, 255)
    with pytest.raises(ValueError, match="output_type"):
        postprocess_images(images, "latent")
