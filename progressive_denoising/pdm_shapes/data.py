"""PDM-Shapes: the synthetic text-to-image benchmark of this package (see DESIGN.md, "The synthetic benchmark").

Every image is a black square with one or two flat-coloured objects; every caption follows a fixed grammar:

- one object:  "a {size} {colour} {shape}" optionally followed by " in the {region}"
- two objects: "a {size} {colour} {shape} {relation} a {size} {colour} {shape}"

Coordinates are in pixels with the origin at the top-left corner and y pointing down. A box is
``[x0, y0, x1, y1]`` with integer corners, ``x0 <= x < x1``; the centre of an object is the centre of its box,
``[(x0 + x1) / 2, (y0 + y1) / 2]``. Rules (shared with the evaluation in ``metrics.py``):

- region: the object's centre lies inside that cell of a 3x3 grid over the image (``region_of``);
- relation "left of" / "right of" / "above" / "below": the first object's centre is at least a quarter of the
  image further left / right / up / down than the second's (``relation_holds``).

The generator keeps a small margin beyond both rules (``MARGIN``) so that a recogniser reading a blurred
reconstruction can still decide them; the rules themselves have no margin.

Some (colour, shape) pairs (``HELD_OUT_PAIRS``) never appear in train or validation and appear only in test,
to measure composition.
"""

import re

import numpy as np
from PIL import Image

from ..errors import ArgumentError

COLOURS = {
    "red": (230, 25, 75),
    "green": (60, 180, 75),
    "blue": (0, 130, 200),
    "yellow": (255, 225, 25),
    "purple": (145, 30, 180),
    "orange": (245, 130, 48),
    "cyan": (70, 240, 240),
    "white": (255, 255, 255),
}
COLOUR_NAMES = tuple(COLOURS)
SHAPES = ("circle", "square", "triangle")
SIZES = ("small", "large")
# Row-major 3x3 grid: index = 3 * row + column.
REGIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUND = (0, 0, 0)

ALL_PAIRS = tuple((colour, shape) for colour in COLOUR_NAMES for shape in SHAPES)
# Fixed, one per shape and each with a different colour, so that every colour and every shape is still seen in
# training: a model must compose a seen colour with a seen shape it was never shown it with.
HELD_OUT_PAIRS = (("red", "triangle"), ("blue", "circle"), ("yellow", "square"))
TRAIN_PAIRS = tuple(pair for pair in ALL_PAIRS if pair not in HELD_OUT_PAIRS)

# Side of an object's box as a fraction of the image side; large is twice small.
SIDE_FRACTION = {"small": 3 / 16, "large": 6 / 16}
# Extra distance (fraction of the image side) the generator keeps beyond the region and relation rules.
MARGIN = 1 / 24
# Empty pixels kept between the boxes of two objects, so that they never touch.
GAP = 2
MIN_IMAGE_SIZE = 16
ONE_OBJECT_PROBABILITY = 0.5
REGION_PROBABILITY = 0.5
MAX_TRIES = 1000

_SPLIT_STREAMS = {"train": 0, "validation": 1, "test": 2}


def _check_size(size):
    if not isinstance(size, (int, np.integer)) or size < MIN_IMAGE_SIZE:
        raise ArgumentError("size", f"size must be an integer >= {MIN_IMAGE_SIZE}, got {size!r}")
    return int(size)


def object_side(size_name, image_size):
    """Side in pixels of the box of a `size_name` ("small" or "large") object in an `image_size` image."""
    if size_name not in SIDE_FRACTION:
        raise ArgumentError("size_name", f"size_name must be one of {SIZES}, got {size_name!r}")
    small = max(3, round(image_size * SIDE_FRACTION["small"]))
    return small if size_name == "small" else 2 * small


def region_of(center, image_size):
    """Name of the 3x3 grid cell that holds `center` ([x, y] in pixels) in an `image_size` image."""
    column = min(int(3 * center[0] / image_size), 2)
    row = min(int(3 * center[1] / image_size), 2)
    return REGIONS[3 * row + column]


def relation_holds(relation, first_center, second_center, image_size):
    """Whether "first {relation} second" holds for two centres ([x, y] in pixels) in an `image_size` image."""
    dx = second_center[0] - first_center[0]
    dy = second_center[1] - first_center[1]
    quarter = image_size / 4
    if relation == "left of":
        return dx >= quarter
    if relation == "right of":
        return -dx >= quarter
    if relation == "above":
        return dy >= quarter
    if relation == "below":
        return -dy >= quarter
    raise ArgumentError("relation", f"relation must be one of {RELATIONS}, got {relation!r}")


