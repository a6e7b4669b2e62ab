"""A tiny pre-tokenized data set for the training tests: codes depend on the caption, so they can be learnt."""

import json
import os

import torch
from safetensors.torch import load_file

from tiny import CAPTIONS

TINY_OPTIONS = {
    "train_tokenizer": True, "tokenizer_vocab_size": 100,
    "text_config": {"d_model": 32, "d_ff": 64, "num_layers": 2, "num_heads": 4, "d_kv": 8},
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
    "num_stages": 4, "log_with": None, "num_samples": 2, "eval_batches": 2,
}


def caption_codes(caption, codebook_size=16, num_tokens=16):
    generator = torch.Generator().manual_seed(CAPTIONS.index(caption))
    return torch.randint(codebook_size, (num_tokens,), generator=generator)


def make_dataset(path, num_train=64, num_validation=16, seed=0):
    """A DatasetDict folder with caption / codes / quant_error and its pdm_tokenization.json."""
    from datasets import Dataset, DatasetDict

    generator = torch.Generator().manual_seed(seed)

    def split(n):
        picks = torch.randint(len(CAPTIONS), (n,), generator=generator).tolist()
        captions = [CAPTIONS[i] for i in picks]
        return Dataset.from_dict({
            "caption": captions,
            "codes": [caption_codes(c).tolist() for c in captions],
            "quant_error": torch.rand(n, 16, generator=generator).tolist(),
        })

    DatasetDict(train=split(num_train), validation=split(num_validation)).save_to_disk(path)
    with open(os.path.join(path, "pdm_tokenization.json"), "w") as f:
        json.dump({"grid": [4, 4], "codebook_size": 16, "vq_model": "tiny"}, f)
    return path


def assert_same_final_weights(run, other, atol=1e-6):
    """The two training runs' final/model.safetensors hold the same tensors (a resumed run against a straight one)."""
    a = load_file(os.path.join(run, "final", "model.safetensors"))
    b = load_file(os.path.join(other, "final", "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)
