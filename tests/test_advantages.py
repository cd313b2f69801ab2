"""GAE, REINFORCE++ and whitening against plain Python loops."""

import random

import torch

from rto.core.advantages import discounted_returns, gae, reinforce_pp, whiten


def _gae_loop(rewards, values, length, gamma, lam):
    adv = [0.0] * len(rewards)
    last = 0.0
    for t in reversed(range(length)):
        next_v = values[t + 1] if t + 1 < length else 0.0
        delta = rewards[t] + gamma * next_v - values[t]
        last = delta + gamma * lam * last
        adv[t] = last
    ret = [adv[t] + values[t] if t < length else 0.0 for t in range(len(rewards))]
    return adv, ret


def test_gae_matches_python_loop():
    rng = random.Random(0)
    B, R = 6, 9
    lengths = [rng.randint(1, R) for _ in range(B)]
    mask = torch.tensor([[1 if t < n else 0 for t in range(R)] for n in lengths])
    rewards = torch.randn(B, R, dtype=torch.float64)
    values = torch.randn(B, R, dtype=torch.float64)
    for gamma, lam in ((1.0, 0.95), (0.9, 0.5), (1.0, 1.0)):
        adv, ret = gae(rewards, values, mask, gamma, lam)
        for b in range(B):
            ea, er = _gae_loop(rewards[b].tolist(), values[b].tolist(), lengths[b], gamma, lam)
            assert torch.allclose(adv[b], torch.tensor(ea, dtype=torch.float64))
            assert torch.allclose(ret[b], torch.tensor(er, dtype=torch.float64))


def test_discounted_returns_and_reinforce_pp():
    rng = random.Random(1)
    B, R = 5, 7
    lengths = [rng.randint(1, R) for _ in range(B)]
    mask = torch.tensor([[1 if t < n else 0 for t in range(R)] for n in lengths])
    rewards = torch.randn(B, R, dtype=torch.float64)
    gamma = 0.9
    ret = discounted_returns(rewards, mask, gamma)
    for b in range(B):
        g = 0.0
        for t in reversed(range(R)):
            if t >= lengths[b]:
                assert ret[b, t] == 0
                continue
            g = rewards[b, t].item() + gamma * g
            assert abs(ret[b, t].item() - g) < 1e-9
    adv, ret2 = reinforce_pp(rewards, mask, gamma)
    assert torch.allclose(ret2, ret)
    flat = adv[mask.bool()]
    assert abs(flat.mean().item()) < 1e-9 and abs(flat.std().item() - 1) < 1e-6


def test_whiten_ignores_padding():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 4.0, -100.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    w = whiten(x, mask)
    real = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert torch.allclose(w[mask.bool()], (real - real.mean()) / real.std(), atol=1e-5)
    assert (w[:, 2] == 0).all()
