"""Helpers shared by `train_pdm.py` and `train_policy.py`: options, data, stage tuples, checkpoints, model card.

Each function does one job so that the training loops read top to bottom on one screen.
"""

import dataclasses
import difflib
import inspect
import json
import math
import os
import re
import shutil
import sys
import time
import typing

import torch
import yaml

from progressive_denoising.commands.base import CommandError, UsageError
from progressive_denoising.commands.files import check_creatable_folder, check_local_or_hub
from progressive_denoising.ordering import build_stage_tuples, order_scores, scores_to_ranks

# ---------------------------------------------------------------------------------------------------------------
# Options: a dataclass, filled from a YAML file, then from `--key value` / `key=value` on the command line
# ---------------------------------------------------------------------------------------------------------------


def _field_type(field):
    """The type a value of `field` must have; Optional[X] -> X."""
    kind = field.type
    if typing.get_origin(kind) is typing.Union:
        kind = next(arg for arg in typing.get_args(kind) if arg is not type(None))
    return typing.get_origin(kind) or kind


def _coerce(name, kind, value):
    """`value` (from YAML or parsed from a command-line string) as `kind`, or a ValueError naming the option."""
    if value is None:
        return None
    if kind is float and isinstance(value, str):  # YAML 1.1 reads "3e-3" as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ValueError(f"option {name!r} must be of type {kind.__name__}, got {value!r}")
    return value


def _parse_cli_value(kind, text):
    # Strings stay verbatim (a Hub id like "user/1e5" is not a number); everything else reads as YAML.
    if kind is str:
        return None if text.lower() in ("null", "none") else text
    return yaml.safe_load(text)


def _split_cli(argv):
    """['--a', '1', 'b=2', '--c=3', '--flag'] -> {'a': '1', 'b': '2', 'c': '3', 'flag': 'true'}."""
    pairs, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        key = arg[2:] if arg.startswith("--") else arg
        if "=" in key:
            key, value = key.split("=", 1)
        elif not arg.startswith("--"):
            raise ValueError(f"cannot read command-line argument {arg!r}: use --key value or key=value")
        elif i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            value, i = argv[i + 1], i + 1
        else:
            value = "true"  # a bare --flag
        pairs[key.replace("-", "_")] = value
        i += 1
    return pairs


def _field_comments(cls):
    """{field name: the comment written beside it in the dataclass's source}, for `--help`."""
    comments = {}
    for line in inspect.getsource(cls).splitlines():
        match = re.match(r"\s+(\w+)\s*:[^#]*#\s*(.+)", line)
        if match:
            comments[match.group(1)] = match.group(2).strip()
    return comments


def options_help(cls):
    """The `--help` text of a script whose options are the dataclass `cls`: its docstring, then every option."""
    script = os.path.basename(sys.argv[0]) or "script"
    description = (sys.modules[cls.__module__].__doc__ or "").strip()
    lines = [f"usage: {script} [--config FILE.yaml] [--option value | option=value ...] [--debug]", "", description,
             "", "options (hyphen or underscore spelling; a YAML --config sets any of them, the command line wins):",
             "  --config FILE.yaml  options from a YAML file", "  --debug  show the traceback of an error"]
    comments = _field_comments(cls)
    for field in dataclasses.fields(cls):
        default = field.default if field.default is not dataclasses.MISSING else None
        note = f"  {comments[field.name]}" if field.name in comments else ""
        lines.append(f"  --{field.name.replace('_', '-')} {_field_type(field).__name__} (default {default!r}){note}")
    return "\n".join(lines)


