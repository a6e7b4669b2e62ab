"""Configuration of the Progressive Denoising Model (PDM)."""

from transformers import AutoConfig, PretrainedConfig, T5Config

# The state head predicts one of three classes per position. The paper writes the states as 0 (keep),
# 1 (generate) and -1 (replace); class indices must be non-negative, so "replace" is class 2.
STATE_KEEP, STATE_GENERATE, STATE_REPLACE = 0, 1, 2
STATE_NAMES = ("keep", "generate", "replace")

# Orders of section 3.2 / table 3. The state head chooses positions for the orders it was trained on;
# `raster` and `random` are fixed rules.
ORDERS = ("raster", "random", "quant-error", "reverse-quant-error", "learned")
FIXED_ORDERS = ("raster", "random")
# Where the token loss of a training tuple applies: the paper's stage group (Z^t != 0), or every masked position.
TOKEN_LOSS_POSITIONS = ("stage", "masked")


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


# Register with the Auto classes when imported as part of the package. A copy saved beside a model and loaded with
# `trust_remote_code` is registered by transformers itself, and must not take the package's place for "pdm".
if __name__.startswith("progressive_denoising."):
    AutoConfig.register(PDMConfig.model_type, PDMConfig, exist_ok=True)
    AutoConfig.register(PDMARConfig.model_type, PDMARConfig, exist_ok=True)
    PDMConfig.register_for_auto_class()  # saved configs get an `auto_map` (see modeling_pdm.py)
    PDMARConfig.register_for_auto_class()
