"""`rto ppo --gradient-checkpointing`: the update recomputes each decoder layer in its backward
pass (so it holds less for backward), and its gradients are those of the plain update - full
models and the LoRA shared base (policy and critic adapters on one base)."""

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from rto.io.errors import UserError
from tests.test_ppo import _cfg


def _update(tiny_dirs, prompt_file, tmp_path, **kw):
    """One update on a fixed rollout: the gradients each optimiser step applies, the calls of the
    first decoder layer's MLP during the update, and the bytes autograd kept for backward."""
    from rto.rl.trainer import PPOTrainer

    trainer = PPOTrainer(
        _cfg(
            tiny_dirs,
            prompt_file,
            tmp_path,
            reward="rto",
            beta1=0.1,
            rollout_batch_size=4,
            mini_batch_size=4,
            micro_batch_size=2,
            max_grad_norm=1e9,
            **kw,
        )
    )
    torch.manual_seed(7)
    exp = trainer.make_experience(trainer.prompts[:4])
    base = trainer.models.policy_root
    mlp = base.model.layers[0].mlp
    calls, kept, grads = [0], [0], []

    def pack(t):
        kept[0] += t.numel() * t.element_size()
        return t

    forward = mlp.forward

    def counted(*args, **kwargs):  # not a forward hook: torch runs none during the recomputation
        calls[0] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    hooks = [
        register_optimizer_step_pre_hook(
            lambda opt, args, kwargs: grads.append(
                [p.grad.detach().clone() for g in opt.param_groups for p in g["params"] if p.grad is not None]
            )
        )
    ]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            trainer.train_on(exp)
    finally:
        for h in hooks:
            h.remove()
        del mlp.forward
    assert not any(layer.training for layer in trainer.models.checkpointed_layers)  # back to eval mode
    return grads, calls[0], kept[0]


@pytest.mark.parametrize("lora_r", [0, 4], ids=["full", "lora"])
def test_checkpointed_update_recomputes_layers_and_keeps_the_gradients(tiny_dirs, prompt_file, tmp_path, lora_r):
    plain_grads, plain_calls, plain_kept = _update(tiny_dirs, prompt_file, tmp_path, lora_r=lora_r)
    ckpt_grads, ckpt_calls, ckpt_kept = _update(
        tiny_dirs, prompt_file, tmp_path, lora_r=lora_r, gradient_checkpointing=True
    )
    # Every forward of the layer with gradients runs again in backward.
    assert plain_calls > 0 and ckpt_calls == 2 * plain_calls
    assert ckpt_kept < 0.8 * plain_kept  # what autograd holds for backward shrinks
    assert len(plain_grads) == len(ckpt_grads) == 2  # a policy and a critic step
    for plain, ckpt in zip(plain_grads, ckpt_grads):
        assert len(plain) == len(ckpt) and any(g.abs().sum() > 0 for g in plain)
        for a, b in zip(plain, ckpt):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_a_model_transformers_cannot_checkpoint_is_refused(tiny_dirs, prompt_file, tmp_path, monkeypatch):
    from transformers import LlamaForCausalLM

    from rto.rl.trainer import PPOTrainer

    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False)
    with pytest.raises(UserError, match="does not support activation checkpointing"):
        PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="sparse", gradient_checkpointing=True))
