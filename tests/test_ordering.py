"""Orders (section 3.2), the stage schedule and the training tuples with pseudo errors (eq. 4, section 3.3)."""

import math

import pytest
import torch

from progressive_denoising.configuration_pdm import STATE_GENERATE, STATE_KEEP, STATE_REPLACE
from progressive_denoising.ordering import (
    IGNORE_INDEX,
    build_stage_tuples,
    cumulative_schedule,
    order_scores,
    scores_to_ranks,
    stage_schedule,
)

K = 16
MASK = K


def ranks_of(order, batch=3, num_tokens=12, quant_error=None, generator=None):
    return scores_to_ranks(order_scores(order, batch, num_tokens, quant_error=quant_error, generator=generator))


# -- orders ------------------------------------------------------------------------------------------------------


def test_raster_ranks_positions_left_to_right():
    assert torch.equal(ranks_of("raster"), torch.arange(12).expand(3, 12))


def test_quant_error_puts_lowest_error_first_and_reverse_mirrors_it():
    error = torch.rand(3, 12, generator=torch.Generator().manual_seed(0))
    ranks = ranks_of("quant-error", quant_error=error)
    reverse = ranks_of("reverse-quant-error", quant_error=error)
    for row in range(3):
        by_rank = error[row][ranks[row].argsort()]
        assert torch.all(by_rank[1:] >= by_rank[:-1]), "quant-error must go from low to high error"
        assert ranks[row, error[row].argmin()] == 0
        assert reverse[row, error[row].argmax()] == 0
    assert torch.equal(reverse, 11 - ranks)  # distinct errors: the exact mirror


def test_quant_error_needs_errors_of_the_right_shape():
    with pytest.raises(ValueError, match="quant_error"):
        order_scores("quant-error", 2, 12)
    with pytest.raises(ValueError, match="shape"):
        order_scores("quant-error", 2, 12, quant_error=torch.rand(2, 11))


def test_random_is_a_permutation_per_example_that_depends_on_the_seed():
    first = ranks_of("random", batch=4, generator=torch.Generator().manual_seed(1))
    again = ranks_of("random", batch=4, generator=torch.Generator().manual_seed(1))
    other = ranks_of("random", batch=4, generator=torch.Generator().manual_seed(2))
    for row in first:
        assert torch.equal(row.sort().values, torch.arange(12))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert len({tuple(row.tolist()) for row in first}) == 4  # fresh per example


def test_learned_and_unknown_orders_raise_clear_errors():
    with pytest.raises(ValueError, match="train_policy"):
        order_scores("learned", 2, 12)
    with pytest.raises(ValueError, match="order must be one of"):
        order_scores("zigzag", 2, 12)


# -- the stage schedule ------------------------------------------------------------------------------------------

CASES = [(16, 1), (16, 16), (16, 4), (16, 5), (12, 7), (10, 3)]


@pytest.mark.parametrize("num_tokens,num_stages", CASES)
def test_schedule_covers_every_code_in_near_equal_groups(num_tokens, num_stages):
    sizes = stage_schedule(num_tokens, num_stages)
    assert len(sizes) == num_stages and sum(sizes) == num_tokens
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_schedule_rejects_bad_stage_counts():
    for bad in (0, 17, 2.5):
        with pytest.raises(ValueError, match="num_stages"):
            stage_schedule(16, bad)


# -- training tuples ---------------------------------------------------------------------------------------------


def make_tuples(num_tokens, num_stages, batch=64, p_error=0.5, seed=0, order="random", token_loss_positions="stage"):
    generator = torch.Generator().manual_seed(seed)
    codes = torch.randint(K, (batch, num_tokens), generator=generator)
    ranks = ranks_of(order, batch, num_tokens, generator=generator)
    stages = torch.randint(1, num_stages + 1, (batch,), generator=generator)
    tuples = build_stage_tuples(codes, ranks, stages, num_stages, MASK, K, p_error=p_error, generator=generator,
                                token_loss_positions=token_loss_positions)
    return codes, ranks, stages, tuples


