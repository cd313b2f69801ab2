"""rto-rlhf: Reinforced Token Optimization (RTO) for RLHF - SFT, DPO, RM, PPO with dense DPO rewards.

The Python API (rto/api.py): `rto.sft(...)`, `rto.rm(...)`, `rto.dpo(...)`, `rto.ppo(...)`,
`rto.eval(...)`, `rto.pairs(...)` - each command as a function of its settings - and
`rto.run(command, ...)` for any command (pipeline, tune, reproduce, data too);
`rto.make_config(command, ...)`, the config classes (`rto.PPOConfig`, ...) and `rto.UserError`.
Loaded on first use: `import rto` (and `rto.core`) imports nothing heavy.
"""

__version__ = "0.1.0"

_API = ("make_config", "run", "sft", "pairs", "rm", "dpo", "ppo", "eval")
_CONFIGS = {"SFTConfig": ("rto.stages.sft", "SFTStageConfig"), "RMConfig": ("rto.stages.rm", "RMStageConfig"),
            "DPOConfig": ("rto.stages.dpo", "DPOStageConfig"), "PPOConfig": ("rto.stages.ppo_config", "PPOStageConfig"),
            "EvalConfig": ("rto.stages.eval", "EvalStageConfig"), "PipelineConfig": ("rto.pipeline", "PipelineConfig")}
__all__ = [*_API, *_CONFIGS, "UserError", "__version__"]


def __getattr__(name: str):
    import importlib

    if name in _API:
        return getattr(importlib.import_module("rto.api"), name)
    if name in _CONFIGS:
        module, attr = _CONFIGS[name]
        return getattr(importlib.import_module(module), attr)
    if name == "UserError":
        from rto.errors import UserError
        return UserError
    raise AttributeError(f"module 'rto' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
