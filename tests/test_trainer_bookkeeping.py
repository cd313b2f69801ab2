"""Trainer bookkeeping around the update: a skipped rollout still advances the learning-rate
schedules, and the dev KL is scored at the temperature it was sampled at."""

from pathlib import Path

import torch

from rto.rl.trainer import PPOTrainer
from tests.test_ppo import _cfg

NAN_REWARD = str(Path(__file__).parent / "fixtures" / "nan_reward.py")


def test_a_skipped_nonfinite_rollout_still_steps_the_schedules(tiny_dirs, prompt_file, tmp_path, monkeypatch):
    monkeypatch.setenv("NAN_ROLLOUTS", "2")
    trainer = PPOTrainer(
        _cfg(
            tiny_dirs,
            prompt_file,
            tmp_path,
            reward="sparse",
            iterations=3,
            custom_rewards=[f"{NAN_REWARD}:reward=1.0"],
            lr_schedule="linear",
        )
    )
    trainer.train()
    assert trainer.state.history[1]["guard/nonfinite_rollout"] == 1.0
    # 3 iterations x 2 mini-batches: the schedules end where the plan says, skipped steps included.
    assert trainer.total_steps == 6
    assert [net.name for net in trainer.trained] == ["policy", "critic"]
    assert all(net.sched.last_epoch == 6 for net in trainer.trained)
    # and the learning rate logged after iteration 3 is the planned one at step 6 (linear: 0).
    assert trainer.state.history[2]["lr/policy"] == 0.0


def test_dev_kl_is_scored_at_the_sampling_temperature(tiny_dirs, prompt_file, tmp_path, monkeypatch):
    import rto.lm.evaluate

    seen = []
    real_sample = rto.lm.evaluate.sample

    def recording_sample(*args, **kwargs):
        texts, batches = real_sample(*args, **kwargs)
        seen.extend(batches)
        return texts, batches

    monkeypatch.setattr(rto.lm.evaluate, "sample", recording_sample)
    temperature = 0.5
    # A reference that differs from the policy (the perturbed copy), so the KL is not zero.
    trainer = PPOTrainer(
        _cfg(
            tiny_dirs,
            prompt_file,
            tmp_path,
            reward="sparse",
            ref=tiny_dirs["dpo"],
            temperature=temperature,
            eval_prompts=prompt_file,
            eval_every=1,
            n_eval=8,
        )
    )
    point = trainer.evaluate(0)
    assert seen
    by_hand = []
    with torch.no_grad():
        for b in seen:
            for i in range(b.response_ids.shape[0]):
                n = int(b.response_mask[i].sum())
                p = b.prompt_ids[i][b.prompt_mask[i].bool()]
                full = torch.cat([p, b.response_ids[i, :n]]).unsqueeze(0)
                lp = [
                    torch.log_softmax(m(full).logits[0, len(p) - 1 : -1] / temperature, -1)
                    .gather(-1, b.response_ids[i, :n, None])
                    .sum()
                    for m in (trainer.models.policy, trainer.models.ref)
                ]
                by_hand.append(float(lp[0] - lp[1]))
    expected = sum(by_hand) / len(by_hand)
    assert abs(point["kl_to_ref"] - expected) < 1e-4 * max(1.0, abs(expected)), (point["kl_to_ref"], expected)
