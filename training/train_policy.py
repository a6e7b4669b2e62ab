"""Dynamic importance scoring (section 3.2, eq. 6-7): train the state head as a policy over positions.

    python training/train_policy.py --model_name_or_path runs/pdm/final --vqvae runs/vq --dataset data/tokenized

Starting from a PDM trained with a fixed order (usually `quant-error`), each step samples generation
trajectories: at every stage the positions to fill are drawn among the masked ones without replacement, with
probabilities softmax(state head's "generate" logit) over the masked positions (Gumbel-top-k), and the log-probability
of the draw is its Plackett-Luce probability. Codes come from the token head; the VQ decoder turns them into an
image; the reward is minus the pixel L2 to the ground-truth image (the VQ decoding of the data set's codes) unless
another scorer `reward_fn(images, batch) -> (batch,)` is given. REINFORCE with a baseline updates the state head
(and the decoder with `train_decoder: true`). The saved model has `config.training_order = "learned"`.
"""

import dataclasses
import importlib
import os
import sys
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from progressive_denoising import PDMForTextToImage  # noqa: E402
from progressive_denoising.configuration_pdm import STATE_GENERATE  # noqa: E402
from progressive_denoising.ordering import cumulative_schedule, rand  # noqa: E402
from progressive_denoising.vq import decode_codes  # noqa: E402
from progressive_denoising.commands.base import run_script  # noqa: E402
from training import utils  # noqa: E402


@dataclasses.dataclass
class Options:
    model_name_or_path: Optional[str] = None  # a PDM folder, or a pipeline folder with tokenizer/ model/ vqvae/
    tokenizer: Optional[str] = None
    vqvae: Optional[str] = None
    dataset: Optional[str] = None
    train_split: str = "train"
    num_stages: Optional[int] = None  # default: the model's
    temperature: float = 1.0  # of the codes sampled by the token head
    reward: str = "l2"  # or "package.module:function" with the signature reward_fn(images, batch) -> (batch,)
    baseline: str = "moving-average"  # or batch-mean
    baseline_momentum: float = 0.9
    train_decoder: bool = False
    batch_size: int = 8
    max_steps: int = 1000
    learning_rate: float = 1e-5
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    max_caption_length: int = 128
    mixed_precision: Optional[str] = None
    seed: int = 0
    output_dir: str = "pdm-policy"
    log_with: Optional[str] = None
    push_to_hub: bool = False
    hub_model_id: Optional[str] = None


def check_options(o):
    for name in ("model_name_or_path", "dataset"):
        if getattr(o, name) is None:
            raise ValueError(f"option {name!r} is required")
    utils.check_choice("baseline", o.baseline, ("moving-average", "batch-mean"))
    utils.check_range("baseline_momentum", o.baseline_momentum, 0.0, 1.0)
    if o.temperature <= 0:
        raise ValueError(f"option 'temperature' must be positive, got {o.temperature!r}")
    for name in ("batch_size", "max_steps"):
        if getattr(o, name) < 1:
            raise ValueError(f"option {name!r} must be a positive integer, got {getattr(o, name)!r}")


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


def load_reward(name):
    if name == "l2":
        return l2_reward
    if ":" not in name:
        raise ValueError(f"option 'reward' must be 'l2' or 'package.module:function', got {name!r}")
    module, function = name.split(":")
    return getattr(importlib.import_module(module), function)


def sample_positions(logits, candidates, count, generator):
    """Draw `count` candidates without replacement, proportional to softmax(logits) over the candidates.

    Gumbel-top-k gives the draw; its log-probability is the Plackett-Luce probability of the sequence of choices,
    sum_i [l_{c_i} - log sum_{j remaining} exp l_j], differentiable in `logits`.
    Returns ((batch, L) bool chosen, (batch,) log-probability).
    """
    logits = logits.float().masked_fill(~candidates, float("-inf"))
    gumbel = -torch.log(-torch.log(rand(logits.shape, generator, logits.device).clamp(1e-20, 1 - 1e-7)))
    choices = (logits.detach() + gumbel).argsort(dim=-1, descending=True)[:, :count]  # in order of drawing
    picked = logits.gather(1, choices)
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    probability = (picked - log_total).exp()
    drawn_before = probability.cumsum(-1) - probability  # mass already taken by earlier choices
    log_remaining = log_total + torch.log1p(-drawn_before.clamp(max=1 - 1e-6))
    chosen = torch.zeros_like(candidates).scatter_(1, choices, True)
    return chosen, (picked - log_remaining).sum(-1)


def sample_codes(token_logits, temperature, generator):
    """Gumbel-max sampling of one code per position."""
    uniform = rand(token_logits.shape, generator, token_logits.device).clamp(1e-20, 1 - 1e-7)
    return (token_logits.float() / temperature - torch.log(-torch.log(uniform))).argmax(-1)


