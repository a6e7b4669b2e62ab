"""What a training loop keeps track of: the parameters it trains, checkpoints (`output_dir/checkpoint-STEP`, complete
once `step.json` is written) and resuming from them, the epochs of batches, the training clock, the JSONL logs and
the stop on a non-finite loss."""

import dataclasses
import json
import math
import os
import re
import shutil
import time

import torch


def trainable_parameters(model):
    """The parameters an optimizer (and the EMA) follows, in a fixed order: EMA copies are matched by position."""
    return [p for p in model.parameters() if p.requires_grad]


def tied_weight_names(model):
    """Names (as in `model.state_dict()`) of the weights that a transformers model inside `model` declares tied to
    another: T5's `encoder.embed_tokens.weight` is its `shared.weight`."""
    names = set()
    for prefix, module in model.named_modules():
        for target in getattr(module, "_tied_weights_keys", None) or ():  # a dict in transformers 5, a list in 4
            names.add(f"{prefix}.{target}" if prefix else target)
    return names


def drop_tied_copies(models, weights, output_dir):
    """`accelerator.save_state` pre-hook: a checkpoint holds each tied weight once, the declared copy left out (the
    state dicts hold both names of one tensor, which safetensors cannot store and Accelerate drops with a warning).
    `load_state` restores the copy, which is the same tensor as its source in the model."""
    for model, state in zip(models, weights):
        for name in tied_weight_names(model):
            state.pop(name, None)


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


def progress_bar(accelerator, start, total):
    """The main process's progress bar over the steps (with their rate and the time left), as diffusers' training
    examples show it; the other processes get one that prints nothing."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=start, desc="steps", disable=not accelerator.is_local_main_process,
                dynamic_ncols=True)


def report(accelerator, message):
    """A line on the main process, above its progress bar (an evaluation, a checkpoint)."""
    if accelerator.is_local_main_process:
        from tqdm.auto import tqdm

        tqdm.write(message)


def cpu_has_bf16():
    """Whether oneDNN runs bf16 in hardware here (AVX512-BF16 or AMX) rather than emulating it."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def warn_emulated_bf16(accelerator):
    """A line when bf16 autocast runs on a CPU without bf16 arithmetic (an AVX2-only CPU, say): it is emulated there,
    and an eager LoRA step took 13x longer than in float32 on such a CPU (docs/lora.md)."""
    if accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu" and not cpu_has_bf16():
        report(accelerator, f"warning: mixed_precision bf16 on a CPU without bf16 arithmetic "
                            f"({torch.backends.cpu.get_cpu_capability()}): emulated, slower than mixed_precision no")


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


def finish(accelerator):
    """End a run on every process together: wait until the main process has saved, close the trackers, then take the
    process group down. A process that left while another still held the group could leave that one hanging in
    gloo's teardown."""
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
