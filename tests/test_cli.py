"""The `pdm` command and the training scripts as a user meets them: every bad input gives one line naming the argument
(exit status 2) or the file (exit status 1) before any work and leaves no output behind; help needs no torch; flags
take hyphens or underscores; outputs appear all together or not at all.

Every case runs the command in a subprocess, as a user would. No test measures time.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest

from progressive_denoising import files

from tiny import tiny_model, tiny_tokenizer, tiny_vqmodel

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_SEED = str(2**63 - 1)
PDM = [sys.executable, "-m", "progressive_denoising.cli"]


def script(name):
    """`python -m training.NAME` (`run` puts the repository root on PYTHONPATH)."""
    return [sys.executable, "-m", "training." + name.removesuffix(".py")]


def run(command, cwd, **extra_env):
    env = {key: value for key, value in os.environ.items() if key != "PDM_DEBUG"}
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=REPO_ROOT, **extra_env)
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny pipeline folder, damaged copies of it, and the other inputs the cases point at."""
    from progressive_denoising import PDMPipeline

    ws = tmp_path_factory.mktemp("workspace")
    pipe = PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel())
    pipe.save_pretrained(ws / "pipe")
    shutil.copytree(ws / "pipe", ws / "truncated")
    weights = ws / "truncated" / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    shutil.copytree(ws / "pipe", ws / "no_vqvae")
    shutil.rmtree(ws / "no_vqvae" / "vqvae")
    shutil.copytree(ws / "pipe", ws / "bad_config")
    (ws / "bad_config" / "model" / "config.json").write_text("{not json")
    shutil.copytree(ws / "pipe", ws / "bad_defaults")
    (ws / "bad_defaults" / "model" / "generation_config.json").write_text('{"temperature": 0.7, "beams": 4}')
    (ws / "empty").mkdir()
    (ws / "file.txt").write_text("not a checkpoint, config or data set\n")
    (ws / "bad.yaml").write_text("max_train_steps: [1\n")
    (ws / "bad_keys.yaml").write_text("output_dir: rec\nsteps: 3\n")
    (ws / "shapes").mkdir()  # looks like a save_to_disk data set to the argument checks
    (ws / "shapes" / "dataset_dict.json").write_text('{"splits": ["test"]}')
    (ws / "generated").mkdir()
    (ws / "generated" / "captions.jsonl").write_text(json.dumps({"file_name": "0.png", "caption": "a"}) + "\n")
    (ws / "rec").mkdir()  # a recogniser folder whose files are there but unreadable
    (ws / "rec" / "config.json").write_text("{}")
    (ws / "rec" / "model.safetensors").write_bytes(b"\0" * 16)
    return ws


GENERATE = ["generate", "a small red circle", "--model", "{ws}/pipe"]
EVALUATE = ["evaluate", "--images", "{ws}/generated", "--recogniser", "{ws}/rec", "--data", "{ws}/shapes"]
TOKENIZE = ["tokenize", "--dataset", "{ws}/shapes", "--vqvae", "{ws}/pipe/vqvae"]

