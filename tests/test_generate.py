"""PDMForTextToImage.generate: schedule, determinism, batching, replacement, orders, guidance, arguments."""

import pytest
import torch

from progressive_denoising.ordering import cumulative_schedule, stage_schedule

from tiny import tiny_model


def prompts(batch=2, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, 6), generator=g)
    mask = torch.ones_like(ids)
    mask[0, -3:] = 0
    return ids, mask


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def force_state_head(model, keep=0.0, generate=0.0, replace=0.0):
    with torch.no_grad():
        model.state_head.weight.zero_()
        model.state_head.bias.copy_(torch.tensor([keep, generate, replace]))


@pytest.mark.parametrize(
    "grid, num_stages",
    [((4, 4), 1), ((4, 4), 4), ((4, 4), 16), ((4, 4), 3), ((4, 4), 5), ((3, 5), 4), ((3, 5), 15), ((3, 5), 7)],
)
@pytest.mark.parametrize("order", ["quant-error", "raster", "random"])
def test_codes_fixed_per_stage_follow_the_schedule(grid, num_stages, order):
    model = tiny_model(token_grid_size=grid)
    num_tokens = grid[0] * grid[1]
    ids, mask = prompts()
    out = model.generate(ids, mask, num_stages=num_stages, order=order, generator=generators(2), return_stages=True)
    assert out.stages.shape == (2, num_stages, num_tokens)
    fixed = (out.stages != model.config.mask_token_id).sum(-1)  # (batch, T)
    expected = cumulative_schedule(num_tokens, num_stages)[1:]
    assert (fixed == expected).all(), (fixed, expected)
    assert out.codes.shape == (2, num_tokens) and out.codes.dtype == torch.long
    assert ((out.codes >= 0) & (out.codes < model.config.codebook_size)).all()
    assert torch.equal(out.stages[:, -1], out.codes)


def test_schedule_sizes():
    assert stage_schedule(16, 1) == [16]
    assert stage_schedule(16, 16) == [1] * 16
    assert stage_schedule(16, 4) == [4, 4, 4, 4]
    sizes = stage_schedule(1024, 100)
    assert sum(sizes) == 1024 and set(sizes) == {10, 11}
    for bad in (0, 17, 2.0):
        with pytest.raises(ValueError, match="num_stages"):
            stage_schedule(16, bad)


