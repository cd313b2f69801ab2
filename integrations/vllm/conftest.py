"""The real vLLM on a machine without a GPU: its CPU platform (VLLM_TARGET_DEVICE=cpu) so its
configs and model classes can be built here. The CUDA wheel has no CPU kernels (vllm/_C for CPU),
so an engine (LLM) cannot start: tests/test_backends_and_tracking.py covers the backend against a
stand-in, and benchmarks/gpu_vllm_check.py runs the real engine on a GPU."""

from __future__ import annotations

import os

# Before vllm is imported: its platform is resolved once, on first use (vllm/platforms/__init__.py:174).
os.environ["VLLM_TARGET_DEVICE"] = "cpu"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{"llama": untied head, GQA; "qwen2": tied head, q/k/v biases}: tiny random HF checkpoints."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    root = tmp_path_factory.mktemp("models")
    shape = dict(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=False)).save_pretrained(root / "llama")
    Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=True)).save_pretrained(root / "qwen2")
    return {k: str(root / k) for k in ("llama", "qwen2")}


@pytest.fixture(scope="session")
def dist_once(tiny_dirs):
    """vLLM's (one-process, gloo) distributed state, which its parallel layers read when built."""
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.network_utils import get_open_port

    config = EngineArgs(model=tiny_dirs["llama"], max_model_len=32, enforce_eager=True).create_engine_config()
    with set_current_vllm_config(config):
        init_distributed_environment(
            world_size=1,
            rank=0,
            local_rank=0,
            backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}",
        )
        initialize_model_parallel(1, 1)
    return True
