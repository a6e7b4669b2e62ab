"""transformers' conventions for PDMConfig, PDMForTextToImage and PDMARForTextToImage, and the training model card:
a frozen text encoder stays frozen after loading, loading kwargs are checked like `__init__`'s, the base-model prefix
names a submodule, the models initialize their own weights, and `attn_implementation` is honoured."""

import dataclasses
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModel, PreTrainedModel

from progressive_denoising import PDMARForTextToImage, PDMConfig, PDMForTextToImage
from progressive_denoising.modeling_pdm import PDMPreTrainedModel
from training.hub import model_card

from tiny import tiny_config

MODEL_CLASSES = [PDMForTextToImage, PDMARForTextToImage]


def make(model_class, seed=0, **overrides):
    torch.manual_seed(seed)
    return model_class(tiny_config(config_class=model_class.config_class, **overrides)).eval()


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config.text_config.vocab_size, (2, 5), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -1] = 0
    image_tokens = torch.randint(0, config.codebook_size, (2, config.num_image_tokens), generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, image_tokens=image_tokens)


# -- (a) a frozen text encoder after `from_pretrained` ---------------------------------------------------------------


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_frozen_text_encoder_stays_frozen_after_loading(model_class, tmp_path):
    model = make(model_class)
    assert 0 < trainable(model) < sum(p.numel() for p in model.parameters())
    model.save_pretrained(tmp_path)
    for loaded in (model_class.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert not [name for name, p in loaded.text_encoder.named_parameters() if p.requires_grad]
        assert trainable(loaded) == trainable(model)
    loaded, loading_info = model_class.from_pretrained(tmp_path, output_loading_info=True)
    assert trainable(loaded) == trainable(model) and not loading_info["missing_keys"]


def test_unfrozen_text_encoder_is_trainable_after_loading(tmp_path):
    model = make(PDMForTextToImage, freeze_text_encoder=False)
    model.save_pretrained(tmp_path)
    loaded = PDMForTextToImage.from_pretrained(tmp_path)
    assert trainable(loaded) == sum(p.numel() for p in loaded.parameters())


# -- (b) keyword arguments of `from_pretrained` go through the config's checks -------------------------------------


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(num_stages=1000), "num_stages"),
        (dict(training_order="zigzag"), "training_order"),
        (dict(hidden_size=30), "hidden_size"),  # not divisible by the 4 heads
    ],
)
def test_from_pretrained_overrides_are_checked_like_init(tmp_path, overrides, field):
    tiny_config().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=field):
        PDMConfig(**dict(tiny_config().to_dict(), **overrides))
    for load in (PDMConfig.from_pretrained, AutoConfig.from_pretrained):
        with pytest.raises(ValueError, match=field):
            load(tmp_path, **overrides)


def test_valid_from_pretrained_overrides_still_apply(tmp_path):
    tiny_config().save_pretrained(tmp_path)
    assert PDMConfig.from_pretrained(tmp_path, num_stages=2).num_stages == 2
    config, unused = PDMConfig.from_pretrained(tmp_path, num_stages=3, not_a_field=1, return_unused_kwargs=True)
    assert config.num_stages == 3 and unused == {"not_a_field": 1}


# -- (c) the base-model prefix and the model's own weight initialization --------------------------------------------


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_base_model_prefix_names_the_decoder(model_class):
    model = make(model_class)
    assert model.base_model_prefix == "decoder"
    assert model.base_model is model.decoder is getattr(model, model.base_model_prefix)


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_base_model_is_a_pretrained_model_of_its_own(model_class, tmp_path):
    """The headless decoder saves and loads alone, and gives the heads' input unchanged."""
    from progressive_denoising.modeling_pdm import PDMDecoderModel

    model = make(model_class)
    assert isinstance(model.base_model, PDMDecoderModel) and isinstance(model.base_model, PreTrainedModel)
    model.base_model.save_pretrained(tmp_path)
    loaded = PDMDecoderModel.from_pretrained(tmp_path).eval()
    batch = inputs(model.config)
    text_key_values, text_mask = model._text_inputs(batch["input_ids"], batch["attention_mask"], None)
    with torch.no_grad():
        expected = model.decoder(batch["image_tokens"], text_key_values, text_mask).last_hidden_state
        assert torch.equal(loaded(batch["image_tokens"], text_key_values, text_mask).last_hidden_state, expected)


