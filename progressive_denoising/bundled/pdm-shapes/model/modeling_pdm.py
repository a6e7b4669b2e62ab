"""Progressive Denoising Model (PDM): a T5 text encoder, a bidirectional decoder over VQ codes, a token head and a
state head (keep / generate / replace), and the staged generation of section 3.

Read top to bottom: building blocks (attention, decoder layer, decoder), the pretrained base class, then
`PDMForTextToImage` with its output dataclasses, `forward` and `generate`.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel, T5EncoderModel
from transformers.utils import ModelOutput

from .configuration_pdm import ORDERS, STATE_GENERATE, STATE_KEEP, STATE_REPLACE, PDMConfig
from .ordering import (
    IGNORE_INDEX,
    Generators,
    cumulative_schedule,
    is_fixed_order,
    order_scores,
    rand,
    scores_to_ranks,
)

# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


class PDMAttention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`, for self- and cross-attention.

    Queries come from `hidden_states` (batch, L, hidden); keys and values from `key_value_states`
    (batch, S, kv_dim) or from precomputed `(key, value)`, each (batch, heads, S, head_dim).
    `attention_mask` is a boolean (batch, S) mask, True where a key may be attended to.
    """

    def __init__(self, hidden_size: int, num_heads: int, kv_dim: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.dropout = dropout
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(kv_dim, hidden_size)
        self.v_proj = nn.Linear(kv_dim, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_key_value(self, key_value_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._split_heads(self.k_proj(key_value_states)), self._split_heads(self.v_proj(key_value_states))

    def forward(self, hidden_states, key_value_states=None, key_value=None, attention_mask=None):
        if key_value is None:
            key_value = self.project_key_value(hidden_states if key_value_states is None else key_value_states)
        key, value = key_value
        query = self._split_heads(self.q_proj(hidden_states))
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0
        )
        return self.o_proj(out.transpose(1, 2).flatten(2))


class PDMDecoderLayer(nn.Module):
    """Pre-norm decoder layer: bidirectional self-attention (no causal mask), cross-attention to the text, MLP."""

    def __init__(self, config: PDMConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = PDMAttention(hidden, config.num_attention_heads, hidden, config.attention_dropout)
        self.cross_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.cross_attn = PDMAttention(
            hidden, config.num_attention_heads, config.text_config.d_model, config.attention_dropout
        )
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, config.intermediate_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.intermediate_size, hidden),
        )
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, text_key_value, text_mask, self_attention=None):
        """`self_attention(attn, normed_states)`, when given, replaces the bidirectional self-attention: the
        autoregressive baseline passes its causal and KV-cached versions and so shares these weights and this code."""
        normed = self.self_attn_norm(hidden_states)
        attended = self.self_attn(normed) if self_attention is None else self_attention(self.self_attn, normed)
        hidden_states = hidden_states + self.dropout(attended)
        hidden_states = hidden_states + self.dropout(
            self.cross_attn(self.cross_attn_norm(hidden_states), key_value=text_key_value, attention_mask=text_mask)
        )
        return hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))


