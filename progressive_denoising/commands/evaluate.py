"""`pdm evaluate`: prompt alignment and FID of generated PDM-Shapes images, or training the attribute recogniser.

    pdm evaluate --images DIR --recogniser REC --data SHAPES [--split test] [--json results.json]
    pdm evaluate --train-recogniser --out REC [--data SHAPES] [--steps 3000] [--size 64]

`--images` is a folder of images with a `captions.jsonl` (one `{"file_name": "0001.png", "caption": "..."}` per line,
file names relative to the folder), or a `save_to_disk` data set with `image` and `caption` columns.
"""

import os

from .base import ArgumentParser, CommandError, UsageError, check_seed, positive_int, run_command, usage_errors
from .files import atomic_output, check_input_file, check_input_folder, check_output_file, check_output_folder

SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes (DatasetDict, Dataset)
RECOGNISER_FILES = ("config.json", "model.safetensors")


def build_parser(prog):
    parser = ArgumentParser(prog=prog, description="Measure prompt alignment and FID of generated PDM-Shapes images "
                                                   "against the real ones, or train the attribute recogniser.")
    parser.add_argument("--images", help="generated images: a folder with captions.jsonl (one "
                                         '{"file_name": ..., "caption": ...} per line), or a save_to_disk data set '
                                         "with image and caption columns")
    parser.add_argument("--recogniser", help="folder of a saved recogniser (config.json, model.safetensors)")
    parser.add_argument("--data", help="PDM-Shapes save_to_disk folder (the real images, from pdm make-shapes)")
    parser.add_argument("--split", default="test", help="split of --data (and of --images if it has splits)")
    parser.add_argument("--feature", default="recogniser", choices=("recogniser", "inception"), help="FID features")
    parser.add_argument("--inception-weights", help="local torch-fidelity Inception weights (for --feature inception)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--train-recogniser", action="store_true", help="train and save a recogniser instead")
    parser.add_argument("--out", help="with --train-recogniser: folder to save the recogniser in")
    parser.add_argument("--steps", type=positive_int, default=3000, help="with --train-recogniser: optimiser steps")
    parser.add_argument("--num-scenes", type=positive_int, default=20000,
                        help="with --train-recogniser: number of renders (all 24 colour-shape pairs) to train on")
    parser.add_argument("--size", type=int, default=None,
                        help="with --train-recogniser: image side; default: that of --data, else 64")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out or --json")
    return parser


def check_images(path):
    """--images: a folder with captions.jsonl, or a saved data set."""
    check_input_folder("--images", path)
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("captions.jsonl", *SAVED_DATASET_FILES)):
        raise UsageError("--images", f"{path} has neither captions.jsonl nor a save_to_disk data set")


def check_data(path):
    check_input_folder("--data", path)
    if not any(os.path.isfile(os.path.join(path, name)) for name in SAVED_DATASET_FILES):
        raise UsageError("--data", f"{path} is not a save_to_disk data set (make one with pdm make-shapes)")


def check_arguments(args):
    check_seed("--seed", args.seed)
    if not args.lr > 0 or args.lr == float("inf"):
        raise UsageError("--lr", f"must be a finite number > 0, got {args.lr}")
    if args.data:
        check_data(args.data)
    if args.feature == "inception":
        if not args.inception_weights:
            raise UsageError("--inception-weights", "is required with --feature inception (nothing is downloaded)")
        check_input_file("--inception-weights", args.inception_weights)
    if args.train_recogniser:
        if not args.out:
            raise UsageError("--out", "is required with --train-recogniser")
        check_output_folder("--out", args.out, args.overwrite)
        return
    for flag, value in (("--images", args.images), ("--recogniser", args.recogniser), ("--data", args.data)):
        if not value:
            raise UsageError(flag, "is required to evaluate (or pass --train-recogniser)")
    check_images(args.images)
    check_input_folder("--recogniser", args.recogniser, RECOGNISER_FILES, what="saved recogniser")
    if args.json:
        check_output_file("--json", args.json, args.overwrite)


def train(args):
    from progressive_denoising import evaluation

    with usage_errors({"split": "--split"}):
        check = evaluation.load_split(args.data, args.split) if args.data else None
    size = args.size or (check[0]["image"].width if check is not None else 64)
    with usage_errors({"size": "--size"}):  # the renders check the size before drawing
        train_data = evaluation.recogniser_training_data(args.num_scenes, args.seed, size)
    model = evaluation.train_recogniser(train_data, args.steps, batch_size=args.batch_size, lr=args.lr,
                                        seed=args.seed, device=args.device, log_every=max(args.steps // 20, 1))
    with atomic_output(args.out, folder=True) as temporary:
        model.save_pretrained(temporary)
    print(f"saved recogniser to {args.out}")
    if check is not None:
        score, _ = evaluation.prompt_alignment(model, check["image"], check["caption"])
        print(f"alignment on real {args.split} images of {args.data}: {score:.4f}")
    return 0


def load_recogniser(args):
    from progressive_denoising.evaluation import ShapesRecogniser

    try:
        return ShapesRecogniser.from_pretrained(args.recogniser, device=args.device)
    except Exception as error:
        raise CommandError(f"{args.recogniser}: cannot load the recogniser ({error})") from error


def evaluate(args):
    import json

    from progressive_denoising import evaluation

    recogniser = load_recogniser(args)
    with usage_errors({"split": "--split"}):
        real = evaluation.load_split(args.data, args.split)
        images, captions = evaluation.load_generated(args.images, args.split)
    rows = evaluation.evaluate(recogniser, images, captions, real["image"], real["caption"], feature=args.feature,
                               inception_weights=args.inception_weights)
    print(evaluation.format_table(rows))
    if args.json:
        with atomic_output(args.json) as temporary, open(temporary, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return 0


def run(args):
    check_arguments(args)
    return train(args) if args.train_recogniser else evaluate(args)


def main(argv=None, prog="pdm evaluate"):
    return run_command(build_parser(prog), run, argv)
