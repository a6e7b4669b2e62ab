"""Streamed, sharded training data: `pdm tokenize --shard-size` writes parquet shards resumably, `train_pdm --streaming`
reads each process's own shards, resumes the stream exactly after a kill, and names a shard it cannot read."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import datasets
import pytest
import torch
import yaml

from test_tokenize_data import CAPTIONS as IMAGE_CAPTIONS, CORRUPT_INDEX, workspace  # noqa: F401 (a fixture)
from train_data import TINY_OPTIONS, assert_same_final_weights, make_dataset

from progressive_denoising import tokenize_data
from training import data, loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def two_processes():
    """`accelerate launch` of two CPU processes, on a free port: two runs at once (tests run side by side) would
    otherwise meet on the default port 29500 and hang in each other's process group."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return (sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port))


QUICK_STREAM_ENDS = 0.05  # seconds; see `quick_stream_ends`


def env(shim=None):
    """The scripts' environment; `shim`: a folder whose sitecustomize.py shortens datasets' sleeps there too."""
    # ACCELERATE_USE_CPU: `--multi_gpu` on a machine without GPUs then starts two processes that talk over gloo.
    path = os.pathsep.join([shim, ROOT]) if shim else ROOT
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                ACCELERATE_USE_CPU="1")


def write_shards(folder, source, num_shards):
    """`source` (with an `example_id` column added) cut into `num_shards` parquet files named as `pdm tokenize
    --shard-size` names them; returns the files."""
    os.makedirs(folder, exist_ok=True)
    source = source.add_column("example_id", list(range(len(source))))
    names = tokenize_data.shard_names("train", num_shards)
    for index, name in enumerate(names):
        source.shard(num_shards, index, contiguous=True).to_parquet(os.path.join(folder, name))
    return [os.path.join(folder, name) for name in names]