class PDMDecoder(nn.Module):
    """Image-token decoder: code embedding + 2-D position embedding, `num_hidden_layers` layers, final norm.

    The 2-D position is a learned row embedding plus a learned column embedding, so the decoder knows where on
    the (h, w) grid each code lies.
    """

    def __init__(self, config: PDMConfig):
        super().__init__()
        self.grid = config.token_grid_size
        hidden = config.hidden_size
        self.code_embedding = nn.Embedding(config.codebook_size + 1, hidden)  # + [MASK]
        self.row_embedding = nn.Embedding(self.grid[0], hidden)
        self.column_embedding = nn.Embedding(self.grid[1], hidden)
        self.layers = nn.ModuleList(PDMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.gradient_checkpointing = False

    def position_embedding(self) -> torch.Tensor:
        """(L, hidden) embedding of every grid position in raster order."""
        rows = self.row_embedding.weight[:, None, :]
        columns = self.column_embedding.weight[None, :, :]
        return (rows + columns).flatten(0, 1)

    def text_key_values(self, text_states: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys and values of every layer; computed once per prompt, reused at every stage."""
        return [layer.cross_attn.project_key_value(text_states) for layer in self.layers]

    def forward(self, image_tokens, text_key_values, text_mask, self_attention=None):
        hidden_states = self.code_embedding(image_tokens) + self.position_embedding()
        for layer, key_value in zip(self.layers, text_key_values):
            if self.gradient_checkpointing and self.training:
                hidden_states = self._gradient_checkpointing_func(
                    layer.__call__, hidden_states, key_value, text_mask, self_attention
                )
            else:
                hidden_states = layer(hidden_states, key_value, text_mask, self_attention)
        return self.norm(hidden_states)


# ---------------------------------------------------------------------------------------------------------------
# Sampling (shared with the autoregressive baseline)
# ---------------------------------------------------------------------------------------------------------------


def check_sampling_arguments(codebook_size, temperature, top_k, top_p, guidance_scale, num_images_per_prompt):
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if top_k is not None and not 1 <= top_k <= codebook_size:
        raise ValueError(f"top_k must be between 1 and codebook_size {codebook_size}, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not guidance_scale >= 0:
        raise ValueError(f"guidance_scale must be >= 0, got {guidance_scale!r}")
    if not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be a positive integer, got {num_images_per_prompt!r}")


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


def sample_codes(logits, temperature, top_k, top_p, generator: Generators) -> torch.Tensor:
    """(batch, n) codes drawn from `logits` (batch, n, K) by the Gumbel-max trick, with noise per example."""
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    uniform = rand(logits.shape, generator, logits.device)
    exponential = -torch.log(uniform.clamp(min=1e-20))  # Exp(1); -log of it is Gumbel(0, 1)
    return (logits - torch.log(exponential.clamp(min=1e-20))).argmax(-1)


# ---------------------------------------------------------------------------------------------------------------
# Pretrained base class
# ---------------------------------------------------------------------------------------------------------------


class PDMPreTrainedModel(PreTrainedModel):
    config_class = PDMConfig
    base_model_prefix = "pdm"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PDMDecoderLayer", "T5Block"]
    _supports_sdpa = True
    _generation_step = "decode"  # the method `generate` calls once per stage (PDM) or per code (AR)

    def compile_generation(self, mode: Optional[str] = None, **compile_kwargs):
        """Compile the decoder pass that `generate` repeats (the fast path); returns the model.

        Every stage runs the same kernels on tensors of the same shapes (the text keys and values are computed once
        per call), so one compiled graph serves a whole `generate` call. On CUDA the default mode is
        `"reduce-overhead"`, which also replays the graph as a CUDA graph. Sampling and position selection stay
        eager, so the codes for given seeds are the plain path's up to floating-point reassociation.
        `compile_kwargs` go to `torch.compile`; `model.compile_generation(mode=None)` on CPU uses inductor's default.
        """
        if mode is None:
            mode = "reduce-overhead" if self.device.type == "cuda" else "default"
        self._compiled_step = torch.compile(getattr(self, self._generation_step), mode=mode, **compile_kwargs)
        return self

    def _generation_step_fn(self):
        return self.__dict__.get("_compiled_step") or getattr(self, self._generation_step)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class PDMOutput(ModelOutput):
    """Output of [`PDMForTextToImage.forward`].

    Args:
        loss (`torch.FloatTensor` of shape `()`): `token_loss + state_loss` over the labels given.
        token_loss (`torch.FloatTensor` of shape `()`): cross-entropy of the codes at positions with a token label.
        state_loss (`torch.FloatTensor` of shape `()`): cross-entropy of the states keep / generate / replace.
        token_logits (`torch.FloatTensor` of shape `(batch, L, codebook_size)`): scores of every code.
        state_logits (`torch.FloatTensor` of shape `(batch, L, 3)`): scores of keep / generate / replace.
    """

    loss: Optional[torch.FloatTensor] = None
    token_loss: Optional[torch.FloatTensor] = None
    state_loss: Optional[torch.FloatTensor] = None
    token_logits: Optional[torch.FloatTensor] = None
    state_logits: Optional[torch.FloatTensor] = None


@dataclass
class PDMGenerateOutput(ModelOutput):
    """Output of [`PDMForTextToImage.generate`] with `return_stages=True`.

    Args:
        codes (`torch.LongTensor` of shape `(batch, L)`): the final codes.
        stages (`torch.LongTensor` of shape `(batch, num_stages, L)`): the codes after every stage, `[MASK]`
            (= `codebook_size`) where nothing was generated yet.
    """

    codes: Optional[torch.LongTensor] = None
    stages: Optional[torch.LongTensor] = None


class PDMForTextToImage(PDMPreTrainedModel):
    """Text-to-image Progressive Denoising Model.

    Inputs of `forward`:
        input_ids (`torch.LongTensor` of shape `(batch, S)`): T5 token ids of the prompt.
        attention_mask (`torch.LongTensor` of shape `(batch, S)`): 1 on prompt tokens, 0 on padding.
        image_tokens (`torch.LongTensor` of shape `(batch, L)`): Y^{t-1}, codes in `[0, K)` or `[MASK]` = K.
        token_labels (`torch.LongTensor` of shape `(batch, L)`, *optional*): target codes, -100 where ignored.
        state_labels (`torch.LongTensor` of shape `(batch, L)`, *optional*): target states 0 keep, 1 generate,
            2 replace (the paper's -1), -100 where ignored.
        encoder_hidden_states (`torch.FloatTensor` of shape `(batch, S, d_model)`, *optional*): cached T5 states,
            used instead of running the text encoder.
    """

    def __init__(self, config: PDMConfig):
        super().__init__(config)
        self.text_encoder = T5EncoderModel(config.text_config)
        self.decoder = PDMDecoder(config)
        self.token_head = nn.Linear(config.hidden_size, config.codebook_size)
        self.state_head = nn.Linear(config.hidden_size, 3)
        self.post_init()
        if config.freeze_text_encoder:
            self.text_encoder.requires_grad_(False)

    @classmethod
    def from_text_encoder_pretrained(cls, name_or_path: str, **config_overrides) -> "PDMForTextToImage":
        """A fresh PDM whose text encoder is the pretrained T5 encoder at `name_or_path` (folder or Hub id).

        `config_overrides` set the other `PDMConfig` fields (decoder sizes, codebook, grid, ...).
        """
        text_encoder = T5EncoderModel.from_pretrained(name_or_path)
        config = PDMConfig(text_config=text_encoder.config.to_dict(), **config_overrides)
        model = cls(config)
        model.text_encoder.load_state_dict(text_encoder.state_dict())
        return model

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_text_encoder:
            self.text_encoder.eval()  # a frozen encoder also keeps its dropout off
        return self

    # -- pieces shared by forward and generate -------------------------------------------------------------------

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, S, d_model) T5 states of the prompt; without gradients when the encoder is frozen."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.config.freeze_text_encoder):
            return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def decode(self, image_tokens, text_key_values, text_mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token logits (batch, L, K) and state logits (batch, L, 3) of one decoder pass."""
        hidden_states = self.decoder(image_tokens, text_key_values, text_mask)
        return self.token_head(hidden_states), self.state_head(hidden_states)

    def _check_image_tokens(self, image_tokens: torch.Tensor):
        expected = self.config.num_image_tokens
        if image_tokens.dim() != 2 or image_tokens.shape[1] != expected:
            raise ValueError(
                f"image_tokens must have shape (batch, {expected}) for token_grid_size {self.config.token_grid_size}, "
                f"got {tuple(image_tokens.shape)}"
            )
        low, high = int(image_tokens.min()), int(image_tokens.max())
        if low < 0 or high > self.config.mask_token_id:
            raise ValueError(
                f"image_tokens must lie in [0, {self.config.mask_token_id}] (codes 0..K-1 and [MASK] = K), "
                f"got values in [{low}, {high}]"
            )

    # -- training ------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.LongTensor] = None,
        image_tokens: Optional[torch.LongTensor] = None,
        token_labels: Optional[torch.LongTensor] = None,
        state_labels: Optional[torch.LongTensor] = None,
        encoder_hidden_states: Optional[torch.FloatTensor] = None,
        return_dict: Optional[bool] = None,
    ):
        if image_tokens is None:
            raise ValueError("image_tokens is required: the codes Y^{t-1} of shape (batch, L)")
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("pass either input_ids or encoder_hidden_states")
            encoder_hidden_states = self.encode_text(input_ids, attention_mask)
        self._check_image_tokens(image_tokens)
        if attention_mask is None:
            attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=encoder_hidden_states.device)
        text_mask = attention_mask.bool()
        token_logits, state_logits = self.decode(
            image_tokens, self.decoder.text_key_values(encoder_hidden_states), text_mask
        )

        token_loss = state_loss = loss = None
        if token_labels is not None:
            token_loss = F.cross_entropy(
                token_logits.flatten(0, 1).float(), token_labels.flatten(), ignore_index=IGNORE_INDEX
            )
        if state_labels is not None:
            state_loss = F.cross_entropy(
                state_logits.flatten(0, 1).float(), state_labels.flatten(), ignore_index=IGNORE_INDEX
            )
        losses = [x for x in (token_loss, state_loss) if x is not None]
        if losses:
            loss = sum(losses)
        output = PDMOutput(
            loss=loss, token_loss=token_loss, state_loss=state_loss, token_logits=token_logits, state_logits=state_logits
        )
        return output if return_dict is not False else output.to_tuple()

    # -- generation (section 3.1, eq. 4; error recovering of section 3.3) ----------------------------------------

    def _check_generate_arguments(self, input_ids, num_stages, order, temperature, top_k, top_p, guidance_scale,
                                  num_images_per_prompt, max_replacements):
        num_tokens = self.config.num_image_tokens
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError("input_ids must be a non-empty (batch, S) tensor of prompt token ids")
        if not isinstance(num_stages, int) or not 1 <= num_stages <= num_tokens:
            raise ValueError(f"num_stages must be an integer between 1 and L = {num_tokens}, got {num_stages!r}")
        if order not in ORDERS:
            raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
        check_sampling_arguments(self.config.codebook_size, temperature, top_k, top_p, guidance_scale,
                                 num_images_per_prompt)
        if max_replacements is not None and (not isinstance(max_replacements, int) or max_replacements < 0):
            raise ValueError(f"max_replacements must be None or an integer >= 0, got {max_replacements!r}")

    def _unconditional_input(self, batch_size, negative_input_ids, negative_attention_mask, device):
        """Token ids of the unconditional prompt: `negative_input_ids` or the empty prompt (T5's lone `</s>`)."""
        if negative_input_ids is None:
            eos = self.config.text_config.eos_token_id
            ids = torch.full((batch_size, 1), eos, dtype=torch.long, device=device)
            return ids, torch.ones_like(ids)
        if negative_input_ids.shape[0] not in (1, batch_size):
            raise ValueError(
                f"negative_input_ids has {negative_input_ids.shape[0]} rows but there are {batch_size} prompts: "
                "pass one negative prompt or one per prompt"
            )
        if negative_attention_mask is None:
            negative_attention_mask = torch.ones_like(negative_input_ids)
        return (negative_input_ids.expand(batch_size, -1).to(device),
                negative_attention_mask.expand(batch_size, -1).to(device))

    def _prepare_text(self, input_ids, attention_mask, guidance_scale, negative_input_ids, negative_attention_mask,
                      num_images_per_prompt, generator):
        """Number of images, cross-attention keys/values of every layer and the text mask, computed once per call.

        With guidance the unconditional prompts follow the conditional ones along the batch.
        """
        device = self.device
        input_ids = input_ids.to(device)
        attention_mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)
        negative = self._unconditional_input(input_ids.shape[0], negative_input_ids, negative_attention_mask, device)
        if num_images_per_prompt > 1:
            input_ids, attention_mask = (x.repeat_interleave(num_images_per_prompt, 0) for x in (input_ids, attention_mask))
            negative = tuple(x.repeat_interleave(num_images_per_prompt, 0) for x in negative)
        batch_size = input_ids.shape[0]
        if generator is not None and not isinstance(generator, torch.Generator) and len(generator) != batch_size:
            raise ValueError(
                f"got {len(generator)} generators for {batch_size} images (prompts x num_images_per_prompt): "
                "pass one generator or one per image"
            )
        text_states, text_mask = self._encode_prompts(input_ids, attention_mask, negative, guidance_scale != 1.0)
        return batch_size, self.decoder.text_key_values(text_states), text_mask

    def _encode_prompts(self, input_ids, attention_mask, negative, use_guidance):
        """Text states and mask of the prompts, with the unconditional prompts appended when guiding."""
        states = self.encode_text(input_ids, attention_mask)
        mask = attention_mask.bool()
        if not use_guidance:
            return states, mask
        uncond_states = self.encode_text(*negative)
        uncond_mask = negative[1].bool()
        length = max(states.shape[1], uncond_states.shape[1])
        pad = lambda x: F.pad(x, (0, 0, 0, length - x.shape[1])) if x.dim() == 3 else F.pad(x, (0, length - x.shape[1]))
        return torch.cat([pad(states), pad(uncond_states)]), torch.cat([pad(mask), pad(uncond_mask)])

    @staticmethod
    def _select(scores: torch.Tensor, candidates: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        """(batch, L) bool: the `count` candidates with the highest score (fewer if fewer are candidates).

        Ranking all L positions instead of `topk(count)` keeps every tensor the same shape at every stage.
        """
        scores = scores.masked_fill(~candidates, float("-inf"))
        return (scores_to_ranks(-scores) < count) & candidates

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        num_stages: Optional[int] = None,
        order: Optional[str] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        guidance_scale: float = 1.0,
        negative_input_ids: Optional[torch.LongTensor] = None,
        negative_attention_mask: Optional[torch.LongTensor] = None,
        num_images_per_prompt: int = 1,
        generator: Generators = None,
        return_stages: bool = False,
        max_replacements: Optional[int] = None,
        callback_on_stage_end: Optional[Callable[[int, torch.Tensor], None]] = None,
    ):
        """Generate image codes from prompts in `num_stages` stages (section 3.1).

        Starts from all `[MASK]`; each stage runs the decoder once, then
        - picks the masked positions to generate (their number follows `stage_schedule`): by the state head's
          "generate" probability for orders the model was trained on, by the fixed rule for `raster` / `random`;
        - picks already generated positions to replace: those the state head calls "replace" rather than "keep",
          most confident first, never more than were generated in the stage before (nor `max_replacements`;
          `max_replacements=0` turns error recovering off);
        - samples codes for all of them in parallel (temperature, `top_k`, `top_p`, classifier-free guidance).

        Args:
            input_ids, attention_mask: (batch, S) prompt token ids and mask.
            num_stages: T in `1..L`; defaults to `config.num_stages`.
            order: `raster`, `random`, `quant-error`, `reverse-quant-error` or `learned`; defaults to the order the
                model was trained on (`config.training_order`).
            guidance_scale: > 1 mixes `uncond + scale * (cond - uncond)`; the unconditional prompt is the empty
                prompt or `negative_input_ids` (one row, or one per prompt).
            num_images_per_prompt: images per prompt; the output has batch * num_images_per_prompt rows.
            generator: a `torch.Generator`, or one per output row (a batch then equals its rows one by one).
            return_stages: also return the codes after every stage.
            callback_on_stage_end: called as `fn(stage_index, codes)` after every stage.

        Returns:
            `torch.LongTensor` of shape (batch * num_images_per_prompt, L), or a [`PDMGenerateOutput`] with the
            codes and the stages when `return_stages=True`.
        """
        num_stages = self.config.num_stages if num_stages is None else num_stages
        order = self.config.training_order if order is None else order
        self._check_generate_arguments(input_ids, num_stages, order, temperature, top_k, top_p, guidance_scale,
                                       num_images_per_prompt, max_replacements)
        device, num_tokens = self.device, self.config.num_image_tokens
        batch_size, text_key_values, text_mask = self._prepare_text(
            input_ids, attention_mask, guidance_scale, negative_input_ids, negative_attention_mask,
            num_images_per_prompt, generator,
        )
        fixed_ranks = None
        if is_fixed_order(order):
            fixed_ranks = scores_to_ranks(order_scores(order, batch_size, num_tokens, generator=generator, device=device))
        cumulative = cumulative_schedule(num_tokens, num_stages, device)
        limit = num_tokens if max_replacements is None else max_replacements

        codes = torch.full((batch_size, num_tokens), self.config.mask_token_id, dtype=torch.long, device=device)
        stages = []
        for stage in range(num_stages):
            codes = self._stage_step(
                codes, stage, cumulative, limit, fixed_ranks, text_key_values, text_mask, guidance_scale,
                temperature, top_k, top_p, generator,
            )
            if return_stages:
                stages.append(codes)
            if callback_on_stage_end is not None:
                callback_on_stage_end(stage, codes)
        if return_stages:
            return PDMGenerateOutput(codes=codes, stages=torch.stack(stages, dim=1))
        return codes

    def _stage_step(self, codes, stage, cumulative, limit, fixed_ranks, text_key_values, text_mask, guidance_scale,
                    temperature, top_k, top_p, generator):
        """One stage: Y^t -> Y^{t+1}. Every tensor keeps its shape from stage to stage."""
        use_guidance = guidance_scale != 1.0
        decoder_input = torch.cat([codes, codes]) if use_guidance else codes
        token_logits, state_logits = self._generation_step_fn()(decoder_input, text_key_values, text_mask)
        if use_guidance:
            cond, uncond = token_logits.float().chunk(2)
            token_logits = uncond + guidance_scale * (cond - uncond)
            state_logits = state_logits.chunk(2)[0]
        state_logits = state_logits.float()

        masked = codes == self.config.mask_token_id
        num_generate = cumulative[stage + 1] - cumulative[stage]
        if fixed_ranks is not None:
            generate = (fixed_ranks >= cumulative[stage]) & (fixed_ranks < cumulative[stage + 1])
        else:
            generate = self._select(state_logits[..., STATE_GENERATE], masked, num_generate)
        # Bound of section 3.1: no more replacements than codes generated in the stage before.
        generated_last_stage = cumulative[stage] - cumulative[max(stage - 1, 0)]
        num_replace = torch.clamp(generated_last_stage, max=limit)
        replace_margin = state_logits[..., STATE_REPLACE] - state_logits[..., STATE_KEEP]
        replace = self._select(replace_margin, ~masked & (replace_margin > 0), num_replace)

        sampled = sample_codes(token_logits, temperature, top_k, top_p, generator)
        return torch.where(generate | replace, sampled, codes)
