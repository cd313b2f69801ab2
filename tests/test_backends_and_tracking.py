"""Optional pieces: the vLLM rollout backend (through a stand-in for the vllm package, since it
needs a GPU) and the --report-to trackers; metrics.jsonl is always written."""

from __future__ import annotations

import importlib.util
import json
import sys
import types

import pytest
import torch

from rto.rl.trainer import PPOTrainer


def _cfg(tiny_dirs, prompt_file, tmp_path, **kw):
    """test_ppo's settings, with a rollout of 4 responses of at most 6 tokens and RTO's reward."""
    from tests.test_ppo import _cfg as ppo_cfg

    return ppo_cfg(
        tiny_dirs, prompt_file, tmp_path, **{"rollout_batch_size": 4, "max_new_tokens": 6, "reward": "rto", **kw}
    )


def _fake_vllm(eos: int, config, cut_at: int, alt_eos: int | None = None):
    """A stand-in for vllm 0.33 with its real layout, where the old backend broke:
    - the V1 engine runs the model in another process unless VLLM_ENABLE_V1_MULTIPROCESSING=0 (or
      the external_launcher executor): there is no `llm_engine.model_executor`, only
      `collective_rpc`, whose callable and arguments cross a process boundary (pickled) unless
      the engine is in-process;
    - LLM(...) takes only its own / EngineArgs' arguments, and a model directory with config.json;
    - the worker's model has vLLM's parameter layout: q/k/v stacked into `qkv_proj`, gate/up into
      `gate_up_proj`; `load_weights` takes transformers names, stacks them itself, skips a tied LM
      head, rejects any name it does not know (KeyError), asserts on shapes (AssertionError) and
      warns once per tensor whose dtype is not the engine's;
    - SamplingParams rejects a temperature above 2 (VLLMValidationError: no ValueError);
    - a request stops at EOS, at its stop_token_ids and, unless it sets ignore_eos, at every
      eos_token_id of the model's generation config (here also `alt_eos`); or is cut at max_tokens;
    - start-up reseeds the global RNGs; a request without a seed draws one from numpy's global state."""
    import os
    import pickle
    import random
    from pathlib import Path

    import numpy as np

    stacked = (
        ("q_proj", "qkv_proj", 0),
        ("k_proj", "qkv_proj", 1),
        ("v_proj", "qkv_proj", 2),
        ("gate_proj", "gate_up_proj", 0),
        ("up_proj", "gate_up_proj", 1),
    )
    h, inter, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = h // config.num_attention_heads * getattr(config, "num_key_value_heads", config.num_attention_heads)

    class VLLMValidationError(Exception):
        pass

    class Model:
        def __init__(self, dtype):
            shapes = {("model.embed_tokens.weight", 0): (vocab, h), ("model.norm.weight", 0): (h,)}
            if not config.tie_word_embeddings:
                shapes[("lm_head.weight", 0)] = (vocab, h)
            for i in range(config.num_hidden_layers):
                p = f"model.layers.{i}."
                shapes.update(
                    {
                        (p + "self_attn.qkv_proj.weight", 0): (h, h),
                        (p + "self_attn.qkv_proj.weight", 1): (kv, h),
                        (p + "self_attn.qkv_proj.weight", 2): (kv, h),
                        (p + "self_attn.o_proj.weight", 0): (h, h),
                        (p + "mlp.gate_up_proj.weight", 0): (inter, h),
                        (p + "mlp.gate_up_proj.weight", 1): (inter, h),
                        (p + "mlp.down_proj.weight", 0): (h, inter),
                        (p + "input_layernorm.weight", 0): (h,),
                        (p + "post_attention_layernorm.weight", 0): (h,),
                    }
                )
            self.shapes, self.names, self.dtype = shapes, {n for n, _ in shapes}, dtype
            self.parts, self.calls, self.dtype_warnings = {}, 0, 0

        def load_weights(self, weights):
            self.calls += 1
            for name, tensor in weights:
                if name == "lm_head.weight" and config.tie_word_embeddings:
                    continue
                for part, fused, index in stacked:  # noqa: B007 - `index` is read after the loop (break)
                    if f".{part}." in name:
                        name = name.replace(part, fused)
                        break
                else:
                    index = 0
                if name not in self.names:
                    raise KeyError(name)
                assert tuple(tensor.shape) == self.shapes[(name, index)], f"Attempted to load weight ({tensor.shape})"
                self.dtype_warnings += tensor.dtype != self.dtype
                self.parts.setdefault(name, {})[index] = tensor.to(self.dtype).clone()

        def weight(self, name: str) -> torch.Tensor:
            parts = self.parts[name]
            return torch.cat([parts[i] for i in sorted(parts)])

    class LLM:
        def __init__(
            self,
            model,
            *,
            tokenizer=None,
            dtype="auto",
            seed=0,
            gpu_memory_utilization=0.92,
            enable_prefix_caching=None,
            max_model_len=None,
            distributed_executor_backend=None,
            device_ids=None,
        ):
            if not (Path(model) / "config.json").is_file():
                raise OSError(f"{model} does not appear to have a file named config.json")
            if max_model_len > config.max_position_embeddings:  # vllm/config/model.py: _get_and_verify_max_len
                raise ValueError(
                    f"User-specified max_model_len ({max_model_len}) is greater than the derived "
                    f"max_model_len (max_position_embeddings={config.max_position_embeddings})\nmore"
                )
            self.kwargs = {
                "model": model,
                "dtype": dtype,
                "max_model_len": max_model_len,
                "executor": distributed_executor_backend,
                "device_ids": device_ids,
            }
            self.in_process = (
                os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
                or distributed_executor_backend == "external_launcher"
            )
            random.seed(seed)
            np.random.seed(seed)
            torch.manual_seed(seed)
            model = Model({"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype])
            self.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(model=model))
            self.resets, self.prompts, self.synced_at_generate = 0, None, []

        @property
        def model(self):
            return self.worker.model_runner.model

        def collective_rpc(self, method, timeout=None, args=(), kwargs=None):
            if not self.in_process:  # the worker is elsewhere: what it gets went through pickle
                method, args = pickle.loads(pickle.dumps((method, args)))
            return [method(self.worker, *args, **(kwargs or {}))]

        def generate(self, prompts, params, use_tqdm=False):
            self.prompts = prompts
            self.synced_at_generate.append(self.model.calls)
            outs = []
            for p in params:
                stops = set(p.stop_token_ids) | (set() if p.ignore_eos else {eos, *([alt_eos] if alt_eos else [])})
                seed = p.seed if p.seed is not None else int(np.random.randint(2**31))
                rng = random.Random(seed)
                n = rng.randint(1, 2 * cut_at)  # n > max_tokens: cut without EOS
                tokens = [
                    alt_eos if alt_eos and rng.random() < 0.2 else rng.randint(eos + 2, vocab - 1)
                    for _ in range(min(n, p.max_tokens))
                ]
                if n <= cut_at:
                    tokens[-1] = eos
                ends = [i for i, t in enumerate(tokens) if t in stops]
                outs.append(
                    types.SimpleNamespace(
                        outputs=[types.SimpleNamespace(token_ids=tokens[: ends[0] + 1] if ends else tokens)]
                    )
                )
            return outs

        def reset_prefix_cache(self):
            self.resets += 1

    class SamplingParams:
        def __init__(
            self,
            n=1,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            seed=None,
            stop_token_ids=None,
            ignore_eos=False,
            max_tokens=16,
            detokenize=True,
        ):
            if temperature > 2.0:
                raise VLLMValidationError(f"temperature must be in [0, 2], got {temperature}.")
            self.seed, self.stop_token_ids, self.ignore_eos, self.max_tokens = (
                seed,
                stop_token_ids or [],
                ignore_eos,
                max_tokens,
            )

    return types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


def test_vllm_backend_with_the_real_layout(tiny_dirs, prompt_file, tmp_path, monkeypatch):
    from rto.io.errors import UserError
    from rto.rl.vllm import VLLMRollout, check_gpus

    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, max_prompt_len=40))
    eos = trainer.tokenizer.eos_token_id
    assert eos < 5, "the stand-in samples tokens above EOS"
    config = trainer.models.policy.config
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(eos, config, cut_at=6, alt_eos=eos + 1))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    torch.manual_seed(12345)  # a state vLLM's reseeding (to the run's seed) would lose
    before = torch.get_rng_state()
    trainer.experience.vllm = VLLMRollout.for_run(
        trainer.cfg, trainer.tokenizer, trainer.device, trainer.dist, trainer.models
    )
    llm = trainer.experience.vllm.llm
    # In-process engine on the run's device, in its precision (fp32 here); KV cache sized for
    # prompt + response limits; vLLM's reseeding undone; the policy synced in before any rollout.
    assert llm.in_process and llm.kwargs["max_model_len"] == 40 + 6 and llm.kwargs["executor"] is None
    assert llm.kwargs["dtype"] == "float32" and llm.kwargs["device_ids"] is None  # cuda:0: vLLM's own choice
    assert torch.equal(torch.get_rng_state(), before)
    assert llm.model.calls == 1 and llm.resets == 1

    torch.manual_seed(5)
    prompts = trainer._next_prompts()
    batch = trainer.experience.rollout(prompts)
    # Prompts reach vLLM without their left padding; responses come back right-padded with a mask;
    # one cut at the token limit has no EOS and a full mask. The generation config's other EOS id
    # stops nothing: a response ends at the tokenizer's EOS or at the limit.
    assert (batch.prompt_mask == 0).any(), "the prompts should need left padding"
    assert llm.prompts[0]["prompt_token_ids"] == trainer.tokenizer(prompts[0])["input_ids"]
    lengths = batch.response_mask.sum(-1).tolist()
    ended = ((batch.response_ids == eos) & (batch.response_mask > 0)).any(-1).tolist()
    assert 6 in lengths and not all(ended) and any(ended), (lengths, ended)
    assert (batch.response_ids == eos + 1).any(), "the stand-in should sample the other EOS id"
    for row, n, has_eos in zip(batch.response_ids, lengths, ended):
        assert has_eos == (row[n - 1] == eos) and (row[n:] == trainer.tokenizer.pad_token_id).all()
        assert has_eos or n == 6, "a response stopped at a token that is not the tokenizer's EOS"
    # Every request carries a seed from the training loop's RNG: the same seed, the same responses.
    torch.manual_seed(5)
    again = trainer.experience.rollout(prompts)
    assert torch.equal(again.response_ids, batch.response_ids)
    torch.manual_seed(6)
    assert not torch.equal(trainer.experience.rollout(prompts).response_ids, batch.response_ids)
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
    assert model.calls == 2 and llm.resets == 2 and set(model.parts) == model.names
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        assert torch.equal(
            model.weight(p + "self_attn.qkv_proj.weight"),
            torch.cat([state[p + f"self_attn.{x}_proj.weight"] for x in "qkv"]),
        )
        assert torch.equal(
            model.weight(p + "mlp.gate_up_proj.weight"),
            torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]),
        )
    assert torch.equal(model.weight("model.embed_tokens.weight"), state["model.embed_tokens.weight"])
    assert model.dtype_warnings == 0

    # What vLLM's loaders raise is a one-line error, not a traceback from inside vLLM: a name its
    # model does not know, a shape it asserts on.
    with pytest.raises(UserError, match="weight sync into vLLM failed .*KeyError"):
        trainer.experience.vllm.sync_weights([("model.layers.0.self_attn.rotary.weight", torch.zeros(1))])
    with pytest.raises(UserError, match="weight sync into vLLM failed .*AssertionError"):
        trainer.experience.vllm.sync_weights([("model.norm.weight", torch.zeros(3))])

    # An error on our side of the stream (e.g. a failed gather) passes through as it was.
    def broken():
        yield "model.norm.weight", torch.zeros(config.hidden_size)
        raise ConnectionError("peer gone")

    with pytest.raises(ConnectionError, match="peer gone"):
        trainer.experience.vllm.sync_weights(broken())
    # The engine must be in-process, and processes sharing a GPU are refused.
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    with pytest.raises(UserError, match="VLLM_ENABLE_V1_MULTIPROCESSING"):
        VLLMRollout.for_run(trainer.cfg, trainer.tokenizer, trainer.device, trainer.dist, trainer.models)
    with pytest.raises(UserError, match="share"):
        check_gpus(world=2, local_world=2)


