"""The learned order: `PDMForTextToImage.rollout` (the state head as a policy over both decisions of a stage, with the
stage step of `generate`) and training/train_policy.py (REINFORCE, eq. 6-7)."""

import math
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from tiny import tiny_model, tiny_tokenizer, tiny_vqmodel
from train_data import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from progressive_denoising.sampling import gumbel_top_k, sample_replacements
from training.train_policy import AlignmentReward, Baseline


def test_plackett_luce_log_probability_of_a_draw():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0]], requires_grad=True)
    candidates = torch.tensor([[True, True, False, True, True]])
    chosen, log_prob = gumbel_top_k(logits, candidates, 2, torch.Generator().manual_seed(0))
    assert chosen.sum() == 2 and not chosen[0, 2]
    # Recompute by hand for both possible orders of the two chosen positions.
    a, b = chosen[0].nonzero().flatten().tolist()
    weights = logits.detach()[0].exp() * candidates[0]
    def pl(first, second):
        return math.log(weights[first] / weights.sum()) + math.log(weights[second] / (weights.sum() - weights[first]))
    assert min(abs(log_prob.item() - pl(a, b)), abs(log_prob.item() - pl(b, a))) < 1e-5
    log_prob.sum().backward()
    assert logits.grad[0, 2] == 0 and logits.grad.abs().sum() > 0


def test_draws_follow_the_softmax_of_the_generate_logits():
    logits = torch.tensor([[2.0, 0.0, 0.0, -9.0]]).expand(4000, 4)
    candidates = torch.ones(4000, 4, dtype=torch.bool)
    chosen, _ = gumbel_top_k(logits, candidates, 1, torch.Generator().manual_seed(1))
    frequency = chosen.float().mean(0)
    expected = logits[0].softmax(-1)
    assert torch.allclose(frequency, expected, atol=0.03)


def test_reinforce_with_the_baseline_raises_the_reward():
    # Reward 1 when position 0 is among the two drawn: the policy-gradient loss of policy_step, minimised, must make
    # that draw more likely.
    logits = torch.zeros(1, 6, requires_grad=True)
    optimiser = torch.optim.SGD([logits], lr=0.5)
    baseline, generator = Baseline("moving-average", 0.9), torch.Generator().manual_seed(0)
    candidates = torch.ones(32, 6, dtype=torch.bool)
    for _ in range(60):
        chosen, log_prob = gumbel_top_k(logits.expand(32, 6), candidates, 2, generator)
        rewards = chosen[:, 0].float()
        loss = -((rewards - baseline(rewards)) * log_prob).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert logits.softmax(-1)[0, 0] > 0.5, logits


def test_per_row_counts_never_exceed_the_candidates():
    logits = torch.zeros(2, 5)
    candidates = torch.tensor([[True, True, False, False, False], [True] * 5])
    chosen, log_prob = gumbel_top_k(logits, candidates, torch.tensor([[3], [2]]), torch.Generator().manual_seed(0))
    assert chosen.sum(-1).tolist() == [2, 2] and not (chosen & ~candidates).any()
    # Plackett-Luce probability of the ordered draw: row 0 takes its 2 candidates (1/2 * 1), row 1 2 of 5 (1/5 * 1/4)
    assert torch.allclose(log_prob, torch.tensor([math.log(1 / 2), math.log(1 / 20)]), atol=1e-5)


def test_replacements_are_drawn_with_probability_sigmoid_of_the_margin():
    # margin log p(replace) - log p(keep) = 1 at position 0, -1 at position 1; position 2 is not a candidate
    state_logits = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 5.0]]]).expand(4000, 3, 3)
    candidates = torch.tensor([True, True, False]).expand(4000, 3)
    chosen, log_prob = sample_replacements(state_logits, candidates, 3, torch.Generator().manual_seed(0))
    sigmoid = torch.sigmoid(torch.tensor([1.0, -1.0]))
    assert torch.allclose(chosen[:, :2].float().mean(0), sigmoid, atol=0.03) and not chosen[:, 2].any()
    expected = torch.where(chosen[:, :2], sigmoid.log(), (1 - sigmoid).log()).sum(-1)
    assert torch.allclose(log_prob, expected, atol=1e-5)


