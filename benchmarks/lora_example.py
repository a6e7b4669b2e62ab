"""Adapt a trained PDM-Shapes pipeline with a LoRA adapter to (colour, shape) pairs it never saw, and measure it.

    python -m benchmarks.lora_example --model progressive_denoising/bundled/pdm-shapes \
        --recogniser progressive_denoising/bundled/pdm-shapes/recogniser --data runs/shapes32 \
        --work runs/lora-test/held-out-2000 --out docs/results/lora/held-out-2000

The defaults are the options chosen on validation prompts (docs/lora.md): 2000 + 2000 scenes, rank 8, 600 steps at
2e-3, float32 (about 7.5 minutes on a 2-core CPU, training 2.4 of them).

1. Data: `--num-new` new scenes that each hold at least one held-out pair (`pdm_shapes.data.HELD_OUT_PAIRS`: red
   triangle, blue circle, yellow square, never in the base model's training or validation split), drawn as the test
   set's even scenes are, plus `--num-replay` scenes of the ordinary pairs (so the adapter learns the new pairs, not
   "every scene holds a held-out pair"), rendered at the data set's image size and tokenized with the pipeline's own
   VQ model. Both from random streams of their own, not the data set's.
2. `train_pdm --use_lora` on them (the pipeline's model as `model_name_or_path`): the adapter alone is saved.
3. `--num-prompts` prompts (every other one holds a held-out pair): the data set's first test prompts, or with
   `--split validation` new scenes drawn the same way from another stream, to choose the options on. Images are drawn
   with seeds 0..N-1 and the model's saved sampling defaults and scored by the recogniser (`metrics.evaluate_images`)
   for: the base pipeline untouched, the pipeline with the adapter, and the same pipeline with the adapter disabled
   (whose codes must be the base model's bit for bit; the script checks it).

Writes `OUT/lora-example.json` and `OUT/lora-example.md`. Steps whose output exists are not redone (delete `--work`
to start again)."""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np
import torch

from progressive_denoising import PDMPipeline
from progressive_denoising.lora import LORA_WEIGHT_NAME
from progressive_denoising.pdm_shapes import data as shapes_data, metrics
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser
from progressive_denoising.vq import encode_to_codes, preprocess_images

from .shapes_tables import generate_images, load_test

COLUMNS = ("alignment", "alignment_held_out", "alignment_ordinary", "colour", "shape", "size", "layout", "fid")


def render_scenes(count, sample, size, seed):
    """(PIL images, captions) of `count` new scenes, scene i drawn by `sample(rng, size, i)`."""
    rng = np.random.default_rng(seed)
    scenes = [sample(rng, size, index) for index in range(count)]
    return [shapes_data.render_scene(s, size) for s in scenes], [shapes_data.caption_for(s) for s in scenes]


def held_out_scene(rng, size, index):
    return shapes_data.sample_held_out_scene(rng, size)


def ordinary_scene(rng, size, index):
    return shapes_data.sample_scene(rng, size, shapes_data.TRAIN_PAIRS)


def load_prompts(args, size):
    """(real images, captions) of the prompts to score: the data set's first test prompts, or for `--split
    validation` as many new scenes drawn as the test scenes are (every other one with a held-out pair), from a
    stream of their own: the data set's validation split holds no held-out pair to choose on."""
    if args.split == "test":
        return load_test(args.data, args.num_prompts)
    return render_scenes(args.num_prompts, shapes_data.sample_test_scene, size, seed=20_000 + args.seed)


@torch.no_grad()
def tokenize(vqvae, images, resolution, batch_size=256):
    """(codes, quant_error), each (N, h * w), of PIL `images` through the pipeline's VQ model."""
    codes, errors = [], []
    for start in range(0, len(images), batch_size):
        batch_codes, batch_errors = encode_to_codes(vqvae, preprocess_images(images[start:start + batch_size],
                                                                             resolution))
        codes.append(batch_codes.cpu())
        errors.append(batch_errors.float().cpu())
    return torch.cat(codes), torch.cat(errors)


def make_adaptation_data(pipe, folder, num_new, num_replay, size, seed):
    """A pre-tokenized `save_to_disk` folder (caption / codes / quant_error, train split only) for train_pdm."""
    if os.path.exists(os.path.join(folder, "pdm_tokenization.json")):
        return folder
    from datasets import Dataset, DatasetDict

    new_images, new_captions = render_scenes(num_new, held_out_scene, size, seed)
    old_images, old_captions = render_scenes(num_replay, ordinary_scene, size, seed + 1)
    codes, errors = tokenize(pipe.vqvae, new_images + old_images, size)
    DatasetDict(train=Dataset.from_dict({
        "caption": new_captions + old_captions, "codes": codes.int().tolist(), "quant_error": errors.tolist(),
    })).save_to_disk(folder)
    with open(os.path.join(folder, "pdm_tokenization.json"), "w") as f:
        json.dump({"grid": list(pipe.model.config.token_grid_size), "codebook_size": pipe.model.config.codebook_size,
                   "vq_model": os.path.join(os.path.abspath(pipe.config.get("_name_or_path") or ""), "vqvae"),
                   "num_new": num_new, "num_replay": num_replay, "resolution": size}, f, indent=2)
    return folder


