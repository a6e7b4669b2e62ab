"""Pre-tokenize an image-text data set into VQ codes, so PDM training never runs the VQ encoder.

The source is any `datasets` image-text source: a Hub id, a local folder (`imagefolder` with captions in
metadata.jsonl/csv, or parquet files), parquet file(s), or a `save_to_disk` folder. Each image is resized
(shorter side) and centre-cropped to `--resolution`, encoded with a `diffusers.VQModel`, and stored as

    caption      the source caption (str or list of str), renamed from `--caption_column`
    codes        List(int32, length h*w), row-major over the token grid
    quant_error  List(float32, length h*w), L2 distance from the encoder output to its code

Other non-image columns are kept. Unreadable images are skipped and reported in `OUTPUT/pdm_tokenization.json`.

Under `accelerate launch` each process encodes a contiguous shard on its own device and writes it to
`OUTPUT.pdm_shards/`; the main process concatenates the shards in rank order. With several machines,
OUTPUT must be on a file system they share.

    accelerate launch -m progressive_denoising.tokenize_data --dataset DIR --vqvae VQ_DIR --output OUT
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys

REPORT_NAME = "pdm_tokenization.json"


# ----------------------------------------------------------------------------------------------------------------
# loading


def _is_saved_dataset(path: str) -> bool:
    names = ("dataset_info.json", "state.json", "dataset_dict.json")
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in names)


def load_source(dataset: str, split: str, config_name: str | None = None):
    """Load one split of an image-text source as a `datasets.Dataset` (see the module docstring for sources)."""
    import datasets

    if _is_saved_dataset(dataset):
        loaded = datasets.load_from_disk(dataset)
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{dataset} has splits {list(loaded)}, not {split!r}")
            loaded = loaded[split]
        return loaded
    if dataset.endswith(".parquet") or ("*" in dataset and "parquet" in dataset):
        return datasets.load_dataset("parquet", data_files=dataset, split=split)
    # A local folder of images (+ metadata) or of parquet files is recognised by load_dataset itself.
    return datasets.load_dataset(dataset, config_name, split=split)


def _check_columns(dataset, image_column: str, caption_column: str) -> None:
    absent = [name for name in (image_column, caption_column) if name not in dataset.column_names]
    if absent:
        raise ValueError(f"column(s) {absent} not in the data set; its columns are {dataset.column_names}")
    if caption_column != "caption" and "caption" in dataset.column_names:
        raise ValueError(f"cannot rename {caption_column!r} to 'caption': the data set already has a 'caption' column")


def decode_image(value):
    """Decode a `datasets.Image(decode=False)` value ({"bytes", "path"}) into a fully loaded PIL image.

    Raises on unreadable data, so that the caller can skip the example.
    """
    from PIL import Image

    if value is None:
        raise ValueError("no image")
    if value.get("bytes") is not None:
        image = Image.open(io.BytesIO(value["bytes"]))
    elif value.get("path"):
        image = Image.open(value["path"])
    else:
        raise ValueError("image has neither bytes nor path")
    image.load()  # Image.open is lazy: truncated or corrupt pixel data only fails here
    return image


# ----------------------------------------------------------------------------------------------------------------
# encoding


def output_features(source_features, image_column: str, caption_column: str, num_tokens: int):
    """Features of the tokenized data set: the source's non-image columns plus `codes` and `quant_error`."""
    import datasets

    features = {
        ("caption" if name == caption_column else name): feature
        for name, feature in source_features.items()
        if name != image_column
    }
    features["codes"] = datasets.List(datasets.Value("int32"), length=num_tokens)
    features["quant_error"] = datasets.List(datasets.Value("float32"), length=num_tokens)
    return datasets.Features(features)


def make_batch_encoder(vqvae, resolution: int, image_column: str, caption_column: str, offset: int, skipped: list):
    """A batched `Dataset.map` function that decodes, crops and encodes images, dropping unreadable ones.

    Skipped examples are appended to `skipped` as {"index": index in the source, "reason": str}; `offset` turns
    shard indices into source indices.
    """
    from .vq import encode_to_codes, preprocess_images

    def encode_batch(batch, indices):
        images, keep = [], []
        for row, value in enumerate(batch[image_column]):
            try:
                images.append(decode_image(value))
                keep.append(row)
            except Exception as error:  # any decoder failure means "unreadable": skip it, never stop the run
                skipped.append({"index": offset + indices[row], "reason": f"{type(error).__name__}: {error}"})
        out = {name: [values[row] for row in keep] for name, values in batch.items() if name != image_column}
        out["caption"] = out.pop(caption_column)
        if images:
            codes, errors = encode_to_codes(vqvae, preprocess_images(images, resolution))
            out["codes"] = codes.cpu().int().numpy()
            out["quant_error"] = errors.cpu().numpy()
        else:
            out["codes"], out["quant_error"] = [], []
        return out

    return encode_batch


def shard_offset(num_rows: int, num_shards: int, index: int) -> int:
    """Source index of the first row of contiguous shard `index` (as `Dataset.shard(contiguous=True)` splits)."""
    size, remainder = divmod(num_rows, num_shards)
    return size * index + min(index, remainder)


def contiguous_shard(source, num_shards: int, index: int):
    """`Dataset.shard(contiguous=True)`, but an empty shard (more processes than rows) is allowed."""
    if len(source) // num_shards + (index < len(source) % num_shards) == 0:
        return source.select([])  # datasets' shard() raises IndexError here
    return source.shard(num_shards=num_shards, index=index, contiguous=True)