@pytest.fixture(autouse=True)
def quick_stream_ends(monkeypatch):
    """datasets sleeps 5 s at the end of every pass over parquet files (for pyarrow's reading threads to stop,
    apache/arrow#45214): once an epoch in training, but most of these tests' time. The tiny files' threads are done
    long before a twentieth of a second."""
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", QUICK_STREAM_ENDS, raising=False)


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """`quick_stream_ends` for the training scripts this module starts (Python imports sitecustomize at start)."""
    folder = tmp_path_factory.mktemp("shim")
    (folder / "sitecustomize.py").write_text("import datasets.config\n"
                                             f"datasets.config.SLEEP_TIME_ON_THREADS_SHUTDOWN = {QUICK_STREAM_ENDS}\n")
    return str(folder)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(map-style data folder, folder of 4 train shards with pdm_tokenization.json): 48 training examples."""
    root = tmp_path_factory.mktemp("streaming")
    saved = make_dataset(str(root / "data"), num_train=48, num_validation=8)
    shards = str(root / "shards")
    write_shards(shards, datasets.load_from_disk(saved)["train"], 4)
    with open(os.path.join(shards, data.TOKENIZATION_FILE), "w") as f:
        json.dump({"grid": [4, 4], "codebook_size": 16}, f)
    return saved, shards


# ----------------------------------------------------------------------------------------------------------------
# writing shards


def tokenize(workspace, output, *extra, launcher=(sys.executable,)):
    command = [*launcher, "-m", "progressive_denoising.commands.tokenize", "--dataset", str(workspace / "images"),
               "--vqvae", str(workspace / "vqvae"), "--output", str(output), "--batch-size", "2", *extra]
    environment = {**env(), "HF_HOME": str(workspace / "hf_home")}
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=180, cwd=str(workspace))


def test_shards_are_written_and_a_rerun_skips_the_finished_ones(workspace):
    output = workspace / "shards"
    first = tokenize(workspace, output, "--shard-size", "2")
    assert first.returncode == 0, first.stderr[-3000:]
    names = tokenize_data.shard_names("train", 3)  # 5 images, 2 a shard
    assert sorted(n for n in os.listdir(output) if not n.startswith(".")) == sorted(names + [tokenize_data.REPORT_NAME])
    report = json.loads((output / tokenize_data.REPORT_NAME).read_text())
    assert report["num_examples"] == 4 and [s["index"] for s in report["skipped"]] == [CORRUPT_INDEX]
    assert report["shards"] == names and report["grid"] == [8, 8]
    stream = datasets.load_dataset("parquet", data_files=str(output / "train-*.parquet"), split="train", streaming=True)
    rows = list(stream)
    assert [r["caption"] for r in rows] == [c for i, c in enumerate(IMAGE_CAPTIONS) if i != CORRUPT_INDEX]
    assert all(len(r["codes"]) == 64 and len(r["quant_error"]) == 64 for r in rows)

    # A kill while writing shard 1 leaves shards 0 and 2 and a temporary file: the rerun writes shard 1 alone.
    written = {n: os.stat(output / n).st_mtime_ns for n in names}
    os.remove(output / names[1])
    (output / f".{names[1]}.incomplete").write_bytes(b"half a shard")
    second = tokenize(workspace, output, "--shard-size", "2")
    assert second.returncode == 0, second.stderr[-3000:]
    kept = (names[0], names[2])
    assert {n: os.stat(output / n).st_mtime_ns for n in kept} == {n: written[n] for n in kept}
    assert not os.path.exists(output / f".{names[1]}.incomplete")
    again = json.loads((output / tokenize_data.REPORT_NAME).read_text())
    assert again["num_examples"] == 4 and again["skipped"] == report["skipped"]  # the kept shards' skips too

    # Another shard size would mix two layouts: refused, naming a shard in the way.
    other = tokenize(workspace, output, "--shard-size", "3")
    assert other.returncode != 0 and names[0] in other.stderr and "Traceback" not in other.stderr
    restarted = tokenize(workspace, output, "--shard-size", "3", "--overwrite")
    assert restarted.returncode == 0, restarted.stderr[-3000:]
    assert sorted(n for n in os.listdir(output) if n.endswith(".parquet")) == tokenize_data.shard_names("train", 2)


def test_two_processes_write_the_same_shards(workspace):
    """Process r writes shards r, r + 2, ...: the files and the report are those of one process."""
    one, two = workspace / "shards-one", workspace / "shards-two"
    for output, launcher in ((one, (sys.executable,)), (two, two_processes())):
        result = tokenize(workspace, output, "--shard-size", "2", launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
    for name in tokenize_data.shard_names("train", 3):
        a, b = (datasets.Dataset.from_parquet(str(folder / name)) for folder in (one, two))
        assert a["caption"] == b["caption"] and a["codes"] == b["codes"]
    reports = [json.loads((folder / tokenize_data.REPORT_NAME).read_text()) for folder in (one, two)]
    assert reports[0]["skipped"] == reports[1]["skipped"] and reports[0]["num_examples"] == reports[1]["num_examples"]


# ----------------------------------------------------------------------------------------------------------------
# reading them


def epoch_ids(shards, world_size, epoch, buffer_size=8):
    """The example ids each process reads in `epoch`."""
    parts = []
    for rank in range(world_size):
        stream = data.open_stream(shards, "train", seed=0, buffer_size=buffer_size, rank=rank, world_size=world_size)
        stream.set_epoch(epoch)
        parts.append([row["example_id"] for row in stream])
    return parts


@pytest.mark.parametrize("num_shards", [4, 3])  # whole shards per process, or every shard, one example in two
def test_each_example_is_read_once_an_epoch_across_processes(tiny, tmp_path, num_shards):
    saved, _ = tiny
    shards = str(tmp_path / "shards")
    write_shards(shards, datasets.load_from_disk(saved)["train"], num_shards)
    orders = []
    for epoch in (0, 1):
        first, second = epoch_ids(shards, 2, epoch)
        assert not set(first) & set(second)
        assert sorted(first + second) == list(range(48))
        orders.append(first + second)
    assert orders[0] != orders[1]  # set_epoch reshuffles


def take(batches, count):
    return [next(batches) for _ in range(count)]


def test_stream_batches_resume_where_they_stopped(tiny):
    """Resumed from its state after 7 batches (past an epoch's end: 48 examples make 4 batches of 12 an epoch), a
    stream gives the batches an uninterrupted one gives, shuffle buffer and all."""
    _, shards = tiny

    def batches():
        return data.StreamBatches(data.open_stream(shards, "train", 0, 16, 0, 1), batch_size=12)

    straight = take(batches(), 12)
    interrupted = batches()
    take(interrupted, 7)
    state = interrupted.state_dict()
    assert state == {"positions": [[1, 3]]}
    resumed = batches()
    resumed.load_state_dict(state)
    for a, b in zip(straight[7:], take(resumed, 5)):
        assert torch.equal(a["codes"], b["codes"]) and a["caption"] == b["caption"]
    with pytest.raises(ValueError, match="as many processes"):
        data.StreamBatches(None, 12, world_size=2).load_state_dict(state)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "missing"])
def test_a_bad_shard_is_named(tiny, tmp_path, damage):
    _, shards = tiny
    files = sorted(os.path.join(shards, n) for n in os.listdir(shards) if n.endswith(".parquet"))
    bad = str(tmp_path / os.path.basename(files[2]))
    if damage == "truncated":
        with open(files[2], "rb") as f:
            open(bad, "wb").write(f.read()[:-100])
    elif damage == "garbage":
        open(bad, "wb").write(b"PAR1 not a parquet file")
    copies = files[:2] + [bad] + files[3:]  # a listed file that is gone, when missing
    with pytest.raises(ValueError, match=f"training shard {bad} cannot be read"):
        data.check_shards(copies, rank=0, world_size=2)  # rank 0 checks shards 0 and 2
    assert data.check_shards(copies, rank=1, world_size=2) == 24


def test_a_glob_that_matches_nothing_is_named(tmp_path):
    with pytest.raises(ValueError, match="no parquet shard matches .*nothing-\\*.parquet"):
        data.shard_files(str(tmp_path / "nothing-*.parquet"))


# ----------------------------------------------------------------------------------------------------------------
# train_pdm --streaming end to end


@pytest.mark.parametrize("given, message", [
    ({"validation_dataset": "v"}, "'validation_dataset' goes with 'streaming'"),
    ({"streaming": True, "max_train_examples": 10}, "'max_train_examples' works on map-style data only"),
    ({"streaming": True, "validation_size": 10}, "'validation_size' works on map-style data only"),
    ({"streaming": True, "shuffle_buffer_size": -1}, "'shuffle_buffer_size' must be 0 or more"),
])
def test_streaming_options_are_checked(given, message):
    from training.train_pdm import Options, check_options

    with pytest.raises(ValueError, match=message):
        check_options(Options(dataset="d", text_config={}, **given))


@pytest.fixture(scope="module")
def config(tiny, tmp_path_factory):
    saved, shards = tiny
    path = tmp_path_factory.mktemp("streaming-config") / "tiny.yaml"
    options = dict(TINY_OPTIONS, dataset=shards, streaming=True, shuffle_buffer_size=8, validation_dataset=saved,
                   learning_rate=3e-3, order="random", train_batch_size=4, eval_batches=1)
    path.write_text(yaml.safe_dump(options))
    return str(path)


def train(args, shim, launcher=(sys.executable,), timeout=300):
    """train_pdm's CompletedProcess; past `timeout` its whole process group is killed (a launcher's children too)."""
    process = subprocess.Popen([*launcher, "-m", "training.train_pdm", *args], env=env(shim), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"train_pdm ran past {timeout} s: {stderr[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def test_a_corrupt_shard_stops_the_run_with_one_line_naming_it(config, tiny, shim, tmp_path):
    _, shards = tiny
    broken = str(tmp_path / "broken")
    files = write_shards(broken, datasets.load_from_disk(tiny[0])["train"], 2)
    with open(files[1], "r+b") as f:
        f.truncate(200)
    result = train(["--config", config, "--dataset", broken, "--output_dir", str(tmp_path / "run")], shim)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and f"training shard {files[1]} cannot be read" in result.stderr


def test_two_processes_streamed_killed_and_resumed_match_an_uninterrupted_run(config, shim, tmp_path):
    """Two processes, 2 shards each, 6 batches of 4 an epoch each: 14 steps cross two epoch ends, the resume (from step
    8 or 4) lands inside an epoch. With an EMA, registered for checkpointing after the stream's position."""
    common = ["--config", config, "--max_train_steps", "14", "--checkpointing_steps", "4", "--eval_steps", "14",
              "--num_samples", "0", "--ema_decay", "0.9"]
    straight = str(tmp_path / "straight")
    result = train(common + ["--output_dir", straight], shim, launcher=two_processes())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "streaming 4 shard(s)" in result.stdout and "whole shards each" in result.stdout

    crashed = str(tmp_path / "crashed")
    process = subprocess.Popen([*two_processes(), "-m", "training.train_pdm", *common, "--output_dir", crashed],
                               env=env(shim), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    while not loop.checkpoints(crashed) and process.poll() is None:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and both training processes
    process.wait()
    for name in os.listdir(crashed):  # what a kill right after the first checkpoint leaves
        if name == "final" or (name.startswith("checkpoint-") and name != "checkpoint-4"):
            subprocess.run(["rm", "-rf", os.path.join(crashed, name)], check=True)
    resumed = train(common + ["--output_dir", crashed, "--resume_from_checkpoint", "latest"], shim,
                    launcher=two_processes())
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout

    assert_same_final_weights(straight, crashed)
