"""The paper's tables 3-5 in miniature, on PDM-Shapes.

    # table 4: one trained pipeline, several stage counts (plus the VQ reconstructions as the ceiling)
    python -m benchmarks.shapes_tables stages --model progressive_denoising/bundled/pdm-shapes \
        --recogniser runs/recogniser32 --data runs/shapes32 --stages 4,8,16,64 --out table4.json --md table4.md

    # the sampling levers of one pipeline: one row per --setting "name:key=value,..." (arguments of generate),
    # with the codes error recovering replaced per image
    python -m benchmarks.shapes_tables sampling --model progressive_denoising/bundled/pdm-shapes --recogniser ... \
        --data runs/shapes32 --setting "default:" --setting "no error recovering:max_replacements=0" \
        --setting "guidance 3:guidance_scale=3"

    # tables 3 and 5: one training run per arm and training seed (same config and budget), each evaluated at the
    # config's stages; table 3 also trains the autoregressive baseline (model_type=ar) and samples it with its KV cache,
    # and the learned order: the quant-error arm followed by --policy_steps of policy-gradient training of its state
    # head (rewarded by the recogniser's prompt alignment). With --train-seeds 0,1 a row is the mean of the seeds.
    python -m benchmarks.shapes_tables orders  --config training/configs/shapes32_cpu.yaml --max_steps 3000 \
        --train-seeds 0,1 ...
    python -m benchmarks.shapes_tables p-error --config training/configs/shapes32_cpu.yaml --max_steps 3000 \
        --train-seeds 0,1 ...

    # the recipe's levers: one arm per --arm "name:key=value,key=value" (train_pdm.py overrides of the config)
    python -m benchmarks.shapes_tables recipe --config training/configs/shapes32_cpu.yaml --max_steps 2000 \
        --arm "as configured:" --arm "paper's token loss:token_loss_positions=stage" ...

Every row reports prompt alignment (all prompts and the held-out (colour, shape) pairs), the attribute-level partial
credit of `metrics.attribute_accuracy` (share of objects with the right colour / shape / size, share of images
whose region or relation holds), FID with the recogniser's features against the real test images, and seconds per
image of `generate` (VQ decoding excluded) on this device.
"""

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time

import numpy as np
import torch
import yaml

from progressive_denoising import PDMARForTextToImage, PDMPipeline
from progressive_denoising.pdm_shapes import data as shapes_data, metrics
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser
from progressive_denoising.vq import (
    decode_codes, encode_to_codes, postprocess_images, preprocess_images, vq_grid,
)

ORDER_ARMS = ("raster", "random", "quant-error", "reverse-quant-error")  # plus the autoregressive baseline
P_ERROR_ARMS = (0.0, 0.3, 0.5, 0.7, 1.0)
# The learned arm: REINFORCE on the quant-error arm's state head (both decisions: fill and replace), rewarded by the
# recogniser's prompt alignment; 64 prompts a step, 8 rollouts each, each rollout's baseline the mean of its prompt's
# other seven. Fewer rollouts (16 x 4 a step, 300 steps) left the reward flat: the order moves a step's mean reward by
# a few hundredths, below that batch's noise (docs/results/learned-order/README.md).
POLICY_OPTIONS = ("--train_batch_size", "64", "--rollouts_per_prompt", "8", "--baseline", "per-prompt",
                  "--learning_rate", "3e-4", "--reward", "alignment")


def prompt_batches(captions, seed, batch_size):
    """(captions, generators) chunks of `captions`: image i of the whole list is drawn with generator seed + i, so a
    prompt gets the same image whatever the batch size."""
    for start in range(0, len(captions), batch_size):
        chunk = captions[start:start + batch_size]
        yield chunk, [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]


