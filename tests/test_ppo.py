"""The PPO trainer on tiny models: a step trains both networks; beta1 = 0 turns RTO into PPO."""

import torch

from rto.io.config import build
from rto.rl.trainer import PPOStageConfig, PPOTrainer


def _cfg(tiny_dirs, prompt_file, tmp_path, **kw):
    values = dict(
        policy=tiny_dirs["policy"],
        reward_model=tiny_dirs["rm"],
        dpo_model=tiny_dirs["dpo"],
        prompts=prompt_file,
        out=str(tmp_path / "out"),
        iterations=1,
        rollout_batch_size=8,
        mini_batch_size=4,
        max_new_tokens=8,
        actor_lr=1e-3,
        critic_lr=1e-3,
        warmup_ratio=0.0,
        eval_every=0,
        threads=1,
    )
    values.update(kw)
    return build(PPOStageConfig, values, "test")


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def test_one_step_changes_policy_and_critic(tiny_dirs, prompt_file, tmp_path):
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.1))
    before_p, before_c = _params(trainer.models.policy), _params(trainer.models.critic)
    exp = trainer.make_experience(trainer._next_prompts())
    stats = trainer.train_on(exp)
    after_p, after_c = _params(trainer.models.policy), _params(trainer.models.critic)
    assert any(not torch.equal(before_p[k], after_p[k]) for k in before_p)
    assert any(not torch.equal(before_c[k], after_c[k]) for k in before_c)
    assert all(torch.isfinite(torch.tensor(v)) for v in stats.values())
    # Frozen models never change.
    assert all(not p.requires_grad for p in trainer.models.ref.parameters())


def _rewards(tiny_dirs, prompt_file, tmp_path, **kw):
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, **kw))
    torch.manual_seed(123)
    return trainer.make_experience(trainer.prompts[:8]).rewards


def test_beta1_zero_gives_identical_token_rewards(tiny_dirs, prompt_file, tmp_path):
    sparse = _rewards(tiny_dirs, prompt_file, tmp_path, reward="sparse")
    rto_off = _rewards(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.0)
    rto_on = _rewards(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.5, dpo_clip=None)
    assert torch.equal(sparse, rto_off)
    assert not torch.allclose(sparse, rto_on)  # the check above is not vacuous


