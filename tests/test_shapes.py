"""PDM-Shapes: determinism, the grammar of captions, and the pixels of renders."""

import numpy as np
import pytest

from progressive_denoising.commands.make_shapes import main as make_shapes_command
from progressive_denoising.pdm_shapes import data as shapes_data

PALETTE = {colour: np.array(rgb, dtype=np.uint8) for colour, rgb in shapes_data.COLOURS.items()}


@pytest.fixture(scope="module")
def data():
    return shapes_data.make_shapes_dataset(60, seed=7, size=32, num_validation=30, num_test=40)


def _pixel_box(mask):
    """[x0, y0, x1, y1] of the True pixels of a (H, W) mask."""
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]


def check_render(image, objects, region, relation, caption):
    """Everything the grammar promises, measured from the pixels of `image`."""
    pixels = np.asarray(image)
    size = pixels.shape[0]
    assert pixels.shape == (size, size, 3)
    allowed = np.stack([np.zeros(3, np.uint8), *PALETTE.values()])
    assert (pixels[:, :, None, :] == allowed).all(-1).any(-1).all(), "a pixel is not black or a palette colour"
    outside = np.ones((size, size), bool)
    centers = []
    for obj in objects:
        x0, y0, x1, y1 = obj["box"]
        outside[y0:y1, x0:x1] = False
        inside = pixels[y0:y1, x0:x1]
        is_colour = (inside == PALETTE[obj["colour"]]).all(-1)
        assert (is_colour | (inside == 0).all(-1)).all(), "an object's box holds another colour"
        box = _pixel_box(is_colour)
        assert [box[0] + x0, box[1] + y0, box[2] + x0, box[3] + y0] == list(obj["box"]), "pixels do not fill the box"
        centers.append([(box[0] + box[2]) / 2 + x0, (box[1] + box[3]) / 2 + y0])
        assert centers[-1] == pytest.approx(list(obj["center"]))
    assert (pixels[outside] == 0).all(), "a pixel outside every box is not black"
    if len(objects) == 2:
        assert not shapes_data.boxes_overlap(objects[0]["box"], objects[1]["box"])
        assert relation in shapes_data.RELATIONS and region is None
        assert shapes_data.relation_holds(relation, centers[0], centers[1], size)
    else:
        assert relation is None
        assert region is None or shapes_data.region_of(centers[0], size) == region
    parsed = shapes_data.parse_caption(caption)
    assert parsed["region"] == region and parsed["relation"] == relation
    assert parsed["objects"] == [{k: obj[k] for k in ("size", "colour", "shape")} for obj in objects]


def test_same_seed_gives_identical_data(data):
    again = shapes_data.make_shapes_dataset(60, seed=7, size=32, num_validation=30, num_test=40)
    other = shapes_data.make_shapes_dataset(60, seed=8, size=32, num_validation=30, num_test=40)
    for split in ("train", "validation", "test"):
        assert data[split]["caption"] == again[split]["caption"]
        assert all(np.array_equal(np.asarray(a), np.asarray(b))
                   for a, b in zip(data[split]["image"], again[split]["image"]))
    assert data["train"]["caption"] != other["train"]["caption"]


def test_test_split_does_not_depend_on_num_train(data):
    bigger = shapes_data.make_shapes_dataset(90, seed=7, size=32, num_validation=30, num_test=40)
    assert bigger["test"]["caption"] == data["test"]["caption"]


def test_records_follow_the_grammar(data):
    assert set(data) == {"train", "validation", "test"}
    assert data["train"].column_names == ["image", "caption", "objects", "region", "relation"]
    for split in data.values():
        for record in split:
            check_render(record["image"], record["objects"], record["region"], record["relation"],
                         record["caption"])


def test_sampled_scenes_follow_the_grammar_at_64():
    rng = np.random.default_rng(0)
    counts, regions, relations = set(), set(), set()
    for _ in range(200):
        scene = shapes_data.sample_scene(rng, 64)
        check_render(shapes_data.render_scene(scene, 64), scene["objects"], scene["region"], scene["relation"],
                     shapes_data.caption_for(scene))
        counts.add(len(scene["objects"]))
        regions.add(scene["region"])
        relations.add(scene["relation"])
    assert counts == {1, 2}
    assert set(shapes_data.REGIONS) | {None} == regions
    assert set(shapes_data.RELATIONS) | {None} == relations


