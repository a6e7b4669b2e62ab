"""The decisions of one generation step, in one place for every sampler.

PDM's `generate` (one stage: which masked positions to fill, which generated codes to replace, which codes to write),
the autoregressive baseline's `generate` (which code to write) and the learned order's rollout
(`PDMForTextToImage.rollout`, trained by `training/train_policy.py`) all call these functions, so a change to
sampling reaches all three.

- Codes: `filter_logits` (top-k / top-p), `guidance_mix` (classifier-free guidance), `sample_codes` (Gumbel-max
  draws, one noise stream per image when given one generator per image).
- Positions: `choose_stage_positions` picks the positions a stage fills and replaces, greedily (as `generate` does)
  or, given a `policy_temperature`, by sampling from the state head read as a policy (the action z = 1 / -1 of
  section 3.2), returning the log-probability of the draw for REINFORCE (eq. 6-7).
- The run: `StageRun` holds one generation run's state (codes, what is kept, the stage schedule, the fixed order's
  ranks, the settings of a `PDMGenerationConfig`, the generators) and its stage step; `generate`, `rollout` and the
  pipelines drive it.

Torch only, relative imports only: this file travels next to the model code for `trust_remote_code`.
"""

from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .configuration_pdm import STATE_GENERATE, STATE_KEEP, STATE_REPLACE, PDMGenerationConfig
from .ordering import Generators, fill_schedule, is_fixed_order, order_scores, rand, scores_to_ranks

# ---------------------------------------------------------------------------------------------------------------
# Codes
# ---------------------------------------------------------------------------------------------------------------


def filter_logits(logits: torch.Tensor, top_k: Optional[int], top_p: Optional[float]) -> torch.Tensor:
    """`logits` (..., K) with everything outside the top-k / the nucleus of mass top-p set to -inf."""
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, sorted_index = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        remove = probs.cumsum(-1) - probs >= top_p  # keep the smallest set reaching top_p
        logits = logits.masked_fill(remove.scatter(-1, sorted_index, remove), float("-inf"))
    return logits


