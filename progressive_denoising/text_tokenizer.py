"""A caption tokenizer trained from scratch and saved as a T5 tokenizer.

No pretrained T5 can be downloaded here, so PDM-Shapes models (and the tests) train a small SentencePiece-style
Unigram tokenizer on their captions. It behaves like T5's: `<pad>` = 0, `</s>` = 1 appended to every prompt,
`<unk>` = 2, so the empty prompt (the unconditional input of classifier-free guidance) is the lone `</s>`.
"""

from typing import Iterable

from tokenizers import SentencePieceUnigramTokenizer
from tokenizers.processors import TemplateProcessing
from transformers import T5TokenizerFast

SPECIAL_TOKENS = ("<pad>", "</s>", "<unk>")


def train_caption_tokenizer(captions: Iterable[str], vocab_size: int = 1000) -> T5TokenizerFast:
    """Train a Unigram tokenizer on `captions` and wrap it as a `T5TokenizerFast` (no extra ids)."""
    tokenizer = SentencePieceUnigramTokenizer()
    tokenizer.train_from_iterator(
        captions, vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), unk_token="<unk>", show_progress=False
    )
    tokenizer.post_processor = TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    return T5TokenizerFast(
        tokenizer_object=tokenizer._tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0
    )
