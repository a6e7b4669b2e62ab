"""The attribute recogniser, prompt alignment and FID on real renders and on deliberately wrong ones.

One tiny recogniser is trained once for the module (32x32 renders, a few hundred steps) to keep CPU time short.
"""

import json
import random

import numpy as np
import pytest
import torch

from progressive_denoising.commands.evaluate import main as evaluate_command
from progressive_denoising.pdm_shapes import data as shapes_data, metrics
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser, images_to_tensor, recognise
from training.train_recogniser import recogniser_training_data, train_recogniser


@pytest.fixture(scope="module")
def real():
    return shapes_data.make_shapes_dataset(0, seed=11, size=32, num_validation=0, num_test=160)["test"]


@pytest.fixture(scope="module")
def recogniser():
    train = recogniser_training_data(1200, seed=0, size=32)
    return train_recogniser(train, 220, batch_size=32, lr=3e-3, channels=(16, 32, 64), hidden=64, seed=0)


def _swap_colours(caption):
    """The caption with every colour word replaced by the next colour of the palette."""
    words = caption.split(" ")
    names = shapes_data.COLOUR_NAMES
    return " ".join(names[(names.index(w) + 1) % len(names)] if w in names else w for w in words)


def test_alignment_high_on_real_images_low_on_wrong_captions(recogniser, real):
    score, aligned = metrics.prompt_alignment(recogniser, real["image"], real["caption"])
    assert len(aligned) == len(real) and score == sum(aligned) / len(aligned)
    assert score >= 0.5, score
    shuffled = list(real["caption"])
    random.Random(0).shuffle(shuffled)
    assert metrics.prompt_alignment(recogniser, real["image"], shuffled)[0] <= 0.15
    swapped = [_swap_colours(c) for c in real["caption"]]
    assert metrics.prompt_alignment(recogniser, real["image"], swapped)[0] <= 0.1


def test_recogniser_reads_colours_and_counts(recogniser, real):
    found = recognise(recogniser, real["image"])
    counts = np.mean([len(f["objects"]) == len(o) for f, o in zip(found, real["objects"])])
    assert counts >= 0.9
    colours = [sorted(o["colour"] for o in f["objects"]) == sorted(o["colour"] for o in objects)
               for f, objects in zip(found, real["objects"]) if len(f["objects"]) == len(objects)]
    assert np.mean(colours) >= 0.8


def test_fid_zero_for_same_images_and_larger_for_wrong_ones(recogniser, real):
    assert abs(metrics.fid(real["image"], real["image"], recogniser=recogniser)) < 1e-3
    # FID from a few hundred images is biased upwards; compare two real sets with a real and a wrong set of the
    # same size. Wrong images: real scenes with every object painted in another colour.
    first = shapes_data.make_shapes_dataset(1, seed=21, size=32, num_validation=1, num_test=400)["test"]
    second = shapes_data.make_shapes_dataset(1, seed=22, size=32, num_validation=1, num_test=400)["test"]
    names = shapes_data.COLOUR_NAMES
    wrong = [shapes_data.render_scene({"objects": [dict(o, colour=names[(names.index(o["colour"]) + 3) % 8])
                                              for o in objects]}, 32) for objects in second["objects"]]
    between_real = metrics.fid(first["image"], second["image"], recogniser=recogniser)
    against_wrong = metrics.fid(first["image"], wrong, recogniser=recogniser)
    assert against_wrong > 2 * between_real, (against_wrong, between_real)


def test_scene_matching_rules():
    def obj(colour, shape, size, x, y):
        return {"colour": colour, "shape": shape, "size": size, "center": [x, y]}

    prompt = shapes_data.parse_caption("a small red circle left of a large blue square")
    good = {"objects": [obj("blue", "square", "large", 25, 5), obj("red", "circle", "small", 5, 20)]}
    assert metrics.scene_matches(good, prompt, 32)  # found in the other slot order
    close = {"objects": [obj("red", "circle", "small", 10, 5), obj("blue", "square", "large", 15, 5)]}
    assert not metrics.scene_matches(close, prompt, 32)  # less than a quarter of the image apart
    wrong_size = {"objects": [obj("red", "circle", "large", 5, 5), obj("blue", "square", "large", 25, 5)]}
    assert not metrics.scene_matches(wrong_size, prompt, 32)
    one = shapes_data.parse_caption("a small red circle in the bottom right")
    assert metrics.scene_matches({"objects": [obj("red", "circle", "small", 28, 28)]}, one, 32)
    assert not metrics.scene_matches({"objects": [obj("red", "circle", "small", 16, 28)]}, one, 32)
    assert not metrics.scene_matches(good, one, 32)