def test_gradient_accumulation_invariance(tiny_dirs, prompt_file, tmp_path):
    """The gradient accumulated over micro-batches equals the whole mini-batch's gradient (not
    just the weights after an Adam step, which hardly depend on the gradient's scale)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    runs = []
    for micro in (0, 2, 1):
        # No clipping: a clipped gradient of norm > max_grad_norm would hide a wrong scale.
        trainer = PPOTrainer(
            _cfg(
                tiny_dirs,
                prompt_file,
                tmp_path,
                reward="sparse",
                rollout_batch_size=4,
                mini_batch_size=4,
                micro_batch_size=micro,
                max_grad_norm=1e9,
            )
        )
        torch.manual_seed(5)
        exp = trainer.make_experience(trainer.prompts[:4])
        grads = []  # per optimiser step: the gradients it is about to apply (policy, then critic)
        hook = register_optimizer_step_pre_hook(
            lambda opt, args, kwargs, grads=grads: grads.append(
                [p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            )
        )
        try:
            trainer.train_on(exp)
        finally:
            hook.remove()
        runs.append((grads, _params(trainer.models.policy), _params(trainer.models.critic)))
    base_grads, base_p, base_c = runs[0]
    assert len(set(exp.batch.response_mask.sum(-1).tolist())) > 1  # unequal lengths: the mean matters
    assert len(base_grads) == 2 and all(len(g) > 0 for g in base_grads)  # one policy and one critic step
    assert all(any(t.abs().sum() > 0 for t in g) for g in base_grads)
    for grads, p, c in runs[1:]:
        assert len(grads) == len(base_grads)
        for a, b in zip(base_grads, grads):
            assert len(a) == len(b)
            for x, y in zip(a, b):
                assert float((y - x).norm()) <= 1e-4 * float(x.norm()) + 1e-8
        for k in base_p:
            assert torch.allclose(p[k], base_p[k], atol=1e-6), k
        for k in base_c:
            assert torch.allclose(c[k], base_c[k], atol=1e-6), k


def test_custom_token_reward_is_added_with_its_weight(tiny_dirs, prompt_file, tmp_path):
    f = tmp_path / "my_rewards.py"
    f.write_text(
        "import torch\n"
        "def first_token_bonus(prompt_ids, prompt_mask, response_ids, response_mask):\n"
        "    out = torch.zeros(response_ids.shape)\n"
        "    out[:, 0] = 1.0\n"
        "    return out\n"
    )
    base = _rewards(tiny_dirs, prompt_file, tmp_path, reward="sparse")
    with_bonus = _rewards(
        tiny_dirs, prompt_file, tmp_path, reward="sparse", custom_rewards=[f"{f}:first_token_bonus=0.25"]
    )
    expected = base.clone()
    expected[:, 0] += 0.25
    assert torch.allclose(with_bonus, expected)


def test_task_gold_token_reward_sums_to_gold(tiny_dirs, prompt_file, tmp_path, keyed):
    trainer = PPOTrainer(
        _cfg(
            tiny_dirs,
            prompt_file,
            tmp_path,
            reward="dpo-only",
            beta1=0.0,
            kl_coef=0.0,
            task="keyed",
            custom_rewards=["task:gold"],
            estimator="reinforce++",
        )
    )
    assert trainer.models.rm is None and trainer.models.dpo is None and trainer.models.critic is None
    torch.manual_seed(0)
    exp = trainer.make_experience(trainer.prompts[:8])
    from rto.lm.rollout import decode_responses

    texts = decode_responses(trainer.tokenizer, exp.batch)
    gold = torch.tensor([keyed.gold_reward(p, t) for p, t in zip(trainer.prompts[:8], texts)])
    assert torch.allclose(exp.rewards.sum(-1), gold, atol=1e-5)


def test_same_seed_same_run(tiny_dirs, prompt_file, tmp_path):
    runs = []
    for i in range(2):
        trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path / str(i), reward="rto", beta1=0.1, iterations=2))
        trainer.train()
        runs.append((_params(trainer.models.policy), _params(trainer.models.critic), trainer.state.history))
    (p0, c0, h0), (p1, c1, h1) = runs
    assert all(torch.equal(p0[k], p1[k]) for k in p0) and all(torch.equal(c0[k], c1[k]) for k in c0)

    def strip(h):
        return [{k: v for k, v in m.items() if not k.startswith(("time/", "tokens_per_s"))} for m in h]

    assert strip(h0) == strip(h1)


def test_old_logprobs_equal_a_fresh_forward(tiny_dirs, prompt_file, tmp_path):
    """The rollout's log-probs, used as 'old' in the ratio, equal an unpadded forward pass per response."""
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="sparse", temperature=0.8))
    exp = trainer.make_experience(trainer.prompts[:8])
    batch = exp.batch
    for b in range(8):
        p_ids = batch.prompt_ids[b][batch.prompt_mask[b] > 0]
        n = int(batch.response_mask[b].sum())
        r_ids = batch.response_ids[b, :n]
        with torch.no_grad():
            logits = trainer.models.policy(torch.cat([p_ids, r_ids])[None]).logits[0, len(p_ids) - 1 : -1] / 0.8
        fresh = torch.log_softmax(logits, -1).gather(-1, r_ids[:, None]).squeeze(-1)
        assert torch.allclose(exp.old_logp[b, :n], fresh, atol=1e-5)


