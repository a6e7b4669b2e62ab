"""training/train_pdm.py end to end on a tiny model: two processes, resuming after a crash, NaN, options."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from train_data import TINY_OPTIONS, assert_same_final_weights, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = ("-m", "training.train_pdm")  # run as a module; PYTHONPATH=ROOT (see env) makes `training` importable

from training import data, loop, options
from training.train_pdm import Options


def env(**extra):
    return dict(os.environ, **extra, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pdm-data")
    path = folder / "tiny.yaml"
    options = dict(TINY_OPTIONS, dataset=make_dataset(str(folder / "data")), learning_rate=3e-3, order="raster")
    path.write_text(yaml.safe_dump(options))
    return str(path)


def run(args, timeout=300, launcher=(sys.executable,), **extra_env):
    return subprocess.run([*launcher, *SCRIPT, *args], env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def losses(output_dir):
    """step -> loss; a step logged twice (redone after a resume) keeps its last record."""
    with open(os.path.join(output_dir, "losses.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_two_processes_train_and_the_loss_goes_down(config, tmp_path):
    out = str(tmp_path / "run")
    # `--cpu --num_processes 2` starts one process (several CPU processes need mpirun); `--multi_gpu` with
    # ACCELERATE_USE_CPU=1 starts two that talk over gloo.
    launcher = (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
    result = run(["--config", config, "--output_dir", out, "--max_train_steps", "40", "--eval_steps", "40",
                  "--checkpointing_steps", "100", "--train_batch_size", "8"], launcher=launcher, ACCELERATE_USE_CPU="1")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.load(open(os.path.join(out, "processes", f"rank-{i}.json"))) for i in range(2)]
    assert [r["process_index"] for r in ranks] == [0, 1] and all(r["num_processes"] == 2 for r in ranks)
    curve = [losses(out)[s] for s in range(1, 41)]
    first, last = sum(curve[:8]) / 8, sum(curve[-8:]) / 8
    assert last < first - 0.1, f"loss did not go down: first {first:.3f}, last {last:.3f}"
    from progressive_denoising import PDMForTextToImage

    model = PDMForTextToImage.from_pretrained(os.path.join(out, "final"))
    assert model.config.training_order == "raster"
    assert model.config.token_loss_positions == Options.token_loss_positions  # the config records the rule used
    assert os.path.exists(os.path.join(out, "final", "README.md"))
    assert os.path.exists(os.path.join(out, "eval.jsonl"))


def test_resuming_after_a_kill_matches_an_uninterrupted_run(config, tmp_path):
    # With an EMA: the saved weights are the average, so a resume that lost or reset it would not match.
    common = ["--config", config, "--max_train_steps", "30", "--checkpointing_steps", "10", "--eval_steps", "1000",
              "--num_samples", "0", "--order", "random", "--p_error", "0.5", "--caption_dropout", "0.3",
              "--ema_decay", "0.9"]
    straight = str(tmp_path / "straight")
    assert run(common + ["--output_dir", straight]).returncode == 0

    crashed = str(tmp_path / "crashed")
    process = subprocess.Popen([sys.executable, *SCRIPT, *common, "--output_dir", crashed], env=env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not loop.checkpoints(crashed) and process.poll() is None:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    if process.returncode == 0:  # it finished before the kill landed: leave what a crash after step 10 leaves
        for name in os.listdir(crashed):
            if name in ("final", "checkpoint-20", "checkpoint-30"):
                subprocess.run(["rm", "-rf", os.path.join(crashed, name)], check=True)
    resumed = run(common + ["--output_dir", crashed, "--resume_from_checkpoint", "latest"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    assert_same_final_weights(straight, crashed)
    straight_curve, resumed_curve = losses(straight), losses(crashed)
    for step in range(11, 31):
        assert abs(straight_curve[step] - resumed_curve[step]) < 1e-6, step


def test_compiled_eager_training_resumes_and_saves_silently(config, tmp_path):
    """`torch_compile` (captions padded to a multiple of 16) with eager attention, the CPU recipe's fast path, saves
    and resumes; its checkpoints hold T5's tied embedding once, so no "removed shared tensor" warning; the main process
    shows a progress bar and a line per checkpoint."""
    common = ["--config", config, "--checkpointing_steps", "2", "--eval_steps", "1000", "--num_samples", "0",
              "--torch_compile", "true", "--attn_implementation", "eager"]
    out = str(tmp_path / "compiled")
    first = run(common + ["--output_dir", out, "--max_train_steps", "2"], timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    output = first.stderr + first.stdout
    assert "Removed shared tensor" not in output
    assert "step 2: saved" in output and "steps: 100%" in output  # the report line and the bar
    resumed = run(common + ["--output_dir", out, "--max_train_steps", "4", "--resume_from_checkpoint", "latest"],
                  timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert os.path.exists(os.path.join(out, "final", "model.safetensors"))


def test_checkpoints_load_with_warnings_as_errors(tmp_path):
    """A checkpoint of `save_state` with the tied copy left out loads back exactly and silently."""
    import warnings

    from accelerate import Accelerator

    from tiny import tiny_model

    model = tiny_model()
    accelerator = Accelerator(cpu=True)
    accelerator.register_save_state_pre_hook(loop.drop_tied_copies)
    optimizer = torch.optim.AdamW(model.parameters())
    model, optimizer = accelerator.prepare(model, optimizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        accelerator.save_state(str(tmp_path / "checkpoint"))
        saved = load_file(str(tmp_path / "checkpoint" / "model.safetensors"))
        assert "text_encoder.encoder.embed_tokens.weight" not in saved and "text_encoder.shared.weight" in saved
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.zero_()
        accelerator.load_state(str(tmp_path / "checkpoint"))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), name
    assert model.text_encoder.encoder.embed_tokens.weight is model.text_encoder.shared.weight


@pytest.mark.parametrize("mixed_precision, has_bf16, warned", [
    ("bf16", False, True), ("bf16", True, False), ("no", False, False)])
def test_bf16_on_a_cpu_without_bf16_arithmetic_is_named(mixed_precision, has_bf16, warned, monkeypatch, capsys):
    from types import SimpleNamespace

    monkeypatch.setattr(loop, "cpu_has_bf16", lambda: has_bf16)
    accelerator = SimpleNamespace(mixed_precision=mixed_precision, device=torch.device("cpu"),
                                  is_local_main_process=True)
    loop.warn_emulated_bf16(accelerator)
    assert ("mixed_precision bf16 on a CPU without bf16 arithmetic" in capsys.readouterr().out) == warned


def test_the_autoregressive_baseline_trains_through_the_same_script(config, tmp_path):
    out = str(tmp_path / "ar")
    result = run(["--config", config, "--output_dir", out, "--model_type", "ar", "--max_train_steps", "40",
                  "--eval_steps", "40", "--checkpointing_steps", "100", "--train_batch_size", "8"])
    assert result.returncode == 0, result.stderr[-3000:]
    curve = [losses(out)[s] for s in range(1, 41)]
    assert sum(curve[-8:]) / 8 < sum(curve[:8]) / 8 - 0.1, "the next-code loss did not go down"
    from transformers import AutoModel

    from progressive_denoising import PDMARForTextToImage

    model = AutoModel.from_pretrained(os.path.join(out, "final"))
    assert isinstance(model, PDMARForTextToImage)
    samples = json.load(open(os.path.join(out, "samples", "step-40.json")))
    assert torch.tensor(samples["codes"]).shape == (2, 16)


def test_order_and_stages_default_to_the_base_models(tmp_path):
    from tiny import tiny_model

    from training.train_pdm import fill_stage_options

    tiny_model(training_order="raster", num_stages=4).save_pretrained(tmp_path / "base")
    o = Options(dataset="d", model_name_or_path=str(tmp_path / "base"))
    fill_stage_options(o)
    assert (o.order, o.num_stages) == ("raster", 4)
    o = Options(dataset="d", model_name_or_path=str(tmp_path / "base"), order="random", num_stages=8)
    fill_stage_options(o)
    assert (o.order, o.num_stages) == ("random", 8)
    o = Options(dataset="d", text_config={})
    fill_stage_options(o)
    assert (o.order, o.num_stages) == ("quant-error", 64)
    tiny_model(training_order="learned").save_pretrained(tmp_path / "learned")
    with pytest.raises(ValueError, match="option 'order' is required: .* has the learned order"):
        fill_stage_options(Options(dataset="d", model_name_or_path=str(tmp_path / "learned")))


def test_a_batch_larger_than_the_data_set_is_named(config, tmp_path):
    result = run(["--config", config, "--output_dir", str(tmp_path / "big"), "--train_batch_size", "65"])
    assert result.returncode != 0
    assert "option 'train_batch_size': the 64 training examples fill no batch of 65 x 1 process(es)" in result.stderr


def test_a_nan_loss_stops_naming_the_step(config, tmp_path):
    out = str(tmp_path / "nan")
    result = run(["--config", config, "--output_dir", out, "--max_train_steps", "5", "--learning_rate", "1e30",
                  "--checkpointing_steps", "1", "--num_samples", "0"])
    assert result.returncode != 0
    assert "FloatingPointError: loss is nan at step 2" in result.stderr or "at step 2" in result.stderr, \
        result.stderr[-2000:]
    assert os.path.isdir(os.path.join(out, "checkpoint-1"))
    assert not os.path.exists(os.path.join(out, "checkpoint-2")), "no checkpoint of the failing step"


# -- options -----------------------------------------------------------------------------------------------------


def test_yaml_then_command_line_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("dataset: d\nlearning_rate: 3e-4\nema_decay: null\ntext_config: {d_model: 8}\n"
                    "max_train_steps: 5\norder: raster\ntoken_grid_size: [4, 4]\nlog_with: tensorboard\n")
    o = options.parse_options(Options, ["--config", str(path), "--max_train_steps", "7", "order=random",
                                        "--ema_decay=0.99", "--hub_model_id", "me/1e5", "--push_to_hub",
                                        "--log-with", "null", "train_batch_size=3"])
    assert (o.dataset, o.learning_rate, o.max_train_steps, o.order) == ("d", 3e-4, 7, "random")
    assert o.ema_decay == 0.99 and o.hub_model_id == "me/1e5" and o.push_to_hub is True
    assert o.text_config == {"d_model": 8} and o.token_grid_size == [4, 4]
    assert o.log_with is None and o.train_batch_size == 3
    # a mapping on the command line is YAML; an option that may be None takes null
    o = options.parse_options(Options, ["--text_config", "{d_model: 16, num_layers: 2}", "snapshot_steps=null",
                                        "--token_grid_size", "2", "8"])
    assert o.text_config == {"d_model": 16, "num_layers": 2} and o.snapshot_steps is None
    assert o.token_grid_size == [2, 8]


def test_bad_options_raise_value_errors_naming_them(tmp_path):
    with pytest.raises(ValueError, match="unknown option 'lerning_rate'; did you mean 'learning_rate'"):
        options.parse_options(Options, ["--lerning_rate", "1"])
    with pytest.raises(ValueError, match="max_train_steps.*'many'"):
        options.parse_options(Options, ["--max_train_steps", "many"])
    with pytest.raises(ValueError, match="cannot read command-line argument 'stray'"):
        options.parse_options(Options, ["stray"])
    path = tmp_path / "c.yaml"
    path.write_text("dataset: d\nlerning_rate: 1\n")
    with pytest.raises(ValueError, match=f"unknown option 'lerning_rate' in {path}; did you mean 'learning_rate'"):
        options.parse_options(Options, ["--config", str(path)])
    path.write_text("dataset: d\nmax_train_steps: [1]\n")
    with pytest.raises(ValueError, match="'max_train_steps' must be of type int"):
        options.parse_options(Options, ["--config", str(path)])
    from training.train_pdm import check_options

    with pytest.raises(ValueError, match="'order'"):
        check_options(Options(dataset="d", text_config={}, order="learned"))
    with pytest.raises(ValueError, match="'p_error'"):
        check_options(Options(dataset="d", text_config={}, p_error=2.0))
    with pytest.raises(ValueError, match="model_name_or_path"):
        check_options(Options(dataset="d"))
    with pytest.raises(ValueError, match="'model_type'"):
        check_options(Options(dataset="d", text_config={}, model_type="gpt"))
    with pytest.raises(ValueError, match="'token_loss_positions'"):
        check_options(Options(dataset="d", text_config={}, token_loss_positions="everywhere"))
    with pytest.raises(ValueError, match="'random_mask_share' must be below 1"):
        check_options(Options(dataset="d", text_config={}, random_mask_share=1.0))
    with pytest.raises(ValueError, match="'text_position_embedding'"):
        check_options(Options(dataset="d", text_config={}, text_position_embedding="both"))
    with pytest.raises(ValueError, match="'attn_implementation'"):
        check_options(Options(dataset="d", text_config={}, attn_implementation="flash"))


@pytest.mark.parametrize("argv, new", [(["--max_steps", "7"], "--max_train_steps"),
                                       (["batch_size=4"], "--train_batch_size"),
                                       (["--batch-size", "4"], "--train_batch_size"),
                                       (["--output", "o"], "--output_dir")])
def test_old_spellings_name_the_new_one(argv, new, tmp_path):
    with pytest.raises(ValueError, match=f"option --{argv[0].lstrip('-').split('=')[0].replace('-', '_')} is now "
                                         f"{new}$"):
        options.parse_options(Options, argv)
    path = tmp_path / "c.yaml"
    path.write_text("max_steps: 7\n")
    with pytest.raises(ValueError, match=f"option 'max_steps' in {path} is now 'max_train_steps'"):
        options.parse_options(Options, ["--config", str(path)])


def test_cached_text_states_give_the_same_loss_as_the_encoder():
    from tiny import CAPTIONS, tiny_model, tiny_tokenizer

    model, tokenizer = tiny_model(), tiny_tokenizer()
    captions = [CAPTIONS[0], "", CAPTIONS[7]]
    image_tokens = torch.full((3, 16), 16)
    direct = model(**data.TextStates(tokenizer, 64)(model, captions, "cpu"), image_tokens=image_tokens)
    cache = data.TextStates(tokenizer, 64, cache=True)
    cache(model, captions[:1], "cpu")  # cached alone, reused in a padded batch
    cached = model(**cache(model, captions, "cpu"), image_tokens=image_tokens)
    torch.testing.assert_close(direct.token_logits, cached.token_logits, rtol=1e-4, atol=1e-5)
    assert tokenizer("").input_ids == [1]  # caption dropout's empty prompt is the lone </s>


def test_known_regions_are_boxes_or_their_complements_on_the_asked_share():
    generator = torch.Generator().manual_seed(0)
    known = data.known_regions(2000, (4, 5), 0.5, generator)
    assert known.shape == (2000, 20)
    assert 0.45 < known.any(-1).float().mean().item() < 0.55  # an inpainting box can cover all: then nothing is known
    for row in known[known.any(-1)][:200]:
        grid = row.view(4, 5)
        for candidate in (grid, ~grid):  # the known codes, or the others, form an axis-aligned box
            ys, xs = candidate.nonzero(as_tuple=True)
            if len(ys) and candidate[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1].all():
                break
        else:
            raise AssertionError(f"neither the known codes nor the others form a box:\n{grid.int()}")
    assert not data.known_regions(100, (4, 5), 0.0, generator).any()
