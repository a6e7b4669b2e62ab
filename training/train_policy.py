"""Dynamic importance scoring (section 3.2, eq. 6-7): train the state head as a policy over both decisions of a stage.

    python -m training.train_policy --model_name_or_path runs/pdm/final --dataset data/tokenized \
        --reward alignment --recogniser progressive_denoising/bundled/pdm-shapes/recogniser

Starting from a PDM trained with a fixed order (usually `quant-error`), each step samples generation trajectories
with `PDMForTextToImage.rollout`: at every stage the state head, read as a policy, draws which masked positions to
fill (Gumbel-top-k by p(generate)) and which generated codes to replace (each with probability p(replace) /
(p(replace) + p(keep))): the paper's action z in {1, -1}. The stage step is `generate`'s own (the `sampling` module),
so sampling changes reach the policy too. The VQ decoder turns the codes into images and a reward scores them:

- `alignment` (the paper's "CLIP similarity" in spirit, for PDM-Shapes): the PDM-Shapes recogniser reads the image
  and the reward is 1 when the whole prompt holds, plus the partial credit of `metrics.attribute_scores` (the mean of
  count / colour / shape / size / layout) so that a nearly right image earns more than a wrong one;
- `l2` (default: any data set): minus the pixel L2 to the data set's image (the VQ decoding of its codes);
- `package.module:function`: any `reward_fn(images, batch) -> (batch,)`.

REINFORCE with a baseline updates the state head (and the decoder with `train_decoder: true`); `rewards.jsonl` is the
reward curve. The saved model has `config.training_order = "learned"`.
"""

import dataclasses
import importlib
import os
import sys
import time
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import AutoTokenizer
from transformers.hf_argparser import HfArg

from progressive_denoising import PDMForTextToImage
from progressive_denoising.pdm_shapes import data as shapes_data, metrics
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser, recognise
from progressive_denoising.vq import decode_codes, postprocess_images
from progressive_denoising.commands.base import run_script
from training import data, hub, loop, options


@dataclasses.dataclass
class Options:
    model_name_or_path: Optional[str] = HfArg(default=None, help="a PDM folder, or a pipeline folder with tokenizer/ "
                                              "model/ vqvae/ (required)")
    tokenizer: Optional[str] = HfArg(default=None, help="caption tokenizer; default: the pipeline's")
    vqvae: Optional[str] = HfArg(default=None, help="diffusers VQModel folder; default: the pipeline's")
    dataset: Optional[str] = HfArg(default=None, help="pre-tokenized data set (its captions, and its codes for "
                                   "reward l2): a load_from_disk folder or Hub id (required)")
    train_split: str = HfArg(default="train", help="split whose captions are the prompts")
    num_stages: Optional[int] = HfArg(default=None, help="stages of a rollout; default: the model's")
    temperature: float = HfArg(default=1.0, help="of the codes sampled by the token head")
    reward: str = HfArg(default="l2", help='l2, alignment (PDM-Shapes: needs recogniser), or "package.module:function"'
                        " (images, batch)")
    recogniser: Optional[str] = HfArg(default=None, help="PDM-Shapes recogniser folder, for reward alignment")
    policy_temperature: float = HfArg(default=1.0, help="the policy draws from softmax(log p / tau): lower explores "
                                      "closer to generate()")
    rollouts_per_prompt: int = HfArg(default=1, help="trajectories drawn for each prompt of a batch")
    baseline: str = HfArg(default="moving-average", help="moving-average, batch-mean, or per-prompt: the mean reward "
                          "of the prompt's other rollouts")
    baseline_momentum: float = HfArg(default=0.9, help="of the moving-average baseline")
    train_decoder: bool = HfArg(default=False, help="also update the decoder (its graph is kept over all stages)")
    train_batch_size: int = HfArg(default=8, help="prompts per step and process")
    max_train_steps: int = HfArg(default=1000, help="policy-gradient steps")
    max_minutes: Optional[float] = HfArg(default=None, help="stop (and save) after this many minutes even if "
                                         "max_train_steps is not reached")
    learning_rate: float = HfArg(default=1e-5, help="AdamW learning rate")
    weight_decay: float = HfArg(default=0.0, help="AdamW weight decay")
    max_grad_norm: Optional[float] = HfArg(default=1.0, help="gradient clipping; null: none")
    max_caption_length: int = HfArg(default=128, help="prompt tokens kept")
    mixed_precision: Optional[str] = HfArg(default=None, help="no / fp16 / bf16; null keeps what `accelerate "
                                           "launch` says")
    seed: int = HfArg(default=0, help="seeds the prompts and every draw of a step")
    output_dir: str = HfArg(default="pdm-policy", help="folder of rewards.jsonl and final/")
    log_with: Optional[str] = HfArg(default=None, help="Accelerate tracker; null: none")
    push_to_hub: bool = HfArg(default=False, help="upload final/ at the end")
    hub_model_id: Optional[str] = HfArg(default=None, help="the Hub repository of push_to_hub")