def test_experience_rewards_with_padding_on_both_sides(tiny_dirs, prompt_file, tmp_path):
    """Left-padded prompts, right-padded responses: the score lands on each response's last token."""
    trainer = PPOTrainer(
        _cfg(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.2, dpo_clip=None, kl_coef=0.1, max_new_tokens=10)
    )
    torch.manual_seed(4)
    exp = trainer.make_experience(trainer.prompts[:8])
    batch = exp.batch
    assert (batch.prompt_mask == 0).any(), "the prompts should need left padding"
    lengths = batch.response_mask.sum(-1)
    assert len(set(lengths.tolist())) > 1, "the responses should have different lengths"
    m = batch.response_mask.float()
    rest = exp.rewards - (-0.1 * exp.kl + exp.dpo_term) * m
    for b in range(8):
        last = int(lengths[b]) - 1
        assert torch.allclose(rest[b, last], exp.score[b], atol=1e-5)
        rest[b, last] = 0
    assert torch.allclose(rest, torch.zeros_like(rest), atol=1e-6)
    assert (exp.rewards[m == 0] == 0).all()


def test_missing_eos_penalty(tiny_dirs, prompt_file, tmp_path):
    kw = dict(reward="sparse", max_new_tokens=3)
    scores = []
    for penalty in (None, 2.0):
        trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, missing_eos_penalty=penalty, **kw))
        torch.manual_seed(6)
        exp = trainer.make_experience(trainer.prompts[:8])
        scores.append((exp.score, exp.has_eos))
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


def test_packed_and_chunked_training_equals_padded(tiny_dirs, prompt_file, tmp_path):
    """Packing (and scoring in chunks) changes how tokens are laid out, never the numbers:
    the same rollout gives the same dense rewards, advantages, and weights after an update."""
    runs = []
    for kw in (dict(), dict(packing=True, score_batch_size=3), dict(packing=True, pack_row_tokens=64)):
        trainer = PPOTrainer(
            _cfg(
                tiny_dirs,
                prompt_file,
                tmp_path,
                reward="rto",
                beta1=0.2,
                dpo_clip=None,
                max_new_tokens=10,
                mini_batch_size=4,
                **kw,
            )
        )
        start = {
            **_params(trainer.models.policy),
            **{f"critic.{k}": v for k, v in _params(trainer.models.critic).items()},
        }
        torch.manual_seed(11)
        exp = trainer.make_experience(trainer.prompts[:8])
        trainer.train_on(exp)
        after = {
            **_params(trainer.models.policy),
            **{f"critic.{k}": v for k, v in _params(trainer.models.critic).items()},
        }
        runs.append((exp, start, after))
    base_exp, start, base = runs[0]
    assert len(set(base_exp.batch.response_mask.sum(-1).tolist())) > 1
    for exp, _, after in runs[1:]:
        for key in ("rewards", "dpo_term", "kl", "values", "advantages", "returns"):
            assert torch.allclose(getattr(exp, key), getattr(base_exp, key), atol=1e-5), key
        # The weights in norms, as the two-process test compares them: within 1e-3 of how far the
        # update moved each tensor (Adam turns float noise in a near-zero gradient into a step of
        # up to the learning rate, so element-wise tolerances fail on float order alone).
        for k in base:
            moved = float((base[k] - start[k]).norm())
            assert float((after[k] - base[k]).norm()) <= 1e-3 * moved + 1e-9, k


def test_lora_shared_base_trains_adapters_only(tiny_dirs, prompt_file, tmp_path):
    """--lora-r: one frozen base; the policy starts equal to the reference; a step moves the
    policy and critic adapters and nothing else; the saved policy is a plain merged checkpoint."""
    from rto.lm.models import load_causal_lm
    from rto.lm.scoring import response_logits, token_logprobs

    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.1, lora_r=4, iterations=1))
    base = {
        k: v.clone() for k, v in trainer.models.shared.model.get_base_model().state_dict().items() if "lora_" not in k
    }
    torch.manual_seed(0)
    exp = trainer.make_experience(trainer.prompts[:8])
    m = exp.batch.response_mask.float()
    assert torch.allclose(exp.kl, torch.zeros_like(m), atol=1e-5)  # B = 0: policy == reference
    policy_before = [p.clone() for p in trainer.models.policy.parameters()]
    critic_before = [p.clone() for p in trainer.models.critic.parameters()]
    trainer.train_on(exp)
    assert all(not torch.equal(a, b) for a, b in zip(policy_before, trainer.models.policy.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, trainer.models.critic.parameters()))
    after = {k: v for k, v in trainer.models.shared.model.get_base_model().state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base[k], after[k]) for k in base)  # the shared base never moves
    summary = trainer.train()
    saved = load_causal_lm(tmp_path / "out" / "policy")
    with torch.no_grad():
        a = token_logprobs(response_logits(saved, exp.batch), exp.batch.response_ids)
        b = token_logprobs(response_logits(trainer.models.policy, exp.batch), exp.batch.response_ids)
    assert torch.allclose(a * m, b * m, atol=1e-5)
    assert summary["iterations"] == 1


