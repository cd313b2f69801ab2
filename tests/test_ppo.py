"""The PPO trainer on tiny models: a step trains both networks; beta1 = 0 turns RTO into PPO."""

import torch

from rto.config import build
from rto.stages.ppo import PPOStageConfig, PPOTrainer


def _cfg(tiny_dirs, prompt_file, tmp_path, **kw):
    values = dict(policy=tiny_dirs["policy"], reward_model=tiny_dirs["rm"], dpo_model=tiny_dirs["dpo"],
                  prompts=prompt_file, out=str(tmp_path / "out"), iterations=1, rollout_batch_size=8,
                  mini_batch_size=4, max_new_tokens=8, actor_lr=1e-3, critic_lr=1e-3, warmup_ratio=0.0,
                  eval_every=0, threads=1)
    values.update(kw)
    return build(PPOStageConfig, values, "test")


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_one_step_changes_policy_and_critic(tiny_dirs, prompt_file, tmp_path):
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.1))
    before_p, before_c = _params(trainer.policy), _params(trainer.critic)
    exp = trainer.make_experience(trainer._next_prompts())
    stats = trainer.train_on(exp)
    after_p, after_c = _params(trainer.policy), _params(trainer.critic)
    assert any(not torch.equal(before_p[k], after_p[k]) for k in before_p)
    assert any(not torch.equal(before_c[k], after_c[k]) for k in before_c)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    # Frozen models never change.
    assert all(not p.requires_grad for p in trainer.ref.parameters())


def _rewards(tiny_dirs, prompt_file, tmp_path, **kw):
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, **kw))
    torch.manual_seed(123)
    return trainer.make_experience(trainer.prompts[:8])["rewards"]


def test_beta1_zero_gives_identical_token_rewards(tiny_dirs, prompt_file, tmp_path):
    sparse = _rewards(tiny_dirs, prompt_file, tmp_path, reward="sparse")
    rto_off = _rewards(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.0)
    rto_on = _rewards(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.5, dpo_clip=None)
    assert torch.equal(sparse, rto_off)
    assert not torch.allclose(sparse, rto_on)  # the check above is not vacuous


def test_gradient_accumulation_invariance(tiny_dirs, prompt_file, tmp_path):
    """One optimiser step over the mini-batch equals accumulated micro-batches."""
    results = []
    for micro in (0, 2):
        trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="sparse", rollout_batch_size=4,
                                  mini_batch_size=4, micro_batch_size=micro))
        torch.manual_seed(5)
        exp = trainer.make_experience(trainer.prompts[:4])
        trainer.train_on(exp)
        results.append((_params(trainer.policy), _params(trainer.critic)))
    for a, b in zip(results[0], results[1]):
        for k in a:
            assert torch.allclose(a[k], b[k], atol=1e-6), k


def test_custom_token_reward_is_added_with_its_weight(tiny_dirs, prompt_file, tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text("import torch\n"
                 "def first_token_bonus(prompt_ids, prompt_mask, response_ids, response_mask):\n"
                 "    out = torch.zeros(response_ids.shape)\n"
                 "    out[:, 0] = 1.0\n"
                 "    return out\n")
    base = _rewards(tiny_dirs, prompt_file, tmp_path, reward="sparse")
    with_bonus = _rewards(tiny_dirs, prompt_file, tmp_path, reward="sparse",
                          custom_rewards=[f"{f}:first_token_bonus=0.25"])
    expected = base.clone()
    expected[:, 0] += 0.25
    assert torch.allclose(with_bonus, expected)


def test_task_gold_token_reward_sums_to_gold(tiny_dirs, prompt_file, tmp_path, keyed):
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="dpo-only", beta1=0.0, kl_coef=0.0,
                              task="keyed", custom_rewards=["task:gold"], estimator="reinforce++"))
    assert trainer.rm is None and trainer.dpo is None and trainer.critic is None
    torch.manual_seed(0)
    exp = trainer.make_experience(trainer.prompts[:8])
    from rto.rollout import decode_responses

    texts = decode_responses(trainer.tokenizer, exp["batch"])
    gold = torch.tensor([keyed.gold_reward(p, t) for p, t in zip(trainer.prompts[:8], texts)])
    assert torch.allclose(exp["rewards"].sum(-1), gold, atol=1e-5)


