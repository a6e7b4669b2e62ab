"""Progressive Denoising Model (PDM): a T5 text encoder, a bidirectional decoder over VQ codes, a token head and a
state head (keep / generate / replace), and the staged generation of section 3.

Read top to bottom: building blocks (attention, decoder layer, decoder), the pretrained base class, then
`PDMForTextToImage` with its output dataclasses, `forward` and `generate`.
"""

from dataclasses import dataclass
from functools import partial
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, PreTrainedModel, T5EncoderModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, cached_file, logging

from .configuration_pdm import PDMConfig, PDMGenerationConfig, is_finite_number, is_integer
# Imported here, not only through configuration_pdm: diffusers' remote-code loader copies the modules this file imports
# (not theirs) beside it.
from .errors import ArgumentError
from .lora import PDMLoraMixin
from .ordering import IGNORE_INDEX, Generators
from .sampling import StageRun

logger = logging.get_logger(__name__)

# Arguments of `from_pretrained` that say where and how to fetch a Hub repository's files.
HUB_KWARGS = ("cache_dir", "force_download", "proxies", "local_files_only", "token", "revision")

# ---------------------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------------------


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention written out (`attn_implementation="eager"`), with the arguments of transformers' `AttentionInterface`.

    Args:
        query: (batch, heads, Q, head_dim); key, value: (batch, heads, S, head_dim).
        attention_mask: boolean, broadcastable to (batch, heads, Q, S), True where a key may be attended to.
        is_causal: query i attends to keys 0..i only (the autoregressive baseline's training pass, Q = S).

    Returns:
        The output (batch, Q, heads, head_dim) and the attention weights (batch, heads, Q, S).
    """
    attn_weights = torch.matmul(query, key.transpose(2, 3)) * scaling
    if is_causal:
        causal = torch.ones(query.shape[2], key.shape[2], dtype=torch.bool, device=query.device).tril()
        attention_mask = causal if attention_mask is None else attention_mask & causal
    if attention_mask is not None:
        attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
    attn_weights = F.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


class PDMAttention(nn.Module):
    """Multi-head attention for self- and cross-attention, through `config._attn_implementation` (`"sdpa"`, the
    default, or `"eager"`).

    Queries come from `hidden_states` (batch, L, hidden); keys and values from `key_value_states`
    (batch, S, kv_dim) or from precomputed `(key, value)`, each (batch, heads, S, head_dim).
    `attention_mask` is a boolean (batch, S) mask, True where a key may be attended to.
    """

    def __init__(self, config: PDMConfig, kv_dim: int):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        # Bidirectional: SDPA would otherwise treat an unmasked self-attention as causal. The autoregressive baseline
        # asks for causal attention per call (`attend(..., is_causal=True)`).
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(kv_dim, config.hidden_size)
        self.v_proj = nn.Linear(kv_dim, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

    def project_key_value(self, key_value_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self._split_heads(self.k_proj(key_value_states)), self._split_heads(self.v_proj(key_value_states))

    def attend(self, query, key, value, attention_mask=None, is_causal=False, output_attentions=False):
        """((batch, Q, hidden) output projection, attention weights (batch, heads, Q, S) or None) of attention of
        `query` (batch, heads, Q, head_dim) over `key` and `value` (batch, heads, S, head_dim); `attention_mask`
        boolean, broadcastable to (batch, heads, Q, S). SDPA returns no weights: `output_attentions` runs the eager
        path for the call, as transformers' models fall back to it."""
        implementation = "eager" if output_attentions else self.config._attn_implementation
        attention_interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        attn_output, attn_weights = attention_interface(
            self, query, key, value, attention_mask, dropout=self.dropout if self.training else 0.0,
            scaling=self.scaling, is_causal=is_causal,
        )
        return self.o_proj(attn_output.flatten(2)), attn_weights if output_attentions else None

    def forward(self, hidden_states, key=None, value=None, attention_mask=None, output_attentions=False):
        """Self-attention over `hidden_states`, or cross-attention over precomputed `key` and `value`; returns
        (output, weights or None)."""
        if key is None:
            key, value = self.project_key_value(hidden_states)
        query = self._split_heads(self.q_proj(hidden_states))
        mask = None if attention_mask is None else attention_mask[:, None, None, :]
        return self.attend(query, key, value, mask, output_attentions=output_attentions)


class PDMDecoderLayer(GradientCheckpointingLayer):
    """Pre-norm decoder layer: bidirectional self-attention (no causal mask), cross-attention to the text, MLP.

    The text's cross-attention keys and values come in as two tensors of their own (computed once per prompt): under
    reentrant gradient checkpointing only positional tensor arguments carry gradients back, to a T5 being trained.
    """

    def __init__(self, config: PDMConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.self_attn = PDMAttention(config, kv_dim=hidden)
        self.cross_attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.cross_attn = PDMAttention(config, kv_dim=config.text_config.d_model)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, config.intermediate_size),
            nn.GELU(approximate="tanh"),
            nn.Linear(config.intermediate_size, hidden),
        )
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(self, hidden_states, text_key, text_value, text_mask, self_attention=None, output_attentions=False):
        """(hidden states, self-attention weights or None, cross-attention weights or None).

        `self_attention(attn, normed_states, output_attentions)`, when given, replaces the bidirectional
        self-attention: the autoregressive baseline passes its causal and KV-cached versions and so shares these
        weights and this code."""
        normed = self.self_attn_norm(hidden_states)
        attend = self.self_attn if self_attention is None else partial(self_attention, self.self_attn)
        attended, self_weights = attend(normed, output_attentions=output_attentions)
        hidden_states = hidden_states + self.dropout(attended)
        crossed, cross_weights = self.cross_attn(self.cross_attn_norm(hidden_states), key=text_key, value=text_value,
                                                 attention_mask=text_mask, output_attentions=output_attentions)
        hidden_states = hidden_states + self.dropout(crossed)
        hidden_states = hidden_states + self.dropout(self.mlp(self.mlp_norm(hidden_states)))
        return hidden_states, self_weights, cross_weights