# (id, command, arguments, exit status, words the one error line must hold, what {out} holds beforehand)
# {ws}: the workspace above; {out}: a fresh folder per case, which must look the same afterwards.
BAD_INPUTS = [
    # pdm generate: numbers (checked by the model's own checks, against the folder's config, before loading weights)
    ("steps-too-many", PDM, GENERATE + ["--steps", "17", "--out", "{out}/a.png"], 2, ["--steps", "17"], None),
    ("steps-zero", PDM, GENERATE + ["--steps", "0", "--out", "{out}/a.png"], 2, ["--steps"], None),
    ("steps-not-int", PDM, GENERATE + ["--steps", "four", "--out", "{out}/a.png"], 2, ["--steps", "four"], None),
    ("guidance-inf", PDM, GENERATE + ["--guidance-scale", "inf", "--out", "{out}/a.png"], 2,
     ["--guidance-scale", "inf"], None),
    ("guidance-nan", PDM, GENERATE + ["--guidance-scale", "nan", "--out", "{out}/a.png"], 2,
     ["--guidance-scale", "nan"], None),
    ("guidance-negative", PDM, GENERATE + ["--guidance-scale", "-1", "--out", "{out}/a.png"], 2,
     ["--guidance-scale"], None),
    ("temperature-inf", PDM, GENERATE + ["--temperature", "inf", "--out", "{out}/a.png"], 2,
     ["--temperature", "inf"], None),
    ("temperature-zero", PDM, GENERATE + ["--temperature", "0", "--out", "{out}/a.png"], 2, ["--temperature"], None),
    ("top-k-float", PDM, GENERATE + ["--top-k", "2.5", "--out", "{out}/a.png"], 2, ["--top-k", "2.5"], None),
    ("top-k-too-big", PDM, GENERATE + ["--top-k", "17", "--out", "{out}/a.png"], 2, ["--top-k", "17"], None),
    ("top-p-nan", PDM, GENERATE + ["--top-p", "nan", "--out", "{out}/a.png"], 2, ["--top-p", "nan"], None),
    ("top-p-above-one", PDM, GENERATE + ["--top-p", "1.5", "--out", "{out}/a.png"], 2, ["--top-p"], None),
    ("seed-23-digits", PDM, GENERATE + ["--seed", "12345678901234567890123", "--out", "{out}/a.png"], 2,
     ["--seed", MAX_SEED], None),
    ("seed-negative", PDM, GENERATE + ["--seed", "-1", "--out", "{out}/a.png"], 2, ["--seed", MAX_SEED], None),
    ("seed-past-range-with-images", PDM, GENERATE + ["--seed", MAX_SEED, "--num-images", "2", "--out", "{out}/a.png"],
     2, ["--seed"], None),
    ("order-unknown", PDM, GENERATE + ["--order", "zigzag", "--out", "{out}/a.png"], 2, ["--order", "zigzag"], None),
    ("num-images-zero", PDM, GENERATE + ["--num-images", "0", "--out", "{out}/a.png"], 2, ["--num-images"], None),
    ("max-replacements-negative", PDM, GENERATE + ["--max-replacements", "-1", "--out", "{out}/a.png"], 2,
     ["--max-replacements"], None),
    ("device-unknown", PDM, GENERATE + ["--device", "nonsense", "--out", "{out}/a.png"], 2, ["--device"], None),
    ("flag-unknown", PDM, GENERATE + ["--bogus", "--out", "{out}/a.png"], 2, ["--bogus"], None),
    # pdm generate: the pipeline folder
    ("model-missing", PDM, ["generate", "a", "--model", "{ws}/nope", "--out", "{out}/a.png"], 2,
     ["--model", "no such folder"], None),
    ("model-not-a-pipeline", PDM, ["generate", "a", "--model", "{ws}/empty", "--out", "{out}/a.png"], 2,
     ["--model", "model_index.json"], None),
    ("model-is-a-file", PDM, ["generate", "a", "--model", "{ws}/file.txt", "--out", "{out}/a.png"], 2,
     ["--model", "file.txt"], None),
    ("weights-truncated", PDM, ["generate", "a", "--model", "{ws}/truncated", "--out", "{out}/a.png"], 1,
     ["truncated/model/model.safetensors"], None),
    ("component-missing", PDM, ["generate", "a", "--model", "{ws}/no_vqvae", "--out", "{out}/a.png"], 1,
     ["no_vqvae/vqvae"], None),
    ("config-corrupt", PDM, ["generate", "a", "--model", "{ws}/bad_config", "--out", "{out}/a.png"], 1,
     ["bad_config/model/config.json"], None),
    ("generation-defaults-bad-key", PDM, ["generate", "a", "--model", "{ws}/bad_defaults", "--out", "{out}/a.png"],
     1, ["bad_defaults/model/generation_config.json", "beams"], None),
    ("guidance-schedule-unknown", PDM, GENERATE + ["--guidance-schedule", "cosine", "--out", "{out}/a.png"], 2,
     ["--guidance-schedule", "cosine"], None),
    # pdm generate: outputs (checked before anything is generated, so nothing is written)
    ("stages-out-in-missing-folder", PDM, GENERATE + ["--out", "{out}/a.png", "--stages-out", "{out}/no/s.png"], 2,
     ["--stages-out", "does not exist"], None),
    ("out-is-a-folder", PDM, GENERATE + ["--out", "{out}"], 2, ["--out", "folder"], None),
    ("out-extension-unknown", PDM, GENERATE + ["--out", "{out}/a.xyz"], 2, ["--out", "a.xyz"], None),
    ("out-exists", PDM, GENERATE + ["--out", "{out}/existing.png"], 2, ["--out", "--overwrite"], "file"),
    ("out-twice", PDM, GENERATE + ["--out", "{out}/a.png", "--stages-out", "{out}/a.png"], 2, ["--stages-out"], None),
    # the other pdm commands
    ("command-unknown", PDM, ["nope"], 2, ["nope"], None),
    ("make-shapes-out-exists", PDM, ["make-shapes", "--out", "{out}/existing", "--num-train", "2", "--seed", "0"], 2,
     ["--out", "--overwrite"], "folder"),
    ("make-shapes-no-parent", PDM, ["make-shapes", "--out", "{out}/a/b", "--num-train", "2", "--seed", "0"], 2,
     ["--out", "does not exist"], None),
    ("make-shapes-num-train-zero", PDM, ["make-shapes", "--out", "{out}/s", "--num-train", "0", "--seed", "0"], 2,
     ["--num-train"], None),
    ("make-shapes-seed-too-big", PDM, ["make-shapes", "--out", "{out}/s", "--num-train", "2", "--seed", "2" * 20], 2,
     ["--seed", MAX_SEED], None),
    ("make-shapes-size-too-small", PDM, ["make-shapes", "--out", "{out}/s", "--num-train", "2", "--seed", "0",
                                         "--size", "3"], 2, ["--size"], None),
    ("convert-checkpoint-missing", PDM, ["convert-vqgan", "--checkpoint", "{ws}/nope.ckpt", "--config",
                                         "{ws}/file.txt", "--output", "{out}/vq"], 2, ["--checkpoint"], None),
    ("convert-output-exists", PDM, ["convert-vqgan", "--checkpoint", "{ws}/file.txt", "--config", "{ws}/file.txt",
                                    "--output", "{out}/existing"], 2, ["--output", "--overwrite"], "folder"),
    ("convert-config-corrupt", PDM, ["convert-vqgan", "--checkpoint", "{ws}/file.txt", "--config", "{ws}/file.txt",
                                     "--output", "{out}/vq"], 1, ["file.txt"], None),
    ("tokenize-dataset-missing", PDM, ["tokenize", "--dataset", "{ws}/nope", "--vqvae", "{ws}/pipe/vqvae",
                                       "--output", "{out}/codes"], 2, ["--dataset"], None),
    ("tokenize-vqvae-not-a-vqmodel", PDM, ["tokenize", "--dataset", "{ws}/shapes", "--vqvae", "{ws}/pipe",
                                           "--output", "{out}/codes"], 2, ["--vqvae", "config.json"], None),
    ("tokenize-batch-size-zero", PDM, TOKENIZE + ["--output", "{out}/codes", "--batch-size", "0"], 2,
     ["--batch-size"], None),
    ("tokenize-output-exists", PDM, TOKENIZE + ["--output", "{out}/existing"], 2, ["--output", "--overwrite"],
     "folder"),
    ("evaluate-images-without-captions", PDM, ["evaluate", "--images", "{ws}/empty", "--recogniser", "{ws}/rec",
                                               "--data", "{ws}/shapes"], 2, ["--images", "captions.jsonl"], None),
    ("evaluate-recogniser-missing", PDM, ["evaluate", "--images", "{ws}/generated", "--recogniser", "{ws}/nope",
                                         "--data", "{ws}/shapes"], 2, ["--recogniser"], None),
    ("evaluate-data-not-a-data-set", PDM, ["evaluate", "--images", "{ws}/generated", "--recogniser", "{ws}/rec",
                                           "--data", "{ws}/empty"], 2, ["--data"], None),
    ("evaluate-json-exists", PDM, EVALUATE + ["--json", "{out}/existing.png"], 2, ["--json", "--overwrite"], "file"),
    ("evaluate-recogniser-corrupt", PDM, EVALUATE + ["--json", "{out}/r.json"], 1, ["rec", "recogniser"], None),
    # the training scripts
    ("train-pdm-option-unknown", script("train_pdm.py"), ["--lerning_rate", "1"], 2, ["lerning_rate", "learning_rate"],
     None),
    ("train-pdm-config-missing", script("train_pdm.py"), ["--config", "{ws}/nope.yaml"], 2, ["--config"], None),
    ("train-pdm-config-corrupt", script("train_pdm.py"), ["--config", "{ws}/bad.yaml"], 1, ["bad.yaml"], None),
    ("train-pdm-dataset-missing", script("train_pdm.py"), ["--dataset", "{ws}/nope", "--text_config", "{{}}",
                                                           "--output_dir", "{out}/run"], 2, ["--dataset"], None),
    ("train-pdm-bad-value", script("train_pdm.py"), ["--dataset", "{ws}/shapes", "--text_config", "{{}}",
                                                     "--p_error", "2", "--output_dir", "{out}/run"], 2, ["p_error"],
     None),
    ("train-pdm-old-spelling", script("train_pdm.py"), ["--max_steps", "5"], 2,
     ["--max_steps is now --max_train_steps"], None),
    ("train-policy-model-missing", script("train_policy.py"), ["--model_name_or_path", "{ws}/nope", "--dataset",
                                                               "{ws}/shapes", "--output_dir", "{out}/run"], 2,
     ["--model_name_or_path"], None),
    ("train-policy-old-spelling", script("train_policy.py"), ["--batch_size", "5"], 2,
     ["--batch_size is now --train_batch_size"], None),
    ("train-vqvae-data-missing", script("train_vqvae.py"), ["--dataset", "{ws}/nope", "--output_dir", "{out}/vq"], 2,
     ["--dataset"], None),
    ("train-vqvae-output-exists", script("train_vqvae.py"), ["--dataset", "{ws}/shapes", "--output_dir",
                                                             "{out}/existing"], 2, ["--output_dir", "--overwrite"],
     "folder"),
    ("train-vqvae-old-spelling", script("train_vqvae.py"), ["--data", "{ws}/shapes", "--output", "{out}/vq"], 2,
     ["--data is now --dataset"], None),
    ("train-recogniser-without-output", script("train_recogniser.py"), ["--max_train_steps", "1"], 2,
     ["output_dir"], None),
    ("train-recogniser-output-exists", script("train_recogniser.py"), ["--output_dir", "{out}/existing"], 2,
     ["--output_dir", "--overwrite"], "folder"),
    ("train-recogniser-size-too-small", script("train_recogniser.py"), ["--output_dir", "{out}/rec",
                                                                        "--resolution", "8"], 2,
     ["--resolution", "16"], None),
    ("train-recogniser-config-unknown-key", script("train_recogniser.py"), ["--config", "{ws}/bad_keys.yaml"], 2,
     ["'steps'", "is now 'max_train_steps'"], None),
]