def generate_images(pipe, captions, seed, batch_size, guidance_scale, replaced=None, codes_out=None, **stage_kwargs):
    """PIL images for `captions` (image i drawn with generator seed + i) and the seconds `generate` took.

    `stage_kwargs` (`num_stages`, `order`, any other argument of `generate`) go to PDM's `generate`; the AR baseline
    takes none; `guidance_scale=None` is the model's saved default. A list passed as `replaced` receives the number of
    codes error recovering replaced in each image, one passed as `codes_out` each batch's codes.
    """
    if replaced is not None:
        stage_kwargs["return_stages"] = True
    images, seconds = [], 0.0
    for chunk, generators in prompt_batches(captions, seed, batch_size):
        input_ids, attention_mask = pipe.encode_prompt(chunk)
        began = time.perf_counter()
        codes = pipe.model.generate(input_ids, attention_mask, guidance_scale=guidance_scale, generator=generators,
                                    **stage_kwargs)
        seconds += time.perf_counter() - began
        if replaced is not None:
            replaced += codes.replaced.sum(1).tolist()
            codes = codes.codes
        if codes_out is not None:
            codes_out.append(codes)
        images += postprocess_images(pipe.decode_codes(codes), "pil")
    return images, seconds


def vq_round_trip(vqvae, images, batch_size):
    """(codes (N, L), PIL reconstructions) of `images` through `vqvae`: the ceiling any code generator can reach."""
    resolution = vqvae.config.sample_size
    grid = vq_grid(vqvae, resolution)
    codes, out = [], []
    for start in range(0, len(images), batch_size):
        batch_codes, _ = encode_to_codes(vqvae, preprocess_images(images[start:start + batch_size], resolution))
        codes.append(batch_codes)
        out += postprocess_images(decode_codes(vqvae, batch_codes, grid), "pil")
    return torch.cat(codes), out


def new_scenes(captions, size, seed=0):
    """Renders of new scenes that satisfy each caption: the reference a perfect generator of new images reaches.

    Its alignment is the recogniser's, its FID is what drawing other placements than the test images' costs."""
    rng = np.random.default_rng(seed)
    return [shapes_data.render_scene(shapes_data.sample_scene_for_caption(rng, caption, size), size)
            for caption in captions]


def reference_rows(recogniser, real_images, captions):
    """The ground truth and new scenes for the same captions, as rows of every table."""
    size = real_images[0].width
    return {"ground truth": metrics.evaluate_images(recogniser, real_images, captions, real_images),
            "new scenes for the captions": metrics.evaluate_images(
                recogniser, new_scenes(captions, size), captions, real_images)}


def load_test(data, num_prompts, split="test"):
    real = metrics.load_split(data, split)
    real = real.select(range(min(num_prompts, len(real))))
    return [image.convert("RGB") for image in real["image"]], list(real["caption"])


def parse_spec(spec):
    """"name:key=value,key=value" (an --arm or a --setting) -> (name, ["key=value", ...])."""
    name, _, items = spec.partition(":")
    return name, [item.strip() for item in items.split(",") if item.strip()]


def load_pipeline_and_prompts(args, split="test"):
    """The --model pipeline, the recogniser, the real images and captions of `split`, and the reference rows."""
    pipe = PDMPipeline.from_pretrained(args.model).to(args.device)
    recogniser = ShapesRecogniser.from_pretrained(args.recogniser, device=args.device)
    real_images, captions = load_test(args.data, args.num_prompts, split)
    return pipe, recogniser, real_images, captions, reference_rows(recogniser, real_images, captions)


def stages_table(args):
    """Table 4: alignment, FID and speed of one pipeline at several stage counts."""
    pipe, recogniser, real_images, captions, rows = load_pipeline_and_prompts(args)
    rows["VQ reconstruction"] = metrics.evaluate_images(
        recogniser, vq_round_trip(pipe.vqvae, real_images, args.batch_size)[1], captions, real_images)
    num_tokens = pipe.model.config.num_image_tokens
    stage_counts = sorted({int(s) for s in args.stages.split(",")} | {num_tokens})
    for num_stages in stage_counts:
        images, seconds = generate_images(pipe, captions, args.seed, args.batch_size, args.guidance_scale,
                                          num_stages=num_stages)
        rows[f"PDM T={num_stages}"] = dict(metrics.evaluate_images(recogniser, images, captions, real_images),
                                           seconds_per_image=seconds / len(captions), stages=num_stages)
    one_per_stage = rows[f"PDM T={num_tokens}"]["seconds_per_image"]
    for row in rows.values():
        if "seconds_per_image" in row:
            row["speed_up"] = one_per_stage / row["seconds_per_image"]
    return rows


