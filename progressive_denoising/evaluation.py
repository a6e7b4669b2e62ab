"""Evaluation on PDM-Shapes: an attribute recogniser, prompt alignment and FID.

The recogniser is a small CNN trained on real PDM-Shapes renders (with blur, noise and colour jitter so that it
also reads VQ reconstructions). It predicts the scene structure: the number of objects (1 or 2) and, for each of
two object slots, shape, colour, size and centre. Slots are in a canonical order (centre x, then y); training
uses the better of the two slot assignments so that two objects with nearly the same x do not confuse it.

``prompt_alignment`` counts an image as aligned when the recognised objects match the prompt's objects in shape,
colour and size (best assignment for two objects) and the prompt's region or relation holds for the recognised
centres, by the same rules as the generator (``shapes.region_of`` and ``shapes.relation_holds``).

``fid`` computes the Frechet distance with ``torchmetrics`` on the recogniser's penultimate features, or on
Inception features when the user has the Inception weights on disk (nothing is downloaded).
"""

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from . import shapes

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NUM_SLOTS = 2
# Random stream of the recogniser's training renders (PDM-Shapes splits use 0, 1, 2).
RECOGNISER_STREAM = 3


# --------------------------------------------------------------------------------------------------- recogniser


class ShapesRecogniser(nn.Module):
    """CNN that reads (N, 3, H, W) float images in [0, 1] and predicts the PDM-Shapes scene structure.

    Images are resized to ``image_size`` first. A global branch (strided convolutions, then an MLP over the
    flattened map) predicts the number of objects and two centres; the attributes of each slot are read from a
    "glimpse": a ``glimpse`` x ``glimpse`` grid of features sampled around the slot's centre (the target centre
    while training, the predicted one otherwise). Reading attributes locally keeps the network small and quick
    to train.

    ``forward`` returns a dict: ``count`` (N, 2) logits for 1 or 2 objects, ``shape`` (N, 2, 3), ``colour``
    (N, 2, 8), ``size`` (N, 2, 2) logits and ``center`` (N, 2, 2): centres as fractions of the image side, [x, y].
    """

    def __init__(self, image_size=64, channels=(32, 64, 128, 128), hidden=256, glimpse=5, window=0.2):
        super().__init__()
        if len(channels) < 2:
            raise ValueError(f"channels must have at least 2 entries, got {channels!r}")
        self.config = {"image_size": int(image_size), "channels": [int(c) for c in channels], "hidden": int(hidden),
                       "glimpse": int(glimpse), "window": float(window)}
        stages, in_channels = [], 5  # RGB + two coordinate channels, which make positions easy to read
        for out_channels in channels:
            stages.append(nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 3, padding=1), nn.GroupNorm(1, out_channels), nn.SiLU(),
                nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1), nn.SiLU()))
            in_channels = out_channels
        self.stages = nn.ModuleList(stages)
        grid = image_size
        for _ in channels:
            grid = (grid + 1) // 2
        self.project = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * grid * grid, hidden), nn.SiLU(),
                                     nn.Linear(hidden, hidden), nn.SiLU())
        self.count_head = nn.Linear(hidden, 2)
        self.center_head = nn.Linear(hidden, NUM_SLOTS * 2)
        self.glimpse_mlp = nn.Sequential(nn.Linear(channels[1] * glimpse * glimpse, hidden), nn.SiLU())
        self.attribute_heads = nn.ModuleDict({
            "shape": nn.Linear(hidden, len(shapes.SHAPES)),
            "colour": nn.Linear(hidden, len(shapes.COLOUR_NAMES)),
            "size": nn.Linear(hidden, len(shapes.SIZES)),
        })

    @property
    def num_features(self):
        """Size of the feature vector of ``features`` (used by FID)."""
        return self.config["hidden"] * (1 + NUM_SLOTS)

    def _trunk(self, images):
        size = self.config["image_size"]
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        n = images.shape[0]
        ramp = torch.linspace(-1, 1, size, device=images.device, dtype=images.dtype)
        coords = torch.stack([ramp.view(1, size).expand(size, size), ramp.view(size, 1).expand(size, size)])
        x = torch.cat([images * 2 - 1, coords.expand(n, 2, size, size)], dim=1)
        local = None
        for index, stage in enumerate(self.stages):
            x = stage(x)
            if index == 1:
                local = x
        return local, self.project(x)

    def features(self, images):
        """Penultimate features (N, 3 * hidden) of (N, 3, H, W) float images in [0, 1]: the global features
        (layout) and the glimpse features of both predicted slots (what the objects look like)."""
        local, hidden = self._trunk(images)
        centers = self.center_head(hidden).view(-1, NUM_SLOTS, 2)
        return torch.cat([hidden, self._glimpses(local, centers).flatten(1)], dim=1)

    def _glimpses(self, local, centers):
        """Features (N, slots, hidden) sampled on a grid around each centre (N, slots, 2), fractions of the side."""
        g, window = self.config["glimpse"], self.config["window"]
        offsets = torch.linspace(-window, window, g, device=local.device, dtype=local.dtype)
        grid_y, grid_x = torch.meshgrid(offsets, offsets, indexing="ij")
        offsets = torch.stack([grid_x, grid_y], -1).view(1, 1, g * g, 2)
        # grid_sample wants [-1, 1] coordinates with align_corners=False: the image spans [-1, 1] edge to edge.
        points = (centers.unsqueeze(2) + offsets) * 2 - 1  # (N, slots, g*g, 2)
        sampled = F.grid_sample(local, points, mode="bilinear", padding_mode="zeros", align_corners=False)
        n, c, slots, _ = sampled.shape  # (N, C, slots, g*g)
        return self.glimpse_mlp(sampled.permute(0, 2, 1, 3).reshape(n, slots, c * g * g))

    def forward(self, images, centers=None):
        """Predict the scene; attributes are read at `centers` (N, 2, 2) when given (training), else at the
        predicted centres."""
        local, hidden = self._trunk(images)
        n = hidden.shape[0]
        out = {"count": self.count_head(hidden), "center": self.center_head(hidden).view(n, NUM_SLOTS, 2)}
        glimpses = self._glimpses(local, out["center"].detach() if centers is None else centers)
        for name, head in self.attribute_heads.items():
            out[name] = head(glimpses)
        return out

    def save_pretrained(self, path):
        """Write ``config.json`` and ``model.safetensors`` to the folder `path`."""
        from safetensors.torch import save_file

        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as handle:
            json.dump({"model_type": "pdm-shapes-recogniser", **self.config}, handle, indent=2)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, os.path.join(path, WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path, device="cpu"):
        """Load a recogniser written by ``save_pretrained`` from the folder `path`."""
        from safetensors.torch import load_file

        config_path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(config_path):
            raise ValueError(f"path {path!r} has no {CONFIG_NAME}: not a saved recogniser")
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        model = cls(image_size=config["image_size"], channels=config["channels"], hidden=config["hidden"],
                    glimpse=config["glimpse"], window=config["window"])
        model.load_state_dict(load_file(os.path.join(path, WEIGHTS_NAME), device=str(device)))
        return model.to(device).eval()