def test_same_seed_same_codes_different_seeds_differ():
    model = tiny_model()
    ids, mask = prompts()
    a = model.generate(ids, mask, generator=generators(2, seed=1))
    b = model.generate(ids, mask, generator=generators(2, seed=1))
    c = model.generate(ids, mask, generator=generators(2, seed=2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    single = model.generate(ids, mask, generator=torch.Generator().manual_seed(5))
    assert torch.equal(single, model.generate(ids, mask, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("guidance_scale", [1.0, 2.5])
@pytest.mark.parametrize("order", ["quant-error", "random"])
def test_batch_equals_prompts_one_by_one(guidance_scale, order):
    model = tiny_model()
    ids, mask = prompts(batch=3)
    batch = model.generate(ids, mask, order=order, guidance_scale=guidance_scale, generator=generators(3))
    for i in range(3):
        length = int(mask[i].sum())
        one = model.generate(ids[i : i + 1, :length], mask[i : i + 1, :length], order=order,
                             guidance_scale=guidance_scale, generator=generators(3)[i : i + 1])
        assert torch.equal(batch[i : i + 1], one), i


def changes_per_stage(model, stages):
    """(batch, T-1): how many codes that were already generated changed in each stage after the first."""
    before, after = stages[:, :-1], stages[:, 1:]
    generated = before != model.config.mask_token_id
    return ((before != after) & generated).sum(-1)


def test_forced_replacement_is_bounded_by_the_previous_stage():
    model = tiny_model(token_grid_size=(4, 4))
    force_state_head(model, replace=10.0)
    ids, mask = prompts()
    num_stages = 5
    out = model.generate(ids, mask, num_stages=num_stages, generator=generators(2), return_stages=True)
    changes = changes_per_stage(model, out.stages)
    bound = torch.tensor(stage_schedule(16, num_stages)[:-1])  # codes generated in the stage before
    assert (changes <= bound).all(), (changes, bound)
    assert changes.sum() > 0  # replacement really happens (a replaced code rarely draws the same code again)
    capped = model.generate(ids, mask, num_stages=num_stages, generator=generators(2), return_stages=True, max_replacements=1)
    assert (changes_per_stage(model, capped.stages) <= 1).all()
    # The reported counts: every generated code is called "replace", so each stage replaces up to its bound.
    assert out.replaced.shape == (2, num_stages) and (out.replaced[:, 0] == 0).all()
    assert torch.equal(out.replaced[:, 1:], bound.expand(2, -1))
    assert (changes <= out.replaced[:, 1:]).all()  # a replaced code may be redrawn as the same code
    assert (capped.replaced[:, 1:] == 1).all()


@pytest.mark.parametrize("forced", [True, False])
def test_max_replacements_zero_never_changes_a_generated_code(forced):
    model = tiny_model()
    if forced:
        force_state_head(model, replace=10.0)
    ids, mask = prompts()
    out = model.generate(ids, mask, num_stages=8, generator=generators(2), return_stages=True, max_replacements=0)
    assert (changes_per_stage(model, out.stages) == 0).all()
    assert (out.replaced == 0).all()


def test_keep_state_means_no_replacement():
    model = tiny_model()
    force_state_head(model, keep=10.0)
    ids, mask = prompts()
    out = model.generate(ids, mask, num_stages=8, generator=generators(2), return_stages=True)
    assert (changes_per_stage(model, out.stages) == 0).all()


def test_raster_fills_strictly_left_to_right():
    model = tiny_model()
    ids, mask = prompts()
    out = model.generate(ids, mask, num_stages=5, order="raster", generator=generators(2), return_stages=True,
                         max_replacements=0)
    filled = out.stages != model.config.mask_token_id
    for t, count in enumerate(cumulative_schedule(16, 5)[1:].tolist()):
        expected = torch.arange(16) < count
        assert (filled[:, t] == expected).all()


def test_state_head_chooses_the_positions_for_trained_orders():
    model = tiny_model()
    with torch.no_grad():  # "generate" logit grows with the row embedding index: bottom rows first
        model.state_head.weight.zero_()
        model.state_head.bias.copy_(torch.tensor([0.0, 0.0, -10.0]))
    order = torch.arange(16).flip(0).float()
    original = model.decode

    def decode_with_bottom_first(*args):
        token_logits, state_logits = original(*args)
        state_logits = state_logits.clone()
        state_logits[..., 1] = order
        return token_logits, state_logits

    model.decode = decode_with_bottom_first
    ids, mask = prompts()
    out = model.generate(ids, mask, num_stages=4, order="quant-error", generator=generators(2), return_stages=True)
    first_stage = out.stages[:, 0] != model.config.mask_token_id
    assert (first_stage == (torch.arange(16) < 4)).all()


class DisagreeingStateHead(torch.nn.Module):
    """State logits where the raw "generate" logit and p(generate) rank positions in opposite ways.

    Positions 0-3: generate 5, keep 10 (p(generate) ~ 0.007, the largest raw logit); positions 4-7: generate 1,
    keep and replace -10 (p(generate) ~ 1); the rest: generate -20.
    """

    def forward(self, hidden_states):
        logits = torch.tensor([0.0, -20.0, -30.0]).repeat(16, 1)
        logits[:4] = torch.tensor([10.0, 5.0, -30.0])
        logits[4:8] = torch.tensor([-10.0, 1.0, -10.0])
        return logits.expand(*hidden_states.shape[:-1], 3)


def test_positions_to_fill_are_ranked_by_probability_not_raw_logit():
    model = tiny_model()
    model.state_head = DisagreeingStateHead()
    ids, mask = prompts()
    out = model.generate(ids, mask, num_stages=4, generator=generators(2), return_stages=True)
    first_stage = out.stages[:, 0] != model.config.mask_token_id
    assert (first_stage == ((torch.arange(16) >= 4) & (torch.arange(16) < 8))).all(), first_stage


def test_guidance_one_is_plain_conditional_sampling():
    model = tiny_model()
    ids, mask = prompts()
    negative = torch.randint(3, 100, (1, 4))
    plain = model.generate(ids, mask, guidance_scale=1.0, generator=generators(2))
    with_negative = model.generate(ids, mask, guidance_scale=1.0, negative_input_ids=negative, generator=generators(2))
    guided = model.generate(ids, mask, guidance_scale=4.0, generator=generators(2))
    assert torch.equal(plain, with_negative)
    assert not torch.equal(plain, guided)


def test_text_is_encoded_once_and_cross_attention_keys_computed_once():
    model = tiny_model()
    calls = {"encoder": 0, "cross_k": 0}
    model.text_encoder.register_forward_hook(lambda *_: calls.__setitem__("encoder", calls["encoder"] + 1))
    for layer in model.decoder.layers:
        layer.cross_attn.k_proj.register_forward_hook(lambda *_: calls.__setitem__("cross_k", calls["cross_k"] + 1))
    ids, mask = prompts()
    model.generate(ids, mask, num_stages=16, guidance_scale=2.0, generator=generators(2))
    assert calls == {"encoder": 2, "cross_k": len(model.decoder.layers)}  # conditional + unconditional prompts


def test_num_images_per_prompt():
    model = tiny_model()
    ids, mask = prompts()
    codes = model.generate(ids, mask, num_images_per_prompt=3, generator=generators(6))
    assert codes.shape == (6, 16)
    assert not torch.equal(codes[0], codes[1])


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_stages=0), "num_stages"),
        (dict(num_stages=17), "num_stages"),
        (dict(order="zigzag"), "order"),
        (dict(temperature=0.0), "temperature"),
        (dict(top_k=0), "top_k"),
        (dict(top_p=1.5), "top_p"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(max_replacements=-1), "max_replacements"),
        (dict(generator=generators(3)), "generators"),
        (dict(guidance_scale=2.0, negative_input_ids=torch.ones(3, 2, dtype=torch.long)), "negative_input_ids"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, name):
    model = tiny_model()
    ids, mask = prompts()
    with pytest.raises(ValueError, match=name):
        model.generate(ids, mask, **kwargs)


def test_top_k_one_is_greedy():
    model = tiny_model()
    ids, mask = prompts()
    a = model.generate(ids, mask, top_k=1, max_replacements=0, generator=generators(2, seed=0))
    b = model.generate(ids, mask, top_k=1, max_replacements=0, generator=generators(2, seed=9))
    assert torch.equal(a, b)
    nucleus = model.generate(ids, mask, top_p=1e-6, max_replacements=0, generator=generators(2, seed=3))
    assert torch.equal(a, nucleus)


def test_compiled_fast_path_gives_the_plain_codes():
    plain = tiny_model()
    fast = tiny_model().compile_generation()
    ids, mask = prompts()
    for guidance_scale in (1.0, 3.0):
        kwargs = dict(num_stages=4, guidance_scale=guidance_scale, return_stages=True)
        expected = plain.generate(ids, mask, generator=generators(2), **kwargs)
        got = fast.generate(ids, mask, generator=generators(2), **kwargs)
        assert torch.equal(got.stages, expected.stages)