def rollout(model, text_states, text_mask, num_stages, temperature, generator, train_decoder):
    """One trajectory per prompt: the final codes and the summed log-probability of the positions chosen."""
    config = model.config
    batch_size, num_tokens = text_states.shape[0], config.num_image_tokens
    cumulative = cumulative_schedule(num_tokens, num_stages)
    codes = torch.full((batch_size, num_tokens), config.mask_token_id, dtype=torch.long, device=text_states.device)
    log_prob = torch.zeros(batch_size, device=text_states.device)
    with torch.set_grad_enabled(train_decoder):
        key_values = model.decoder.text_key_values(text_states)
    for stage in range(num_stages):
        # Without train_decoder only the state head learns: the decoder runs without a graph, which keeps memory
        # flat over the T stages.
        with torch.set_grad_enabled(train_decoder):
            hidden = model.decoder(codes, key_values, text_mask)
        state_logits = model.state_head(hidden)
        masked = codes == config.mask_token_id
        count = int(cumulative[stage + 1] - cumulative[stage])
        # Positions are drawn by p(generate), as generate() ranks them (softmax over the three states).
        log_p_generate = state_logits.float().log_softmax(-1)[..., STATE_GENERATE]
        generate, step_log_prob = sample_positions(log_p_generate, masked, count, generator)
        log_prob = log_prob + step_log_prob
        with torch.no_grad():
            # Error recovering exactly as in generate(), bounded by the codes generated in the stage before.
            replace = PDMForTextToImage.choose_replacements(
                state_logits.float(), ~masked, int(cumulative[stage] - cumulative[max(stage - 1, 0)]))
            sampled = sample_codes(model.token_head(hidden), temperature, generator)
        codes = torch.where(generate | replace, sampled, codes)
    return codes, log_prob


class Baseline:
    """REINFORCE baseline: an exponential moving average of past mean rewards, or the batch's mean reward."""

    def __init__(self, kind, momentum):
        self.kind, self.momentum, self.value = kind, momentum, None

    def __call__(self, rewards):
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
    captions = utils.pick_captions(batch["caption"], generator)
    tokens = tokenizer(captions, padding=True, truncation=True, max_length=o.max_caption_length, return_tensors="pt")
    tokens = tokens.to(accelerator.device)
    grid = model.config.token_grid_size
    batch["target_images"] = decode_codes(vqvae, batch["codes"], grid)
    with accelerator.autocast():
        text_states = model.encode_text(tokens.input_ids, tokens.attention_mask)
        codes, log_prob = rollout(model, text_states, tokens.attention_mask.bool(), o.num_stages, o.temperature,
                                  generator, o.train_decoder)
    rewards = reward_fn(decode_codes(vqvae, codes, grid), batch).detach().float()
    advantage = rewards - baseline(accelerator.gather(rewards))
    loss = -(advantage * log_prob).mean()  # gradient of eq. 6 by the policy-gradient theorem
    return loss, accelerator.gather(rewards).mean().item()


def main(argv=None, reward_fn=None):
    o = utils.parse_options(Options, argv, check=check_options)
    # Paths are checked before anything loads (Hub ids pass: they are not local paths).
    utils.check_paths(o, inputs=("model_name_or_path", "tokenizer", "vqvae", "dataset"), outputs=("output_dir",))
    accelerator = Accelerator(mixed_precision=o.mixed_precision, log_with=o.log_with, project_dir=o.output_dir,
                              dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=o.seed))
    set_seed(o.seed)
    os.makedirs(o.output_dir, exist_ok=True)
    tokenizer, model, vqvae = load_components(o)
    o.num_stages = o.num_stages or model.config.num_stages
    reward_fn = reward_fn or load_reward(o.reward)
    train, _, _ = utils.load_splits(o.dataset, o.train_split, None)
    loader = torch.utils.data.DataLoader(train, batch_size=o.batch_size, shuffle=True, drop_last=True,
                                         collate_fn=utils.collate)
    model.to(accelerator.device).train()
    vqvae.to(accelerator.device)
    parameters = trainable_parameters(model, o.train_decoder)
    optimizer = torch.optim.AdamW(parameters, lr=o.learning_rate, betas=(0.9, 0.96), weight_decay=o.weight_decay)
    loader = accelerator.prepare(loader)  # the model stays unwrapped: gradients are averaged by hand below
    baseline, log = Baseline(o.baseline, o.baseline_momentum), utils.JsonlLog(
        os.path.join(o.output_dir, "rewards.jsonl"), accelerator.is_main_process)
    accelerator.init_trackers("pdm-policy", config=utils.tracker_config(o))
    batches = utils.epoch_batches(accelerator, loader, 0)
    for step in range(1, o.max_steps + 1):
        generator = utils.step_generator(o.seed, accelerator.process_index, step)
        loss, reward = policy_step(o, accelerator, model, vqvae, tokenizer, next(batches), generator, reward_fn,
                                   baseline)
        utils.check_finite(loss.item(), step)
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
    if accelerator.is_main_process:
        save(o, model, tokenizer, vqvae, reward)
    accelerator.end_training()
    return reward


def save(o, model, tokenizer, vqvae, reward):
    """A pipeline folder whose model generates in the learned order by default."""
    from progressive_denoising.pipeline_pdm import PDMPipeline

    model.config.training_order = "learned"
    model.requires_grad_(True)
    folder = os.path.join(o.output_dir, "final")
    PDMPipeline(tokenizer=tokenizer, model=model, vqvae=vqvae).save_pretrained(folder)
    card = utils.model_card("PDM with a learned order (dynamic importance scoring)", o, {"final_reward": reward},
                            o.dataset, o.max_steps, extra="\nState head trained by policy gradient (eq. 6-7); "
                            "`generate()` uses it by default (`order=\"learned\"`).\n")
    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(card)
    if o.push_to_hub:
        utils.push_folder(folder, o.hub_model_id, f"PDM policy after {o.max_steps} steps")


if __name__ == "__main__":
    # One-line errors (exit status 2 for a bad option, 1 for a failure), a traceback with --debug.
    sys.exit(run_script(main, prog="train_policy.py"))
