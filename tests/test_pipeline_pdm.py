"""PDMPipeline as a diffusers `DiffusionPipeline`: save/load, `to()`, progress bar, CPU offload, output types, stages,
callbacks, argument errors, model card; the `pdm generate` command. Loading without the package: test_remote_code.py."""

import json
import pathlib
import shutil
import subprocess
import sys
import types

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard

from progressive_denoising import PDMForTextToImage, PDMPipeline
from progressive_denoising import pipeline_pdm
from progressive_denoising.cli import main as pdm_main

from tiny import tiny_model, tiny_tokenizer, tiny_vqmodel


@pytest.fixture(scope="module")
def pipe():
    pipeline = PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def saved(pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    pipe.save_pretrained(folder)
    return folder


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def fresh_pipe():
    pipeline = PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_is_a_diffusion_pipeline(pipe):
    assert isinstance(pipe, DiffusionPipeline)
    assert set(pipe.components) == {"tokenizer", "model", "vqvae"}
    assert pipe.model_cpu_offload_seq == "model->vqvae"
    assert pipe.device == torch.device("cpu")


def test_round_trip_through_save_and_load(pipe, saved):
    index = json.loads((saved / "model_index.json").read_text())
    # the saved copies of the code, so that the folder loads without this package (test_remote_code.py)
    assert index["_class_name"] == ["pipeline_pdm", "PDMPipeline"]
    assert index["model"] == ["modeling_pdm", "PDMForTextToImage"] and index["vqvae"] == ["diffusers", "VQModel"]
    loaded = PDMPipeline.from_pretrained(str(saved))
    # this package's classes, not the folder's copies: no trust_remote_code needed
    assert type(loaded) is PDMPipeline and type(loaded.model) is PDMForTextToImage
    loaded.set_progress_bar_config(disable=True)
    prompt = ["a small red circle", "a large blue square left of a small blue square"]
    before = pipe(prompt, num_inference_steps=4, generator=gens(2), output_type="codes").images
    after = loaded(prompt, num_inference_steps=4, generator=gens(2), output_type="codes").images
    assert torch.equal(before, after)
    images = loaded(prompt, num_inference_steps=4, generator=gens(2)).images
    assert len(images) == 2 and all(isinstance(i, PIL.Image.Image) and i.size == (16, 16) for i in images)


def test_output_types(pipe):
    prompt = ["a small red circle", "a large green triangle"]
    as_np, as_pt, codes = (pipe(prompt, num_inference_steps=2, generator=gens(2), output_type=output_type).images
                           for output_type in ("np", "pt", "codes"))
    assert as_np.shape == (2, 16, 16, 3) and as_np.min() >= 0 and as_np.max() <= 1
    assert as_pt.shape == (2, 3, 16, 16)
    np.testing.assert_allclose(as_pt.permute(0, 2, 3, 1).numpy(), as_np, atol=1e-6)
    assert codes.shape == (2, 16) and codes.dtype == torch.long


def test_folders_saved_without_code_still_load(saved, tmp_path):
    """The layout written before pipelines carried their code (runs/ holds such folders)."""
    shutil.copytree(saved, tmp_path, dirs_exist_ok=True)
    (tmp_path / "pipeline_pdm.py").unlink()
    (tmp_path / "model_index.json").write_text(json.dumps({
        "_class_name": "PDMPipeline", "tokenizer": ["transformers", "T5Tokenizer"],
        "model": ["progressive_denoising", "PDMForTextToImage"], "vqvae": ["diffusers", "VQModel"],
    }))
    loaded = PDMPipeline.from_pretrained(str(tmp_path))
    assert type(loaded.model) is PDMForTextToImage
    loaded.set_progress_bar_config(disable=True)
    assert loaded("a small red circle", num_inference_steps=2, output_type="codes").images.shape == (1, 16)


def test_from_pretrained_takes_dtype(saved):
    loaded = PDMPipeline.from_pretrained(str(saved), dtype=torch.float64)
    assert loaded.model.dtype == torch.float64 and loaded.vqvae.dtype == torch.float64
    loaded = PDMPipeline.from_pretrained(str(saved), dtype={"model": torch.bfloat16, "default": torch.float64})
    assert loaded.model.dtype == torch.bfloat16 and loaded.vqvae.dtype == torch.float64


def test_from_pretrained_takes_a_component(saved):
    model = tiny_model(seed=5)
    loaded = PDMPipeline.from_pretrained(str(saved), model=model)
    assert loaded.model is model


def test_to_moves_and_casts_every_model():
    pipeline = fresh_pipe()
    assert pipeline.to(torch.float64) is pipeline
    assert pipeline.model.dtype == torch.float64 and pipeline.vqvae.dtype == torch.float64
    images = pipeline("a small red circle", num_inference_steps=2, generator=gens(1), output_type="pt").images
    assert images.dtype == torch.float64 and images.shape == (1, 3, 16, 16)
    assert pipeline.to("cpu").device == torch.device("cpu")


def test_progress_bar_counts_stages_and_can_be_disabled(capsys):
    pipeline = fresh_pipe()
    pipeline.set_progress_bar_config(disable=False, desc="stages")
    capsys.readouterr()
    pipeline("a small red circle", num_inference_steps=4, generator=gens(1), output_type="codes")
    err = capsys.readouterr().err
    assert "stages" in err and "4/4" in err
    pipeline.set_progress_bar_config(disable=True)
    pipeline("a small red circle", num_inference_steps=4, generator=gens(1), output_type="codes")
    assert "4/4" not in capsys.readouterr().err


def test_model_cpu_offload_runs_each_model_through_its_hook():
    """`generate` and the codebook lookup are no `forward`: the pipeline must still trigger the offload hooks, in
    `model_cpu_offload_seq` order (on CPU the hooks move nothing, so this checks they run)."""
    pipeline = fresh_pipe()
    expected = pipeline("a small red circle", num_inference_steps=4, generator=gens(1), output_type="np").images
    pipeline.enable_model_cpu_offload(device="cpu")
    calls = []

    def recording(name, pre_forward):
        def pre_forward_and_record(module, *args, **kwargs):
            calls.append(name)
            return pre_forward(module, *args, **kwargs)

        return pre_forward_and_record

    for name in ("model", "vqvae"):
        hook = getattr(pipeline, name)._hf_hook
        hook.pre_forward = recording(name, hook.pre_forward)
    images = pipeline("a small red circle", num_inference_steps=4, generator=gens(1), output_type="np").images
    assert calls and calls[0] == "model" and "vqvae" in calls
    np.testing.assert_array_equal(images, expected)


def test_stages_and_callback(pipe):
    seen = []

    def callback(pipeline, step, timestep, callback_kwargs):
        assert pipeline is pipe and step == timestep and pipeline.num_timesteps == 4
        seen.append((step, callback_kwargs["codes"].clone()))
        return {}

    out = pipe("a small red circle", num_inference_steps=4, generator=gens(1), return_stages=True,
               callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["codes"])
    assert [s for s, _ in seen] == [0, 1, 2, 3]
    assert len(out.stages) == 4 and all(len(images) == 1 for images in out.stages)
    assert np.array_equal(np.asarray(out.stages[-1][0]), np.asarray(out.images[0]))
    # cells not generated yet are painted grey (0.5) in early stages
    first = np.asarray(out.stages[0][0])
    assert (first == 128).all(axis=-1).any()
    codes = pipe("a small red circle", num_inference_steps=4, generator=gens(1), return_stages=True, output_type="codes")
    assert codes.stages.shape == (1, 4, 16)
    assert torch.equal(codes.stages[:, 1], seen[1][1])
    # masked cells count down stage by stage, to none after the last
    masked = [int((c == pipe.model.config.mask_token_id).sum()) for _, c in seen]
    assert masked == sorted(masked, reverse=True) and masked[-1] == 0 and masked[0] > 0


def test_callback_on_step_end_can_set_the_codes_the_next_stage_starts_from(pipe):
    def fill_everything(pipeline, step, timestep, callback_kwargs):
        return {"codes": torch.full_like(callback_kwargs["codes"], 5)} if step == 0 else {}

    out = pipe("a small red circle", num_inference_steps=4, generator=gens(1), max_replacements=0,
               output_type="codes", return_stages=True, callback_on_step_end=fill_everything)
    # nothing masked is left after stage 0 and nothing may be replaced: every later stage keeps the callback's codes
    assert (out.images == 5).all() and (out.stages == 5).all()


def test_pipeline_callback_objects_are_accepted(pipe):
    from diffusers.callbacks import PipelineCallback

    class Recorder(PipelineCallback):
        tensor_inputs = ["codes"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.steps = getattr(self, "steps", []) + [step_index]
            return callback_kwargs

    recorder = Recorder()
    pipe("a small red circle", num_inference_steps=3, generator=gens(1), output_type="codes",
         callback_on_step_end=recorder)
    assert recorder.steps == [0, 1, 2]


def test_callback_on_stage_end_still_works_but_is_deprecated(pipe):
    seen = []
    with pytest.warns(FutureWarning, match="callback_on_step_end"):
        pipe("a small red circle", num_inference_steps=3, generator=gens(1), output_type="codes",
             callback_on_stage_end=lambda pipeline, stage, codes: seen.append(stage))
    assert seen == [0, 1, 2]


def test_num_images_per_prompt_and_negative_prompt(pipe):
    out = pipe(["a small red circle", "a large green triangle"], negative_prompt="a small blue square",
               guidance_scale=3.0, num_images_per_prompt=2, generator=gens(4), output_type="codes")
    assert out.images.shape == (4, 16)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(prompt=[]), "prompt"),
        (dict(prompt=["ok", 3]), "prompt"),
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=17), "num_inference_steps"),
        (dict(prompt=["a", "b"], negative_prompt=["x", "y", "z"]), "negative_prompt"),
        (dict(order="spiral"), "order"),
        (dict(output_type="jpeg"), "output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(generator=gens(3)), "generator"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_arguments_name_the_argument(pipe, kwargs, name):
    kwargs = dict(dict(prompt="a small red circle", num_inference_steps=2), **kwargs)
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


def test_codebook_mismatch_is_an_error():
    with pytest.raises(ValueError, match="codebook_size"):
        PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel(num_codes=32))


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(OSError, match="model_index.json"):
        PDMPipeline.from_pretrained(str(tmp_path))