@pytest.mark.parametrize("num_tokens,num_stages", CASES)
def test_tuples_reveal_and_label_exactly_the_scheduled_groups(num_tokens, num_stages):
    codes, ranks, stages, t = make_tuples(num_tokens, num_stages)
    cumulative = cumulative_schedule(num_tokens, num_stages)
    shown_before, fixed_after = cumulative[stages - 1], cumulative[stages]
    revealed = t["image_tokens"] != MASK
    generate = t["state_labels"] == STATE_GENERATE
    assert torch.equal(revealed.sum(1), shown_before)
    assert torch.equal(generate.sum(1), fixed_after - shown_before)
    assert torch.equal(revealed, ranks < shown_before[:, None])  # the first t-1 groups of the order
    assert torch.equal(generate, (ranks >= shown_before[:, None]) & (ranks < fixed_after[:, None]))


@pytest.mark.parametrize("num_tokens,num_stages", CASES)
def test_revealed_codes_are_ground_truth_except_pseudo_errors(num_tokens, num_stages):
    codes, _, _, t = make_tuples(num_tokens, num_stages, p_error=0.7)
    revealed = t["image_tokens"] != MASK
    replace = t["state_labels"] == STATE_REPLACE
    assert torch.equal(t["image_tokens"][revealed & ~replace], codes[revealed & ~replace])
    assert (replace <= revealed).all(), "pseudo errors only on shown codes"
    errors = t["image_tokens"][replace]
    assert (errors != MASK).all() and (errors >= 0).all() and (errors < K).all()
    assert (errors != codes[replace]).all(), "a pseudo error never equals the ground truth"


@pytest.mark.parametrize("num_tokens,num_stages", CASES)
def test_state_and_token_labels(num_tokens, num_stages):
    codes, ranks, stages, t = make_tuples(num_tokens, num_stages, p_error=0.7)
    cumulative = cumulative_schedule(num_tokens, num_stages)
    group = (ranks >= cumulative[stages - 1][:, None]) & (ranks < cumulative[stages][:, None])
    wrong = (t["image_tokens"] != MASK) & (t["image_tokens"] != codes)
    assert torch.equal(t["state_labels"] == STATE_GENERATE, group)
    assert torch.equal(t["state_labels"] == STATE_REPLACE, wrong)
    assert torch.equal(t["state_labels"] == STATE_KEEP, ~group & ~wrong)
    labelled = group | wrong
    assert torch.equal(t["token_labels"][labelled], codes[labelled])
    assert (t["token_labels"][~labelled] == IGNORE_INDEX).all()
    assert torch.equal(t["has_error"], wrong.any(1))
    # No more pseudo errors than codes fixed by the stage before (the bound used at generation).
    previous = cumulative[stages - 1] - cumulative[(stages - 2).clamp(min=0)]
    assert (wrong.sum(1) <= torch.where(stages >= 2, previous, 0)).all()


@pytest.mark.parametrize("num_tokens,num_stages", CASES)
def test_masked_token_loss_labels_every_masked_position_and_keeps_the_states(num_tokens, num_stages):
    codes, ranks, stages, t = make_tuples(num_tokens, num_stages, p_error=0.7, token_loss_positions="masked")
    _, _, _, paper = make_tuples(num_tokens, num_stages, p_error=0.7, token_loss_positions="stage")
    masked = t["image_tokens"] == MASK
    wrong = ~masked & (t["image_tokens"] != codes)
    labelled = masked | wrong
    assert torch.equal(t["token_labels"][labelled], codes[labelled])
    assert (t["token_labels"][~labelled] == IGNORE_INDEX).all()
    # Same draws, same inputs and states: only where the token loss applies differs (a superset of the paper's).
    for key in ("image_tokens", "state_labels", "has_error"):
        assert torch.equal(t[key], paper[key]), key
    assert ((paper["token_labels"] != IGNORE_INDEX) <= (t["token_labels"] != IGNORE_INDEX)).all()
    later = stages < num_stages  # before the last stage some masked positions lie outside group t
    assert ((t["token_labels"] != IGNORE_INDEX).sum(1) > (paper["token_labels"] != IGNORE_INDEX).sum(1))[later].all()


@pytest.mark.parametrize("p_error", [0.0, 0.3, 1.0])
def test_rate_of_examples_with_pseudo_errors_is_p_error(p_error):
    _, _, stages, t = make_tuples(16, 4, batch=4000, p_error=p_error, seed=3)
    eligible = stages >= 2  # stage 1 shows nothing that could be wrong
    n = int(eligible.sum())
    rate = t["has_error"][eligible].float().mean().item()
    assert abs(rate - p_error) <= 4 * math.sqrt(p_error * (1 - p_error) / n) + 1e-9
    assert not t["has_error"][~eligible].any()


