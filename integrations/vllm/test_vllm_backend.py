"""rto/rl/vllm.py against the real vLLM 0.33 (CPU platform, no engine: see conftest.py), so a
renamed argument, a changed default or changed stop-token semantics fails here."""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import types

import pytest
import torch

from rto.io.errors import UserError
from rto.lm.rollout import Sampling
from rto.rl import vllm as vb


def _settings(eos=5, **kw):
    values = dict(max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0)
    values.update(kw)
    return vb.sampling_settings(Sampling(**values), eos)


def test_sampling_settings_are_real_sampling_params():
    import vllm

    params = vllm.SamplingParams(**_settings(top_k=4), seed=7)
    assert (params.max_tokens, params.top_k, params.seed, params.stop_token_ids) == (8, 4, 7, [5])
    assert params.n == 1 and params.ignore_eos and not params.detokenize
    assert vllm.SamplingParams(**_settings(top_k=0), seed=1).top_k == 0  # 0 (not -1): "consider all tokens"


def _engine_view(params, generation_config: dict, eos: int | None):
    """What the engine does to every request (vllm/v1/engine/input_processor.py: update_from_generation_config
    with the model's generation config and the tokenizer's EOS), then the scheduler's check_stop
    (vllm/v1/core/sched/utils.py) on a response ending in `last`."""
    from vllm.v1.core.sched.utils import check_stop
    from vllm.v1.request import Request

    params.update_from_generation_config(generation_config, eos)

    def stops_at(last: int) -> bool:
        request = Request("r", [1, 2, 3], params.clone(), None)
        request.append_output_token_ids([9, last])
        return check_stop(request, max_model_len=64)

    return stops_at


def test_only_the_tokenizers_eos_stops_a_response():
    """Instruct models list several EOS ids in generation_config.json (Llama-3.1: <|end_of_text|>,
    <|eom_id|>, <|eot_id|>): vLLM stops at all of them unless a request sets ignore_eos."""
    import vllm

    gen = {"eos_token_id": [5, 11, 12]}
    ours = vllm.SamplingParams(**_settings(eos=11), seed=0)  # our tokenizer's EOS is 11; vLLM's tokenizer says 5
    stops_at = _engine_view(ours, gen, eos=5)
    assert ours.stop_token_ids == [11] and ours.eos_token_id is None
    assert stops_at(11) and not stops_at(5) and not stops_at(12)
    # Without ignore_eos (the old settings): every generation-config EOS stops, and vLLM's tokenizer EOS.
    old = dict(_settings(eos=11), ignore_eos=False)
    stops_at = _engine_view(vllm.SamplingParams(**old, seed=0), gen, eos=5)
    assert stops_at(11) and stops_at(5) and stops_at(12)


def test_generation_config_vllm_still_reads_the_eos_ids(tiny_dirs, tmp_path):
    """`generation_config="vllm"` drops only the sampling defaults: the EOS ids still come from the
    model's file (vllm/config/model.py try_get_generation_config), so it would not fix the above."""
    import shutil

    from vllm.engine.arg_utils import EngineArgs

    model = tmp_path / "m"
    shutil.copytree(tiny_dirs["llama"], model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "temperature": 0.6}))
    config = EngineArgs(model=str(model), max_model_len=32, generation_config="vllm").create_engine_config()
    assert config.model_config.try_get_generation_config()["eos_token_id"] == [2, 7]
    assert config.model_config.get_diff_sampling_param() == {}


def test_vllms_sampling_limits_are_one_line_errors():
    import vllm
    from vllm.exceptions import VLLMValidationError  # not a ValueError in 0.33

    with pytest.raises(VLLMValidationError, match="temperature"):
        vllm.SamplingParams(**_settings(temperature=2.5), seed=0)
    vllm.SamplingParams(**_settings(temperature=2.0), seed=0)
    with pytest.raises(UserError, match="temperature of at most 2"):
        vb.check_sampling(vllm, _settings(temperature=2.5))
    with pytest.raises(UserError, match="rejects the sampling settings .*top_p"):
        vb.check_sampling(vllm, _settings(top_p=1.5))
    cfg = types.SimpleNamespace(sampling=Sampling(8, 3.0, 0, 1.0))
    with pytest.raises(UserError, match="temperature"):  # before the device check, before any model loads
        vb.require_vllm(torch.device("cpu"), cfg)


def _llm_kwargs(monkeypatch, model_dir: str, device: torch.device, bf16: bool, world: int = 1) -> dict:
    """The LLM(...) arguments VLLMRollout passes (the engine itself cannot start here)."""
    import vllm

    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

    monkeypatch.setattr(vllm, "LLM", Recorder)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setattr(vb, "check_gpus", lambda *a: None)
    tok = types.SimpleNamespace(eos_token_id=2, pad_token_id=0)
    vb.VLLMRollout(
        model_dir,
        tok,
        device,
        sampling=Sampling(8, 1.0, 0, 1.0),
        gpu_memory_utilization=0.3,
        seed=3,
        max_prompt_len=16,
        bf16=bf16,
        world=world,
        local_world=world,
    )
    return seen