def test_lora_dpo_adapter_joins_the_shared_base(tiny_dirs, prompt_file, tmp_path):
    """`rto dpo --lora-r` writes an adapter; `rto ppo --lora-r` mounts it on the policy's base and
    gets the same DPO token rewards as a full run reading the adapter merged into a model."""
    from rto.io.data import write_jsonl
    from rto.lm.models import is_adapter_dir
    from rto.stages.dpo import DPOStageConfig
    from rto.stages.dpo import run as run_dpo

    prefs = tmp_path / "prefs.jsonl"
    write_jsonl(
        prefs,
        (
            {"prompt": f"s{i} s{i + 1} <sep>", "chosen": f" s{i} s{i} <eos>", "rejected": f" s{i + 2} <eos>"}
            for i in range(16)
        ),
    )
    dpo_dir = tmp_path / "dpo_lora"
    run_dpo(
        build(
            DPOStageConfig,
            dict(
                model=tiny_dirs["policy"],
                data=str(prefs),
                out=str(dpo_dir),
                lora_r=4,
                epochs=2,
                batch_size=8,
                learning_rate=5e-2,
                threads=1,
            ),
            "test",
        )
    )
    assert is_adapter_dir(dpo_dir)
    terms = []
    for lora_r in (4, 0):
        trainer = PPOTrainer(
            _cfg(
                tiny_dirs,
                prompt_file,
                tmp_path,
                reward="rto",
                beta1=0.5,
                dpo_clip=None,
                dpo_model=str(dpo_dir),
                lora_r=lora_r,
            )
        )
        assert (trainer.models.shared is not None and "dpo" in trainer.models.shared.model.peft_config) == (lora_r > 0)
        torch.manual_seed(3)
        terms.append(trainer.make_experience(trainer.prompts[:8]).dpo_term)
    assert terms[0].abs().sum() > 0  # not vacuous: an adapter that changed nothing gives zeros on both paths
    assert torch.allclose(terms[0], terms[1], atol=1e-5)


