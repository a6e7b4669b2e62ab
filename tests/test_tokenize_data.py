"""Tokenizing an imagefolder with captions: columns, dtypes, skipped corrupt files, 1 vs 2 processes."""

import json
import os
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
from diffusers import VQModel
from PIL import Image

from progressive_denoising import tokenize_data

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ["a red square", "two blue circles", "a green triangle", "corrupt", "a small star"]
CORRUPT_INDEX = 3


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenize")
    rng = np.random.default_rng(0)
    folder = root / "images"
    folder.mkdir()
    with open(folder / "metadata.jsonl", "w") as metadata:
        for index, caption in enumerate(CAPTIONS):
            name = f"{index}.png"
            if index == CORRUPT_INDEX:
                (folder / name).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
            else:
                height, width = 20 + 4 * index, 28  # various aspect ratios, all resized to 16x16
                Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / name)
            metadata.write(json.dumps({"file_name": name, "caption": caption, "source_id": 100 + index}) + "\n")
    torch.manual_seed(0)
    vqvae = VQModel(
        block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=4,
        num_vq_embeddings=16, vq_embed_dim=4, sample_size=16,
    )
    with torch.no_grad():
        vqvae.quantize.embedding.weight.normal_()
    vqvae.save_pretrained(root / "vqvae")
    return root


def _run(workspace, output, launcher):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(workspace / "hf_home"), "PYTHONPATH": REPO_ROOT}
    command = [*launcher, "-m", "progressive_denoising.commands.tokenize", "--dataset", str(workspace / "images"),
               "--vqvae", str(workspace / "vqvae"), "--output", str(output), "--batch_size", "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, cwd=str(workspace))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def single(workspace):
    output = workspace / "out1"
    stdout = _run(workspace, output, [sys.executable])
    return output, stdout


def test_columns_shapes_and_dtypes(single):
    output, _ = single
    result = datasets.load_from_disk(str(output))
    assert result.column_names == ["caption", "source_id", "codes", "quant_error"]
    assert result.features["codes"] == datasets.List(datasets.Value("int32"), length=64)
    assert result.features["quant_error"] == datasets.List(datasets.Value("float32"), length=64)
    assert result["caption"] == [c for i, c in enumerate(CAPTIONS) if i != CORRUPT_INDEX]
    assert result["source_id"] == [100 + i for i in range(len(CAPTIONS)) if i != CORRUPT_INDEX]
    codes = np.array(result["codes"])
    errors = np.array(result["quant_error"])
    assert codes.shape == errors.shape == (4, 64)  # f2: 16x16 pixels -> 8x8 codes
    assert codes.min() >= 0 and codes.max() < 16 and (errors >= 0).all()


def test_corrupt_file_is_skipped_and_reported(single):
    output, stdout = single
    report = json.loads((output / tokenize_data.REPORT_NAME).read_text())
    assert report["num_skipped"] == 1 and report["num_examples"] == 4
    assert [item["index"] for item in report["skipped"]] == [CORRUPT_INDEX]
    assert report["grid"] == [8, 8] and report["resolution"] == 16 and report["codebook_size"] == 16
    assert "skipped 1" in stdout


def test_codes_match_in_process_encoding(single, workspace):
    from progressive_denoising.vq import encode_to_codes, preprocess_images

    output, _ = single
    vqvae = VQModel.from_pretrained(workspace / "vqvae")
    image = Image.open(workspace / "images" / "0.png")
    codes, errors = encode_to_codes(vqvae, preprocess_images([image], 16))
    row = datasets.load_from_disk(str(output))[0]
    assert row["codes"] == codes[0].tolist()
    np.testing.assert_allclose(row["quant_error"], errors[0].numpy(), atol=1e-5)


def test_two_processes_give_the_same_result(single, workspace):
    output, _ = single
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    _run(workspace, workspace / "out2", launcher)
    one, two = datasets.load_from_disk(str(output)), datasets.load_from_disk(str(workspace / "out2"))
    assert one["caption"] == two["caption"] and one["codes"] == two["codes"]
    # Different thread counts can change float32 sums in the last bit.
    np.testing.assert_allclose(np.array(one["quant_error"]), np.array(two["quant_error"]), atol=1e-5)
    report_one = json.loads((output / tokenize_data.REPORT_NAME).read_text())
    report_two = json.loads((workspace / "out2" / tokenize_data.REPORT_NAME).read_text())
    assert report_one["skipped"] == report_two["skipped"]
    assert not os.path.exists(str(workspace / "out2") + ".pdm_shards")


def test_shard_offsets_match_datasets_sharding():
    source = datasets.Dataset.from_dict({"i": list(range(11))})
    for world in (1, 2, 3, 4, 13):  # 13 > rows: some processes get an empty shard
        rows = []
        for rank in range(world):
            shard = tokenize_data.contiguous_shard(source, world, rank)
            if len(shard):
                assert shard[0]["i"] == tokenize_data.shard_offset(len(source), world, rank)
                assert shard["i"] == source.shard(num_shards=world, index=rank, contiguous=True)["i"]
            rows += shard["i"]
        assert rows == list(range(11))


def test_missing_column_is_named(workspace):
    source = datasets.Dataset.from_dict({"image": [None], "text": ["x"]})
    with pytest.raises(ValueError, match="'caption'"):
        tokenize_data._check_columns(source, "image", "caption")