def tokenize_shard(shard, vqvae, resolution, args, offset, features, cache_file):
    """Encode one shard; returns (tokenized Dataset, skipped list)."""
    import datasets

    skipped: list = []
    shard = shard.cast_column(args.image_column, datasets.Image(decode=False))
    encode = make_batch_encoder(vqvae, resolution, args.image_column, args.caption_column, offset, skipped)
    tokenized = shard.map(
        encode,
        batched=True,
        batch_size=args.batch_size,
        with_indices=True,
        remove_columns=shard.column_names,
        features=features,
        cache_file_name=cache_file,
        # The function has side effects (the skip list) and holds a model: never reuse or hash it.
        load_from_cache_file=False,
        new_fingerprint=os.path.basename(cache_file),
        desc="tokenizing",
    )
    return tokenized, skipped


# ----------------------------------------------------------------------------------------------------------------
# driver


def _load_vqvae(args, device):
    import torch
    from diffusers import VQModel

    kwargs = {"subfolder": args.vqvae_subfolder} if args.vqvae_subfolder else {}
    vqvae = VQModel.from_pretrained(args.vqvae, torch_dtype=getattr(torch, args.dtype), **kwargs)
    return vqvae.to(device).eval()


def _write_report(folder, args, resolution, grid, codebook, num_examples, skipped) -> str:
    report = {
        "vqvae": args.vqvae if not args.vqvae_subfolder else os.path.join(args.vqvae, args.vqvae_subfolder),
        "dataset": args.dataset,
        "split": args.split,
        "resolution": resolution,
        "grid": list(grid),
        "codebook_size": codebook,
        "num_examples": num_examples,
        "num_skipped": len(skipped),
        "skipped": sorted(skipped, key=lambda item: item["index"]),
    }
    path = os.path.join(folder, REPORT_NAME)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return path


def _gather(work_dir: str, world_size: int, features):
    import datasets

    parts, skipped = [], []
    for rank in range(world_size):
        part = os.path.join(work_dir, f"rank{rank:05d}")
        if os.path.exists(part):  # ranks with no readable image wrote no part
            parts.append(datasets.load_from_disk(part))
        with open(os.path.join(work_dir, f"skipped{rank:05d}.json"), encoding="utf-8") as handle:
            skipped += json.load(handle)
    if not parts:
        return datasets.Dataset.from_dict({name: [] for name in features}, features=features), skipped
    return datasets.concatenate_datasets(parts), skipped


def tokenize(args) -> dict:
    """Run the tokenization described by parsed `args`; returns the report (on every process)."""
    import datasets
    from accelerate import Accelerator

    from .commands.files import atomic_output
    from .vq import codebook_size, vq_grid

    accelerator = Accelerator()
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()

    vqvae = _load_vqvae(args, accelerator.device)
    resolution = args.resolution or int(vqvae.config.sample_size)
    grid = vq_grid(vqvae, resolution)

    source = load_source(args.dataset, args.split, args.dataset_config)
    _check_columns(source, args.image_column, args.caption_column)
    if args.max_examples is not None:
        source = source.select(range(min(args.max_examples, len(source))))
    features = output_features(source.features, args.image_column, args.caption_column, grid[0] * grid[1])

    work_dir = os.path.abspath(args.output).rstrip(os.sep) + ".pdm_shards"
    os.makedirs(work_dir, exist_ok=True)
    accelerator.wait_for_everyone()

    shard = contiguous_shard(source, world_size, rank)
    offset = shard_offset(len(source), world_size, rank)
    cache_file = os.path.join(work_dir, f"cache{rank:05d}.arrow")
    tokenized, skipped = tokenize_shard(shard, vqvae, resolution, args, offset, features, cache_file)
    if len(tokenized):  # datasets cannot reload an empty saved part
        tokenized.save_to_disk(os.path.join(work_dir, f"rank{rank:05d}"))
    with open(os.path.join(work_dir, f"skipped{rank:05d}.json"), "w", encoding="utf-8") as handle:
        json.dump(skipped, handle)
    accelerator.wait_for_everyone()

    report_path = None
    if accelerator.is_main_process:
        result, skipped = _gather(work_dir, world_size, features)
        # Written beside --output and renamed into place once complete (replacing an old --output only then).
        with atomic_output(args.output, folder=True) as temporary:
            # An empty data set must be saved as one (empty) shard, or load_from_disk cannot read it back.
            result.save_to_disk(temporary, num_shards=1 if len(result) == 0 else None)
            _write_report(temporary, args, resolution, grid, codebook_size(vqvae), len(result), skipped)
        report_path = os.path.join(args.output, REPORT_NAME)
        if args.push_to_hub:
            result.push_to_hub(args.push_to_hub)
        del result
        shutil.rmtree(work_dir, ignore_errors=True)
        print(f"tokenized {len(source) - len(skipped)} examples into {args.output} "
              f"({grid[0]}x{grid[1]} codes at {resolution}px); skipped {len(skipped)} unreadable image(s), "
              f"listed in {report_path}")
    accelerator.wait_for_everyone()
    with open(os.path.join(args.output, REPORT_NAME), encoding="utf-8") as handle:
        return json.load(handle)


def main(argv=None, prog=None) -> int:
    """`pdm tokenize`; the command line lives in `progressive_denoising.commands.tokenize`."""
    from .commands.tokenize import main as command_main

    return command_main(argv, prog=prog or "pdm tokenize")


if __name__ == "__main__":
    sys.exit(main())
