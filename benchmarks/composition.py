"""Which skill of composing a scene a model lacks: rows that give it the layout, one object, or nothing, and a probe of
whether its text states bind each colour to its shape.

    # diagnosis rows on the test scenes (choose on --split validation), split by object count
    python -m benchmarks.composition diagnose --model progressive_denoising/bundled/pdm-shapes \
        --recogniser progressive_denoising/bundled/pdm-shapes/recogniser --data runs/shapes32 --num-scenes 300 \
        --out docs/results/composition/diagnosis.json --md docs/results/composition/diagnosis.md

    # text-state probe: do the states the decoder reads tell the prompts of a scene apart?
    python -m benchmarks.composition probe --model progressive_denoising/bundled/pdm-shapes --data runs/shapes32

Diagnosis rows (the first `--num-scenes` scenes of each object count, image i drawn with generator seed + i, the
scene's own caption as prompt; the given codes are the real image's VQ codes, kept by the inpainting pipeline):
- "from all [MASK]": text-to-image, the model decides everything;
- "background given": every code whose 4x4 patch holds no object pixel is given and kept; the others (the objects'
  silhouettes, to the code) are drawn: the layout is given, the colours and shapes are the model's;
- "outside the boxes given": the codes touching the objects' boxes are drawn: positions given, silhouettes not;
- "background and first object given" (two objects): only the second object's box is drawn: does the model bind
  the second half of the caption to the place that is left?
Columns: alignment, and the partial credit of `metrics.attribute_accuracy` (colour, shape, size of the prompt's
objects, and whether the region or relation holds).

Losses (`losses`, the scenes of --split, default validation, VQ-encoded): the token loss of a PDM per stage t of its
training tuples (quant-error order, no pseudo errors), apart for the codes of objects and of the background and for
the masked codes a tuple labels; of an autoregressive model per code, apart for objects and background. It shows
where a model's training signal goes: with the loss on every masked code averaged over positions, the early stages'
tuples, whose codes are mostly unpredictable, hold most of the labels.

    python -m benchmarks.composition losses --model runs/composition/text-pos=input/seed=0/final --data runs/shapes32

Probe (two-object captions of --split, default validation): for each caption "a S1 C1 H1 R a S2 C2 H2" the states of
its words are compared with those of the same words in
- "colours swapped": "a S1 C2 H1 R a S2 C1 H2" (another scene: each shape has the other colour),
- "objects swapped": "a S2 C2 H2 R a S1 C1 H1" (another scene: the relation reversed),
- "paraphrase": "a S2 C2 H2 R' a S1 C1 H1", R' the converse relation (the same scene in other words);
by cosine similarity (1.000 for every variant: the encoder is a bag of words). A linear probe (logistic regression on
the states of the shape words, fitted on half the captions, scored on the other half) reads off each shape's colour:
chance is 1/8, a bag of words at most about 1/2 (it knows both colours, not which is whose), a binding encoder 1.
"""

import argparse
import json
import os

import numpy as np
import PIL.Image
import torch

from progressive_denoising import PDMInpaintPipeline, PDMPipeline
from progressive_denoising.pdm_shapes import data as shapes_data, metrics
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser

from .edit_shapes import box_mask
from .shapes_tables import generate_images

CONVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


# -- diagnosis ---------------------------------------------------------------------------------------------------


def scenes_by_count(data, split, count):
    """{1: rows, 2: rows}: the first `count` scenes of `split` with one and with two objects."""
    rows = {1: [], 2: []}
    for row in metrics.load_split(data, split):
        objects = len(row["objects"])
        if len(rows[objects]) < count:
            rows[objects].append(row)
        if all(len(r) == count for r in rows.values()):
            break
    return rows


def object_pixels(image):
    """(size, size) bool: the pixels of any object (every pixel of a PDM-Shapes image is black or an object's)."""
    return np.asarray(image.convert("RGB")).any(-1)


def given_regions(row, size):
    """{row name: (size, size) bool mask of the pixels to draw (white for the inpainting pipeline)} of one scene."""
    objects = row["objects"]
    boxes = np.zeros((size, size), dtype=bool)
    for obj in objects:
        boxes |= box_mask(obj["box"], size)
    regions = {"background given": object_pixels(row["image"]), "outside the boxes given": boxes}
    if len(objects) == 2:
        regions["background and first object given"] = box_mask(objects[1]["box"], size)
    return regions


