"""`pdm edit {inpaint,img2img,revise} "prompt" --image IN.png [--mask MASK.png] [--out out.png] ...`.

The conventions of `pdm generate`: every argument (mode-specific flags, the input images, seeds, the output path, the
pipeline folder and the model's own checks) is checked before any weights load; the output is written under a
temporary name and renamed into place. Images must have the size the model makes (no resizing).
"""

from .base import ArgumentParser, UsageError, positive_int, run_command, usage_errors
from ..files import atomic_outputs, check_input_file
from .generate import (
    FLAGS,
    add_generation_flags,
    check_components,
    check_model_arguments,
    check_paths as check_generate_paths,
    choose_device,
    cpu_threads,
    load_config,
    model_source,
    run_kwargs,
    stage_strip,
    torch_threads,
)

MODES = {"inpaint": "PDMInpaintPipeline", "img2img": "PDMImg2ImgPipeline", "revise": "PDMRevisePipeline"}
# The pipelines' parameters that this command's own flags set: their checks' messages name the flag.
EDIT_FLAGS = {**FLAGS, "image": "--image", "mask_image": "--mask", "strength": "--strength",
              "threshold": "--threshold", "max_edits": "--max-edits"}


def build_parser(prog):
    parser = ArgumentParser(prog=prog, description="Edit an image with a PDM pipeline: inpaint the white part of a "
                            "mask, regenerate a share of the codes chosen by the model (img2img), or let the model "
                            "rewrite what it finds wrong for the prompt (revise).")
    parser.add_argument("mode", choices=tuple(MODES), help="inpaint, img2img or revise")
    parser.add_argument("prompt", help="the text prompt the edited image should follow")
    parser.add_argument("--image", required=True, help="image to edit (the size the model makes)")
    parser.add_argument("--mask", default=None, help="inpaint (required) / revise (optional): white = may change")
    parser.add_argument("--strength", type=float, default=None, help="img2img: share of codes regenerated, in [0, 1] "
                                                                      "(default 0.5)")
    parser.add_argument("--threshold", type=float, default=None,
                        help="revise: open codes whose log p(replace) - log p(keep) exceeds this (default: the upper "
                             "group of a two-group split of the image's margins)")
    parser.add_argument("--max-edits", type=int, default=None, help="revise: at most this many codes opened")
    parser.add_argument("--model", default=None, help="pipeline folder or Hub id (default: the bundled model)")
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default 0)")
    add_generation_flags(parser)
    parser.add_argument("--num-images", type=int, default=1, help="edits of the image, saved side by side")
    parser.add_argument("--out", default="out.png", help="image file to write (default out.png)")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch")
    return parser


def check_mode_flags(args):
    """UsageError for a flag the mode does not take, or a missing one; strength's range."""
    if args.mode == "inpaint" and args.mask is None:
        raise UsageError("--mask", "inpaint needs --mask (white = regenerate, black = keep)")
    if args.mode == "img2img" and args.mask is not None:
        raise UsageError("--mask", "img2img takes no mask: the model chooses the codes (use inpaint for a region)")
    if args.strength is not None and args.mode != "img2img":
        raise UsageError("--strength", f"only img2img takes --strength, not {args.mode}")
    for flag, value in (("--threshold", args.threshold), ("--max-edits", args.max_edits)):
        if value is not None and args.mode != "revise":
            raise UsageError(flag, f"only revise takes {flag}, not {args.mode}")
    if args.mode == "img2img" and args.strength is None:
        args.strength = 0.5
    if args.strength is not None and not 0 <= args.strength <= 1:
        raise UsageError("--strength", f"strength must be in [0, 1], got {args.strength}")


def read_image(flag, path):
    """The PIL image at `path`, fully read; UsageError naming the flag if it is missing or not an image."""
    from PIL import Image

    check_input_file(flag, path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except (OSError, SyntaxError, ValueError) as error:
        raise UsageError(flag, f"{path} is not a readable image ({error})") from error


def mode_kwargs(args, image, mask):
    kwargs = {"image": image}
    if args.mode == "img2img":
        kwargs["strength"] = args.strength
    else:
        kwargs["mask_image"] = mask
    if args.mode == "revise":
        kwargs.update(threshold=args.threshold, max_edits=args.max_edits)
    return kwargs


def run(args):
    check_mode_flags(args)
    image = read_image("--image", args.image)
    mask = read_image("--mask", args.mask) if args.mask is not None else None
    args.stages_out = None  # `pdm generate`'s checks of --seed, --out and --model, which also read --stages-out
    local = check_generate_paths(args)
    import torch

    import progressive_denoising

    device = choose_device(args)
    config, generation_config = load_config(args, local)
    check_model_arguments(args, config, generation_config)
    if local:
        check_components(model_source(args))
    with torch_threads(cpu_threads(args, device)):
        pipe = getattr(progressive_denoising, MODES[args.mode]).from_pretrained(model_source(args)).to(device)
        generators = [torch.Generator().manual_seed(args.seed + i) for i in range(args.num_images)]
        with usage_errors(EDIT_FLAGS):
            output = pipe(args.prompt, generator=generators, num_images_per_prompt=args.num_images,
                          **run_kwargs(args), **mode_kwargs(args, image, mask))
    with atomic_outputs(args.out) as (temporary,):
        stage_strip(output.images, len(output.images)).save(temporary)
    changed = ", ".join(str(int(count)) for count in output.changed)
    print(f"wrote {args.out} ({args.mode}: {changed} of {output.edit_mask.shape[1]} codes changed)")
    return 0


def main(argv=None, prog="pdm edit"):
    return run_command(build_parser(prog), run, argv)