def test_same_seed_same_run(tiny_dirs, prompt_file, tmp_path):
    runs = []
    for i in range(2):
        trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path / str(i), reward="rto", beta1=0.1, iterations=2))
        trainer.train()
        runs.append((_params(trainer.policy), _params(trainer.critic), trainer.history))
    (p0, c0, h0), (p1, c1, h1) = runs
    assert all(torch.equal(p0[k], p1[k]) for k in p0) and all(torch.equal(c0[k], c1[k]) for k in c0)
    strip = lambda h: [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per_s"))} for m in h]
    assert strip(h0) == strip(h1)


def test_old_logprobs_equal_a_fresh_forward(tiny_dirs, prompt_file, tmp_path):
    """The rollout's log-probs, used as 'old' in the ratio, equal an unpadded forward pass per response."""
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="sparse", temperature=0.8))
    exp = trainer.make_experience(trainer.prompts[:8])
    batch = exp["batch"]
    for b in range(8):
        p_ids = batch.prompt_ids[b][batch.prompt_mask[b] > 0]
        n = int(batch.response_mask[b].sum())
        r_ids = batch.response_ids[b, :n]
        with torch.no_grad():
            logits = trainer.policy(torch.cat([p_ids, r_ids])[None]).logits[0, len(p_ids) - 1:-1] / 0.8
        fresh = torch.log_softmax(logits, -1).gather(-1, r_ids[:, None]).squeeze(-1)
        assert torch.allclose(exp["old_logp"][b, :n], fresh, atol=1e-5)


def test_experience_rewards_with_padding_on_both_sides(tiny_dirs, prompt_file, tmp_path):
    """Left-padded prompts, right-padded responses: the score lands on each response's last token."""
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.2, dpo_clip=None,
                              kl_coef=0.1, max_new_tokens=10))
    torch.manual_seed(4)
    exp = trainer.make_experience(trainer.prompts[:8])
    batch = exp["batch"]
    assert (batch.prompt_mask == 0).any(), "the prompts should need left padding"
    lengths = batch.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1, "the responses should have different lengths"
    m = batch.response_mask.float()
    rest = exp["rewards"] - (-0.1 * exp["kl"] + exp["dpo_term"]) * m
    for b in range(8):
        last = int(lengths[b]) - 1
        assert torch.allclose(rest[b, last], exp["score"][b], atol=1e-5)
        rest[b, last] = 0
    assert torch.allclose(rest, torch.zeros_like(rest), atol=1e-6)
    assert (exp["rewards"][m == 0] == 0).all()


def test_missing_eos_penalty(tiny_dirs, prompt_file, tmp_path):
    kw = dict(reward="sparse", max_new_tokens=3)
    scores = []
    for penalty in (None, 2.0):
        trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, missing_eos_penalty=penalty, **kw))
        torch.manual_seed(6)
        exp = trainer.make_experience(trainer.prompts[:8])
        scores.append((exp["score"], exp["has_eos"]))
    (s0, eos), (s1, _) = scores
    assert (~eos).any()
    assert torch.allclose(s1, torch.where(eos, s0, s0 - 2.0))


def test_adaptive_kl_controller():
    from rto.core.kl_control import AdaptiveKL, FixedKL

    ctl = AdaptiveKL(0.1, target=6.0, horizon=100)
    ctl.update(current_kl=12.0, n_steps=10)  # error clipped to +0.2 -> x1.02
    assert abs(ctl.value - 0.102) < 1e-12
    ctl.update(current_kl=3.0, n_steps=10)  # error -0.5 clipped to -0.2 -> x0.98
    assert abs(ctl.value - 0.102 * 0.98) < 1e-12
    fixed = FixedKL(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1
