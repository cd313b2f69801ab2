"""GRPO and RLOO (rto.core.advantages) against hand computations, the loss aggregations
(rto.core.losses.LOSS_AGGREGATIONS), and a critic-free run laid out in groups."""

from __future__ import annotations

import math

import pytest
import torch

from rto.core.advantages import ESTIMATORS, group_baselined
from rto.core.losses import LOSS_AGGREGATIONS, kl_penalty_loss

# Two prompts, groups of 3 responses, ragged lengths (right-padded); one response is empty.
MASK = torch.tensor(
    [
        [1, 1, 1, 0],
        [1, 1, 0, 0],
        [1, 1, 1, 1],
        [1, 0, 0, 0],
        [1, 1, 1, 0],
        [0, 0, 0, 0],
    ]
)


def _returns_by_hand(rewards, mask, gamma):
    """Per response: the return-to-go of every token, by a plain loop."""
    out = []
    for r, m in zip(rewards.tolist(), mask.tolist()):
        n = sum(m)
        g = [0.0] * len(m)
        running = 0.0
        for t in reversed(range(n)):
            running = r[t] + gamma * running
            g[t] = running
        out.append(g)
    return out


def _by_hand(rewards, mask, k, leave_one_out, scale, gamma=1.0, eps=1e-4):
    g = _returns_by_hand(rewards, mask, gamma)
    totals = [row[0] if sum(m) else 0.0 for row, m in zip(g, mask.tolist())]
    out = []
    for i, (row, m) in enumerate(zip(g, mask.tolist())):
        start = i - i % k
        group = totals[start : start + k]
        others = [x for j, x in enumerate(group) if start + j != i]
        b = sum(others) / len(others) if leave_one_out else sum(group) / k
        s = 1.0
        if scale == "group":
            mean = sum(group) / k
            s = math.sqrt(sum((x - mean) ** 2 for x in group) / (k - 1)) + eps
        elif scale == "batch":
            mean = sum(totals) / len(totals)
            s = math.sqrt(sum((x - mean) ** 2 for x in totals) / (len(totals) - 1)) + eps
        out.append([(x - b) / s if mt else 0.0 for x, mt in zip(row, m)])
    return torch.tensor(out)


def _sparse():
    """A score at each response's last token only (standard GRPO/RLOO)."""
    scores = torch.tensor([1.0, 0.0, 2.0, -1.0, 0.5, 0.3])
    rewards = torch.zeros(MASK.shape)
    for i, n in enumerate(MASK.sum(-1).tolist()):
        if n:
            rewards[i, n - 1] = scores[i]
    return rewards


def _dense():
    """RTO-like: a term on every token plus the score at the last one."""
    torch.manual_seed(0)
    return (_sparse() + 0.1 * torch.randn(MASK.shape)) * MASK


