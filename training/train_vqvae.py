"""Train a `diffusers.VQModel` image tokenizer (a VQ-VAE) on an image data set.

Losses: reconstruction (L1 + MSE on images in [-1, 1]) + codebook (codes move to the encoder outputs) +
commitment (encoder outputs stay near their codes, weight `--beta`). The losses are computed here rather than
taken from `VQModel`: its quantizer runs in diffusers' "legacy" mode, which puts `beta` on the codebook term
instead of the commitment term.

Codebook: initialised from encoder outputs by k-means++ seeding (each next code drawn with probability proportional
to its squared distance from the codes so far), and every `--dead_check_every` steps codes not chosen during the last
`--dead_after` steps are moved to the recent encoder outputs farthest from every code. Both keep codes where the
data differ rather than where they are frequent: on PDM-Shapes three quarters of the patches are black, and codes
drawn uniformly from encoder outputs split the black patches into dozens of interchangeable codes (86 codes for
one all-black patch), which a generator then has to tell apart for nothing.

At the end it reports reconstruction PSNR and codebook usage (share of codes used) on the validation split and
saves the model with `save_pretrained` (safetensors) plus `training_metrics.json`.

Example (PDM-Shapes at 64x64 -> 16x16 codes, 512 codes):

    pdm make-shapes --out data/shapes --num-train 20000 --seed 0
    python -m training.train_vqvae --dataset data/shapes --output_dir models/vq-shapes --max_train_steps 20000 \
        --device cuda

Every option can also be set in a YAML file (`--config FILE.yaml`; the command line wins).
"""

import dataclasses
import json
import os
import sys
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers.hf_argparser import HfArg

from progressive_denoising.commands.base import run_script
from progressive_denoising.files import check_local_or_hub, check_output_folder
from training import loop, options

CODEBOOK_INITS = ("kmeans++", "random")
RESETS = ("farthest", "random")


@dataclasses.dataclass
class Options:
    dataset: Optional[str] = HfArg(default=None, help="save_to_disk folder (Dataset or DatasetDict), or a "
                                   "`datasets.load_dataset` name (required)")
    output_dir: Optional[str] = HfArg(default=None, help="folder to save the VQModel in (required)")
    overwrite: bool = HfArg(default=False, help="replace output_dir if it exists and is not empty")
    image_column: str = HfArg(default="image", help="column of the images")
    train_split: str = HfArg(default="train", help="split to train on")
    validation_split: str = HfArg(default="validation", help="split for PSNR/usage; if missing, the last 5%% of the "
                                  "train split is held out")
    resolution: int = HfArg(default=64, help="images are resized to this square side")
    max_train_steps: int = HfArg(default=10000, help="optimizer steps")
    train_batch_size: int = HfArg(default=64, help="images per step")
    learning_rate: float = HfArg(default=2e-4, help="start of the cosine schedule (which ends at a tenth of it)")
    num_codes: int = HfArg(default=512, help="codebook size")
    code_dim: int = HfArg(default=16, help="dimension of a code vector (vq_embed_dim)")
    latent_channels: int = HfArg(default=16, help="channels of the encoder output")
    block_out_channels: List[int] = HfArg(default_factory=lambda: [64, 128, 128],
                                          help="n entries give a downsampling factor of 2**(n-1)")
    layers_per_block: int = HfArg(default=1, help="resnet layers per block")
    norm_num_groups: int = HfArg(default=32, help="groups of the group norms")
    beta: float = HfArg(default=0.25, help="commitment loss weight")
    foreground_weight: float = HfArg(default=1.0, help="weight of the reconstruction loss on non-black pixels and "
                                     "their neighbours (PDM-Shapes is mostly background, so small objects and their "
                                     "exact colours matter little to an unweighted loss)")
    dead_after: int = HfArg(default=200, help="steps without use before a code is reset")
    dead_check_every: int = HfArg(default=100, help="steps between looks for dead codes")
    codebook_init: str = HfArg(default="kmeans++", help="seed the codebook by k-means++, or (random) with encoder "
                               "outputs drawn uniformly")
    reset_to: str = HfArg(default="farthest", help="move dead codes to the recent encoder outputs farthest from every "
                          "code, or to random ones")
    merge_purity: float = HfArg(default=0.0, help="before the last merge_steps, tie together codes that encode the "
                                "same image patch in at least this share of their uses (e.g. 0.9); 0 turns merging off")
    merge_steps: int = HfArg(default=500, help="steps trained after merging (without resets)")
    mid_block_attention: bool = HfArg(default=True, help="self-attention in the middle blocks (diffusers' default); "
                                      "without it a code depends only on its neighbourhood, not on the whole image")
    max_eval_images: int = HfArg(default=2000, help="validation images for PSNR and codebook usage")
    device: str = HfArg(default="cpu", help="cpu, or cuda: Accelerate places the model on the GPU")
    seed: int = HfArg(default=0, help="seeds the model and every draw")


