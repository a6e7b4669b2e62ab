"""PDMARForTextToImage, the autoregressive baseline: causality, the KV cache, padding, saving, learning, batching."""

import pytest
import torch
import torch.nn.functional as F

from progressive_denoising import PDMARConfig, PDMForTextToImage
from progressive_denoising.sampling import sample_codes
from progressive_denoising.modeling_ar import PDMARForTextToImage

from tiny import tiny_config

BATCH, PROMPT = 3, 6


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra threads only add synchronisation, which costs seconds on a busy shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def ar_config(**overrides):
    return tiny_config(config_class=PDMARConfig, **overrides)


def ar_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return PDMARForTextToImage(ar_config(**overrides)).eval()


def inputs(config, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, config.text_config.vocab_size, (BATCH, PROMPT), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -2:] = 0  # one padded prompt
    codes = torch.randint(0, config.codebook_size, (BATCH, config.num_image_tokens), generator=g)
    return dict(input_ids=input_ids, attention_mask=attention_mask, image_tokens=codes, token_labels=codes.clone())


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def naive_generate(model, input_ids, attention_mask, guidance_scale=1.0, temperature=1.0, top_k=None, top_p=None,
                   generator=None):
    """Reference: reruns the full causal forward over everything generated so far at every step, no cache."""
    batch_size, num_tokens = input_ids.shape[0], model.config.num_image_tokens
    codes = torch.zeros(batch_size, num_tokens, dtype=torch.long)  # positions >= i are never read at step i
    empty = torch.full((batch_size, 1), model.config.text_config.eos_token_id)
    for i in range(num_tokens):
        logits = model(input_ids, attention_mask, image_tokens=codes).token_logits[:, i].float()
        if guidance_scale != 1.0:
            uncond = model(empty, torch.ones_like(empty), image_tokens=codes).token_logits[:, i].float()
            logits = uncond + guidance_scale * (logits - uncond)
        codes[:, i] = sample_codes(logits[:, None], temperature, top_k, top_p, generator)[:, 0]
    return codes


# -- forward ----------------------------------------------------------------------------------------------------


def test_outputs_are_token_logits_and_next_code_loss():
    model = ar_model()
    batch = inputs(model.config)
    out = model(**batch)
    assert out.token_logits.shape == (BATCH, model.config.num_image_tokens, model.config.codebook_size)
    assert out.state_logits is None and out.state_loss is None
    expected = F.cross_entropy(out.token_logits.flatten(0, 1), batch["image_tokens"].flatten())
    torch.testing.assert_close(out.loss, expected)
    torch.testing.assert_close(out.token_loss, expected)
    assert model(**dict(batch, token_labels=None)).loss is None


def test_parameters_have_pdm_names_without_the_state_head():
    ar_keys = set(ar_model().state_dict())
    pdm_keys = set(PDMForTextToImage(tiny_config()).state_dict())
    assert ar_keys == pdm_keys - {"state_head.weight", "state_head.bias"}


def test_decoder_input_starts_with_the_mask_id():
    model = ar_model()
    codes = inputs(model.config)["image_tokens"]
    shifted = model.shift_right(codes)
    assert (shifted[:, 0] == model.config.mask_token_id).all() and model.bos_token_id == model.config.codebook_size
    torch.testing.assert_close(shifted[:, 1:], codes[:, :-1])


def test_mask_id_is_not_a_code():
    model = ar_model()
    batch = inputs(model.config)
    batch["image_tokens"][1, 3] = model.config.mask_token_id
    with pytest.raises(ValueError, match="no \\[MASK\\]"):
        model(**batch)


@pytest.mark.parametrize("j", [0, 7, 14])
def test_decoder_is_causal(j):
    model = ar_model()
    batch = inputs(model.config)
    before = model(**batch).token_logits
    batch["image_tokens"][:, j] = (batch["image_tokens"][:, j] + 1) % model.config.codebook_size
    after = model(**batch).token_logits
    # Logits at i predict code i from codes < i: code j reaches positions j + 1 onwards only.
    torch.testing.assert_close(after[:, : j + 1], before[:, : j + 1], atol=1e-6, rtol=0)
    assert not torch.allclose(after[:, j + 1], before[:, j + 1])


