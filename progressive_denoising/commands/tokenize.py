"""`pdm tokenize --dataset DIR_OR_HUB_ID --vqvae VQ_DIR --output OUT [--shard-size N] [--overwrite]`: images -> VQ
codes.

The work is `progressive_denoising.tokenize_data.tokenize` (see its docstring for the sources it reads and what it
writes); run this module under Accelerate to shard it over processes:

    accelerate launch -m progressive_denoising.commands.tokenize --dataset DIR --vqvae VQ_DIR --output OUT
"""

import os
import sys

from .base import ArgumentParser, UsageError, non_negative_int, positive_int, run_command
from ..files import check_creatable_folder, check_input_file, check_local_or_hub, check_output_folder


def build_parser(prog):
    parser = ArgumentParser(prog=prog, description="Pre-tokenize an image-text data set into VQ codes, so PDM "
                                                   "training never runs the VQ encoder.",
                            epilog="Under `accelerate launch -m progressive_denoising.commands.tokenize ...` the work "
                                   "is sharded over the processes (--output on a file system they share).")
    parser.add_argument("--dataset", required=True,
                        help="Hub id, local folder (imagefolder with captions in metadata.jsonl/csv, parquet files, or "
                             "a save_to_disk data set) or parquet file(s)")
    parser.add_argument("--dataset-config", default=None, help="configuration name of a Hub data set")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--caption-column", default="caption")
    parser.add_argument("--vqvae", required=True, help="folder (or Hub id) of a diffusers VQModel")
    parser.add_argument("--vqvae-subfolder", default=None, help="e.g. `vqvae` inside a pipeline folder")
    parser.add_argument("--output", required=True, help="folder for Dataset.save_to_disk (or the parquet shards)")
    parser.add_argument("--resolution", type=positive_int, default=None, help="default: the VQ model's sample_size")
    parser.add_argument("--batch-size", type=positive_int, default=32)
    parser.add_argument("--max-examples", type=non_negative_int, default=None, help="use only the first N examples")
    parser.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default="float32",
                        help="dtype of the VQ encoder (distances are always computed in float32)")
    parser.add_argument("--shard-size", type=positive_int, default=None, metavar="N",
                        help="write parquet shards of N examples (SPLIT-00000-of-0000K.parquet in --output) for "
                             "`train_pdm --streaming` instead of one save_to_disk folder; a rerun skips the shards "
                             "already written")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output folder (with "
                                                                 "--shard-size: its shards of --split)")
    parser.add_argument("--push-to-hub", default=None, metavar="REPO_ID", help="also push the result to the Hub")
    return parser


def check_dataset(dataset):
    if "*" in dataset:  # a glob of parquet files: datasets resolves it
        return
    if dataset.endswith(".parquet"):
        check_input_file("--dataset", dataset)
    else:
        check_local_or_hub("--dataset", dataset, what="data set folder")


def check_arguments(args):
    check_dataset(args.dataset)
    config = os.path.join(args.vqvae_subfolder or "", "config.json")
    check_local_or_hub("--vqvae", args.vqvae, required=(config,), what="VQModel folder")
    if args.shard_size is None:
        check_output_folder("--output", args.output, args.overwrite)
    else:  # an existing folder is a run to resume (tokenize_data checks its shards' layout)
        check_creatable_folder("--output", args.output)
    if os.path.abspath(args.output) == os.path.abspath(args.dataset):
        raise UsageError("--output", "is the --dataset folder; write the codes elsewhere")


def run(args):
    check_arguments(args)
    from progressive_denoising.tokenize_data import tokenize

    tokenize(args.dataset, args.vqvae, args.output, split=args.split, dataset_config=args.dataset_config,
             image_column=args.image_column, caption_column=args.caption_column, vqvae_subfolder=args.vqvae_subfolder,
             resolution=args.resolution, batch_size=args.batch_size, max_examples=args.max_examples, dtype=args.dtype,
             push_to_hub=args.push_to_hub, shard_size=args.shard_size, overwrite=args.overwrite)
    return 0


def main(argv=None, prog="pdm tokenize"):
    return run_command(build_parser(prog), run, argv)


if __name__ == "__main__":  # `accelerate launch -m progressive_denoising.commands.tokenize ...`
    sys.exit(main())