def test_bf16_mixed_precision_step(tiny_dirs, prompt_file, tmp_path):
    """--precision bf16 (the GPU default, exercised here on CPU autocast), in both the full and the
    shared-base modes: frozen models in bf16; trained weights are fp32 masters equal to the fp32
    checkpoint (never rounded through bf16), and stay fp32 after a step that moves them; the
    rollout's log-probs and RM scores are within bf16 rounding of an fp32 forward, and the RM's
    differ from it (bf16 is really used)."""
    from rto.lm.models import load_causal_lm, load_score_model

    policy32, rm32 = load_causal_lm(tiny_dirs["policy"]), load_score_model(tiny_dirs["rm"])
    for lora_r in (0, 4):
        trainer = PPOTrainer(
            _cfg(tiny_dirs, prompt_file, tmp_path, reward="rto", beta1=0.1, precision="bf16", lora_r=lora_r)
        )
        assert all(p.dtype == torch.float32 for p in trainer.models.policy.parameters())
        assert all(p.dtype == torch.float32 for p in trainer.models.critic.parameters())
        assert all(p.dtype == torch.bfloat16 for p in trainer.models.rm.parameters())
        if lora_r:
            base = {
                k: v for k, v in trainer.models.shared.model.get_base_model().state_dict().items() if "lora_" not in k
            }
            assert all(v.dtype == torch.bfloat16 for v in base.values())
        else:
            assert all(p.dtype == torch.bfloat16 for p in trainer.models.ref.parameters())
            assert all(torch.equal(p, policy32.state_dict()[k]) for k, p in trainer.models.policy.state_dict().items())
        torch.manual_seed(0)
        exp = trainer.make_experience(trainer.prompts[:8])
        assert torch.isfinite(exp.rewards).all()
        batch, score_gap = exp.batch, []
        for b in range(8):  # the policy starts as the fp32 checkpoint (LoRA: a zero adapter)
            p_ids = batch.prompt_ids[b][batch.prompt_mask[b] > 0]
            n = int(batch.response_mask[b].sum())
            ids = torch.cat([p_ids, batch.response_ids[b, :n]])[None]
            with torch.no_grad():
                logp = torch.log_softmax(policy32(ids).logits[0, len(p_ids) - 1 : -1].float(), -1)
                score = float(rm32(input_ids=ids).logits.reshape(-1)[0])
            fresh = logp.gather(-1, batch.response_ids[b, :n, None]).squeeze(-1)
            torch.testing.assert_close(exp.old_logp[b, :n], fresh, atol=0.02, rtol=0)
            score_gap.append(abs(float(exp.raw_score[b]) - score))
        assert max(score_gap) < 0.05 and max(score_gap) > 0, score_gap
        before_p, before_c = _params(trainer.models.policy), _params(trainer.models.critic)
        stats = trainer.train_on(exp)
        assert all(torch.isfinite(torch.tensor(v)) for v in stats.values()) and stats["guard/skipped_steps"] == 0
        after_p, after_c = _params(trainer.models.policy), _params(trainer.models.critic)
        assert all(v.dtype == torch.float32 for v in [*after_p.values(), *after_c.values()])
        assert any(not torch.equal(before_p[k], after_p[k]) for k in before_p)
        assert any(not torch.equal(before_c[k], after_c[k]) for k in before_c)


def test_lora_checkpoint_round_trip(tiny_dirs, prompt_file, tmp_path):
    """A shared-base run's checkpoint holds the adapters, value head, optimisers and RNG; a fresh
    trainer restored from it continues exactly as the original does."""
    from rto.runtime.checkpoint import save_checkpoint

    kw = dict(reward="rto", beta1=0.1, lora_r=4, iterations=3)
    a = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, **kw))
    a.train_on(a.make_experience(a._next_prompts()))
    path = save_checkpoint(tmp_path / "ck", 1, *a.checkpoints.contents(1))
    b = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, **kw))
    assert b.checkpoints.load(path) == 1
    rng = torch.get_rng_state()  # both trainers draw from the one global RNG of this process
    for t in (a, b):
        torch.set_rng_state(rng)
        t.train_on(t.make_experience(t._next_prompts()))
    for (n, p), (_, q) in zip(a.models.shared.model.named_parameters(), b.models.shared.model.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(a.models.shared.value_head.weight, b.models.shared.value_head.weight)


def test_a_policy_given_as_an_adapter_folder_trains_in_full(tiny_dirs, prompt_file, tmp_path):
    """`rto sft --lora-r` writes an adapter folder; `rto ppo` without --lora-r trains its merged
    weights in full (peft loads an adapter's base frozen: nothing would train)."""
    import json

    from peft import get_peft_model

    from rto.lm.lora import lora_config
    from rto.lm.models import load_causal_lm, load_tokenizer

    adapter = tmp_path / "sft_adapter"
    peft_model = get_peft_model(load_causal_lm(tiny_dirs["policy"]), lora_config(4, 8.0, "all-linear"))
    peft_model.save_pretrained(adapter)
    load_tokenizer(tiny_dirs["policy"]).save_pretrained(adapter)
    cfg_file = adapter / "adapter_config.json"
    cfg_file.write_text(
        json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": tiny_dirs["policy"]})
    )
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, policy=str(adapter), reward="rto", beta1=0.1))
    before = _params(trainer.models.policy)
    assert before and all(p.requires_grad for p in trainer.models.policy.parameters())
    trainer.train_on(trainer.make_experience(trainer._next_prompts()))
    after = _params(trainer.models.policy)
    assert any(not torch.equal(before[k], after[k]) for k in before)
