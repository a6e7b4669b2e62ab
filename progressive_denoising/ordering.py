"""Generation orders, the stage schedule and the construction of training tuples (sections 3.1-3.3).

An order is a score per position; the position with the lowest score is generated first. The stage schedule
says how many codes each of the T stages fixes; training and `generate` share it, so a model is trained on
exactly the groups it will be asked to fill.

This module only needs torch: it is copied next to the model code when a model is shared with
`trust_remote_code`.
"""

from typing import List, Optional, Sequence, Union

import torch

from .configuration_pdm import FIXED_ORDERS, ORDERS, STATE_GENERATE, STATE_KEEP, STATE_REPLACE, TOKEN_LOSS_POSITIONS

IGNORE_INDEX = -100

Generators = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


def stage_schedule(num_tokens: int, num_stages: int) -> list:
    """Number of codes fixed at each stage: T sizes that sum to L and differ by at most one.

    When T does not divide L the larger groups are spread evenly over the stages (size of stage t is
    floor((t+1)L/T) - floor(tL/T)), so no stage is starved and `stage_schedule(L, L)` is one code per stage.
    """
    if not isinstance(num_stages, int) or not 1 <= num_stages <= num_tokens:
        raise ValueError(f"num_stages must be an integer between 1 and the number of image tokens {num_tokens}, got {num_stages!r}")
    return [(t + 1) * num_tokens // num_stages - t * num_tokens // num_stages for t in range(num_stages)]


def cumulative_schedule(num_tokens: int, num_stages: int, device=None) -> torch.Tensor:
    """(T + 1,) long tensor: how many codes are fixed before stage t (entry t) and after the last stage (entry T)."""
    stage_schedule(num_tokens, num_stages)  # its check of num_stages
    return fill_schedule(torch.tensor([num_tokens], device=device), num_stages)[0]


def fill_schedule(counts: torch.Tensor, num_stages: int) -> torch.Tensor:
    """(batch, T + 1) long tensor: how many of a row's `counts` (batch,) positions to fill are fixed before stage t.

    Row b follows `stage_schedule(counts[b], T)` (entry t is floor(t * n / T)); with n = L it is
    `cumulative_schedule(L, T)` for every row. A row with fewer positions than stages leaves some stages empty.
    """
    steps = torch.arange(num_stages + 1, device=counts.device)
    return counts.long().unsqueeze(1) * steps // num_stages


def rand(shape, generator: Generators = None, device=None, lengths: Optional[List[int]] = None) -> torch.Tensor:
    """Uniform [0, 1) numbers of `shape`; with a list of generators, row b comes from generator b.

    Drawing each example's numbers from its own generator makes a batch give the same result as its
    examples one by one with the same generators. `lengths` (one per row, with a list of generators): row b draws
    only its first lengths[b] entries along dimension 1 (the rest is 0.5), so its stream does not depend on how
    wide the other rows of the batch made the tensor.
    """
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.rand(shape, generator=generator, device=gen_device).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}: pass one per example")
    if lengths is None:
        return torch.stack([torch.rand(shape[1:], generator=g, device=g.device) for g in generator]).to(device)
    rows = torch.full(tuple(shape), 0.5, device=device)
    for row, (g, length) in enumerate(zip(generator, lengths)):
        rows[row, :length] = torch.rand((length, *shape[2:]), generator=g, device=g.device).to(device)
    return rows


