"""Choose a trained pipeline's sampling defaults on validation prompts and save them with the model.

    python -m benchmarks.generation_defaults --model runs/pdm-shapes32/final \
        --recogniser runs/recogniser32 --data runs/shapes32 \
        --grid "temperature=1.0,0.8,0.6" --grid "guidance_scale=1,2,3" --out runs/pdm-shapes32/defaults.md

Every combination of the `--grid` values (arguments of `PDMGenerationConfig`) draws the first `--num-prompts`
validation prompts (never the test prompts: the defaults are chosen where the held-out pairs are not) with image i
drawn with generator seed + i, and is scored by the recogniser's prompt alignment. The best combination is written
into the model's `generation_config.json`, so `PDMPipeline.from_pretrained(folder)` draws with it; the table of every
combination goes to `--out`.
"""

import argparse
import itertools
import json
import os

import yaml

from progressive_denoising import PDMPipeline
from progressive_denoising.configuration_pdm import PDMGenerationConfig
from progressive_denoising.pdm_shapes import metrics
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser

from .shapes_tables import generate_images, load_test


def parse_grid(specs):
    """["temperature=1,0.7", ...] -> [("temperature", [1.0, 0.7]), ...] (values read as YAML)."""
    grid = []
    for spec in specs:
        name, _, values = spec.partition("=")
        if not values:
            raise SystemExit(f"--grid {spec!r}: expected name=value,value,...")
        grid.append((name.strip(), [yaml.safe_load(value) for value in values.split(",")]))
    return grid


def combinations(grid):
    names = [name for name, _ in grid]
    for values in itertools.product(*(values for _, values in grid)):
        yield dict(zip(names, values))


def score(pipe, recogniser, captions, real_images, settings, seed, batch_size):
    run = pipe.model.generation_config.updated(**settings).resolved(pipe.model.config)  # checked before drawing
    kwargs = {key: value for key, value in run.to_dict().items() if key != "guidance_scale"}
    images, _ = generate_images(pipe, captions, seed, batch_size, run.guidance_scale, **kwargs)
    return metrics.evaluate_images(recogniser, images, captions, real_images)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a PDM pipeline folder; its model/generation_config.json "
                                                       "is written")
    parser.add_argument("--recogniser", required=True)
    parser.add_argument("--data", required=True, help="PDM-Shapes folder (its validation split is used)")
    parser.add_argument("--grid", action="append", required=True,
                        help='"name=value,value,...": an argument of PDMGenerationConfig and the values to try')
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="Markdown file for the table of every combination")
    args = parser.parse_args(argv)
    grid = parse_grid(args.grid)
    for name, _ in grid:
        PDMGenerationConfig.from_dict({name: None})  # an unknown argument fails before any drawing

    pipe = PDMPipeline.from_pretrained(args.model)
    recogniser = ShapesRecogniser.from_pretrained(args.recogniser)
    real_images, captions = load_test(args.data, args.num_prompts, split="validation")
    rows = []
    for settings in combinations(grid):
        row = score(pipe, recogniser, captions, real_images, settings, args.seed, args.batch_size)
        rows.append((settings, row))
        print(json.dumps(settings), f"alignment {row['alignment']:.3f}", flush=True)
    best, best_row = max(rows, key=lambda item: item[1]["alignment"])
    config = pipe.model.generation_config.updated(**best)
    config.save_pretrained(os.path.join(args.model, "model"))

    names = [name for name, _ in grid]
    lines = [f"| {' | '.join(names)} | alignment | colour | shape | size | layout |",
             "|" + "---:|" * (len(names) + 5)]
    for settings, row in rows:
        mark = " **(chosen)**" if settings == best else ""
        lines.append("| " + " | ".join(str(settings[name]) for name in names)
                     + f" | {row['alignment']:.3f}{mark} | {row['colour']:.2f} | {row['shape']:.2f} | "
                       f"{row['size']:.2f} | {row['layout']:.2f} |")
    table = "\n".join(lines)
    print(table)
    print(f"wrote {os.path.join(args.model, 'model', PDMGenerationConfig.FILE_NAME)}: {json.dumps(best)} "
          f"(validation alignment {best_row['alignment']:.3f})")
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"{len(captions)} validation prompts, seeds {args.seed}..{args.seed + len(captions) - 1}\n\n"
                    + table + "\n")


if __name__ == "__main__":
    main()