def test_a_cold_policy_chooses_what_generate_chooses():
    from progressive_denoising.sampling import choose_stage_positions

    state_logits = torch.randn(4, 16, 3)
    masked = torch.rand(4, 16) < 0.5
    args = (state_logits, masked, ~masked, torch.full((4, 1), 3), torch.full((4, 1), 2))
    greedy_generate, greedy_replace, none = choose_stage_positions(*args)
    cold_generate, cold_replace, log_prob = choose_stage_positions(*args, policy_temperature=1e-4,
                                                                   generator=torch.Generator().manual_seed(0))
    assert none is None and torch.isfinite(log_prob).all()
    assert torch.equal(greedy_generate, cold_generate) and torch.equal(greedy_replace, cold_replace)


def test_per_prompt_baseline_is_the_mean_of_the_prompts_other_rollouts():
    baseline = Baseline("per-prompt", 0.9, group=3)
    rewards = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 6.0])
    assert torch.equal(baseline(rewards), torch.tensor([2.5, 2.0, 1.5, 3.0, 3.0, 0.0]))


def test_greedy_rollout_is_generate():
    # The policy's rollout runs generate's stage step: without exploration it gives generate's codes, seed for seed.
    model = tiny_model().eval()
    ids = torch.randint(0, 32, (3, 5))
    generators = lambda: [torch.Generator().manual_seed(seed) for seed in range(3)]  # noqa: E731
    for temperature in (1.0, 0.7):
        greedy = model.rollout(ids, num_stages=4, temperature=temperature, generator=generators(),
                               policy_temperature=None)
        expected = model.generate(ids, num_stages=4, order="learned", temperature=temperature, generator=generators(),
                                  return_stages=True)
        assert torch.equal(greedy.codes, expected.codes) and torch.equal(greedy.replaced, expected.replaced)
        assert greedy.log_prob is None


def test_rollout_fills_every_position_and_its_log_probability_trains_the_state_head_only():
    model = tiny_model()
    model.requires_grad_(False)
    model.state_head.requires_grad_(True)
    out = model.rollout(torch.randint(0, 32, (3, 5)), num_stages=4, generator=torch.Generator().manual_seed(0))
    assert out.codes.shape == (3, 16) and (out.codes < 16).all() and torch.isfinite(out.log_prob).all()
    assert (out.log_prob < 0).all()
    out.log_prob.sum().backward()
    assert model.state_head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for name, p in model.named_parameters() if not name.startswith("state_head."))


def test_rollout_also_decides_replacements():
    # A state head that calls every generated code "replace": the policy replaces (bounded by the stage before).
    model = tiny_model()
    with torch.no_grad():
        model.state_head.weight.zero_()
        model.state_head.bias.copy_(torch.tensor([0.0, 0.0, 4.0]))
    out = model.rollout(torch.randint(0, 32, (8, 5)), num_stages=4, generator=torch.Generator().manual_seed(0))
    assert out.replaced[:, 0].sum() == 0 and out.replaced[:, 1:].sum() > 0
    assert (out.replaced[:, 1:] <= 4).all()  # no more than the 4 codes a stage generates


def test_rollout_draws_positions_by_probability_not_raw_logit():
    from test_generate import DisagreeingStateHead

    model = tiny_model()
    model.state_head = DisagreeingStateHead()
    ids = torch.randint(0, 32, (64, 5))
    # Record the decoder's input at every stage; the rollout samples, so count over 64 rollouts.
    codes_after = []
    decoder = model.decoder.forward
    model.decoder.forward = lambda codes, *args: codes_after.append(codes.clone()) or decoder(codes, *args)
    model.rollout(ids, num_stages=4, generator=torch.Generator().manual_seed(0))
    filled = codes_after[1] != model.config.mask_token_id  # the decoder input of stage 2 = codes after stage 1
    share = filled.float().mean(0)
    assert (share[4:8] > 0.95).all() and (share[:4] < 0.05).all(), share


def test_alignment_reward_prefers_the_prompt_the_image_shows():
    from progressive_denoising.pdm_shapes import data as shapes_data
    from progressive_denoising import BUNDLED_MODEL

    rng = np.random.default_rng(0)
    scenes = [shapes_data.sample_scene(rng, size=32) for _ in range(8)]
    pixels = torch.stack([torch.from_numpy(np.array(shapes_data.render_scene(s, 32).convert("RGB"))) for s in scenes])
    images = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1  # the VQ decoder's range
    reward = AlignmentReward(os.path.join(BUNDLED_MODEL, "recogniser"), "cpu")
    right = reward(images, {"prompts": [shapes_data.caption_for(s) for s in scenes]})
    wrong = reward(images, {"prompts": [shapes_data.caption_for(s) for s in scenes[1:] + scenes[:1]]})
    assert right.shape == (8,) and (right <= 2).all() and (wrong >= 0).all()
    assert right.mean() > 1.8 and wrong.mean() < right.mean() - 0.5, (right, wrong)