def check_options(o):
    options.check_required(o, "dataset", "output_dir")
    options.check_positive(o, "max_train_steps", "train_batch_size", "num_codes", "code_dim", "resolution",
                           "dead_after", "dead_check_every")
    if not o.block_out_channels or min(o.block_out_channels) < 1:
        raise ValueError(f"option 'block_out_channels' must be positive integers, got {o.block_out_channels!r}")
    options.check_choice("codebook_init", o.codebook_init, CODEBOOK_INITS)
    options.check_choice("reset_to", o.reset_to, RESETS)
    options.check_range("merge_purity", o.merge_purity, 0.0, 1.0)
    if o.merge_purity > 0 and not 0 < o.merge_steps < o.max_train_steps:
        raise ValueError(f"option 'merge_steps' must be between 1 and max_train_steps - 1 = {o.max_train_steps - 1}, "
                         f"got {o.merge_steps}")


def check_paths(o):
    """Paths before any work: a missing data folder, an output that would be replaced."""
    check_local_or_hub("--dataset", o.dataset)
    check_output_folder("--output_dir", o.output_dir, o.overwrite, make_parents=True)


def load_images(data, image_column, train_split, validation_split, resolution):
    """Load the train and validation images as (N, 3, R, R) uint8 tensors.

    `data` is a `save_to_disk` folder or a `datasets.load_dataset` name (with no network, only local data works).
    """
    import datasets

    loaded = datasets.load_from_disk(data) if os.path.isdir(data) else datasets.load_dataset(data)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({train_split: loaded})
    if train_split not in loaded:
        raise ValueError(f"option 'train_split': {train_split!r} not in {data} (has {list(loaded)})")
    if image_column not in loaded[train_split].column_names:
        raise ValueError(f"option 'image_column': {image_column!r} not in {data} (has "
                         f"{loaded[train_split].column_names})")
    train = to_tensor(loaded[train_split][image_column], resolution)
    if validation_split in loaded:
        return train, to_tensor(loaded[validation_split][image_column], resolution)
    held = max(1, len(train) // 20)
    return train[:-held] if len(train) > held else train, train[-held:]


def to_tensor(images, resolution):
    """PIL images -> (N, 3, R, R) uint8, resized (bicubic) when their size differs."""
    arrays = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (resolution, resolution):
            image = image.resize((resolution, resolution), resample=3)
        arrays.append(np.asarray(image, dtype=np.uint8))
    if not arrays:
        raise ValueError("the data set has no images")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def build_model(o):
    from diffusers import VQModel

    n = len(o.block_out_channels)
    return VQModel(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(o.block_out_channels), layers_per_block=o.layers_per_block,
        latent_channels=o.latent_channels, vq_embed_dim=o.code_dim, num_vq_embeddings=o.num_codes,
        norm_num_groups=o.norm_num_groups, sample_size=o.resolution, mid_block_add_attention=o.mid_block_attention,
    )


def quantize(model, latents):
    """Nearest-code quantisation of encoder outputs (N, D, h, w).

    Returns (codes (N, D, h, w) with gradients to the codebook, indices (N, h, w)).
    """
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    indices = torch.cdist(flat, model.quantize.embedding.weight).argmin(1)
    n, d, h, w = latents.shape
    codes = model.quantize.embedding(indices).view(n, h, w, d).permute(0, 3, 1, 2)
    return codes, indices.view(n, h, w)


def training_losses(model, images, beta, foreground_weight=1.0):
    """Loss terms for (N, 3, R, R) images in [-1, 1]; also returns the encoder outputs and code indices."""
    latents = model.encode(images).latents
    codes, indices = quantize(model, latents)
    codebook = F.mse_loss(codes, latents.detach())
    commitment = beta * F.mse_loss(latents, codes.detach())
    straight_through = latents + (codes - latents).detach()
    recon = model.decode(straight_through, force_not_quantize=True).sample
    # Object pixels and the background pixels next to them: a small circle differs from a small square only in
    # its four black corner pixels, which a weight on object pixels alone would leave cheap to get wrong.
    foreground = (images > -1 + 1e-3).any(dim=1, keepdim=True).float()
    near_object = F.max_pool2d(foreground, kernel_size=3, stride=1, padding=1) > 0
    weight = torch.where(near_object, foreground_weight, 1.0)
    error = recon - images
    reconstruction = (weight * (error.abs() + error.pow(2))).mean() / weight.mean()
    return {"reconstruction": reconstruction, "codebook": codebook, "commitment": commitment}, latents, indices


class DeadCodeGuard:
    """Tracks when each code was last chosen and resets codes unused for `dead_after` steps to recent encoder
    outputs (kept in a buffer of `buffer_size` vectors): the farthest from every code, or random ones."""

    def __init__(self, num_codes, dead_after, buffer_size=8192, reset_to="farthest"):
        self.last_used = torch.zeros(num_codes, dtype=torch.long)
        self.dead_after = dead_after
        self.buffer_size = buffer_size
        self.reset_to = reset_to
        self.recent = None

    def observe(self, step, latents, indices):
        self.last_used[indices.flatten().unique().cpu()] = step
        flat = latents.detach().permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        self.recent = flat if self.recent is None else torch.cat([flat, self.recent])[: self.buffer_size]

    @torch.no_grad()
    def reset_dead(self, step, embedding, generator):
        """Re-initialise dead codes of `embedding` (an nn.Embedding); returns how many were reset."""
        dead = torch.nonzero(step - self.last_used >= self.dead_after).flatten()
        if len(dead) == 0 or self.recent is None:
            return 0
        if self.reset_to == "farthest":
            picks = farthest_points(self.recent, embedding.weight, len(dead))
        else:
            picks = torch.randint(0, len(self.recent), (len(dead),), generator=generator)
        embedding.weight[dead.to(embedding.weight.device)] = self.recent[picks.to(self.recent.device)]
        self.last_used[dead] = step
        return len(dead)


def farthest_points(points, codes, count):
    """Indices of `count` rows of `points` (N, D), each the farthest from `codes` (K, D) and from those picked before."""
    distance = torch.cdist(points, codes).min(1).values
    picks = []
    for _ in range(count):
        pick = int(distance.argmax())
        picks.append(pick)
        distance = torch.minimum(distance, (points - points[pick]).norm(dim=1))
    return torch.tensor(picks)


def kmeans_plus_plus(points, count, generator):
    """Indices of `count` rows of `points` (N, D) seeded by k-means++: each next one drawn with probability
    proportional to its squared distance from those drawn so far."""
    picks = [int(torch.randint(0, len(points), (1,), generator=generator))]
    distance = (points - points[picks[0]]).pow(2).sum(1)
    for _ in range(count - 1):
        if distance.sum() <= 0:  # fewer distinct points than codes: repeat uniformly drawn ones
            pick = int(torch.randint(0, len(points), (1,), generator=generator))
        else:
            pick = int(torch.multinomial(distance.cpu(), 1, generator=generator))
        picks.append(pick)
        distance = torch.minimum(distance, (points - points[pick]).pow(2).sum(1))
    return torch.tensor(picks)


@torch.no_grad()
def init_codebook(model, images, generator, method="kmeans++"):
    """Start the codebook at encoder outputs (k-means++ seeding, or uniformly drawn) so codes begin at the data."""
    latents = model.encode(images).latents
    flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
    if method == "kmeans++":
        picks = kmeans_plus_plus(flat, model.quantize.n_e, generator)
    else:
        picks = torch.randint(0, len(flat), (model.quantize.n_e,), generator=generator)
    model.quantize.embedding.weight.copy_(flat[picks.to(flat.device)])


@torch.no_grad()
def merge_look_alike_codes(model, images, purity, batch_size=256):
    """Tie together codes that stand for the same pixels; returns (K,) long: the code each code is tied to.

    Context (the encoder sees past a code's own patch) spreads one kind of patch over several codes: on PDM-Shapes
    an all-black patch got dozens. Which of them the encoder picks depends on the rest of the image, so a generator
    would have to predict it for nothing. Here a code's patch is the image patch (f x f pixels) it encodes most
    often; codes that encode that same patch in at least `purity` of their uses form one group. All codes of a group
    get the group's mean latent, so nearest-code search (which returns the lowest index on a tie, in diffusers'
    quantizer as here) sends the whole group to its lowest-indexed code. Codes that mix patches stay as they are.
    """
    factor = 2 ** (len(model.config.block_out_channels) - 1)
    codebook = model.quantize.embedding.weight
    num_codes, dim = codebook.shape
    # An exact patch as one integer: its uint8 pixels weighted by random 31-bit numbers (collisions are negligible).
    weights = torch.randint(1, 2**31, (3 * factor * factor,), generator=torch.Generator().manual_seed(0))
    codes, keys, latents = [], [], []
    for start in range(0, len(images), batch_size):
        pixels = images[start:start + batch_size]
        batch = pixels.to(codebook.device).float() / 127.5 - 1
        encoded = model.encode(batch).latents
        codes.append(quantize(model, encoded)[1].flatten().cpu())
        patches = F.unfold(pixels.float(), factor, stride=factor).transpose(1, 2).reshape(-1, len(weights))
        keys.append((patches.long() * weights).sum(1))
        latents.append(encoded.permute(0, 2, 3, 1).reshape(-1, dim).cpu())
    codes, keys, latents = torch.cat(codes), torch.cat(keys), torch.cat(latents)
    uses = torch.bincount(codes, minlength=num_codes)
    pairs, pair_counts = torch.unique(torch.stack([codes, keys], 1), dim=0, return_counts=True)
    # The most frequent patch of every code (on a tie, the smaller key).
    pair_code, pair_key = pairs[:, 0], pairs[:, 1]
    mode_count = torch.zeros(num_codes, dtype=torch.long).scatter_reduce(0, pair_code, pair_counts, "amax")
    is_mode = pair_counts == mode_count[pair_code]
    mode_key = torch.full((num_codes,), torch.iinfo(torch.long).max).scatter_reduce(
        0, pair_code[is_mode], pair_key[is_mode], "amin")
    pure = (uses > 0) & (mode_count >= purity * uses)
    tie = torch.arange(num_codes)
    latent_sum = torch.zeros(num_codes, dim).index_add_(0, codes, latents)
    for key in mode_key[pure].unique().tolist():
        members = pure & (mode_key == key)
        tie[members] = int(members.nonzero().min())
        codebook.data[members.to(codebook.device)] = (latent_sum[members].sum(0) / uses[members].sum()).to(codebook)
    return tie.to(codebook.device)


@torch.no_grad()
def evaluate(model, images, device, batch_size=64):
    """Reconstruction PSNR (dB, images in [0, 1], mean over images) and codebook usage on (N, 3, R, R) uint8."""
    model.eval()
    psnrs, used = [], torch.zeros(model.quantize.n_e, dtype=torch.bool)
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device).float() / 127.5 - 1
        latents = model.encode(batch).latents
        codes, indices = quantize(model, latents)
        recon = model.decode(codes, force_not_quantize=True).sample.clamp(-1, 1)
        mse = ((recon - batch) / 2).pow(2).flatten(1).mean(1).clamp_min(1e-10)
        psnrs.append(10 * torch.log10(1 / mse).cpu())
        used[indices.flatten().unique().cpu()] = True
    model.train()
    return {"psnr": float(torch.cat(psnrs).mean()), "codebook_usage": float(used.float().mean()),
            "codes_used": int(used.sum()), "num_codes": int(model.quantize.n_e),
            "token_grid": list(indices.shape[1:])}


