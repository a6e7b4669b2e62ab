"""PDMConfig / PDMForTextToImage: shapes, losses, bidirectionality, padding, saving and loading, learning."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModel, T5EncoderModel

from progressive_denoising import PDMConfig, PDMForTextToImage
from progressive_denoising.configuration_pdm import STATE_REPLACE

from tiny import save_tiny_t5, tiny_config, tiny_model


class PDMModelTester:
    """Builds a tiny config and inputs, in the spirit of transformers' ModelTester classes."""

    batch_size, prompt_length = 3, 6

    def __init__(self, **overrides):
        self.config = tiny_config(**overrides)
        self.num_tokens = self.config.num_image_tokens

    def inputs(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        input_ids = torch.randint(3, self.config.text_config.vocab_size, (self.batch_size, self.prompt_length), generator=g)
        attention_mask = torch.ones_like(input_ids)
        attention_mask[0, -2:] = 0  # one padded prompt
        image_tokens = torch.randint(0, self.config.codebook_size + 1, (self.batch_size, self.num_tokens), generator=g)
        token_labels = torch.randint(0, self.config.codebook_size, (self.batch_size, self.num_tokens), generator=g)
        token_labels[:, ::2] = -100
        state_labels = torch.randint(0, 3, (self.batch_size, self.num_tokens), generator=g)
        return dict(input_ids=input_ids, attention_mask=attention_mask, image_tokens=image_tokens,
                    token_labels=token_labels, state_labels=state_labels)


@pytest.fixture
def tester():
    return PDMModelTester()


def test_config_defaults_follow_the_paper():
    config = PDMConfig()
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size, config.num_attention_heads) == (24, 1280, 4096, 20)
    assert (config.codebook_size, config.token_grid_size, config.num_stages) == (16384, (32, 32), 64)
    assert config.mask_token_id == 16384 and config.num_image_tokens == 1024
    assert config.text_config.d_model == 768 and config.freeze_text_encoder
    assert config.token_loss_positions == "stage"  # the paper's rule (eq. 4): labels on the stage-t group


@pytest.mark.parametrize(
    "overrides, fields",
    [
        (dict(hidden_size=30, num_attention_heads=4), ["hidden_size", "num_attention_heads"]),
        (dict(token_grid_size=(4,)), ["token_grid_size"]),
        (dict(token_grid_size=(2, 2), num_stages=5), ["num_stages", "token_grid_size"]),
        (dict(mask_token_id=3), ["mask_token_id", "codebook_size"]),
        (dict(training_order="zigzag"), ["training_order"]),
        (dict(token_loss_positions="all"), ["token_loss_positions"]),
        (dict(codebook_size=0), ["codebook_size"]),
    ],
)
def test_bad_configs_name_the_fields(overrides, fields):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    for field in fields:
        assert field in str(error.value)


def test_output_shapes_and_dtypes(tester):
    model = PDMForTextToImage(tester.config)
    out = model(**tester.inputs())
    b, l, k = tester.batch_size, tester.num_tokens, tester.config.codebook_size
    assert out.token_logits.shape == (b, l, k) and out.state_logits.shape == (b, l, 3)
    for name in ("loss", "token_loss", "state_loss", "token_logits", "state_logits"):
        assert getattr(out, name).dtype == torch.float32, name
    for name in ("loss", "token_loss", "state_loss"):
        assert getattr(out, name).shape == () and torch.isfinite(getattr(out, name)), name
    torch.testing.assert_close(out.loss, out.token_loss + out.state_loss)


def test_losses_reach_the_decoder_but_not_a_frozen_text_encoder(tester):
    model = PDMForTextToImage(tester.config).train()
    model(**tester.inputs()).loss.backward()
    assert all(p.grad is None for p in model.text_encoder.parameters())
    for module in (model.decoder, model.token_head, model.state_head):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


def test_unfrozen_text_encoder_is_trained():
    tester = PDMModelTester(freeze_text_encoder=False)
    model = PDMForTextToImage(tester.config).train()
    model(**tester.inputs()).loss.backward()
    assert model.text_encoder.shared.weight.grad.abs().sum() > 0


def test_decoder_is_bidirectional(tester):
    model = PDMForTextToImage(tester.config).eval()
    inputs = tester.inputs()
    inputs["image_tokens"][:, -1] = 0
    first = model(**inputs).token_logits[:, 0]
    inputs["image_tokens"][:, -1] = 5
    assert not torch.allclose(first, model(**inputs).token_logits[:, 0])


def test_padding_the_prompt_does_not_change_outputs(tester):
    model = PDMForTextToImage(tester.config).eval()
    inputs = tester.inputs()
    out = model(**inputs)
    padded = dict(inputs)
    padded["input_ids"] = torch.cat([inputs["input_ids"], torch.zeros(tester.batch_size, 5, dtype=torch.long)], 1)
    padded["attention_mask"] = torch.cat([inputs["attention_mask"], torch.zeros(tester.batch_size, 5, dtype=torch.long)], 1)
    out_padded = model(**padded)
    torch.testing.assert_close(out.token_logits, out_padded.token_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.state_logits, out_padded.state_logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bad", [-1, 17])
def test_image_tokens_outside_codebook_are_rejected(tester, bad):
    model = PDMForTextToImage(tester.config)
    inputs = tester.inputs()
    inputs["image_tokens"][1, 3] = bad
    with pytest.raises(ValueError, match=r"image_tokens must lie in \[0, 16\]"):
        model(**inputs)


def test_image_tokens_of_wrong_length_are_rejected(tester):
    model = PDMForTextToImage(tester.config)
    inputs = tester.inputs()
    inputs["image_tokens"] = inputs["image_tokens"][:, :-1]
    with pytest.raises(ValueError, match="image_tokens must have shape"):
        model(**inputs)


def test_cached_text_states_give_the_same_outputs(tester):
    model = PDMForTextToImage(tester.config).eval()
    inputs = tester.inputs()
    states = model.encode_text(inputs["input_ids"], inputs["attention_mask"])
    cached = dict(inputs, input_ids=None, encoder_hidden_states=states)
    torch.testing.assert_close(model(**inputs).token_logits, model(**cached).token_logits)


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(tester, use_reentrant):
    """Both checkpointing modes, with the text encoder trained too: the cross-attention keys and values computed
    from the T5 states outside the layers must carry their gradients back through the checkpointed layers."""
    torch.manual_seed(0)
    model = PDMForTextToImage(PDMConfig(**{**tester.config.to_dict(), "freeze_text_encoder": False})).train()
    inputs = tester.inputs()
    model(**inputs).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(name.startswith("text_encoder.") for name in expected)
    model.zero_grad()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert all(layer.gradient_checkpointing for layer in model.decoder.layers)
    model(**inputs).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5, msg=name)


