"""A model's sampling defaults (`PDMGenerationConfig`, saved as `generation_config.json`), the run object that owns a
generation run (`sampling.StageRun`), the guidance schedule, the `confidence` order and the text position
embedding."""

import json
import subprocess
import sys

import pytest
import torch

from benchmarks.bench_generate import HostReads
from progressive_denoising import PDMForTextToImage, PDMPipeline
from progressive_denoising.configuration_pdm import ArgumentError, PDMGenerationConfig
from progressive_denoising.ordering import stage_schedule
from progressive_denoising.sampling import StageRun

from tiny import tiny_config, tiny_model, tiny_tokenizer, tiny_vqmodel


def prompts(batch=2):
    ids = torch.randint(3, 100, (batch, 5), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def generators(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


# -- the generation config ----------------------------------------------------------------------------------------


def test_saved_defaults_are_the_generation_defaults(tmp_path):
    model = tiny_model()
    model.generation_config = PDMGenerationConfig(temperature=0.5, top_k=4, num_stages=2)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "generation_config.json").read_text())["temperature"] == 0.5
    loaded = PDMForTextToImage.from_pretrained(tmp_path).eval()
    assert loaded.generation_config == model.generation_config
    ids, mask = prompts()
    with_defaults = loaded.generate(ids, mask, generator=generators(2))
    explicit = tiny_model().generate(ids, mask, temperature=0.5, top_k=4, num_stages=2, generator=generators(2))
    assert torch.equal(with_defaults, explicit)
    # a call overrides a default; None keeps it
    override = loaded.generate(ids, mask, temperature=1.0, top_k=None, generator=generators(2))
    assert torch.equal(override, tiny_model().generate(ids, mask, top_k=4, num_stages=2, generator=generators(2)))


def test_a_folder_without_generation_config_keeps_the_old_defaults(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").unlink()
    assert PDMForTextToImage.from_pretrained(tmp_path).generation_config == PDMGenerationConfig()


@pytest.mark.parametrize("content, key", [({"temperature": 0.7, "beam_width": 3}, "beam_width"),
                                          ({"temperature": -1.0}, "temperature"),
                                          ({"guidance_schedule": "cosine"}, "guidance_schedule")])
def test_a_bad_generation_config_fails_on_load_naming_the_file_and_the_key(tmp_path, content, key):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(ArgumentError) as error:
        PDMForTextToImage.from_pretrained(tmp_path)
    assert error.value.argument == key
    message = str(error.value)
    assert "generation_config.json" in message and key in message and "\n" not in message


def test_pipeline_draws_with_the_model_defaults(tmp_path):
    pipe = PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())
    pipe.model.generation_config = PDMGenerationConfig(temperature=0.3, num_stages=2)
    pipe.save_pretrained(tmp_path)
    loaded = PDMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.model.generation_config.temperature == 0.3
    codes = loaded("a small red circle", generator=generators(1), output_type="latent").images
    explicit = loaded("a small red circle", generator=generators(1), output_type="codes", temperature=0.3,
                      num_inference_steps=2).images
    assert torch.equal(codes, explicit)
    assert loaded.num_timesteps == 2