def test_large_is_twice_small_and_triangles_are_upright():
    scene = {"objects": [{"shape": "triangle", "colour": "red", "size": "large", "center": [20.0, 20.0],
                          "box": [8, 8, 32, 32]}], "region": None, "relation": None}
    pixels = (np.asarray(shapes_data.render_scene(scene, 64)) != 0).any(-1)
    widths = pixels[8:32].sum(1)
    assert widths[0] < widths[-1] and (np.diff(widths) >= 0).all(), "triangle is not upright"
    assert shapes_data.object_side("large", 64) == 2 * shapes_data.object_side("small", 64)
    assert shapes_data.object_side("large", 32) == 2 * shapes_data.object_side("small", 32)


def test_held_out_pairs_only_in_test(data):
    assert len(shapes_data.HELD_OUT_PAIRS) == 3 and set(shapes_data.HELD_OUT_PAIRS) <= set(shapes_data.ALL_PAIRS)
    for split in ("train", "validation"):
        for objects in data[split]["objects"]:
            assert not shapes_data.has_held_out_pair(objects)
    held = [shapes_data.has_held_out_pair(objects) for objects in data["test"]["objects"]]
    assert any(held) and not all(held)


def test_allowed_pairs_are_respected():
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = shapes_data.sample_scene(rng, 32, allowed_pairs=[("green", "square")])
        assert all((o["colour"], o["shape"]) == ("green", "square") for o in scene["objects"])


@pytest.mark.parametrize("caption", [
    "a small red circle.", "A small red circle", "a tiny red circle", "a small red circle in the middle",
    "a small red circle left of", "a small  red circle", " a small red circle", "a small pink circle",
    "a small red circle in the top left left of a large blue square", "a small red circle near a large red square",
])
def test_parse_caption_rejects_text_outside_the_grammar(caption):
    with pytest.raises(ValueError):
        shapes_data.parse_caption(caption)


def test_parse_caption_examples():
    assert shapes_data.parse_caption("a large cyan triangle in the top left") == {
        "objects": [{"size": "large", "colour": "cyan", "shape": "triangle"}], "region": "top left", "relation": None}
    parsed = shapes_data.parse_caption("a small red circle right of a large white square")
    assert parsed["relation"] == "right of" and parsed["objects"][1]["colour"] == "white"
    assert shapes_data.parse_caption("a small red circle")["region"] is None


def test_bad_arguments_raise_value_error():
    with pytest.raises(ValueError, match="size"):
        shapes_data.make_shapes_dataset(2, seed=0, size=8)
    with pytest.raises(ValueError, match="num_train"):
        shapes_data.make_shapes_dataset(-1, seed=0)
    with pytest.raises(ValueError, match="allowed_pairs"):
        shapes_data.sample_scene(np.random.default_rng(0), 32, allowed_pairs=[("pink", "circle")])
    with pytest.raises(ValueError, match="caption"):
        shapes_data.parse_caption(None)


def test_make_shapes_command(tmp_path):
    import datasets

    out = tmp_path / "shapes"
    assert make_shapes_command(["--out", str(out), "--num-train", "8", "--seed", "1", "--size", "24",
                                "--num-test", "4"], prog="pdm make-shapes") == 0
    loaded = datasets.load_from_disk(str(out))
    assert [len(loaded[s]) for s in ("train", "validation", "test")] == [8, 1, 4]
    assert loaded["train"][0]["image"].size == (24, 24)


def test_make_shapes_command_rejects_empty_splits(tmp_path):
    with pytest.raises(SystemExit):
        make_shapes_command(["--out", str(tmp_path / "x"), "--num-train", "0", "--seed", "1"])


def test_scenes_for_a_caption_satisfy_it_and_differ_in_placement():
    test = shapes_data.make_shapes_dataset(1, seed=3, size=32, num_validation=1, num_test=100)["test"]
    captions = list(test["caption"])
    rng = np.random.default_rng(0)
    scenes = [shapes_data.sample_scene_for_caption(rng, caption, 32) for caption in captions]
    assert [shapes_data.caption_for(scene) for scene in scenes] == captions
    for scene in scenes:
        objects = scene["objects"]
        if scene["relation"]:
            first, second = (obj["center"] for obj in objects)
            assert shapes_data.relation_holds(scene["relation"], first, second, 32)
            assert not shapes_data.boxes_overlap(objects[0]["box"], objects[1]["box"], gap=shapes_data.GAP)
        elif scene["region"]:
            assert shapes_data.region_of(objects[0]["center"], 32) == scene["region"]
    again = [shapes_data.sample_scene_for_caption(np.random.default_rng(1), caption, 32) for caption in captions]
    assert any(a["objects"][0]["box"] != b["objects"][0]["box"] for a, b in zip(scenes, again))
    with pytest.raises(ValueError, match="caption"):
        shapes_data.sample_scene_for_caption(rng, "a big red circle", 32)