def test_llm_arguments_are_real_engine_args(monkeypatch, tiny_dirs):
    import vllm
    from vllm.engine.arg_utils import EngineArgs

    fields = {f.name for f in dataclasses.fields(EngineArgs)}
    llm_params = set(inspect.signature(vllm.LLM.__init__).parameters)
    for world in (1, 2):
        kwargs = _llm_kwargs(monkeypatch, tiny_dirs["llama"], torch.device("cpu"), bf16=False, world=world)
        unknown = [k for k in kwargs if k not in fields and k not in llm_params]
        assert not unknown, f"not LLM/EngineArgs arguments in vLLM 0.33: {unknown}"
    # What they configure, as vLLM reads them (the device ids are checked below, on the CUDA mapping).
    kwargs = _llm_kwargs(monkeypatch, tiny_dirs["llama"], torch.device("cpu"), bf16=False)
    assert "device_ids" not in kwargs  # device 0: vLLM's default
    config = EngineArgs(**kwargs).create_engine_config()
    assert config.model_config.dtype == torch.float32 and config.model_config.max_model_len == 16 + 8
    assert config.cache_config.enable_prefix_caching and config.cache_config.gpu_memory_utilization == 0.3
    assert config.model_config.seed == 3 and config.model_config.tokenizer == tiny_dirs["llama"]
    assert _llm_kwargs(monkeypatch, tiny_dirs["llama"], torch.device("cpu"), bf16=True)["dtype"] == "bfloat16"
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" in __import__("vllm.envs").envs.environment_variables


def test_llm_methods_the_backend_calls():
    """generate(prompts, params, use_tqdm=...), collective_rpc(method, args=...), reset_prefix_cache(),
    prompts as {"prompt_token_ids": [...]}, outputs[0].token_ids; the worker's model through its
    model runner's get_model (the in-process executor's WorkerWrapperBase passes attributes on)."""
    import vllm
    from vllm.inputs import TokensPrompt
    from vllm.outputs import CompletionOutput
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    assert {"prompts", "sampling_params", "use_tqdm"} <= set(inspect.signature(vllm.LLM.generate).parameters)
    assert {"method", "args", "kwargs"} <= set(inspect.signature(vllm.LLM.collective_rpc).parameters)
    assert callable(vllm.LLM.reset_prefix_cache)
    assert "prompt_token_ids" in TokensPrompt.__annotations__
    assert "token_ids" in {f.name for f in dataclasses.fields(CompletionOutput)}
    assert callable(GPUModelRunner.get_model) and "__getattr__" in vars(WorkerWrapperBase)


def test_cuda_n_puts_the_engine_on_gpu_n(monkeypatch):
    """--device cuda:2: device_ids=[2] -> assigned_physical_gpu_ids (arg_utils._resolve_device_ids,
    indices into CUDA_VISIBLE_DEVICES) -> the worker's torch device (gpu_worker.init_device via
    logical_device_id_to_visible_device_id). Without it the one-process executor takes the device
    config's bare "cuda": local rank 0 (uniproc_executor._distributed_args)."""
    import vllm.engine.arg_utils as arg_utils
    from vllm.platforms import interface

    class Cuda(interface.Platform):  # CudaPlatform's id mapping (its module needs libcuda to import)
        device_control_env_var = "CUDA_VISIBLE_DEVICES"

    settings = vb.engine_settings(1, torch.device("cuda", 2))
    assert settings == {"device_ids": [2]} and vb.engine_settings(1, torch.device("cuda", 0)) == {}
    monkeypatch.setattr(arg_utils, "current_platform", Cuda)
    for visible, physical in (("", 2), ("4,5,6,7", 6)):
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
        ids = arg_utils.EngineArgs(model="m", **settings)._resolve_device_ids()
        assert ids == [physical]
        monkeypatch.setattr(interface, "_assigned_physical_gpu_ids", None)  # once per process: reset
        interface.set_assigned_physical_gpu_ids(ids)
        assert Cuda.logical_device_id_to_visible_device_id(0) == 2  # torch's cuda:2
    assert vb.engine_settings(2, torch.device("cuda", 1)) == {"distributed_executor_backend": "external_launcher"}


def test_a_lora_adapter_policy_starts_vllm_from_its_base(tmp_path, tiny_dirs):
    from vllm.engine.arg_utils import EngineArgs

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": tiny_dirs["llama"]}))
    assert vb.engine_model(adapter) == tiny_dirs["llama"]
    EngineArgs(model=vb.engine_model(adapter), max_model_len=32).create_engine_config()
    with pytest.raises(Exception):  # noqa: B017 - vLLM's own error type varies by version; the adapter folder itself is no model for vLLM (no config.json)
        EngineArgs(model=str(adapter), max_model_len=32).create_engine_config()