def test_cli_help_says_where_defaults_come_from():
    result = subprocess.run([sys.executable, "-m", "progressive_denoising.cli", "generate", "--help"],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert "generation_config.json" in result.stdout and "--guidance-schedule" in result.stdout


# -- the run object -----------------------------------------------------------------------------------------------


def test_linear_guidance_schedule_rises_from_one_to_the_scale():
    codes = torch.full((1, 16), 16)
    config = PDMGenerationConfig(guidance_scale=5.0, guidance_schedule="linear").resolved(tiny_config())
    run = StageRun(config, codes, torch.zeros_like(codes, dtype=torch.bool), 16)
    scales = [run.guidance_scale_at(stage) for stage in range(run.num_stages)]
    assert scales[0] == 1.0 and scales[-1] == 5.0 and scales == sorted(scales)
    constant = StageRun(dataclass_replace(config, guidance_schedule="constant"), codes, codes == -1, 16)
    assert {constant.guidance_scale_at(s) for s in range(4)} == {5.0}


def dataclass_replace(config, **changes):
    import dataclasses

    return dataclasses.replace(config, **changes)


def test_linear_guidance_differs_from_constant_guidance():
    ids, mask = prompts()
    model = tiny_model()
    linear = model.generate(ids, mask, guidance_scale=4.0, guidance_schedule="linear", generator=generators(2))
    constant = model.generate(ids, mask, guidance_scale=4.0, generator=generators(2))
    assert not torch.equal(linear, constant)


@pytest.mark.parametrize("num_stages", [1, 3, 4, 16])
def test_confidence_order_fills_the_schedule_and_batches_like_single_images(num_stages):
    model = tiny_model()
    ids, mask = prompts(3)
    out = model.generate(ids, mask, order="confidence", num_stages=num_stages, max_replacements=0,
                         generator=generators(3), return_stages=True)
    masked = (out.stages == model.config.mask_token_id).sum(-1)  # (batch, T)
    filled = 16 - masked
    expected = torch.tensor(stage_schedule(16, num_stages)).cumsum(0)
    assert (filled == expected).all()
    one_by_one = torch.cat([model.generate(ids[i:i + 1], mask[i:i + 1], order="confidence", num_stages=num_stages,
                                           max_replacements=0, generator=generators(1, seed=i)) for i in range(3)])
    assert torch.equal(out.codes, one_by_one)


def test_confidence_order_fills_the_most_probable_draws_first():
    """At the last stage the noise has annealed away: the fills are the masked positions whose drawn code is the most
    probable (here two positions where the logits are near-certain)."""
    config = PDMGenerationConfig(order="confidence", num_stages=2).resolved(tiny_config())
    codes = torch.full((1, 16), 16)
    run = StageRun(config, codes, codes == -1, 16, generator=torch.Generator().manual_seed(0))
    logits = torch.zeros(1, 16, 16)
    logits[0, 5, 3] = logits[0, 9, 7] = 50.0  # near-certain draws at positions 5 and 9
    drawn, chosen = run._most_confident(1, logits, codes == 16, torch.tensor([[2]]))
    assert chosen[0].nonzero().flatten().tolist() == [5, 9]
    assert drawn[0, 5] == 3 and drawn[0, 9] == 7


def test_callback_codes_continue_the_run():
    model = tiny_model()
    ids, mask = prompts(1)

    def fill_everything(stage, codes):
        return torch.full_like(codes, 5) if stage == 0 else None

    out = model.generate(ids, mask, num_stages=4, max_replacements=0, generator=generators(1), return_stages=True,
                         callback_on_stage_end=fill_everything)
    assert (out.codes == 5).all() and (out.stages == 5).all()
    with pytest.raises(ValueError, match="shape"):
        model.generate(ids, mask, num_stages=2, callback_on_stage_end=lambda stage, codes: codes[:, :3])


# -- text positions -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("where", [None, "input", "output"])
def test_text_position_embedding_makes_word_order_count(where, tmp_path):
    torch.manual_seed(0)
    model = PDMForTextToImage(tiny_config(text_position_embedding=where)).eval()
    ids = torch.tensor([[3, 4, 5, 6, 1], [3, 4, 6, 5, 1]])  # two words swapped
    with torch.no_grad():
        states = model.prompt_states(ids, torch.ones_like(ids))
    # The same word's state in the two prompts: a bag of words without positions (T5's untrained relative bias
    # hardly moves it), different words' states with them.
    similarity = torch.nn.functional.cosine_similarity(states[0, 2], states[1, 3], dim=0)
    assert (similarity > 0.95) if where is None else (similarity < 0.8)
    model.save_pretrained(tmp_path)
    loaded = PDMForTextToImage.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded.prompt_states(ids, torch.ones_like(ids)), states)


def test_a_prompt_longer_than_the_text_positions_is_an_error():
    model = PDMForTextToImage(tiny_config(text_position_embedding="input", max_text_positions=4)).eval()
    ids = torch.randint(3, 100, (1, 5))
    with pytest.raises(ValueError, match="max_text_positions"):
        model.generate(ids, num_stages=2)


def test_bad_text_position_embedding_is_refused():
    with pytest.raises(ValueError, match="text_position_embedding"):
        tiny_config(text_position_embedding="rotary")


# -- no host synchronisation inside the stage loop ---------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [{}, {"guidance_scale": 2.0}, {"order": "random"}, {"order": "confidence"},
                                    {"top_k": 4, "top_p": 0.9, "temperature": 0.7}])
def test_the_stage_loop_never_reads_back_to_the_host(kwargs):
    """What a run reads back happens before its first stage: the counts do not grow with the number of stages."""
    model = tiny_model()
    ids, mask = prompts(2)
    counts = {}
    for num_stages in (2, 8):
        with HostReads() as reads:
            model.generate(ids, mask, num_stages=num_stages, generator=generators(2), **kwargs)
        counts[num_stages] = reads.counts
    assert counts[2] == counts[8], counts


def test_host_reads_are_seen():
    """The counter sees the operators the stage loop must avoid (a test that can fail)."""
    with HostReads() as reads:
        torch.arange(5).nonzero()
        int(torch.tensor(3))
    assert reads.counts == {"aten::nonzero": 1, "aten::_local_scalar_dense": 1}
