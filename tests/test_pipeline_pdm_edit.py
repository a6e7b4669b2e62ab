"""The editing pipelines (inpaint / outpaint, image-to-image, revise) on a tiny random pipeline: kept codes are
bit-identical, the model's state head chooses what img2img and revise open, batches equal images one by one, and bad
images, masks and strengths are refused naming the argument."""

import numpy as np
import PIL.Image
import pytest
import torch

from progressive_denoising import (
    PDMImg2ImgPipeline,
    PDMInpaintPipeline,
    PDMPipeline,
    PDMRevisePipeline,
    shift_for_outpainting,
)
from progressive_denoising.pipeline_pdm_edit import two_class_split
from test_generate import force_state_head
from tiny import tiny_model, tiny_tokenizer, tiny_vqmodel

PROMPTS = ["a red circle", "a blue square left of a green triangle"]


def make(cls, **state):
    model = tiny_model()
    if state:
        force_state_head(model, **state)
    pipeline = cls(tokenizer=tiny_tokenizer(), model=model, vqvae=tiny_vqmodel())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def picture(seed=0, size=16):
    rng = np.random.default_rng(seed)
    return PIL.Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def left_half_mask(size=16):
    mask = PIL.Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    return mask


@pytest.fixture(scope="module")
def inpaint():
    return make(PDMInpaintPipeline)