def test_attribute_scores_give_partial_credit():
    def obj(colour, shape, size, x, y):
        return {"colour": colour, "shape": shape, "size": size, "center": [x, y]}

    prompt = shapes_data.parse_caption("a small red circle left of a large blue square")
    swapped = {"objects": [obj("blue", "square", "large", 25, 5), obj("red", "circle", "small", 5, 20)]}
    assert metrics.attribute_scores(swapped, prompt, 32) == dict(count=1.0, colour=1.0, shape=1.0, size=1.0,
                                                                    layout=1.0)
    # right colours and sizes, one wrong shape, objects on the wrong sides
    wrong = {"objects": [obj("red", "square", "small", 25, 5), obj("blue", "square", "large", 5, 5)]}
    assert metrics.attribute_scores(wrong, prompt, 32) == dict(count=1.0, colour=1.0, shape=0.5, size=1.0,
                                                                  layout=0.0)
    # one object found for two: it is paired with the prompt object it matches best, the other misses everything
    one = {"objects": [obj("blue", "square", "small", 5, 5)]}
    assert metrics.attribute_scores(one, prompt, 32) == dict(count=0.0, colour=0.5, shape=0.5, size=0.0,
                                                                layout=0.0)
    region = shapes_data.parse_caption("a small red circle in the bottom right")
    assert metrics.attribute_scores(one, region, 32) == dict(count=1.0, colour=0.0, shape=0.0, size=1.0,
                                                                layout=0.0)


def test_attribute_accuracy_on_real_and_recoloured_captions(recogniser, real):
    right = metrics.attribute_accuracy(recogniser, real["image"], real["caption"])
    assert set(right) == set(metrics.ATTRIBUTE_SCORES)
    assert min(right.values()) >= 0.6, right
    recoloured = metrics.attribute_accuracy(recogniser, real["image"], [_swap_colours(c) for c in real["caption"]])
    assert recoloured["colour"] <= 0.15, recoloured
    assert recoloured["shape"] >= right["shape"] - 0.05 and recoloured["size"] >= right["size"] - 0.05, recoloured


def test_save_and_load_give_the_same_predictions(recogniser, real, tmp_path):
    recogniser.save_pretrained(tmp_path / "rec")
    loaded = ShapesRecogniser.from_pretrained(str(tmp_path / "rec"))
    pixels = images_to_tensor(real["image"][:8]).float() / 255
    with torch.no_grad():
        assert torch.allclose(recogniser(pixels)["center"], loaded(pixels)["center"])
    with pytest.raises(ValueError, match="path"):
        ShapesRecogniser.from_pretrained(str(tmp_path))


def test_inception_fid_never_downloads(real):
    with pytest.raises((RuntimeError, ValueError), match="[Ii]nception"):
        metrics.fid(real["image"][:4], real["image"][4:8], feature="inception")
    with pytest.raises(ValueError, match="feature"):
        metrics.fid(real["image"][:4], real["image"][4:8], feature="clip")


def test_evaluate_command_on_a_folder_and_a_dataset(recogniser, real, tmp_path):
    recogniser.save_pretrained(tmp_path / "rec")
    data = shapes_data.make_shapes_dataset(1, seed=11, size=32, num_validation=1, num_test=160)
    data.save_to_disk(str(tmp_path / "data"))
    folder = tmp_path / "generated"
    folder.mkdir()
    with open(folder / "captions.jsonl", "w", encoding="utf-8") as handle:
        for i, (image, caption) in enumerate(zip(real["image"], real["caption"])):
            image.save(folder / f"{i:04d}.png")
            handle.write(json.dumps({"file_name": f"{i:04d}.png", "caption": caption}) + "\n")
    common = ["--recogniser", str(tmp_path / "rec"), "--data", str(tmp_path / "data"), "--split", "test"]
    for images in (str(folder), str(tmp_path / "data")):
        out = tmp_path / "result.json"
        arguments = ["--images", images, *common, "--json", str(out), "--overwrite"]
        assert evaluate_command(arguments, prog="pdm evaluate") == 0
        rows = json.loads(out.read_text())
        assert set(rows) == {"ground truth", "generated"}
        assert rows["generated"]["alignment"] == pytest.approx(rows["ground truth"]["alignment"])
        assert abs(rows["generated"]["fid"]) < 1e-3
        assert rows["ground truth"]["alignment_held_out"] is not None
        assert rows["generated"]["colour"] == pytest.approx(rows["ground truth"]["colour"])