def test_vllm_engine_takes_the_runs_dtype_and_gpu(tiny_dirs, prompt_file, tmp_path, monkeypatch):
    """bf16 runs: a bf16 engine, fed bf16 tensors (fp32 ones log a warning per tensor); fp32 runs
    (GPUs without bf16): an fp32 engine. --device cuda:N: vLLM's device_ids=[N] (else cuda:0)."""
    import dataclasses

    from rto.rl.vllm import VLLMRollout, engine_settings

    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, max_prompt_len=40))
    monkeypatch.setitem(
        sys.modules, "vllm", _fake_vllm(trainer.tokenizer.eos_token_id, trainer.models.policy.config, 6)
    )
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    bf16 = dataclasses.replace(trainer.models, bf16=True)
    engine = VLLMRollout.for_run(trainer.cfg, trainer.tokenizer, trainer.device, trainer.dist, bf16)
    model = engine.llm.model
    assert engine.llm.kwargs["dtype"] == "bfloat16" and model.dtype_warnings == 0
    assert {t.dtype for parts in model.parts.values() for t in parts.values()} == {torch.bfloat16}
    assert engine_settings(1, torch.device("cuda", 3)) == {"device_ids": [3]}
    assert engine_settings(2, torch.device("cuda", 1)) == {"distributed_executor_backend": "external_launcher"}


