"""The PDM-Shapes attribute recogniser: a small CNN that reads the scene structure of an image.

It is trained on real PDM-Shapes renders (with blur, noise and colour jitter so that it also reads VQ
reconstructions; the training lives in ``training/train_recogniser.py``). It predicts the number of objects (1 or 2)
and, for each of two object slots, shape, colour, size and centre. Slots are in a canonical order (centre x, then
y); training uses the better of the two slot assignments so that two objects with nearly the same x do not confuse
it. ``metrics.py`` scores images with what it reads.
"""

import json
import os

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ArgumentError
from .data import COLOUR_NAMES, SHAPES, SIZES

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
NUM_SLOTS = 2


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
            raise ArgumentError("channels", f"channels must have at least 2 entries, got {channels!r}")
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
            "shape": nn.Linear(hidden, len(SHAPES)),
            "colour": nn.Linear(hidden, len(COLOUR_NAMES)),
            "size": nn.Linear(hidden, len(SIZES)),
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
            raise ArgumentError("path", f"path {path!r} has no {CONFIG_NAME}: not a saved recogniser")
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
            raise ArgumentError("images", f"images must be a (N, 3, H, W) uint8 tensor, got {tuple(images.shape)} {images.dtype}")
        return images
    arrays = [np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images]
    if not arrays:
        raise ArgumentError("images", "images must not be empty")
    if len({a.shape for a in arrays}) != 1:
        raise ArgumentError("images", "images must all have the same size")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


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
            objects = [{"shape": SHAPES[picks["shape"][i, s]], "colour": COLOUR_NAMES[picks["colour"][i, s]],
                        "size": SIZES[picks["size"][i, s]], "center": centers[i, s].tolist()}
                       for s in range(int(count[i]))]
            scenes.append({"objects": objects})
    return scenes
