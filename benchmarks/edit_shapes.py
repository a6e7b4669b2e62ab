"""Editing on PDM-Shapes: inpaint an object, revise a colour or a shape word.

    python -m benchmarks.edit_shapes --model progressive_denoising/bundled/pdm-shapes \
        --recogniser progressive_denoising/bundled/pdm-shapes/recogniser --data runs/shapes32 --num-scenes 300 \
        --out docs/results/editing.json --md docs/results/editing.md --figure docs/editing.png

Tasks (the first `--num-scenes` test scenes of each kind; image i drawn with generator seed + i):
- inpaint: a two-object scene with one object's box masked (its codes regenerated from `[MASK]`), the full caption
  as prompt. "caption" is the share the recogniser finds the whole caption satisfied in; "kept" the share whose kept
  object's pixels stay within 0.05 (mean absolute, in [0, 1]) of the input's VQ reconstruction.
- revise colour / revise shape: a one-object scene and its caption with the colour (shape) word changed. Rows: the
  revise pipeline (the state head chooses what to rewrite: the upper group of its margins, or those above 0),
  image-to-image at two strengths (the state head chooses
  which codes), and inpainting of the object's box (the region given, as an upper reference). "caption" is the share
  that matches the new caption; "codes changed" the mean number of codes that differ from the input's; "untouched"
  the share of pixels outside the object's box (grown by a code) within 0.05 of the input's VQ reconstruction.
"""

import argparse
import json
import os

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
from diffusers.utils import make_image_grid

from progressive_denoising import (
    PDMImg2ImgPipeline,
    PDMInpaintPipeline,
    PDMPipeline,
    PDMRevisePipeline,
)
from progressive_denoising.pdm_shapes import data as shapes_data, metrics
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser

TOLERANCE = 0.05


def box_mask(box, size, grow=0):
    """(size, size) bool array, True inside the pixel box [x0, y0, x1, y1) grown by `grow` pixels."""
    x0, y0, x1, y1 = box
    mask = np.zeros((size, size), dtype=bool)
    mask[max(y0 - grow, 0) : min(y1 + grow, size), max(x0 - grow, 0) : min(x1 + grow, size)] = True
    return mask


def changed_word(caption, old, choices):
    """`caption` with the word `old` replaced by the next of `choices` (deterministic)."""
    new = choices[(choices.index(old) + 1) % len(choices)]
    return caption.replace(old, new, 1)


def scenes_with(data, count, num_objects):
    test = metrics.load_split(data, "test")
    rows = [row for row in test if len(row["objects"]) == num_objects]
    return rows[:count]


def run(pipe, prompts, images, seed, batch_size, **kwargs):
    """Edited PIL images and changed-code counts, in batches, image i with generator seed + i."""
    out_images, changed = [], []
    for start in range(0, len(prompts), batch_size):
        end = min(start + batch_size, len(prompts))
        generators = [torch.Generator().manual_seed(seed + i) for i in range(start, end)]
        batch = {key: value[start:end] if isinstance(value, list) else value for key, value in kwargs.items()}
        out = pipe(prompts[start:end], images[start:end], generator=generators, **batch)
        out_images += out.images
        changed += out.changed.tolist()
    return out_images, changed


@torch.no_grad()
def reconstructions(pipe, images):
    """The input images as their VQ codes decode: what an edit that changes nothing returns, in [0, 1]."""
    pixels = pipe.decode_codes(pipe.encode_image(images, len(images)))
    return list(pipe.image_processor.postprocess(pixels, output_type="np"))


def untouched_share(edited, reference, outside):
    """Share of the pixels where `outside` is True that stay within TOLERANCE of `reference` (max over channels)."""
    close = np.abs(np.asarray(edited, dtype=np.float32) / 255 - reference).max(-1) <= TOLERANCE
    return float(close[outside].mean()) if outside.any() else 1.0


def inpaint_task(pipes, recogniser, rows, args):
    size = pipes["inpaint"].image_size[0]
    prompts = [row["caption"] for row in rows]
    images = [row["image"].convert("RGB") for row in rows]
    masks = [PIL.Image.fromarray(box_mask(row["objects"][1]["box"], size).astype(np.uint8) * 255) for row in rows]
    edited, changed = run(pipes["inpaint"], prompts, images, args.seed, args.batch_size, mask_image=masks)
    _, aligned = metrics.prompt_alignment(recogniser, edited, prompts)
    recon = reconstructions(pipes["inpaint"], images)
    kept = []
    for row, image, reference, mask in zip(rows, edited, recon, masks):
        keep_box = box_mask(row["objects"][0]["box"], size) & ~(np.asarray(mask) > 0)
        difference = np.abs(np.asarray(image, dtype=np.float32) / 255 - reference).max(-1)
        kept.append(bool(keep_box.any()) and float(difference[keep_box].mean()) <= TOLERANCE)
    row = {"scenes": len(rows), "caption": float(np.mean(aligned)), "kept": float(np.mean(kept)),
           "codes_changed": float(np.mean(changed)), "caption_and_kept": float(np.mean(np.array(aligned) & kept))}
    return {"inpaint one object of two": row}, list(zip(images, masks, edited))


