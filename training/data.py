"""Training data: a pre-tokenized data set with `caption`, `codes`, `quant_error`, batches of it, and the training
tuples of section 3 built from them (with the prompts' T5 inputs or cached states)."""

import json
import os

import torch

from progressive_denoising.ordering import IGNORE_INDEX, build_stage_tuples, order_scores, scores_to_ranks

TOKENIZATION_FILE = "pdm_tokenization.json"


def load_splits(dataset, train_split="train", validation_split="validation", validation_size=0, seed=0):
    """(train, validation or None, tokenization info dict) of a `load_from_disk` folder or a Hub id."""
    import datasets

    if os.path.isdir(dataset):
        data = datasets.load_from_disk(dataset)
        info_path = os.path.join(dataset, TOKENIZATION_FILE)
        info = json.load(open(info_path)) if os.path.exists(info_path) else {}
    else:
        data, info = datasets.load_dataset(dataset), {}
    if isinstance(data, datasets.DatasetDict):
        if train_split not in data:
            raise ValueError(f"option 'train_split': split {train_split!r} not in {dataset} (has {list(data)})")
        train, validation = data[train_split], data.get(validation_split) if validation_split else None
    else:
        train, validation = data, None
    if validation is None and validation_size:
        split = train.train_test_split(test_size=validation_size, seed=seed)
        train, validation = split["train"], split["test"]
    missing = {"caption", "codes"} - set(train.column_names)
    if missing:
        raise ValueError(f"option 'dataset': {dataset} lacks column(s) {sorted(missing)}")
    return train, validation, info


def all_captions(dataset):
    """Every caption of a data set (lists flattened), e.g. to train a tokenizer; a stream is read through once, its
    captions alone."""
    import datasets

    streamed = isinstance(dataset, datasets.IterableDataset)
    captions = dataset.select_columns(["caption"]) if streamed else dataset["caption"]
    for caption in captions:
        caption = caption["caption"] if isinstance(caption, dict) else caption
        yield from ([caption] if isinstance(caption, str) else caption)


def collate(examples):
    """Stack codes and quantization errors; captions stay lists (one is picked per step, see `pick_captions`)."""
    batch = {
        "codes": torch.tensor([e["codes"] for e in examples], dtype=torch.long),
        "caption": [e["caption"] for e in examples],
    }
    if "quant_error" in examples[0]:
        batch["quant_error"] = torch.tensor([e["quant_error"] for e in examples], dtype=torch.float32)
    return batch


def step_generator(seed, rank, index):
    """A generator for one (process, micro-batch): resuming at micro-batch `index` redraws exactly the same."""
    return torch.Generator().manual_seed(((seed * 1_000_003 + rank) * 1_000_003 + index) % (2**63))


def pick_captions(captions, generator, caption_dropout=0.0):
    """One caption per example (at random from a list); with probability `caption_dropout` the empty prompt,
    which the T5 tokenizer makes the lone </s>: the unconditional input of classifier-free guidance. The draws of a
    whole batch are two tensors, not a draw per example."""
    choice = torch.rand(len(captions), generator=generator).tolist()
    dropped = (torch.rand(len(captions), generator=generator) < caption_dropout).tolist()
    picked = [caption if isinstance(caption, str) else caption[int(u * len(caption))]
              for caption, u in zip(captions, choice)]
    return ["" if drop else caption for caption, drop in zip(picked, dropped)]


def known_regions(batch_size, grid, share, generator):
    """(batch, h * w) bool: for a share `share` of the examples, the codes an edit would keep: outside a random box
    of the code grid (inpainting) or inside it (outpainting), each half of the time; nothing for the others."""
    height, width = grid
    u = torch.rand(batch_size, 6, generator=generator)
    top, left = (u[:, 0] * height).long(), (u[:, 1] * width).long()
    bottom = top + 1 + (u[:, 2] * (height - top)).long()  # rows top..bottom-1, at least one
    right = left + 1 + (u[:, 3] * (width - left)).long()
    rows, columns = torch.arange(height).view(1, -1, 1), torch.arange(width).view(1, 1, -1)
    box = ((rows >= top.view(-1, 1, 1)) & (rows < bottom.view(-1, 1, 1))
           & (columns >= left.view(-1, 1, 1)) & (columns < right.view(-1, 1, 1))).flatten(1)
    known = torch.where((u[:, 4] < 0.5).unsqueeze(1), ~box, box)
    return known & (u[:, 5] < share).unsqueeze(1)