def test_push_to_hub_writes_a_model_card_and_uploads_the_folder(tmp_path, monkeypatch):
    uploaded = {}
    monkeypatch.setattr(pipeline_pdm, "create_repo", lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(
        PDMPipeline, "_upload_folder",
        lambda self, folder, repo_id, **kwargs: uploaded.update(
            repo_id=repo_id, files={str(p.relative_to(folder)) for p in pathlib.Path(folder).rglob("*") if p.is_file()}
        ),
    )
    folder = tmp_path / "pdm-tiny"
    fresh_pipe().save_pretrained(str(folder), push_to_hub=True, repo_id="someone/pdm-tiny")
    assert uploaded["repo_id"] == "someone/pdm-tiny"
    assert {"README.md", "model_index.json", "pipeline_pdm.py", "model/modeling_pdm.py"} <= uploaded["files"]
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-image"
    assert {"progressive-denoising", "pdm", "custom_code"} <= set(card.data.tags)
    snippet = 'DiffusionPipeline.from_pretrained(snapshot_download("someone/pdm-tiny"), trust_remote_code=True)'
    assert snippet in card.text


def test_push_to_hub_keeps_the_card_already_in_the_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline_pdm, "create_repo", lambda repo_id, **kwargs: types.SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(PDMPipeline, "_upload_folder", lambda self, *args, **kwargs: None)
    folder = tmp_path / "trained"
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\ntags:\n- pdm\n---\n\n# A trained PDM\n")
    fresh_pipe().save_pretrained(str(folder), push_to_hub=True, repo_id="someone/trained")
    card = ModelCard.load(folder / "README.md")
    assert "# A trained PDM" in card.text and card.data.license == "mit"
    assert card.data.tags.count("pdm") == 1 and "custom_code" in card.data.tags


def test_pdm_generate_command(saved, tmp_path):
    out, strip = tmp_path / "out.png", tmp_path / "stages.png"
    code = pdm_main(["generate", "a small red circle", "--model", str(saved), "--steps", "4", "--seed", "1",
                     "--out", str(out), "--stages-out", str(strip), "--num-stages-shown", "4"])
    assert code == 0
    assert PIL.Image.open(out).size == (16, 16)
    assert PIL.Image.open(strip).size == (64, 16)
    again = tmp_path / "again.png"
    pdm_main(["generate", "a small red circle", "--model", str(saved), "--steps", "4", "--seed", "1", "--out", str(again)])
    assert np.array_equal(np.asarray(PIL.Image.open(out)), np.asarray(PIL.Image.open(again)))


def test_pdm_help_lists_commands():
    result = subprocess.run([sys.executable, "-m", "progressive_denoising.cli", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "generate" in result.stdout and "tokenize" in result.stdout
    assert subprocess.run([sys.executable, "-m", "progressive_denoising.cli", "nope"], capture_output=True).returncode == 2


def test_loading_arguments_reach_the_model(tmp_path, monkeypatch):
    """diffusers applies every loading argument to every component: a variant saved is loaded back, and `variant`,
    `use_safetensors`, `low_cpu_mem_usage`, `device_map` and `dtype` reach the model as they reach the VQ model."""
    from transformers import AutoModel

    pipe = PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())
    pipe.save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "model" / "model.fp16.safetensors").is_file()
    loaded = PDMPipeline.from_pretrained(tmp_path, variant="fp16", dtype=torch.bfloat16)
    assert loaded.model.dtype == torch.bfloat16 and loaded.vqvae.dtype == torch.bfloat16
    for name, tensor in pipe.model.state_dict().items():
        torch.testing.assert_close(loaded.model.state_dict()[name].float(), tensor.to(torch.bfloat16).float())

    seen = {}
    original = AutoModel.from_pretrained

    def recording(*args, **kwargs):
        seen.update(kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", recording)
    PDMPipeline.from_pretrained(tmp_path, variant="fp16", use_safetensors=True, low_cpu_mem_usage=True,
                                device_map="cpu")
    assert {"variant": "fp16", "use_safetensors": True, "low_cpu_mem_usage": True, "device_map": "cpu"}.items() \
        <= seen.items()