def revise_task(pipes, recogniser, rows, args, attribute, choices):
    size = pipes["revise"].image_size[0]
    prompts = [changed_word(row["caption"], row["objects"][0][attribute], choices) for row in rows]
    images = [row["image"].convert("RGB") for row in rows]
    boxes = [row["objects"][0]["box"] for row in rows]
    object_masks = [PIL.Image.fromarray(box_mask(box, size).astype(np.uint8) * 255) for box in boxes]
    recon = reconstructions(pipes["revise"], images)
    grow = pipes["revise"].vae_scale_factor
    methods = {
        "revise (state head chooses)": (pipes["revise"], {}),
        "revise, threshold 0 (p(replace) > p(keep))": (pipes["revise"], {"threshold": 0.0}),
        "image-to-image, strength 0.25": (pipes["img2img"], {"strength": 0.25}),
        "image-to-image, strength 0.5": (pipes["img2img"], {"strength": 0.5}),
        "inpaint the object's box (region given)": (pipes["inpaint"], {"mask_image": object_masks}),
    }
    table, examples = {}, {}
    for name, (pipe, kwargs) in methods.items():
        edited, changed = run(pipe, prompts, images, args.seed, args.batch_size, **kwargs)
        _, aligned = metrics.prompt_alignment(recogniser, edited, prompts)
        untouched = [untouched_share(image, reference, ~box_mask(box, size, grow))
                     for image, reference, box in zip(edited, recon, boxes)]
        table[f"revise {attribute}: {name}"] = {
            "scenes": len(rows), "caption": float(np.mean(aligned)), "codes_changed": float(np.mean(changed)),
            "untouched": float(np.mean(untouched)),
        }
        examples[name] = edited
    _, before = metrics.prompt_alignment(recogniser, images, prompts)
    table[f"revise {attribute}: input image (no edit)"] = {"scenes": len(rows), "caption": float(np.mean(before)),
                                                           "codes_changed": 0.0, "untouched": 1.0}
    return table, list(zip(images, prompts, examples["revise (state head chooses)"]))


def format_rows(rows):
    columns = [("scenes", "scenes", "d"), ("caption", "caption", ".3f"), ("kept object", "kept", ".3f"),
               ("caption and kept", "caption_and_kept", ".3f"), ("codes changed", "codes_changed", ".1f"),
               ("untouched outside", "untouched", ".3f")]
    lines = ["| task | " + " | ".join(title for title, _, _ in columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in rows.items():
        cells = ["-" if row.get(key) is None else format(row[key], fmt) for _, key, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_figure(path, inpaint_examples, colour_examples, count=6, scale=4):
    """Rows: input / mask / inpainted (two-object scenes); input / revised colour (one-object scenes)."""
    images = [image for image, _, _ in inpaint_examples[:count]]
    images += [mask.convert("RGB") for _, mask, _ in inpaint_examples[:count]]
    images += [edited for _, _, edited in inpaint_examples[:count]]
    images += [image for image, _, _ in colour_examples[:count]]
    images += [edited for _, _, edited in colour_examples[:count]]
    framed = [PIL.ImageOps.expand(image, border=1, fill=(96, 96, 96)) for image in images]  # tiles stay apart
    grid = make_image_grid(framed, rows=5, cols=count)
    grid.resize((grid.width * scale, grid.height * scale), PIL.Image.NEAREST).save(path)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a PDM pipeline folder")
    parser.add_argument("--recogniser", required=True)
    parser.add_argument("--data", required=True, help="PDM-Shapes folder (its test split is used)")
    parser.add_argument("--num-scenes", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON file for the rows")
    parser.add_argument("--md", help="Markdown file for the table")
    parser.add_argument("--figure", help="PNG: before / mask / after rows")
    args = parser.parse_args(argv)

    base = PDMPipeline.from_pretrained(args.model)
    pipes = {"inpaint": PDMInpaintPipeline.from_pipe(base), "img2img": PDMImg2ImgPipeline.from_pipe(base),
             "revise": PDMRevisePipeline.from_pipe(base)}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    recogniser = ShapesRecogniser.from_pretrained(args.recogniser)
    rows, inpaint_examples = inpaint_task(pipes, recogniser, scenes_with(args.data, args.num_scenes, 2), args)
    one_object = scenes_with(args.data, args.num_scenes, 1)
    colour_rows, colour_examples = revise_task(pipes, recogniser, one_object, args, "colour",
                                               list(shapes_data.COLOUR_NAMES))
    shape_rows, _ = revise_task(pipes, recogniser, one_object, args, "shape", list(shapes_data.SHAPES))
    rows.update(colour_rows)
    rows.update(shape_rows)
    table = format_rows(rows)
    print(table)
    for path, text in ((args.out, json.dumps(rows, indent=1)), (args.md, table + "\n")):
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(text)
    if args.figure:
        save_figure(args.figure, inpaint_examples, colour_examples)


if __name__ == "__main__":
    main()