def order_scores(
    order: str,
    batch_size: int,
    num_tokens: int,
    quant_error: Optional[torch.Tensor] = None,
    generator: Generators = None,
    device=None,
) -> torch.Tensor:
    """(batch, L) float scores of an order; lower is generated earlier.

    - `raster`: position index (left to right, top to bottom);
    - `random`: uniform noise, a fresh permutation per example and seed;
    - `quant-error`: the VQ quantization error of each code (low error, i.e. easy, first: coarse to fine);
    - `reverse-quant-error`: its mirror (fine to coarse, the "un-progressive" row of table 3).
    `learned` has no fixed score: it is the state head after policy-gradient training (`training/train_policy.py`).
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if order == "raster":
        return torch.arange(num_tokens, device=device, dtype=torch.float32).expand(batch_size, num_tokens).clone()
    if order == "random":
        return rand((batch_size, num_tokens), generator, device)
    if order == "learned":
        raise ValueError("order 'learned' has no fixed score: train with 'quant-error', then run training/train_policy.py")
    if quant_error is None:
        raise ValueError(f"order {order!r} needs the quantization error of every code (quant_error)")
    if quant_error.shape != (batch_size, num_tokens):
        raise ValueError(f"quant_error must have shape {(batch_size, num_tokens)}, got {tuple(quant_error.shape)}")
    quant_error = quant_error.to(device=device, dtype=torch.float32)
    return quant_error if order == "quant-error" else -quant_error


def scores_to_ranks(scores: torch.Tensor) -> torch.Tensor:
    """(batch, L) rank of every position under `scores` (0 = lowest score); ties keep position order."""
    order = torch.argsort(scores, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return ranks


def is_fixed_order(order: str) -> bool:
    """True for orders whose positions come from a fixed rule rather than the state head."""
    return order in FIXED_ORDERS


def build_stage_tuples(
    codes: torch.Tensor,
    ranks: torch.Tensor,
    stages: torch.Tensor,
    num_stages: int,
    mask_token_id: int,
    codebook_size: int,
    p_error: float = 0.0,
    generator: Optional[torch.Generator] = None,
    token_loss_positions: str = "stage",
    known: Optional[torch.Tensor] = None,
) -> dict:
    """Training tuples (Y^{t-1}, Z^t, Y^t) of eq. 4 with pseudo errors (section 3.3), for a whole batch at once.

    Args:
        codes: (batch, L) ground-truth codes in `[0, K)`.
        ranks: (batch, L) rank of each position in the order (0 = generated first), see `scores_to_ranks`.
        stages: (batch,) stage t in `1..T` of each example.
        num_stages: T.
        p_error: probability that an example gets pseudo errors: between 1 and (size of the previous stage's
            group) of its shown codes become other codes, labelled "replace" with the ground truth as target,
            mirroring the bound on replacements at generation time.
        token_loss_positions: where the token labels are: `stage` (the paper's Z^t != 0: group t and the pseudo
            errors) or `masked` (every position still `[MASK]` in Y^{t-1}, and the pseudo errors). `generate`
            samples every code it writes from the token head at a masked position, so `masked` trains that
            distribution at about T / 2 times more positions per tuple (up to T times at the first stage); the state
            labels are the same either way.
        known: optional (batch, L) bool, codes given from the start, as an edit keeps them (`generate`'s
            `keep_mask`): shown at every stage, and the stage schedule covers the other positions only
            (`fill_schedule`), in the order of `ranks`.

    Returns a dict with
        `image_tokens` (batch, L): Y^{t-1}, the ground truth of groups 1..t-1 (pseudo errors included), `[MASK]`
            elsewhere;
        `token_labels` (batch, L): the ground truth at the `token_loss_positions`, -100 elsewhere;
        `state_labels` (batch, L): Z^t as classes keep / generate / replace, defined on every position;
        `has_error` (batch,) bool: which examples got pseudo errors.
    """
    if codes.shape != ranks.shape or codes.dim() != 2:
        raise ValueError(f"codes and ranks must both be (batch, L), got {tuple(codes.shape)} and {tuple(ranks.shape)}")
    if not 0.0 <= p_error <= 1.0:
        raise ValueError(f"p_error must be in [0, 1], got {p_error}")
    if token_loss_positions not in TOKEN_LOSS_POSITIONS:
        raise ValueError(f"token_loss_positions must be one of {TOKEN_LOSS_POSITIONS}, got {token_loss_positions!r}")
    batch_size, num_tokens = codes.shape
    device = codes.device
    stages = stages.to(device)
    if (stages < 1).any() or (stages > num_stages).any():
        raise ValueError(f"stages must be in 1..{num_stages}")
    if known is None:
        known = torch.zeros_like(codes, dtype=torch.bool)
    if known.shape != codes.shape or known.dtype != torch.bool:
        raise ValueError(f"known must be a bool tensor of shape {tuple(codes.shape)}, got {known.dtype} {tuple(known.shape)}")
    known = known.to(device)
    num_known = known.sum(-1, keepdim=True)
    # The known positions rank first, the others keep their order after them; the schedule spreads the others.
    ranks = scores_to_ranks(ranks.masked_fill(known, -1))
    cumulative = num_known + fill_schedule(num_tokens - num_known.squeeze(1), num_stages)  # (batch, T + 1)
    rows = torch.arange(batch_size, device=device)
    shown_before = cumulative[rows, stages - 1].unsqueeze(1)  # codes fixed before stage t
    fixed_after = cumulative[rows, stages].unsqueeze(1)
    shown = ranks < shown_before
    generate = (ranks >= shown_before) & (ranks < fixed_after)

    # Pseudo errors: a random number k in 1..(last group's size) of the shown positions, chosen uniformly.
    last_group = shown_before.squeeze(1) - cumulative[rows, (stages - 2).clamp(min=0)]
    has_error = (torch.rand(batch_size, generator=generator, device=device) < p_error) & (last_group > 0)
    num_errors = (torch.rand(batch_size, generator=generator, device=device) * last_group).long() + 1
    num_errors = torch.where(has_error, num_errors, torch.zeros_like(num_errors))
    noise = torch.rand(batch_size, num_tokens, generator=generator, device=device).masked_fill(~shown, 2.0)
    replace = scores_to_ranks(noise) < num_errors.unsqueeze(1)
    offsets = torch.randint(1, codebook_size, codes.shape, generator=generator, device=device)
    wrong_codes = (codes + offsets) % codebook_size  # never the ground truth, never [MASK]

    image_tokens = torch.where(shown, codes, torch.full_like(codes, mask_token_id))
    image_tokens = torch.where(replace, wrong_codes, image_tokens)
    labelled = generate if token_loss_positions == "stage" else ~shown
    token_labels = torch.where(labelled | replace, codes, torch.full_like(codes, IGNORE_INDEX))
    state_labels = torch.full_like(codes, STATE_KEEP)
    state_labels[generate] = STATE_GENERATE
    state_labels[replace] = STATE_REPLACE
    return {
        "image_tokens": image_tokens,
        "token_labels": token_labels,
        "state_labels": state_labels,
        "has_error": has_error,
    }
