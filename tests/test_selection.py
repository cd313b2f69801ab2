"""Choosing the result on the dev split: best-of-evaluations, early stopping, the KL budget, the
proxy/gold divergence flag, and a resumed run that selects exactly as an uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file

from rto.core.selection import Selection, divergence
from rto.rl.trainer import PPOTrainer
from tests.test_ppo import _cfg


def _point(it, gold, rm=0.0, kl=0.0, se=0.0):
    return {"iteration": it, "gold_reward": gold, "gold_reward_se": se, "rm_score": rm, "kl_to_ref": kl}


def test_selection_keeps_the_best_and_stops_after_patience():
    sel = Selection("gold_reward", patience=2)
    flags = [sel.observe(_point(i, g)) for i, g in enumerate([0.1, 0.5, 0.4, 0.6, 0.55, 0.59])]
    assert flags == [True, True, False, True, False, False]
    assert (sel.best, sel.best_iteration) == (0.6, 3) and sel.should_stop and "patience 2" in sel.stop_reason
    again = Selection("gold_reward", patience=2)
    again.load_state_dict(json.loads(json.dumps(sel.state_dict())))  # as a checkpoint stores it
    assert again == sel


def test_a_point_over_the_kl_budget_stops_the_run_and_is_never_selected():
    sel = Selection("gold_reward", kl_budget=5.0)
    assert sel.observe(_point(0, 0.2, kl=1.0)) and not sel.should_stop
    assert not sel.observe(_point(1, 0.9, kl=6.0))  # better, but over the budget
    assert sel.should_stop and sel.best_iteration == 0 and "exceeds the budget 5" in sel.stop_reason


def test_divergence_flags_where_the_proxy_rises_while_gold_falls():
    curve = [
        _point(0, 0.2, rm=0.0),
        _point(10, 0.5, rm=1.0),
        _point(20, 0.45, rm=1.5, se=0.01),
        _point(30, 0.3, rm=2.0, se=0.01),
    ]
    # At 20 the fall (0.05) is beyond 2 standard errors (0.02) and the RM score is still rising.
    d = divergence(curve)
    assert d["iteration"] == 20 and d["true_best_iteration"] == 10 and d["rm_score"] == 1.5
    # A fall inside the noise is not flagged; nor is a fall of both scores together.
    assert divergence([_point(0, 0.5, rm=1.0), _point(1, 0.49, rm=2.0, se=0.01)]) is None
    assert divergence([_point(0, 0.5, rm=1.0), _point(1, 0.3, rm=0.5)]) is None


GOLD = [0.10, 0.30, 0.50, 0.40, 0.35, 0.30, 0.25, 0.20, 0.15]  # dev gold by iteration: peaks at 2


def _run(tiny_dirs, prompt_file, out, iterations, **kw):
    """A real tiny PPO run whose dev evaluations follow GOLD (the RM score always rising), with a
    snapshot of the policy's weights at every evaluation."""
    trainer = PPOTrainer(
        _cfg(
            tiny_dirs,
            prompt_file,
            out,
            reward="sparse",
            iterations=iterations,
            eval_every=1,
            eval_prompts=prompt_file,
            task="keyed",
            select_by="gold_reward",
            patience=2,
            save_every=1,
            keep_last=0,
            lr_schedule="constant",
            **kw,
        )
    )
    snapshots = {}

    def scripted(iteration):
        snapshots[iteration] = {k: v.detach().clone() for k, v in trainer.models.policy.state_dict().items()}
        return _point(iteration, GOLD[iteration], rm=float(iteration), kl=0.1 * iteration)

    trainer.evaluate = scripted
    return trainer, trainer.train(), snapshots


def _saved(path):
    return load_file(str(path / "model.safetensors"))


def test_the_selected_policy_is_saved_as_the_result_and_the_run_stops(tiny_dirs, prompt_file, tmp_path):
    trainer, summary, snapshots = _run(tiny_dirs, prompt_file, tmp_path / "a", iterations=8)
    out = tmp_path / "a" / "out"
    # Best at 2; no new best at 3 and 4: patience 2 stops the run before iteration 5 trains.
    assert summary["iterations"] == 4 and len(trainer.state.history) == 4
    assert summary["selection"]["best_iteration"] == 2 and "patience 2" in summary["selection"]["stopped"]
    assert summary["divergence"]["iteration"] == 3 and summary["divergence"]["true_best_iteration"] == 2
    selected, last = _saved(out / "policy"), _saved(out / "policy_last")
    for name, w in selected.items():
        assert torch.equal(w, snapshots[2][name]) and torch.equal(last[name], snapshots[4][name])
    assert any(not torch.equal(selected[k], last[k]) for k in selected)  # not vacuous: they differ
    assert not (out / "policy_selected").exists()

    # Interrupted after iteration 3 (a run of 3 iterations; a constant learning rate, so the
    # schedule does not depend on the length), resumed with the full length: the same stop, the
    # same selected and last weights.
    _run(tiny_dirs, prompt_file, tmp_path / "b", iterations=3)
    _, resumed, _ = _run(tiny_dirs, prompt_file, tmp_path / "b", iterations=8, resume="auto")
    out_b = tmp_path / "b" / "out"
    assert resumed["selection"] == summary["selection"] and resumed["iterations"] == 4
    for name, w in selected.items():
        assert torch.equal(_saved(out_b / "policy")[name], w) and torch.equal(
            _saved(out_b / "policy_last")[name], last[name]
        )


@pytest.mark.parametrize(
    "values, message",
    [
        ({"select_by": "gold_reward", "eval_every": 1}, "needs a --task"),
        ({"select_by": "gold_reward", "task": "keyed", "eval_every": 0}, "needs dev prompts"),
        ({"patience": 3}, "set --select-by"),
    ],
)
def test_selection_settings_are_checked(tiny_dirs, prompt_file, tmp_path, values, message):
    from rto.io.errors import UserError

    with pytest.raises(UserError, match=message):
        _cfg(tiny_dirs, prompt_file, tmp_path, eval_prompts=prompt_file, **values)