def _make_object(shape, colour, size_name, x0, y0, side):
    return {
        "shape": shape,
        "colour": colour,
        "size": size_name,
        "center": [x0 + side / 2, y0 + side / 2],
        "box": [int(x0), int(y0), int(x0 + side), int(y0 + side)],
    }


def _sample_attributes(rng, pairs):
    colour, shape = pairs[rng.integers(len(pairs))]
    return colour, shape, SIZES[rng.integers(len(SIZES))]


def _placements_in_region(region, side, image_size):
    """Top-left corners (x0, y0) that keep the whole box in the image and its centre MARGIN inside the cell."""
    index = REGIONS.index(region)
    row, column = divmod(index, 3)
    cell = image_size / 3
    margin = MARGIN * image_size

    def corners(cell_index):
        low = cell_index * cell + (margin if cell_index > 0 else 0)
        high = (cell_index + 1) * cell - (margin if cell_index < 2 else 0)
        # centre = corner + side / 2 must lie in [low, high); the box must lie in [0, image_size].
        return [c for c in range(0, image_size - side + 1) if low <= c + side / 2 < high]

    xs, ys = corners(column), corners(row)
    if not xs or not ys:
        raise ArgumentError("size", f"size {image_size} is too small to place a {side}-pixel object in the {region}")
    return xs, ys


def _sample_one_object_scene(rng, size, pairs):
    colour, shape, size_name = _sample_attributes(rng, pairs)
    region = REGIONS[rng.integers(len(REGIONS))] if rng.random() < REGION_PROBABILITY else None
    return _place_one_object(rng, size, (colour, shape, size_name), region)


def _place_one_object(rng, size, attributes, region):
    colour, shape, size_name = attributes
    side = object_side(size_name, size)
    if region is None:
        x0, y0 = rng.integers(0, size - side + 1, size=2)
    else:
        xs, ys = _placements_in_region(region, side, size)
        x0, y0 = xs[rng.integers(len(xs))], ys[rng.integers(len(ys))]
    return {"objects": [_make_object(shape, colour, size_name, int(x0), int(y0), side)], "region": region,
            "relation": None}


def boxes_overlap(first_box, second_box, gap=0):
    """Whether two boxes [x0, y0, x1, y1] come closer than `gap` pixels (gap=0: whether they share a pixel)."""
    return not (first_box[2] + gap <= second_box[0] or second_box[2] + gap <= first_box[0]
                or first_box[3] + gap <= second_box[1] or second_box[3] + gap <= first_box[1])


def _sample_two_object_scene(rng, size, pairs):
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    attributes = [_sample_attributes(rng, pairs) for _ in range(2)]
    return _place_two_objects(rng, size, attributes, relation)


def _place_two_objects(rng, size, attributes, relation):
    sides = [object_side(size_name, size) for _, _, size_name in attributes]
    for _ in range(MAX_TRIES):
        corners = [rng.integers(0, size - side + 1, size=2) for side in sides]
        objects = [_make_object(shape, colour, size_name, int(x0), int(y0), side)
                   for (colour, shape, size_name), (x0, y0), side in zip(attributes, corners, sides)]
        first, second = objects
        # The relation must hold with MARGIN to spare (see the module docstring).
        shifted = _shift_towards(second["center"], relation, MARGIN * size)
        if (relation_holds(relation, first["center"], shifted, size)
                and not boxes_overlap(first["box"], second["box"], gap=GAP)):
            return {"objects": objects, "region": None, "relation": relation}
    raise RuntimeError(f"could not place two objects for relation {relation!r} in a {size}x{size} image")


def _shift_towards(center, relation, distance):
    """Move `center` against the direction the relation needs, so a relation holding afterwards has a margin."""
    x, y = center
    if relation == "left of":
        return [x - distance, y]
    if relation == "right of":
        return [x + distance, y]
    if relation == "above":
        return [x, y - distance]
    return [x, y + distance]


