"""Tiny models and tokenizers made by the tests: nothing is downloaded."""

import torch
from transformers import T5Config, T5EncoderModel

from progressive_denoising import PDMConfig, PDMForTextToImage
from progressive_denoising.text_tokenizer import train_caption_tokenizer

CAPTIONS = [
    f"a {size} {colour} {shape}{where}"
    for size in ("small", "large")
    for colour in ("red", "green", "blue", "yellow", "white")
    for shape in ("circle", "square", "triangle")
    for where in ("", " in the top left", " in the center", " left of a small blue square")
]


def tiny_text_config(vocab_size=128):
    return T5Config(vocab_size=vocab_size, d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8,
                    dropout_rate=0.0, decoder_start_token_id=0)


def tiny_config(config_class=PDMConfig, **overrides):
    kwargs = dict(text_config=tiny_text_config(), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, codebook_size=16, token_grid_size=(4, 4), num_stages=4)
    kwargs.update(overrides)
    return config_class(**kwargs)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return PDMForTextToImage(tiny_config(**overrides)).eval()


def tiny_tokenizer(vocab_size=100):
    return train_caption_tokenizer(CAPTIONS, vocab_size=vocab_size)


def save_tiny_t5(path, vocab_size=128, seed=0):
    torch.manual_seed(seed)
    T5EncoderModel(tiny_text_config(vocab_size)).save_pretrained(path)
    return path


def tiny_vqmodel(num_codes=16, seed=0):
    """A random diffusers VQModel: 16x16 RGB images <-> 4x4 codes."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    return VQModel(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(8, 8, 8), layers_per_block=1,
        latent_channels=4, num_vq_embeddings=num_codes, vq_embed_dim=4, norm_num_groups=4, sample_size=16,
    ).eval()