def score(recogniser, images, captions):
    scores = metrics.attribute_accuracy(recogniser, images, captions)
    alignment, _ = metrics.prompt_alignment(recogniser, images, captions)
    return {"scenes": len(images), "alignment": alignment,
            **{key: scores[key] for key in ("colour", "shape", "size", "layout")}}


def diagnose(args):
    pipe = PDMPipeline.from_pretrained(args.model).to(args.device)
    pipe.set_progress_bar_config(disable=True)
    inpaint = PDMInpaintPipeline.from_pipe(pipe)
    inpaint.set_progress_bar_config(disable=True)
    recogniser = ShapesRecogniser.from_pretrained(args.recogniser, device=args.device)
    size = inpaint.image_size[0]
    table = {}
    for count, rows in scenes_by_count(args.data, args.split, args.num_scenes).items():
        label = "one object" if count == 1 else "two objects"
        captions = [row["caption"] for row in rows]
        images, _ = generate_images(pipe, captions, args.seed, args.batch_size, 1.0)
        table[f"{label}: from all [MASK]"] = score(recogniser, images, captions)
        for name in given_regions(rows[0], size):
            masks = [PIL.Image.fromarray(given_regions(row, size)[name].astype(np.uint8) * 255) for row in rows]
            drawn = []
            for start in range(0, len(rows), args.batch_size):
                end = min(start + args.batch_size, len(rows))
                generators = [torch.Generator().manual_seed(args.seed + i) for i in range(start, end)]
                drawn += inpaint(captions[start:end], [row["image"].convert("RGB") for row in rows[start:end]],
                                 masks[start:end], generator=generators).images
            table[f"{label}: {name}"] = score(recogniser, drawn, captions)
    return table


# -- losses per stage ----------------------------------------------------------------------------------------------


@torch.no_grad()
def stage_losses(args):
    """{"stages": [{stage, labels share, object loss, background loss, ...}], "totals": ...} of a PDM, or per-code
    losses of an autoregressive model (see the module docstring)."""
    from progressive_denoising import PDMARForTextToImage
    from progressive_denoising.configuration_pdm import PDMConfig
    from progressive_denoising.ordering import build_stage_tuples, scores_to_ranks
    from progressive_denoising.vq import encode_to_codes, preprocess_images

    pipe = load_any_pipeline(args.model)
    model, tokenizer = pipe.model.eval(), pipe.tokenizer
    rows = list(metrics.load_split(args.data, args.split))[: args.num_scenes]
    images = [row["image"].convert("RGB") for row in rows]
    size = images[0].width
    codes, quant_error = encode_to_codes(pipe.vqvae, preprocess_images(images, size))
    cell = size // model.config.token_grid_size[0]
    pixels = torch.tensor(np.stack([object_pixels(image) for image in images]))
    is_object = torch.nn.functional.max_pool2d(pixels[:, None].float(), cell).flatten(1).bool()  # (N, L)
    tokens = tokenizer([row["caption"] for row in rows], padding=True, return_tensors="pt")
    text = dict(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)

    def losses_of(logits, labels):
        return torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100,
                                                 reduction="none")

    if isinstance(model, PDMARForTextToImage):
        loss = losses_of(model(**text, image_tokens=codes).token_logits, codes)
        return {"model": "autoregressive", "object": float(loss[is_object].mean()),
                "background": float(loss[~is_object].mean()), "object_share": float(is_object.float().mean())}
    config: PDMConfig = model.config
    ranks = scores_to_ranks(quant_error)
    table = []
    for stage in range(1, config.num_stages + 1):
        stages = torch.full((len(rows),), stage)
        tuples = build_stage_tuples(codes, ranks, stages, config.num_stages, config.mask_token_id,
                                    config.codebook_size, token_loss_positions="masked")
        labels = tuples["token_labels"]
        loss = losses_of(model(**text, image_tokens=tuples["image_tokens"]).token_logits, labels)
        labelled = labels != -100
        table.append({"stage": stage, "labels": int(labelled.sum()),
                      "object_loss": float(loss[labelled & is_object].mean()),
                      "background_loss": float(loss[labelled & ~is_object].mean()),
                      "object_share_of_labels": float((labelled & is_object).sum() / labelled.sum())})
    total = sum(row["labels"] for row in table)
    for row in table:
        row["share_of_all_labels"] = row["labels"] / total
    return {"model": "pdm", "stages": table}


