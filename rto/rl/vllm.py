"""vLLM as the rollout engine of `rto ppo` (--generation-backend vllm): optional, GPU only.

vLLM runs inside each training process beside the trained policy ("colocated", as TRL's GRPO
colocate mode), holds its own copy of the policy's weights and gets the current ones before the
first rollout and after every PPO update (`sync_from`). It only samples: PPO's old log-probs are
computed again by the trained model (rto/rl/trainer.py), because vLLM's kernels give slightly
different numbers and the PPO ratio must compare like with like.

What vLLM (0.33, V1 engine) needs for that, each checked or set here:
- the engine in this process, so its workers can take tensors without a copy through another
  process: VLLM_ENABLE_V1_MULTIPROCESSING=0 (one process), or the `external_launcher` executor
  (several: each process's engine is its own data-parallel replica in the launcher's world);
- each process on its own GPU (several processes sharing one are refused), and a single process's
  engine on the run's --device: vLLM's in-process executor takes the index of its device config,
  which is a bare "cuda" (cuda:0), so the index goes in as `device_ids`;
- a model directory with config.json: a LoRA adapter policy (`rto sft --lora-r`) starts vLLM from
  its base, and the merged policy is synced in before the first rollout;
- weights through `LLM.collective_rpc` into the worker's model `load_weights`, under the
  transformers names (vLLM renames them and stacks q/k/v and gate/up itself), in the engine's
  dtype (a mismatch logs one warning per tensor) - the dtype the policy trains in: bf16 where
  the run is bf16, fp32 where it is not (GPUs without bf16 among them);
- stopping at the tokenizer's EOS only: vLLM adds every `eos_token_id` of the model's
  generation_config.json to the stop tokens (Llama-3.1/Qwen2.5-Instruct list several) unless a
  request sets `ignore_eos`, and then stops only at its own `stop_token_ids`; a response ending
  elsewhere would take the missing-EOS penalty;
- sampling settings vLLM accepts (temperature at most 2), checked before anything loads;
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
from pathlib import Path

import numpy as np
import torch

from rto.io.errors import UserError
from rto.lm.rollout import Sampling

# What can go wrong inside vLLM's load_weights: an unknown name (KeyError), a shape its loaders
# assert on (AssertionError), a tensor they cannot copy (RuntimeError, TypeError, ...).
_SYNC_ERRORS = (AssertionError, AttributeError, IndexError, KeyError, RuntimeError, TypeError, ValueError)


def require_vllm(device: torch.device, cfg=None):
    """vLLM itself, or a one-line error saying what is missing; with the run's config, its
    sampling settings checked by vLLM's own SamplingParams too (before any model loads)."""
    try:
        import vllm
    except ImportError:
        raise UserError(
            "ppo: --generation-backend vllm: vLLM is not installed (pip install vllm, on a machine with "
            "a CUDA GPU); the default --generation-backend hf needs nothing extra"
        ) from None
    if cfg is not None:
        check_sampling(vllm, sampling_settings(cfg.sampling, eos=0))
    if device.type != "cuda":
        raise UserError(f"ppo: --generation-backend vllm needs a CUDA device (this run uses {device})")
    return vllm


def sampling_settings(sampling: Sampling, eos: int) -> dict:
    """SamplingParams arguments (all but the seed). `ignore_eos` with our EOS as the only stop
    token: without it vLLM adds the generation config's EOS ids to the stop tokens."""
    return dict(
        n=1,
        temperature=sampling.temperature,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,
        top_p=sampling.top_p,
        max_tokens=sampling.max_new_tokens,
        ignore_eos=True,
        stop_token_ids=[eos],
        detokenize=False,
    )  # token ids only: no text needed