def guidance_mix(cond: torch.Tensor, uncond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """Classifier-free guidance: `uncond + scale * (cond - uncond)`, in float32."""
    cond, uncond = cond.float(), uncond.float()
    return uncond + guidance_scale * (cond - uncond)


def gumbel_argmax(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """argmax of `logits` (..., K) plus Gumbel(0, 1) noise made from `uniform` [0, 1) numbers of the same shape:
    a draw from softmax(logits)."""
    exponential = -torch.log(uniform.clamp(min=1e-20))  # Exp(1); -log of it is Gumbel(0, 1)
    return (logits - torch.log(exponential.clamp(min=1e-20))).argmax(-1)


def sample_codes(logits, temperature, top_k, top_p, generator: Generators, lengths=None) -> torch.Tensor:
    """(batch, n) codes drawn from `logits` (batch, n, K) by the Gumbel-max trick, with noise per example (of the
    first `lengths[b]` positions of row b only, with one generator per example: see `ordering.rand`)."""
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    return gumbel_argmax(logits, rand(logits.shape, generator, logits.device, lengths))


# ---------------------------------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------------------------------


def select_top(scores: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """(batch, L) bool: the `count` (int or (batch, 1)) candidates with the highest score (fewer if fewer are
    candidates). Ranking all L positions instead of `topk(count)` keeps every tensor the same shape at every stage."""
    scores = scores.masked_fill(~candidates, float("-inf"))
    return (scores_to_ranks(-scores) < torch.as_tensor(count, device=scores.device)) & candidates


def replace_margin(state_logits: torch.Tensor) -> torch.Tensor:
    """(batch, L) log p(replace) - log p(keep) of the state head (the softmax's normaliser cancels)."""
    state_logits = state_logits.float()
    return state_logits[..., STATE_REPLACE] - state_logits[..., STATE_KEEP]


def choose_replacements(state_logits: torch.Tensor, candidates: torch.Tensor, count) -> torch.Tensor:
    """(batch, L) bool: the error-recovering choice (section 3.3) among `candidates` (batch, L).

    A candidate is replaced when the state head calls it "replace" rather than "keep" (p(replace) > p(keep)); at most
    `count` per row (an int or a (batch, 1) tensor), the most confident first.
    """
    margin = replace_margin(state_logits)
    return select_top(margin, candidates & (margin > 0), count)


def gumbel_top_k(logits: torch.Tensor, candidates: torch.Tensor, count, generator: Generators
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Draw `count` (int or (batch, 1)) candidates without replacement, proportional to softmax(logits) over the
    candidates, and the log-probability of the draw.

    Gumbel-top-k gives the draw; its log-probability is the Plackett-Luce probability of the sequence of choices,
    sum_i [l_{c_i} - log sum_{j remaining} exp l_j], differentiable in `logits`.
    Returns ((batch, L) bool chosen, (batch,) log-probability).
    """
    logits = logits.float().masked_fill(~candidates, float("-inf"))
    uniform = rand(logits.shape, generator, logits.device).clamp(1e-20, 1 - 1e-7)
    order = (logits.detach() - torch.log(-torch.log(uniform))).argsort(dim=-1, descending=True)  # order of drawing
    picked = logits.gather(1, order)
    taken = (torch.arange(logits.shape[1], device=logits.device) < torch.as_tensor(count, device=logits.device))
    taken = taken & torch.isfinite(picked)  # never more than the candidates
    log_total = torch.logsumexp(logits, dim=-1, keepdim=True)
    probability = (picked - log_total).exp() * taken
    drawn_before = probability.cumsum(-1) - probability  # mass already taken by earlier choices
    log_remaining = log_total + torch.log1p(-drawn_before.clamp(max=1 - 1e-6))
    log_prob = torch.where(taken, picked - log_remaining, torch.zeros_like(picked)).sum(-1)
    chosen = torch.zeros_like(candidates).scatter_(1, order, taken)
    return chosen, log_prob


def sample_replacements(state_logits: torch.Tensor, candidates: torch.Tensor, count, generator: Generators,
                        policy_temperature: float = 1.0) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exploring version of `choose_replacements`: each candidate is replaced with probability
    sigmoid(margin / policy_temperature), margin = log p(replace) - log p(keep) (at temperature 1: p(replace) /
    (p(replace) + p(keep))), at most `count` per row, the highest noisy margins first. Returns ((batch, L) bool,
    (batch,) log-probability of the draw).

    The log-probability is that of the independent draws (replace or keep at every candidate): a candidate dropped by
    the bound counts as kept. The bound rarely binds (a few replacements per image against up to a stage's size).
    """
    margin = replace_margin(state_logits) / policy_temperature
    uniform = rand(margin.shape, generator, margin.device).clamp(1e-6, 1 - 1e-6)
    noisy = margin.detach() + torch.log(uniform) - torch.log1p(-uniform)  # > 0 with probability sigmoid(margin)
    chosen = select_top(noisy, candidates & (noisy > 0), count)
    log_prob = torch.where(chosen, F.logsigmoid(margin), F.logsigmoid(-margin))
    return chosen, torch.where(candidates, log_prob, torch.zeros_like(log_prob)).sum(-1)


def choose_stage_positions(
    state_logits: torch.Tensor,
    masked: torch.Tensor,
    replaceable: torch.Tensor,
    num_generate: torch.Tensor,
    num_replace: torch.Tensor,
    fixed_generate: Optional[torch.Tensor] = None,
    policy_temperature: Optional[float] = None,
    generator: Generators = None,
) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """The positions one stage writes: (generate, replace, log_prob), (batch, L) bool each and (batch,) or None.

    Args:
        state_logits: (batch, L, 3) keep / generate / replace scores of the state head.
        masked: (batch, L) positions still `[MASK]`; `num_generate` ((batch, 1)) of them are filled.
        replaceable: (batch, L) generated codes that may be replaced, at most `num_replace` ((batch, 1)) of them.
        fixed_generate: (batch, L) the positions a fixed order (raster, random) fills; None: the state head picks.
        policy_temperature: None: the most probable positions (the `num_generate` highest p(generate), the
            replacements of `choose_replacements`), log_prob None. A number tau > 0: the state head as a stochastic
            policy with the log-probability of its choices (eq. 6): the positions to fill drawn without replacement
            from softmax(log p(generate) / tau) over the masked ones (Gumbel-top-k), each replacement drawn with
            probability sigmoid(margin / tau); tau -> 0 gives the greedy choice. Its noise is drawn before the
            codes', from the same generators.
    """
    # Ranked by p(generate) (section 3.1): the raw logit would ignore how strongly keep or replace compete.
    log_p_generate = None if fixed_generate is not None else state_logits.float().log_softmax(-1)[..., STATE_GENERATE]
    if policy_temperature is None:
        generate = fixed_generate if fixed_generate is not None else select_top(log_p_generate, masked, num_generate)
        return generate, choose_replacements(state_logits, replaceable, num_replace), None
    log_prob = torch.zeros(masked.shape[0], device=masked.device)
    if fixed_generate is not None:
        generate = fixed_generate
    else:
        generate, log_prob = gumbel_top_k(log_p_generate / policy_temperature, masked, num_generate, generator)
    replace, log_prob_replace = sample_replacements(state_logits, replaceable, num_replace, generator,
                                                    policy_temperature)
    return generate, replace, log_prob + log_prob_replace


# ---------------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------------


# MaskGIT's `choice_temperature`: the scale of the Gumbel noise on the confidence of the drawn codes at the first
# stage of the `confidence` order, falling linearly to 0 at the last.
CONFIDENCE_NOISE = 4.5


class StageRun:
    """One generation run of a PDM (section 3.1) and its stage step.

    It owns the run's state: the codes (batch, L), the positions kept as given (`keep`), the stage schedule of the
    positions to fill (`cumulative`, one row per image: an edit fills fewer), the ranks of a fixed order, the bound on
    replacements, the settings of a resolved [`PDMGenerationConfig`] and the generators (one noise stream per image).
    A model drives it with one decoder pass per stage:

        run = StageRun(generation_config.resolved(model.config), codes, keep, model.config.mask_token_id, generator)
        for stage in range(run.num_stages):
            run.step(stage, *model.decode(run.decoder_input(), text_key_values, text_mask))
        run.codes

    Every stage's tensors have the same shapes (one compiled decoder graph serves the whole run). With a
    `policy_temperature` the position choices are drawn from the state head as a policy and `log_prob` sums their
    log-probabilities (the learned order's rollout).
    """

    def __init__(self, config: PDMGenerationConfig, codes: torch.LongTensor, keep: torch.BoolTensor,
                 mask_token_id: int, generator: Generators = None, policy_temperature: Optional[float] = None,
                 keep_stages: bool = False):
        self.config, self.codes, self.keep, self.mask_token_id = config, codes, keep, mask_token_id
        self.generator, self.policy_temperature = generator, policy_temperature
        batch_size, num_tokens = codes.shape
        to_fill = codes == mask_token_id
        self.fixed_ranks = None
        if is_fixed_order(config.order):
            scores = order_scores(config.order, batch_size, num_tokens, generator=generator, device=codes.device)
            # Only the positions to fill are ranked (the others rank last); with nothing given that is all of them.
            self.fixed_ranks = scores_to_ranks(scores.masked_fill(~to_fill, float("inf")))
        self.cumulative = fill_schedule(to_fill.sum(-1), config.num_stages)  # (batch, T + 1)
        self.limit = num_tokens if config.max_replacements is None else config.max_replacements
        # How many positions a stage may write in any row: its fills and at most as many replacements as the stage
        # before filled. Read back to the host once, before the first stage: every stage then samples a fixed number
        # of positions per row, whatever the state head chose, and reads nothing back (no host synchronisation).
        fills = self.cumulative[:, 1:] - self.cumulative[:, :-1]
        replacements = torch.cat([torch.zeros_like(fills[:, :1]), fills[:, :-1]], 1).clamp(max=self.limit)
        widths = fills + replacements  # (batch, T)
        self.widths = widths.amax(0).tolist() if batch_size else [0] * config.num_stages
        # With a generator per image, each row draws noise for its own width only: the same codes as alone.
        self.row_widths = widths.T.tolist() if isinstance(generator, (list, tuple)) else None
        self.replaced, self.stages = [], [] if keep_stages else None
        self.log_prob = None if policy_temperature is None else torch.zeros(batch_size, device=codes.device)

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def guided(self) -> bool:
        """Whether the decoder also reads the unconditional prompt (the rows after the conditional ones)."""
        return self.config.guidance_scale != 1.0

    def guidance_scale_at(self, stage: int) -> float:
        """The guidance scale of `stage` (0-based) under the config's `guidance_schedule`."""
        scale = self.config.guidance_scale
        if self.config.guidance_schedule == "linear":
            return 1.0 + (scale - 1.0) * stage / max(self.num_stages - 1, 1)
        return scale

    def decoder_input(self) -> torch.LongTensor:
        """The codes the decoder reads this stage: (batch, L), or (2 * batch, L) with guidance."""
        return torch.cat([self.codes, self.codes]) if self.guided else self.codes

    def set_codes(self, codes: torch.LongTensor):
        """Continue the run from other codes of the same shape (a pipeline callback's): they stand for the stage just
        run, in `stages` too."""
        if not isinstance(codes, torch.Tensor) or codes.shape != self.codes.shape:
            raise ValueError(f"codes must be a tensor of shape {tuple(self.codes.shape)}, got "
                             f"{tuple(getattr(codes, 'shape', ())) or type(codes).__name__}")
        self.codes = codes.to(self.codes.device, torch.long)
        if self.stages:
            self.stages[-1] = self.codes

    def _logits_at(self, stage: int, token_logits: torch.Tensor, positions=None) -> torch.Tensor:
        """The code logits this stage samples from, (batch, n, K) at the (batch, n) `positions` or (batch, L, K)
        everywhere: with guidance, the mix of the conditional and unconditional rows at this stage's scale."""
        def at(logits):
            if positions is None:
                return logits
            return logits.gather(1, positions[..., None].expand(-1, -1, logits.shape[-1]))

        if not self.guided:
            return at(token_logits)
        cond, uncond = token_logits.chunk(2)
        return guidance_mix(at(cond), at(uncond), self.guidance_scale_at(stage))

    def _most_confident(self, stage, token_logits, masked, count):
        """MaskGIT's choice of the positions to fill: a code drawn at every position, and the `count` masked positions
        whose draws are the most probable, ranked with Gumbel noise of scale CONFIDENCE_NOISE * (1 - (stage + 1) / T)
        (more exploration early). Returns ((batch, L) drawn codes, (batch, L) bool chosen)."""
        logits = filter_logits(self._logits_at(stage, token_logits).float() / self.config.temperature,
                               self.config.top_k, self.config.top_p)
        drawn = gumbel_argmax(logits, rand(logits.shape, self.generator, logits.device))
        confidence = logits.log_softmax(-1).gather(-1, drawn[..., None])[..., 0]
        uniform = rand(confidence.shape, self.generator, confidence.device).clamp(1e-20, 1 - 1e-7)
        noise = CONFIDENCE_NOISE * (1 - (stage + 1) / self.num_stages)
        return drawn, select_top(confidence - noise * torch.log(-torch.log(uniform)), masked, count)

    def step(self, stage: int, token_logits: torch.Tensor, state_logits: torch.Tensor) -> torch.LongTensor:
        """Y^t -> Y^{t+1}: choose the positions `stage` fills and replaces from the state head (or the fixed order),
        sample their codes, and return the new codes (batch, L).

        Guidance and sampling work on the positions this stage may write (`widths[stage]` a row, the written ones
        first), not on all (batch, L, K) logits; the number is fixed per stage, so nothing depends on a value read
        back from the device.
        """
        if self.guided:
            state_logits = state_logits.chunk(2)[0]
        codes = self.codes
        masked = codes == self.mask_token_id
        before, after = self.cumulative[:, stage, None], self.cumulative[:, stage + 1, None]  # (batch, 1) each
        fixed_generate = None if self.fixed_ranks is None else (self.fixed_ranks >= before) & (self.fixed_ranks < after)
        # Bound of section 3.1: no more replacements than codes generated in the stage before.
        num_replace = torch.clamp(before - self.cumulative[:, max(stage - 1, 0), None], max=self.limit)
        drawn = None
        if self.config.order == "confidence":
            drawn, fixed_generate = self._most_confident(stage, token_logits, masked, after - before)
        generate, replace, log_prob = choose_stage_positions(
            state_logits, masked, ~masked & ~self.keep, after - before, num_replace, fixed_generate,
            self.policy_temperature, self.generator)

        with torch.no_grad():
            written = generate | replace
            if drawn is not None:  # the fills are the draws they were chosen by
                codes = torch.where(generate, drawn, codes)
                written = replace
            # The written positions of each row first, in position order, then unwritten ones to fill the width.
            positions = torch.argsort((~written).to(torch.uint8), dim=1, stable=True)[:, : self.widths[stage]]
            sampled = sample_codes(self._logits_at(stage, token_logits, positions), self.config.temperature,
                                   self.config.top_k, self.config.top_p, self.generator,
                                   None if self.row_widths is None else self.row_widths[stage])
            # A new tensor: the codes of the stage before stay as they were (`stages` keeps them).
            codes = codes.scatter(1, positions, torch.where(written.gather(1, positions), sampled,
                                                            codes.gather(1, positions)))
        self.codes = codes
        self.replaced.append(replace.sum(-1))
        if self.stages is not None:
            self.stages.append(codes)
        if log_prob is not None:
            self.log_prob = self.log_prob + log_prob
        return codes