# -- hidden states, attentions and input embeddings, as every transformers model has them ---------------------------


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_hidden_states_and_attentions_per_layer(model_class):
    model = make(model_class)
    config, batch = model.config, inputs(model.config)
    with torch.no_grad():
        plain = model(**batch)
        out = model(**batch, output_hidden_states=True, output_attentions=True)
    assert plain.hidden_states is None and plain.attentions is None
    layers, batch_size, num_tokens = config.num_hidden_layers, 2, config.num_image_tokens
    assert len(out.hidden_states) == layers + 1
    assert all(h.shape == (batch_size, num_tokens, config.hidden_size) for h in out.hidden_states)
    assert len(out.attentions) == len(out.cross_attentions) == layers
    heads = config.num_attention_heads
    assert all(a.shape == (batch_size, heads, num_tokens, num_tokens) for a in out.attentions)
    assert all(a.shape == (batch_size, heads, num_tokens, 5) for a in out.cross_attentions)
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones(batch_size, heads, num_tokens))
    # the padded prompt token gets no attention, and asking for the weights does not change the logits
    assert torch.equal(out.cross_attentions[0][0, :, :, -1], torch.zeros(heads, num_tokens))
    torch.testing.assert_close(out.token_logits, plain.token_logits, atol=1e-5, rtol=1e-5)
    # the last hidden state is what the heads read
    torch.testing.assert_close(model.token_head(out.hidden_states[-1]), out.token_logits)
    if model_class is PDMARForTextToImage:  # causal: nothing attends to a later position
        assert torch.equal(out.attentions[0].triu(1), torch.zeros_like(out.attentions[0]))


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_input_embeddings_are_the_prompt_embeddings_and_resize(model_class, tmp_path):
    """Adding words to the caption tokenizer: `resize_token_embeddings` grows T5's embedding, the old rows stay, the
    new ids work, and the resized model saves and loads."""
    model = make(model_class)
    assert model.get_input_embeddings() is model.text_encoder.shared
    old = model.get_input_embeddings().weight.clone()
    model.resize_token_embeddings(old.shape[0] + 3)
    assert model.get_input_embeddings().weight.shape[0] == old.shape[0] + 3
    assert model.config.text_config.vocab_size == old.shape[0] + 3
    assert torch.equal(model.get_input_embeddings().weight[: old.shape[0]], old)
    assert model.text_encoder.encoder.embed_tokens is model.get_input_embeddings()
    batch = inputs(model.config)
    batch["input_ids"][0, 0] = old.shape[0] + 2  # a new word
    with torch.no_grad():
        logits = model(**batch).token_logits
    model.save_pretrained(tmp_path)
    loaded = model_class.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).token_logits, logits)


def test_enable_input_require_grads_reaches_the_prompt_embeddings():
    """peft's hook for a frozen model with adapters: the embedding output requires grad."""
    model = make(PDMForTextToImage)
    model.requires_grad_(False)
    model.enable_input_require_grads()
    batch = inputs(model.config)
    states = model.encode_text(batch["input_ids"], batch["attention_mask"])
    assert not states.requires_grad  # a frozen text encoder runs without gradients
    embeds = model.get_input_embeddings()(batch["input_ids"])
    assert embeds.requires_grad


def test_models_initialize_their_own_weights():
    assert "_init_weights" in PDMPreTrainedModel.__dict__
    assert PDMPreTrainedModel._init_weights is not PreTrainedModel._init_weights


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_init_weights_follow_initializer_range_and_leave_t5_its_own(model_class):
    model = make(model_class, initializer_range=0.5, hidden_size=64, intermediate_size=128)
    layer = model.decoder.layers[0]
    for weight in (layer.self_attn.q_proj.weight, layer.mlp[0].weight, model.decoder.code_embedding.weight,
                   model.token_head.weight):
        assert abs(weight.std().item() - 0.5) < 0.1
    assert torch.equal(layer.self_attn.q_proj.bias, torch.zeros_like(layer.self_attn.q_proj.bias))
    assert torch.equal(model.decoder.norm.weight, torch.ones_like(model.decoder.norm.weight))
    # T5's own rule: q ~ N(0, (d_model * d_kv) ** -0.5) = 0.0625 for the tiny T5, whatever `initializer_range` says
    t5_query = model.text_encoder.encoder.block[0].layer[0].SelfAttention.q.weight
    assert abs(t5_query.std().item() - 0.0625) < 0.02


def test_weights_missing_from_a_checkpoint_get_the_models_initialization(tmp_path):
    from safetensors.torch import load_file, save_file

    make(PDMForTextToImage, initializer_range=0.5).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("state_head.")}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded, info = PDMForTextToImage.from_pretrained(tmp_path, output_loading_info=True)
    assert set(info["missing_keys"]) == {"state_head.weight", "state_head.bias"}
    assert torch.equal(loaded.state_head.bias, torch.zeros(3))
    assert 0.2 < loaded.state_head.weight.std().item() < 0.8


