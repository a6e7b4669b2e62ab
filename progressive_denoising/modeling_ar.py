"""Autoregressive (AR) baseline of the Progressive Denoising Model: the same network as PDM, one code per step.

The "left to right" row of table 3 and the 1x row of table 4: a T5 text encoder and the PDM decoder (same code
embedding, 2-D position embedding, pre-norm layers with self-attention, cross-attention to the text and an MLP,
token head), but the self-attention is CAUSAL and the model is trained by next-code prediction (eq. 3):

    log p(Y | X) = sum_i log p(y_i | y_<i, X).

The decoder input is `[BOS, y_1, ..., y_{L-1}]` where BOS is the `[MASK]` id K, which a PDM never sees in front of
a fully unmasked image, so the embedding table keeps PDM's layout. There is no state head.

Parameter names are those of [`PDMForTextToImage`] (`decoder.layers.N.self_attn.q_proj`, `token_head`, ...): the
layers are `PDMDecoderLayer`s, and the causal and the KV-cached passes call their submodules directly.

Only relative imports: this file travels next to `modeling_pdm.py` when a model is shared with `trust_remote_code`.
"""

from functools import partial
from typing import List, Optional, Tuple

import torch
from torch import nn
from transformers import AutoModel

from .configuration_pdm import PDMARConfig, PDMGenerationConfig
from .modeling_pdm import PDMAttention, PDMDecoderModel, PDMOutput, PDMPreTrainedModel, check_num_images, cross_entropy
from .ordering import Generators
from .sampling import guidance_mix, sample_codes

# ---------------------------------------------------------------------------------------------------------------
# Layer passes on PDMDecoderLayer's weights
# ---------------------------------------------------------------------------------------------------------------


def causal_self_attention(attn: PDMAttention, hidden_states: torch.Tensor, output_attentions: bool = False):
    """(batch, L, hidden) -> ((batch, L, hidden), weights or None): position i attends to positions <= i."""
    query = attn._split_heads(attn.q_proj(hidden_states))
    key, value = attn.project_key_value(hidden_states)
    return attn.attend(query, key, value, is_causal=True, output_attentions=output_attentions)


def cached_self_attention(
    attn: PDMAttention,
    hidden_states: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    step: torch.Tensor,
    filled: torch.Tensor,
    output_attentions: bool = False,
):
    """Self-attention of the one new position `step` over the cache; writes its key and value into the cache.

    Args:
        hidden_states: (batch, 1, hidden), the normed input of position `step`.
        key_cache, value_cache: (batch, heads, L, head_dim) preallocated buffers, updated in place.
        step: (1,) long tensor, the position being computed.
        filled: (L,) bool, True at positions `<= step` (the ones the cache holds).
    """
    query = attn._split_heads(attn.q_proj(hidden_states))
    key, value = attn.project_key_value(hidden_states)
    # In-place writes at a tensor index keep every shape and address fixed from step to step (CUDA-graph friendly).
    key_cache.index_copy_(2, step, key)
    value_cache.index_copy_(2, step, value)
    return attn.attend(query, key_cache, value_cache, attention_mask=filled[None, None, None, :],
                       output_attentions=output_attentions)


# ---------------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------------