@dataclass
class PDMDecoderOutput(ModelOutput):
    """Output of [`PDMDecoderModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, L, hidden)`): the final (normed) states.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*): with `output_hidden_states`, the embeddings and the
            output of every layer (the last one normed), each (batch, L, hidden).
        attentions (`tuple(torch.FloatTensor)`, *optional*): with `output_attentions`, each layer's self-attention
            weights, (batch, heads, L, L).
        cross_attentions (`tuple(torch.FloatTensor)`, *optional*): with `output_attentions`, each layer's
            attention weights over the prompt, (batch, heads, L, S).
    """

    last_hidden_state: Optional[torch.FloatTensor] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[Tuple[torch.FloatTensor, ...]] = None
    cross_attentions: Optional[Tuple[torch.FloatTensor, ...]] = None


def init_pdm_weights(module: nn.Module, config: PDMConfig):
    """N(0, `initializer_range`) for linear layers and embeddings, zero biases, LayerNorms at the identity."""
    std = config.initializer_range
    if isinstance(module, nn.Linear):
        init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        init.normal_(module.weight, mean=0.0, std=std)
    elif isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)


class PDMDecoderModel(PreTrainedModel):
    """The image-token decoder without heads: code embedding + 2-D position embedding, `num_hidden_layers` layers,
    final norm. It is the base model (`model.base_model`) that PDM's token and state heads and the autoregressive
    baseline's token head sit on; the T5 text encoder, the other half of the body, is a pretrained model of its own.

    The 2-D position is a learned row embedding plus a learned column embedding, so the decoder knows where on
    the (h, w) grid each code lies.

    Inputs of `forward`:
        image_tokens (`torch.LongTensor` of shape `(batch, L)`): codes in `[0, K)` or `[MASK]` = K.
        text_key_values (list of `(key, value)`): every layer's cross-attention keys and values of the prompt,
            each (batch, heads, S, head_dim), from `text_key_values`.
        text_mask (`torch.BoolTensor` of shape `(batch, S)`): True on prompt tokens.

    Returns a [`PDMDecoderOutput`].
    """

    config_class = PDMConfig
    base_model_prefix = "decoder"
    main_input_name = "image_tokens"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PDMDecoderLayer"]
    _supports_sdpa = True

    def __init__(self, config: PDMConfig):
        super().__init__(config)
        self.grid = config.token_grid_size
        hidden = config.hidden_size
        self.code_embedding = nn.Embedding(config.codebook_size + 1, hidden)  # + [MASK]
        self.row_embedding = nn.Embedding(self.grid[0], hidden)
        self.column_embedding = nn.Embedding(self.grid[1], hidden)
        self.layers = nn.ModuleList(PDMDecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.post_init()

    @classmethod
    def is_custom_code(cls) -> bool:
        return False  # see PDMPreTrainedModel.is_custom_code

    def _init_weights(self, module):
        init_pdm_weights(module, self.config)

    def get_input_embeddings(self) -> nn.Embedding:
        return self.code_embedding

    def set_input_embeddings(self, value: nn.Embedding):
        self.code_embedding = value

    def position_embedding(self) -> torch.Tensor:
        """(L, hidden) embedding of every grid position in raster order."""
        rows = self.row_embedding.weight[:, None, :]
        columns = self.column_embedding.weight[None, :, :]
        return (rows + columns).flatten(0, 1)

    def text_key_values(self, text_states: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys and values of every layer; computed once per prompt, reused at every stage."""
        return [layer.cross_attn.project_key_value(text_states) for layer in self.layers]

    def forward(self, image_tokens, text_key_values, text_mask, self_attention=None, output_hidden_states=None,
                output_attentions=None, return_dict=None):
        if output_hidden_states is None:
            output_hidden_states = self.config.output_hidden_states
        output_attentions = self.config.output_attentions if output_attentions is None else output_attentions
        hidden_states = self.code_embedding(image_tokens) + self.position_embedding()
        all_hidden, self_attentions, cross_attentions = [], [], []
        for layer, (key, value) in zip(self.layers, text_key_values):
            all_hidden.append(hidden_states)
            hidden_states, self_weights, cross_weights = layer(
                hidden_states, key, value, text_mask, self_attention=self_attention,
                output_attentions=output_attentions)
            self_attentions.append(self_weights)
            cross_attentions.append(cross_weights)
        hidden_states = self.norm(hidden_states)
        all_hidden.append(hidden_states)
        output = PDMDecoderOutput(
            last_hidden_state=hidden_states, hidden_states=tuple(all_hidden) if output_hidden_states else None,
            attentions=tuple(self_attentions) if output_attentions else None,
            cross_attentions=tuple(cross_attentions) if output_attentions else None,
        )
        return output if return_dict is not False else output.to_tuple()


# ---------------------------------------------------------------------------------------------------------------
# Sampling (shared with the autoregressive baseline)
# ---------------------------------------------------------------------------------------------------------------


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, per_example: bool = False) -> torch.Tensor:
    """Mean cross-entropy of (batch, L, C) logits against (batch, L) labels, in float32, -100 ignored: over all labelled
    positions, or (`per_example`) over each example's labelled positions first and then over the examples that have
    any, so that every example weighs the same however many labels it holds."""
    if not per_example:
        return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
    losses = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    counts = (labels != IGNORE_INDEX).sum(-1)
    labelled = counts > 0  # a mask, not an index: the same shapes at every step (compiled graphs)
    return (losses.sum(-1) / counts.clamp(min=1) * labelled).sum() / labelled.sum()


def check_num_images(num_images_per_prompt):
    if not is_integer(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ArgumentError("num_images_per_prompt", "num_images_per_prompt must be a positive integer, "
                                      f"got {num_images_per_prompt!r}")


# ---------------------------------------------------------------------------------------------------------------
# Pretrained base class
# ---------------------------------------------------------------------------------------------------------------


class PDMPreTrainedModel(PDMLoraMixin, PreTrainedModel):
    config_class = PDMConfig
    # The base model (`model.base_model`) is the headless image-token decoder, a `PDMDecoderModel` shared by PDM and
    # the autoregressive baseline, which differ in their heads and attention masks; the T5 text encoder is a
    # `PreTrainedModel` of its own. Parameter names stay `decoder.*` and `text_encoder.*` (no renaming of
    # checkpoints).
    base_model_prefix = "decoder"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["PDMDecoderLayer", "T5Block"]
    _supports_sdpa = True
    _generation_step = "decode"  # the method `generate` calls once per stage (PDM) or per code (AR)

    def _init_weights(self, module):
        """N(0, `initializer_range`) for linear layers and embeddings, zero biases, LayerNorms at the identity.

        Applied to the decoder and the heads; transformers initializes the T5 text encoder with T5's own rule.
        """
        if module is getattr(self, "text_position_embedding", None):
            # At the scale of T5's own token embeddings (or of its normalised output states), so that word order
            # weighs in from the first step as much as word identity does.
            init.normal_(module.weight, mean=0.0, std=self.config.text_config.initializer_factor)
        else:
            init_pdm_weights(module, self.config)

    def get_input_embeddings(self) -> nn.Embedding:
        """The prompt's token embedding (T5's shared embedding): what `resize_token_embeddings` grows when words are
        added to the caption tokenizer, and what peft's input-gradient hooks wrap."""
        return self.text_encoder.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Embedding):
        self.text_encoder.set_input_embeddings(value)

    @classmethod
    def is_custom_code(cls) -> bool:
        # transformers skips initialising a module without parameters of its own in custom code (which may write
        # weights in place), and T5 initialises its linear layers from their parent blocks (`T5DenseActDense`,
        # `T5Attention`): T5 weights missing from a checkpoint would keep the generic N(0, 1). This class initialises
        # through `transformers.initialization` as the library's models do, so it asks for the library's treatment.
        return False

    def post_init(self):
        super().post_init()
        # The defaults of a generation run; `from_pretrained` reads the folder's `generation_config.json` when it has
        # one (transformers' own `GenerationConfig` is for token-by-token language models: PDM keeps its own).
        self.generation_config = PDMGenerationConfig()

    def run_config(self, generation_config: Optional[PDMGenerationConfig] = None, **overrides) -> PDMGenerationConfig:
        """The arguments of one generation run: `generation_config` (default: the model's) with the `overrides` that
        are not None, resolved against this model's config and checked."""
        base = self.generation_config if generation_config is None else generation_config
        if not isinstance(base, PDMGenerationConfig):
            raise ArgumentError("generation_config", "generation_config must be a PDMGenerationConfig, got "
                                          f"{type(base).__name__}")
        return base.updated(**overrides).resolved(self.config)

    def save_pretrained(self, save_directory, is_main_process: bool = True, safe_serialization: bool = True,
                        variant: Optional[str] = None, **kwargs):
        """transformers' `save_pretrained`, and the generation defaults as `generation_config.json`. The arguments that
        diffusers passes to each component when it saves a pipeline (`safe_serialization`, `variant`) are named, as
        diffusers looks for them in the signature."""
        super().save_pretrained(save_directory, is_main_process=is_main_process, safe_serialization=safe_serialization,
                                variant=variant, **kwargs)
        if is_main_process:
            self.generation_config.save_pretrained(save_directory)

    def _freeze_text_encoder(self):
        """No gradients for the T5 encoder when `config.freeze_text_encoder` (the paper's setting)."""
        if self.config.freeze_text_encoder:
            self.text_encoder.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # transformers 5 loads every weight as a new `nn.Parameter` with requires_grad=True, which undoes the freezing
        # done in `__init__`: freeze again, so that no training loop trains a frozen text encoder by accident.
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading_info) with output_loading_info
        model._freeze_text_encoder()
        path = cached_file(
            args[0] if args else kwargs["pretrained_model_name_or_path"], PDMGenerationConfig.FILE_NAME,
            subfolder=kwargs.get("subfolder", ""), _raise_exceptions_for_missing_entries=False,
            **{key: kwargs[key] for key in HUB_KWARGS if key in kwargs},
        )
        if path is not None:  # folders saved before generation configs existed keep the defaults
            model.generation_config = PDMGenerationConfig.from_file(path)
        return loaded

    # -- the text side, shared by PDM and the autoregressive baseline -------------------------------------------

    @classmethod
    def from_text_encoder_pretrained(cls, name_or_path: str, **config_overrides) -> "PDMPreTrainedModel":
        """A fresh model whose text encoder is the pretrained T5 encoder at `name_or_path` (folder or Hub id).

        `config_overrides` set the other `PDMConfig` fields (decoder sizes, codebook, grid, ...).
        """
        text_encoder = T5EncoderModel.from_pretrained(name_or_path)
        config = cls.config_class(text_config=text_encoder.config.to_dict(), **config_overrides)
        model = cls(config)
        model.text_encoder.load_state_dict(text_encoder.state_dict())
        return model

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_text_encoder:
            self.text_encoder.eval()  # a frozen encoder also keeps its dropout off
        return self

    def _init_text_encoder(self, config):
        """The T5 encoder and, when `config.text_position_embedding` asks for it, the absolute position embedding of
        the prompt's tokens."""
        self.text_encoder = T5EncoderModel(config.text_config)
        if config.text_position_embedding is not None:
            self.text_position_embedding = nn.Embedding(config.max_text_positions, config.text_config.d_model)

    def _text_positions(self, length: int, device) -> torch.Tensor:
        """(length, d_model) absolute position embedding of the first `length` prompt tokens."""
        if length > self.config.max_text_positions:
            raise ValueError(f"the prompt has {length} tokens but the text position embedding covers "
                             f"max_text_positions = {self.config.max_text_positions}: shorten or truncate it")
        return self.text_position_embedding(torch.arange(length, device=device))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, S, d_model) T5 states of the prompt; without gradients when the encoder is frozen (and holds no
        adapter: LoRA trains a frozen T5 through its adapter weights)."""
        trains = not self.config.freeze_text_encoder or self.text_encoder_has_adapters()
        with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
            if self.config.text_position_embedding != "input":
                return self.text_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            embeds = self.text_encoder.get_input_embeddings()(input_ids)
            embeds = embeds + self._text_positions(input_ids.shape[1], input_ids.device)
            return self.text_encoder(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state

    def _with_output_positions(self, text_states: torch.Tensor) -> torch.Tensor:
        if self.config.text_position_embedding != "output":
            return text_states
        return text_states + self._text_positions(text_states.shape[1], text_states.device)

    def prompt_states(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(batch, S, d_model) the prompt as the decoder's cross-attention reads it: T5's states (`encode_text`), with
        the absolute positions added when `config.text_position_embedding == "output"`."""
        return self._with_output_positions(self.encode_text(input_ids, attention_mask))

    def text_key_values(self, text_states: torch.Tensor) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys and values of every decoder layer for (batch, S, d_model) T5 states (`encode_text`);
        computed once per prompt, reused at every stage."""
        return self.decoder.text_key_values(self._with_output_positions(text_states))

    def _text_inputs(self, input_ids, attention_mask, encoder_hidden_states):
        """(cross-attention keys / values of every decoder layer, (batch, S) bool text mask) of `forward`'s text
        inputs: prompt ids, or T5 states computed before (`encoder_hidden_states`)."""
        if encoder_hidden_states is None:
            if input_ids is None:
                raise ValueError("pass either input_ids or encoder_hidden_states")
            encoder_hidden_states = self.encode_text(input_ids, attention_mask)
        if attention_mask is None:
            attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=encoder_hidden_states.device)
        return self.text_key_values(encoder_hidden_states), attention_mask.bool()

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
        if negative_input_ids is not None and guidance_scale == 1.0:
            logger.warning("negative_input_ids are ignored at guidance_scale 1.0 (no guidance): pass "
                           "guidance_scale > 1 to guide away from them")
        if input_ids is None or input_ids.dim() != 2 or input_ids.shape[0] == 0:
            raise ValueError("input_ids must be a non-empty (batch, S) tensor of prompt token ids")
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
        return batch_size, self.text_key_values(text_states), text_mask

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
        hidden_states, attentions, cross_attentions: with `output_hidden_states` / `output_attentions`, the
            decoder's per-layer states and attention weights, as in [`PDMDecoderOutput`].
    """

    loss: Optional[torch.FloatTensor] = None
    token_loss: Optional[torch.FloatTensor] = None
    state_loss: Optional[torch.FloatTensor] = None
    token_logits: Optional[torch.FloatTensor] = None
    state_logits: Optional[torch.FloatTensor] = None
    hidden_states: Optional[Tuple[torch.FloatTensor, ...]] = None
    attentions: Optional[Tuple[torch.FloatTensor, ...]] = None
    cross_attentions: Optional[Tuple[torch.FloatTensor, ...]] = None