def check_options(o):
    options.check_required(o, "model_name_or_path", "dataset")
    options.check_choice("baseline", o.baseline, ("moving-average", "batch-mean", "per-prompt"))
    if o.baseline == "per-prompt" and o.rollouts_per_prompt < 2:
        raise ValueError("option 'baseline' per-prompt needs option 'rollouts_per_prompt' of 2 or more")
    if not o.policy_temperature > 0:
        raise ValueError(f"option 'policy_temperature' must be positive, got {o.policy_temperature!r}")
    if o.reward == "alignment" and o.recogniser is None:
        raise ValueError("option 'reward' alignment needs option 'recogniser': a PDM-Shapes recogniser folder")
    options.check_range("baseline_momentum", o.baseline_momentum, 0.0, 1.0)
    if o.max_minutes is not None and not o.max_minutes > 0:
        raise ValueError(f"option 'max_minutes' must be positive, got {o.max_minutes!r}")
    if o.temperature <= 0:
        raise ValueError(f"option 'temperature' must be positive, got {o.temperature!r}")
    options.check_positive(o, "train_batch_size", "max_train_steps", "rollouts_per_prompt")


def load_components(o):
    """(tokenizer, model, vqvae) from a pipeline folder or a model folder plus `tokenizer` / `vqvae` options."""
    from diffusers import VQModel

    pipeline = os.path.isdir(os.path.join(o.model_name_or_path, "model"))
    part = (lambda name: os.path.join(o.model_name_or_path, name)) if pipeline else (lambda name: o.model_name_or_path)
    model = PDMForTextToImage.from_pretrained(part("model"))
    tokenizer = AutoTokenizer.from_pretrained(o.tokenizer or part("tokenizer"))
    vqvae_path = o.vqvae or (part("vqvae") if pipeline else None)
    if vqvae_path is None:
        raise ValueError("option 'vqvae' is required: the reward compares decoded images")
    return tokenizer, model, VQModel.from_pretrained(vqvae_path).eval()


def l2_reward(images, batch):
    """Minus the mean squared pixel error to the ground-truth image (the VQ reconstruction of the data's codes)."""
    return -(images.float() - batch["target_images"].float()).pow(2).mean(dim=(1, 2, 3))


class AlignmentReward:
    """Per image: 1 when the recogniser finds the whole prompt, plus the mean of its partial credit (count, colour,
    shape, size, layout; `metrics.attribute_scores`). In [0, 2]."""

    uses_targets = False  # reads the prompts, not the data set's images: `policy_step` need not decode them

    def __init__(self, path, device):
        self.recogniser = ShapesRecogniser.from_pretrained(path, device=device)

    def __call__(self, images, batch):
        pixels = (postprocess_images(images, "pt") * 255).round().to(torch.uint8)
        found = recognise(self.recogniser, pixels)
        size = pixels.shape[-1]
        rewards = []
        for scene, caption in zip(found, batch["prompts"]):
            prompt = shapes_data.parse_caption(caption)
            partial = metrics.attribute_scores(scene, prompt, size)
            rewards.append(float(metrics.scene_matches(scene, prompt, size)) + sum(partial.values()) / len(partial))
        return torch.tensor(rewards, device=images.device)