def sampling_table(args):
    """One pipeline under several `generate` settings (--setting "name:key=value,..."): the sampling levers."""
    pipe, recogniser, real_images, captions, rows = load_pipeline_and_prompts(args, args.split)
    for name, items in map(parse_spec, args.setting):
        kwargs = {key.strip(): yaml.safe_load(value) for key, _, value in (item.partition("=") for item in items)}
        kwargs.setdefault("num_stages", pipe.model.config.num_stages)
        guidance_scale = kwargs.pop("guidance_scale", args.guidance_scale)
        replaced = []
        images, seconds = generate_images(pipe, captions, args.seed, args.batch_size, guidance_scale, replaced,
                                          **kwargs)
        rows[name] = dict(metrics.evaluate_images(recogniser, images, captions, real_images),
                          seconds_per_image=seconds / len(captions), stages=kwargs["num_stages"],
                          replaced_per_image=sum(replaced) / len(replaced))
        if args.by_objects:
            rows.update(rows_by_object_count(name, recogniser, images, captions, real_images))
    return rows


def rows_by_object_count(name, recogniser, images, captions, real_images):
    """The images of one row scored again, split by the number of objects their prompt asks for (FID against all the
    real images)."""
    counts = [len(shapes_data.parse_caption(caption)["objects"]) for caption in captions]
    rows = {}
    for count, label in ((1, "one object"), (2, "two objects")):
        picked = [i for i, c in enumerate(counts) if c == count]
        rows[f"{name}, {label}"] = metrics.evaluate_images(
            recogniser, [images[i] for i in picked], [captions[i] for i in picked], real_images)
    return rows


def run_unless_done(command, output_dir):
    """Run a training command unless `output_dir` already holds its `final/` folder; returns that folder."""
    final = os.path.join(output_dir, "final")
    if not os.path.isdir(final):
        subprocess.run(command, check=True)
    return final


def arm_folder(args, name, seed):
    return os.path.join(args.runs, re.sub(r"[^\w.=-]+", "_", name).strip("_"), f"seed={seed}")


def train_arm(args, name, overrides, seed):
    """Train one arm with train_pdm.py (same config and budget as every other arm, training seed `seed`); returns its
    pipeline folder."""
    output_dir = arm_folder(args, name, seed)
    # `latest` resumes an arm that was interrupted (and starts one that has no checkpoint yet).
    return run_unless_done([sys.executable, "-m", "training.train_pdm", "--config", args.config, "--max_train_steps",
                            str(args.max_steps), "--output_dir", output_dir, "--resume_from_checkpoint", "latest",
                            *overrides, f"seed={seed}"], output_dir)


def train_learned_arm(args, fixed_order_folder, seed):
    """Table 3's `learned` arm: a fixed-order arm whose state head is then trained as a policy (train_policy.py)."""
    output_dir = arm_folder(args, "order=learned", seed)
    with open(args.config) as f:
        dataset = yaml.safe_load(f)["dataset"]
    return run_unless_done([sys.executable, "-m", "training.train_policy", "--model_name_or_path", fixed_order_folder,
                            "--dataset", dataset, "--max_train_steps", str(args.policy_steps), "--output_dir",
                            output_dir, "--seed", str(seed), "--recogniser", args.recogniser, *POLICY_OPTIONS],
                           output_dir)


def load_arm(folder, config):
    """A pipeline folder (PDM arms), or the AR baseline's model + tokenizer with the config's VQ model."""
    if os.path.isdir(os.path.join(folder, "model")):
        return PDMPipeline.from_pretrained(folder)
    from diffusers import VQModel
    from transformers import AutoModel, AutoTokenizer

    with open(config) as f:
        vqvae = yaml.safe_load(f)["vqvae"]
    return PDMPipeline(tokenizer=AutoTokenizer.from_pretrained(folder), model=AutoModel.from_pretrained(folder),
                       vqvae=VQModel.from_pretrained(vqvae))


def train_minutes(folder):
    """Training minutes of the run that wrote `folder` (its `final/`), from its losses.jsonl; None if not recorded."""
    path = os.path.join(os.path.dirname(os.path.normpath(folder)), "losses.jsonl")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        last = json.loads(f.readlines()[-1])
    return last["train_seconds"] / 60 if "train_seconds" in last else None