def train(o):
    """Train, evaluate and save; returns the validation metrics dict."""
    accelerator = Accelerator(cpu=o.device == "cpu")
    if accelerator.num_processes > 1:
        raise ValueError("train_vqvae.py trains on one process: its losses call the VQModel's parts directly, which "
                         "DistributedDataParallel would not keep in sync; run it without `accelerate launch` "
                         "--num_processes")
    device = accelerator.device
    torch.manual_seed(o.seed)
    generator = torch.Generator().manual_seed(o.seed)
    train_images, validation_images = load_images(o.dataset, o.image_column, o.train_split, o.validation_split,
                                                  o.resolution)
    validation_images = validation_images[: o.max_eval_images]
    model = build_model(o).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=o.learning_rate, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=o.max_train_steps,
                                                          eta_min=o.learning_rate / 10)
    model, optimiser, schedule = accelerator.prepare(model, optimiser, schedule)
    guard = DeadCodeGuard(o.num_codes, o.dead_after, reset_to=o.reset_to)
    init_codebook(model, sample_batch(train_images, 4 * o.train_batch_size, generator, device), generator,
                  o.codebook_init)
    resets, tie = 0, None
    merge_at = o.max_train_steps - o.merge_steps if o.merge_purity > 0 else None
    progress = loop.progress_bar(accelerator, 0, o.max_train_steps)
    for step in range(1, o.max_train_steps + 1):
        if step == merge_at:
            tie = merge_look_alike_codes(model, train_images[:4096], o.merge_purity)
            loop.report(accelerator, f"step {step}: merged look-alike codes, {len(tie.unique())} distinct codes left")
        batch = sample_batch(train_images, o.train_batch_size, generator, device)
        losses, latents, indices = training_losses(model, batch, o.beta, o.foreground_weight)
        loss = sum(losses.values())
        optimiser.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimiser.step()
        schedule.step()
        if tie is not None:  # tied codes share one vector, so ties keep going to the lowest index
            with torch.no_grad():
                model.quantize.embedding.weight.copy_(model.quantize.embedding.weight[tie])
        guard.observe(step, latents, indices)
        # No resets in the last fifth (a reset code needs steps to settle before the model is saved), nor after a
        # merge (it would split the merged codes again).
        if step % o.dead_check_every == 0 and step <= 0.8 * o.max_train_steps and tie is None:
            resets += guard.reset_dead(step, model.quantize.embedding, generator)
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}", resets=resets,
                             refresh=False)
    progress.close()
    metrics = evaluate(model, validation_images, device)
    metrics.update({"steps": o.max_train_steps, "dead_codes_reset": resets,
                    "distinct_codes": None if tie is None else len(tie.unique())})
    loop.report(accelerator, f"validation: PSNR {metrics['psnr']:.2f} dB, codebook usage "
                f"{metrics['codebook_usage']:.3f} ({metrics['codes_used']}/{metrics['num_codes']} codes), token grid "
                f"{metrics['token_grid']}")
    accelerator.unwrap_model(model).save_pretrained(o.output_dir, safe_serialization=True)
    with open(os.path.join(o.output_dir, "training_metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    loop.report(accelerator, f"saved the VQModel to {o.output_dir}")
    return metrics


def sample_batch(images, batch_size, generator, device):
    """A random batch of (B, 3, R, R) uint8 images as floats in [-1, 1] on `device`."""
    index = torch.randint(0, len(images), (batch_size,), generator=generator)
    return images[index].to(device).float() / 127.5 - 1


def main(argv=None):
    o = options.parse_options(Options, argv, check=check_options)
    check_paths(o)
    train(o)
    return 0


if __name__ == "__main__":
    # One-line errors (exit status 2 for a bad option, 1 for a failure), a traceback with --debug.
    sys.exit(run_script(main, prog="train_vqvae.py"))
