"""PDMPipeline: save/load, output types, stages, callbacks, argument errors; the `pdm generate` command."""

import json
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from progressive_denoising import PDMPipeline
from progressive_denoising.cli import main as pdm_main

from tiny import tiny_model, tiny_tokenizer, tiny_vqmodel


@pytest.fixture(scope="module")
def pipe():
    pipeline = PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder)
    return folder


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_round_trip_through_save_and_load(pipe, saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["model"] == ["progressive_denoising", "PDMForTextToImage"] and index["vqvae"] == ["diffusers", "VQModel"]
    loaded = PDMPipeline.from_pretrained(str(saved))
    loaded.set_progress_bar_config(disable=True)
    prompt = ["a small red circle", "a large blue square left of a small blue square"]
    before = pipe(prompt, num_inference_steps=4, generator=gens(2), output_type="codes").images
    after = loaded(prompt, num_inference_steps=4, generator=gens(2), output_type="codes").images
    assert torch.equal(before, after)
    images = loaded(prompt, num_inference_steps=4, generator=gens(2)).images
    assert len(images) == 2 and all(isinstance(i, PIL.Image.Image) and i.size == (16, 16) for i in images)


def test_output_types(pipe):
    prompt = ["a small red circle", "a large green triangle"]
    as_np, as_pt, codes = (pipe(prompt, num_inference_steps=2, generator=gens(2), output_type=output_type).images
                           for output_type in ("np", "pt", "codes"))
    assert as_np.shape == (2, 16, 16, 3) and as_np.min() >= 0 and as_np.max() <= 1
    assert as_pt.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    assert codes.shape == (2, 16) and codes.dtype == torch.long


def test_stages_and_callback(pipe):
    seen = []
    out = pipe("a small red circle", num_inference_steps=4, generator=gens(1), return_stages=True,
               callback_on_stage_end=lambda p, stage, codes: seen.append((stage, codes.clone())))
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert len(out.stages) == 4 and all(len(images) == 1 for images in out.stages)
    assert np.array_equal(np.asarray(out.stages[-1][0]), np.asarray(out.images[0]))
    # cells not generated yet are painted grey (0.5) in early stages
    first = np.asarray(out.stages[0][0])
    assert (first == 128).all(axis=-1).any()
    codes = pipe("a small red circle", num_inference_steps=4, generator=gens(1), return_stages=True, output_type="codes")
    assert codes.stages.shape == (1, 4, 16)
    assert torch.equal(codes.stages[:, 1], seen[1][1])


def test_num_images_per_prompt_and_negative_prompt(pipe):
    out = pipe(["a small red circle", "a large green triangle"], negative_prompt="a small blue square",
               guidance_scale=3.0, num_images_per_prompt=2, generator=gens(4), output_type="codes")
    assert out.images.shape == (4, 16)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(prompt=[]), "prompt"),
        (dict(prompt=["ok", 3]), "prompt"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=17), "num_inference_steps"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt"),
        (dict(order="spiral"), "order"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(generator=gens(3)), "generator"),
    ],
)
def test_bad_arguments_name_the_argument(pipe, kwargs, name):
    kwargs = dict(dict(prompt="a small red circle", num_inference_steps=2), **kwargs)
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


def test_codebook_mismatch_is_an_error():
    with pytest.raises(ValueError, match="codebook_size"):
        PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel(num_codes=32))


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(ValueError, match="missing sub-folder"):
        PDMPipeline.from_pretrained(str(tmp_path))


def test_pdm_generate_command(saved, tmp_path):
    out, strip = tmp_path / "out.png", tmp_path / "stages.png"
    code = pdm_main(["generate", "a small red circle", "--model", str(saved), "--steps", "4", "--seed", "1",
                     "--out", str(out), "--stages-out", str(strip), "--num-stages-shown", "4"])
    assert code == 0
    assert PIL.Image.open(out).size == (16, 16)
    assert PIL.Image.open(strip).size == (64, 16)
    again = tmp_path / "again.png"
    pdm_main(["generate", "a small red circle", "--model", str(saved), "--steps", "4", "--seed", "1", "--out", str(again)])
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(PIL.Image.open(again)))


def test_pdm_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "progressive_denoising.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout and "tokenize" in result.stdout
    assert subprocess.run([sys.executable, "-m", "progressive_denoising.cli", "nope"], capture_output=True).returncode == 2