def load_any_pipeline(folder):
    """A PDM pipeline folder, or an autoregressive model's folder (model + tokenizer) with the bundled VQ model."""
    if os.path.isdir(os.path.join(folder, "model")):
        return PDMPipeline.from_pretrained(folder)
    from diffusers import VQModel
    from transformers import AutoModel, AutoTokenizer

    from progressive_denoising import BUNDLED_MODEL

    return PDMPipeline(tokenizer=AutoTokenizer.from_pretrained(folder), model=AutoModel.from_pretrained(folder),
                       vqvae=VQModel.from_pretrained(os.path.join(BUNDLED_MODEL, "vqvae")))


def format_losses(result):
    if result["model"] == "autoregressive":
        return (f"autoregressive: loss {result['object']:.3f} on object codes, {result['background']:.3f} on background "
                f"codes (objects: {result['object_share']:.2f} of the codes)")
    lines = ["| stage | share of all labels | objects' share of the stage's labels | object loss | background loss |",
             "|---:|---:|---:|---:|---:|"]
    for row in result["stages"]:
        lines.append(f"| {row['stage']} | {row['share_of_all_labels']:.3f} | {row['object_share_of_labels']:.2f} | "
                     f"{row['object_loss']:.3f} | {row['background_loss']:.3f} |")
    return "\n".join(lines)


# -- probe -------------------------------------------------------------------------------------------------------


def variants(caption):
    """{name: caption}: the probe's three rewrites of a two-object caption (each as many words long)."""
    parsed = shapes_data.parse_caption(caption)
    first, second = parsed["objects"]
    relation = parsed["relation"]
    phrase = lambda o: f"a {o['size']} {o['colour']} {o['shape']}"
    return {
        "colours swapped": f"{phrase(dict(first, colour=second['colour']))} {relation} "
                           f"{phrase(dict(second, colour=first['colour']))}",
        "objects swapped": f"{phrase(second)} {relation} {phrase(first)}",
        "paraphrase": f"{phrase(second)} {CONVERSE[relation]} {phrase(first)}",
    }


ATTRIBUTES = ("size", "colour", "shape")


def word_indices(captions):
    """(N, 2, 3) token index of each object's size, colour and shape word ("a S C H ... a S C H": the second
    object's words are the last three; the captions' tokenizer is word level, one token a word)."""
    rows = []
    for caption in captions:
        count = len(caption.split())
        rows.append([[1, 2, 3], [count - 3, count - 2, count - 1]])
    return torch.tensor(rows)


@torch.no_grad()
def decoder_text_states(model, tokenizer, captions):
    """((N, S, d) text states the decoder's cross-attention reads, (N, S) mask) of `captions`."""
    tokens = tokenizer(captions, return_tensors="pt", padding=True)
    words = tokenizer.convert_ids_to_tokens(tokens.input_ids[0])
    if sum(tokens.attention_mask[0].tolist()) != len(captions[0].split()) + 1:  # one token a word, and </s>
        raise ValueError(f"the probe needs a word-level caption tokenizer; {captions[0]!r} has tokens {words}")
    return model.prompt_states(tokens.input_ids, tokens.attention_mask).float(), tokens.attention_mask.bool()


def gather_words(states, indices):
    """(N, 2, 3, d): the states at (N, 2, 3) token indices."""
    flat = indices.flatten(1)
    return states.gather(1, flat[..., None].expand(-1, -1, states.shape[-1])).unflatten(1, indices.shape[1:])


