"""benchmarks/lora_example.py end to end on a tiny pipeline: adaptation data tokenized with the pipeline's VQ model,
an adapter trained by train_pdm, and the three arms scored, the disabled adapter giving the base model's codes."""

import json
import os

import pytest
from datasets import load_from_disk
from safetensors.torch import load_file

pytest.importorskip("peft")

from benchmarks import lora_example
from progressive_denoising import PDMPipeline
from progressive_denoising.lora import LORA_WEIGHT_NAME
from progressive_denoising.pdm_shapes import data as shapes_data
from training.train_recogniser import recogniser_training_data, train_recogniser

from tiny import tiny_model, tiny_tokenizer, tiny_vqmodel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_example_trains_an_adapter_and_scores_three_arms(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # train_pdm runs as `python -m training.train_pdm`
    shapes_data.make_shapes_dataset(4, seed=3, size=16, num_validation=2, num_test=6).save_to_disk(tmp_path / "data")
    recogniser = train_recogniser(recogniser_training_data(32, seed=0, size=16), 2, batch_size=16, lr=3e-3,
                                  channels=(8, 16), hidden=16, seed=0)
    recogniser.save_pretrained(tmp_path / "recogniser")
    PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel()).save_pretrained(tmp_path / "pipe")

    lora_example.main(["--model", str(tmp_path / "pipe"), "--recogniser", str(tmp_path / "recogniser"),
                       "--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"), "--out",
                       str(tmp_path / "out"), "--num-new", "16", "--num-replay", "16", "--steps", "4",
                       "--learning-rate", "0.05", "--lora-r", "2", "--num-prompts", "6", "--batch-size", "4"])

    data = load_from_disk(str(tmp_path / "work" / "data"))["train"]
    held_out = [shapes_data.has_held_out_pair(shapes_data.parse_caption(c)["objects"]) for c in data["caption"]]
    assert held_out[:16] == [True] * 16 and not any(held_out[16:])  # new pairs, then the replayed ordinary ones
    assert all(len(codes) == 16 and max(codes) < 16 for codes in data["codes"])
    result = json.loads((tmp_path / "out" / "lora-example.json").read_text())
    assert list(result["rows"]) == ["base model (untouched)", "with the LoRA adapter", "adapter loaded, disabled"]
    assert result["disabled_equals_base"] is True
    assert result["rows"]["adapter loaded, disabled"] == result["rows"]["base model (untouched)"]
    assert result["num_prompts"] == 6 and result["num_held_out_prompts"] == 3
    weights = load_file(str(tmp_path / "work" / "lora" / "final" / LORA_WEIGHT_NAME))
    # rank 2 on 2 decoder layers x (4 self- + 4 cross-attention projections + 2 MLP layers), A and B each
    assert len(weights) == 2 * 2 * 10 and result["facts"]["trainable_parameters"] == sum(
        t.numel() for t in weights.values())
    assert any(t.abs().sum() > 0 for k, t in weights.items() if "lora_B" in k)  # trained: B starts at zero
    assert "| with the LoRA adapter |" in (tmp_path / "out" / "lora-example.md").read_text()