def train_command(args, dataset, output_dir):
    """train_pdm's command line: the adapter alone trained, with the base model's order and stages (train_pdm's
    defaults for a model_name_or_path)."""
    return [
        sys.executable, "-m", "training.train_pdm", "--dataset", dataset,
        "--model_name_or_path", os.path.join(args.model, "model"), "--tokenizer", os.path.join(args.model, "tokenizer"),
        "--output_dir", output_dir, "--use_lora", "true", "--lora_r", str(args.lora_r),
        "--lora_alpha", str(args.lora_alpha or args.lora_r),
        "--lora_text_encoder", str(args.lora_text_encoder).lower(), "--learning_rate", str(args.learning_rate),
        "--max_train_steps", str(args.steps), "--warmup_steps", str(args.steps // 10), "--train_batch_size", "32",
        "--mixed_precision", args.mixed_precision, "--attn_implementation", "eager", "--log_with", "null",
        "--num_samples", "0", "--checkpointing_steps", str(args.steps), "--checkpoints_total_limit", "1",
        "--eval_steps", str(args.steps), "--seed", str(args.seed),
    ]


def train_adapter(args, dataset):
    """The adapter folder (train_pdm's final/) and the minutes training took (wall clock, and the steps alone)."""
    output_dir = os.path.join(args.work, "lora")
    final = os.path.join(output_dir, "final")
    timing = os.path.join(output_dir, "wall_seconds.json")
    if not os.path.exists(os.path.join(final, LORA_WEIGHT_NAME)):
        began = time.perf_counter()
        subprocess.run(train_command(args, dataset, output_dir), check=True)
        with open(timing, "w") as f:
            json.dump({"wall_seconds": time.perf_counter() - began}, f)
    with open(os.path.join(output_dir, "losses.jsonl")) as f:
        records = [json.loads(line) for line in f]
    wall = json.load(open(timing))["wall_seconds"] if os.path.exists(timing) else None
    return final, {"train_minutes": records[-1]["train_seconds"] / 60, "wall_minutes": wall and wall / 60,
                   "first_loss": sum(r["loss"] for r in records[:20]) / 20,
                   "last_loss": sum(r["loss"] for r in records[-20:]) / 20}


def generate(pipe, captions, seed, batch_size):
    """(codes (N, L), PIL images, seconds of `generate`) for `captions`, image i drawn with generator seed + i, the
    model's saved sampling defaults."""
    codes = []
    images, seconds = generate_images(pipe, captions, seed, batch_size, guidance_scale=None, codes_out=codes)
    return torch.cat(codes), images, seconds


def score(recogniser, images, captions, real_images):
    """`metrics.evaluate_images`' row, with the alignment on the prompts without a held-out pair added."""
    row = metrics.evaluate_images(recogniser, images, captions, real_images)
    ordinary = [i for i, c in enumerate(captions)
                if not shapes_data.has_held_out_pair(shapes_data.parse_caption(c)["objects"])]
    row["alignment_ordinary"] = metrics.prompt_alignment(recogniser, [images[i] for i in ordinary],
                                                         [captions[i] for i in ordinary])[0]
    return row


def evaluate_arms(args, adapter, real_images, captions):
    """Rows for the base pipeline untouched, with the adapter, and with the adapter disabled."""
    recogniser = ShapesRecogniser.from_pretrained(args.recogniser)
    rows, seconds = {}, {}
    base = PDMPipeline.from_pretrained(args.model)
    base.set_progress_bar_config(disable=True)
    base_codes, images, seconds["base model (untouched)"] = generate(base, captions, args.seed, args.batch_size)
    rows["base model (untouched)"] = score(recogniser, images, captions, real_images)

    pipe = PDMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(adapter, adapter_name="held-out-pairs")
    _, images, seconds["with the LoRA adapter"] = generate(pipe, captions, args.seed, args.batch_size)
    rows["with the LoRA adapter"] = score(recogniser, images, captions, real_images)

    pipe.disable_lora()
    disabled_codes, images, _ = generate(pipe, captions, args.seed, args.batch_size)
    rows["adapter loaded, disabled"] = score(recogniser, images, captions, real_images)
    same = bool(torch.equal(disabled_codes, base_codes))
    if not same:
        raise AssertionError("the disabled adapter's codes differ from the base model's")
    return rows, seconds, same


def adapter_facts(adapter):
    from safetensors.torch import load_file

    path = os.path.join(adapter, LORA_WEIGHT_NAME)
    weights = load_file(path)
    return {"adapter_file": path, "adapter_bytes": os.path.getsize(path),
            "trainable_parameters": sum(t.numel() for t in weights.values()), "adapted_layers": len(weights) // 2}


def format_markdown(result):
    lines = ["| arm | alignment | held-out pairs | ordinary pairs | colour | shape | size | layout | FID |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in result["rows"].items():
        cells = [f"{row[key]:.3f}" if key != "fid" else f"{row[key]:.1f}" for key in COLUMNS]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    facts = result["facts"]
    lines += ["", f"- {result['num_prompts']} {result['options']['split']} prompts "
              f"({result['num_held_out_prompts']} with a held-out pair), "
              f"sampling seeds {result['seed']}..{result['seed'] + result['num_prompts'] - 1}, the model's saved "
              "sampling defaults",
              f"- adapter: rank {result['options']['lora_r']}, {facts['trainable_parameters']} parameters in "
              f"{facts['adapted_layers']} layers, {facts['adapter_bytes'] / 1024:.0f} KiB "
              f"(`{os.path.basename(facts['adapter_file'])}`); base model {result['base_parameters']} parameters",
              f"- training: {result['options']['steps']} steps of 32 on {result['options']['num_new']} new + "
              f"{result['options']['num_replay']} replayed scenes, {facts['train_minutes']:.1f} minutes of steps "
              f"({facts['wall_minutes'] or float('nan'):.1f} minutes wall clock with loading), loss "
              f"{facts['first_loss']:.3f} -> {facts['last_loss']:.3f}",
              f"- the disabled adapter gives the base model's codes bit for bit: {result['disabled_equals_base']}"]
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the base pipeline folder")
    parser.add_argument("--recogniser", required=True)
    parser.add_argument("--data", required=True, help="the PDM-Shapes data set (test prompts and real images)")
    parser.add_argument("--work", required=True, help="folder of the adaptation data and the training run")
    parser.add_argument("--out", required=True, help="folder of lora-example.json / .md")
    parser.add_argument("--num-new", type=int, default=2000, help="scenes with a held-out pair to adapt on")
    parser.add_argument("--num-replay", type=int, default=2000, help="scenes of ordinary pairs mixed in")
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=None)
    parser.add_argument("--lora-text-encoder", action="store_true", help="also adapt the T5 encoder")
    parser.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                        help="train_pdm's autocast: bf16 pays only on a CPU with native bf16 (AVX512-BF16 or AMX); "
                             "on an AVX2 CPU it is emulated and a step takes 13x longer")
    parser.add_argument("--split", choices=("validation", "test"), default="test",
                        help="score on the data set's test prompts, or on new validation scenes to choose options on")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    began = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    pipe = PDMPipeline.from_pretrained(args.model)
    size = metrics.load_split(args.data, "test")[0]["image"].width
    dataset = make_adaptation_data(pipe, os.path.join(args.work, "data"), args.num_new, args.num_replay, size,
                                   seed=10_000 + args.seed)  # streams of their own, not the data set's splits
    base_parameters = sum(p.numel() for p in pipe.model.parameters())
    del pipe
    adapter, train_facts = train_adapter(args, dataset)
    real_images, captions = load_prompts(args, size)
    rows, seconds, same = evaluate_arms(args, adapter, real_images, captions)
    result = {
        "rows": rows, "generate_seconds": seconds, "disabled_equals_base": same, "num_prompts": len(captions),
        "num_held_out_prompts": sum(shapes_data.has_held_out_pair(shapes_data.parse_caption(c)["objects"])
                                    for c in captions),
        "seed": args.seed, "base_parameters": base_parameters, "facts": {**adapter_facts(adapter), **train_facts},
        "options": vars(args), "total_minutes": (time.perf_counter() - began) / 60,
        "command": " ".join(["python -m benchmarks.lora_example", *(argv if argv is not None else sys.argv[1:])]),
    }
    with open(os.path.join(args.out, "lora-example.json"), "w") as f:
        json.dump(result, f, indent=2)
    markdown = format_markdown(result)
    with open(os.path.join(args.out, "lora-example.md"), "w") as f:
        f.write(markdown)
    print(markdown)
    print(f"total {result['total_minutes']:.1f} minutes")


if __name__ == "__main__":
    main()