class PDMARForTextToImage(PDMPreTrainedModel):
    """Text-to-image autoregressive baseline: PDM's network with a causal decoder, one code per step (eq. 3).

    Inputs of `forward`:
        input_ids (`torch.LongTensor` of shape `(batch, S)`): T5 token ids of the prompt.
        attention_mask (`torch.LongTensor` of shape `(batch, S)`): 1 on prompt tokens, 0 on padding.
        image_tokens (`torch.LongTensor` of shape `(batch, L)`): the codes Y in `[0, K)`, raster order. The decoder
            reads `[BOS, Y[:-1]]`, so `token_logits[:, i]` predicts `Y[:, i]` from `Y[:, :i]`.
        token_labels (`torch.LongTensor` of shape `(batch, L)`, *optional*): targets, normally `image_tokens`
            itself (-100 where ignored); the loss is their cross-entropy.
        encoder_hidden_states (`torch.FloatTensor` of shape `(batch, S, d_model)`, *optional*): cached T5 states.

    Returns a [`PDMOutput`] whose `state_loss` and `state_logits` are None.
    """

    config_class = PDMARConfig
    _generation_step = "decode_step"

    def __init__(self, config: PDMARConfig):
        super().__init__(config)
        self._init_text_encoder(config)
        self.decoder = PDMDecoderModel(config)
        self.token_head = nn.Linear(config.hidden_size, config.codebook_size)
        self.post_init()
        self._freeze_text_encoder()

    @property
    def bos_token_id(self) -> int:
        """The beginning-of-image token: PDM's `[MASK]` id K."""
        return self.config.mask_token_id

    # -- training ------------------------------------------------------------------------------------------------

    def _check_codes(self, image_tokens: torch.Tensor):
        num_tokens, num_codes = self.config.num_image_tokens, self.config.codebook_size
        if image_tokens.dim() != 2 or image_tokens.shape[1] != num_tokens:
            raise ValueError(
                f"image_tokens must have shape (batch, {num_tokens}) for token_grid_size {self.config.token_grid_size}, "
                f"got {tuple(image_tokens.shape)}"
            )
        low, high = int(image_tokens.min()), int(image_tokens.max())
        if low < 0 or high >= num_codes:
            raise ValueError(f"image_tokens must be codes in [0, {num_codes}) (no [MASK]), got values in [{low}, {high}]")

    def shift_right(self, image_tokens: torch.Tensor) -> torch.Tensor:
        """(batch, L) decoder input `[BOS, codes[:, :-1]]`."""
        bos = torch.full_like(image_tokens[:, :1], self.bos_token_id)
        return torch.cat([bos, image_tokens[:, :-1]], dim=1)

    def decode(self, decoder_input: torch.Tensor, text_key_values, text_mask: torch.Tensor) -> torch.Tensor:
        """(batch, L, K) token logits of the causal decoder over `decoder_input` (batch, L)."""
        decoded = self.decoder(decoder_input, text_key_values, text_mask, causal_self_attention)
        return self.token_head(decoded.last_hidden_state)

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.LongTensor] = None,
        image_tokens: Optional[torch.LongTensor] = None,
        token_labels: Optional[torch.LongTensor] = None,
        encoder_hidden_states: Optional[torch.FloatTensor] = None,
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        if image_tokens is None:
            raise ValueError("image_tokens is required: the codes Y of shape (batch, L)")
        self._check_codes(image_tokens)
        decoded = self.decoder(self.shift_right(image_tokens),
                               *self._text_inputs(input_ids, attention_mask, encoder_hidden_states),
                               causal_self_attention, output_hidden_states=output_hidden_states,
                               output_attentions=output_attentions)
        token_logits = self.token_head(decoded.last_hidden_state)
        token_loss = None if token_labels is None else cross_entropy(token_logits, token_labels)
        output = PDMOutput(loss=token_loss, token_loss=token_loss, token_logits=token_logits,
                           hidden_states=decoded.hidden_states, attentions=decoded.attentions,
                           cross_attentions=decoded.cross_attentions)
        return output if return_dict is not False else output.to_tuple()

    # -- generation with a KV cache ------------------------------------------------------------------------------

    def allocate_cache(self, batch_size: int) -> torch.Tensor:
        """(layers, 2, batch, heads, L, head_dim) zeros: keys (index 0) and values (index 1) of every position."""
        config = self.config
        heads = config.num_attention_heads
        shape = (config.num_hidden_layers, 2, batch_size, heads, config.num_image_tokens, config.hidden_size // heads)
        return torch.zeros(shape, dtype=self.token_head.weight.dtype, device=self.device)

    def decode_step(
        self,
        tokens: torch.Tensor,
        step: torch.Tensor,
        cache: torch.Tensor,
        text_key_values: List[Tuple[torch.Tensor, torch.Tensor]],
        text_mask: torch.Tensor,
    ) -> torch.Tensor:
        """(batch, K) logits of the code at position `step`, given the input token there; fills the cache at `step`.

        Args:
            tokens: (batch, 1) decoder input at `step`: BOS at step 0, else the code at `step - 1`.
            step: (1,) long tensor on the model's device. A tensor, not an int, so that every call runs the same
                kernels on the same buffers and the step can be captured once in a CUDA graph.
            cache: the buffer of `allocate_cache`, updated in place.
        """
        decoder = self.decoder
        positions = torch.arange(self.config.num_image_tokens, device=tokens.device)
        filled = positions <= step
        row, column = step // decoder.grid[1], step % decoder.grid[1]  # the one position, not the whole table
        hidden_states = decoder.code_embedding(tokens) + decoder.row_embedding(row) + decoder.column_embedding(column)
        for index, (layer, (key, value)) in enumerate(zip(decoder.layers, text_key_values)):
            attention = partial(cached_self_attention, key_cache=cache[index, 0], value_cache=cache[index, 1],
                                step=step, filled=filled)
            hidden_states = layer(hidden_states, key, value, text_mask, self_attention=attention)[0]
        return self.token_head(decoder.norm(hidden_states))[:, 0]

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        generation_config: Optional[PDMGenerationConfig] = None,
        negative_input_ids: Optional[torch.LongTensor] = None,
        negative_attention_mask: Optional[torch.LongTensor] = None,
        num_images_per_prompt: int = 1,
        generator: Generators = None,
    ) -> torch.LongTensor:
        """Generate image codes one at a time in raster order, with a KV cache (L decoder steps of one token).

        The text keys and values are computed once; the keys and values of past codes live in a preallocated
        cache, so each step costs one token's worth of decoder work. Sampling (temperature, `top_k`, `top_p`, the
        Gumbel noise, one generator per image) and classifier-free guidance are PDM's; their defaults come from
        `generation_config`, else the model's own (its stage arguments do not apply).

        Args:
            input_ids, attention_mask: (batch, S) prompt token ids and mask.
            guidance_scale: != 1 mixes `uncond + scale * (cond - uncond)`; the unconditional prompt is the empty
                prompt or `negative_input_ids` (one row, or one per prompt).
            num_images_per_prompt: images per prompt; the output has batch * num_images_per_prompt rows.
            generator: a `torch.Generator`, or one per output row (a batch then equals its rows one by one).

        Returns:
            `torch.LongTensor` of shape (batch * num_images_per_prompt, L).
        """
        run = self.run_config(generation_config, temperature=temperature, top_k=top_k, top_p=top_p,
                              guidance_scale=guidance_scale)
        check_num_images(num_images_per_prompt)
        temperature, top_k, top_p, guidance_scale = run.temperature, run.top_k, run.top_p, run.guidance_scale
        device, num_tokens = self.device, self.config.num_image_tokens
        use_guidance = guidance_scale != 1.0
        batch_size, text_key_values, text_mask = self._prepare_text(
            input_ids, attention_mask, guidance_scale, negative_input_ids, negative_attention_mask,
            num_images_per_prompt, generator,
        )
        rows = text_mask.shape[0]  # conditional (+ unconditional) rows
        cache = self.allocate_cache(rows)
        codes = torch.empty((batch_size, num_tokens), dtype=torch.long, device=device)
        tokens = torch.full((rows, 1), self.bos_token_id, dtype=torch.long, device=device)
        step = torch.zeros(1, dtype=torch.long, device=device)
        for position in range(num_tokens):
            logits = self._generation_step_fn()(tokens, step, cache, text_key_values, text_mask)
            if use_guidance:
                logits = guidance_mix(*logits.chunk(2), guidance_scale)
            sampled = sample_codes(logits[:, None], temperature, top_k, top_p, generator)  # (batch, 1)
            codes[:, position] = sampled[:, 0]
            tokens = torch.cat([sampled, sampled]) if use_guidance else sampled
            step += 1
        return codes


# Register with the Auto classes when imported as part of the package (see modeling_pdm.py).
if __name__.startswith("progressive_denoising."):
    AutoModel.register(PDMARConfig, PDMARForTextToImage, exist_ok=True)
    PDMARForTextToImage.register_for_auto_class("AutoModel")
