"""PDMForTextToImage.generate from given codes (`init_codes`, `keep_mask`): the editing path of the pipelines."""

import pytest
import torch

from progressive_denoising.ordering import fill_schedule, stage_schedule
from test_generate import force_state_head, generators, prompts
from tiny import tiny_model


def start(model, batch=2, seed=0, masked_share=0.5):
    """Random codes with about `masked_share` of them `[MASK]`, and a keep-mask on a third of the others."""
    g = torch.Generator().manual_seed(seed)
    num_tokens, mask_id = model.config.num_image_tokens, model.config.mask_token_id
    codes = torch.randint(0, model.config.codebook_size, (batch, num_tokens), generator=g)
    masked = torch.rand(batch, num_tokens, generator=g) < masked_share
    masked[:, 0] = True  # at least one position to fill per row
    codes[masked] = mask_id
    keep = ~masked & (torch.rand(batch, num_tokens, generator=g) < 0.34)
    return codes, keep


def test_fill_schedule_is_the_stage_schedule_of_each_row():
    counts = torch.tensor([16, 7, 0, 3])
    for num_stages in (1, 3, 4, 16):
        schedule = fill_schedule(counts, num_stages)
        assert schedule.shape == (4, num_stages + 1)
        for row, n in enumerate(counts.tolist()):
            sizes = (schedule[row, 1:] - schedule[row, :-1]).tolist()
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1
            if n >= num_stages:
                assert sizes == stage_schedule(n, num_stages)


@pytest.mark.parametrize("order", ["quant-error", "raster", "random"])
def test_kept_codes_are_bit_identical_and_only_masked_positions_are_filled_on_schedule(order):
    model = tiny_model()
    force_state_head(model, replace=5.0)  # replacement fires wherever it may: kept codes must still never change
    ids, mask = prompts()
    codes, keep = start(model)
    out = model.generate(ids, mask, num_stages=4, order=order, init_codes=codes, keep_mask=keep,
                         generator=generators(2), return_stages=True)
    assert torch.equal(out.codes[keep], codes[keep])
    assert (out.codes != model.config.mask_token_id).all()
    mask_id = model.config.mask_token_id
    filled_per_stage = (out.stages != mask_id).sum(-1) - (codes != mask_id).sum(-1, keepdim=True)
    expected = fill_schedule((codes == mask_id).sum(-1), 4)[:, 1:]
    assert torch.equal(filled_per_stage, expected)
    for stage in range(4):
        assert torch.equal(out.stages[:, stage][keep], codes[keep])


def test_replacement_reaches_given_codes_that_are_not_kept_and_is_bounded():
    model = tiny_model()
    force_state_head(model, replace=5.0)  # every candidate ties: the first positions are replaced first
    ids, mask = prompts()
    num_tokens, mask_id = model.config.num_image_tokens, model.config.mask_token_id
    codes = torch.randint(0, model.config.codebook_size, (2, num_tokens), generator=torch.Generator().manual_seed(0))
    codes[:, num_tokens // 2 :] = mask_id  # given codes first, then the positions to fill
    keep = torch.zeros_like(codes, dtype=torch.bool)
    keep[:, 0] = True
    out = model.generate(ids, mask, num_stages=4, init_codes=codes, keep_mask=keep, generator=generators(2),
                         return_stages=True)
    schedule = fill_schedule((codes == mask_id).sum(-1), 4)
    generated_before = torch.cat([torch.zeros(2, 1, dtype=torch.long), schedule[:, 1:-1] - schedule[:, :-2]], 1)
    assert torch.equal(out.replaced, generated_before)  # as many as the bound allows, no more
    assert torch.equal(out.codes[:, 0], codes[:, 0])  # kept
    assert (out.codes[:, 1 : num_tokens // 2] != codes[:, 1 : num_tokens // 2]).any()  # given, not kept: replaced

    none = model.generate(ids, mask, num_stages=4, init_codes=codes, keep_mask=keep, generator=generators(2),
                          max_replacements=0)
    given = codes != mask_id
    assert torch.equal(none[given], codes[given])


def test_all_masked_init_codes_equal_generation_from_scratch():
    model = tiny_model()
    ids, mask = prompts()
    plain = model.generate(ids, mask, num_stages=4, generator=generators(2))
    masked = torch.full_like(plain, model.config.mask_token_id)
    assert torch.equal(model.generate(ids, mask, num_stages=4, generator=generators(2), init_codes=masked), plain)


def test_nothing_to_fill_and_everything_kept_returns_the_codes():
    model = tiny_model()
    ids, mask = prompts()
    codes = torch.randint(0, model.config.codebook_size, (2, model.config.num_image_tokens))
    out = model.generate(ids, mask, num_stages=3, init_codes=codes, keep_mask=torch.ones_like(codes, dtype=torch.bool),
                         generator=generators(2))
    assert torch.equal(out, codes)


@pytest.mark.parametrize("order", ["quant-error", "random"])
def test_batch_equals_one_by_one_with_per_image_generators(order):
    model = tiny_model()
    ids, mask = prompts(batch=3)
    codes, keep = start(model, batch=3)
    batch = model.generate(ids, mask, num_stages=4, order=order, init_codes=codes, keep_mask=keep,
                           generator=generators(3))
    for i in range(3):
        one = model.generate(ids[i : i + 1], mask[i : i + 1], num_stages=4, order=order, init_codes=codes[i : i + 1],
                             keep_mask=keep[i : i + 1], generator=generators(1, seed=i))
        assert torch.equal(batch[i : i + 1], one), i


def test_init_codes_per_prompt_are_repeated_for_num_images_per_prompt():
    model = tiny_model()
    ids, mask = prompts()
    codes, keep = start(model)
    out = model.generate(ids, mask, num_stages=4, init_codes=codes, keep_mask=keep, num_images_per_prompt=3,
                         generator=generators(6))
    assert out.shape == (6, model.config.num_image_tokens)
    assert torch.equal(out[keep.repeat_interleave(3, 0)], codes.repeat_interleave(3, 0)[keep.repeat_interleave(3, 0)])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda c, k: (c[:, :-1], None), "init_codes must be an integer tensor of shape"),
        (lambda c, k: (c.float(), None), "init_codes must be an integer tensor"),
        (lambda c, k: (c + 10_000, None), r"init_codes must lie in \[0, "),
        (lambda c, k: (c, k.long()), "keep_mask must be a bool tensor"),
        (lambda c, k: (c, k[:1]), "keep_mask must be a bool tensor of the shape"),
        (lambda c, k: (c, torch.ones_like(k)), "keep_mask keeps positions whose init_codes are"),
        (lambda c, k: (None, k), "keep_mask needs init_codes"),
    ],
)
def test_bad_init_codes_and_keep_mask_name_the_argument(change, message):
    model = tiny_model()
    ids, mask = prompts()
    codes, keep = change(*start(model))
    with pytest.raises(ValueError, match=message):
        model.generate(ids, mask, num_stages=4, init_codes=codes, keep_mask=keep)
