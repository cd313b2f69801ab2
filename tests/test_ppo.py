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
