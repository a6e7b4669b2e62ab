"""How faithful and how canonical a VQ model is on PDM-Shapes test images.

    python -m benchmarks.vq_check --vqvae runs/vq32-f4 --recogniser progressive_denoising/bundled/pdm-shapes/recogniser \
        --data runs/shapes32

Prints the recogniser's scores of the reconstructions (alignment, held-out pairs, attribute credit, FID against the
real images), the share of pixels within 40/255 of the original on every channel, the share of images with any
pixel further off, and how canonical the codes are: H(code | patch), the entropy in nats of the code given the exact
pixels of its patch (0 when every patch has one code), and how many different codes encode the all-black patch.
A generator over many codes for one patch spends its probability on choices that decode alike.
"""

import argparse
import collections

import numpy as np
import torch
from diffusers import VQModel

from progressive_denoising.pdm_shapes import metrics
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser
from benchmarks.shapes_tables import vq_round_trip  # the reconstructions of the tables' "VQ reconstruction" row


def code_entropy_given_patch(pixels, codes):
    """(H(code | exact patch pixels) in nats, number of codes of the all-black patch); pixels (N, H, W, 3) uint8."""
    n, size = len(pixels), pixels.shape[1]
    grid = int(codes.shape[1] ** 0.5)
    f = size // grid
    patches = pixels.reshape(n, grid, f, grid, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, grid * grid, -1)
    counts = collections.defaultdict(collections.Counter)
    for image_patches, image_codes in zip(patches, codes):
        for patch, code in zip(image_patches, image_codes):
            counts[patch.tobytes()][code] += 1
    total = patches.shape[0] * patches.shape[1]
    entropy = 0.0
    for counter in counts.values():
        seen = sum(counter.values())
        p = np.array(list(counter.values())) / seen
        entropy += seen / total * float(-(p * np.log(p)).sum())
    return entropy, len(counts[bytes(patches.shape[-1])])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vqvae", required=True, help="a VQModel folder")
    parser.add_argument("--recogniser", required=True)
    parser.add_argument("--data", required=True, help="PDM-Shapes folder (its test split is used)")
    args = parser.parse_args(argv)
    torch.set_grad_enabled(False)
    vqvae = VQModel.from_pretrained(args.vqvae).eval()
    recogniser = ShapesRecogniser.from_pretrained(args.recogniser)
    real = metrics.load_split(args.data, "test")
    images, captions = [image.convert("RGB") for image in real["image"]], list(real["caption"])
    codes, reconstructions = vq_round_trip(vqvae, images, batch_size=200)
    codes = codes.numpy()
    original = np.stack([np.asarray(image) for image in images])
    difference = np.abs(original.astype(int) - np.stack([np.asarray(image) for image in reconstructions]).astype(int))
    off = difference.max(-1) > 40
    scores = metrics.evaluate_images(recogniser, reconstructions, captions, images)
    entropy, black_codes = code_entropy_given_patch(original, codes)
    print("reconstructions:", {key: round(value, 4) if isinstance(value, float) else value
                               for key, value in scores.items()})
    print(f"pixels within 40: {1 - off.mean():.5f}, images with a pixel further off: {off.any((1, 2)).mean():.3f}")
    print(f"H(code | patch): {entropy:.3f} nats, codes of the black patch: {black_codes}, "
          f"codes used: {len(np.unique(codes))} of {vqvae.config.num_vq_embeddings}")


if __name__ == "__main__":
    main()