def test_vllm_lora_adapter_policy_starts_from_its_base(tiny_dirs, prompt_file, tmp_path, monkeypatch):
    """`rto sft --lora-r` writes an adapter folder (no config.json): vLLM starts from its base, and
    the merged policy is in the engine before the first rollout samples."""
    from peft import get_peft_model

    from rto.lm.lora import lora_config, merged_state_dict
    from rto.lm.models import load_causal_lm, load_tokenizer
    from rto.rl.vllm import VLLMRollout

    adapter = tmp_path / "sft_adapter"
    peft_model = get_peft_model(load_causal_lm(tiny_dirs["policy"]), lora_config(4, 8.0, "all-linear"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    peft_model.save_pretrained(adapter)
    load_tokenizer(tiny_dirs["policy"]).save_pretrained(adapter)
    cfg_file = adapter / "adapter_config.json"
    cfg_file.write_text(
        json.dumps({**json.loads(cfg_file.read_text()), "base_model_name_or_path": tiny_dirs["policy"]})
    )

    # With --lora-r (PPO's own adapter on the merged SFT policy, synced merged); a full-model PPO on
    # an adapter folder is tests/test_ppo.py's.
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, policy=str(adapter), lora_r=4, max_prompt_len=40))
    config = trainer.models.policy.config
    monkeypatch.setitem(sys.modules, "vllm", _fake_vllm(trainer.tokenizer.eos_token_id, config, 6))
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    trainer.experience.vllm = VLLMRollout.for_run(
        trainer.cfg, trainer.tokenizer, trainer.device, trainer.dist, trainer.models
    )
    llm = trainer.experience.vllm.llm
    assert llm.kwargs["model"] == tiny_dirs["policy"]
    trainer.experience.rollout(trainer._next_prompts())
    assert llm.synced_at_generate == [1], "the first rollout sampled before the policy was synced"
    state = merged_state_dict(trainer.models.shared.model, "policy")
    base = load_causal_lm(tiny_dirs["policy"]).state_dict()
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(state[q], base[q]), "the adapter should change the policy"
    assert torch.equal(
        llm.model.weight("model.layers.0.self_attn.qkv_proj.weight"),
        torch.cat([state[f"model.layers.0.self_attn.{x}_proj.weight"] for x in "qkv"]),
    )