def sample_scene(rng, size=64, allowed_pairs=None):
    """Sample one scene.

    Args:
        rng: a ``numpy.random.Generator`` (the only source of randomness).
        size: image side in pixels (>= 16).
        allowed_pairs: (colour, shape) pairs objects may take; every pair when None.

    Returns:
        ``{"objects": [obj, ...], "region": str | None, "relation": str | None}`` with 1 or 2 objects, each
        ``{"shape", "colour", "size", "center": [x, y], "box": [x0, y0, x1, y1]}``; for two objects the caption reads
        "objects[0] {relation} objects[1]".
    """
    size = _check_size(size)
    if not isinstance(rng, np.random.Generator):
        raise ArgumentError("rng", f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    pairs = ALL_PAIRS if allowed_pairs is None else tuple(tuple(pair) for pair in allowed_pairs)
    unknown = [pair for pair in pairs if pair not in ALL_PAIRS]
    if not pairs or unknown:
        raise ArgumentError("allowed_pairs", f"allowed_pairs must be a non-empty list of (colour, shape) pairs; unknown: {unknown}")
    if rng.random() < ONE_OBJECT_PROBABILITY:
        return _sample_one_object_scene(rng, size, pairs)
    return _sample_two_object_scene(rng, size, pairs)


def sample_scene_for_caption(rng, caption, size=64):
    """A new scene that satisfies a grammar caption: what a perfect text-to-image model could draw for it.

    The objects get the caption's attributes; positions are drawn as ``sample_scene`` draws them, under the caption's
    region or relation. Rendering such scenes for a set of test captions gives the best FID and alignment a generator
    of new images can reach (scenes differ from the test images in where the objects lie, not in what they are).
    """
    size = _check_size(size)
    parsed = parse_caption(caption)
    attributes = [(obj["colour"], obj["shape"], obj["size"]) for obj in parsed["objects"]]
    if len(attributes) == 1:
        return _place_one_object(rng, size, attributes[0], parsed["region"])
    return _place_two_objects(rng, size, attributes, parsed["relation"])


def _object_mask(obj, size):
    """Boolean (size, size) mask of the pixels of one object; a pixel is in when its centre is in the shape."""
    x0, y0, x1, y1 = obj["box"]
    side = x1 - x0
    ys, xs = np.mgrid[0:size, 0:size] + 0.5
    inside_box = (xs >= x0) & (xs < x1) & (ys >= y0) & (ys < y1)
    cx, cy = obj["center"]
    if obj["shape"] == "square":
        return inside_box
    if obj["shape"] == "circle":
        return inside_box & ((xs - cx) ** 2 + (ys - cy) ** 2 <= (side / 2) ** 2)
    if obj["shape"] == "triangle":
        # Upright: apex at the top middle, base along the bottom edge. The width is taken at the bottom of each
        # pixel row so that the apex row is not empty and the pixels fill the box in both directions.
        half_width = (ys + 0.5 - y0) / 2
        return inside_box & (np.abs(xs - cx) <= half_width)
    raise ArgumentError("shape", f"shape must be one of {SHAPES}, got {obj['shape']!r}")


def render_scene(scene, size=64):
    """Render a scene (as from ``sample_scene``) as a (size x size) RGB ``PIL.Image``.

    Black background, flat exact palette colours, no antialiasing: every pixel is black or an object's colour.
    """
    size = _check_size(size)
    canvas = np.zeros((size, size, 3), dtype=np.uint8)
    for obj in scene["objects"]:
        x0, y0, x1, y1 = obj["box"]
        if min(x0, y0) < 0 or max(x1, y1) > size:
            raise ValueError(f"scene has a box {obj['box']} outside a {size}x{size} image")
        if obj["colour"] not in COLOURS:
            raise ValueError(f"scene has colour {obj['colour']!r}, not one of {COLOUR_NAMES}")
        canvas[_object_mask(obj, size)] = COLOURS[obj["colour"]]
    return Image.fromarray(canvas, mode="RGB")


def _phrase(obj):
    return f"a {obj['size']} {obj['colour']} {obj['shape']}"


def caption_for(scene):
    """The grammar caption of a scene (see the module docstring)."""
    objects = scene["objects"]
    if len(objects) == 1:
        region = scene.get("region")
        return _phrase(objects[0]) + (f" in the {region}" if region else "")
    if len(objects) == 2:
        return f"{_phrase(objects[0])} {scene['relation']} {_phrase(objects[1])}"
    raise ArgumentError("scene", f"scene must have 1 or 2 objects, got {len(objects)}")


def _alternatives(words):
    # Longest first, so that "top left" wins over "top".
    return "|".join(re.escape(word) for word in sorted(words, key=len, reverse=True))


_OBJECT = (rf"a (?P<size{{i}}>{_alternatives(SIZES)}) (?P<colour{{i}}>{_alternatives(COLOUR_NAMES)}) "
           rf"(?P<shape{{i}}>{_alternatives(SHAPES)})")
_ONE_OBJECT_RE = re.compile(_OBJECT.format(i=0) + rf"(?: in the (?P<region>{_alternatives(REGIONS)}))?")
_TWO_OBJECTS_RE = re.compile(_OBJECT.format(i=0) + rf" (?P<relation>{_alternatives(RELATIONS)}) "
                             + _OBJECT.format(i=1))


def parse_caption(caption):
    """Parse a grammar caption back into its attributes.

    Returns:
        ``{"objects": [{"size", "colour", "shape"}, ...], "region": str | None, "relation": str | None}``.

    Raises:
        ValueError: `caption` is not a string of the grammar (exact words, lower case, single spaces).
    """
    if not isinstance(caption, str):
        raise ArgumentError("caption", f"caption must be a string, got {type(caption).__name__}")
    for pattern, count in ((_ONE_OBJECT_RE, 1), (_TWO_OBJECTS_RE, 2)):
        match = pattern.fullmatch(caption)
        if match:
            objects = [{key: match.group(f"{key}{i}") for key in ("size", "colour", "shape")} for i in range(count)]
            return {"objects": objects, "region": match.groupdict().get("region"),
                    "relation": match.groupdict().get("relation")}
    raise ValueError(f"caption is not in the PDM-Shapes grammar: {caption!r}")


def has_held_out_pair(objects):
    """Whether any object (a dict with "colour" and "shape") is a held-out (colour, shape) pair."""
    return any((obj["colour"], obj["shape"]) in HELD_OUT_PAIRS for obj in objects)


def sample_held_out_scene(rng, size=64):
    """A scene drawn as ``sample_scene`` draws it (every pair allowed), on the condition that it holds at least one
    held-out pair: what the even test scenes are."""
    for _ in range(MAX_TRIES):
        scene = sample_scene(rng, size)
        if has_held_out_pair(scene["objects"]):
            return scene
    raise RuntimeError("could not sample a scene with a held-out pair")


def sample_test_scene(rng, size, index):
    """Even test scenes contain at least one held-out pair, odd ones only ordinary pairs."""
    if index % 2 == 1:
        return sample_scene(rng, size, TRAIN_PAIRS)
    return sample_held_out_scene(rng, size)


def _features():
    import datasets

    obj = {
        "shape": datasets.Value("string"),
        "colour": datasets.Value("string"),
        "size": datasets.Value("string"),
        "center": datasets.List(datasets.Value("float32"), length=2),
        "box": datasets.List(datasets.Value("int32"), length=4),
    }
    return datasets.Features({
        "image": datasets.Image(),
        "caption": datasets.Value("string"),
        "objects": datasets.List(obj),
        "region": datasets.Value("string"),
        "relation": datasets.Value("string"),
    })


def _split_records(split, count, seed, size):
    # One random stream per split: the test set of a seed does not change with num_train.
    rng = np.random.default_rng([seed, _SPLIT_STREAMS[split]])
    records = {"image": [], "caption": [], "objects": [], "region": [], "relation": []}
    for index in range(count):
        if split == "test":
            scene = sample_test_scene(rng, size, index)
        else:
            scene = sample_scene(rng, size, TRAIN_PAIRS)
        records["image"].append(render_scene(scene, size))
        records["caption"].append(caption_for(scene))
        records["objects"].append(scene["objects"])
        records["region"].append(scene["region"])
        records["relation"].append(scene["relation"])
    return records


def _check_count(name, value):
    if not isinstance(value, (int, np.integer)) or value < 0:
        raise ArgumentError(name, f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def make_shapes_dataset(num_train, seed, size=64, num_validation=None, num_test=None):
    """Build PDM-Shapes as a ``datasets.DatasetDict`` with splits train, validation and test.

    Columns: ``image`` (``datasets.Image``, size x size RGB), ``caption`` (str), ``objects`` (list of
    ``{shape, colour, size, center [x, y], box [x0, y0, x1, y1]}`` in caption order), ``region`` (str or None),
    ``relation`` (str or None). Validation and test default to ``max(num_train // 10, 1)`` examples each.
    Deterministic: the same arguments give identical images and captions; each split has its own random stream.
    Held-out pairs appear only in test, where half of the scenes contain one.
    """
    import datasets

    size = _check_size(size)
    num_train = _check_count("num_train", num_train)
    default = max(num_train // 10, 1)
    counts = {
        "train": num_train,
        "validation": default if num_validation is None else _check_count("num_validation", num_validation),
        "test": default if num_test is None else _check_count("num_test", num_test),
    }
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ArgumentError("seed", f"seed must be a non-negative integer, got {seed!r}")
    features = _features()
    return datasets.DatasetDict({
        split: datasets.Dataset.from_dict(_split_records(split, count, int(seed), size), features=features)
        for split, count in counts.items()
    })
