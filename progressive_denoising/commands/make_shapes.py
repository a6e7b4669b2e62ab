"""`pdm make-shapes --out DIR --num-train N --seed S [--size 64] [--num-validation N] [--num-test N] [--overwrite]`."""

from .base import ArgumentParser, check_seed, positive_int, run_command, usage_errors
from ..files import atomic_output, check_output_folder

# `make_shapes_dataset`'s parameters -> this command's flags (its checks name the parameter).
FLAGS = {"num_train": "--num-train", "num_validation": "--num-validation", "num_test": "--num-test",
         "seed": "--seed", "size": "--size"}


def build_parser(prog):
    parser = ArgumentParser(prog=prog, description="Render the PDM-Shapes synthetic data set and save it with "
                                                   "datasets' save_to_disk (splits train, validation, test).")
    parser.add_argument("--out", required=True, help="output folder (datasets.load_from_disk reads it back)")
    # datasets cannot load back a saved split with no rows: every split has at least one.
    parser.add_argument("--num-train", type=positive_int, required=True, help="number of training examples")
    parser.add_argument("--seed", type=int, required=True, help="random seed; the same seed gives the same data")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--num-validation", type=positive_int, default=None,
                        help="default: num-train // 10, at least 1")
    parser.add_argument("--num-test", type=positive_int, default=None, help="default: num-train // 10, at least 1")
    parser.add_argument("--overwrite", action="store_true", help="replace --out if it exists and is not empty")
    return parser


def run(args):
    check_seed("--seed", args.seed)
    check_output_folder("--out", args.out, args.overwrite)
    from progressive_denoising.pdm_shapes.data import make_shapes_dataset

    with usage_errors(FLAGS):  # its argument checks run before it renders anything
        dataset = make_shapes_dataset(args.num_train, args.seed, size=args.size, num_validation=args.num_validation,
                                      num_test=args.num_test)
    with atomic_output(args.out, folder=True) as temporary:
        dataset.save_to_disk(temporary)
    sizes = ", ".join(f"{split} {len(dataset[split])}" for split in dataset)
    print(f"wrote PDM-Shapes ({args.size}x{args.size}, seed {args.seed}; {sizes}) to {args.out}")
    return 0


def main(argv=None, prog="pdm make-shapes"):
    return run_command(build_parser(prog), run, argv)
