"""Prompt alignment against training minutes: every snapshot of one or more `train_pdm.py` runs, scored on PDM-Shapes.

    python -m training.train_pdm --config training/configs/shapes32_cpu.yaml snapshot_steps=500 output_dir=runs/pdm
    python -m benchmarks.learning_curve --run runs/pdm --run runs/ar --vqvae runs/vq32 \
        --recogniser runs/recogniser32 --data runs/shapes32 --num-prompts 300 --out curve.json --plot curve.png

A snapshot (`snapshots/step-N/`, written every `snapshot_steps`) holds the model as the run would save it at that
step (EMA weights when kept) and the training seconds spent to reach it (evaluation and saving excluded). Each is
sampled on the first `--num-prompts` test prompts at the model's own stage count (the AR baseline: one code per
step) and scored like `pdm evaluate` (alignment, held-out pairs, attribute credit, FID). Scores are cached in
`learning_curve.json` inside each run, so rerunning after more snapshots only scores the new ones.
"""

import argparse
import json
import os
import re

import torch
from diffusers import VQModel
from transformers import AutoModel, AutoTokenizer

from progressive_denoising import PDMARForTextToImage, PDMPipeline
from progressive_denoising.pdm_shapes import metrics
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser
from benchmarks.shapes_tables import generate_images, load_test, rows_by_object_count  # as the tables sample

CACHE_NAME = "learning_curve.json"


def snapshots(run):
    """(step, folder) of every snapshot of `run`, in step order."""
    folder = os.path.join(run, "snapshots")
    found = [(int(m.group(1)), os.path.join(folder, name)) for name in os.listdir(folder)
             if (m := re.fullmatch(r"step-(\d+)", name))] if os.path.isdir(folder) else []
    if not found:
        raise ValueError(f"--run {run}: no snapshots/step-N folders (train with snapshot_steps set)")
    return sorted(found)


def score_snapshot(folder, tokenizer, vqvae, recogniser, real_images, captions, args):
    model = AutoModel.from_pretrained(folder).eval()
    pipe = PDMPipeline(tokenizer=tokenizer, model=model, vqvae=vqvae)
    stage_kwargs = {} if isinstance(model, PDMARForTextToImage) else {"num_stages": model.config.num_stages}
    images, seconds = generate_images(pipe, captions, args.seed, args.batch_size, args.guidance_scale, **stage_kwargs)
    row = metrics.evaluate_images(recogniser, images, captions, real_images)
    if args.by_objects:
        row["by_objects"] = {name.lstrip(", "): value for name, value in
                             rows_by_object_count("", recogniser, images, captions, real_images).items()}
    with open(os.path.join(folder, "train_seconds.json")) as f:
        row["train_minutes"] = json.load(f)["train_seconds"] / 60
    return dict(row, seconds_per_image=seconds / len(captions))


def run_curve(run, vqvae, recogniser, real_images, captions, args):
    cache_path = os.path.join(run, CACHE_NAME)
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    key = f"prompts={len(captions)} seed={args.seed} guidance={args.guidance_scale}"
    rows = cache.setdefault(key, {})
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or os.path.join(run, "tokenizer"))
    for step, folder in snapshots(run):
        if str(step) not in rows or (args.by_objects and "by_objects" not in rows[str(step)]):
            rows[str(step)] = score_snapshot(folder, tokenizer, vqvae, recogniser, real_images, captions, args)
            with open(cache_path, "w") as f:
                json.dump(cache, f, indent=2)
        row = rows[str(step)]
        print(f"{run} step {step}: {row['train_minutes']:.1f} min, alignment {row['alignment']:.3f} "
              f"(held-out {row['alignment_held_out']:.3f}), FID {row['fid']:.0f}", flush=True)
    return {int(step): row for step, row in rows.items()}


def plot(curves, path, metric="alignment", by_objects=False):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=120)
    for index, (label, rows) in enumerate(curves.items()):
        colour = f"C{index}"
        points = sorted((row["train_minutes"], row[metric]) for row in rows.values())
        axis.plot(*zip(*points), marker="o", color=colour, label=label)
        for part, style in (("one object", "--"), ("two objects", ":")) if by_objects else ():
            points = sorted((row["train_minutes"], row["by_objects"][part][metric]) for row in rows.values())
            axis.plot(*zip(*points), linestyle=style, color=colour, label=f"{label}, {part}")
    axis.set_xlabel("training minutes (2-core CPU)")
    axis.set_ylabel(f"prompt {metric}" if metric.startswith("alignment") else metric)
    axis.set_ylim(0, 1)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(path)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, help="a train_pdm.py output_dir (repeatable)")
    parser.add_argument("--label", action="append", help="legend label of each --run (default: its folder name)")
    parser.add_argument("--vqvae", required=True, help="the VQ model the runs' codes come from")
    parser.add_argument("--tokenizer", help="default: each run's tokenizer/ folder")
    parser.add_argument("--recogniser", required=True)
    parser.add_argument("--data", required=True, help="PDM-Shapes folder (its test split is used)")
    parser.add_argument("--num-prompts", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--by-objects", action="store_true",
                        help="also score one-object and two-object prompts apart (and plot them dashed, dotted)")
    parser.add_argument("--out", help="JSON file with every run's curve")
    parser.add_argument("--plot", help="PNG file: alignment against training minutes")
    args = parser.parse_args(argv)
    if args.label and len(args.label) != len(args.run):
        parser.error(f"got {len(args.label)} --label for {len(args.run)} --run")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_grad_enabled(False)
    vqvae = VQModel.from_pretrained(args.vqvae).eval()
    recogniser = ShapesRecogniser.from_pretrained(args.recogniser)
    real_images, captions = load_test(args.data, args.num_prompts)
    labels = args.label or [os.path.basename(os.path.normpath(run)) for run in args.run]
    curves = {label: run_curve(run, vqvae, recogniser, real_images, captions, args)
              for label, run in zip(labels, args.run)}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(curves, f, indent=2)
    if args.plot:
        plot(curves, args.plot, by_objects=args.by_objects)


if __name__ == "__main__":
    main()