def test_bfloat16_forward_is_finite(tester):
    model = PDMForTextToImage(tester.config).to(torch.bfloat16)
    out = model(**tester.inputs())
    assert out.token_logits.dtype == torch.bfloat16
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


def test_save_and_load_round_trip(tester, tmp_path):
    model = PDMForTextToImage(tester.config).eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    inputs = tester.inputs()
    for loaded in (PDMForTextToImage.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is PDMForTextToImage
        torch.testing.assert_close(loaded.eval()(**inputs).token_logits, model(**inputs).token_logits, atol=0, rtol=0)
    assert isinstance(AutoConfig.from_pretrained(tmp_path), PDMConfig)


def test_checkpoint_that_does_not_match_the_config_is_an_error(tester, tmp_path):
    PDMForTextToImage(tester.config).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hidden_size"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="(?i)mismatch"):
        PDMForTextToImage.from_pretrained(tmp_path)


def test_trust_remote_code_loads_without_the_package(tester, tmp_path):
    model = PDMForTextToImage(tester.config).eval()
    model.save_pretrained(tmp_path / "model")
    auto_map = json.loads((tmp_path / "model" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_pdm.PDMConfig", "AutoModel": "modeling_pdm.PDMForTextToImage"}
    inputs = tester.inputs()
    torch.save({k: v for k, v in inputs.items()}, tmp_path / "inputs.pt")
    torch.save(model(**inputs).token_logits, tmp_path / "expected.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["progressive_denoising"] = None  # make the package unimportable in this process
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({str(tmp_path / "model")!r}, trust_remote_code=True).eval()
        assert "progressive_denoising" not in type(model).__module__, type(model).__module__
        inputs = torch.load({str(tmp_path / "inputs.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        torch.testing.assert_close(model(**inputs).token_logits, expected, atol=0, rtol=0)
        codes = model.generate(inputs["input_ids"], inputs["attention_mask"], num_stages=2)
        assert codes.shape == (3, 16)
        print("REMOTE-OK", type(model).__module__)
        """
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE-OK transformers_modules" in result.stdout


def test_from_text_encoder_pretrained_uses_the_given_t5(tmp_path):
    save_tiny_t5(tmp_path / "t5", seed=3)
    model = PDMForTextToImage.from_text_encoder_pretrained(
        str(tmp_path / "t5"), hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
        codebook_size=16, token_grid_size=(4, 4), num_stages=4,
    )
    reference = T5EncoderModel.from_pretrained(tmp_path / "t5")
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.text_encoder.state_dict()[name], tensor, atol=0, rtol=0)
    assert model.config.hidden_size == 32 and model.config.text_config.d_model == 32


def test_the_model_can_learn_a_fixed_batch(tester):
    torch.manual_seed(0)
    model = PDMForTextToImage(tester.config).train()
    inputs = tester.inputs()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.96))
    first = None
    for _ in range(300):
        loss = model(**inputs).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first and loss.item() < 0.1, (first, loss.item())


def test_state_head_can_be_forced():
    """The state head is a plain linear layer; tests of generate() force it by setting its bias."""
    model = tiny_model()
    with torch.no_grad():
        model.state_head.weight.zero_()
        model.state_head.bias.copy_(torch.tensor([0.0, 0.0, 10.0]))
    inputs = PDMModelTester().inputs()
    assert (model(**inputs).state_logits.argmax(-1) == STATE_REPLACE).all()


def test_token_loss_per_tuple_weighs_every_example_the_same(tester):
    """`token_loss_weighting="tuple"`: the mean of each example's mean, not the mean over all labelled positions."""
    torch.manual_seed(0)
    model = PDMForTextToImage(PDMConfig(**{**tester.config.to_dict(), "token_loss_weighting": "tuple"})).eval()
    inputs = tester.inputs()
    labels = torch.randint(0, model.config.codebook_size, inputs["image_tokens"].shape)
    labels[0, 1:] = -100  # one label in the first example, all positions in the others
    out = model(**{**inputs, "token_labels": labels})
    per_example = [torch.nn.functional.cross_entropy(logits[keep], target[keep])
                   for logits, target, keep in zip(out.token_logits.float(), labels, labels != -100)]
    torch.testing.assert_close(out.token_loss, torch.stack(per_example).mean())
    model.config.token_loss_weighting = "position"
    assert not torch.allclose(model(**{**inputs, "token_labels": labels}).token_loss, out.token_loss)
    with pytest.raises(ValueError, match="token_loss_weighting"):
        PDMConfig(**{**tester.config.to_dict(), "token_loss_weighting": "stage"})