def test_vllm_settings_it_rejects_fail_at_the_start(tiny_dirs, prompt_file, tmp_path, monkeypatch):
    """vLLM samples at temperatures up to 2 only: one line before anything loads, not an exception
    at the first rollout. What vLLM refuses at its start (a context over the model's) is one line too."""
    import dataclasses

    from rto.io.errors import UserError
    from rto.rl.vllm import VLLMRollout, require_vllm

    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, temperature=2.5, max_prompt_len=40))
    monkeypatch.setitem(
        sys.modules, "vllm", _fake_vllm(trainer.tokenizer.eos_token_id, trainer.models.policy.config, 6)
    )
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    with pytest.raises(UserError, match="temperature of at most 2"):
        require_vllm(torch.device("cuda"), trainer.cfg)
    with pytest.raises(UserError, match="temperature of at most 2"):
        VLLMRollout.for_run(trainer.cfg, trainer.tokenizer, trainer.device, trainer.dist, trainer.models)
    long = dataclasses.replace(trainer.cfg, temperature=1.0, max_prompt_len=200)
    with pytest.raises(
        UserError, match=r"vLLM could not start .*\(ValueError: User-specified max_model_len \(206\)[^\n]*$"
    ):
        VLLMRollout.for_run(long, trainer.tokenizer, trainer.device, trainer.dist, trainer.models)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_vllm_backend_missing_is_a_clear_error(tiny_dirs, prompt_file, tmp_path, run_rto):
    proc = run_rto(
        "ppo",
        "--policy",
        tiny_dirs["policy"],
        "--prompts",
        prompt_file,
        "--out",
        str(tmp_path / "o"),
        "--reward-model",
        tiny_dirs["rm"],
        "--generation-backend",
        "vllm",
    )
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        .splitlines()[-1]
        .startswith("rto: error: ppo: --generation-backend vllm: vLLM is not installed")
    )