def test_padding_the_prompt_does_not_change_outputs():
    model = ar_model()
    batch = inputs(model.config)
    pad = torch.zeros(BATCH, 5, dtype=torch.long)
    padded = dict(batch, input_ids=torch.cat([batch["input_ids"], pad], 1),
                  attention_mask=torch.cat([batch["attention_mask"], pad], 1))
    torch.testing.assert_close(model(**padded).token_logits, model(**batch).token_logits, atol=1e-5, rtol=1e-5)
    codes = model.generate(batch["input_ids"], batch["attention_mask"], generator=generators([1, 2, 3]))
    padded_codes = model.generate(padded["input_ids"], padded["attention_mask"], generator=generators([1, 2, 3]))
    assert torch.equal(codes, padded_codes)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = ar_model().train()
    batch = inputs(model.config)
    model(**batch).loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert expected and all(p.grad is None for p in model.text_encoder.parameters())
    model.zero_grad()
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    assert all(layer.gradient_checkpointing for layer in model.decoder.layers)
    model(**batch).loss.backward()
    for name, grad in expected.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, atol=1e-6, rtol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    model = ar_model()
    model.save_pretrained(tmp_path)
    loaded = PDMARForTextToImage.from_pretrained(tmp_path).eval()
    assert loaded.config.architectures == ["PDMARForTextToImage"]
    batch = inputs(model.config)
    torch.testing.assert_close(loaded(**batch).token_logits, model(**batch).token_logits, atol=0, rtol=0)
    g = lambda: generators([5, 6, 7])
    assert torch.equal(loaded.generate(batch["input_ids"], generator=g()), model.generate(batch["input_ids"], generator=g()))


def test_the_model_can_learn_a_fixed_batch():
    model = ar_model().train()
    batch = inputs(model.config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, betas=(0.9, 0.96))
    first = None
    for _ in range(150):
        loss = model(**batch).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.1 * first, (first, loss.item())


# -- generation -------------------------------------------------------------------------------------------------


def test_cached_step_gives_the_logits_of_the_causal_forward():
    model = ar_model()
    batch = inputs(model.config)
    expected = model(**batch).token_logits
    states = model.encode_text(batch["input_ids"], batch["attention_mask"])
    text_key_values, text_mask = model.decoder.text_key_values(states), batch["attention_mask"].bool()
    cache = model.allocate_cache(BATCH)
    decoder_input = model.shift_right(batch["image_tokens"])
    with torch.no_grad():
        for i in range(model.config.num_image_tokens):
            logits = model.decode_step(decoder_input[:, i : i + 1], torch.tensor([i]), cache, text_key_values, text_mask)
            torch.testing.assert_close(logits, expected[:, i], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    "sampling",
    [
        dict(),
        dict(guidance_scale=3.0),
        dict(guidance_scale=2.0, temperature=0.7, top_k=5, top_p=0.9),
    ],
)
def test_cached_generate_equals_naive_generate(sampling):
    model = ar_model()
    batch = inputs(model.config)
    for seed in (0, 1):
        cached = model.generate(batch["input_ids"], batch["attention_mask"], generator=torch.Generator().manual_seed(seed), **sampling)
        with torch.no_grad():
            naive = naive_generate(model, batch["input_ids"], batch["attention_mask"],
                                   generator=torch.Generator().manual_seed(seed), **sampling)
        assert torch.equal(cached, naive), (seed, cached, naive)
        assert cached.min() >= 0 and cached.max() < model.config.codebook_size


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_batch_equals_one_by_one_with_per_example_generators(guidance_scale):
    model = ar_model()
    batch = inputs(model.config)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    together = model.generate(ids, mask, guidance_scale=guidance_scale, num_images_per_prompt=2,
                              generator=generators(range(10, 16)))
    assert together.shape == (2 * BATCH, model.config.num_image_tokens)
    for row in range(2 * BATCH):
        prompt = row // 2
        alone = model.generate(ids[prompt : prompt + 1, : int(mask[prompt].sum())], guidance_scale=guidance_scale,
                               generator=generators([10 + row]))
        assert torch.equal(together[row : row + 1], alone), row


def test_wrong_number_of_generators_is_an_error():
    model = ar_model()
    with pytest.raises(ValueError, match="generators"):
        model.generate(inputs(model.config)["input_ids"], generator=generators([0, 1]))


def test_auto_model_tells_ar_and_pdm_checkpoints_apart(tmp_path):
    from transformers import AutoModel

    ar_model().save_pretrained(tmp_path / "ar")
    PDMForTextToImage(tiny_config()).save_pretrained(tmp_path / "pdm")
    assert type(AutoModel.from_pretrained(tmp_path / "ar")) is PDMARForTextToImage
    assert type(AutoModel.from_pretrained(tmp_path / "pdm")) is PDMForTextToImage


def test_compiled_fast_path_gives_the_plain_codes():
    plain, fast = ar_model(), ar_model().compile_generation()
    batch = inputs(plain.config)
    # guidance: the conditional and unconditional rows go through the compiled step as one batch
    expected = plain.generate(batch["input_ids"], batch["attention_mask"], guidance_scale=3.0,
                              generator=torch.Generator().manual_seed(0))
    got = fast.generate(batch["input_ids"], batch["attention_mask"], guidance_scale=3.0,
                        generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, expected)