def stage_inputs(batch, order, num_stages, mask_token_id, codebook_size, p_error, generator,
                 token_loss_positions="stage", known_region_share=0.0, grid=None, random_mask_share=0.0):
    """The training tuple of every example: a stage t uniform in 1..T, ranks from the order, then eq. 4; with
    `known_region_share` > 0, that share of the examples keeps a random region of its `grid` (h, w) known; with
    `random_mask_share` > 0, that share ranks its positions at random instead (MaskGIT's masks: the token head learns
    to complete partly drawn objects, which the order's masks, hiding each object whole, seldom show) and leaves the
    state head untrained on them (their generate labels would be noise)."""
    codes = batch["codes"]
    batch_size, num_tokens = codes.shape
    stages = torch.randint(1, num_stages + 1, (batch_size,), generator=generator)
    # Tuples are built on the CPU, where the generator is, whatever device the batch is on.
    quant_error = batch["quant_error"].cpu() if "quant_error" in batch else None
    scores = order_scores(order, batch_size, num_tokens, quant_error=quant_error, generator=generator)
    # Drawn only when asked for, so that runs without them see the random numbers they always saw.
    known = known_regions(batch_size, grid, known_region_share, generator) if known_region_share > 0 else None
    random_masks = None
    if random_mask_share > 0:
        random_masks = torch.rand(batch_size, generator=generator) < random_mask_share
        scores = torch.where(random_masks[:, None], torch.rand(batch_size, num_tokens, generator=generator), scores)
    tuples = build_stage_tuples(codes.cpu(), scores_to_ranks(scores), stages, num_stages, mask_token_id,
                                codebook_size, p_error=p_error, generator=generator,
                                token_loss_positions=token_loss_positions, known=known)
    if random_masks is not None:
        tuples["state_labels"] = tuples["state_labels"].masked_fill(random_masks[:, None], IGNORE_INDEX)
    return {key: tuples[key].to(codes.device) for key in ("image_tokens", "token_labels", "state_labels")}


class TextStates:
    """T5 inputs of captions; with a frozen encoder, optionally its states, computed once per caption and kept."""

    def __init__(self, tokenizer, max_length, cache=False, pad_to_multiple_of=None):
        self.tokenizer, self.max_length, self.cache, self.states = tokenizer, max_length, cache, {}
        self.pad_to_multiple_of = pad_to_multiple_of

    def tokenize(self, captions, device):
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                                pad_to_multiple_of=self.pad_to_multiple_of, return_tensors="pt")
        return {"input_ids": tokens.input_ids.to(device), "attention_mask": tokens.attention_mask.to(device)}

    @torch.no_grad()
    def encoder_states(self, model, captions, device):
        missing = sorted({c for c in captions if c not in self.states})
        if missing:
            inputs = self.tokenize(missing, device)
            hidden = model.encode_text(**inputs)
            for caption, states, mask in zip(missing, hidden, inputs["attention_mask"].bool()):
                self.states[caption] = states[mask].cpu()
        rows = [self.states[c] for c in captions]
        length = max(len(r) for r in rows)
        states = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=rows[0].dtype)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, row in enumerate(rows):
            states[i, : len(row)], mask[i, : len(row)] = row, 1
        return {"encoder_hidden_states": states.to(device), "attention_mask": mask.to(device)}

    def __call__(self, model, captions, device):
        if self.cache:
            return self.encoder_states(model, captions, device)
        return self.tokenize(captions, device)


# ----------------------------------------------------------------------------------------------------------------
# streamed training data (`train_pdm --streaming`): parquet shards read as a `datasets.IterableDataset`


def shard_files(dataset, split="train"):
    """The local parquet shards of `dataset`, sorted: a glob, one file, or a folder of `SPLIT-*.parquet` files (as
    `pdm tokenize --shard-size` writes them); None for a Hub data set id. An empty match names what matched nothing."""
    import glob

    if os.path.isdir(dataset):
        pattern = os.path.join(dataset, f"{split}-*.parquet")
    elif "*" in dataset or "?" in dataset or dataset.endswith(".parquet"):
        pattern = dataset
    else:
        return None
    files = sorted(glob.glob(pattern))
    if not files:
        raise ValueError(f"option 'dataset': no parquet shard matches {pattern}")
    return files


def check_shards(files, rank=0, world_size=1):
    """Rows in this process's share of `files` (every `world_size`-th, so that the processes check them all once),
    read from the parquet footers only: a missing, truncated or corrupt shard stops the run before training with
    one line naming it (rather than an Arrow error mid-run that names no file)."""
    import pyarrow.parquet as pq

    rows = 0
    for path in files[rank::world_size]:
        try:
            rows += pq.ParquetFile(path).metadata.num_rows
        except (OSError, ValueError) as error:  # pyarrow's ArrowInvalid is a ValueError, a missing file an OSError
            raise ValueError(f"training shard {path} cannot be read ({type(error).__name__}: {error}); rewrite it "
                             "(rerun `pdm tokenize --shard-size` after deleting it) or leave it out") from None
    return rows