@pytest.mark.parametrize("rewards", [_sparse(), _dense()], ids=["sparse", "dense"])
@pytest.mark.parametrize("scale", ["group", "none", "batch"])
def test_grpo_against_a_hand_computation(rewards, scale):
    adv, returns = group_baselined(rewards, MASK, 3, leave_one_out=False, scale=scale)
    torch.testing.assert_close(adv, _by_hand(rewards, MASK, 3, False, scale), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(returns, torch.tensor(_returns_by_hand(rewards, MASK, 1.0)))


@pytest.mark.parametrize("rewards", [_sparse(), _dense()], ids=["sparse", "dense"])
def test_rloo_against_a_hand_computation(rewards):
    adv, _ = ESTIMATORS["rloo"].compute(
        rewards, MASK, torch.zeros(MASK.shape), gamma=0.9, all_sum=lambda t: t, group_size=3, scale_rewards="group"
    )
    torch.testing.assert_close(adv, _by_hand(rewards, MASK, 3, True, "none", gamma=0.9), rtol=1e-5, atol=1e-6)


def test_sparse_grpo_is_the_usual_one_advantage_per_response():
    """At gamma 1 with the score only at the end, every token of a response gets (R - mean) / std."""
    adv, _ = group_baselined(_sparse(), MASK, 3, leave_one_out=False, scale="group")
    for i, n in enumerate(MASK.sum(-1).tolist()):
        assert torch.allclose(adv[i, :n], adv[i, 0].expand(n))


def test_whole_groups_split_over_processes_equal_one_process():
    """Each process holds whole groups (the trainer's layout): group statistics computed on each
    half are those of the whole batch; the batch std is gathered through all_sum."""
    rewards = _dense()
    whole, _ = group_baselined(rewards, MASK, 3, leave_one_out=False, scale="group")
    halves = [
        group_baselined(rewards[s], MASK[s], 3, leave_one_out=False, scale="group")[0]
        for s in (slice(0, 3), slice(3, 6))
    ]
    torch.testing.assert_close(torch.cat(halves), whole)
    # "batch" needs every process's totals: the two halves' sums, added as all_sum would.
    full, _ = group_baselined(rewards, MASK, 3, leave_one_out=False, scale="batch")
    other = {0: slice(3, 6), 1: slice(0, 3)}

    def all_sum_for(rank):
        def all_sum(t):  # what the other process contributes to the same collective
            from rto.core.advantages import discounted_returns

            theirs = discounted_returns(rewards[other[rank]], MASK[other[rank]])
            first = MASK[other[rank]].long().argmax(-1, keepdim=True)
            tot = (theirs.gather(1, first) * MASK[other[rank]].gather(1, first)).reshape(-1)
            if t.dim() == 1 and t.numel() == 2:  # (sum, count)
                return t + torch.stack([tot.sum(), torch.tensor(float(tot.numel()))])
            mean = t.new_tensor(0.0) + full_mean
            return t + ((tot - mean) ** 2).sum()

        return all_sum

    totals = torch.tensor(
        [r[0] if sum(m) else 0.0 for r, m in zip(_returns_by_hand(rewards, MASK, 1.0), MASK.tolist())]
    )
    full_mean = totals.mean()
    parts = [
        group_baselined(rewards[s], MASK[s], 3, leave_one_out=False, scale="batch", all_sum=all_sum_for(r))[0]
        for r, s in ((0, slice(0, 3)), (1, slice(3, 6)))
    ]
    torch.testing.assert_close(torch.cat(parts), full, rtol=1e-5, atol=1e-6)


def test_groups_must_be_whole():
    with pytest.raises(ValueError, match="groups of 4"):
        group_baselined(_sparse(), MASK, 4, leave_one_out=False)
    with pytest.raises(ValueError, match="at least 2"):
        group_baselined(_sparse(), MASK, 1, leave_one_out=True)


def test_loss_aggregations_by_hand():
    x = torch.arange(24, dtype=torch.float32).view(6, 4) / 10
    m = MASK.float()
    rows = [(x[i] * m[i]).sum() for i in range(6)]
    counts = m.sum(-1)
    assert torch.isclose(LOSS_AGGREGATIONS["token-mean"](x, MASK), sum(rows) / counts.sum())
    assert torch.isclose(LOSS_AGGREGATIONS["seq-mean-token-sum"](x, MASK), sum(rows) / 6)
    means = [rows[i] / counts[i] if counts[i] else torch.tensor(0.0) for i in range(6)]
    assert torch.isclose(LOSS_AGGREGATIONS["seq-mean-token-mean"](x, MASK), sum(means) / 6)


def test_kl_loss_is_k3_and_zero_at_the_reference():
    logp = torch.log(torch.tensor([[0.5, 0.2, 0.9, 0.1]])).requires_grad_()
    ref = torch.log(torch.tensor([[0.4, 0.2, 0.6, 0.3]]))
    mask = torch.tensor([[1, 1, 1, 0]])
    r = ref.exp() / logp.detach().exp()  # pi_ref / pi
    expected = ((r - 1 - r.log()) * mask).sum() / 3
    assert torch.isclose(kl_penalty_loss(logp, ref, mask, "token-mean"), expected)
    assert kl_penalty_loss(ref, ref, mask) == 0


@pytest.mark.parametrize("estimator, reward", [("grpo", "rto"), ("rloo", "sparse")])
def test_a_critic_free_run_has_no_critic_and_samples_whole_groups(tiny_dirs, prompt_file, tmp_path, estimator, reward):
    from rto.rl.trainer import PPOTrainer
    from tests.test_ppo import _cfg

    cfg = _cfg(
        tiny_dirs,
        prompt_file,
        tmp_path,
        estimator=estimator,
        reward=reward,
        beta1=0.1,
        num_generations=4,
        kl_loss_coef=0.05,
        loss_agg="token-mean",
    )
    trainer = PPOTrainer(cfg)
    assert trainer.models.critic is None and [net.name for net in trainer.trained] == ["policy"]
    assert not any("critic" in k for k in trainer.models.trained())
    prompts = trainer._next_prompts()
    assert len(prompts) == 8 and all(len(set(prompts[i : i + 4])) == 1 for i in (0, 4)) and prompts[0] != prompts[4]
    torch.manual_seed(0)
    exp = trainer.make_experience(prompts)
    # Each group's advantages as group_baselined gives them for the experience's own rewards.
    want, _ = group_baselined(
        exp.rewards,
        exp.batch.response_mask,
        4,
        leave_one_out=estimator == "rloo",
        scale="group" if estimator == "grpo" else "none",
    )
    torch.testing.assert_close(exp.advantages, want)
    before = {k: v.clone() for k, v in trainer.models.policy.named_parameters()}
    stats = trainer.train_on(exp)
    assert "policy/kl_loss" in stats and not any(k.startswith("critic/") for k in stats)
    assert any(not torch.equal(before[k], v) for k, v in trainer.models.policy.named_parameters())


def test_group_estimators_need_groups(tiny_dirs, prompt_file, tmp_path):
    from rto.io.errors import UserError
    from tests.test_ppo import _cfg

    with pytest.raises(UserError, match="--num-generations >= 2"):
        _cfg(tiny_dirs, prompt_file, tmp_path, estimator="grpo")
    with pytest.raises(UserError, match="multiple of --num-generations"):
        _cfg(tiny_dirs, prompt_file, tmp_path, estimator="rloo", num_generations=3)
