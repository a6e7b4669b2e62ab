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
    """Every caption of a data set (lists flattened), e.g. to train a tokenizer."""
    for caption in dataset["caption"]:
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
