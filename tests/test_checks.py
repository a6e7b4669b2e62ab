"""Argument checks of the model and the pipeline (each at the layer that owns it), the warnings about inputs that are
changed or ignored, and sampling that draws codes only at the positions a stage writes."""

import logging

import pytest
import torch

from progressive_denoising import PDMPipeline, sampling
from progressive_denoising.configuration_pdm import ArgumentError, PDMGenerationConfig
from progressive_denoising.sampling import sample_codes
from progressive_denoising.ordering import stage_schedule
from progressive_denoising.text_tokenizer import unknown_words

from tiny import tiny_config, tiny_model, tiny_tokenizer, tiny_vqmodel


def prompts(batch=2):
    ids = torch.randint(3, 100, (batch, 5), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.fixture(scope="module")
def pipe():
    pipeline = PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(guidance_scale=float("inf")), "guidance_scale"),
        (dict(guidance_scale=float("nan")), "guidance_scale"),
        (dict(temperature=float("inf")), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=float("nan")), "top_p"),
        (dict(top_p=float("inf")), "top_p"),
        (dict(top_k=2.5), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(top_k=17), "top_k"),
        (dict(num_stages=True), "num_stages"),
    ],
)
def test_generate_refuses_non_finite_and_non_integer_arguments(kwargs, name):
    ids, mask = prompts()
    with pytest.raises(ArgumentError, match=f"^{name} must be") as error:
        tiny_model().generate(ids, mask, **kwargs)
    assert error.value.argument == name  # the name as data: callers name their own flag without reading the text


def test_generate_checks_need_only_the_config():
    """The checks a caller runs before loading any weights are the ones `generate` runs: the generation config's,
    against the model's config."""
    config = tiny_config()
    PDMGenerationConfig(num_stages=16, order="random", top_k=16, top_p=1.0, guidance_scale=0.0).resolved(config)
    with pytest.raises(ArgumentError, match="num_stages") as error:
        PDMGenerationConfig(num_stages=17, order="random").resolved(config)
    assert error.value.argument == "num_stages"
    with pytest.raises(ArgumentError, match="top_k"):
        PDMGenerationConfig(num_stages=4, order="random", top_k=17).resolved(config)


def test_pipeline_refuses_infinite_guidance(pipe):
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe("a small red circle", guidance_scale=float("inf"), num_inference_steps=2, output_type="codes")


def warnings_of(caplog):
    return [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]


def test_unknown_words_are_named(pipe, caplog):
    prompt = "a small pink circle near a zebra"
    with caplog.at_level(logging.WARNING):
        pipe(prompt, num_inference_steps=2, output_type="codes", generator=generators(1))
    (message,) = warnings_of(caplog)
    for word in unknown_words(pipe.tokenizer, prompt):  # the package's rule, which the pipeline follows
        assert repr(word) in message
    assert pipe._unknown_words(prompt) == unknown_words(pipe.tokenizer, prompt) == ["pink", "near", "zebra"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        pipe("a small red circle", num_inference_steps=2, output_type="codes", generator=generators(1))
    assert warnings_of(caplog) == []


def test_a_prompt_past_the_limit_is_cut_with_a_warning(pipe, caplog):
    long_prompt = " ".join(["a small red circle"] * 80)  # 320 words, one token each
    with caplog.at_level(logging.WARNING):
        pipe(long_prompt, num_inference_steps=2, output_type="codes", generator=generators(1))
    (message,) = warnings_of(caplog)
    assert "256" in message and "321 tokens" in message


def test_a_negative_prompt_without_guidance_is_reported_as_ignored(pipe, caplog):
    with caplog.at_level(logging.WARNING):
        plain = pipe("a small red circle", num_inference_steps=2, output_type="codes", generator=generators(1)).images
        ignored = pipe("a small red circle", negative_prompt="a blue square", num_inference_steps=2,
                       output_type="codes", generator=generators(1)).images
    (message,) = warnings_of(caplog)
    assert "negative_prompt" in message and "guidance_scale" in message
    assert torch.equal(plain, ignored)
    caplog.clear()
    ids, mask = prompts()
    with caplog.at_level(logging.WARNING):
        tiny_model().generate(ids, mask, negative_input_ids=ids[:1], generator=generators(2))
    (message,) = warnings_of(caplog)
    assert "negative_input_ids" in message


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_noise_is_drawn_only_for_the_positions_a_stage_may_write(monkeypatch, guidance_scale):
    """A stage samples a fixed number of positions a row (its fills and the replacement bound), not all L."""
    drawn = []
    real_rand = sampling.rand

    def counting_rand(shape, generator=None, device=None, lengths=None):
        if len(shape) == 3:  # positions that got a row of K uniforms (each row's own width with per-image generators)
            drawn.append(sum(lengths) if lengths is not None else shape[0] * shape[1])
        return real_rand(shape, generator, device, lengths)

    monkeypatch.setattr(sampling, "rand", counting_rand)
    ids, mask = prompts(batch=3)
    num_stages = 4
    tiny_model().generate(ids, mask, num_stages=num_stages, guidance_scale=guidance_scale, generator=generators(3))
    fills = stage_schedule(16, num_stages)
    bound = [fill + (fills[stage - 1] if stage else 0) for stage, fill in enumerate(fills)]  # + replacements
    assert sum(drawn) == 3 * sum(bound)
    assert sum(drawn) < 3 * 16 * num_stages


def test_sampling_follows_the_softmax():
    probabilities = torch.tensor([0.1, 0.2, 0.7])
    logits = probabilities.log().expand(1, 20000, 3)
    codes = sample_codes(logits, 1.0, None, None, torch.Generator().manual_seed(0))[0]
    frequencies = torch.bincount(codes, minlength=3).float() / len(codes)
    torch.testing.assert_close(frequencies, probabilities, atol=0.015, rtol=0)
    greedy = sample_codes(logits[:, :5], 1.0, 1, None, torch.Generator().manual_seed(0))
    assert (greedy == 2).all()


