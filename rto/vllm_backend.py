"""vLLM as the rollout engine of `rto ppo` (--generation-backend vllm): optional, GPU only.

vLLM runs inside each training process beside the trained policy ("colocated", as TRL's GRPO
colocate mode), holds its own copy of the policy's weights and gets the new ones after every PPO
update (`sync_weights`). It only samples: PPO's old log-probs are computed again by the trained
model (rto/stages/ppo.py), because vLLM's kernels give slightly different numbers and the PPO
ratio must compare like with like.

What vLLM (V1 engine) needs for that, each checked or set here:
- the engine in this process, so its workers can take tensors without a copy through another
  process: VLLM_ENABLE_V1_MULTIPROCESSING=0 (one process), or the `external_launcher` executor
  (several: each process's engine is its own data-parallel replica in the launcher's world);
- each process on its own GPU (several processes sharing one are refused);
- weights through `LLM.collective_rpc` into the worker's model `load_weights`, under the
  transformers names (vLLM renames them and stacks q/k/v and gate/up itself);
- a seed per request, drawn from the training loop's RNG: vLLM draws unseeded requests' seeds
  from its own global state, which would make sampling (and a resumed run) irreproducible;
- `max_model_len` = prompt limit + response limit (not the model's 128k context: the KV cache
  would be sized for it);
- the RNG states and the current CUDA device as they were: vLLM reseeds the global RNGs and
  sets the device while it starts.

Where vLLM is not installed, or there is no GPU, asking for it is a one-line error.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from rto.errors import UserError


def require_vllm(device: torch.device):
    """vLLM itself, or a one-line error saying what is missing."""
    try:
        import vllm
    except ImportError:
        raise UserError("ppo: --generation-backend vllm: vLLM is not installed (pip install vllm, on a machine with "
                        "a CUDA GPU); the default --generation-backend hf needs nothing extra") from None
    if device.type != "cuda":
        raise UserError(f"ppo: --generation-backend vllm needs a CUDA device (this run uses {device})")
    return vllm


def engine_settings(world: int) -> dict:
    """The LLM(...) arguments that keep the engine in this process; sets VLLM_ENABLE_V1_MULTIPROCESSING."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise UserError("ppo: --generation-backend vllm: VLLM_ENABLE_V1_MULTIPROCESSING is set to "
                        f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}; the weight sync needs the engine in the "
                        "training process: unset it (or set it to 0)")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return {"distributed_executor_backend": "external_launcher"} if world > 1 else {}


def check_gpus(world: int, local_world: int) -> None:
    """Several processes: each must have a GPU of its own for its engine."""
    if world > 1 and torch.cuda.device_count() < local_world:
        raise UserError(f"ppo: --generation-backend vllm: {local_world} processes on this machine share "
                        f"{torch.cuda.device_count()} GPU(s); each needs its own (one process per GPU), or use "
                        "--generation-backend hf")


class _RandomStates:
    """Every global RNG state and the current CUDA device, put back after vLLM's start-up."""

    def __enter__(self):
        self.py, self.np, self.cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        self.device = torch.cuda.current_device() if torch.cuda.is_available() else None
        return self

    def __exit__(self, *exc):
        random.setstate(self.py)
        np.random.set_state(self.np)
        torch.set_rng_state(self.cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
            torch.cuda.set_device(self.device)
        return False


def _load_into_worker(worker, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Runs inside vLLM's worker (collective_rpc): the weights into its model."""
    runner = worker.model_runner
    model = runner.get_model() if hasattr(runner, "get_model") else runner.model
    model.load_weights(weights=iter(weights))


class VLLMRollout:
    def __init__(self, model_dir: str, tokenizer, device: torch.device, *, max_new_tokens: int, temperature: float,
                 top_k: int, top_p: float, gpu_memory_utilization: float, seed: int, max_prompt_len: int,
                 world: int = 1, local_world: int = 1):
        import vllm

        check_gpus(world, local_world)
        self.tokenizer = tokenizer
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.sampling = dict(n=1, temperature=temperature, top_k=top_k if top_k > 0 else -1, top_p=top_p,
                             max_tokens=max_new_tokens, stop_token_ids=[tokenizer.eos_token_id])
        self.SamplingParams = vllm.SamplingParams
        # One engine per process, on this process's GPU; the model is read from the policy's
        # directory once, then kept current by sync_weights.
        with _RandomStates(), torch.cuda.device(device) if device.type == "cuda" else _nothing():
            self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), dtype="bfloat16", seed=seed,
                                gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True,
                                max_model_len=max_prompt_len + max_new_tokens, **engine_settings(world))

    @classmethod
    def for_run(cls, cfg, tokenizer, device: torch.device, dist) -> "VLLMRollout":
        """The engine for an `rto ppo` run (its PPOStageConfig and rto.distributed.Dist)."""
        return cls(cfg.policy, tokenizer, device, max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                   top_k=cfg.top_k, top_p=cfg.top_p, gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
                   seed=cfg.seed, max_prompt_len=cfg.max_prompt_len, world=dist.world, local_world=dist.local_world)

    def sync_from(self, models) -> None:
        """The policy of an `rto ppo` run (its PPOModels) into the engine: every process calls it."""
        self.sync_weights(policy_weights(models))

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Sample one response per left-padded prompt -> a Batch laid out as HF generate's."""
        from rto.rollout import Batch

        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids, prompt_mask)]
        # A seed per request from the training loop's RNG (seeded per process and iteration).
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        params = [self.SamplingParams(**self.sampling, seed=s) for s in seeds]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids)[:self.max_new_tokens] for o in outputs]
        width = max(1, max(len(r) for r in responses))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(responses), width), pad, dtype=torch.long)
        mask = torch.zeros((len(responses), width), dtype=torch.long)
        for i, r in enumerate(responses):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return Batch(prompt_ids, prompt_mask, ids.to(self.device), mask.to(self.device))

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The trained policy's current weights (transformers names, whole: see `policy_weights`)
        into the engine's model."""
        stream = ((name, t.detach()) for name, t in weights)
        try:  # the engine is in this process (engine_settings): the stream is consumed here, unpickled
            self.llm.collective_rpc(_load_into_worker, args=(stream,))
        except (AttributeError, KeyError, ValueError, RuntimeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"ppo: --generation-backend vllm: the weight sync into vLLM failed ({type(e).__name__}: "
                            f"{first[:200]}); use --generation-backend hf") from None
        self.llm.reset_prefix_cache()  # cached prompt states came from the old weights


def policy_weights(models) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under transformers' names (LoRA merged in), whole, one tensor at a time:
    a sharded policy's are gathered one by one as vLLM loads them (every process iterates them
    all, in the same order), so no process holds a second whole copy beside vLLM's."""
    from rto.sharding import full_state_dict, full_tensor, is_wrapped

    module = models.policy_root
    if models.shared is not None:  # the merge needs base and adapters together: gathered whole first
        from rto.lora import merged_state_dict

        state = full_state_dict(module, everywhere=True) if is_wrapped(module) else None
        yield from merged_state_dict(models.shared.model, "policy", state).items()
        return
    for name, tensor in module.state_dict().items():
        yield name, full_tensor(tensor.detach())


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
