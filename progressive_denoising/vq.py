"""Helpers around a `diffusers.VQModel` used as the image tokenizer of PDM.

Images are float tensors (B, 3, H, W) in [-1, 1]; codes are LongTensors (B, h*w) in row-major order over the
(h, w) token grid, where h = H / f and w = W / f with f = 2 ** (len(block_out_channels) - 1).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image

# Rows of the (N, K) distance matrix computed at once: bounds memory to ~N_CHUNK * K * 4 bytes
# (16384 codes -> 256 MiB), so large batches do not blow up GPU memory.
_DISTANCE_CHUNK_ROWS = 4096


def downsampling_factor(vqvae) -> int:
    """The spatial downsampling factor f of the VQ model (one halving per encoder level but the last)."""
    return 2 ** (len(vqvae.config.block_out_channels) - 1)


def codebook_size(vqvae) -> int:
    """Number of codebook entries K; codes are 0..K-1."""
    return int(vqvae.config.num_vq_embeddings)


def vq_grid(vqvae, resolution: int | Sequence[int]) -> tuple[int, int]:
    """The token grid (h, w) for images of `resolution` (an int for square images, or (H, W))."""
    height, width = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    factor = downsampling_factor(vqvae)
    if height % factor or width % factor:
        raise ValueError(
            f"resolution {height}x{width} is not a multiple of the VQ model's downsampling factor {factor}"
        )
    return height // factor, width // factor


def _model_device_dtype(vqvae) -> tuple[torch.device, torch.dtype]:
    parameter = next(vqvae.parameters())
    return parameter.device, parameter.dtype


def _check_images(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [-1, 1], got dtype {images.dtype}")


def nearest_codes(latents: torch.Tensor, codebook: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest codebook entry of each latent vector.

    Args:
        latents: (N, D) vectors (any float dtype; computed in float32).
        codebook: (K, D) codebook.

    Returns:
        codes (N,) int64 and the L2 distance (N,) float32 from each vector to its code.
    """
    latents = latents.float()
    codebook = codebook.float().to(latents.device)
    codebook_sq = codebook.pow(2).sum(dim=1)
    codes = []
    for chunk in latents.split(_DISTANCE_CHUNK_ROWS):
        # Same expansion (|z|^2 + |e|^2 - 2 z.e) as taming's VectorQuantizer2, so ties resolve like the original.
        distances = chunk.pow(2).sum(dim=1, keepdim=True) + codebook_sq - 2 * chunk @ codebook.t()
        codes.append(distances.argmin(dim=1))
    codes = torch.cat(codes) if codes else torch.zeros(0, dtype=torch.long, device=latents.device)
    # The expansion loses precision for the distance itself; recompute it directly from the chosen code.
    errors = (latents - codebook[codes]).norm(dim=1)
    return codes, errors


@torch.no_grad()
def encode_to_codes(vqvae, images: torch.Tensor) -> tuple[torch.LongTensor, torch.FloatTensor]:
    """Tokenize images into VQ codes.

    Args:
        vqvae: a `diffusers.VQModel` (any device and dtype).
        images: (B, 3, H, W) float tensor in [-1, 1]; H and W multiples of the downsampling factor.

    Returns:
        codes: (B, h*w) int64 codes, row-major over the (h, w) grid, on the model's device.
        quant_error: (B, h*w) float32 L2 distance from the encoder output (after `quant_conv`) to its code.
    """
    _check_images(images)
    device, dtype = _model_device_dtype(vqvae)
    latents = vqvae.encode(images.to(device=device, dtype=dtype)).latents  # (B, D, h, w)
    batch, dim = latents.shape[:2]
    flat = latents.permute(0, 2, 3, 1).reshape(-1, dim)  # row-major over (h, w)
    codes, errors = nearest_codes(flat, vqvae.quantize.embedding.weight)
    return codes.view(batch, -1), errors.view(batch, -1)


