"""Configuration of the Progressive Denoising Model (PDM): the model's (`PDMConfig`) and a generation run's
(`PDMGenerationConfig`, saved beside the model as `generation_config.json`)."""

import dataclasses
import json
import math
import numbers
import os
from typing import Optional

from transformers import AutoConfig, PretrainedConfig, T5Config

from .errors import ArgumentError

# The state head predicts one of three classes per position. The paper writes the states as 0 (keep),
# 1 (generate) and -1 (replace); class indices must be non-negative, so "replace" is class 2.
STATE_KEEP, STATE_GENERATE, STATE_REPLACE = 0, 1, 2
STATE_NAMES = ("keep", "generate", "replace")

# Orders of section 3.2 / table 3. The state head chooses positions for the orders it was trained on;
# `raster` and `random` are fixed rules. `confidence` is a sampling rule only (MaskGIT's): a code is drawn at every
# masked position and the stage keeps the most probable draws, with Gumbel noise that anneals over the stages.
ORDERS = ("raster", "random", "quant-error", "reverse-quant-error", "learned", "confidence")
FIXED_ORDERS = ("raster", "random")
# Where the token loss of a training tuple applies: the paper's stage group (Z^t != 0), or every masked position.
TOKEN_LOSS_POSITIONS = ("stage", "masked")
# How the token loss of a batch of training tuples is averaged: over all labelled positions (a tuple of an early stage,
# with most codes masked, weighs up to T times more than one of the last stage), or over each tuple first (every
# stage weighs the same, as in the paper's stage-group loss, with all of the masked labels kept).
TOKEN_LOSS_WEIGHTINGS = ("position", "tuple")
# Where a learned absolute position embedding of the prompt's tokens is added, if anywhere: to the T5 encoder's input
# embeddings ("input") or to the text states the decoder's cross-attention reads ("output"). T5 itself knows word
# order only through the relative attention bias of its first layer, which a small T5 trained from scratch can leave
# unused: its states are then a bag of words, the same for "a red circle left of a blue square" and "a blue circle
# left of a red square".
TEXT_POSITION_EMBEDDINGS = ("input", "output")


