"""The README's figures: a grid of the bundled model's images with their prompts, and a coarse-to-fine strip.

    python -m docs.make_figures --out docs            # writes docs/grid.png and docs/stages.png

Images are enlarged with nearest-neighbour sampling (the bundled model draws 32x32 images); every image is drawn
with `torch.Generator().manual_seed(seed)` at the model's default number of stages.
"""

import argparse
import os

import torch
from PIL import Image, ImageDraw

from progressive_denoising import PDMPipeline
from progressive_denoising import BUNDLED_MODEL

# Two prompts hold a (colour, shape) pair that never occurs in training (red triangle, blue circle).
PROMPTS = [
    "a large red circle",
    "a small green square in the top left",
    "a large white triangle in the center",
    "a large red triangle",
    "a small blue circle above a large yellow triangle",
    "a large green circle left of a small white square",
]
TEXT_WIDTH, GREY, WHITE = 330, (40, 40, 40), (230, 230, 230)


def enlarge(image, scale):
    return image.resize((image.width * scale, image.height * scale), Image.NEAREST)


def image_grid(pipe, prompts, seeds, scale):
    """One row per prompt: the prompt, then one image per seed."""
    rows = []
    for prompt in prompts:
        out = pipe(prompt, generator=[torch.Generator().manual_seed(s) for s in seeds],
                   num_images_per_prompt=len(seeds))
        rows.append((prompt, [enlarge(image, scale) for image in out.images]))
    side = rows[0][1][0].width
    pad = 4
    grid = Image.new("RGB", (TEXT_WIDTH + len(seeds) * (side + pad), len(rows) * (side + pad)), GREY)
    draw = ImageDraw.Draw(grid)
    for r, (prompt, images) in enumerate(rows):
        top = r * (side + pad)
        draw.text((8, top + side // 2 - 6), prompt, fill=WHITE)
        for c, image in enumerate(images):
            grid.paste(image, (TEXT_WIDTH + c * (side + pad), top))
    return grid


def stages_strip(pipe, prompt, seed, scale):
    """The image after every stage (not yet generated cells grey), numbered."""
    out = pipe(prompt, generator=torch.Generator().manual_seed(seed), return_stages=True)
    frames = [enlarge(images[0], scale) for images in out.stages]
    side, pad, label = frames[0].width, 4, 16
    strip = Image.new("RGB", (len(frames) * (side + pad), side + label), GREY)
    draw = ImageDraw.Draw(strip)
    for i, frame in enumerate(frames):
        strip.paste(frame, (i * (side + pad), label))
        draw.text((i * (side + pad) + 4, 2), f"stage {i + 1}", fill=WHITE)
    return strip


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=BUNDLED_MODEL)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--scale", type=int, default=3)
    parser.add_argument("--stages-prompt", default="a large red circle in the top left")  # the quickstart prompt
    args = parser.parse_args(argv)
    pipe = PDMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(args.out, exist_ok=True)
    image_grid(pipe, PROMPTS, seeds, args.scale).save(os.path.join(args.out, "grid.png"))
    stages_strip(pipe, args.stages_prompt, seeds[0], args.scale).save(os.path.join(args.out, "stages.png"))
    print(f"wrote {args.out}/grid.png and {args.out}/stages.png")


if __name__ == "__main__":
    main()