@dataclass
class PDMGenerateOutput(ModelOutput):
    """Output of [`PDMForTextToImage.generate`] with `return_stages=True`, and of [`PDMForTextToImage.rollout`].

    Args:
        codes (`torch.LongTensor` of shape `(batch, L)`): the final codes.
        stages (`torch.LongTensor` of shape `(batch, num_stages, L)`): the codes after every stage, `[MASK]`
            (= `codebook_size`) where nothing was generated yet.
        replaced (`torch.LongTensor` of shape `(batch, num_stages)`): how many already generated codes each stage
            chose to replace (error recovering, section 3.3); a replaced code may be redrawn as the same code.
        log_prob (`torch.FloatTensor` of shape `(batch,)`): [`~PDMForTextToImage.rollout`] only: the
            log-probability of the trajectory's position choices under the state head (eq. 6).
    """

    codes: Optional[torch.LongTensor] = None
    stages: Optional[torch.LongTensor] = None
    replaced: Optional[torch.LongTensor] = None
    log_prob: Optional[torch.FloatTensor] = None


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
        self._init_text_encoder(config)
        self.decoder = PDMDecoderModel(config)
        self.token_head = nn.Linear(config.hidden_size, config.codebook_size)
        self.state_head = nn.Linear(config.hidden_size, 3)
        self.post_init()
        self._freeze_text_encoder()

    # -- pieces shared by forward and generate -------------------------------------------------------------------

    def decode(self, image_tokens, text_key_values, text_mask) -> Tuple[torch.Tensor, torch.Tensor]:
        """Token logits (batch, L, K) and state logits (batch, L, 3) of one decoder pass."""
        hidden_states = self.decoder(image_tokens, text_key_values, text_mask).last_hidden_state
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
        output_hidden_states: Optional[bool] = None,
        output_attentions: Optional[bool] = None,
        return_dict: Optional[bool] = None,
    ):
        if image_tokens is None:
            raise ValueError("image_tokens is required: the codes Y^{t-1} of shape (batch, L)")
        self._check_image_tokens(image_tokens)
        decoded = self.decoder(image_tokens, *self._text_inputs(input_ids, attention_mask, encoder_hidden_states),
                               output_hidden_states=output_hidden_states, output_attentions=output_attentions)
        token_logits = self.token_head(decoded.last_hidden_state)
        state_logits = self.state_head(decoded.last_hidden_state)

        token_loss = state_loss = loss = None
        if token_labels is not None:
            token_loss = cross_entropy(token_logits, token_labels, self.config.token_loss_weighting == "tuple")
        if state_labels is not None:
            state_loss = cross_entropy(state_logits, state_labels)
        losses = [x for x in (token_loss, state_loss) if x is not None]
        if losses:
            loss = sum(losses)
        output = PDMOutput(
            loss=loss, token_loss=token_loss, state_loss=state_loss, token_logits=token_logits, state_logits=state_logits,
            hidden_states=decoded.hidden_states, attentions=decoded.attentions, cross_attentions=decoded.cross_attentions,
        )
        return output if return_dict is not False else output.to_tuple()

    # -- generation (section 3.1, eq. 4; error recovering of section 3.3) ----------------------------------------

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        num_stages: Optional[int] = None,
        order: Optional[str] = None,
        temperature: Optional[float] = None,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        guidance_schedule: Optional[str] = None,
        max_replacements: Optional[int] = None,
        generation_config: Optional[PDMGenerationConfig] = None,
        negative_input_ids: Optional[torch.LongTensor] = None,
        negative_attention_mask: Optional[torch.LongTensor] = None,
        num_images_per_prompt: int = 1,
        generator: Generators = None,
        return_stages: bool = False,
        callback_on_stage_end: Optional[Callable[[int, torch.Tensor], Optional[torch.Tensor]]] = None,
        init_codes: Optional[torch.LongTensor] = None,
        keep_mask: Optional[torch.BoolTensor] = None,
    ):
        """Generate image codes from prompts in `num_stages` stages (section 3.1).

        Starts from all `[MASK]` (or from `init_codes`: editing); each stage runs the decoder once, then
        - picks the masked positions to generate (their number follows `stage_schedule`): by the state head's
          "generate" probability for orders the model was trained on, by the fixed rule for `raster` / `random`;
        - picks already generated positions to replace: those the state head calls "replace" rather than "keep",
          most confident first, never more than were generated in the stage before (nor `max_replacements`;
          `max_replacements=0` turns error recovering off);
        - samples codes for all of them in parallel (temperature, `top_k`, `top_p`, classifier-free guidance).

        The run's arguments (`num_stages` to `max_replacements`) default to `generation_config`, else the model's
        own (`model.generation_config`, saved as `generation_config.json`); None keeps the default. Each is checked
        once, by [`PDMGenerationConfig.validate`], and a bad one raises `ArgumentError` naming it.

        Args:
            input_ids, attention_mask: (batch, S) prompt token ids and mask.
            num_stages: T in `1..L`; by default the model's `num_stages`.
            order: `raster`, `random`, `quant-error`, `reverse-quant-error` or `learned`; by default the order the
                model was trained on (`config.training_order`).
            guidance_scale: > 1 mixes `uncond + scale * (cond - uncond)`; the unconditional prompt is the empty
                prompt or `negative_input_ids` (one row, or one per prompt). `guidance_schedule="linear"` rises from
                1 at the first stage to `guidance_scale` at the last.
            num_images_per_prompt: images per prompt; the output has batch * num_images_per_prompt rows.
            generator: a `torch.Generator`, or one per output row (a batch then equals its rows one by one).
            return_stages: also return the codes after every stage and how many codes each stage replaced.
            callback_on_stage_end: called as `fn(stage_index, codes)` after every stage; codes it returns (same
                shape) are what the next stage starts from.
            init_codes: (batch, L) or (batch * num_images_per_prompt, L) codes to start from: positions holding
                `[MASK]` (`config.mask_token_id`) are filled, the stage schedule spreading them over the T stages;
                the others are there from the start and, unless kept, may be replaced like generated codes.
            keep_mask: (same shape) bool, True where a code of `init_codes` is never written (neither filled nor
                replaced); kept positions may not hold `[MASK]`.

        Returns:
            `torch.LongTensor` of shape (batch * num_images_per_prompt, L), or a [`PDMGenerateOutput`] with the
            codes, the stages and the replacement counts when `return_stages=True`.
        """
        run_config = self.run_config(generation_config, num_stages=num_stages, order=order, temperature=temperature,
                                     top_k=top_k, top_p=top_p, guidance_scale=guidance_scale,
                                     guidance_schedule=guidance_schedule, max_replacements=max_replacements)
        check_num_images(num_images_per_prompt)
        output = self._run_stages(
            input_ids, attention_mask, run_config, negative_input_ids=negative_input_ids,
            negative_attention_mask=negative_attention_mask, num_images_per_prompt=num_images_per_prompt,
            generator=generator, callback_on_stage_end=callback_on_stage_end, init_codes=init_codes,
            keep_mask=keep_mask, return_stages=return_stages,
        )
        return output if return_stages else output.codes

    def rollout(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.LongTensor] = None,
        num_stages: Optional[int] = None,
        temperature: Optional[float] = None,
        generator: Generators = None,
        policy_temperature: Optional[float] = 1.0,
    ) -> "PDMGenerateOutput":
        """`generate` with the state head as a stochastic policy (the learned order, section 3.2, eq. 6-7).

        Each stage draws the positions to fill among the masked ones without replacement, with probabilities
        softmax(log p(generate) / policy_temperature) (Gumbel-top-k), and replaces each generated code with
        probability sigmoid((log p(replace) - log p(keep)) / policy_temperature), at most as many as the stage before
        generated: the paper's action z in {1, -1}. Codes are sampled as in `generate` (`temperature`; no guidance,
        top-k or top-p). Runs with gradients where parameters require them (the state head when training a policy),
        so `log_prob` can be differentiated.

        Args:
            policy_temperature: 1 reads the state head's probabilities as they are; lower values explore closer to
                `generate`'s own choices; None takes exactly those (the most probable positions): the same codes as
                `generate(..., order="learned")` for the same generators, and `log_prob` None.

        Returns:
            [`PDMGenerateOutput`] with `codes` (batch, L), `replaced` (batch, T) and `log_prob` (batch,): the
            log-probability of all the position choices of the trajectory.
        """
        run_config = PDMGenerationConfig(num_stages=num_stages, order="learned",
                                         temperature=1.0 if temperature is None else temperature)
        run_config = run_config.resolved(self.config)
        if policy_temperature is not None and not (is_finite_number(policy_temperature) and policy_temperature > 0):
            raise ArgumentError("policy_temperature", "policy_temperature must be None or a finite number "
                                          f"> 0, got {policy_temperature!r}")
        return self._run_stages(input_ids, attention_mask, run_config, generator=generator,
                                policy_temperature=policy_temperature)

    def _run_stages(self, input_ids, attention_mask, run_config: PDMGenerationConfig, negative_input_ids=None,
                    negative_attention_mask=None, num_images_per_prompt=1, generator=None, callback_on_stage_end=None,
                    init_codes=None, keep_mask=None, return_stages=False, policy_temperature=None
                    ) -> "PDMGenerateOutput":
        """The stage loop of `generate` and `rollout` (`run_config` resolved and checked by them)."""
        batch_size, text_key_values, text_mask = self._prepare_text(
            input_ids, attention_mask, run_config.guidance_scale, negative_input_ids, negative_attention_mask,
            num_images_per_prompt, generator,
        )
        codes, keep = self._initial_codes(init_codes, keep_mask, input_ids.shape[0], num_images_per_prompt)
        run = StageRun(run_config, codes, keep, self.config.mask_token_id, generator, policy_temperature,
                       keep_stages=return_stages)
        decoder_pass = self._generation_step_fn()
        for stage in range(run.num_stages):
            run.step(stage, *decoder_pass(run.decoder_input(), text_key_values, text_mask))
            if callback_on_stage_end is not None:
                new_codes = callback_on_stage_end(stage, run.codes)
                if new_codes is not None and new_codes is not run.codes:
                    run.set_codes(new_codes)
        return PDMGenerateOutput(codes=run.codes, stages=torch.stack(run.stages, dim=1) if return_stages else None,
                                 replaced=torch.stack(run.replaced, 1), log_prob=run.log_prob)

    def _initial_codes(self, init_codes, keep_mask, num_prompts, num_images_per_prompt):
        """(codes, keep) of shape (batch, L) that the first stage starts from: all `[MASK]` and nothing kept, or
        `init_codes` / `keep_mask` checked and repeated for `num_images_per_prompt`."""
        device, num_tokens, mask_id = self.device, self.config.num_image_tokens, self.config.mask_token_id
        batch_size = num_prompts * num_images_per_prompt
        if init_codes is None:
            if keep_mask is not None:
                raise ValueError("keep_mask needs init_codes: the codes to keep")
            codes = torch.full((batch_size, num_tokens), mask_id, dtype=torch.long, device=device)
            return codes, torch.zeros_like(codes, dtype=torch.bool)
        rows = (num_prompts, batch_size)
        if not isinstance(init_codes, torch.Tensor) or init_codes.dim() != 2 or init_codes.shape[0] not in rows \
                or init_codes.shape[1] != num_tokens or init_codes.dtype.is_floating_point:
            raise ValueError(
                f"init_codes must be an integer tensor of shape ({num_prompts}, {num_tokens}) or ({batch_size}, "
                f"{num_tokens}) (prompts or images x L), got {getattr(init_codes, 'shape', init_codes)!r}"
            )
        if init_codes.numel() and (int(init_codes.min()) < 0 or int(init_codes.max()) > mask_id):
            raise ValueError(f"init_codes must lie in [0, {mask_id}] (codes 0..K-1 and [MASK] = {mask_id})")
        if keep_mask is None:
            keep_mask = torch.zeros_like(init_codes, dtype=torch.bool)
        if not isinstance(keep_mask, torch.Tensor) or keep_mask.dtype != torch.bool or keep_mask.shape != init_codes.shape:
            raise ValueError(
                f"keep_mask must be a bool tensor of the shape of init_codes {tuple(init_codes.shape)}, got "
                f"{getattr(keep_mask, 'dtype', type(keep_mask).__name__)} {tuple(getattr(keep_mask, 'shape', ()))}"
            )
        if (keep_mask & (init_codes == mask_id)).any():
            raise ValueError("keep_mask keeps positions whose init_codes are [MASK]: a kept position needs a code")
        codes, keep = init_codes.to(device), keep_mask.to(device)
        if codes.shape[0] != batch_size:
            codes, keep = (x.repeat_interleave(num_images_per_prompt, 0) for x in (codes, keep))
        return codes.long().clone(), keep


# Register with the Auto classes when imported as part of the package. A copy saved beside a model and loaded with
# `trust_remote_code` is registered by transformers itself.
if __name__.startswith("progressive_denoising."):
    AutoModel.register(PDMConfig, PDMForTextToImage, exist_ok=True)
    # Saved folders carry the model code and an `auto_map`, so people without this package can load them with
    # `AutoModel.from_pretrained(folder_or_hub_id, trust_remote_code=True)`.
    PDMForTextToImage.register_for_auto_class("AutoModel")