def test_inpainting_keeps_the_codes_outside_the_mask_bit_for_bit(inpaint):
    image = picture()
    codes = inpaint.encode_image(image, 1)
    out = inpaint(PROMPTS[0], image, left_half_mask(), output_type="codes", generator=gens(1), num_images_per_prompt=1)
    grid = inpaint.model.config.token_grid_size
    expected = torch.zeros(grid, dtype=torch.bool)
    expected[:, : grid[1] // 2] = True  # the left half of the 4x4 code grid
    assert torch.equal(out.edit_mask[0], expected.flatten())
    assert torch.equal(out.images[0][~expected.flatten()], codes[0][~expected.flatten()])
    assert (out.images != inpaint.model.config.mask_token_id).all()
    assert out.changed[0] == (out.images[0] != codes[0]).sum()


def test_one_white_pixel_opens_its_code_only(inpaint):
    mask = np.zeros((16, 16), dtype=np.float32)
    mask[5, 9] = 1.0  # code (1, 2) of the 4x4 grid: 4x4 pixels per code
    edit_mask = inpaint.mask_to_codes(PIL.Image.fromarray((mask * 255).astype(np.uint8)), 1)
    assert edit_mask[0].nonzero().flatten().tolist() == [1 * 4 + 2]


def test_inpainting_batch_equals_images_one_by_one(inpaint):
    images = [picture(0), picture(1)]
    batch = inpaint(PROMPTS, images, left_half_mask(), generator=gens(4), num_images_per_prompt=2,
                    output_type="codes").images
    for i, prompt in enumerate(PROMPTS):
        one = inpaint(prompt, images[i], left_half_mask(), generator=gens(2, seed=2 * i), num_images_per_prompt=2,
                      output_type="codes").images
        assert torch.equal(batch[2 * i : 2 * i + 2], one), i


def test_outpainting_shifts_the_image_and_masks_the_uncovered_border(inpaint):
    image = picture()
    canvas, mask = shift_for_outpainting(image, 4, 0)
    assert np.array_equal(np.array(canvas)[:, 4:], np.array(image)[:, :-4])
    assert (np.array(mask)[:, :4] == 255).all() and (np.array(mask)[:, 4:] == 0).all()
    out = inpaint(PROMPTS[0], canvas, mask, output_type="codes", generator=gens(1))
    assert out.edit_mask[0].view(4, 4)[:, 0].all() and not out.edit_mask[0].view(4, 4)[:, 1:].any()
    with pytest.raises(ValueError, match="dx and dy"):
        shift_for_outpainting(image, 16, 0)


def test_img2img_opens_strength_times_L_codes_chosen_by_the_state_head():
    pipe = make(PDMImg2ImgPipeline)
    image = picture()
    codes = pipe.encode_image(image, 1)
    ids, mask = pipe.encode_prompt([PROMPTS[0]])
    margin = pipe.replace_margin(ids, mask, codes)
    out = pipe(PROMPTS[0], image, strength=0.25, output_type="codes", generator=gens(1), max_replacements=0)
    assert out.edit_mask.sum() == 4  # round(0.25 * 16)
    assert set(out.edit_mask[0].nonzero().flatten().tolist()) == set(margin[0].topk(4).indices.tolist())
    assert torch.equal(out.images[0][~out.edit_mask[0]], codes[0][~out.edit_mask[0]])  # no replacement: kept

    unchanged = pipe(PROMPTS[0], image, strength=0.0, output_type="codes", generator=gens(1))
    assert unchanged.changed.item() == 0 and torch.equal(unchanged.images, codes)
    full = pipe(PROMPTS[0], image, strength=1.0, output_type="codes", generator=gens(1))
    assert full.edit_mask.all()


@pytest.mark.parametrize("strength", [-0.1, 1.5, "half", None, True])
def test_img2img_refuses_a_strength_outside_zero_one(strength):
    pipe = make(PDMImg2ImgPipeline)
    with pytest.raises(ValueError, match="strength must be a number in \\[0, 1\\]"):
        pipe(PROMPTS[0], picture(), strength=strength)


def test_revise_rewrites_what_the_state_head_would_replace_and_nothing_outside_the_region():
    eager = make(PDMRevisePipeline, replace=5.0)  # the state head calls every code "replace"
    image = picture()
    codes = eager.encode_image(image, 1)
    out = eager(PROMPTS[0], image, mask_image=left_half_mask(), threshold=0.0, output_type="codes", generator=gens(1))
    region = eager.mask_to_codes(left_half_mask(), 1)[0]
    assert torch.equal(out.edit_mask[0], region)
    assert torch.equal(out.images[0][~region], codes[0][~region])
    capped = eager(PROMPTS[0], image, threshold=0.0, max_edits=3, output_type="codes", generator=gens(1))
    assert capped.edit_mask.sum() == 3

    content = make(PDMRevisePipeline, keep=5.0)  # nothing looks wrong to it
    out = content(PROMPTS[0], image, threshold=0.0, output_type="codes", generator=gens(1))
    assert out.changed.item() == 0 and not out.edit_mask.any() and torch.equal(out.images, codes)
    with pytest.raises(ValueError, match="max_edits"):
        content(PROMPTS[0], image, max_edits=-1)
    with pytest.raises(ValueError, match="threshold must be None or a finite number"):
        content(PROMPTS[0], image, threshold=float("nan"))


def test_two_class_split_separates_the_distrusted_group():
    assert -9 < two_class_split(torch.tensor([-10.0, 3.0, -10.5, -9.0, 2.0])) < 2
    assert two_class_split(torch.tensor([1.0])) < 1  # a lone code is its own upper group


def test_revise_by_default_opens_the_upper_group_of_each_image_margins():
    pipe = make(PDMRevisePipeline)
    images = [picture(0), picture(1)]
    codes = pipe.encode_image(images, 2)
    ids, mask = pipe.encode_prompt(PROMPTS)
    margin = pipe.replace_margin(ids, mask, codes)
    out = pipe(PROMPTS, images, output_type="codes", generator=gens(2))
    for row in range(2):
        assert torch.equal(out.edit_mask[row], margin[row] > two_class_split(margin[row]))
        assert 0 < out.edit_mask[row].sum() < codes.shape[1]


@pytest.mark.parametrize("cls", [PDMInpaintPipeline, PDMRevisePipeline])
@pytest.mark.parametrize(
    "image, mask, message",
    [
        (picture(size=32), left_half_mask(), "image must be 16x16 pixels"),
        (picture(), left_half_mask(size=8), "mask_image must be 16x16 pixels"),
        ("picture.png", left_half_mask(), "image must be a PIL image"),
        (picture(), "mask.png", "mask_image must be a PIL image"),
        ([picture(), picture(1), picture(2)], left_half_mask(), "image holds 3 images for 2 prompts"),
    ],
)
def test_images_and_masks_of_the_wrong_size_or_kind_name_the_argument(cls, image, mask, message):
    pipe = make(cls)
    kwargs = {"mask_image": mask}
    with pytest.raises(ValueError, match=message):
        pipe(PROMPTS, image, **kwargs)


def test_editing_pipelines_load_a_saved_text_to_image_folder(tmp_path):
    base = make(PDMPipeline)
    base.save_pretrained(tmp_path)
    pipe = PDMInpaintPipeline.from_pretrained(tmp_path)
    assert isinstance(pipe, PDMInpaintPipeline)
    pipe.set_progress_bar_config(disable=True)
    from_pipe = PDMImg2ImgPipeline.from_pipe(base)
    assert from_pipe.model is base.model and from_pipe.vqvae is base.vqvae
    out = pipe(PROMPTS[0], picture(), left_half_mask(), output_type="np", generator=gens(1))
    assert out.images.shape == (1, 16, 16, 3)


@pytest.fixture(scope="module")
def edit_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("edit")
    make(PDMPipeline).save_pretrained(folder / "pipeline")
    picture().save(folder / "in.png")
    left_half_mask().save(folder / "mask.png")
    return folder


@pytest.mark.parametrize("mode, extra", [("inpaint", ["--mask", "mask.png"]), ("img2img", ["--strength", "0.25"]),
                                         ("revise", ["--mask", "mask.png", "--max-edits", "3"])])
def test_pdm_edit_writes_the_edited_image(edit_files, mode, extra, capsys, monkeypatch):
    from progressive_denoising.cli import main as pdm_main

    monkeypatch.chdir(edit_files)
    out = f"{mode}.png"
    assert pdm_main(["edit", mode, PROMPTS[0], "--image", "in.png", "--model", "pipeline", "--out", out,
                     "--num-images", "2", *extra]) == 0
    assert f"wrote {out} ({mode}: " in capsys.readouterr().out
    assert PIL.Image.open(edit_files / out).size == (32, 16)  # two edits side by side


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["inpaint", "p", "--image", "in.png"], "--mask"),
        (["img2img", "p", "--image", "in.png", "--mask", "mask.png"], "--mask"),
        (["img2img", "p", "--image", "in.png", "--strength", "1.5"], "--strength"),
        (["revise", "p", "--image", "in.png", "--strength", "0.5"], "--strength"),
        (["inpaint", "p", "--image", "in.png", "--mask", "mask.png", "--threshold", "0"], "--threshold"),
        (["revise", "p", "--image", "missing.png"], "--image"),
        (["revise", "p", "--image", "mask.png", "--mask", "small.png"], "--mask"),
        (["revise", "p", "--image", "small.png"], "--image"),
        (["revise", "p", "--image", "in.png", "--steps", "99"], "--steps"),
    ],
)
def test_pdm_edit_errors_name_the_flag(edit_files, argv, flag, capsys, monkeypatch):
    from progressive_denoising.cli import main as pdm_main

    monkeypatch.chdir(edit_files)
    picture(size=8).save(edit_files / "small.png")
    with pytest.raises(SystemExit) as exit_:
        pdm_main(["edit", *argv, "--model", "pipeline", "--out", "never.png"])
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err
    assert not (edit_files / "never.png").exists()
