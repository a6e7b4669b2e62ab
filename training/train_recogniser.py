"""Train the PDM-Shapes attribute recogniser that `pdm evaluate` and the benchmarks read images with.

    python -m training.train_recogniser --output_dir runs/recogniser [--dataset SHAPES] [--resolution 64] \
        [--max_train_steps 3000] [--num_scenes 20000] [--train_batch_size 64] [--learning_rate 2e-3] [--seed 0] \
        [--device cpu]

The training images are rendered on the fly: `--num_scenes` scenes drawn with every (colour, shape) pair, held-out
pairs included (the recogniser is the evaluator: composition is measured on the generator, not on it), from a random
stream of their own (`RECOGNISER_STREAM`), so a seed gives the same renders whatever PDM-Shapes folder exists.
`--dataset` (a `pdm make-shapes` folder) sets the default image side and, once trained, the recogniser's prompt
alignment on its real `--validation_split` images is printed as a check. Each step draws a batch, corrupts it
lightly (blur, colour gain, block noise, pixel noise: what VQ reconstructions look like) and reads the attributes
near the true centres; the loss counts objects, classifies attributes and regresses centres under the better of the
two slot orders. The same seed and options give the same weights. Accelerate places the model on `--device`; the
folder written to `--output_dir` (`config.json`, `model.safetensors`) loads with `ShapesRecogniser.from_pretrained`.
Every option can also be set in a YAML file (`--config FILE.yaml`; the command line wins).
"""

import dataclasses
import math
import sys
from typing import List, Optional

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from transformers.hf_argparser import HfArg

from progressive_denoising.commands.base import CommandError, UsageError, check_seed, run_script, usage_errors
from progressive_denoising.commands.evaluate import check_data
from progressive_denoising.files import atomic_output, check_output_folder
from progressive_denoising.pdm_shapes import data as shapes_data, metrics
from progressive_denoising.pdm_shapes.recogniser import NUM_SLOTS, ShapesRecogniser, images_to_tensor
from training import loop, options

# Random stream of the recogniser's training renders (PDM-Shapes splits use 0, 1, 2).
RECOGNISER_STREAM = 3


def _canonical(objects):
    """Objects sorted into the recogniser's slot order: centre x, then centre y."""
    return sorted(objects, key=lambda obj: (obj["center"][0], obj["center"][1]))


def scene_targets(objects_list, image_size):
    """Training targets for a list of scenes' ``objects`` (as in the data set), padded to two slots.

    Returns a dict of tensors: ``count`` (N,) in {0, 1} for 1 or 2 objects, ``shape``/``colour``/``size``
    (N, 2) class indices (-100 in an empty slot), ``center`` (N, 2, 2) as fractions of the image side.
    """
    n = len(objects_list)
    targets = {"count": torch.zeros(n, dtype=torch.long), "center": torch.zeros(n, NUM_SLOTS, 2)}
    vocab = {"shape": shapes_data.SHAPES, "colour": shapes_data.COLOUR_NAMES, "size": shapes_data.SIZES}
    for name in vocab:
        targets[name] = torch.full((n, NUM_SLOTS), -100, dtype=torch.long)
    for i, objects in enumerate(objects_list):
        if len(objects) not in (1, 2):
            raise ValueError(f"objects_list[{i}] must have 1 or 2 objects, got {len(objects)}")
        targets["count"][i] = len(objects) - 1
        for slot, obj in enumerate(_canonical(objects)):
            for name, words in vocab.items():
                targets[name][i, slot] = words.index(obj[name])
            targets["center"][i, slot] = torch.tensor(obj["center"], dtype=torch.float32) / image_size
    return targets


def _center_loss(predicted, target, present):
    """Per-example centre loss (N,) for slots in the given order; `present` (N, 2) masks empty slots."""
    error = F.smooth_l1_loss(predicted, target, reduction="none", beta=0.02).sum(-1)
    return (error * present).sum(1)


def recogniser_loss(outputs, targets):
    """Scalar training loss for outputs computed with the attributes read at the target centres.

    Count and attribute cross-entropies, plus the centre loss under the better of the two slot assignments
    (two objects with nearly the same x may come in either order).
    """
    loss = F.cross_entropy(outputs["count"], targets["count"])
    for name in ("shape", "colour", "size"):
        loss = loss + NUM_SLOTS * F.cross_entropy(outputs[name].flatten(0, 1), targets[name].flatten())
    present = (targets["shape"] >= 0).float()
    direct = _center_loss(outputs["center"], targets["center"], present)
    crossed = _center_loss(outputs["center"], targets["center"].flip(1), present.flip(1))
    centers = torch.where(targets["count"] == 1, torch.minimum(direct, crossed), direct)
    # Centres are fractions of the image: weight them so a few pixels of error cost about as much as a wrong class.
    return loss + 20 * centers.mean()


