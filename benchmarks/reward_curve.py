"""The learned order's reward curve: mean reward per block of policy steps (training/train_policy.py's rewards.jsonl),
with a least-squares slope per run and its standard error, so "does the reward rise?" has a number.

    python -m benchmarks.reward_curve --run runs/tables-orders/order=learned/seed=0 \
        --run runs/tables-orders/order=learned/seed=1 --block 25 --out docs/results/reward_curve.json \
        --plot docs/reward_curve.png
"""

import argparse
import json
import os

import numpy as np


def read_rewards(run):
    """The rewards of `run`: a folder, or "FOLDER,FOLDER,..." for a policy continued from one folder's final weights
    in the next (their rewards one after the other)."""
    rewards = []
    for folder in run.split(","):
        with open(os.path.join(folder, "rewards.jsonl")) as f:
            rewards += [json.loads(line)["reward"] for line in f]
    return np.array(rewards)


def slope(rewards):
    """(change of the reward per 100 steps, its standard error) of a least-squares line through every step."""
    coefficients, covariance = np.polyfit(np.arange(len(rewards), dtype=float), rewards, 1, cov=True)
    return 100 * coefficients[0], 100 * float(np.sqrt(covariance[0, 0]))


def summarise(run, block):
    rewards = read_rewards(run)
    blocks = [float(rewards[i:i + block].mean()) for i in range(0, len(rewards), block)]
    per_100, error = slope(rewards)
    return {"steps": len(rewards), "block": block, "block_means": blocks, "slope_per_100_steps": float(per_100),
            "slope_standard_error": float(error)}


def plot(curves, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, curve in curves.items():
        block = curve["block"]
        x = [block * (i + 0.5) for i in range(len(curve["block_means"]))]
        ax.plot(x, curve["block_means"], marker="o", label=name)
    ax.set_xlabel("policy steps")
    ax.set_ylabel(f"mean reward (blocks of {block} steps)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="train_policy.py output folder, or folders "
                        "joined by commas for a run continued from the previous one's weights (repeatable)")
    parser.add_argument("--label", action="append", default=None, help="one per --run (default: the folder)")
    parser.add_argument("--block", type=int, default=25)
    parser.add_argument("--out", help="JSON file for the curves")
    parser.add_argument("--plot", help="PNG file")
    args = parser.parse_args(argv)
    labels = args.label or args.run
    if len(labels) != len(args.run):
        parser.error("give one --label per --run")
    curves = {label: summarise(run, args.block) for label, run in zip(labels, args.run)}
    for label, curve in curves.items():
        means = " ".join(f"{m:.3f}" for m in curve["block_means"])
        print(f"{label}: {curve['steps']} steps; block means {means}; slope {curve['slope_per_100_steps']:+.4f} "
              f"+- {curve['slope_standard_error']:.4f} per 100 steps")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(curves, f, indent=2)
    if args.plot:
        plot(curves, args.plot)


if __name__ == "__main__":
    main()