def stream_info(dataset, files):
    """The tokenization info (`pdm_tokenization.json`) of the local shards `files`: in the folder `dataset` or beside
    the first shard; {} for a Hub data set or without one."""
    if files is None:
        return {}
    path = os.path.join(dataset if os.path.isdir(dataset) else os.path.dirname(files[0]), TOKENIZATION_FILE)
    return json.load(open(path)) if os.path.exists(path) else {}


def open_stream(dataset, split, seed, buffer_size, rank, world_size):
    """This process's part of the shards as an `IterableDataset`: shard order and a buffer of `buffer_size`
    examples shuffled by (seed, epoch), then split by `split_dataset_by_node`, which gives each process whole shards
    when their number is a multiple of the processes (else every process reads every shard and keeps every
    world_size-th example). Every process shuffles with the same seed, so the parts never overlap."""
    import datasets
    from datasets.distributed import split_dataset_by_node

    files = shard_files(dataset, split)
    if files is None:
        stream = datasets.load_dataset(dataset, split=split, streaming=True)
    else:
        stream = datasets.load_dataset("parquet", data_files={split: files}, split=split, streaming=True)
    stream = stream.shuffle(seed=seed, buffer_size=buffer_size) if buffer_size > 1 else stream
    return split_dataset_by_node(stream, rank=rank, world_size=world_size)


def load_validation(dataset, split="validation"):
    """A small map-style validation set: a `save_to_disk` folder (its `split` if it has several), parquet file(s) or
    a glob, or a Hub data set's `split`."""
    import datasets

    if is_saved_dataset(dataset):
        data = datasets.load_from_disk(dataset)
        return data[split] if isinstance(data, datasets.DatasetDict) else data
    files = shard_files(dataset, split)
    if files is None:
        return datasets.load_dataset(dataset, split=split)
    return datasets.load_dataset("parquet", data_files={split: files}, split=split)


def is_saved_dataset(path):
    """True for a `save_to_disk` folder (rather than a folder of parquet shards)."""
    names = ("dataset_info.json", "dataset_dict.json", "state.json")
    return os.path.isdir(path) and any(os.path.exists(os.path.join(path, name)) for name in names)


class StreamBatches:
    """Endless collated batches of `train_batch_size` examples of a stream, on `device`, epoch after epoch
    (`set_epoch` reshuffles; a last, partial batch of an epoch is dropped, as the map-style loader does).

    Its `state_dict` (registered for checkpointing) is where every process stands: (epoch, batches taken in it).
    Resuming replays the epoch up to there: the stream's order is fixed by (seed, epoch), so skipping the examples
    already taken gives exactly the batches an uninterrupted run takes next. `IterableDataset.state_dict` would avoid
    reading the skipped examples again, but it drops the shuffle buffer's content (datasets' documentation), so the
    resumed run would see other batches. `gather` (e.g. accelerate's `gather_object`) collects every process's
    position into the state, which only the main process saves.
    """

    def __init__(self, stream, batch_size, device="cpu", rank=0, world_size=1, gather=None):
        self.stream, self.batch_size, self.device = stream, batch_size, device
        self.rank, self.world_size = rank, world_size
        self.gather = gather or (lambda positions: positions)
        self.epoch, self.taken, self._iterator = 0, 0, None

    def _epoch_batches(self, skip):
        import itertools

        self.stream.set_epoch(self.epoch)
        reader = iter(self.stream)
        examples = itertools.islice(reader, skip * self.batch_size, None)
        try:
            while True:
                rows = list(itertools.islice(examples, self.batch_size))
                if len(rows) < self.batch_size:
                    return
                batch = collate(rows)
                yield {key: value.to(self.device) if torch.is_tensor(value) else value for key, value in batch.items()}
        finally:
            reader.close()  # datasets' reading threads stop now, not whenever the garbage collector finds them

    def _batches(self):
        while True:
            empty = True
            for batch in self._epoch_batches(self.taken):
                empty, self.taken = False, self.taken + 1
                yield batch
            if empty and self.taken == 0:
                raise ValueError(f"process {self.rank}'s part of the training stream holds fewer than "
                                 f"{self.batch_size} examples (train_batch_size): use fewer processes or more data")
            self.epoch, self.taken = self.epoch + 1, 0

    def __iter__(self):
        return self

    def __next__(self):
        if self._iterator is None:
            self._iterator = self._batches()
        return next(self._iterator)

    def close(self):
        """Stop reading (at the end of training): the epoch's reader is closed, its threads stopped."""
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None

    def state_dict(self):
        return {"positions": self.gather([[self.epoch, self.taken]])}

    def load_state_dict(self, state):
        positions = state["positions"]
        if len(positions) != self.world_size:
            raise ValueError(f"the checkpoint was written by {len(positions)} process(es): resume a streamed run "
                             "with as many processes (each continues its own part of the stream)")
        (self.epoch, self.taken), self._iterator = positions[self.rank], None
