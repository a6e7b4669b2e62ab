"""`pdm evaluate`: prompt alignment and FID of generated PDM-Shapes images.

    pdm evaluate --images DIR --recogniser REC --data SHAPES [--split test] [--json results.json]

`REC` is a recogniser folder (`python -m training.train_recogniser --output_dir REC` trains one; the bundled pipeline
has one in `recogniser/`).

`--images` is a folder of images with a `captions.jsonl` (one `{"file_name": "0001.png", "caption": "..."}` per line,
file names relative to the folder), or a `save_to_disk` data set with `image` and `caption` columns.
"""

import os

from .base import ArgumentParser, CommandError, UsageError, run_command, usage_errors
from ..files import atomic_output, check_input_file, check_input_folder, check_output_file

SAVED_DATASET_FILES = ("dataset_dict.json", "state.json")  # what `save_to_disk` writes (DatasetDict, Dataset)
RECOGNISER_FILES = ("config.json", "model.safetensors")


def build_parser(prog):
    parser = ArgumentParser(prog=prog, description="Measure prompt alignment and FID of generated PDM-Shapes images "
                                                   "against the real ones.")
    parser.add_argument("--images", required=True,
                        help="generated images: a folder with captions.jsonl (one "
                             '{"file_name": ..., "caption": ...} per line), or a save_to_disk data set '
                             "with image and caption columns")
    parser.add_argument("--recogniser", required=True,
                        help="folder of a saved recogniser (config.json, model.safetensors; from "
                             "python -m training.train_recogniser)")
    parser.add_argument("--data", required=True,
                        help="PDM-Shapes save_to_disk folder (the real images, from pdm make-shapes)")
    parser.add_argument("--split", default="test", help="split of --data (and of --images if it has splits)")
    parser.add_argument("--feature", default="recogniser", choices=("recogniser", "inception"), help="FID features")
    parser.add_argument("--inception-weights", help="local torch-fidelity Inception weights (for --feature inception)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--device", default="cpu", help="device to run the recogniser on")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    return parser


def check_images(path):
    """--images: a folder with captions.jsonl, or a saved data set."""
    check_input_folder("--images", path)
    if not any(os.path.isfile(os.path.join(path, name)) for name in ("captions.jsonl", *SAVED_DATASET_FILES)):
        raise UsageError("--images", f"{path} has neither captions.jsonl nor a save_to_disk data set")


def check_data(path, argument="--data"):
    """`argument` (--data here, --dataset of train_recogniser.py) names a PDM-Shapes folder of `pdm make-shapes`."""
    check_input_folder(argument, path)
    if not any(os.path.isfile(os.path.join(path, name)) for name in SAVED_DATASET_FILES):
        raise UsageError(argument, f"{path} is not a save_to_disk data set (make one with pdm make-shapes)")


def check_arguments(args):
    check_data(args.data)
    if args.feature == "inception":
        if not args.inception_weights:
            raise UsageError("--inception-weights", "is required with --feature inception (nothing is downloaded)")
        check_input_file("--inception-weights", args.inception_weights)
    check_images(args.images)
    check_input_folder("--recogniser", args.recogniser, RECOGNISER_FILES, what="saved recogniser")
    if args.json:
        check_output_file("--json", args.json, args.overwrite)


def load_recogniser(args):
    from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser

    try:
        return ShapesRecogniser.from_pretrained(args.recogniser, device=args.device)
    except Exception as error:
        raise CommandError(f"{args.recogniser}: cannot load the recogniser ({error})") from error


def evaluate(args):
    import json

    from progressive_denoising.pdm_shapes import metrics

    recogniser = load_recogniser(args)
    with usage_errors({"split": "--split"}):
        real = metrics.load_split(args.data, args.split)
        images, captions = metrics.load_generated(args.images, args.split)
    rows = metrics.evaluate(recogniser, images, captions, real["image"], real["caption"], feature=args.feature,
                            inception_weights=args.inception_weights)
    print(metrics.format_table(rows))
    if args.json:
        with atomic_output(args.json) as temporary, open(temporary, "w", encoding="utf-8") as handle:
            json.dump(rows, handle, indent=2)
    return 0


def run(args):
    check_arguments(args)
    return evaluate(args)


def main(argv=None, prog="pdm evaluate"):
    return run_command(build_parser(prog), run, argv)
