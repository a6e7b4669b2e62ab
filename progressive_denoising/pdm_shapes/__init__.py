"""PDM-Shapes: the synthetic text-to-image benchmark of this package, and how images drawn for it are scored.

Every image shows one or two flat-coloured shapes on black, and every caption follows a fixed grammar ("a small red
circle left of a large blue square"), so whether an image shows its caption can be read off exactly.

- ``data``: the scene grammar, rendering, captions (``parse_caption``) and the data set (``make_shapes_dataset``);
  needs numpy and Pillow (``datasets`` for the data set), not torch.
- ``recogniser``: ``ShapesRecogniser``, the small CNN that reads scenes from images, and ``recognise``.
- ``metrics``: prompt alignment, partial credit per attribute, FID, and the table of ``pdm evaluate``.

The commands ``pdm make-shapes`` and ``pdm evaluate`` drive them; ``python -m training.train_recogniser`` trains a
recogniser. Nothing is imported here: import the module you need.
"""