def test_t5_weights_missing_from_a_checkpoint_get_t5s_initialization(tmp_path):
    """T5's rule (wi ~ N(0, d_model ** -0.5), q ~ N(0, (d_model * d_kv) ** -0.5)), as a plain T5EncoderModel loads
    them, not the generic N(0, 1) that transformers gives custom code's parameter-less parent modules."""
    from safetensors.torch import load_file, save_file

    make(PDMForTextToImage).save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    missing = ("text_encoder.encoder.block.0.layer.1.DenseReluDense.wi.weight",
               "text_encoder.encoder.block.0.layer.0.SelfAttention.q.weight")
    save_file({k: v for k, v in weights.items() if k not in missing}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    loaded = PDMForTextToImage.from_pretrained(tmp_path)
    block = loaded.text_encoder.encoder.block[0]
    d_model, d_kv = loaded.config.text_config.d_model, loaded.config.text_config.d_kv
    assert abs(block.layer[1].DenseReluDense.wi.weight.std().item() - d_model ** -0.5) < 0.05
    assert abs(block.layer[0].SelfAttention.q.weight.std().item() - (d_model * d_kv) ** -0.5) < 0.02
    for name, tensor in loaded.state_dict().items():  # the weights that were there are untouched
        if name in weights and name not in missing:
            assert torch.equal(tensor, weights[name]), name


# -- (d) `attn_implementation` -------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_class", MODEL_CLASSES)
def test_eager_attention_is_honoured(model_class, tmp_path, monkeypatch):
    model = make(model_class)
    model.save_pretrained(tmp_path)
    batch = inputs(model.config)
    eager = model_class.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert eager.config._attn_implementation == "eager"

    def no_sdpa(*args, **kwargs):
        raise AssertionError("scaled_dot_product_attention ran although attn_implementation='eager'")

    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", no_sdpa)
        eager_logits = eager(**batch).token_logits
        eager.generate(batch["input_ids"], batch["attention_mask"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(eager_logits, model(**batch).token_logits, atol=1e-5, rtol=1e-5)
    # switched at run time, as transformers models are
    model.set_attn_implementation("eager")
    with monkeypatch.context() as patch:
        patch.setattr(F, "scaled_dot_product_attention", no_sdpa)
        torch.testing.assert_close(model(**batch).token_logits, eager_logits, atol=0, rtol=0)


@pytest.mark.parametrize("attn_implementation", ["flash_attention_2", "flex_attention"])
def test_unsupported_attention_implementations_are_refused(tmp_path, attn_implementation):
    make(PDMForTextToImage).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="does not support"):
        PDMForTextToImage.from_pretrained(tmp_path, attn_implementation=attn_implementation)


def test_eager_causal_attention_matches_sdpa_on_the_autoregressive_baseline():
    """The eager path writes the causal mask out; the cached generation must draw the same codes with it."""
    sdpa, eager = make(PDMARForTextToImage), make(PDMARForTextToImage)
    eager.set_attn_implementation("eager")
    batch = inputs(sdpa.config)
    with torch.no_grad():
        torch.testing.assert_close(eager(**batch).token_logits, sdpa(**batch).token_logits, atol=1e-5, rtol=1e-5)
    generated = [m.generate(batch["input_ids"], batch["attention_mask"], generator=torch.Generator().manual_seed(1))
                 for m in (sdpa, eager)]
    assert torch.equal(*generated)


# -- (e) the model card written by training ------------------------------------------------------------------------


@dataclasses.dataclass
class CardOptions:
    dataset: Optional[str] = None
    model_name_or_path: Optional[str] = None
    text_encoder: Optional[str] = None


def test_training_model_card_has_license_datasets_and_base_model():
    options = CardOptions(dataset="someone/pdm-shapes", text_encoder="google-t5/t5-small")
    card = ModelCard(model_card("PDM", options, {"loss": 1.0}, options.dataset, 10))
    assert card.data.license == "apache-2.0"
    assert card.data.datasets == ["someone/pdm-shapes"]
    assert card.data.base_model == "google-t5/t5-small"
    assert card.data.pipeline_tag == "text-to-image" and "pdm" in card.data.tags
    # a PDM trained further names that PDM rather than its text encoder
    options = CardOptions(dataset="someone/pdm-shapes", model_name_or_path="someone/pdm", text_encoder="t5-small")
    assert ModelCard(model_card("PDM", options, {}, options.dataset, 10)).data.base_model == "someone/pdm"


def test_training_model_card_names_local_folders_in_the_text_only(tmp_path):
    options = CardOptions(dataset=str(tmp_path), model_name_or_path=str(tmp_path))
    card = ModelCard(model_card("PDM", options, {}, options.dataset, 10))
    assert card.data.license == "apache-2.0"
    assert card.data.datasets is None and card.data.base_model is None
    assert str(tmp_path) in card.text
