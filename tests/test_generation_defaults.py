"""benchmarks/generation_defaults.py: the sampling defaults a pipeline ships with are chosen on validation prompts and
saved where `from_pretrained` reads them."""

import json

import torch

from benchmarks import generation_defaults
from progressive_denoising import PDMPipeline
from progressive_denoising.pdm_shapes import data as shapes_data
from training.train_recogniser import recogniser_training_data, train_recogniser

from tiny import tiny_model, tiny_tokenizer, tiny_vqmodel


def test_the_best_validation_setting_is_saved_with_the_model(tmp_path):
    shapes_data.make_shapes_dataset(4, seed=3, size=16, num_validation=12, num_test=2).save_to_disk(tmp_path / "data")
    recogniser = train_recogniser(recogniser_training_data(64, seed=0, size=16), 5, batch_size=16, lr=3e-3,
                                  channels=(8, 16), hidden=16, seed=0)
    recogniser.save_pretrained(tmp_path / "recogniser")
    pipe = PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())
    pipe.save_pretrained(tmp_path / "pipe")
    generation_defaults.main(["--model", str(tmp_path / "pipe"), "--recogniser", str(tmp_path / "recogniser"),
                              "--data", str(tmp_path / "data"), "--grid", "temperature=1.0,0.5",
                              "--grid", "num_stages=2", "--num-prompts", "12", "--out", str(tmp_path / "t.md")])
    saved = json.loads((tmp_path / "pipe" / "model" / "generation_config.json").read_text())
    chosen = [line for line in (tmp_path / "t.md").read_text().splitlines() if "(chosen)" in line]
    assert len(chosen) == 1 and chosen[0].startswith(f"| {saved['temperature']} | 2 |")
    assert saved["num_stages"] == 2
    loaded = PDMPipeline.from_pretrained(tmp_path / "pipe")
    assert loaded.model.generation_config.temperature == saved["temperature"]
