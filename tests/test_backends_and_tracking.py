"""Optional pieces: the vLLM rollout backend (through a stand-in for the vllm package, since it
needs a GPU) and the --report-to trackers; metrics.jsonl is always written."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import types

import pytest
import torch

from rto.config import build
from rto.stages.ppo import PPOStageConfig, PPOTrainer


def _cfg(tiny_dirs, prompt_file, tmp_path, **kw):
    values = dict(policy=tiny_dirs["policy"], reward_model=tiny_dirs["rm"], dpo_model=tiny_dirs["dpo"],
                  prompts=prompt_file, out=str(tmp_path / "out"), iterations=1, rollout_batch_size=4,
                  mini_batch_size=4, max_new_tokens=6, actor_lr=1e-3, critic_lr=1e-3, warmup_ratio=0.0,
                  eval_every=0, threads=1, reward="rto")
    values.update(kw)
    return build(PPOStageConfig, values, "test")


def _fake_vllm(eos: int):
    """A stand-in for the vllm package: records what it is given, returns responses of different lengths."""
    class LLM:
        def __init__(self, model, **kwargs):
            self.kwargs, self.loaded, self.resets, self.prompts = kwargs, None, 0, None
            runner = types.SimpleNamespace(model=self)
            self.llm_engine = types.SimpleNamespace(
                model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(model_runner=runner)))

        def generate(self, prompts, params, use_tqdm=False):
            self.prompts = prompts
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=[7] * (i % 3) + [eos])])
                    for i in range(len(prompts))]

        def load_weights(self, weights):
            self.loaded = dict(weights)

        def reset_prefix_cache(self):
            self.resets += 1

    class SamplingParams:
        def __init__(self, **kwargs):
            self.kwargs = kwargs

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


def test_vllm_backend_batches_logprobs_and_weight_sync(tiny_dirs, prompt_file, tmp_path, monkeypatch):
    from rto.vllm_backend import VLLMRollout

    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path))
    eos = trainer.tokenizer.eos_token_id
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(eos))
    trainer.vllm = VLLMRollout(tiny_dirs["policy"], trainer.tokenizer, trainer.device, max_new_tokens=6,
                               temperature=1.0, top_k=0, top_p=1.0, gpu_memory_utilization=0.3, seed=0)
    assert trainer.vllm.params.kwargs["stop_token_ids"] == [eos] and trainer.vllm.params.kwargs["top_k"] == -1
    prompts = trainer._next_prompts()
    batch = trainer.rollout(prompts)
    # Prompts reach vLLM without their left padding; responses come back right-padded with a mask.
    ids = trainer.tokenizer(prompts[0])["input_ids"]
    assert trainer.vllm.llm.prompts[0]["prompt_token_ids"] == ids
    assert batch.response_mask.sum(-1).tolist() == [1, 2, 3, 1]
    assert batch.response_ids[0, 0] == eos and batch.response_ids[0, 1] == trainer.tokenizer.pad_token_id
    # Old log-probs come from the trained policy, not from vLLM: each response checked against a
    # plain forward of its own unpadded prompt + response, with a full log-softmax indexed by hand.
    assert (batch.prompt_mask == 0).any(), "the prompts should need left padding"
    for b in range(len(prompts)):
        p_ids = batch.prompt_ids[b][batch.prompt_mask[b] > 0]
        n = int(batch.response_mask[b].sum())
        r_ids = batch.response_ids[b, :n]
        with torch.no_grad():
            logits = trainer.models.policy(torch.cat([p_ids, r_ids])[None]).logits[0].float()
        full = torch.log_softmax(logits, dim=-1)
        fresh = torch.stack([full[len(p_ids) - 1 + t, r_ids[t]] for t in range(n)])
        torch.testing.assert_close(batch.sampled_logprobs[b, :n], fresh, atol=1e-5, rtol=1e-5)
    # After an update, vLLM holds the policy's new weights.
    trainer.train()
    loaded = trainer.vllm.llm.loaded
    state = trainer.models.policy.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert trainer.vllm.llm.resets == 1


def _run(*args):
    return subprocess.run([sys.executable, "-m", "rto", *args], capture_output=True, text=True)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_missing_is_a_clear_error(tiny_dirs, prompt_file, tmp_path):
    proc = _run("ppo", "--policy", tiny_dirs["policy"], "--prompts", prompt_file, "--out", str(tmp_path / "o"),
                "--reward-model", tiny_dirs["rm"], "--generation-backend", "vllm")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("rto: error: ppo: --generation-backend vllm: vLLM is not installed")


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "trackio", "mlflow"])
def test_report_to_a_missing_tracker_is_a_clear_error(tracker, tiny_dirs, prompt_file, tmp_path):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    from rto.errors import UserError
    from rto.tracking import trackers

    with pytest.raises(UserError, match=f"--report-to {tracker}: the {tracker} package is not installed"):
        trackers([tracker], "ppo")


def test_report_to_errors_from_the_command_line(tiny_dirs, prompt_file, tmp_path):
    proc = _run("sft", "--data", prompt_file, "--out", str(tmp_path / "o"), "--report-to", "none,tensorboard")
    assert proc.returncode == 2 and "--report-to none cannot be combined with tensorboard" in proc.stderr
    proc = _run("ppo", "--policy", tiny_dirs["policy"], "--prompts", prompt_file, "--out", str(tmp_path / "o"),
                "--reward-model", tiny_dirs["rm"], "--report-to", "neptune")
    assert proc.returncode == 2 and "neptune" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_report_to_tensorboard_writes_event_files(tiny_dirs, prompt_file, tmp_path):
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, iterations=2, report_to=["tensorboard"]))
    trainer.train()
    assert list((tmp_path / "out" / "trackers").rglob("events.out.tfevents*"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
