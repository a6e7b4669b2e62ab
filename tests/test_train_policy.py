"""training/train_policy.py: the state head as a policy over positions, trained by REINFORCE (eq. 6-7)."""

import math
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file

from tiny import tiny_model, tiny_tokenizer, tiny_vqmodel
from train_data import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from training.train_policy import Baseline, rollout, sample_positions  # noqa: E402


def test_plackett_luce_log_probability_of_a_draw():
    logits = torch.tensor([[0.5, -1.0, 2.0, 0.0, 1.0]], requires_grad=True)
    candidates = torch.tensor([[True, True, False, True, True]])
    chosen, log_prob = sample_positions(logits, candidates, 2, torch.Generator().manual_seed(0))
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
    chosen, _ = sample_positions(logits, candidates, 1, torch.Generator().manual_seed(1))
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
        chosen, log_prob = sample_positions(logits.expand(32, 6), candidates, 2, generator)
        rewards = chosen[:, 0].float()
        loss = -((rewards - baseline(rewards)) * log_prob).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    assert logits.softmax(-1)[0, 0] > 0.5, logits


def test_rollout_fills_every_position():
    model = tiny_model()
    text_states = torch.randn(3, 5, 32)
    codes, log_prob = rollout(model, text_states, torch.ones(3, 5, dtype=torch.bool), 4, 1.0,
                              torch.Generator().manual_seed(0), train_decoder=False)
    assert codes.shape == (3, 16) and (codes < 16).all() and torch.isfinite(log_prob).all()


def test_rollout_draws_positions_by_probability_not_raw_logit():
    from test_generate import DisagreeingStateHead

    model = tiny_model()
    model.state_head = DisagreeingStateHead()
    text_states = torch.randn(64, 5, 32)
    # Record the decoder's input at every stage; the rollout samples, so count over 64 rollouts.
    codes_after = []
    decoder = model.decoder.forward
    model.decoder.forward = lambda codes, *args: codes_after.append(codes.clone()) or decoder(codes, *args)
    rollout(model, text_states, torch.ones(64, 5, dtype=torch.bool), 4, 1.0, torch.Generator().manual_seed(0),
            train_decoder=False)
    filled = codes_after[1] != model.config.mask_token_id  # the decoder input of stage 2 = codes after stage 1
    share = filled.float().mean(0)
    assert (share[4:8] > 0.95).all() and (share[:4] < 0.05).all(), share


def test_policy_training_changes_the_state_head_only(tmp_path):
    model_dir = str(tmp_path / "pipeline")
    from progressive_denoising.pipeline_pdm import PDMPipeline

    PDMPipeline(tokenizer=tiny_tokenizer(), model=tiny_model(), vqvae=tiny_vqmodel()).save_pretrained(model_dir)
    data = make_dataset(str(tmp_path / "data"), num_train=16, num_validation=4)
    out = str(tmp_path / "policy")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "training", "train_policy.py"), "--model_name_or_path", model_dir,
         "--dataset", data, "--output_dir", out, "--max_steps", "3", "--batch_size", "4", "--learning_rate", "1e-2"],
        env=dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
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