def parse_options(cls, argv=None, check=None):
    """An instance of the dataclass `cls` from `--config FILE.yaml` and command-line overrides.

    `--help` prints the options and exits. A bad option raises `UsageError` (a `ValueError` naming it), and so does
    a `ValueError` of `check(options)`, the script's own checks, run here when given.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help" in argv or "-h" in argv:
        print(options_help(cls))
        raise SystemExit(0)
    try:
        options = _options_from(cls, argv)
        if check is not None:
            check(options)
    except (UsageError, CommandError):
        raise
    except ValueError as error:
        raise UsageError(None, str(error)) from error
    return options


def _read_config(path):
    if not os.path.isfile(path):
        raise UsageError("--config", f"no such file: {path}")
    try:
        with open(path) as f:
            values = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise CommandError(f"{path}: not valid YAML ({str(error).splitlines()[0]})") from error
    if not isinstance(values, dict):
        raise CommandError(f"{path}: expected a mapping of options, got {type(values).__name__}")
    return values


def _options_from(cls, argv):
    cli = _split_cli(argv)
    values = _read_config(cli.pop("config")) if "config" in cli else {}
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for key in list(values) + list(cli):
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=3)
            known = f"did you mean {' or '.join(map(repr, close))}?" if close else f"known: {', '.join(sorted(fields))}"
            raise ValueError(f"unknown option {key!r}; {known}")
    for key, text in cli.items():
        try:
            values[key] = _parse_cli_value(_field_type(fields[key]), text)
        except yaml.YAMLError as error:
            raise ValueError(f"option {key!r}: cannot read {text!r}") from error
    return cls(**{key: _coerce(key, _field_type(fields[key]), value) for key, value in values.items()})


def check_paths(options, inputs=(), outputs=()):
    """UsageError unless the `inputs` options that are set name existing paths (or could be Hub ids) and the
    `outputs` options name folders that exist or can be made: checked before anything is loaded."""
    for name in inputs:
        value = getattr(options, name)
        if value is not None:
            check_local_or_hub(f"--{name.replace('_', '-')}", value)
    for name in outputs:
        check_creatable_folder(f"--{name.replace('_', '-')}", getattr(options, name))


def check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"option {name!r} must be one of {tuple(choices)}, got {value!r}")


def check_range(name, value, low, high):
    if value is None or not low <= value <= high:
        raise ValueError(f"option {name!r} must be in [{low}, {high}], got {value!r}")


# ---------------------------------------------------------------------------------------------------------------
# Data: a pre-tokenized data set with `caption`, `codes`, `quant_error`
# ---------------------------------------------------------------------------------------------------------------

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
    which the T5 tokenizer makes the lone </s>: the unconditional input of classifier-free guidance."""
    picked = []
    for caption in captions:
        if not isinstance(caption, str):
            caption = caption[int(torch.randint(len(caption), (1,), generator=generator))]
        dropped = caption_dropout > 0 and float(torch.rand(1, generator=generator)) < caption_dropout
        picked.append("" if dropped else caption)
    return picked


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
                 token_loss_positions="stage", known_region_share=0.0, grid=None):
    """The training tuple of every example: a stage t uniform in 1..T, ranks from the order, then eq. 4; with
    `known_region_share` > 0, that share of the examples keeps a random region of its `grid` (h, w) known."""
    codes = batch["codes"]
    batch_size, num_tokens = codes.shape
    stages = torch.randint(1, num_stages + 1, (batch_size,), generator=generator)
    # Tuples are built on the CPU, where the generator is, whatever device the batch is on.
    quant_error = batch["quant_error"].cpu() if "quant_error" in batch else None
    scores = order_scores(order, batch_size, num_tokens, quant_error=quant_error, generator=generator)
    # Drawn only when asked for, so that runs without it see the random numbers they always saw.
    known = known_regions(batch_size, grid, known_region_share, generator) if known_region_share > 0 else None
    tuples = build_stage_tuples(codes.cpu(), scores_to_ranks(scores), stages, num_stages, mask_token_id,
                                codebook_size, p_error=p_error, generator=generator,
                                token_loss_positions=token_loss_positions, known=known)
    return {key: tuples[key].to(codes.device) for key in ("image_tokens", "token_labels", "state_labels")}


class TextStates:
    """T5 inputs of captions; with a frozen encoder, optionally its states, computed once per caption and kept."""

    def __init__(self, tokenizer, max_length, cache=False):
        self.tokenizer, self.max_length, self.cache, self.states = tokenizer, max_length, cache, {}

    def tokenize(self, captions, device):
        tokens = self.tokenizer(captions, padding=True, truncation=True, max_length=self.max_length,
                                return_tensors="pt")
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


# ---------------------------------------------------------------------------------------------------------------
# Exponential moving average of the trained weights
# ---------------------------------------------------------------------------------------------------------------


def trainable_parameters(model):
    """The parameters an optimizer (and the EMA) follows, in a fixed order: EMA copies are matched by position."""
    return [p for p in model.parameters() if p.requires_grad]


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint bookkeeping: `output_dir/checkpoint-STEP`, complete once `step.json` is written
# ---------------------------------------------------------------------------------------------------------------

STEP_FILE = "step.json"


def checkpoints(output_dir):
    """Complete checkpoint folders, oldest first (a run killed while saving leaves one without `step.json`)."""
    if not os.path.isdir(output_dir):
        return []
    found = [name for name in os.listdir(output_dir) if re.fullmatch(r"checkpoint-\d+", name)]
    found = [os.path.join(output_dir, n) for n in sorted(found, key=lambda n: int(n.split("-")[1]))]
    return [path for path in found if os.path.exists(os.path.join(path, STEP_FILE))]