def check_sampling(vllm, settings: dict) -> None:
    """The settings through vLLM's SamplingParams once, so a value it rejects (temperature > 2) is
    a one-line error at the start, not an exception at the first rollout."""
    if settings["temperature"] > 2.0:  # SamplingParams._verify_args: temperature in [0, 2]
        raise UserError(
            f"ppo: --generation-backend vllm: vLLM samples at a temperature of at most 2 (got "
            f"--temperature {settings['temperature']}); lower it or use --generation-backend hf"
        )
    try:
        vllm.SamplingParams(**settings, seed=0)
    except Exception as e:  # vLLM 0.33's VLLMValidationError is no ValueError (vllm/exceptions.py)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"ppo: --generation-backend vllm: vLLM rejects the sampling settings ({first[:200]}); "
            "use --generation-backend hf"
        ) from None


def engine_model(policy: str | Path) -> str:
    """The directory vLLM starts from: the policy's, or a LoRA adapter's base (vLLM needs a
    config.json; the adapter is merged into the weights synced before the first rollout)."""
    from rto.lm.models import adapter_base, is_adapter_dir

    return str(adapter_base(policy) if is_adapter_dir(policy) else policy)


def engine_dtype(bf16: bool) -> torch.dtype:
    """The engine's dtype: the policy's training precision. bf16 runs happen only where the GPU has
    bf16; elsewhere fp32 (vLLM refuses bf16 below compute capability 8.0, and fp16 could overflow
    where the trained policy does not)."""
    return torch.bfloat16 if bf16 else torch.float32


def engine_settings(world: int, device: torch.device) -> dict:
    """The LLM(...) arguments that keep the engine in this process and on `device`; sets
    VLLM_ENABLE_V1_MULTIPROCESSING."""
    if os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "0") != "0":
        raise UserError(
            "ppo: --generation-backend vllm: VLLM_ENABLE_V1_MULTIPROCESSING is set to "
            f"{os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']!r}; the weight sync needs the engine in the "
            "training process: unset it (or set it to 0)"
        )
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if world > 1:  # external_launcher: each engine on cuda:LOCAL_RANK, the launcher's device too
        return {"distributed_executor_backend": "external_launcher"}
    # One process: its executor takes cuda:0; device_ids (indices into the visible GPUs, as torch's
    # are; vLLM 0.33's EngineArgs) puts the engine on another of this run's GPUs.
    index = device.index if device.index is not None else (torch.cuda.current_device() if device.type == "cuda" else 0)
    return {"device_ids": [index]} if index else {}


def check_gpus(world: int, local_world: int) -> None:
    """Several processes: each must have a GPU of its own for its engine."""
    if world > 1 and torch.cuda.device_count() < local_world:
        raise UserError(
            f"ppo: --generation-backend vllm: {local_world} processes on this machine share "
            f"{torch.cuda.device_count()} GPU(s); each needs its own (one process per GPU), or use "
            "--generation-backend hf"
        )


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


class _SourceError(Exception):
    """An exception from our side of the weight stream (e.g. a collective that gathers a shard):
    re-raised as it was, not reported as vLLM's failure."""


