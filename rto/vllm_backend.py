"""vLLM as the rollout engine of `rto ppo` (--generation-backend vllm): optional, GPU only.

vLLM runs in the training process beside the trained policy ("colocated", as TRL's GRPO
colocate mode), holds its own copy of the policy's weights and gets the new ones after every
PPO update (`sync_weights`). It only samples: PPO's old log-probs are computed again by the
trained model (rto/stages/ppo.py), because vLLM's kernels give slightly different numbers
and the PPO ratio must compare like with like.

Where vLLM is not installed, or there is no GPU, asking for it is a one-line error.
"""

from __future__ import annotations

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


class VLLMRollout:
    def __init__(self, model_dir: str, tokenizer, device: torch.device, *, max_new_tokens: int, temperature: float,
                 top_k: int, top_p: float, gpu_memory_utilization: float, seed: int):
        import vllm

        self.tokenizer = tokenizer
        self.device = device
        # One engine per process, on this process's GPU; the model is read from the policy's
        # directory once, then kept current by sync_weights.
        self.llm = vllm.LLM(model=str(model_dir), tokenizer=str(model_dir), dtype="bfloat16", seed=seed,
                            gpu_memory_utilization=gpu_memory_utilization, enable_prefix_caching=True)
        self.params = vllm.SamplingParams(n=1, temperature=temperature, top_k=top_k if top_k > 0 else -1,
                                          top_p=top_p, max_tokens=max_new_tokens,
                                          stop_token_ids=[tokenizer.eos_token_id], seed=None)

    def generate(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Sample one response per left-padded prompt -> a Batch laid out as HF generate's."""
        from rto.rollout import Batch

        prompts = [{"prompt_token_ids": ids[m.bool()].tolist()} for ids, m in zip(prompt_ids, prompt_mask)]
        outputs = self.llm.generate(prompts, self.params, use_tqdm=False)
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        width = max(1, max(len(r) for r in responses))
        pad = self.tokenizer.pad_token_id
        ids = torch.full((len(responses), width), pad, dtype=torch.long)
        mask = torch.zeros((len(responses), width), dtype=torch.long)
        for i, r in enumerate(responses):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return Batch(prompt_ids, prompt_mask, ids.to(self.device), mask.to(self.device))

    def sync_weights(self, policy) -> None:
        """The trained policy's current weights into vLLM's copy (LoRA adapters merged)."""
        from rto.lora import merged_state_dict

        shared = getattr(policy, "shared", None)
        if shared is not None:
            state = merged_state_dict(shared.model, policy.adapter)
        else:
            state = policy.state_dict()
        self._runner_model().load_weights((name, t.detach()) for name, t in state.items())
        if hasattr(self.llm, "reset_prefix_cache"):  # cached prompt states came from the old weights
            self.llm.reset_prefix_cache()

    def _runner_model(self):
        """The model object inside vLLM's in-process worker (its path moved between versions)."""
        executor = self.llm.llm_engine.model_executor
        worker = executor.driver_worker
        for path in (("model_runner", "model"), ("worker", "model_runner", "model")):
            obj = worker
            try:
                for attr in path:
                    obj = getattr(obj, attr)
                return obj
            except AttributeError:
                continue
        raise UserError("ppo: --generation-backend vllm: this vLLM version does not expose its in-process model "
                        "for weight updates (tested layout: llm_engine.model_executor.driver_worker.model_runner."
                        "model); set VLLM_ENABLE_V1_MULTIPROCESSING=0 or use --generation-backend hf")