def _grid_for(num_tokens: int, grid: Sequence[int] | None) -> tuple[int, int]:
    if grid is not None:
        height, width = (int(grid[0]), int(grid[1]))
        if height * width != num_tokens:
            raise ValueError(f"grid {height}x{width} does not hold {num_tokens} codes")
        return height, width
    side = math.isqrt(num_tokens)
    if side * side != num_tokens:
        raise ValueError(f"{num_tokens} codes do not form a square grid; pass grid=(h, w)")
    return side, side


@torch.no_grad()
def decode_codes(vqvae, codes: torch.Tensor, grid: Sequence[int] | None = None) -> torch.Tensor:
    """Decode VQ codes back to images.

    Args:
        vqvae: a `diffusers.VQModel`.
        codes: (B, h*w) integer codes in [0, K), row-major.
        grid: (h, w); defaults to a square grid.

    Returns:
        (B, 3, H, W) images in the model's dtype, nominally in [-1, 1] (not clamped; see `postprocess_images`).
    """
    if not torch.is_tensor(codes) or codes.ndim != 2 or codes.is_floating_point():
        shape = tuple(codes.shape) if torch.is_tensor(codes) else type(codes).__name__
        raise ValueError(f"codes must be an integer tensor of shape (B, h*w), got {shape}")
    size = codebook_size(vqvae)
    if codes.numel() and (codes.min() < 0 or codes.max() >= size):
        raise ValueError(f"codes must lie in [0, {size}), got range [{int(codes.min())}, {int(codes.max())}]")
    height, width = _grid_for(codes.shape[1], grid)
    device, _ = _model_device_dtype(vqvae)
    quant = vqvae.quantize.embedding(codes.to(device).long())  # (B, h*w, D)
    quant = quant.view(codes.shape[0], height, width, -1).permute(0, 3, 1, 2).contiguous()
    # Mirrors VQModel.decode without its quantize step, whose behaviour depends on `lookup_from_codebook`.
    hidden = vqvae.post_quant_conv(quant)
    spatial = quant if vqvae.config.norm_type == "spatial" else None
    return vqvae.decoder(hidden, spatial)


def _resize_and_crop(image: Image.Image, resolution: int) -> Image.Image:
    width, height = image.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    image = image.resize(new_size, resample=Image.BICUBIC, reducing_gap=None)
    left = (new_size[0] - resolution) // 2
    top = (new_size[1] - resolution) // 2
    return image.crop((left, top, left + resolution, top + resolution))


def preprocess_images(pil_images, resolution: int) -> torch.Tensor:
    """PIL image(s) -> (B, 3, resolution, resolution) float32 tensor in [-1, 1].

    Each image is converted to RGB, resized so its shorter side is `resolution` (bicubic) and centre-cropped.
    """
    if isinstance(pil_images, Image.Image):
        pil_images = [pil_images]
    if not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    arrays = []
    for image in pil_images:
        if not isinstance(image, Image.Image):
            raise ValueError(f"expected PIL images, got {type(image).__name__}")
        image = _resize_and_crop(image.convert("RGB"), resolution)
        arrays.append(np.asarray(image, dtype=np.float32))
    if not arrays:
        return torch.zeros(0, 3, resolution, resolution)
    batch = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    return batch / 127.5 - 1.0


def postprocess_images(images: torch.Tensor, output_type: str = "pil"):
    """(B, 3, H, W) tensor in [-1, 1] -> images in [0, 1].

    Returns a list of PIL images ("pil"), a float32 array (B, H, W, 3) ("np") or a float32 tensor
    (B, 3, H, W) on the input's device ("pt").
    """
    if output_type not in ("pil", "np", "pt"):
        raise ValueError(f"output_type must be 'pil', 'np' or 'pt', got {output_type!r}")
    images = (images.detach().float().clamp(-1, 1) + 1) / 2
    if output_type == "pt":
        return images
    array = images.permute(0, 2, 3, 1).cpu().numpy()
    if output_type == "np":
        return array
    return [Image.fromarray((frame * 255).round().astype(np.uint8)) for frame in array]