# ---- weights: rto's names into the real Llama / Qwen2 load_weights, through collective_rpc's call


def _vllm_model(path: str, dtype: torch.dtype):
    from vllm.config import set_current_vllm_config
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.models.llama import LlamaForCausalLM
    from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

    config = EngineArgs(model=path, max_model_len=32, enforce_eager=True).create_engine_config()
    cls = LlamaForCausalLM if "llama" in path else Qwen2ForCausalLM
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # vLLM's layers take the default dtype, as its loader sets it
    try:
        with set_current_vllm_config(config), torch.device("cpu"):
            return cls(vllm_config=config)
    finally:
        torch.set_default_dtype(default)


def _rollout_on(model, dtype: torch.dtype) -> vb.VLLMRollout:
    """A VLLMRollout whose engine runs collective_rpc as vLLM's in-process executor does: the real
    run_method on a real WorkerWrapperBase (its attributes pass to the worker, whose model runner
    gives the model: gpu_worker.Worker / GPUModelRunner.get_model)."""
    from vllm.v1.serial_utils import run_method
    from vllm.v1.worker.worker_base import WorkerWrapperBase

    wrapper = WorkerWrapperBase(rpc_rank=0)
    wrapper.worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(get_model=lambda: model))
    llm = types.SimpleNamespace(
        collective_rpc=lambda method, timeout=None, args=(), kwargs=None: [
            run_method(wrapper, method, args, kwargs or {})
        ],
        reset_prefix_cache=lambda: True,
    )
    rollout = vb.VLLMRollout.__new__(vb.VLLMRollout)
    rollout.llm, rollout.dtype, rollout.device = llm, dtype, torch.device("cpu")
    return rollout


class _Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_policy_weights_load_into_the_real_models(arch, tiny_dirs, dist_once):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tiny_dirs[arch], dtype=torch.float32)  # fp32 master weights
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1)  # not what vLLM would have read from the directory
    model = _vllm_model(tiny_dirs[arch], torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    caught = _Warnings()
    logging.getLogger("vllm").addHandler(caught)
    try:
        _rollout_on(model, torch.bfloat16).sync_from(types.SimpleNamespace(policy_root=hf, shared=None))
    finally:
        logging.getLogger("vllm").removeHandler(caught)
    assert not [m for m in caught.messages if "dtype" in m], caught.messages[:3]  # cast before sending
    state, params = hf.state_dict(), dict(model.named_parameters())
    for i in range(hf.config.num_hidden_layers):
        p = f"model.layers.{i}."
        for kind in ("weight", "bias") if arch == "qwen2" else ("weight",):
            want = torch.cat([state[p + f"self_attn.{x}_proj.{kind}"] for x in "qkv"]).to(torch.bfloat16)
            assert torch.equal(params[p + f"self_attn.qkv_proj.{kind}"], want), (p, kind)
        want = torch.cat([state[p + "mlp.gate_proj.weight"], state[p + "mlp.up_proj.weight"]]).to(torch.bfloat16)
        assert torch.equal(params[p + "mlp.gate_up_proj.weight"], want)
    vocab = hf.config.vocab_size  # vLLM pads its embedding rows (to a multiple of 64)
    assert torch.equal(
        params["model.embed_tokens.weight"][:vocab], state["model.embed_tokens.weight"].to(torch.bfloat16)
    )
    if not hf.config.tie_word_embeddings:
        assert torch.equal(params["lm_head.weight"][:vocab], state["lm_head.weight"].to(torch.bfloat16))


def test_lora_merged_names_load_and_sync_errors_are_one_line(tiny_dirs, dist_once):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from rto.lm.lora import lora_config, merged_state_dict

    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_dirs["llama"], dtype=torch.float32),
        lora_config(4, 8.0, "all-linear"),
        adapter_name="policy",
    )
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    merged = merged_state_dict(peft_model, "policy")
    model = _vllm_model(tiny_dirs["llama"], torch.float32)
    rollout = _rollout_on(model, torch.float32)
    rollout.sync_weights(merged.items())
    params = dict(model.named_parameters())
    assert torch.equal(params["model.layers.1.mlp.down_proj.weight"], merged["model.layers.1.mlp.down_proj.weight"])
    # What vLLM's loaders raise, as one line: a shape they assert on, a name they do not know.
    with pytest.raises(UserError, match=r"weight sync into vLLM failed \(AssertionError"):
        rollout.sync_weights([("model.norm.weight", torch.zeros(3))])
    with pytest.raises(UserError, match=r"weight sync into vLLM failed \((KeyError|ValueError)"):
        rollout.sync_weights([("model.layers.0.self_attn.rotary.weight", torch.zeros(1))])
