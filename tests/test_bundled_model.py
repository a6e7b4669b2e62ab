"""The bundled PDM-Shapes pipeline loads offline and draws images the recogniser can read."""

import os

import numpy as np
import PIL.Image
import torch

from progressive_denoising import PDMPipeline
from progressive_denoising.commands.generate import BUNDLED_MODEL
from progressive_denoising.evaluation import ShapesRecogniser, recognise


def test_bundled_pipeline_loads_and_generates():
    assert os.path.isdir(BUNDLED_MODEL), "the bundled model is part of the package"
    pipe = PDMPipeline.from_pretrained(BUNDLED_MODEL)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a large red circle", "a small blue square left of a large yellow triangle"]
    out = pipe(prompts, generator=[torch.Generator().manual_seed(i) for i in range(2)], return_stages=True)
    size = pipe.vqvae.config.sample_size
    assert all(isinstance(image, PIL.Image.Image) and image.size == (size, size) for image in out.images)
    assert len(out.stages) == pipe.model.config.num_stages
    pixels = np.asarray(out.images[0]).astype(int)
    assert pixels.std() > 10  # not a blank image
    recogniser = ShapesRecogniser.from_pretrained(os.path.join(BUNDLED_MODEL, "recogniser"))
    scenes = recognise(recogniser, out.images)
    assert all(1 <= len(scene["objects"]) <= 2 for scene in scenes)
