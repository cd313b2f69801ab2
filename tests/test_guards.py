"""Numerical guards: non-finite updates are skipped and counted; too many in a row stop the run
with a clear message while the last good checkpoint stays intact; large KL is reported."""

import json
from pathlib import Path

import pytest

from tests.test_resume import _ppo_args

FIXTURE = str(Path(__file__).parent / "fixtures" / "nan_reward.py")


@pytest.fixture
def run_guarded(run_rto, monkeypatch, tiny_dirs, prompt_file):
    """`rto ppo` in this process, with NaN rewards on the rollouts NAN_ROLLOUTS names (the fixture)."""

    def run(out, nan_rollouts, *extra):
        monkeypatch.setenv("NAN_ROLLOUTS", nan_rollouts)
        args = _ppo_args(tiny_dirs, prompt_file, out, "--custom-rewards", f"{FIXTURE}:reward=1.0", *extra)
        return run_rto(*args[args.index("rto.cli") + 1 :])

    return run


def test_a_nonfinite_rollout_is_skipped_and_counted(tmp_path, run_guarded):
    out = tmp_path / "run"
    proc = run_guarded(out, "2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert log[1]["guard/nonfinite_rollout"] == 1.0 and log[1]["guard/skipped_steps"] == 2.0
    assert all(r["guard/skipped_steps"] == 0.0 for i, r in enumerate(log) if i != 1)


def test_consecutive_nonfinite_updates_stop_the_run_cleanly(tmp_path, run_guarded):
    out = tmp_path / "run"
    proc = run_guarded(out, "3,4,5", "--max-bad-steps", "2")
    assert proc.returncode == 2
    assert "3 consecutive non-finite updates (returns, advantages) at iteration 5" in proc.stderr
    assert "the last good checkpoint is" in proc.stderr and "step_00000004" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert (out / "checkpoints" / "step_00000004" / "meta.json").is_file()


def test_kl_beyond_the_bound_is_reported(tmp_path, run_guarded):
    out = tmp_path / "run"
    proc = run_guarded(out, "", "--kl-alert", "1e-9", "--iterations", "3")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "exceeds --kl-alert" in proc.stderr


def test_a_nonfinite_loss_skips_the_optimiser_step(tiny_dirs, prompt_file, tmp_path):
    import torch

    from rto.rl.trainer import PPOTrainer
    from tests.test_ppo import _cfg, _params

    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="sparse"))
    exp = trainer.make_experience(trainer._next_prompts())
    exp.advantages = torch.full_like(exp.advantages, float("nan"))
    before = _params(trainer.models.policy)
    stats = trainer.train_on(exp)
    assert stats["guard/skipped_steps"] == 2.0 and trainer.state.bad_steps == 2
    assert all(torch.equal(before[k], v) for k, v in _params(trainer.models.policy).items())
