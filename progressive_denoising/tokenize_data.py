"""Pre-tokenize an image-text data set into VQ codes, so PDM training never runs the VQ encoder.

The source is any `datasets` image-text source: a Hub id, a local folder (`imagefolder` with captions in
metadata.jsonl/csv, or parquet files), parquet file(s), or a `save_to_disk` folder. Each image is resized
(shorter side) and centre-cropped to `--resolution`, encoded with a `diffusers.VQModel`, and stored as

    caption      the source caption (str or list of str), renamed from `--caption_column`
    codes        List(int32, length h*w), row-major over the token grid
    quant_error  List(float32, length h*w), L2 distance from the encoder output to its code

Other non-image columns are kept. Unreadable images are skipped and reported in `OUTPUT/pdm_tokenization.json`.

Under `accelerate launch` each process encodes a contiguous shard on its own device and writes it to
`OUTPUT.pdm_shards/`; the main process concatenates the shards in rank order. With `shard_size` (`--shard-size N`)
the split is cut instead into parquet files of N examples, `OUTPUT/SPLIT-00000-of-0000K.parquet`, which
`train_pdm --streaming` reads as a stream; process r writes shards r, r + P, r + 2P, ... and a rerun skips the
shards that exist (a shard gets its name only once complete), so a killed run is resumed by running it again. With
several machines, OUTPUT must be on a file system they share. `pdm tokenize` is the command line of `tokenize`:

    accelerate launch -m progressive_denoising.commands.tokenize --dataset DIR --vqvae VQ_DIR --output OUT
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil

from .files import atomic_output

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


def tokenize_shard(shard, vqvae, resolution: int, offset: int, features, cache_file: str, *, image_column: str,
                   caption_column: str, batch_size: int):
    """Encode one shard (`offset`: the source index of its first row); returns (tokenized Dataset, skipped list)."""
    import datasets

    skipped: list = []
    shard = shard.cast_column(image_column, datasets.Image(decode=False))
    encode = make_batch_encoder(vqvae, resolution, image_column, caption_column, offset, skipped)
    tokenized = shard.map(
        encode,
        batched=True,
        batch_size=batch_size,
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
# parquet shards (`shard_size`): bounded files a stream reads, written resumably


SKIPPED_KEY = b"pdm_skipped"  # parquet metadata of a shard: its skipped images, so a rerun can report them


def num_parquet_shards(num_rows: int, shard_size: int) -> int:
    """Shards of at most `shard_size` rows that `num_rows` make; one (empty) for none, so that a report exists."""
    return max(1, math.ceil(num_rows / shard_size))


def shard_names(split: str, num_shards: int) -> list:
    """File names of the shards, as the Hub names parquet shards (`train-00000-of-00004.parquet`)."""
    return [f"{split}-{index:05d}-of-{num_shards:05d}.parquet" for index in range(num_shards)]


def check_shard_layout(output: str, split: str, num_shards: int) -> None:
    """Refuse an `output` holding shards of `split` cut otherwise (another shard size or source): a rerun would mix
    them with the new ones."""
    expected = set(shard_names(split, num_shards))
    found = sorted(name for name in os.listdir(output) if name.startswith(f"{split}-") and name.endswith(".parquet"))
    foreign = [name for name in found if name not in expected]
    if foreign:
        raise ValueError(f"{output} holds {foreign[0]}, a shard of another layout than {num_shards} shard(s) of "
                         f"{split!r}: pass --overwrite to start over, or write elsewhere")


def write_shard(tokenized, skipped: list, path: str) -> None:
    """`tokenized` as the parquet file `path`, with its skipped images in the metadata; written under a hidden
    temporary name and renamed once complete, so a file with the final name is always a whole shard. The temporary
    name is fixed (not `files.atomic_output`'s unique one): a rerun after a kill overwrites what the kill left."""
    import pyarrow.parquet as pq

    table = tokenized.data.table  # carries the features (datasets' "huggingface" schema metadata)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), SKIPPED_KEY: json.dumps(skipped)})
    temporary = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.incomplete")
    pq.write_table(table, temporary)
    os.replace(temporary, path)


def read_shard_summary(path: str) -> tuple:
    """(rows, skipped list) of a finished shard, from its parquet footer alone."""
    import pyarrow.parquet as pq

    metadata = pq.ParquetFile(path).metadata
    return metadata.num_rows, json.loads(metadata.metadata.get(SKIPPED_KEY, b"[]"))


def _encode_own_parquet_shards(source, vqvae, resolution, features, output, split, shard_size, rank, world_size,
                               **encoding):
    """Shards `rank`, `rank + world_size`, ... of `source` cut into `shard_size` rows, each encoded and written to
    `output` unless a previous run finished it. Shards are cut by row count alone, so a rerun with another number of
    processes finds the same files."""
    num_shards = num_parquet_shards(len(source), shard_size)
    names = shard_names(split, num_shards)
    for index in range(rank, num_shards, world_size):
        path = os.path.join(output, names[index])
        if os.path.exists(path):
            continue
        rows = range(index * shard_size, min((index + 1) * shard_size, len(source)))
        cache_file = os.path.join(output, f".cache-{index:05d}.arrow")
        tokenized, skipped = tokenize_shard(source.select(rows), vqvae, resolution, rows.start, features, cache_file,
                                            **encoding)
        write_shard(tokenized, skipped, path)
        del tokenized  # it maps the cache file
        os.remove(cache_file)


def _prepare_shard_folder(output, split, num_shards, overwrite):
    """`output` made if new; with `overwrite` emptied of the split's shards, else checked to hold only shards of this
    layout (the ones a rerun skips)."""
    os.makedirs(output, exist_ok=True)
    if overwrite:
        for name in os.listdir(output):
            if name.startswith(f"{split}-") and name.endswith(".parquet"):
                os.remove(os.path.join(output, name))
    check_shard_layout(output, split, num_shards)


def _report_parquet_shards(output, split, num_shards, report, push_to_hub):
    """The main process's part: the report over every shard of `output` (this run's and earlier runs'), written
    atomically beside them; the folder pushed to the Hub data set `push_to_hub` if asked."""
    names = shard_names(split, num_shards)
    num_examples, skipped = 0, []
    for name in names:
        rows, shard_skipped = read_shard_summary(os.path.join(output, name))
        num_examples, skipped = num_examples + rows, skipped + shard_skipped
    report = {**report, "num_examples": num_examples, "shards": names}
    with atomic_output(os.path.join(output, REPORT_NAME)) as temporary:
        _write_report_file(temporary, report, skipped)
    if push_to_hub:
        from huggingface_hub import HfApi

        api = HfApi()
        api.create_repo(push_to_hub, repo_type="dataset", exist_ok=True)
        api.upload_folder(repo_id=push_to_hub, folder_path=output, repo_type="dataset",
                          allow_patterns=[f"{split}-*.parquet", REPORT_NAME])
    print(f"tokenized {num_examples} examples into {num_shards} parquet shard(s) in {output} ({report['grid'][0]}x"
          f"{report['grid'][1]} codes at {report['resolution']}px); skipped {len(skipped)} unreadable image(s), "
          f"listed in {os.path.join(output, REPORT_NAME)}")


# ----------------------------------------------------------------------------------------------------------------
# driver


def _load_vqvae(vqvae: str, subfolder: str | None = None, dtype: str = "float32", device="cpu"):
    """The `diffusers.VQModel` in folder or Hub id `vqvae` (in its `subfolder`, e.g. `vqvae` of a pipeline), in eval
    mode on `device`, its weights in `dtype` ("float32", "float16" or "bfloat16")."""
    import torch
    from diffusers import VQModel

    kwargs = {"subfolder": subfolder} if subfolder else {}
    model = VQModel.from_pretrained(vqvae, torch_dtype=getattr(torch, dtype), **kwargs)
    return model.to(device).eval()


def _write_report_file(path: str, report: dict, skipped: list) -> str:
    """The report at `path`: what was tokenized, how, and the skipped images in source order."""
    report = {**report, "num_skipped": len(skipped), "skipped": sorted(skipped, key=lambda item: item["index"])}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(report, handle, indent=2)
    return path


def _write_report(folder: str, report: dict, skipped: list) -> str:
    """`REPORT_NAME` in `folder` (see `_write_report_file`)."""
    return _write_report_file(os.path.join(folder, REPORT_NAME), report, skipped)


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


def _encode_own_shard(source, vqvae, resolution, features, work_dir, rank, world_size, **encoding):
    """This process's contiguous shard of `source`, encoded into `work_dir` with the list of its skipped images."""
    shard = contiguous_shard(source, world_size, rank)
    offset = shard_offset(len(source), world_size, rank)
    cache_file = os.path.join(work_dir, f"cache{rank:05d}.arrow")
    tokenized, skipped = tokenize_shard(shard, vqvae, resolution, offset, features, cache_file, **encoding)
    if len(tokenized):  # datasets cannot reload an empty saved part
        tokenized.save_to_disk(os.path.join(work_dir, f"rank{rank:05d}"))
    with open(os.path.join(work_dir, f"skipped{rank:05d}.json"), "w", encoding="utf-8") as handle:
        json.dump(skipped, handle)


def _save_gathered(work_dir, world_size, features, output, report, push_to_hub):
    """The main process's part: every shard of `work_dir` in rank order saved to `output` with the report, all or
    nothing (written beside `output` and renamed into place once complete, replacing an old `output` only then)."""
    result, skipped = _gather(work_dir, world_size, features)
    with atomic_output(output, folder=True) as temporary:
        # An empty data set must be saved as one (empty) shard, or load_from_disk cannot read it back.
        result.save_to_disk(temporary, num_shards=1 if len(result) == 0 else None)
        _write_report(temporary, {**report, "num_examples": len(result)}, skipped)
    if push_to_hub:
        result.push_to_hub(push_to_hub)
    num_examples = len(result)
    del result  # it maps the shards' files, which go now
    shutil.rmtree(work_dir, ignore_errors=True)
    print(f"tokenized {num_examples} examples into {output} ({report['grid'][0]}x{report['grid'][1]} codes at "
          f"{report['resolution']}px); skipped {len(skipped)} unreadable image(s), listed in "
          f"{os.path.join(output, REPORT_NAME)}")


def tokenize(
    dataset: str,
    vqvae: str,
    output: str,
    *,
    split: str = "train",
    dataset_config: str | None = None,
    image_column: str = "image",
    caption_column: str = "caption",
    vqvae_subfolder: str | None = None,
    resolution: int | None = None,
    batch_size: int = 32,
    max_examples: int | None = None,
    dtype: str = "float32",
    push_to_hub: str | None = None,
    shard_size: int | None = None,
    overwrite: bool = False,
) -> dict:
    """Tokenize split `split` of the image-text source `dataset` (see the module docstring) with the VQ model
    `vqvae` into the `save_to_disk` folder `output`, or with `shard_size` into parquet shards in the folder `output`;
    returns the report written there (on every process).

    Args:
        dataset_config: configuration name of a Hub data set.
        image_column, caption_column: the source's columns; the caption column is renamed `caption`.
        vqvae_subfolder: the VQ model's folder inside `vqvae` (e.g. `vqvae` of a pipeline folder).
        resolution: image side the images are resized and cropped to; default: the VQ model's `sample_size`.
        batch_size: images encoded at once (per process).
        max_examples: tokenize only the first N examples of the split.
        dtype: of the VQ encoder's weights (distances are always computed in float32).
        push_to_hub: a Hub data set id to push the result to as well.
        shard_size: write `SPLIT-00000-of-0000N.parquet` files of at most this many examples instead, for
            `train_pdm --streaming`. A rerun into the same folder skips the shards already written (each is
            renamed into place once complete).
        overwrite: with `shard_size`, remove the split's shards already in `output` first (start over).
    """
    import datasets
    from accelerate import Accelerator

    from .vq import codebook_size, vq_grid

    accelerator = Accelerator()
    rank, world_size = accelerator.process_index, accelerator.num_processes
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()

    model = _load_vqvae(vqvae, vqvae_subfolder, dtype, accelerator.device)
    resolution = resolution or int(model.config.sample_size)
    grid = vq_grid(model, resolution)

    source = load_source(dataset, split, dataset_config)
    _check_columns(source, image_column, caption_column)
    if max_examples is not None:
        source = source.select(range(min(max_examples, len(source))))
    features = output_features(source.features, image_column, caption_column, grid[0] * grid[1])

    encoding = {"image_column": image_column, "caption_column": caption_column, "batch_size": batch_size}
    report = {"vqvae": os.path.join(vqvae, vqvae_subfolder) if vqvae_subfolder else vqvae, "dataset": dataset,
              "split": split, "resolution": resolution, "grid": list(grid), "codebook_size": codebook_size(model)}
    if shard_size is not None:
        num_shards = num_parquet_shards(len(source), shard_size)
        if accelerator.is_main_process:
            _prepare_shard_folder(output, split, num_shards, overwrite)
        accelerator.wait_for_everyone()
        _encode_own_parquet_shards(source, model, resolution, features, output, split, shard_size, rank, world_size,
                                   **encoding)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _report_parquet_shards(output, split, num_shards, report, push_to_hub)
    else:
        work_dir = os.path.abspath(output).rstrip(os.sep) + ".pdm_shards"
        os.makedirs(work_dir, exist_ok=True)
        accelerator.wait_for_everyone()
        _encode_own_shard(source, model, resolution, features, work_dir, rank, world_size, **encoding)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            _save_gathered(work_dir, world_size, features, output, report, push_to_hub)
    accelerator.wait_for_everyone()
    with open(os.path.join(output, REPORT_NAME), encoding="utf-8") as handle:
        return json.load(handle)