def _cast(weights: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    try:
        for name, t in weights:
            t = t.detach()
            yield name, t.to(dtype) if t.is_floating_point() else t
    except Exception as e:
        raise _SourceError() from e


class VLLMRollout:
    def __init__(
        self,
        model_dir: str,
        tokenizer,
        device: torch.device,
        *,
        sampling: Sampling,
        gpu_memory_utilization: float,
        seed: int,
        max_prompt_len: int,
        bf16: bool,
        world: int = 1,
        local_world: int = 1,
    ):
        import vllm

        check_gpus(world, local_world)
        self.tokenizer = tokenizer
        self.device = device
        self.max_new_tokens = max_new_tokens = sampling.max_new_tokens
        self.sampling = sampling_settings(sampling, tokenizer.eos_token_id)
        check_sampling(vllm, self.sampling)
        self.SamplingParams = vllm.SamplingParams
        self.dtype = engine_dtype(bf16)
        # One engine per process, on this process's GPU; the model is read from its directory once,
        # then kept current by sync_weights.
        settings = engine_settings(world, device)
        with _RandomStates(), self._on_device():
            try:
                self.llm = vllm.LLM(
                    model=model_dir,
                    tokenizer=model_dir,
                    dtype=str(self.dtype).removeprefix("torch."),
                    seed=seed,
                    gpu_memory_utilization=gpu_memory_utilization,
                    enable_prefix_caching=True,
                    max_model_len=max_prompt_len + max_new_tokens,
                    **settings,
                )
            except Exception as e:  # vLLM's own checks (context length, memory, ...) raise many types
                first = str(e).strip().splitlines()[0] if str(e).strip() else ""
                raise UserError(
                    f"ppo: --generation-backend vllm: vLLM could not start on {model_dir} "
                    f"({type(e).__name__}: {first[:300]}); use --generation-backend hf"
                ) from None

    def _on_device(self):
        """The engine's GPU as the current device while it runs: _RandomStates puts the caller's
        back after start-up, and vLLM's kernels launch on the current device."""
        return torch.cuda.device(self.device) if self.device.type == "cuda" else _nothing()

    @classmethod
    def for_run(cls, cfg, tokenizer, device: torch.device, dist, models) -> VLLMRollout:
        """The engine for an `rto ppo` run (its PPOStageConfig, rto.runtime.distributed.Dist and PPOModels),
        holding the run's policy: every process calls it, at the same point."""
        engine = cls(
            engine_model(cfg.policy),
            tokenizer,
            device,
            sampling=cfg.sampling,
            gpu_memory_utilization=cfg.vllm_gpu_memory_utilization,
            seed=cfg.seed,
            max_prompt_len=cfg.max_prompt_len,
            bf16=models.bf16,
            world=dist.world,
            local_world=dist.local_world,
        )
        # vLLM read a directory, not the policy as loaded (an adapter's base has no adapter in it):
        # the policy goes in before the first rollout. This also tries the sync before any update.
        engine.sync_from(models)
        return engine

    def sync_from(self, models) -> None:
        """The policy of an `rto ppo` run (its PPOModels) into the engine: every process calls it."""
        self.sync_weights(policy_weights(models))

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Sample one response per left-padded prompt -> a Batch laid out as HF generate's."""
        from rto.lm.rollout import Batch

        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids, prompt_mask)]
        # A seed per request from the training loop's RNG (seeded per process and iteration).
        seeds = torch.randint(0, 2**31 - 1, (len(prompts),)).tolist()
        params = [self.SamplingParams(**self.sampling, seed=s) for s in seeds]
        with self._on_device():
            outputs = self.llm.generate(prompts, params, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids)[: self.max_new_tokens] for o in outputs]
        width = max(1, max(len(r) for r in responses))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(responses), width), pad, dtype=torch.long)
        mask = torch.zeros((len(responses), width), dtype=torch.long)
        for i, r in enumerate(responses):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = 1
        return Batch(prompt_ids, prompt_mask, ids.to(self.device), mask.to(self.device))

    def sync_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """The trained policy's current weights (transformers names, whole: see `policy_weights`)
        into the engine's model, each cast to the engine's dtype on its way."""
        try:  # the engine is in this process (engine_settings): the stream is consumed here, unpickled
            with self._on_device():
                self.llm.collective_rpc(_load_into_worker, args=(_cast(weights, self.dtype),))
        except _SourceError as e:
            raise e.__cause__ from None
        except _SYNC_ERRORS as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(
                f"ppo: --generation-backend vllm: the weight sync into vLLM failed ({type(e).__name__}: "
                f"{first[:200]}); use --generation-backend hf"
            ) from None
        self.llm.reset_prefix_cache()  # cached prompt states came from the old weights


def policy_weights(models) -> Iterator[tuple[str, torch.Tensor]]:
    """The policy's weights under transformers' names (LoRA merged in), whole, one tensor at a time:
    a sharded policy's are gathered one by one as vLLM loads them (every process iterates them
    all, in the same order), so no process holds a second whole copy beside vLLM's."""
    from rto.runtime.sharding import full_state_dict, full_tensor, is_wrapped

    module = models.policy_root
    if models.shared is not None:  # the merge needs base and adapters together: gathered whole first
        from rto.lm.lora import merged_state_dict

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