def test_single_stage_shows_nothing_and_labels_everything():
    codes, _, _, t = make_tuples(16, 1, p_error=1.0)
    assert (t["image_tokens"] == MASK).all()
    assert (t["state_labels"] == STATE_GENERATE).all()
    assert torch.equal(t["token_labels"], codes)


def test_tuples_reject_bad_arguments():
    codes = torch.zeros(2, 16, dtype=torch.long)
    ranks = torch.arange(16).expand(2, 16)
    with pytest.raises(ValueError, match="stages"):
        build_stage_tuples(codes, ranks, torch.tensor([0, 1]), 4, MASK, K)
    with pytest.raises(ValueError, match="p_error"):
        build_stage_tuples(codes, ranks, torch.tensor([1, 1]), 4, MASK, K, p_error=1.5)
    with pytest.raises(ValueError, match="token_loss_positions"):
        build_stage_tuples(codes, ranks, torch.tensor([1, 1]), 4, MASK, K, token_loss_positions="all")
    with pytest.raises(ValueError, match="codes and ranks"):
        build_stage_tuples(codes, ranks[:, :8], torch.tensor([1, 1]), 4, MASK, K)


# -- known regions (editing) -------------------------------------------------------------------------------------


def known_rows(batch, num_tokens, seed=0):
    g = torch.Generator().manual_seed(seed)
    known = torch.rand(batch, num_tokens, generator=g) < 0.4
    known[0] = False  # a row with nothing known
    return known


@pytest.mark.parametrize("num_stages", [1, 3, 4])
def test_known_codes_are_shown_at_every_stage_and_the_schedule_covers_the_others(num_stages):
    from progressive_denoising.ordering import fill_schedule

    batch, num_tokens = 4, 12
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, K, (batch, num_tokens), generator=g)
    ranks = ranks_of("random", batch, num_tokens, generator=g)
    known = known_rows(batch, num_tokens)
    schedule = fill_schedule((~known).sum(-1), num_stages)
    for stage in range(1, num_stages + 1):
        stages = torch.full((batch,), stage)
        out = build_stage_tuples(codes, ranks, stages, num_stages, MASK, K, known=known)
        assert torch.equal(out["image_tokens"][known], codes[known])
        assert (out["state_labels"][known] == STATE_KEEP).all()
        shown_unknown = ((out["image_tokens"] != MASK) & ~known).sum(-1)
        assert torch.equal(shown_unknown, schedule[:, stage - 1])
        assert torch.equal((out["state_labels"] == STATE_GENERATE).sum(-1), schedule[:, stage] - schedule[:, stage - 1])
        # among the unknown positions the order of `ranks` is kept: the shown ones rank before the masked ones
        for row in range(batch):
            unknown = ~known[row]
            shown = out["image_tokens"][row][unknown] != MASK
            if shown.any() and (~shown).any():
                assert ranks[row][unknown][shown].max() < ranks[row][unknown][~shown].min()


def test_nothing_known_is_the_plain_tuple_with_the_same_random_draws():
    batch, num_tokens = 5, 12
    codes = torch.randint(0, K, (batch, num_tokens), generator=torch.Generator().manual_seed(1))
    ranks = ranks_of("random", batch, num_tokens, generator=torch.Generator().manual_seed(2))
    stages = torch.tensor([1, 2, 3, 4, 2])
    plain = build_stage_tuples(codes, ranks, stages, 4, MASK, K, p_error=0.7, generator=torch.Generator().manual_seed(3))
    none = build_stage_tuples(codes, ranks, stages, 4, MASK, K, p_error=0.7, generator=torch.Generator().manual_seed(3),
                              known=torch.zeros(batch, num_tokens, dtype=torch.bool))
    for key in plain:
        assert torch.equal(plain[key], none[key]), key
    with pytest.raises(ValueError, match="known must be a bool tensor"):
        build_stage_tuples(codes, ranks, stages, 4, MASK, K, known=torch.zeros(batch, num_tokens))
