"""A caption tokenizer built from the captions and saved as a T5 tokenizer.

No pretrained T5 can be downloaded here, so PDM-Shapes models (and the tests) make their tokenizer from their
captions. It keeps every word whole: the pieces are T5's "▁word" pieces of a Unigram model, one per word of the
captions. (`tokenizers`' Unigram trainer collapses to single characters on a small, repetitive caption corpus, which
made the text encoder spell out "red" and "green" from letters.) It behaves like T5's: `<pad>` = 0, `</s>` = 1
appended to every prompt, `<unk>` = 2 for a word outside the vocabulary, so the empty prompt (the unconditional
input of classifier-free guidance) is the lone `</s>`; `AutoTokenizer` loads it back as a `T5Tokenizer`.
"""

from collections import Counter
from typing import Iterable, Optional

from transformers import T5Tokenizer

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")
WORD_PREFIX = "▁"  # T5's (SentencePiece's) mark of a word start


LEVELS = ("word", "character")


def train_caption_tokenizer(captions: Iterable[str], vocab_size: Optional[int] = None,
                            level: str = "word") -> T5Tokenizer:
    """A T5 tokenizer over the words (or, for comparison, the characters) of `captions`.

    Args:
        captions: training captions; words are what `str.split()` gives.
        vocab_size: at most this many entries, special tokens included (the most frequent pieces are kept);
            every piece when None.
        level: `word` (one piece per word) or `character` (one piece per character and the word-start mark, as the
            Unigram trainer ended up with on these captions; kept to measure what whole words bring).
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    words = [word for caption in captions for word in caption.split()]
    if level == "word":
        counts = Counter(WORD_PREFIX + word for word in words)
    else:
        counts = Counter(character for word in words for character in WORD_PREFIX + word)
    if not counts:
        raise ValueError("captions must contain at least one word to build a tokenizer from")
    # Most frequent first, then alphabetical, so the same captions always give the same ids.
    pieces = sorted(counts, key=lambda piece: (-counts[piece], piece))
    if vocab_size is not None:
        if vocab_size <= len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size must exceed the {len(SPECIAL_TOKENS)} special tokens, got {vocab_size}")
        pieces = pieces[: vocab_size - len(SPECIAL_TOKENS)]
    vocab = [(token, 0.0) for token in SPECIAL_TOKENS + tuple(pieces)]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def unknown_words(tokenizer, prompt: str) -> list:
    """Words of `prompt` that `tokenizer` turns into `<unk>` (in order, without repeats)."""
    seen = []
    for word in prompt.split():
        if tokenizer(word, add_special_tokens=False).input_ids.count(tokenizer.unk_token_id) and word not in seen:
            seen.append(word)
    return seen
