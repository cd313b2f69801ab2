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


def _fake_vllm(eos: int, config, cut_at: int):
    """A stand-in for vllm 0.33 with its real layout, where the old backend broke:
    - the V1 engine runs the model in another process unless VLLM_ENABLE_V1_MULTIPROCESSING=0 (or
      the external_launcher executor): there is no `llm_engine.model_executor`, only
      `collective_rpc`, whose callable and arguments cross a process boundary (pickled) unless
      the engine is in-process;
    - the worker's model has vLLM's parameter layout: q/k/v stacked into `qkv_proj`, gate/up into
      `gate_up_proj`; `load_weights` takes transformers names, stacks them itself, skips a tied LM
      head and rejects any name it does not know;
    - start-up reseeds the global RNGs; a request without a seed draws one from numpy's global
      state; a response stops at EOS or is cut at max_tokens without it."""
    import os
    import pickle
    import random

    import numpy as np

    stacked = (("q_proj", "qkv_proj", 0), ("k_proj", "qkv_proj", 1), ("v_proj", "qkv_proj", 2),
               ("gate_proj", "gate_up_proj", 0), ("up_proj", "gate_up_proj", 1))

    class Model:
        def __init__(self):
            names = {"model.embed_tokens.weight", "model.norm.weight"}
            if not config.tie_word_embeddings:
                names.add("lm_head.weight")
            for i in range(config.num_hidden_layers):
                p = f"model.layers.{i}."
                names |= {p + "self_attn.qkv_proj.weight", p + "self_attn.o_proj.weight", p + "mlp.gate_up_proj.weight",
                          p + "mlp.down_proj.weight", p + "input_layernorm.weight", p + "post_attention_layernorm.weight"}
            self.names, self.parts, self.calls = names, {}, 0

        def load_weights(self, weights):
            self.calls += 1
            for name, tensor in weights:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                for part, fused, index in stacked:
                    if f".{part}." in name:
                        name = name.replace(part, fused)
                        break
                else:
                    index = 0
                if name not in self.names:
                    raise KeyError(name)
                self.parts.setdefault(name, {})[index] = tensor.clone()

        def weight(self, name: str) -> torch.Tensor:
            parts = self.parts[name]
            return torch.cat([parts[i] for i in sorted(parts)])

    class LLM:
        def __init__(self, model, seed=0, max_model_len=None, distributed_executor_backend=None, **kwargs):
            self.kwargs = {**kwargs, "max_model_len": max_model_len, "executor": distributed_executor_backend}
            self.in_process = (os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
                               or distributed_executor_backend == "external_launcher")
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=Model()))
            self.resets, self.prompts = 0, None

        @property
        def model(self):
            return self.worker.model_runner.model

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            if not self.in_process:  # the worker is elsewhere: what it gets went through pickle
                method, args = pickle.loads(pickle.dumps((method, args)))
            return [method(self.worker, *args, **(kwargs or {}))]

        def generate(self, prompts, params, use_tqdm=False):
            self.prompts = prompts
            outs = []
            for p in params:
                seed = p.kwargs["seed"] if p.kwargs["seed"] is not None else int(np.random.randint(2**31))
                rng = random.Random(seed)
                n = rng.randint(1, 2 * cut_at)  # n > max_tokens: cut without EOS
                tokens = [rng.randint(eos + 1, config.vocab_size - 1) for _ in range(min(n, cut_at))]
                if n <= cut_at:
                    tokens[-1] = eos
                outs.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=tokens)]))
            return outs

        def reset_prefix_cache(self):
            self.resets += 1

    class SamplingParams:
        def __init__(self, seed=None, **kwargs):
            self.kwargs = {**kwargs, "seed": seed}

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


