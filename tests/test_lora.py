"""LoRA adapters with peft (issue 25 item 1): the model's adapter methods, the pipeline's `load_lora_weights` family,
`pdm generate --lora`, and `train_pdm --use_lora` (adapter only, resumed exactly). Tiny models; nothing downloads."""

import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("peft")

from progressive_denoising import PDMForTextToImage, PDMPipeline
from progressive_denoising.cli import main as pdm_main
from progressive_denoising.lora import LORA_WEIGHT_NAME, lora_config

from tiny import CAPTIONS, tiny_model, tiny_tokenizer, tiny_vqmodel
from train_data import TINY_OPTIONS, make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompts(batch=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, 100, (batch, 6), generator=generator)


def codes(model, seed=0, **kwargs):
    return model.generate(prompts(), generator=torch.Generator().manual_seed(seed), **kwargs)


def logits(model):
    image_tokens = torch.randint(17, (4, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(input_ids=prompts(), image_tokens=image_tokens).token_logits


def fine_tune(model, steps=20, lr=0.05, seed=0):
    """A few AdamW steps on the adapter alone, towards fixed target codes: enough to move the generated codes."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    targets = torch.randint(16, (4, 16), generator=generator)
    for _ in range(steps):
        masked = torch.rand(4, 16, generator=generator) < 0.7
        image_tokens = targets.masked_fill(masked, model.config.mask_token_id)
        labels = targets.masked_fill(~masked, -100)
        loss = model(input_ids=prompts(), image_tokens=image_tokens, token_labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def tuned():
    """(base codes, a tiny model with a fine-tuned adapter `a` on decoder and T5, its codes)."""
    model = tiny_model()
    base = codes(model)
    model.add_adapter(lora_config(r=4, text_encoder=True), adapter_name="a")
    assert torch.equal(codes(model), base)  # B starts at zero: a fresh adapter changes nothing
    fine_tune(model)
    return base, model, codes(model)


def test_only_adapter_weights_train_and_the_codes_change(tuned):
    base, model, adapted = tuned
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert any(n.startswith("text_encoder.") for n in trainable)  # the T5 adapter got gradients too
    assert any(".mlp.0." in n for n in trainable) and any("cross_attn.k_proj" in n for n in trainable)
    assert not any("token_head" in n or "state_head" in n for n in trainable)
    assert (adapted != base).float().mean() > 0.1
    fresh = tiny_model()  # the wrapped base weights did not move
    weights = {n.replace(".base_layer", ""): p for n, p in model.named_parameters() if "lora_" not in n}
    for name, parameter in fresh.named_parameters():
        assert torch.equal(weights[name], parameter), name


def test_disable_adapters_gives_the_base_codes_bit_for_bit(tuned):
    base, model, adapted = tuned
    model.disable_adapters()
    try:
        assert torch.equal(codes(model), base)
    finally:
        model.enable_adapters()
    assert torch.equal(codes(model), adapted)
    assert model.active_adapters() == ["a"]


def test_saved_adapter_reloads_to_the_same_codes(tuned, tmp_path):
    _, model, adapted = tuned
    path = model.save_lora_adapter(tmp_path, base_model="tiny")
    assert os.path.basename(path) == LORA_WEIGHT_NAME
    weights = load_file(path)
    assert all(".lora_" in key for key in weights) and os.path.getsize(path) < 100_000  # no base weights
    other = tiny_model()
    assert other.load_lora_adapter(tmp_path) == "default_0"
    assert torch.equal(codes(other), adapted)
    assert torch.equal(logits(other), logits(model))


def test_fused_adapter_gives_the_unfused_codes(tuned):
    _, model, adapted = tuned
    unfused = logits(model)
    model.fuse_lora()
    try:
        torch.testing.assert_close(logits(model), unfused, rtol=1e-5, atol=1e-5)
        assert torch.equal(codes(model), adapted)
    finally:
        model.unfuse_lora()
    torch.testing.assert_close(logits(model), unfused, rtol=1e-5, atol=1e-5)


def test_unload_gives_the_base_model_back(tuned, tmp_path):
    base, model, _ = tuned
    model.save_lora_adapter(tmp_path)
    copy = tiny_model()
    copy.load_lora_adapter(tmp_path, adapter_name="x")
    copy.unload_lora()
    assert not hasattr(copy, "peft_config") and copy.active_adapters() == []
    assert type(copy.decoder.layers[0].self_attn.q_proj) is torch.nn.Linear
    assert set(copy.state_dict()) == set(tiny_model().state_dict())
    assert torch.equal(codes(copy), base)


def test_adapter_scale_and_two_adapters(tuned, tmp_path):
    base, model, adapted = tuned
    model.save_lora_adapter(tmp_path)
    copy = tiny_model()
    copy.load_lora_adapter(tmp_path, adapter_name="x")
    copy.set_adapters("x", 0.0)
    assert torch.equal(codes(copy), base)
    copy.add_adapter(lora_config(r=2), adapter_name="y")  # zero-initialised: adds nothing
    copy.set_adapters(["x", "y"], [1.0, 1.0])
    assert torch.equal(codes(copy), adapted)
    copy.delete_adapters("y")
    assert list(copy.peft_config) == ["x"]
    with pytest.raises(ValueError, match="no adapter named 'z'"):
        copy.set_adapter("z")


def one_line_error(excinfo, path):
    message = str(excinfo.value)
    assert "\n" not in message and str(path) in message, message
    return message


def test_adapter_of_another_base_model_is_a_one_line_error_naming_the_file(tmp_path):
    wider = tiny_model(hidden_size=48, intermediate_size=96)
    wider.add_adapter(lora_config(r=4))
    path = wider.save_lora_adapter(tmp_path / "wider")
    model = tiny_model()
    with pytest.raises(ValueError) as excinfo:
        model.load_lora_adapter(path)
    assert "other base model" in one_line_error(excinfo, path)
    assert not hasattr(model, "peft_config")  # nothing was added

    deeper = tiny_model(num_hidden_layers=3)
    deeper.add_adapter(lora_config(r=4))
    path = deeper.save_lora_adapter(tmp_path / "deeper")
    with pytest.raises(ValueError) as excinfo:
        model.load_lora_adapter(path)
    assert "decoder.layers.2" in one_line_error(excinfo, path)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty", "no-lora"])
def test_damaged_adapter_file_is_a_one_line_error_naming_it(tuned, tmp_path, damage):
    _, model, _ = tuned
    path = model.save_lora_adapter(tmp_path)
    data = open(path, "rb").read()
    if damage == "no-lora":
        from safetensors.torch import save_file

        save_file({"weight": torch.zeros(2)}, path)
    else:
        open(path, "wb").write({"truncated": data[: len(data) // 2], "garbage": b"\x07" * 100, "empty": b""}[damage])
    with pytest.raises(ValueError) as excinfo:
        tiny_model().load_lora_adapter(path)
    one_line_error(excinfo, path)
    with pytest.raises(ValueError) as excinfo:
        tiny_model().load_lora_adapter(tmp_path / "missing.safetensors")
    one_line_error(excinfo, tmp_path / "missing.safetensors")


# -- the pipeline and the command ----------------------------------------------------------------------------------


def pipeline():
    pipe = PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipe_codes(pipe, **kwargs):
    return pipe(["a small red circle", "a large blue square"], output_type="codes",
                generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.fixture(scope="module")
def adapter_folder(tuned, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    tuned[1].save_lora_adapter(folder)
    return folder


def test_pipeline_lora_methods(adapter_folder, tmp_path):
    pipe = pipeline()
    base = pipe_codes(pipe)
    name = pipe.load_lora_weights(adapter_folder, adapter_name="shapes")
    assert name == "shapes" and pipe.get_active_adapters() == ["shapes"]
    adapted = pipe_codes(pipe)
    assert not torch.equal(adapted, base)
    pipe.disable_lora()
    assert torch.equal(pipe_codes(pipe), base)
    pipe.enable_lora()
    pipe.fuse_lora()
    assert torch.equal(pipe_codes(pipe), adapted)
    pipe.unfuse_lora()
    path = pipe.save_lora_weights(tmp_path)
    assert load_file(path).keys() == load_file(os.path.join(adapter_folder, LORA_WEIGHT_NAME)).keys()
    pipe.set_adapters("shapes", 0.0)
    assert torch.equal(pipe_codes(pipe), base)
    pipe.unload_lora_weights()
    assert torch.equal(pipe_codes(pipe), base)
    other = pipeline()
    other.load_lora_weights(path, weight=1.0)
    assert torch.equal(pipe_codes(other), adapted)


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipeline")
    pipeline().save_pretrained(folder)
    return folder


def test_pdm_generate_lora_flags(saved_pipeline, adapter_folder, tmp_path, capsys):
    common = ["generate", "a small red circle", "--model", str(saved_pipeline), "--steps", "4", "--seed", "1"]
    outputs = {}
    for name, extra in [("base", []), ("lora", ["--lora", str(adapter_folder)]),
                        ("zero", ["--lora", str(adapter_folder / LORA_WEIGHT_NAME), "--lora-scale", "0"])]:
        outputs[name] = tmp_path / f"{name}.png"
        assert pdm_main(common + extra + ["--out", str(outputs[name])]) == 0
    read = lambda name: outputs[name].read_bytes()
    assert read("base") != read("lora") and read("base") == read("zero")

    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x00" * 40)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        pdm_main(common + ["--lora", str(broken), "--out", str(tmp_path / "x.png")])
    assert exit.value.code == 1
    err = capsys.readouterr().err.strip()
    assert str(broken) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit) as exit:
        pdm_main(common + ["--lora-scale", "0.5", "--out", str(tmp_path / "y.png")])
    assert exit.value.code == 2
    assert "--lora-scale" in capsys.readouterr().err


# -- train_pdm --use_lora ------------------------------------------------------------------------------------------


def run_train(args, timeout=300):
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.run([sys.executable, "-m", "training.train_pdm", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-train")
    base = str(folder / "base")
    model = tiny_model()
    model.save_pretrained(base)
    tiny_tokenizer().save_pretrained(base)
    return base, make_dataset(str(folder / "data"))


def test_train_pdm_use_lora_saves_the_adapter_alone_and_resumes_exactly(base_and_data, tmp_path):
    base, dataset = base_and_data
    sizes = {k: v for k, v in TINY_OPTIONS.items() if k not in ("train_tokenizer", "tokenizer_vocab_size",
                                                                  "text_config")}
    common = ["--dataset", dataset, "--model_name_or_path", base, "--use_lora", "true", "--lora_r", "4",
              "--lora_text_encoder", "true", "--max_train_steps", "6", "--checkpointing_steps", "3",
              "--eval_steps", "1000", "--num_samples", "0", "--learning_rate", "1e-2", "--order", "random",
              "--train_batch_size", "8", "--log_with", "null"]
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "num_stages"):
        common += [f"--{key}", str(sizes[key])]
    straight = str(tmp_path / "straight")
    result = run_train(common + ["--output_dir", straight])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trainable parameters" in result.stdout
    final = os.path.join(straight, "final")
    assert sorted(os.listdir(final)) == ["README.md", LORA_WEIGHT_NAME]
    card = open(os.path.join(final, "README.md")).read()
    assert base in card and "A LoRA adapter of a PDM trained" in card  # the card names the base model
    assert "`hidden_size`" not in card and "`lora_r` | `4`" in card  # the base's sizes, not the ignored defaults
    adapter = load_file(os.path.join(final, LORA_WEIGHT_NAME))
    assert all(".lora_" in key for key in adapter) and any(k.startswith("text_encoder.") for k in adapter)

    # A run stopped after checkpoint-3 and resumed from it ends with the same adapter.
    resumed = str(tmp_path / "resumed")
    os.makedirs(resumed)
    shutil.copytree(os.path.join(straight, "checkpoint-3"), os.path.join(resumed, "checkpoint-3"))
    result = run_train(common + ["--output_dir", resumed, "--resume_from_checkpoint", "latest"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from" in result.stdout
    again = load_file(os.path.join(resumed, "final", LORA_WEIGHT_NAME))
    assert again.keys() == adapter.keys()
    for key in adapter:
        torch.testing.assert_close(again[key], adapter[key], rtol=0, atol=1e-6, msg=key)

    # The adapter changes what the base model generates, and the base model's folder is untouched.
    model = PDMForTextToImage.from_pretrained(base)
    before = codes(model)
    model.load_lora_adapter(final)
    assert not torch.equal(codes(model), before)
    assert torch.equal(codes(PDMForTextToImage.from_pretrained(base)), before)


def test_train_pdm_lora_options_are_checked(base_and_data, tmp_path):
    base, dataset = base_and_data
    result = run_train(["--dataset", dataset, "--text_config", "{d_model: 32}", "--use_lora", "true",
                        "--output_dir", str(tmp_path / "x")])
    assert result.returncode == 2 and "model_name_or_path" in result.stderr


def test_a_model_with_adapters_is_not_saved_whole_by_mistake(tuned, tmp_path):
    base, model, adapted = tuned
    with pytest.raises(ValueError, match="save_lora_adapter"):
        model.save_pretrained(tmp_path / "whole")
    merged = tiny_model()
    merged.load_lora_adapter(model.save_lora_adapter(tmp_path / "adapter"))
    merged.fuse_lora()
    merged.unload_lora()  # the adapter stays in the weights: a plain model that saves and loads as any other
    merged.save_pretrained(tmp_path / "merged")
    torch.testing.assert_close(logits(PDMForTextToImage.from_pretrained(tmp_path / "merged")), logits(model),
                               rtol=1e-4, atol=1e-4)


def test_fuse_at_a_scale_equals_the_adapter_at_that_weight_and_unfuses_back(tuned, tmp_path):
    _, model, _ = tuned
    copy = tiny_model()
    copy.load_lora_adapter(model.save_lora_adapter(tmp_path), adapter_name="x")
    unfused = logits(copy)
    copy.set_adapters("x", 0.5)
    half = logits(copy)
    copy.set_adapters("x", 1.0)
    copy.fuse_lora(lora_scale=0.5)
    torch.testing.assert_close(logits(copy), half, rtol=1e-5, atol=1e-5)
    copy.unfuse_lora()
    torch.testing.assert_close(logits(copy), unfused, rtol=1e-5, atol=1e-5)
