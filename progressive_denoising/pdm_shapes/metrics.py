"""Scores of images drawn for PDM-Shapes captions: prompt alignment, partial credit per attribute and FID.

``prompt_alignment`` counts an image as aligned when the recognised objects (``recogniser.recognise``) match the
prompt's objects in shape, colour and size (best assignment for two objects) and the prompt's region or relation
holds for the recognised centres, by the same rules as the generator (``data.region_of`` and ``data.relation_holds``).

``fid`` computes the Frechet distance with ``torchmetrics`` on the recogniser's penultimate features, or on
Inception features when the user has the Inception weights on disk (nothing is downloaded).

``evaluate`` / ``evaluate_images`` / ``format_table`` make the table of ``pdm evaluate``; ``load_split`` and
``load_generated`` read the real and the generated images.
"""

import json
import os

import torch
from PIL import Image
from torch import nn

from ..errors import ArgumentError
from .data import has_held_out_pair, parse_caption, region_of, relation_holds
from .recogniser import images_to_tensor, recognise


# ------------------------------------------------------------------------------------------------------ alignment


def _same_attributes(found, wanted):
    return all(found[key] == wanted[key] for key in ("shape", "colour", "size"))


def scene_matches(found, prompt, image_size):
    """Whether a recognised scene (from ``recognise``) satisfies a parsed prompt (from ``data.parse_caption``)."""
    objects, wanted = found["objects"], prompt["objects"]
    if len(objects) != len(wanted):
        return False
    if len(wanted) == 1:
        if not _same_attributes(objects[0], wanted[0]):
            return False
        return prompt["region"] is None or region_of(objects[0]["center"], image_size) == prompt["region"]
    for first, second in ((objects[0], objects[1]), (objects[1], objects[0])):
        if (_same_attributes(first, wanted[0]) and _same_attributes(second, wanted[1])
                and relation_holds(prompt["relation"], first["center"], second["center"], image_size)):
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
                                 or region_of(objects[0]["center"], image_size) == prompt["region"])
    else:
        first, second = (objects[f] for _, f in sorted(pairing))
        scores["layout"] = float(relation_holds(prompt["relation"], first["center"], second["center"], image_size))
    return scores


def _recognise_prompts(recogniser, images, captions):
    pixels = images_to_tensor(images)
    if len(captions) != len(pixels):
        raise ArgumentError("captions", f"captions must have one entry per image: {len(captions)} captions, {len(pixels)} images")
    prompts = [parse_caption(caption) for caption in captions]
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
        raise ArgumentError("inception_weights", f"inception_weights must be the path of torch-fidelity's Inception weights file "
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
            raise ArgumentError("recogniser", "recogniser must be given when feature='recogniser'")
        metric = FrechetInceptionDistance(feature=RecogniserFeatures(recogniser))
        device = next(recogniser.parameters()).device
    elif feature == "inception":
        metric, device = _inception_metric(inception_weights), torch.device("cpu")
    else:
        raise ArgumentError("feature", f"feature must be 'recogniser' or 'inception', got {feature!r}")
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
        raise ArgumentError("path", f"path {path!r} is not a folder")
    data = datasets.load_from_disk(path)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ArgumentError("split", f"split {split!r} not in {path} (has {list(data)})")
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
    held = [a for a, p in zip(aligned, prompts) if has_held_out_pair(p["objects"])]
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
