"""Planted errors: does the state head find wrong codes in a finished image, and does the token head repair them?

    python -m benchmarks.planted_errors --model progressive_denoising/bundled/pdm-shapes \
        --data runs/shapes32 --num-images 500 --errors 1,4,16

For each of the first `--num-images` test images: its VQ codes as `generate` holds them before its last stage (the
last group of the model's order still `[MASK]`: for the quant-error order the L/T codes with the largest quantization
error), with k of the shown codes (uniform positions) swapped for other codes drawn uniformly (the pseudo errors of
section 3.3), go through one decoder pass with the image's caption. Reported per k:
- found: share of the planted codes the state head calls "replace" (p(replace) > p(keep));
- false alarms: correct codes it calls "replace", per image;
- found in top k: share of the planted codes among the k most confident replacements (the bound of `generate`);
- repaired: share of the planted codes whose most likely code under the token head is the original one.
"""

import argparse
import json

import torch

from progressive_denoising import PDMPipeline
from progressive_denoising.pdm_shapes import metrics
from progressive_denoising.ordering import scores_to_ranks, stage_schedule
from progressive_denoising.sampling import choose_replacements
from progressive_denoising.vq import encode_to_codes, preprocess_images


def plant_errors(codes, num_errors, codebook_size, generator, shown=None):
    """(corrupted codes, (batch, L) bool planted): `num_errors` positions per row (among `shown`, a (batch, L) bool,
    when given) get another code, drawn uniformly."""
    noise = torch.rand(codes.shape, generator=generator)
    if shown is not None:
        noise = noise.masked_fill(~shown, 2.0)  # never chosen while a shown position is left
    positions = noise.argsort(-1)[:, :num_errors]
    planted = torch.zeros_like(codes, dtype=torch.bool).scatter_(1, positions, True)
    offsets = torch.randint(1, codebook_size, codes.shape, generator=generator)
    return torch.where(planted, (codes + offsets) % codebook_size, codes), planted


def last_stage_mask(quant_error, num_stages):
    """(batch, L) bool: the positions still `[MASK]` before the last stage of the quant-error order."""
    length = quant_error.shape[1]
    return scores_to_ranks(quant_error) >= length - stage_schedule(length, num_stages)[-1]


@torch.no_grad()
def score(pipe, captions, codes, quant_error, num_errors, generator):
    model = pipe.model
    masked = last_stage_mask(quant_error, model.config.num_stages)
    corrupted, planted = plant_errors(codes, num_errors, model.config.codebook_size, generator, shown=~masked)
    corrupted = corrupted.masked_fill(masked, model.config.mask_token_id)
    input_ids, attention_mask = pipe.encode_prompt(captions)
    out = model(input_ids=input_ids, attention_mask=attention_mask, image_tokens=corrupted.to(model.device))
    state_logits = out.state_logits.float().cpu()
    flagged = choose_replacements(state_logits, ~masked, codes.shape[1])
    top_k = choose_replacements(state_logits, ~masked, num_errors)
    repaired = out.token_logits.argmax(-1).cpu() == codes
    planted_count = planted.sum().item()
    return {
        "found": (flagged & planted).sum().item() / planted_count,
        "false_alarms_per_image": (flagged & ~planted).sum().item() / len(codes),
        "found_in_top_k": (top_k & planted).sum().item() / planted_count,
        "repaired": (repaired & planted).sum().item() / planted_count,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a PDM pipeline folder")
    parser.add_argument("--data", required=True, help="PDM-Shapes folder (its test split is used)")
    parser.add_argument("--num-images", type=int, default=500)
    parser.add_argument("--errors", default="1,4,16", help="comma-separated numbers of planted codes per image")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="JSON file for the rows")
    args = parser.parse_args(argv)
    pipe = PDMPipeline.from_pretrained(args.model)
    test = metrics.load_split(args.data, "test").select(range(args.num_images))
    images, captions = [image.convert("RGB") for image in test["image"]], list(test["caption"])
    resolution = pipe.vqvae.config.sample_size
    encoded = [encode_to_codes(pipe.vqvae, preprocess_images(images[i:i + args.batch_size], resolution))
               for i in range(0, len(images), args.batch_size)]
    codes = torch.cat([c for c, _ in encoded]).cpu()
    quant_error = torch.cat([q for _, q in encoded]).cpu()
    rows = {}
    print("| planted codes per image | found | false alarms per image | found in top k | repaired |")
    print("|---:|---:|---:|---:|---:|")
    for num_errors in (int(k) for k in args.errors.split(",")):
        generator = torch.Generator().manual_seed(args.seed)
        parts = [score(pipe, captions[i:i + args.batch_size], codes[i:i + args.batch_size],
                       quant_error[i:i + args.batch_size], num_errors, generator)
                 for i in range(0, len(codes), args.batch_size)]
        weights = [min(args.batch_size, len(codes) - i) for i in range(0, len(codes), args.batch_size)]
        row = {key: sum(w * p[key] for w, p in zip(weights, parts)) / sum(weights) for key in parts[0]}
        rows[num_errors] = row
        print(f"| {num_errors} | {row['found']:.3f} | {row['false_alarms_per_image']:.2f} | "
              f"{row['found_in_top_k']:.3f} | {row['repaired']:.3f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