@pytest.mark.parametrize("tracker", ["tensorboard", "wandb", "trackio", "mlflow"])
def test_report_to_a_missing_tracker_is_a_clear_error(tracker, tiny_dirs, prompt_file, tmp_path):
    if importlib.util.find_spec(tracker) is not None:
        pytest.skip(f"{tracker} is installed here")
    from rto.io.errors import UserError
    from rto.runtime.tracking import trackers

    with pytest.raises(UserError, match=f"--report-to {tracker}: the {tracker} package is not installed"):
        trackers([tracker], "ppo")


def test_report_to_errors_from_the_command_line(tiny_dirs, prompt_file, tmp_path, run_rto):
    proc = run_rto("sft", "--data", prompt_file, "--out", str(tmp_path / "o"), "--report-to", "none,tensorboard")
    assert proc.returncode == 2 and "--report-to none cannot be combined with tensorboard" in proc.stderr
    proc = run_rto(
        "ppo",
        "--policy",
        tiny_dirs["policy"],
        "--prompts",
        prompt_file,
        "--out",
        str(tmp_path / "o"),
        "--reward-model",
        tiny_dirs["rm"],
        "--report-to",
        "neptune",
    )
    assert proc.returncode == 2 and "neptune" in proc.stderr


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_report_to_tensorboard_writes_event_files(tiny_dirs, prompt_file, tmp_path):
    trainer = PPOTrainer(_cfg(tiny_dirs, prompt_file, tmp_path, iterations=2, report_to=["tensorboard"]))
    trainer.train()
    assert list((tmp_path / "out" / "trackers").rglob("events.out.tfevents*"))
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [1, 2]