class PDMConfig(PretrainedConfig):
    r"""
    Configuration of a [`PDMForTextToImage`]. Defaults follow appendix A of the paper: a T5-base text encoder,
    a 24-layer bidirectional decoder with hidden size 1280, feed-forward size 4096 and 20 heads, a VQGAN codebook
    of 16384 codes on a 32x32 token grid, and 64 stages.

    Args:
        text_config (`dict` or `T5Config`, *optional*):
            Configuration of the T5 text encoder. Defaults to T5-base sizes.
        hidden_size (`int`, defaults to 1280): width of the image-token decoder.
        num_hidden_layers (`int`, defaults to 24): decoder layers (self-attention, cross-attention, feed-forward).
        num_attention_heads (`int`, defaults to 20): heads of both attentions; must divide `hidden_size`.
        intermediate_size (`int`, defaults to 4096): feed-forward width.
        codebook_size (`int`, defaults to 16384): number of VQ codes `K`; codes are `0..K-1`.
        token_grid_size (`tuple[int, int]`, defaults to `(32, 32)`): the `(h, w)` grid of codes of one image;
            the sequence length is `L = h * w`.
        mask_token_id (`int`, *optional*): id of `[MASK]`; must be `codebook_size` (the default).
        num_stages (`int`, defaults to 64): default number of stages `T` of `generate`.
        training_order (`str`, defaults to `"quant-error"`): the order the state head was trained on, one of
            `raster`, `random`, `quant-error`, `reverse-quant-error`, `learned`.
        freeze_text_encoder (`bool`, defaults to `True`): the paper keeps the text encoder frozen.
        token_loss_positions (`str`, defaults to `"stage"`): where the token loss applied in training, `stage`
            (the paper's rule: the stage-t group and pseudo errors) or `masked` (every masked position and pseudo
            errors); a record of how the model was trained, used by the training script.
        token_loss_weighting (`str`, defaults to `"position"`): how `forward` averages the token loss of a batch:
            over all labelled positions, or over each example (training tuple) first (`"tuple"`).
        text_position_embedding (`str`, *optional*): `"input"` adds a learned absolute position embedding to the T5
            encoder's input embeddings, `"output"` to the T5 states before the decoder's cross-attention; None (the
            default, and the paper's) relies on T5's relative attention bias alone.
        max_text_positions (`int`, defaults to 256): prompt tokens the absolute position embedding covers.
        hidden_dropout (`float`), attention_dropout (`float`): dropout rates of the decoder.
        layer_norm_eps (`float`), initializer_range (`float`): as in other transformers models.
    """

    model_type = "pdm"
    sub_configs = {"text_config": T5Config}

    def __init__(
        self,
        text_config=None,
        hidden_size=1280,
        num_hidden_layers=24,
        num_attention_heads=20,
        intermediate_size=4096,
        codebook_size=16384,
        token_grid_size=(32, 32),
        mask_token_id=None,
        num_stages=64,
        training_order="quant-error",
        freeze_text_encoder=True,
        token_loss_positions="stage",
        token_loss_weighting="position",
        text_position_embedding=None,
        max_text_positions=256,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        layer_norm_eps=1e-6,
        initializer_range=0.02,
        **kwargs,
    ):
        if text_config is None:
            text_config = T5Config(d_model=768, d_ff=3072, num_layers=12, num_heads=12, d_kv=64)
        elif isinstance(text_config, dict):
            text_config = T5Config(**{k: v for k, v in text_config.items() if k != "model_type"})
        self.text_config = text_config
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.codebook_size = codebook_size
        self.token_grid_size = tuple(token_grid_size)
        self.mask_token_id = codebook_size if mask_token_id is None else mask_token_id
        self.num_stages = num_stages
        self.training_order = training_order
        self.freeze_text_encoder = freeze_text_encoder
        self.token_loss_positions = token_loss_positions
        self.token_loss_weighting = token_loss_weighting
        self.text_position_embedding = text_position_embedding
        self.max_text_positions = max_text_positions
        self.hidden_dropout = hidden_dropout
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.initializer_range = initializer_range
        super().__init__(**kwargs)
        self._check()

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        # `from_pretrained(path, num_stages=...)` sets such keyword arguments after `__init__`, past its checks.
        output = super().from_dict(config_dict, **kwargs)
        config = output[0] if isinstance(output, tuple) else output  # (config, unused kwargs) with return_unused_kwargs
        config._check()
        return output

    @property
    def num_image_tokens(self) -> int:
        """L, the number of codes of one image."""
        return self.token_grid_size[0] * self.token_grid_size[1]

    def _check(self):
        positive = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "codebook_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"PDMConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"PDMConfig.hidden_size ({self.hidden_size}) must be divisible by "
                f"num_attention_heads ({self.num_attention_heads})"
            )
        if len(self.token_grid_size) != 2 or any(not isinstance(s, int) or s <= 0 for s in self.token_grid_size):
            raise ValueError(f"PDMConfig.token_grid_size must be two positive integers (h, w), got {self.token_grid_size!r}")
        if self.mask_token_id != self.codebook_size:
            raise ValueError(
                f"PDMConfig.mask_token_id ({self.mask_token_id}) must equal codebook_size ({self.codebook_size}): "
                "codes are 0..K-1 and [MASK] is K"
            )
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= self.num_image_tokens:
            raise ValueError(
                f"PDMConfig.num_stages ({self.num_stages}) must be between 1 and the number of image tokens "
                f"h*w = {self.num_image_tokens} of token_grid_size {self.token_grid_size}"
            )
        if self.training_order not in ORDERS:
            raise ValueError(f"PDMConfig.training_order must be one of {ORDERS}, got {self.training_order!r}")
        if self.token_loss_positions not in TOKEN_LOSS_POSITIONS:
            raise ValueError(
                f"PDMConfig.token_loss_positions must be one of {TOKEN_LOSS_POSITIONS}, got {self.token_loss_positions!r}"
            )
        if self.token_loss_weighting not in TOKEN_LOSS_WEIGHTINGS:
            raise ValueError(f"PDMConfig.token_loss_weighting must be one of {TOKEN_LOSS_WEIGHTINGS}, got "
                             f"{self.token_loss_weighting!r}")
        if self.text_position_embedding is not None and self.text_position_embedding not in TEXT_POSITION_EMBEDDINGS:
            raise ValueError(f"PDMConfig.text_position_embedding must be None or one of {TEXT_POSITION_EMBEDDINGS}, "
                             f"got {self.text_position_embedding!r}")
        if not isinstance(self.max_text_positions, int) or self.max_text_positions <= 0:
            raise ValueError(f"PDMConfig.max_text_positions must be a positive integer, got {self.max_text_positions!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"PDMConfig.{name} must be in [0, 1), got {getattr(self, name)!r}")

    def to_dict(self):
        output = super().to_dict()
        if not isinstance(output.get("text_config"), dict):
            output["text_config"] = self.text_config.to_dict()
        output["token_grid_size"] = list(self.token_grid_size)
        return output


class PDMARConfig(PDMConfig):
    """Configuration of the autoregressive baseline [`PDMARForTextToImage`]: the fields of [`PDMConfig`] (the
    stage fields are unused). A model type of its own lets `AutoModel` tell the two kinds of checkpoint apart."""

    model_type = "pdm_ar"

    def __init__(self, **kwargs):  # explicit: transformers would otherwise derive one that skips PDMConfig's
        super().__init__(**kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------------------------

# How the guidance scale moves over the stages: the same at every stage, or rising linearly from 1 (no guidance) at
# the first stage to `guidance_scale` at the last (Muse's schedule: early stages, which place things, stay unguided).
GUIDANCE_SCHEDULES = ("constant", "linear")


def is_finite_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


@dataclasses.dataclass
class PDMGenerationConfig:
    r"""The arguments of a generation run, and a model's defaults for them (`model.generation_config`, saved as
    `generation_config.json` in the model's folder). `generate` and the pipelines start from the model's and
    override per call; None for `num_stages` / `order` means the model's own (`config.num_stages`,
    `config.training_order`).

    Args:
        num_stages (`int`, *optional*): stages T, 1..L.
        order (`str`, *optional*): `raster`, `random`, `quant-error`, `reverse-quant-error` or `learned`.
        temperature (`float`, defaults to 1.0): code sampling temperature, > 0.
        top_k (`int`, *optional*): sample among the k likeliest codes, 1..K.
        top_p (`float`, *optional*): sample from the nucleus of this mass, in (0, 1].
        guidance_scale (`float`, defaults to 1.0): classifier-free guidance on the code logits, >= 0 (1 = off).
        guidance_schedule (`str`, defaults to `"constant"`): `constant`, or `linear` (1 at the first stage rising
            to `guidance_scale` at the last).
        max_replacements (`int`, *optional*): cap on the codes replaced per stage (0 turns error recovering off).
    """

    num_stages: Optional[int] = None
    order: Optional[str] = None
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    guidance_scale: float = 1.0
    guidance_schedule: str = "constant"
    max_replacements: Optional[int] = None

    FILE_NAME = "generation_config.json"

    @classmethod
    def _check_keys(cls, values: dict, source: str):
        names = [field.name for field in dataclasses.fields(cls)]
        for key in values:
            if key not in names:
                raise ArgumentError(key, f"{source}: unknown key {key!r} (known: {', '.join(names)})")

    @classmethod
    def from_dict(cls, values: dict, source: str = "the generation config") -> "PDMGenerationConfig":
        """A config of `values`; an unknown key is a `ArgumentError` naming it and `source`."""
        cls._check_keys(values, source)
        return cls(**values)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def updated(self, **overrides) -> "PDMGenerationConfig":
        """A copy with the `overrides` that are not None (None keeps the value, as in transformers' `generate`)."""
        values = {key: value for key, value in overrides.items() if value is not None}
        self._check_keys(values, "generate")
        return dataclasses.replace(self, **values)

    def resolved(self, config: "PDMConfig") -> "PDMGenerationConfig":
        """This run's arguments for a model of `config`: None stages and order filled in from it, every value checked
        (`validate`)."""
        run = dataclasses.replace(self, num_stages=config.num_stages if self.num_stages is None else self.num_stages,
                                  order=config.training_order if self.order is None else self.order)
        run.validate(config)
        return run

    def validate(self, config: Optional["PDMConfig"] = None):
        """`ArgumentError` naming the first bad value; with a model `config`, the stages and top-k are
        checked against its L and K too."""
        num_tokens = None if config is None else config.num_image_tokens
        codebook_size = None if config is None else config.codebook_size
        if self.num_stages is not None and (not is_integer(self.num_stages) or self.num_stages < 1
                                            or (num_tokens is not None and self.num_stages > num_tokens)):
            bound = "" if num_tokens is None else f" and L = {num_tokens}"
            raise ArgumentError(
                "num_stages", f"num_stages must be an integer between 1{bound}, got {self.num_stages!r}")
        if self.order is not None and self.order not in ORDERS:
            raise ArgumentError("order", f"order must be one of {ORDERS}, got {self.order!r}")
        if not is_finite_number(self.temperature) or not self.temperature > 0:
            raise ArgumentError(
                "temperature", f"temperature must be a finite number > 0, got {self.temperature!r}")
        if self.top_k is not None and (not is_integer(self.top_k) or self.top_k < 1
                                       or (codebook_size is not None and self.top_k > codebook_size)):
            bound = "" if codebook_size is None else f" and codebook_size {codebook_size}"
            raise ArgumentError("top_k", f"top_k must be an integer between 1{bound}, got {self.top_k!r}")
        if self.top_p is not None and (not is_finite_number(self.top_p) or not 0 < self.top_p <= 1):
            raise ArgumentError("top_p", f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not is_finite_number(self.guidance_scale) or not self.guidance_scale >= 0:
            raise ArgumentError(
                "guidance_scale", f"guidance_scale must be a finite number >= 0, got {self.guidance_scale!r}")
        if self.guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ArgumentError(
                "guidance_schedule",
                f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {self.guidance_schedule!r}")
        if self.max_replacements is not None and (not is_integer(self.max_replacements) or self.max_replacements < 0):
            raise ArgumentError(
                "max_replacements", f"max_replacements must be None or an integer >= 0, got {self.max_replacements!r}")

    def save_pretrained(self, save_directory: str):
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, self.FILE_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)
            f.write("\n")

    @classmethod
    def from_file(cls, path: str) -> "PDMGenerationConfig":
        """The config in a `generation_config.json`; a damaged file, an unknown key or a bad value is a ValueError
        (`ArgumentError` for the latter two) whose one line names the file and the key."""
        try:
            with open(path) as f:
                values = json.load(f)
        except (OSError, ValueError) as error:
            raise ValueError(f"{path} is not a readable JSON file: {error}") from error
        if not isinstance(values, dict):
            raise ValueError(f"{path} must hold a JSON object of generation arguments")
        config = cls.from_dict(values, source=path)
        try:
            config.validate()
        except ArgumentError as error:
            raise ArgumentError(error.argument, f"{path}: {error}") from error
        return config


# Register with the Auto classes when imported as part of the package. A copy saved beside a model and loaded with
# `trust_remote_code` is registered by transformers itself, and must not take the package's place for "pdm".
if __name__.startswith("progressive_denoising."):
    AutoConfig.register(PDMConfig.model_type, PDMConfig, exist_ok=True)
    AutoConfig.register(PDMARConfig.model_type, PDMARConfig, exist_ok=True)
    PDMConfig.register_for_auto_class()  # saved configs get an `auto_map` (see modeling_pdm.py)
    PDMARConfig.register_for_auto_class()
