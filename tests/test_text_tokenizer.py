"""The caption tokenizer keeps words whole and follows T5's special-token convention."""

import numpy as np
import pytest
from transformers import AutoTokenizer

from progressive_denoising.pdm_shapes import data as shapes_data
from progressive_denoising.text_tokenizer import train_caption_tokenizer, unknown_words


def grammar_captions(count=3000, seed=0):
    rng = np.random.default_rng(seed)
    return [shapes_data.caption_for(shapes_data.sample_scene(rng, 32)) for _ in range(count)]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("tokenizer")
    train_caption_tokenizer(grammar_captions()).save_pretrained(path)
    return AutoTokenizer.from_pretrained(path)  # what a saved pipeline loads


def test_every_grammar_caption_is_one_token_per_word(tokenizer):
    longest = "a large purple triangle right of a small orange circle"
    captions = grammar_captions(500, seed=1) + [longest, "a small white square in the bottom right"]
    for caption in captions:
        ids = tokenizer(caption).input_ids
        assert len(ids) <= 15, (caption, ids)
        assert len(ids) == len(caption.split()) + 1 and tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == caption


def test_t5_special_tokens(tokenizer):
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    assert tokenizer("").input_ids == [1]  # the unconditional prompt of guidance
    assert tokenizer("a red circle").input_ids[-1] == 1
    batch = tokenizer(["a red circle", "a small red circle left of a large blue square"], padding=True)
    assert batch.input_ids[0][4:] == [0] * 7 and batch.attention_mask[0] == [1] * 4 + [0] * 7
    # the vocabulary is the grammar's words and the three special tokens
    kinds = (shapes_data.SIZES, shapes_data.COLOUR_NAMES, shapes_data.SHAPES, shapes_data.REGIONS,
             shapes_data.RELATIONS)
    words = {w for kind in kinds for phrase in kind for w in phrase.split()} | {"a", "in", "the"}
    assert len(tokenizer) == len(words) + 3


def test_unknown_words_are_named(tokenizer):
    assert unknown_words(tokenizer, "a small red blob next to a Red circle blob") == ["blob", "next", "to", "Red"]
    assert unknown_words(tokenizer, "a small red circle") == []


def test_vocab_size_keeps_the_most_frequent_words():
    captions = ["a red circle", "a red square", "a blue circle"]
    tokenizer = train_caption_tokenizer(captions, vocab_size=6)
    assert len(tokenizer) == 6
    assert tokenizer.convert_ids_to_tokens([3, 4, 5]) == ["▁a", "▁circle", "▁red"]
    with pytest.raises(ValueError, match="vocab_size"):
        train_caption_tokenizer(captions, vocab_size=3)
    with pytest.raises(ValueError, match="at least one word"):
        train_caption_tokenizer(["", " "])


def test_same_captions_same_ids():
    captions = grammar_captions(200)
    first, second = (train_caption_tokenizer(c) for c in (captions, list(reversed(captions))))
    assert first.get_vocab() == second.get_vocab()


def test_character_level_spells_words_out():
    captions = grammar_captions(200)
    tokenizer = train_caption_tokenizer(captions, level="character")
    caption = "a small red circle left of a large blue square"
    ids = tokenizer(caption).input_ids
    assert len(ids) == len(caption) + 2 and tokenizer.unk_token_id not in ids  # characters, word marks and </s>
    assert tokenizer.decode(ids, skip_special_tokens=True) == caption
    with pytest.raises(ValueError, match="level"):
        train_caption_tokenizer(captions, level="bpe")
