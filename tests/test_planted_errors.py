"""Error recovering, measured: a state head trained with pseudo errors finds codes planted in a finished image."""

import torch

from benchmarks.planted_errors import plant_errors
from progressive_denoising.ordering import build_stage_tuples, order_scores, scores_to_ranks
from progressive_denoising.sampling import choose_replacements
from tiny import CAPTIONS, tiny_model, tiny_tokenizer


COLOURS = ("red", "green", "blue", "yellow", "white")


def caption_codes(caption):
    """(16,) codes of a toy image: one flat colour, the caption's (code = 3 * colour index + 1)."""
    colour = next(i for i, name in enumerate(COLOURS) if f" {name} " in f" {caption} ")
    return torch.full((16,), 3 * colour + 1)


def train_tiny(p_error, steps=300, seed=0):
    """A tiny PDM trained on flat toy images whose code follows from the caption's colour."""
    torch.manual_seed(seed)
    model, tokenizer = tiny_model(seed=seed, freeze_text_encoder=False).train(), tiny_tokenizer()
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        picks = torch.randint(len(CAPTIONS), (32,), generator=generator).tolist()
        codes = torch.stack([caption_codes(CAPTIONS[i]) for i in picks])
        ranks = scores_to_ranks(order_scores("random", 32, 16, generator=generator))
        stages = torch.randint(1, 5, (32,), generator=generator)
        tuples = build_stage_tuples(codes, ranks, stages, 4, 16, 16, p_error=p_error, generator=generator,
                                    token_loss_positions="masked")
        tokens = tokenizer([CAPTIONS[i] for i in picks], padding=True, return_tensors="pt")
        loss = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask,
                     image_tokens=tuples["image_tokens"], token_labels=tuples["token_labels"],
                     state_labels=tuples["state_labels"]).loss
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), tokenizer


@torch.no_grad()
def detect(model, tokenizer, num_errors, seed=1):
    """(share of planted codes called "replace", correct codes called "replace" per image, share repaired), with the
    image as before the last of 4 stages: a random group of 4 codes still masked, the errors among the other 12."""
    generator = torch.Generator().manual_seed(seed)
    codes = torch.stack([caption_codes(caption) for caption in CAPTIONS])
    masked = scores_to_ranks(torch.rand(codes.shape, generator=generator)) >= 12
    corrupted, planted = plant_errors(codes, num_errors, 16, generator, shown=~masked)
    corrupted = corrupted.masked_fill(masked, 16)
    tokens = tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    out = model(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask, image_tokens=corrupted)
    flagged = choose_replacements(out.state_logits, ~masked, 16)
    repaired = (out.token_logits.argmax(-1) == codes) & planted
    return ((flagged & planted).sum() / planted.sum()).item(), ((flagged & ~planted).sum() / len(codes)).item(), \
        (repaired.sum() / planted.sum()).item()


def test_plant_errors_changes_exactly_k_codes():
    codes = torch.randint(16, (50, 16), generator=torch.Generator().manual_seed(0))
    corrupted, planted = plant_errors(codes, 3, 16, torch.Generator().manual_seed(1))
    assert (planted.sum(1) == 3).all()
    assert ((corrupted != codes) == planted).all() and ((corrupted >= 0) & (corrupted < 16)).all()
    shown = torch.arange(16).expand(50, 16) >= 8
    _, planted = plant_errors(codes, 3, 16, torch.Generator().manual_seed(1), shown=shown)
    assert (planted.sum(1) == 3).all() and not (planted & ~shown).any()


def test_a_state_head_trained_with_pseudo_errors_finds_and_repairs_planted_codes():
    model, tokenizer = train_tiny(p_error=0.5)
    found, false_alarms, repaired = detect(model, tokenizer, num_errors=2)
    assert found >= 0.7 and false_alarms <= 0.5 and repaired >= 0.7, (found, false_alarms, repaired)
    # Without pseudo errors in training the state head never learns "replace": nothing is found.
    untrained_found, _, _ = detect(*train_tiny(p_error=0.0), num_errors=2)
    assert untrained_found <= 0.1, untrained_found
