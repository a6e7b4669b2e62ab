"""`pdm generate "prompt" --model PATH_OR_HUB_ID --steps N --seed S --out out.png [--stages-out stages.png]`."""

import argparse
import os

import torch

BUNDLED_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bundled", "pdm-shapes")


def stage_strip(stage_images, num_shown: int):
    """One PIL image: `num_shown` stage images side by side, evenly spaced and always ending with the last."""
    from PIL import Image

    total = len(stage_images)
    num_shown = max(1, min(num_shown, total))
    chosen = sorted({round((i + 1) * total / num_shown) - 1 for i in range(num_shown)})
    width, height = stage_images[0].size
    strip = Image.new("RGB", (width * len(chosen), height))
    for slot, index in enumerate(chosen):
        strip.paste(stage_images[index], (slot * width, 0))
    return strip


def parse_args(argv, prog):
    parser = argparse.ArgumentParser(prog=prog, description="Generate an image from a prompt with a PDM pipeline.")
    parser.add_argument("prompt", help="the text prompt")
    parser.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the bundled PDM-Shapes model)")
    parser.add_argument("--steps", type=int, default=None, help="number of stages T (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=1.0, help="classifier-free guidance (1.0 = off)")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--order", default=None, help="raster, random, quant-error, reverse-quant-error or learned")
    parser.add_argument("--num-images", type=int, default=1, help="images for the prompt, saved side by side")
    parser.add_argument("--out", default="out.png", help="where to write the image")
    parser.add_argument("--stages-out", default=None, help="also write a strip of the image after chosen stages")
    parser.add_argument("--num-stages-shown", type=int, default=8, help="stages in the strip")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def main(argv=None, prog="pdm generate"):
    from progressive_denoising import PDMPipeline

    args = parse_args(argv, prog)
    model = args.model or BUNDLED_MODEL
    if args.model is None and not os.path.isdir(BUNDLED_MODEL):
        raise SystemExit(f"{prog}: no bundled model at {BUNDLED_MODEL}; pass --model PATH_OR_HUB_ID")
    pipe = PDMPipeline.from_pretrained(model).to(args.device)
    generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
    output = pipe(
        args.prompt, num_inference_steps=args.steps, guidance_scale=args.guidance_scale, temperature=args.temperature,
        order=args.order, generator=generators, num_images_per_prompt=args.num_images,
        return_stages=args.stages_out is not None,
    )
    stage_strip(output.images, len(output.images)).save(args.out)
    print(f"wrote {args.out}")
    if args.stages_out:
        stage_strip([images[0] for images in output.stages], args.num_stages_shown).save(args.stages_out)
        print(f"wrote {args.stages_out}")
    return 0