def recipe_arms(args):
    """(name, trainer(seed), order) of every --arm "name:key=value,..."; the order is the arm's own (None: its
    config's)."""
    return [(name, functools.partial(train_arm, args, name, items), None)
            for name, items in map(parse_spec, args.arm)]


def score_arm(args, name, seed, train, order, recogniser, real_images, captions):
    """One arm's row for one training seed, cached in its run folder (`scores.json`, keyed by the sampling settings)
    so that a table can be rebuilt, or grown by an arm, without training or sampling the others again (a scored arm
    needs no weights on disk)."""
    cache_path = os.path.join(arm_folder(args, name, seed), "scores.json")
    key = f"prompts={len(captions)},seed={args.seed},guidance={args.guidance_scale},order={order}"
    if args.split != "test":  # keys of test rows stay as they were, so that cached tables still read them
        key += f",split={args.split}"
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    if key in cache and (not args.by_objects or "by_objects" in cache[key]):
        return cache[key]
    folder = train(seed)
    pipe = load_arm(folder, args.config).to(args.device)
    if isinstance(pipe.model, PDMARForTextToImage):
        steps, stage_kwargs = pipe.model.config.num_image_tokens, {}
    else:
        steps = pipe.model.config.num_stages
        stage_kwargs = dict(num_stages=steps, order=order or pipe.model.config.training_order)
    images, seconds = generate_images(pipe, captions, args.seed, args.batch_size, args.guidance_scale, **stage_kwargs)
    cache[key] = dict(metrics.evaluate_images(recogniser, images, captions, real_images),
                      seconds_per_image=seconds / len(captions), stages=steps, train_minutes=train_minutes(folder))
    if args.by_objects:
        cache[key]["by_objects"] = rows_by_object_count("", recogniser, images, captions, real_images)
    with open(cache_path, "w") as f:
        json.dump(cache, f, indent=2)
    return cache[key]


SPREAD_KEYS = ("alignment", "alignment_held_out", "fid")


def mean_row(seed_rows):
    """The mean of several training seeds' rows, with each seed's alignment, held-out alignment and FID (`*_seeds`)
    so that a table shows the spread."""
    row = {key: float(np.mean([r[key] for r in seed_rows])) for key, value in seed_rows[0].items()
           if isinstance(value, (int, float)) and all(r.get(key) is not None for r in seed_rows)}
    row["images"] = seed_rows[0]["images"]
    row["stages"] = seed_rows[0].get("stages")
    for key in SPREAD_KEYS:
        if all(r.get(key) is not None for r in seed_rows):  # no held-out pairs among validation prompts
            row[f"{key}_seeds"] = [r[key] for r in seed_rows]
    return row


def arms_table(args, arms):
    recogniser = ShapesRecogniser.from_pretrained(args.recogniser, device=args.device)
    real_images, captions = load_test(args.data, args.num_prompts, args.split)
    rows = reference_rows(recogniser, real_images, captions)
    seeds = [int(seed) for seed in args.train_seeds.split(",")]
    for name, train, order in arms:
        if args.arms and not any(wanted in name for wanted in args.arms.split(",")):
            continue
        seed_rows = [score_arm(args, name, seed, train, order, recogniser, real_images, captions) for seed in seeds]
        rows[name] = mean_row(seed_rows) if len(seeds) > 1 else seed_rows[0]
        for label in ("one object", "two objects") if args.by_objects else ():
            label_rows = [r["by_objects"][f", {label}"] for r in seed_rows]
            rows[f"{name}, {label}"] = mean_row(label_rows) if len(seeds) > 1 else label_rows[0]
    return rows


