"""`python -m training.train_recogniser`: the script trains what `train_recogniser` trains, saves it whole, checks it on
real images, and rejects bad input in one line before any work."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from progressive_denoising.commands.base import run_script
from progressive_denoising.pdm_shapes import data as shapes_data
from progressive_denoising.pdm_shapes.recogniser import ShapesRecogniser
from training.train_recogniser import main, recogniser_training_data, train_recogniser

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--num-scenes", "64", "--steps", "6", "--batch-size", "8", "--lr", "3e-3", "--channels", "8,16",
        "--hidden", "16", "--seed", "4"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """The script asks Accelerate for the CPU: start from no state, whatever device an earlier test chose."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_training_renders_every_pair_from_its_own_stream():
    train = recogniser_training_data(200, seed=0, size=16)
    again = recogniser_training_data(200, seed=0, size=16)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(train["image"], again["image"]))
    assert any(shapes_data.has_held_out_pair(objects) for objects in train["objects"])
    split = shapes_data.make_shapes_dataset(200, seed=0, size=16, num_validation=1, num_test=1)["train"]
    assert train["objects"] != list(split["objects"])  # not the PDM-Shapes train split of the same seed
    with pytest.raises(ValueError, match="num_examples"):
        recogniser_training_data(0, seed=0)
    with pytest.raises(ValueError, match="steps"):
        train_recogniser(train, 0)


def test_script_trains_saves_and_checks_the_recogniser(tmp_path, capsys):
    data = shapes_data.make_shapes_dataset(2, seed=1, size=16, num_validation=1, num_test=4)
    data.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "rec"
    assert main(["--out", str(out), "--data", str(tmp_path / "data"), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "step 6/6 loss" in printed and f"saved recogniser to {out}" in printed
    assert f"alignment on real test images of {tmp_path / 'data'}:" in printed
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    loaded = ShapesRecogniser.from_pretrained(str(out))
    assert loaded.config["image_size"] == 16 and loaded.config["channels"] == [8, 16]  # --size from --data
    # The same data and loop as the library function: identical weights for the same seed and options.
    expected = train_recogniser(recogniser_training_data(64, seed=4, size=16), 6, batch_size=8, lr=3e-3, seed=4,
                                channels=(8, 16), hidden=16)
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == expected.state_dict().keys()
    assert all(torch.equal(saved[name], value) for name, value in expected.state_dict().items())
    # an existing output is kept unless --overwrite
    with pytest.raises(SystemExit) as exit_info:
        run_script(main, "train_recogniser.py", ["--out", str(out), *TINY])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["--out", str(out), "--overwrite", "--size", "16", *TINY]) == 0


@pytest.mark.parametrize("arguments, words", [
    (["--lr", "0"], ["--lr"]),
    (["--seed", "-1"], ["--seed"]),
    (["--channels", "8,x"], ["--channels"]),
    (["--channels", "8"], ["--channels", "2 entries"]),
    (["--device", "cuda:7"], ["--device"]),
    (["--data", "{tmp}/nope"], ["--data"]),
])
def test_bad_input_is_one_line_and_leaves_no_output(tmp_path, capsys, arguments, words):
    argv = ["--out", str(tmp_path / "rec"), "--size", "16", *TINY, *[a.format(tmp=tmp_path) for a in arguments]]
    with pytest.raises(SystemExit) as exit_info:
        run_script(main, "train_recogniser.py", argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and len(lines) == 1, lines
    assert all(word in lines[0] for word in words), lines[0]
    assert not (tmp_path / "rec").exists()


def test_script_answers_help_as_a_module(tmp_path):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, HF_HUB_OFFLINE="1")
    result = subprocess.run([sys.executable, "-m", "training.train_recogniser", "--help"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    for flag in ("--out", "--data", "--num-scenes", "--size", "--steps", "--batch-size", "--lr", "--seed", "--device"):
        assert flag in result.stdout