def images_to_tensor(images):
    """Stack PIL images (any mode, all the same size) or a (N, 3, H, W) uint8 tensor into (N, 3, H, W) uint8."""
    if isinstance(images, torch.Tensor):
        if images.dim() != 4 or images.shape[1] != 3 or images.dtype != torch.uint8:
            raise ValueError(f"images must be a (N, 3, H, W) uint8 tensor, got {tuple(images.shape)} {images.dtype}")
        return images
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    if not arrays:
        raise ValueError("images must not be empty")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError("images must all have the same size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


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
    vocab = {"shape": shapes.SHAPES, "colour": shapes.COLOUR_NAMES, "size": shapes.SIZES}
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
    scenes = [shapes.sample_scene(rng, size) for _ in range(num_examples)]
    return {"image": [shapes.render_scene(scene, size) for scene in scenes],
            "objects": [scene["objects"] for scene in scenes]}


def train_recogniser(dataset, steps, batch_size=64, lr=2e-3, seed=0, device="cpu", image_size=None,
                     channels=(32, 64, 128, 128), hidden=256, augment_images=True, center_jitter=0.03, log_every=0):
    """Train a ``ShapesRecogniser`` on a PDM-Shapes split.

    Args:
        dataset: a ``datasets.Dataset`` or a dict of lists with ``image`` (PIL) and ``objects`` columns, e.g.
            ``recogniser_training_data(...)`` or a PDM-Shapes split.
        steps: number of optimiser steps.
        image_size: side the recogniser resizes inputs to; the data set's image side when None.
        center_jitter: largest offset (fraction of the side) of the points attributes are read at in training.

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
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps} loss {loss.item():.4f}", flush=True)
    return model.eval()


@torch.no_grad()
def recognise(recogniser, images, batch_size=256):
    """Read scenes from images.

    Args:
        images: PIL images or a (N, 3, H, W) uint8 tensor.

    Returns:
        A list of N scenes ``{"objects": [{"shape", "colour", "size", "center": [x, y]}, ...]}`` (1 or 2 objects,
        in slot order), centres in pixels of the given images.
    """
    pixels = images_to_tensor(images)
    width = pixels.shape[-1]
    device = next(recogniser.parameters()).device
    scenes = []
    for start in range(0, len(pixels), batch_size):
        out = recogniser(pixels[start:start + batch_size].to(device).float() / 255)
        count = out["count"].argmax(-1) + 1
        picks = {name: out[name].argmax(-1).cpu() for name in ("shape", "colour", "size")}
        centers = (out["center"].float() * width).cpu()
        for i in range(len(count)):
            objects = [{"shape": shapes.SHAPES[picks["shape"][i, s]], "colour": shapes.COLOUR_NAMES[picks["colour"][i, s]],
                        "size": shapes.SIZES[picks["size"][i, s]], "center": centers[i, s].tolist()}
                       for s in range(int(count[i]))]
            scenes.append({"objects": objects})
    return scenes


# ------------------------------------------------------------------------------------------------------ alignment


def _same_attributes(found, wanted):
    return all(found[key] == wanted[key] for key in ("shape", "colour", "size"))


def scene_matches(found, prompt, image_size):
    """Whether a recognised scene (from ``recognise``) satisfies a parsed prompt (from ``shapes.parse_caption``)."""
    objects, wanted = found["objects"], prompt["objects"]
    if len(objects) != len(wanted):
        return False
    if len(wanted) == 1:
        if not _same_attributes(objects[0], wanted[0]):
            return False
        return prompt["region"] is None or shapes.region_of(objects[0]["center"], image_size) == prompt["region"]
    for first, second in ((objects[0], objects[1]), (objects[1], objects[0])):
        if (_same_attributes(first, wanted[0]) and _same_attributes(second, wanted[1])
                and shapes.relation_holds(prompt["relation"], first["center"], second["center"], image_size)):
            return True
    return False


ATTRIBUTE_SCORES = ("count", "colour", "shape", "size", "layout")


def _pairings(num_wanted, num_found):
    """Ways to pair the prompt's objects with the recognised ones: tuples (wanted index, found index)."""
    if num_wanted == num_found == 2:
        return [((0, 0), (1, 1)), ((0, 1), (1, 0))]
    return [((w, f),) for w in range(num_wanted) for f in range(num_found)]


def attribute_scores(found, prompt, image_size):
    """Partial credit of one image, for models that do not yet follow whole prompts.

    The prompt's objects are paired with the recognised ones in the way that matches the most attributes (an object
    left without a partner misses everything). Returns ``{"count", "colour", "shape", "size", "layout"}`` in [0, 1]:
    whether the object count is right; the share of the prompt's objects whose colour / shape / size is right;
    whether the region or relation holds (0 when the count is wrong).
    """
    objects, wanted = found["objects"], prompt["objects"]

    def matches(pairing):
        return sum(objects[f][key] == wanted[w][key] for w, f in pairing for key in ("colour", "shape", "size"))

    pairing = max(_pairings(len(wanted), len(objects)), key=matches)  # first of the best, deterministic
    scores = {key: sum(objects[f][key] == wanted[w][key] for w, f in pairing) / len(wanted)
              for key in ("colour", "shape", "size")}
    scores["count"] = float(len(objects) == len(wanted))
    if len(objects) != len(wanted):
        scores["layout"] = 0.0
    elif len(wanted) == 1:
        scores["layout"] = float(prompt["region"] is None
                                 or shapes.region_of(objects[0]["center"], image_size) == prompt["region"])
    else:
        first, second = (objects[f] for _, f in sorted(pairing))
        scores["layout"] = float(shapes.relation_holds(prompt["relation"], first["center"], second["center"],
                                                       image_size))
    return scores


def _recognise_prompts(recogniser, images, captions):
    pixels = images_to_tensor(images)
    if len(captions) != len(pixels):
        raise ValueError(f"captions must have one entry per image: {len(captions)} captions, {len(pixels)} images")
    prompts = [shapes.parse_caption(caption) for caption in captions]
    return recognise(recogniser, pixels), prompts, pixels.shape[-1]


def _alignment(found, prompts, image_size):
    aligned = [scene_matches(f, p, image_size) for f, p in zip(found, prompts)]
    return sum(aligned) / len(aligned), aligned


def _mean_attribute_scores(found, prompts, image_size):
    per_image = [attribute_scores(f, p, image_size) for f, p in zip(found, prompts)]
    return {key: sum(s[key] for s in per_image) / len(per_image) for key in ATTRIBUTE_SCORES}


def prompt_alignment(recogniser, images, captions):
    """Share of images whose recognised scene matches its caption.

    Args:
        recogniser: a ``ShapesRecogniser``.
        images: N PIL images or a (N, 3, H, W) uint8 tensor.
        captions: N PDM-Shapes captions.

    Returns:
        ``(score, aligned)``: score in [0, 1] and a list of N bools.
    """
    return _alignment(*_recognise_prompts(recogniser, images, captions))


def attribute_accuracy(recogniser, images, captions):
    """``attribute_scores`` averaged over N images: ``{"count", "colour", "shape", "size", "layout"}`` in [0, 1]."""
    return _mean_attribute_scores(*_recognise_prompts(recogniser, images, captions))


# ------------------------------------------------------------------------------------------------------------ FID


class RecogniserFeatures(nn.Module):
    """``torchmetrics`` FID feature extractor: (N, 3, H, W) uint8 images -> (N, hidden) recogniser features."""

    def __init__(self, recogniser):
        super().__init__()
        self.recogniser = recogniser.eval()
        self.num_features = recogniser.num_features

    @torch.no_grad()
    def forward(self, images):
        return self.recogniser.features(images.float() / 255)


def _inception_metric(inception_weights):
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        raise RuntimeError("FID with Inception features needs `torch-fidelity` (pip install torch-fidelity) and its "
                           "Inception weights on disk; use feature='recogniser' otherwise.")
    if inception_weights is None or not os.path.isfile(inception_weights):
        raise ValueError(f"inception_weights must be the path of torch-fidelity's Inception weights file "
                         f"(pt_inception-2015-12-05), got {inception_weights!r}; they are never downloaded here.")
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=inception_weights)