def _gaussian_blur(images, sigma):
    """Blur (N, 3, H, W) images with a per-example Gaussian of std `sigma` (N,) pixels."""
    radius = 2
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-offsets.view(1, -1) ** 2 / (2 * sigma.view(-1, 1).clamp_min(1e-3) ** 2))
    kernel = kernel / kernel.sum(1, keepdim=True)  # (N, 5)
    n, c, h, w = images.shape
    x = images.reshape(1, n * c, h, w)
    k = kernel.repeat_interleave(c, 0)
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(n * c, 1, 1, -1), groups=n * c)
    x = F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(n * c, 1, -1, 1), groups=n * c)
    return x.view(n, c, h, w)


def augment(images, generator=None):
    """Light corruption of (N, 3, H, W) images in [0, 1] that resembles VQ reconstructions.

    Gaussian blur (std up to 1 pixel), per-channel gain and offset (up to about 5%), blocky low-resolution
    colour error (like JPEG/VQ block artefacts) and Gaussian noise (std up to 0.05).
    """
    n, _, h, w = images.shape
    device = images.device

    def uniform(*shape, low=0.0, high=1.0):
        return low + (high - low) * torch.rand(*shape, generator=generator, device=device)

    x = _gaussian_blur(images, uniform(n, high=1.0))
    x = x * uniform(n, 3, 1, 1, low=0.95, high=1.05) + uniform(n, 3, 1, 1, low=-0.04, high=0.04)
    blocks = torch.randn(n, 3, max(h // 4, 1), max(w // 4, 1), generator=generator, device=device)
    x = x + F.interpolate(blocks, size=(h, w), mode="nearest") * uniform(n, 1, 1, 1, high=0.03)
    x = x + torch.randn(x.shape, generator=generator, device=device) * uniform(n, 1, 1, 1, high=0.05)
    return x.clamp(0, 1)


def recogniser_training_data(num_examples, seed, size=64):
    """Renders to train the recogniser on: ``{"image": [PIL images], "objects": [objects lists]}``.

    Unlike PDM-Shapes train, every (colour, shape) pair appears, held-out ones included: the recogniser is the
    evaluator, and composition should be measured on the generator, not on the evaluator. Its random stream is
    separate from the PDM-Shapes splits of the same seed.
    """
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    rng = np.random.default_rng([seed, RECOGNISER_STREAM])
    scenes = [shapes_data.sample_scene(rng, size) for _ in range(num_examples)]
    return {"image": [shapes_data.render_scene(scene, size) for scene in scenes],
            "objects": [scene["objects"] for scene in scenes]}


def train_recogniser(dataset, steps, batch_size=64, lr=2e-3, seed=0, device="cpu", image_size=None,
                     channels=(32, 64, 128, 128), hidden=256, augment_images=True, center_jitter=0.03, on_step=None):
    """Train a ``ShapesRecogniser`` on a PDM-Shapes split.

    Args:
        dataset: a ``datasets.Dataset`` or a dict of lists with ``image`` (PIL) and ``objects`` columns, e.g.
            ``recogniser_training_data(...)`` or a PDM-Shapes split.
        steps: number of optimiser steps.
        image_size: side the recogniser resizes inputs to; the data set's image side when None.
        center_jitter: largest offset (fraction of the side) of the points attributes are read at in training.
        on_step: called as `on_step(loss, learning_rate)` after every step (the script's progress bar).

    Returns:
        The trained recogniser, in eval mode, on `device`.
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer, got {steps!r}")
    if len(dataset["image"]) == 0:
        raise ValueError("dataset must not be empty")
    torch.manual_seed(seed)
    images = images_to_tensor(dataset["image"])
    data_size = images.shape[-1]
    targets = scene_targets(dataset["objects"], data_size)
    model = ShapesRecogniser(image_size or data_size, channels, hidden).to(device).train()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    for step in range(steps):
        index = torch.randint(0, len(images), (batch_size,), generator=generator)
        batch = images[index].to(device).float() / 255
        if augment_images:
            batch = augment(batch.cpu(), generator).to(device)
        batch_targets = {k: v[index].to(device) for k, v in targets.items()}
        # Read attributes near (not exactly at) the true centres, as they will be read at predicted ones.
        jitter = (torch.rand(batch_targets["center"].shape, generator=generator) - 0.5) * 2 * center_jitter
        loss = recogniser_loss(model(batch, centers=batch_targets["center"] + jitter.to(device)), batch_targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if on_step is not None:
            on_step(loss.item(), schedule.get_last_lr()[0])
    return model.eval()


# ------------------------------------------------------------------------------------------------- command line


@dataclasses.dataclass
class Options:
    output_dir: Optional[str] = HfArg(default=None, help="folder to save the recogniser in (config.json, "
                                      "model.safetensors; required)")
    overwrite: bool = HfArg(default=False, help="replace output_dir if it exists and is not empty")
    dataset: Optional[str] = HfArg(default=None, help="PDM-Shapes save_to_disk folder (from pdm make-shapes): sets "
                                   "the default resolution, and the recogniser's alignment on its real "
                                   "validation_split images is printed")
    validation_split: str = HfArg(default="test", help="split of dataset to check the trained recogniser on")
    num_scenes: int = HfArg(default=20000, help="number of renders (all 24 colour-shape pairs) to train on")
    resolution: Optional[int] = HfArg(default=None, help="image side; default: that of dataset, else 64")
    max_train_steps: int = HfArg(default=3000, help="optimiser steps")
    train_batch_size: int = HfArg(default=64, help="images per step")
    learning_rate: float = HfArg(default=2e-3, help="peak learning rate of the one-cycle schedule")
    channels: List[int] = HfArg(default_factory=lambda: [32, 64, 128, 128],
                                help="channels of the convolution stages")
    hidden: int = HfArg(default=256, help="width of the hidden layers")
    seed: int = HfArg(default=0, help="the same seed and options give the same weights")
    device: str = HfArg(default="cpu", help="cpu, or the device Accelerate places the model on, named by type (cuda, "
                        "mps, ...; choose the GPU with CUDA_VISIBLE_DEVICES or an accelerate config)")


# This script's own old spellings, beside the shared ones.
RENAMED = {**options.RENAMED, "size": "resolution", "split": "validation_split"}


def check_options(o):
    """Everything that can be checked before any work."""
    options.check_required(o, "output_dir")
    options.check_positive(o, "num_scenes", "max_train_steps", "train_batch_size", "hidden")
    if not o.channels or min(o.channels) < 1:
        raise ValueError(f"option 'channels' must be positive integers, got {o.channels!r}")
    check_seed("--seed", o.seed)
    if not o.learning_rate > 0 or not math.isfinite(o.learning_rate):
        raise UsageError("--learning_rate", f"must be a finite number > 0, got {o.learning_rate}")
    if o.dataset:
        check_data(o.dataset, "--dataset")
    check_output_folder("--output_dir", o.output_dir, o.overwrite)


def make_accelerator(device):
    """An `Accelerator` that places the model on `device` ("cpu", or a device type Accelerate finds here)."""
    try:
        wanted = torch.device(device)
    except RuntimeError as error:
        raise UsageError("--device", f"not a device: {device!r}") from error
    accelerator = Accelerator(cpu=wanted.type == "cpu")
    found = accelerator.device
    if wanted.type != found.type or (wanted.index is not None and wanted.index != found.index):
        raise UsageError("--device", f"Accelerate places the model on {found} here, not on {device}")
    if accelerator.num_processes > 1:
        raise CommandError(f"the recogniser trains in one process, not {accelerator.num_processes}: run "
                           f"python -m training.train_recogniser (or accelerate launch --num_processes 1)")
    return accelerator


def progress_callback(progress):
    """`train_recogniser`'s `on_step` that moves the progress bar `progress` and shows the loss and learning rate."""

    def on_step(loss, learning_rate):
        progress.update()
        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{learning_rate:.2e}", refresh=False)

    return on_step


def main(argv=None):
    o = options.parse_options(Options, argv, check=check_options, renamed=RENAMED)
    accelerator = make_accelerator(o.device)
    with usage_errors({"split": "--validation_split"}):
        check = metrics.load_split(o.dataset, o.validation_split) if o.dataset else None
    size = o.resolution or (check[0]["image"].width if check is not None else 64)
    with usage_errors({"size": "--resolution"}):  # the renders check the size before drawing
        train_data = recogniser_training_data(o.num_scenes, o.seed, size)
    progress = loop.progress_bar(accelerator, 0, o.max_train_steps)
    with usage_errors({"channels": "--channels"}):
        model = train_recogniser(train_data, o.max_train_steps, batch_size=o.train_batch_size, lr=o.learning_rate,
                                 seed=o.seed, device=accelerator.device, channels=tuple(o.channels), hidden=o.hidden,
                                 on_step=progress_callback(progress))
    progress.close()
    with atomic_output(o.output_dir, folder=True) as temporary:
        model.save_pretrained(temporary)
    loop.report(accelerator, f"saved recogniser to {o.output_dir}")
    if check is not None:
        score, _ = metrics.prompt_alignment(model, check["image"], check["caption"])
        loop.report(accelerator, f"alignment on real {o.validation_split} images of {o.dataset}: {score:.4f}")
    return 0


if __name__ == "__main__":
    # One-line errors (exit status 2 for a bad option, 1 for a failure), a traceback with --debug.
    sys.exit(run_script(main, prog="train_recogniser.py"))