def load_reward(o, device):
    if o.reward == "l2":
        return l2_reward
    if o.reward == "alignment":
        return AlignmentReward(o.recogniser, device)
    if ":" not in o.reward:
        raise ValueError(f"option 'reward' must be 'alignment', 'l2' or 'package.module:function', got {o.reward!r}")
    module, function = o.reward.split(":")
    return getattr(importlib.import_module(module), function)


class Baseline:
    """REINFORCE baseline: an exponential moving average of past mean rewards, the batch's mean reward, or per prompt
    the mean reward of its other rollouts (leave-one-out over `group` consecutive rollouts of one prompt)."""

    def __init__(self, kind, momentum, group=1):
        self.kind, self.momentum, self.group, self.value = kind, momentum, group, None

    def __call__(self, rewards):
        if self.kind == "per-prompt":
            grouped = rewards.view(-1, self.group)
            return ((grouped.sum(1, keepdim=True) - grouped) / (self.group - 1)).flatten()
        mean = rewards.mean().item()
        if self.kind == "batch-mean":
            return mean
        value = mean if self.value is None else self.value
        self.value = mean if self.value is None else self.momentum * self.value + (1 - self.momentum) * mean
        return value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def trainable_parameters(model, train_decoder):
    model.requires_grad_(False)
    model.state_head.requires_grad_(True)
    if train_decoder:
        model.decoder.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def policy_step(o, accelerator, model, vqvae, tokenizer, batch, generator, reward_fn, baseline):
    """One REINFORCE update; returns (loss, mean reward)."""
    k = o.rollouts_per_prompt
    batch["prompts"] = [prompt for prompt in data.pick_captions(batch["caption"], generator) for _ in range(k)]
    tokens = tokenizer(batch["prompts"], padding=True, truncation=True, max_length=o.max_caption_length,
                       return_tensors="pt").to(accelerator.device)
    grid = model.config.token_grid_size
    if getattr(reward_fn, "uses_targets", True):
        with torch.no_grad():
            batch["target_images"] = decode_codes(vqvae, batch["codes"], grid).repeat_interleave(k, 0)
    with accelerator.autocast():
        trajectory = model.rollout(tokens.input_ids, tokens.attention_mask, o.num_stages, o.temperature, generator,
                                   o.policy_temperature)
    with torch.no_grad():
        rewards = reward_fn(decode_codes(vqvae, trajectory.codes, grid), batch).float()
    all_rewards = accelerator.gather(rewards)
    # per prompt, the baseline needs this process's own rollouts; the others average over every process
    advantage = rewards - baseline(rewards if o.baseline == "per-prompt" else all_rewards)
    loss = -(advantage * trajectory.log_prob).mean()  # gradient of eq. 6 by the policy-gradient theorem
    return loss, all_rewards.mean().item()