def fid(real_images, fake_images, feature="recogniser", recogniser=None, inception_weights=None, batch_size=256):
    """Frechet distance between two image sets.

    Args:
        real_images, fake_images: PIL images or (N, 3, H, W) uint8 tensors (at least 2 each).
        feature: "recogniser" (penultimate features of `recogniser`) or "inception" (needs torch-fidelity and
            `inception_weights`, a local weights file; nothing is downloaded).

    Returns:
        The distance as a float.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature == "recogniser":
        if recogniser is None:
            raise ValueError("recogniser must be given when feature='recogniser'")
        metric = FrechetInceptionDistance(feature=RecogniserFeatures(recogniser))
        device = next(recogniser.parameters()).device
    elif feature == "inception":
        metric, device = _inception_metric(inception_weights), torch.device("cpu")
    else:
        raise ValueError(f"feature must be 'recogniser' or 'inception', got {feature!r}")
    metric = metric.to(device)
    for images, real in ((real_images, True), (fake_images, False)):
        pixels = images_to_tensor(images)
        if len(pixels) < 2:
            raise ValueError(f"{'real' if real else 'fake'}_images must hold at least 2 images")
        for start in range(0, len(pixels), batch_size):
            metric.update(pixels[start:start + batch_size].to(device), real=real)
    return float(metric.compute())


# ----------------------------------------------------------------------------------------------- reading images


def load_generated(path, split="test"):
    """Read generated images and their prompts.

    `path` is either a folder of images with a ``captions.jsonl`` (one ``{"file_name": ..., "caption": ...}`` per
    line, file names relative to the folder) or a ``save_to_disk`` data set with ``image`` and ``caption`` columns
    (a DatasetDict is read at `split`). Returns ``(images, captions)``: PIL images and strings.
    """
    captions_path = os.path.join(path, "captions.jsonl")
    if os.path.isfile(captions_path):
        images, captions = [], []
        with open(captions_path, encoding="utf-8") as handle:
            for line_number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as error:
                    raise ValueError(f"{captions_path}:{line_number} is not a JSON object ({error})") from error
                name = record.get("file_name", record.get("file")) if isinstance(record, dict) else None
                if name is None or "caption" not in record:
                    raise ValueError(f"{captions_path}:{line_number} needs 'file_name' and 'caption'")
                with Image.open(os.path.join(path, name)) as image:
                    images.append(image.convert("RGB"))
                captions.append(record["caption"])
        return images, captions
    split_data = load_split(path, split)
    return [image.convert("RGB") for image in split_data["image"]], list(split_data["caption"])


def load_split(path, split):
    """One split of a ``save_to_disk`` data set (a Dataset is returned as is)."""
    import datasets

    if not os.path.isdir(path):
        raise ValueError(f"path {path!r} is not a folder")
    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"split {split!r} not in {path} (has {list(data)})")
        return data[split]
    return data


def evaluate_images(recogniser, images, captions, real_images, feature="recogniser", inception_weights=None):
    """One row of the evaluation table for N images drawn for N captions, against the real images.

    Returns ``{"images", "alignment", "alignment_held_out", "count", "colour", "shape", "size", "layout", "fid"}``:
    ``alignment_held_out`` is the alignment on the prompts that contain a held-out (colour, shape) pair (None when
    there are none); the attribute columns are ``attribute_accuracy``'s partial credit.
    """
    found, prompts, image_size = _recognise_prompts(recogniser, images, captions)
    score, aligned = _alignment(found, prompts, image_size)
    held = [a for a, p in zip(aligned, prompts) if shapes.has_held_out_pair(p["objects"])]
    return {
        "images": len(aligned),
        "alignment": score,
        "alignment_held_out": sum(held) / len(held) if held else None,
        **_mean_attribute_scores(found, prompts, image_size),
        "fid": fid(real_images, images, feature=feature, recogniser=recogniser, inception_weights=inception_weights),
    }


def evaluate(recogniser, generated_images, captions, real_images, real_captions, feature="recogniser",
             inception_weights=None):
    """The evaluation table: ``evaluate_images`` rows "ground truth" (real images and their captions) and
    "generated"."""
    return {name: evaluate_images(recogniser, images, texts, real_images, feature, inception_weights)
            for name, images, texts in (("ground truth", real_images, real_captions),
                                        ("generated", generated_images, captions))}


def format_table(rows):
    """Markdown table of ``evaluate``'s rows."""
    lines = ["| images | n | alignment | alignment (held-out pairs) | colour | shape | size | layout | FID |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, row in rows.items():
        held = "-" if row["alignment_held_out"] is None else f"{row['alignment_held_out']:.3f}"
        attributes = " | ".join(f"{row[key]:.3f}" for key in ("colour", "shape", "size", "layout"))
        lines.append(f"| {name} | {row['images']} | {row['alignment']:.3f} | {held} | {attributes} | {row['fid']:.3f} |")
    return "\n".join(lines)


def main(argv=None, prog=None):
    """`pdm evaluate`; the command line lives in `progressive_denoising.commands.evaluate`."""
    from .commands.evaluate import main as command_main

    return command_main(argv, prog=prog or "pdm evaluate")
