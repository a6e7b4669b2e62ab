"""The bundled PDM-Shapes pipeline loads offline and generates; its recogniser reads real renders."""

import os

import numpy as np
import PIL.Image
import torch

from progressive_denoising import PDMPipeline
from progressive_denoising.commands.generate import BUNDLED_MODEL
from progressive_denoising.evaluation import ShapesRecogniser, prompt_alignment
from progressive_denoising.shapes import make_shapes_dataset


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


def test_bundled_recogniser_reads_real_renders_at_the_bundle_size():
    recogniser = ShapesRecogniser.from_pretrained(os.path.join(BUNDLED_MODEL, "recogniser"))
    size = PDMPipeline.from_pretrained(BUNDLED_MODEL).vqvae.config.sample_size
    real = make_shapes_dataset(1, seed=7, size=size, num_validation=1, num_test=100)["test"]
    images = [image.convert("RGB") for image in real["image"]]
    assert prompt_alignment(recogniser, images, list(real["caption"]))[0] >= 0.9