def main(argv=None, reward_fn=None):
    o = options.parse_options(Options, argv, check=check_options)
    # Paths are checked before anything loads (Hub ids pass: they are not local paths).
    options.check_paths(o, inputs=("model_name_or_path", "tokenizer", "vqvae", "dataset", "recogniser"),
                        outputs=("output_dir",))
    accelerator = Accelerator(mixed_precision=o.mixed_precision, log_with=o.log_with, project_dir=o.output_dir,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=o.seed))
    loop.warn_emulated_bf16(accelerator)
    set_seed(o.seed)
    os.makedirs(o.output_dir, exist_ok=True)
    tokenizer, model, vqvae = load_components(o)
    o.num_stages = o.num_stages or model.config.num_stages
    reward_fn = reward_fn or load_reward(o, accelerator.device)
    train, _, _ = data.load_splits(o.dataset, o.train_split, None)
    loader = torch.utils.data.DataLoader(train, batch_size=o.train_batch_size, shuffle=True, drop_last=True,
                                         collate_fn=data.collate)
    # Rollouts are the trajectories `generate` draws: no dropout (a T5 trained with the decoder would keep its
    # dropout in train mode); the state head still gets gradients.
    model.to(accelerator.device).eval()
    vqvae.to(accelerator.device)
    parameters = trainable_parameters(model, o.train_decoder)
    optimizer = torch.optim.AdamW(parameters, lr=o.learning_rate, betas=(0.9, 0.96), weight_decay=o.weight_decay)
    loader = accelerator.prepare(loader)  # the model stays unwrapped: gradients are averaged by hand below
    baseline, log = Baseline(o.baseline, o.baseline_momentum, o.rollouts_per_prompt), loop.JsonlLog(
        os.path.join(o.output_dir, "rewards.jsonl"), accelerator.is_main_process)
    accelerator.init_trackers("pdm-policy", config=loop.tracker_config(o))
    batches, began = loop.epoch_batches(accelerator, loader, 0), time.monotonic()
    progress = loop.progress_bar(accelerator, 0, o.max_train_steps)
    for step in range(1, o.max_train_steps + 1):
        generator = data.step_generator(o.seed, accelerator.process_index, step)
        loss, reward = policy_step(o, accelerator, model, vqvae, tokenizer, next(batches), generator, reward_fn,
                                   baseline)
        loop.check_finite(loss.item(), step)
        loss.backward()
        for p in parameters:
            if p.grad is not None and accelerator.num_processes > 1:
                p.grad = accelerator.reduce(p.grad, "mean")
        if o.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(parameters, o.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        log.write(step=step, loss=loss.item(), reward=reward, baseline=baseline.value)
        accelerator.log({"policy_loss": loss.item(), "reward": reward}, step=step)
        progress.update()
        progress.set_postfix(loss=f"{loss.item():.3f}", lr=f"{o.learning_rate:.2e}", reward=f"{reward:.3f}",
                             refresh=False)
        if out_of_time(accelerator, o.max_minutes, began):
            loop.report(accelerator, f"step {step}: {o.max_minutes} minutes are up")
            break
    progress.close()
    if accelerator.is_main_process:
        folder = save(o, model, tokenizer, vqvae, reward, step)
        loop.report(accelerator, f"step {step}: saved {folder}")
    loop.finish(accelerator)
    return reward


def out_of_time(accelerator, max_minutes, began):
    """Whether `max_minutes` have passed since `began` on any process: all processes stop after the same step."""
    if max_minutes is None:
        return False
    late = torch.tensor(float(time.monotonic() - began > 60 * max_minutes), device=accelerator.device)
    return bool(accelerator.reduce(late, "max").item())


def save(o, model, tokenizer, vqvae, reward, steps):
    """A pipeline folder whose model generates in the learned order by default; returns its path."""
    from progressive_denoising.pipeline_pdm import PDMPipeline

    model.config.training_order = "learned"
    model.requires_grad_(True)
    folder = os.path.join(o.output_dir, "final")
    PDMPipeline(tokenizer=tokenizer, model=model, vqvae=vqvae).save_pretrained(folder)
    card = hub.model_card("PDM with a learned order (dynamic importance scoring)", o, {"final_reward": reward},
                          o.dataset, steps, extra="\nState head trained by policy gradient (eq. 6-7); "
                          "`generate()` uses it by default (`order=\"learned\"`).\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)
    if o.push_to_hub:
        hub.push_folder(folder, o.hub_model_id, f"PDM policy after {steps} steps")
    return folder


if __name__ == "__main__":
    # One-line errors (exit status 2 for a bad option, 1 for a failure), a traceback with --debug.
    sys.exit(run_script(main, prog="train_policy.py"))
