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
    python -m training.train_vqvae --data data/shapes --output models/vq-shapes --steps 20000 --device cuda
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator

from progressive_denoising.commands.base import ArgumentParser, UsageError, run_script
from progressive_denoising.commands.files import check_local_or_hub, check_output_folder


def parse_args(argv=None):
    # The package's parser: hyphen or underscore flags, one-line errors, --debug.
    parser = ArgumentParser(prog="train_vqvae.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True,
                        help="save_to_disk folder (Dataset or DatasetDict), or a `datasets.load_dataset` name")
    parser.add_argument("--output", required=True, help="folder to save the VQModel in")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    parser.add_argument("--image_column", default="image")
    parser.add_argument("--train_split", default="train")
    parser.add_argument("--validation_split", default="validation",
                        help="split for PSNR/usage; if missing, the last 5%% of the train split is held out")
    parser.add_argument("--resolution", type=int, default=64, help="images are resized to this square side")
    parser.add_argument("--steps", type=int, default=10000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--num_codes", type=int, default=512, help="codebook size")
    parser.add_argument("--code_dim", type=int, default=16, help="dimension of a code vector (vq_embed_dim)")
    parser.add_argument("--latent_channels", type=int, default=16)
    parser.add_argument("--block_out_channels", default="64,128,128",
                        help="comma-separated; n entries give a downsampling factor of 2**(n-1)")
    parser.add_argument("--layers_per_block", type=int, default=1)
    parser.add_argument("--norm_num_groups", type=int, default=32)
    parser.add_argument("--beta", type=float, default=0.25, help="commitment loss weight")
    parser.add_argument("--foreground_weight", type=float, default=1.0,
                        help="weight of the reconstruction loss on non-black pixels and their neighbours (PDM-Shapes is mostly background, "
                        "so small objects and their exact colours matter little to an unweighted loss)")
    parser.add_argument("--dead_after", type=int, default=200, help="steps without use before a code is reset")
    parser.add_argument("--dead_check_every", type=int, default=100)
    parser.add_argument("--codebook_init", choices=("kmeans++", "random"), default="kmeans++",
                        help="seed the codebook by k-means++ or with encoder outputs drawn uniformly")
    parser.add_argument("--reset_to", choices=("farthest", "random"), default="farthest",
                        help="move dead codes to the recent encoder outputs farthest from every code, or random ones")
    parser.add_argument("--merge_purity", type=float, default=0.0,
                        help="before the last --merge_steps, tie together codes that encode the same image patch in at "
                        "least this share of their uses (e.g. 0.9); 0 turns merging off")
    parser.add_argument("--merge_steps", type=int, default=500, help="steps trained after merging (without resets)")
    parser.add_argument("--mid_block_attention", type=int, choices=(0, 1), default=1,
                        help="self-attention in the middle blocks (1, diffusers' default) or none (0): without it a "
                        "code depends only on its neighbourhood, not on the whole image")
    parser.add_argument("--log_every", type=int, default=100)
    parser.add_argument("--max_eval_images", type=int, default=2000)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: Accelerate places the model on the GPU")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:  # paths before any work: a missing data folder, an output that would be replaced
        check_local_or_hub("--data", args.data)
        check_output_folder("--output", args.output, args.overwrite, make_parents=True)
    except UsageError as error:
        parser.error(str(error))
    try:
        args.block_out_channels = tuple(int(c) for c in args.block_out_channels.split(","))
    except ValueError:
        parser.error(f"--block-out-channels must be comma-separated integers, got {args.block_out_channels!r}")
    for name in ("steps", "batch_size", "num_codes", "code_dim", "resolution", "dead_after", "dead_check_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.merge_purity <= 1:
        parser.error(f"--merge-purity must be in [0, 1], got {args.merge_purity}")
    if args.merge_purity > 0 and not 0 < args.merge_steps < args.steps:
        parser.error(f"--merge-steps must be between 1 and --steps - 1 = {args.steps - 1}, got {args.merge_steps}")
    return args


def load_images(data, image_column, train_split, validation_split, resolution):
    """Load the train and validation images as (N, 3, R, R) uint8 tensors.

    `data` is a `save_to_disk` folder or a `datasets.load_dataset` name (with no network, only local data works).
    """
    import datasets

    loaded = datasets.load_from_disk(data) if os.path.isdir(data) else datasets.load_dataset(data)
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({train_split: loaded})
    if train_split not in loaded:
        raise ValueError(f"--train_split {train_split!r} not in {data} (has {list(loaded)})")
    if image_column not in loaded[train_split].column_names:
        raise ValueError(f"--image_column {image_column!r} not in {data} (has {loaded[train_split].column_names})")
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


def build_model(args):
    from diffusers import VQModel

    n = len(args.block_out_channels)
    return VQModel(
        in_channels=3, out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=args.block_out_channels, layers_per_block=args.layers_per_block,
        latent_channels=args.latent_channels, vq_embed_dim=args.code_dim, num_vq_embeddings=args.num_codes,
        norm_num_groups=args.norm_num_groups, sample_size=args.resolution,
        mid_block_add_attention=bool(args.mid_block_attention),
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


def train(args):
    """Train, evaluate and save; returns the validation metrics dict."""
    accelerator = Accelerator(cpu=args.device == "cpu")
    if accelerator.num_processes > 1:
        raise ValueError("train_vqvae.py trains on one process: its losses call the VQModel's parts directly, which "
                         "DistributedDataParallel would not keep in sync; run it without `accelerate launch` "
                         "--num_processes")
    args.device = accelerator.device
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    train_images, validation_images = load_images(args.data, args.image_column, args.train_split,
                                                  args.validation_split, args.resolution)
    validation_images = validation_images[: args.max_eval_images]
    model = build_model(args).to(args.device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=args.steps, eta_min=args.lr / 10)
    model, optimiser, schedule = accelerator.prepare(model, optimiser, schedule)
    guard = DeadCodeGuard(args.num_codes, args.dead_after, reset_to=args.reset_to)
    init_codebook(model, sample_batch(train_images, 4 * args.batch_size, generator, args.device), generator,
                  args.codebook_init)
    resets, tie = 0, None
    merge_at = args.steps - args.merge_steps if args.merge_purity > 0 else None
    for step in range(1, args.steps + 1):
        if step == merge_at:
            tie = merge_look_alike_codes(model, train_images[:4096], args.merge_purity)
            print(f"step {step}: merged look-alike codes, {len(tie.unique())} distinct codes left", flush=True)
        batch = sample_batch(train_images, args.batch_size, generator, args.device)
        losses, latents, indices = training_losses(model, batch, args.beta, args.foreground_weight)
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
        if step % args.dead_check_every == 0 and step <= 0.8 * args.steps and tie is None:
            resets += guard.reset_dead(step, model.quantize.embedding, generator)
        if step % args.log_every == 0 or step == args.steps:
            terms = " ".join(f"{k} {v.item():.4f}" for k, v in losses.items())
            print(f"step {step}/{args.steps} loss {loss.item():.4f} ({terms}) codes reset so far {resets}", flush=True)
    metrics = evaluate(model, validation_images, args.device)
    metrics.update({"steps": args.steps, "dead_codes_reset": resets,
                    "distinct_codes": None if tie is None else len(tie.unique())})
    print(f"validation: PSNR {metrics['psnr']:.2f} dB, codebook usage {metrics['codebook_usage']:.3f} "
          f"({metrics['codes_used']}/{metrics['num_codes']} codes), token grid {metrics['token_grid']}")
    accelerator.unwrap_model(model).save_pretrained(args.output, safe_serialization=True)
    with open(os.path.join(args.output, "training_metrics.json"), "w", encoding="utf-8") as handle:
        json.dump(metrics, handle, indent=2)
    return metrics


def sample_batch(images, batch_size, generator, device):
    """A random batch of (B, 3, R, R) uint8 images as floats in [-1, 1] on `device`."""
    index = torch.randint(0, len(images), (batch_size,), generator=generator)
    return images[index].to(device).float() / 127.5 - 1


def main(argv=None):
    train(parse_args(argv))
    return 0


if __name__ == "__main__":
    # One-line errors (exit status 2 for a bad option, 1 for a failure), a traceback with --debug.
    sys.exit(run_script(main, prog="train_vqvae.py"))
