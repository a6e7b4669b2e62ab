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
TINY = ["--num_scenes", "64", "--max_train_steps", "6", "--train_batch_size", "8", "--learning_rate", "3e-3",
        "--channels", "8", "16", "--hidden", "16", "--seed", "4"]


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
    assert main(["--output_dir", str(out), "--dataset", str(tmp_path / "data"), *TINY]) == 0
    printed = capsys.readouterr()
    assert "steps: 100%" in printed.err and "loss=" in printed.err and "lr=" in printed.err  # the progress bar
    assert f"saved recogniser to {out}" in printed.out
    assert f"alignment on real test images of {tmp_path / 'data'}:" in printed.out
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    loaded = ShapesRecogniser.from_pretrained(str(out))
    assert loaded.config["image_size"] == 16 and loaded.config["channels"] == [8, 16]  # resolution from dataset
    # The same data and loop as the library function: identical weights for the same seed and options.
    expected = train_recogniser(recogniser_training_data(64, seed=4, size=16), 6, batch_size=8, lr=3e-3, seed=4,
                                channels=(8, 16), hidden=16)
    saved = load_file(str(out / "model.safetensors"))
    assert saved.keys() == expected.state_dict().keys()
    assert all(torch.equal(saved[name], value) for name, value in expected.state_dict().items())
    # an existing output is kept unless --overwrite
    with pytest.raises(SystemExit) as exit_info:
        run_script(main, "train_recogniser.py", ["--output_dir", str(out), *TINY])
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert main(["--output_dir", str(out), "--overwrite", "--resolution", "16", *TINY]) == 0


@pytest.mark.parametrize("arguments, words", [
    (["--learning_rate", "0"], ["--learning_rate"]),
    (["--seed", "-1"], ["--seed"]),
    (["--channels", "8", "x"], ["--channels", "'x'"]),
    (["--channels", "8"], ["--channels", "2 entries"]),
    (["--device", "cuda:7"], ["--device"]),
    (["--dataset", "{tmp}/nope"], ["--dataset"]),
    (["--size", "16"], ["--size is now --resolution"]),
    (["--split", "test"], ["--split is now --validation_split"]),
    (["--out", "{tmp}/rec"], ["--out is now --output_dir"]),
])
def test_bad_input_is_one_line_and_leaves_no_output(tmp_path, capsys, arguments, words):
    argv = ["--output_dir", str(tmp_path / "rec"), "--resolution", "16", *TINY,
            *[a.format(tmp=tmp_path) for a in arguments]]
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
    for flag in ("--output_dir", "--dataset", "--num_scenes", "--resolution", "--max_train_steps", "--train_batch_size",
                 "--learning_rate", "--seed", "--device", "--config"):
        assert flag in result.stdout