def test_vllm_backend_with_the_real_layout(tiny_dirs, prompt_file, tmp_path, monkeypatch):
    from rto.errors import UserError
    from rto.vllm_backend import VLLMRollout, check_gpus

    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, max_prompt_len=40))
    eos = trainer.tokenizer.eos_token_id
    assert eos < 5, "the stand-in samples tokens above EOS"
    config = trainer.models.policy.config
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(eos, config, cut_at=6))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    torch.manual_seed(12345)  # a state vLLM's reseeding (to the run's seed) would lose
    before = torch.get_rng_state()
    trainer.vllm = VLLMRollout.for_run(trainer.cfg, trainer.tokenizer, trainer.device, trainer.dist)
    llm = trainer.vllm.llm
    # In-process engine; KV cache sized for prompt + response limits; vLLM's reseeding undone.
    assert llm.in_process and llm.kwargs["max_model_len"] == 40 + 6 and llm.kwargs["executor"] is None
    assert torch.equal(torch.get_rng_state(), before)

    torch.manual_seed(5)
    prompts = trainer._next_prompts()
    batch = trainer.rollout(prompts)
    # Prompts reach vLLM without their left padding; responses come back right-padded with a mask;
    # one cut at the token limit has no EOS and a full mask.
    assert (batch.prompt_mask == 0).any(), "the prompts should need left padding"
    assert llm.prompts[0]["prompt_token_ids"] == trainer.tokenizer(prompts[0])["input_ids"]
    lengths = batch.response_mask.sum(-1).tolist()
    ended = ((batch.response_ids == eos) & (batch.response_mask > 0)).any(-1).tolist()
    assert 6 in lengths and not all(ended) and any(ended), (lengths, ended)
    for row, n, has_eos in zip(batch.response_ids, lengths, ended):
        assert has_eos == (row[n - 1] == eos) and (row[n:] == trainer.tokenizer.pad_token_id).all()
    # Every request carries a seed from the training loop's RNG: the same seed, the same responses.
    torch.manual_seed(5)
    again = trainer.rollout(prompts)
    assert torch.equal(again.response_ids, batch.response_ids)
    torch.manual_seed(6)
    assert not torch.equal(trainer.rollout(prompts).response_ids, batch.response_ids)
    # Old log-probs come from the trained policy, not from vLLM: each response checked against a
    # plain forward of its own unpadded prompt + response, with a full log-softmax indexed by hand.
    for b in range(len(prompts)):
        p_ids = batch.prompt_ids[b][batch.prompt_mask[b] > 0]
        n = lengths[b]
        r_ids = batch.response_ids[b, :n]
        with torch.no_grad():
            logits = trainer.models.policy(torch.cat([p_ids, r_ids])[None]).logits[0].float()
        full = torch.log_softmax(logits, dim=-1)
        fresh = torch.stack([full[len(p_ids) - 1 + t, r_ids[t]] for t in range(n)])
        torch.testing.assert_close(batch.sampled_logprobs[b, :n], fresh, atol=1e-5, rtol=1e-5)

    # After an update, vLLM's model holds the policy's new weights, stacked its way.
    trainer.train()
    state = trainer.models.policy.state_dict()
    model = llm.model
    assert model.calls == 1 and llm.resets == 1 and set(model.parts) == model.names
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        assert torch.equal(model.weight(p + "self_attn.qkv_proj.weight"),
                           torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]))
        assert torch.equal(model.weight(p + "mlp.gate_up_proj.weight"),
                           torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]))
    assert torch.equal(model.weight("model.embed_tokens.weight"), state["model.embed_tokens.weight"])

    # A name vLLM's model does not know is a one-line error, not a traceback from inside vLLM.
    with pytest.raises(UserError, match="weight sync into vLLM failed .*KeyError"):
        trainer.vllm.sync_weights([("model.layers.0.self_attn.rotary.weight", torch.zeros(1))])
    # The engine must be in-process, and processes sharing a GPU are refused.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(UserError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        VLLMRollout.for_run(trainer.cfg, trainer.tokenizer, trainer.device, trainer.dist)
    with pytest.raises(UserError, match="share"):
        check_gpus(world=2, local_world=2)


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