def prepare_out(out, holds):
    """{out} before the command: empty, or with an existing output file or folder."""
    out.mkdir()
    if holds == "file":
        (out / "existing.png").write_bytes(b"old output")
    elif holds == "folder":
        (out / "existing").mkdir()
        (out / "existing" / "keep.txt").write_text("old output")
    return snapshot(out)


def snapshot(folder):
    return {str(path.relative_to(folder)): path.read_bytes() if path.is_file() else None
            for path in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("command, arguments, status, words, holds",
                         [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gives_one_line_and_no_output(workspace, tmp_path, command, arguments, status, words, holds):
    out = tmp_path / "out"
    before = prepare_out(out, holds)
    result = run(command + [arg.format(ws=workspace, out=out) for arg in arguments], cwd=tmp_path)
    lines = error_lines(result)
    assert result.returncode == status, result.stderr[-3000:]
    assert len(lines) == 1 and "error" in lines[0], result.stderr[-3000:]
    for word in words:
        assert word in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert snapshot(out) == before  # no output appeared, none was replaced, no temporary file was left
    assert sorted(os.listdir(tmp_path)) == ["out"]  # nothing written beside it either (out.png, ...)


def test_debug_shows_the_traceback(workspace, tmp_path):
    bad = PDM + ["generate", "a", "--model", str(workspace / "pipe"), "--steps", "17", "--out", str(tmp_path / "a.png")]
    for result in (run(bad + ["--debug"], cwd=tmp_path), run(bad, cwd=tmp_path, PDM_DEBUG="1"),
                   run(PDM[:3] + ["--debug"] + bad[3:], cwd=tmp_path)):
        assert result.returncode != 0 and "Traceback" in result.stderr and "num_stages" in result.stderr


@pytest.mark.parametrize(
    "arguments, warned",
    [
        (["a small pink circle near a zebra"], ["'pink'", "'zebra'"]),
        ([" ".join(["a small red circle"] * 80)], ["256"]),
        (["a small red circle", "--negative_prompt", "a blue square"], ["negative_prompt", "guidance_scale"]),
    ],
    ids=["unknown-words", "prompt-too-long", "negative-prompt-without-guidance"],
)
def test_warnings_name_what_is_ignored(workspace, tmp_path, arguments, warned):
    result = run(PDM + ["generate", *arguments, "--model", str(workspace / "pipe"), "--steps", "2",
                        "--out", "a.png"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if line.startswith("pdm generate: warning:")]
    assert len(warnings) == 1, result.stderr[-3000:]
    for word in warned:
        assert word in warnings[0], warnings[0]
    assert sorted(os.listdir(tmp_path)) == ["a.png"]


def test_generate_writes_all_outputs_and_no_temporary_file(workspace, tmp_path):
    result = run(PDM + ["generate", "a small red circle", "--model", str(workspace / "pipe"), "--steps", "4",
                        "--out", "a.png", "--stages-out", "stages.png", "--top-k", "4", "--top-p", "0.9",
                        "--guidance-scale", "2", "--negative-prompt", "a blue square", "--timings"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == ["a.png", "stages.png"]
    assert "timings (s): checks" in result.stdout and "generate" in result.stdout
    again = run(PDM + ["generate", "a small red circle", "--model", str(workspace / "pipe"), "--out", "a.png"],
                cwd=tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    replaced = run(PDM + ["generate", "a small red circle", "--model", str(workspace / "pipe"), "--out", "a.png",
                          "--overwrite"], cwd=tmp_path)
    assert replaced.returncode == 0 and sorted(os.listdir(tmp_path)) == ["a.png", "stages.png"]


HELP_SCRIPT = """
import sys
from progressive_denoising.cli import main

for argv in ([], ["--help"], ["help"], ["help", "generate"], *[[name, "--help"] for name in COMMANDS]):
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code
    assert code == 0, (argv, code)
import progressive_denoising
print("HEAVY", sorted({name.split(".")[0] for name in sys.modules} & {"torch", "transformers", "diffusers"}))
"""


def test_help_answers_without_torch_or_transformers(tmp_path):
    from progressive_denoising.cli import COMMANDS

    result = run([sys.executable, "-c", f"COMMANDS = {list(COMMANDS)!r}\n" + HELP_SCRIPT], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "HEAVY []" in result.stdout, result.stdout[-500:]
    for name in COMMANDS:
        assert name in result.stdout
    assert "--overwrite" in result.stdout and "--negative-prompt" in result.stdout and "--top-k" in result.stdout


@pytest.mark.parametrize("name", ["train_pdm.py", "train_policy.py", "train_vqvae.py", "train_recogniser.py"])
def test_training_scripts_answer_help(tmp_path, name):
    """One option system: every option of a script's dataclass in its help, with its default; the shared ideas
    spelled alike."""
    import dataclasses
    import importlib

    result = run(script(name) + ["--help"], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith(f"usage: {name} [--config FILE.yaml]")
    for flag in ("--output_dir", "--max_train_steps", "--learning_rate", "--seed", "--config", "--debug"):
        assert flag in result.stdout, flag
    options = importlib.import_module("training." + name.removesuffix(".py")).Options
    help_text = " ".join(result.stdout.partition("\noptions:\n")[2].split())  # the options, after the docstring
    for field in dataclasses.fields(options):
        assert f"--{field.name} " in result.stdout, field.name
    negations = help_text.count("--no_")  # `--no_flag` of a flag that is true by default, as HfArgumentParser adds
    assert help_text.count("(default: ") == len(dataclasses.fields(options)) + negations + 2  # --config, --debug


def test_package_classes_are_registered_when_imported(workspace, tmp_path):
    """`AutoModel` knows PDM once the model classes are imported, though `import progressive_denoising` is lazy."""
    code = ("import sys\nimport progressive_denoising\nassert 'torch' not in sys.modules\n"
            "from progressive_denoising.modeling_pdm import PDMForTextToImage\nfrom transformers import AutoModel\n"
            f"assert type(AutoModel.from_pretrained({str(workspace / 'pipe' / 'model')!r})) is PDMForTextToImage\n"
            "from progressive_denoising import PDMARForTextToImage, PDMPipeline\nprint('OK')")
    result = run([sys.executable, "-c", code], cwd=tmp_path)
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-3000:]


def test_flags_take_hyphens_or_underscores(tmp_path):
    from progressive_denoising.cli import main

    assert main(["make-shapes", "--out", str(tmp_path / "a"), "--num_train", "2", "--num-validation", "1",
                 "--num_test=1", "--seed", "0", "--size", "16"]) == 0
    with pytest.raises(SystemExit) as exit_info:  # and an existing output needs --overwrite, in either spelling
        main(["make-shapes", "--out", str(tmp_path / "a"), "--num-train", "2", "--seed", "0", "--size", "16"])
    assert exit_info.value.code == 2
    assert main(["make-shapes", "--out", str(tmp_path / "a"), "--num-train", "3", "--seed", "0", "--size", "16",
                 "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["a"]


def test_outputs_are_renamed_into_place_together_or_not_at_all(tmp_path):
    old = tmp_path / "old.txt"
    old.write_text("old")
    with pytest.raises(RuntimeError):
        with files.atomic_outputs(str(tmp_path / "new.txt"), str(old)) as (new_tmp, old_tmp):
            open(new_tmp, "w").write("new")
            open(old_tmp, "w").write("replaced")
            raise RuntimeError("the second output failed")
    assert sorted(os.listdir(tmp_path)) == ["old.txt"] and old.read_text() == "old"
    with files.atomic_outputs(str(tmp_path / "new.txt"), str(old)) as (new_tmp, old_tmp):
        open(new_tmp, "w").write("new")
        open(old_tmp, "w").write("replaced")
        assert not (tmp_path / "new.txt").exists()  # nothing is in place before the block ends
    assert sorted(os.listdir(tmp_path)) == ["new.txt", "old.txt"] and old.read_text() == "replaced"
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "stale.txt").write_text("stale")
    with files.atomic_output(str(folder), folder=True) as temporary:
        open(os.path.join(temporary, "fresh.txt"), "w").write("fresh")
    assert os.listdir(folder) == ["fresh.txt"]
    assert sorted(os.listdir(tmp_path)) == ["folder", "new.txt", "old.txt"]
