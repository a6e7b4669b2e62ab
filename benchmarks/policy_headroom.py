"""How much a learned order can gain on a model: the mean alignment reward (train_policy.py's `AlignmentReward`) of
the same prompts and sampling seeds under several position rules: the state head read greedily (`generate`'s
default), the state head as a policy at a few temperatures (`rollout`, the trajectories REINFORCE samples), and the
fixed random and raster orders.

    python -m benchmarks.policy_headroom --model runs/tables-orders/order=quant-error/seed=0/final \
        --recogniser progressive_denoising/bundled/pdm-shapes/recogniser --data runs/shapes32 --num-prompts 1000 \
        --out docs/results/learned-order/headroom-quant-error-seed0.json
"""

import argparse
import json

import torch

from benchmarks.shapes_tables import load_test, prompt_batches
from progressive_denoising import PDMPipeline
from training.train_policy import AlignmentReward

RULES = {"state head, greedy": dict(order="learned"), "policy, temperature 1": dict(policy_temperature=1.0),
         "policy, temperature 0.3": dict(policy_temperature=0.3), "random": dict(order="random"),
         "raster": dict(order="raster")}


@torch.no_grad()
def rule_rewards(pipe, reward, captions, rule, batch_size, seed):
    """Per-prompt rewards of `captions` (image i drawn with generator seed + i) under one position rule."""
    rewards = []
    for chunk, generators in prompt_batches(captions, seed, batch_size):
        input_ids, attention_mask = pipe.encode_prompt(chunk)
        if "order" in rule:
            codes = pipe.model.generate(input_ids, attention_mask, generator=generators, **rule)
        else:
            codes = pipe.model.rollout(input_ids, attention_mask, generator=generators, **rule).codes
        rewards.append(reward(pipe.decode_codes(codes), {"prompts": chunk}))
    return torch.cat(rewards)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="PDM pipeline folder")
    parser.add_argument("--recogniser", required=True)
    parser.add_argument("--data", required=True, help="PDM-Shapes image data set (its prompts)")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--num-prompts", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="JSON file")
    args = parser.parse_args(argv)
    pipe = PDMPipeline.from_pretrained(args.model).to(args.device)
    pipe.model.eval()
    reward = AlignmentReward(args.recogniser, args.device)
    _, captions = load_test(args.data, args.num_prompts, args.split)
    results, greedy = {}, None
    for name, rule in RULES.items():
        rewards = rule_rewards(pipe, reward, captions, rule, args.batch_size, args.seed)
        greedy = rewards if greedy is None else greedy
        # the same prompts and seeds under each rule: the paired difference has the smaller error
        difference = rewards - greedy
        results[name] = {"reward": rewards.mean().item(), "error": (rewards.std() / len(rewards) ** 0.5).item(),
                         "minus_greedy": difference.mean().item(),
                         "minus_greedy_error": (difference.std() / len(rewards) ** 0.5).item()}
        r = results[name]
        print(f"{name:24s} reward {r['reward']:.3f} +- {r['error']:.3f}   minus greedy {r['minus_greedy']:+.3f} "
              f"+- {r['minus_greedy_error']:.3f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(vars(args), rules=results), f, indent=2)


if __name__ == "__main__":
    main()