def format_rows(rows):
    columns = [("images", "images", "d"), ("alignment", "alignment", ".3f"),
               ("alignment (held-out pairs)", "alignment_held_out", ".3f"), ("colour", "colour", ".2f"),
               ("shape", "shape", ".2f"), ("size", "size", ".2f"), ("layout", "layout", ".2f"), ("FID", "fid", ".0f"),
               ("stages", "stages", "d"), ("replaced / image", "replaced_per_image", ".2f"),
               ("train min", "train_minutes", ".1f"), ("s / image", "seconds_per_image", ".4f"),
               ("speed-up vs T = L", "speed_up", ".1f")]
    columns = [column for column in columns if any(row.get(column[1]) is not None for row in rows.values())]
    lines = ["| row | " + " | ".join(title for title, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]
    def cell(row, key, fmt):
        if row.get(key) is None:
            return "-"
        if f"{key}_seeds" in row:  # a mean over training seeds: each seed's value follows in brackets
            return f"{row[key]:{fmt}} ({' / '.join(format(v, fmt) for v in row[f'{key}_seeds'])})"
        return format(row[key], fmt)

    for name, row in rows.items():
        cells = [cell(row, key, fmt) for _, key, fmt in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", choices=("stages", "sampling", "orders", "p-error", "recipe"))
    parser.add_argument("--model", help="stages / sampling: the pipeline folder")
    parser.add_argument("--setting", action="append", default=[],
                        help='sampling: "name:key=value,key=value", arguments of generate (repeatable)')
    parser.add_argument("--split", default="test", choices=("test", "validation"),
                        help="the prompts and real images (choose settings and arms on validation, report on test)")
    parser.add_argument("--by-objects", action="store_true",
                        help="sampling / arms: also score each row's one-object and two-object prompts apart")
    parser.add_argument("--config", help="orders / p-error: the training config every arm shares")
    parser.add_argument("--max_steps", type=int, default=3000, help="orders / p-error: training budget of every arm")
    parser.add_argument("--runs", default="runs/tables", help="orders / p-error: where the arms are trained")
    parser.add_argument("--train-seeds", default="0",
                        help="orders / p-error / recipe: training seeds, comma-separated; with several, each arm is "
                             "trained once per seed and its row is the mean, each seed's value in brackets")
    parser.add_argument("--policy_steps", type=int, default=1300,
                        help="orders: policy-gradient steps of the learned arm (after the quant-error arm's training; "
                             "the README's arms ran 1323, 583 + 740 in two time-capped runs, 11 minutes of one H100; "
                             "about 5 hours of a 2-core CPU at 13 s a step)")
    parser.add_argument("--arm", action="append", default=[],
                        help='recipe: "name:key=value,key=value", train_pdm.py overrides of --config (repeatable)')
    parser.add_argument("--arms", default="", help="orders / p-error: only the arms whose name contains one of these")
    parser.add_argument("--recogniser", required=True)
    parser.add_argument("--data", required=True, help="PDM-Shapes folder (its test split is used)")
    parser.add_argument("--stages", default="4,8,16,64")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--guidance-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", help="JSON file for the rows")
    parser.add_argument("--md", help="Markdown file for the table")
    args = parser.parse_args(argv)
    if args.table in ("stages", "sampling") and not args.model:
        parser.error(f"{args.table} needs --model")
    if args.table == "sampling" and not args.setting:
        parser.error("sampling needs at least one --setting")
    if args.table not in ("stages", "sampling") and not args.config:
        parser.error(f"{args.table} needs --config")
    if args.table == "recipe" and not args.arm:
        parser.error("recipe needs at least one --arm")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.table == "stages":
        rows = stages_table(args)
    elif args.table == "sampling":
        rows = sampling_table(args)
    elif args.table == "orders":
        # (row name, function that trains the arm and returns its folder, order passed to generate)
        arms = [(f"order={o}", functools.partial(train_arm, args, f"order={o}", [f"order={o}"]), o)
                for o in ORDER_ARMS]
        quant_error = functools.partial(train_arm, args, "order=quant-error", ["order=quant-error"])
        arms.append(("order=learned", lambda seed: train_learned_arm(args, quant_error(seed), seed), "learned"))
        arms.append(("autoregressive (KV cache)",
                     functools.partial(train_arm, args, "autoregressive (KV cache)", ["model_type=ar"]), None))
        rows = arms_table(args, arms)
    elif args.table == "recipe":
        rows = arms_table(args, recipe_arms(args))
    else:
        rows = arms_table(args, [(f"p_error={p}", functools.partial(train_arm, args, f"p_error={p}", [f"p_error={p}"]),
                                  None) for p in P_ERROR_ARMS])
    table = format_rows(rows)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