def pooled(states, mask):
    return (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def cosine(a, b):
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def linear_probe(train_x, train_y, test_x, test_y, classes, steps=300):
    """Accuracy on (test_x, test_y) of a logistic regression fitted on (train_x, train_y) (full-batch Adam)."""
    torch.manual_seed(0)
    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    probe = torch.nn.Linear(train_x.shape[1], classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(probe((train_x - mean) / std), train_y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float((probe((test_x - mean) / std).argmax(-1) == test_y).float().mean())


def probe(args):
    """Cosine similarities of word and pooled states between each caption and its rewrites, and the linear probe."""
    pipe = PDMPipeline.from_pretrained(args.model)
    model, tokenizer = pipe.model.eval(), pipe.tokenizer
    captions = [row["caption"] for row in metrics.load_split(args.data, args.split)
                if len(row["objects"]) == 2][: args.num_scenes]
    states, mask = decoder_text_states(model, tokenizer, captions)
    indices = word_indices(captions)
    words = gather_words(states, indices)
    result = {"captions": len(captions), "cosine": {}}
    for name in variants(captions[0]):
        other, other_mask = decoder_text_states(model, tokenizer, [variants(c)[name] for c in captions])
        # Each word is compared with the same word of the rewrite: where the objects traded places, the other
        # object's; with the colours swapped, the colour words traded places and the others stayed.
        other_words = gather_words(other, indices)
        moved = other_words.flip(1)
        row = {attribute: float(cosine(words[:, :, i], (moved if name != "colours swapped" or attribute == "colour"
                                                        else other_words)[:, :, i]).mean())
               for i, attribute in enumerate(ATTRIBUTES)}
        row["pooled"] = float(cosine(pooled(states, mask), pooled(other, other_mask)).mean())
        result["cosine"][name] = row
    # Linear probe: each shape word's state -> that object's colour.
    shape_states = words[:, :, ATTRIBUTES.index("shape")]  # (N, 2, d)
    colours = torch.tensor([[shapes_data.COLOUR_NAMES.index(o["colour"]) for o in shapes_data.parse_caption(c)["objects"]]
                            for c in captions])
    half = len(captions) // 2
    fit = lambda part: (shape_states[part].flatten(0, 1), colours[part].flatten())
    result["colour_of_shape_probe"] = linear_probe(*fit(slice(None, half)), *fit(slice(half, None)),
                                                   len(shapes_data.COLOUR_NAMES))
    return result


def format_probe(result):
    lines = ["| rewrite | size word | colour word | shape word | pooled |", "|---|---:|---:|---:|---:|"]
    for name, row in result["cosine"].items():
        lines.append(f"| {name} | {row['size']:.4f} | {row['colour']:.4f} | {row['shape']:.4f} | "
                     f"{row['pooled']:.4f} |")
    lines.append("")
    lines.append(f"Linear probe, colour of each shape word's object, {result['captions']} captions (half to fit, half "
                 f"to score): accuracy {result['colour_of_shape_probe']:.3f} (chance 0.125).")
    return "\n".join(lines)


def format_diagnosis(table):
    columns = ("scenes", "alignment", "colour", "shape", "size", "layout")
    lines = ["| codes given | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, row in table.items():
        cells = [str(row[c]) if c == "scenes" else f"{row[c]:.3f}" for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=("diagnose", "probe", "losses"))
    parser.add_argument("--model", required=True, help="a PDM pipeline folder")
    parser.add_argument("--recogniser", help="diagnose: the recogniser folder")
    parser.add_argument("--data", required=True, help="PDM-Shapes folder (real images and captions)")
    parser.add_argument("--split", default=None, help="default: test for diagnose, validation for probe")
    parser.add_argument("--num-scenes", type=int, default=300, help="scenes of each object count (probe: captions)")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", help="JSON file for the rows")
    parser.add_argument("--md", help="Markdown file for the table")
    args = parser.parse_args(argv)
    if args.task == "diagnose" and not args.recogniser:
        parser.error("diagnose needs --recogniser")
    args.split = args.split or ("test" if args.task == "diagnose" else "validation")
    task, formatter = {"diagnose": (diagnose, format_diagnosis), "probe": (probe, format_probe),
                       "losses": (stage_losses, format_losses)}[args.task]
    result = task(args)
    text = formatter(result)
    print(text)
    for path, content in ((args.out, json.dumps(result, indent=1)), (args.md, text + "\n")):
        if path:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w") as f:
                f.write(content)


if __name__ == "__main__":
    main()