def resolve_checkpoint(resume_from_checkpoint, output_dir):
    """The folder to resume from, or None for `latest` when there is none yet (a fresh start)."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    if not os.path.exists(os.path.join(resume_from_checkpoint, STEP_FILE)):
        raise ValueError(f"option 'resume_from_checkpoint': {resume_from_checkpoint} is not a complete checkpoint")
    return resume_from_checkpoint


def checkpoint_progress(path):
    """(step, training seconds spent up to it) of the checkpoint at `path`; 0 seconds for checkpoints written before
    the seconds were recorded."""
    with open(os.path.join(path, STEP_FILE)) as f:
        progress = json.load(f)
    return progress["step"], progress.get("train_seconds", 0.0)


def save_checkpoint(accelerator, output_dir, step, limit, train_seconds=0.0):
    """`accelerator.save_state` (model, optimizer, scheduler, RNG, sampler, EMA), then drop the oldest beyond `limit`."""
    path = os.path.join(output_dir, f"checkpoint-{step}")
    accelerator.save_state(path)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with open(os.path.join(path, STEP_FILE), "w") as f:
            json.dump({"step": step, "train_seconds": train_seconds}, f)
        for old in checkpoints(output_dir)[: -limit] if limit else []:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return path


def epoch_batches(accelerator, loader, start_batch):
    """Endless batches, epoch after epoch; a resumed run skips what it already consumed in its epoch."""
    epoch, skip = divmod(start_batch, len(loader))
    while True:
        current = accelerator.skip_first_batches(loader, skip) if skip else loader
        current.set_epoch(epoch)  # the seedable sampler shuffles by (seed, epoch): same order after a resume
        yield from current
        epoch, skip = epoch + 1, 0


def check_finite(loss, step):
    """Stop on a NaN/inf loss, naming the step, before anything of that step is written."""
    if not math.isfinite(loss):
        raise FloatingPointError(
            f"loss is {loss} at step {step}: stopping before the update and any checkpoint of that step "
            "(lower learning_rate, check the data, or try mixed_precision=no)"
        )


class TrainClock:
    """Seconds spent in training steps, carried over a resume."""

    def __init__(self, seconds=0.0):
        self.seconds, self._started = seconds, None

    def start(self):
        self._started = time.perf_counter()

    def stop(self):
        self.seconds += time.perf_counter() - self._started


class JsonlLog:
    """Appends one JSON record per line (per-step losses, rewards) so tests and people can read the curve."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def tracker_config(options):
    """Options as tensorboard hparams accept them (numbers, strings, booleans)."""
    return {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in dataclasses.asdict(options).items()}


# ---------------------------------------------------------------------------------------------------------------
# Images, model card, Hub
# ---------------------------------------------------------------------------------------------------------------


def image_grid(images, columns=4):
    """PIL images -> one PIL grid."""
    from PIL import Image

    width, height = images[0].size
    rows = math.ceil(len(images) / columns)
    grid = Image.new("RGB", (columns * width, rows * height))
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def model_card(title, options, metrics, dataset, steps, extra="", sample_image=None, license="apache-2.0"):
    """README.md text: what was trained on what, for how long, and how well, under the Hub's metadata.

    The metadata names the `license` of the weights, the data set (`datasets`) and the model trained from
    (`base_model`: `options.model_name_or_path`, else `options.text_encoder`) where they are Hub ids: the Hub links
    those entries to repositories, so a local folder is named in the text only.
    """
    from huggingface_hub import ModelCardData

    def hub_id(name):
        if isinstance(name, str) and not os.path.exists(name) and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
            return name
        return None

    rows = "\n".join(f"| `{k}` | `{v}` |" for k, v in dataclasses.asdict(options).items() if v is not None)
    measured = "\n".join(f"- {k}: {v:.4f}" if isinstance(v, float) else f"- {k}: {v}" for k, v in metrics.items())
    image = f"\n## Samples\n\n![samples]({sample_image})\n" if sample_image else ""
    base_model = hub_id(getattr(options, "model_name_or_path", None)) or hub_id(getattr(options, "text_encoder", None))
    metadata = ModelCardData(
        library_name="progressive-denoising",
        pipeline_tag="text-to-image",
        license=license,
        tags=["progressive-denoising", "pdm", "text-to-image"],
        datasets=[hub_id(dataset)] if hub_id(dataset) else None,
        base_model=base_model,
    )
    return f"""---
{metadata.to_yaml()}
---

# {title}

A Progressive Denoising Model (PDM) trained with `progressive-denoising` on `{dataset}` for {steps} steps.
{extra}
## Metrics

{measured or "- none recorded"}
{image}
## Training options

| option | value |
|---|---|
{rows}
"""


def push_folder(folder, hub_model_id, message):
    """Create the Hub repository if needed and upload `folder` to it."""
    from huggingface_hub import create_repo, upload_folder

    if not hub_model_id:
        raise ValueError("option 'hub_model_id' is required with push_to_hub")
    repo_id = create_repo(hub_model_id, exist_ok=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=folder, commit_message=message)
    return repo_id