def tiny_pipeline_and_data(tmp_path):
    """(pipeline folder, data set folder): a tiny saved pipeline and a tokenized data set to train a policy on."""
    from progressive_denoising.pipeline_pdm import PDMPipeline

    model_dir = str(tmp_path / "pipeline")
    PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel()).save_pretrained(model_dir)
    return model_dir, make_dataset(str(tmp_path / "data"), num_train=16, num_validation=4)


def run_train_policy(tmp_path, *options):
    """train_policy.py on a tiny saved pipeline and data set; returns (pipeline folder, output folder)."""
    (model_dir, data), out = tiny_pipeline_and_data(tmp_path), str(tmp_path / "policy")
    result = subprocess.run(
        [sys.executable, "-m", "training.train_policy", "--model_name_or_path", model_dir, "--dataset", data,
         "--output_dir", out, *options],
        env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "steps: " in result.stderr and "reward=" in result.stderr  # the progress bar, as every script shows it
    assert f"saved {os.path.join(out, 'final')}" in result.stdout
    return model_dir, out


def test_policy_training_changes_the_state_head_only(tmp_path):
    from progressive_denoising.pipeline_pdm import PDMPipeline

    model_dir, out = run_train_policy(tmp_path, "--max_train_steps", "3", "--train_batch_size", "4",
                                      "--learning_rate", "1e-2", "--reward", "l2", "--rollouts_per_prompt", "2",
                                      "--baseline", "per-prompt")
    before = load_file(os.path.join(model_dir, "model", "model.safetensors"))
    after = load_file(os.path.join(out, "final", "model", "model.safetensors"))
    assert not torch.equal(before["state_head.weight"], after["state_head.weight"])
    for name in before:
        if not name.startswith("state_head."):
            assert torch.equal(before[name], after[name]), f"{name} changed with train_decoder false"
    pipe = PDMPipeline.from_pretrained(os.path.join(out, "final"))
    assert pipe.model.config.training_order == "learned"
    ids = pipe.tokenizer(["a small red circle"], return_tensors="pt").input_ids
    assert pipe.model.generate(ids, generator=torch.Generator().manual_seed(0)).shape == (1, 16)
    assert os.path.exists(os.path.join(out, "rewards.jsonl"))


def test_max_minutes_stops_early_and_saves(tmp_path):
    _, out = run_train_policy(tmp_path, "--max_train_steps", "1000", "--max_minutes", "1e-9", "--train_batch_size",
                              "2")
    with open(os.path.join(out, "rewards.jsonl")) as f:
        assert len(f.readlines()) == 1  # the limit is checked after each step: one step, then the save
    with open(os.path.join(out, "final", "README.md")) as f:
        assert "for 1 steps" in f.read()  # the card tells the steps done, not max_train_steps
    assert os.path.exists(os.path.join(out, "final", "model", "model.safetensors"))


def test_reward_curve_joins_a_continued_run_and_measures_its_slope(tmp_path):
    import json

    from benchmarks.reward_curve import summarise

    for part, steps in (("a", range(0, 100)), ("b", range(100, 150))):
        os.makedirs(tmp_path / part)
        with open(tmp_path / part / "rewards.jsonl", "w") as f:
            f.writelines(json.dumps({"step": s, "reward": 0.5 + 0.001 * s}) + "\n" for s in steps)
    curve = summarise(f"{tmp_path / 'a'},{tmp_path / 'b'}", block=50)
    assert curve["steps"] == 150 and len(curve["block_means"]) == 3
    assert math.isclose(curve["slope_per_100_steps"], 0.1, rel_tol=1e-6) and curve["slope_standard_error"] < 1e-6


class RecordingReward:
    """A custom reward that remembers which batch keys it was given."""

    def __init__(self, uses_targets):
        self.uses_targets, self.keys = uses_targets, set()

    def __call__(self, images, batch):
        self.keys |= set(batch)
        return -images.float().mean(dim=(1, 2, 3))


def test_targets_are_decoded_only_for_rewards_that_use_them(tmp_path):
    from training import train_policy

    model_dir, data = tiny_pipeline_and_data(tmp_path)
    for uses_targets in (True, False):
        reward = RecordingReward(uses_targets)
        train_policy.main(["--model_name_or_path", model_dir, "--dataset", data, "--max_train_steps", "1",
                           "--train_batch_size", "2", "--output_dir", str(tmp_path / f"policy-{uses_targets}")],
                          reward_fn=reward)
        assert "prompts" in reward.keys and ("target_images" in reward.keys) == uses_targets
