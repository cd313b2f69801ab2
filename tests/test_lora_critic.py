"""The LoRA shared base's critic starts from the reward model (as the full critic does): the RM's
score head always, and the RM's adapter too when the RM is an adapter on the same base."""

import json

import torch

from rto.lm.scoring import sequence_scores
from rto.rl.trainer import PPOTrainer
from tests.test_ppo import _cfg


def test_lora_critic_head_starts_from_a_full_reward_model(tiny_dirs, prompt_file, tmp_path):
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="sparse", lora_r=4))
    head = trainer.models.shared.value_head
    assert head.weight.abs().sum() > 0  # not vacuous: a zero head would also equal a zero RM head
    assert torch.equal(head.weight.detach(), trainer.models.rm.score.weight.detach().float())
    # A copy: training the critic must not move the frozen RM's head.
    assert head.weight.data_ptr() != trainer.models.rm.score.weight.data_ptr() and head.weight.requires_grad


def _rm_adapter(tiny_dirs, out):
    """A reward model saved as peft writes `rto rm --lora-r` before merging: a SEQ_CLS adapter on
    the policy's base, with a trained-looking (random, non-zero) adapter and score head."""
    from peft import get_peft_model

    from rto.lm.lora import lora_config
    from rto.lm.models import RM_STATS_FILE, load_score_model, load_tokenizer

    base = load_score_model(tiny_dirs["policy"], "base")
    model = get_peft_model(base, lora_config(8, 16.0, "all-linear", "SEQ_CLS"))
    torch.manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "score" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(out)
    load_tokenizer(tiny_dirs["policy"]).save_pretrained(out)
    cfg_file = out / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["base_model_name_or_path"] = tiny_dirs["policy"]
    cfg_file.write_text(json.dumps(cfg))
    (out / RM_STATS_FILE).write_text(json.dumps({"mean": 0.0, "std": 1.0}))


def test_lora_critic_starts_as_an_rm_adapter_on_the_same_base(tiny_dirs, prompt_file, tmp_path):
    rm_dir = tmp_path / "rm_adapter"
    _rm_adapter(tiny_dirs, rm_dir)
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, reward="sparse", lora_r=4, reward_model=str(rm_dir)))
    torch.manual_seed(0)
    batch = trainer.experience.rollout(trainer.prompts[:6])
    with torch.no_grad():
        critic_scores = sequence_scores(trainer.models.critic, batch)
        rm_scores = sequence_scores(trainer.models.rm, batch)
        policy_logits = trainer.models.policy(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        ref_logits = trainer.models.ref(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    # The critic, read where the RM reads its score, is the RM (the adapter's rank 8, not --lora-r 4).
    assert rm_scores.abs().max() > 0.1
    assert torch.allclose(critic_scores, rm_scores, atol=1e-4), (critic_scores, rm_scores)
    # The RM's adapter went to the critic only: the policy still equals the reference.
    assert torch.allclose(policy_logits, ref_logits, atol=1e-5)
