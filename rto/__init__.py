"""rto-rlhf: Reinforced Token Optimization (RTO) for RLHF - SFT, DPO, RM, PPO with dense DPO rewards.

The Python API (rto/api.py): one function per command - `rto.sft(...)`, `rto.rm(...)`,
`rto.dpo(...)`, `rto.ppo(...)`, `rto.eval(...)`, `rto.data(...)`, `rto.pairs(...)`,
`rto.pipeline(...)`, `rto.tune(...)`, `rto.reproduce(...)` - and `rto.run(command, ...)`,
`rto.make_config(command, ...)`, the config classes (`rto.PPOConfig`, ...) and `rto.UserError`.

`COMMANDS` below is the one list of commands: the `rto` command line, the API and the names of
this module are read from it. Everything else is loaded on first use: `import rto` (and
`rto.core`) imports nothing heavy. The package's rooms, lowest first: core/ (pure tensor
functions), io/ (settings, data, errors), tasks/, runtime/ (processes, sharding, checkpoints,
tracking), lm/ (models, LoRA, sampling, evaluation), rl/ (the RL trainer), stages/ (SFT, RM, DPO,
eval, task data), experiments/ (pipeline, tune, reproduce, reports); cli.py and api.py on top.
"""

from dataclasses import dataclass

__version__ = "0.1.0"


@dataclass(frozen=True)
class Command:
    """One command: where its run function and its config class live ("module:name"), imported only when used."""

    summary: str
    run: str
    config: str  # apart from the run function: building the command line's flags imports no trainer
    api_config: str  # the config class's name in the API (rto.PPOConfig, ...)
    stage: bool = True  # a single stage (False: pipeline, tune, reproduce, which run stages)

    def config_class(self):
        return _load(self.config)

    def load(self):
        """(config class, run function)."""
        return self.config_class(), _load(self.run)


def _load(where: str):
    import importlib

    module, name = where.split(":")
    return getattr(importlib.import_module(module), name)


COMMANDS = {
    "data": Command(
        "write a task's SFT data and prompt files",
        "rto.stages.task_data:run_data",
        "rto.stages.task_data:DataStageConfig",
        "DataConfig",
    ),
    "sft": Command(
        "supervised fine-tuning (TRL SFTTrainer)", "rto.stages.sft:run", "rto.stages.sft:SFTStageConfig", "SFTConfig"
    ),
    "pairs": Command(
        "sample SFT pairs and label them with a task's gold reward",
        "rto.stages.task_data:run_pairs",
        "rto.stages.task_data:PairsStageConfig",
        "PairsConfig",
    ),
    "rm": Command(
        "Bradley-Terry reward model (TRL RewardTrainer)", "rto.stages.rm:run", "rto.stages.rm:RMStageConfig", "RMConfig"
    ),
    "dpo": Command(
        "DPO from the SFT model (TRL DPOTrainer)", "rto.stages.dpo:run", "rto.stages.dpo:DPOStageConfig", "DPOConfig"
    ),
    "ppo": Command(
        "PPO with a critic; --reward rto for RTO", "rto.rl.trainer:run", "rto.rl.config:PPOStageConfig", "PPOConfig"
    ),
    "eval": Command(
        "compare models on held-out prompts", "rto.stages.eval:run", "rto.stages.eval:EvalStageConfig", "EvalConfig"
    ),
    "pipeline": Command(
        "the whole pipeline: data, SFT, pairs, RM, DPO, PPO/RTO, eval, report",
        "rto.experiments.pipeline:run",
        "rto.experiments.pipeline_config:PipelineConfig",
        "PipelineConfig",
        stage=False,
    ),
    "tune": Command(
        "choose the RL settings on the dev split (PPO: lr x KL; RTO: beta1) and write a preset file",
        "rto.experiments.tune:run",
        "rto.experiments.tune:TuneConfig",
        "TuneConfig",
        stage=False,
    ),
    "reproduce": Command(
        "the paper's claims over seeds: every method, ablation, data fraction and tuning grid",
        "rto.experiments.reproduce:run",
        "rto.experiments.reproduce:ReproduceConfig",
        "ReproduceConfig",
        stage=False,
    ),
}
STAGES = {name: command for name, command in COMMANDS.items() if command.stage}

_API = ("make_config", "run", *COMMANDS)
_CONFIGS = {command.api_config: command for command in COMMANDS.values()}
__all__ = [*_API, *_CONFIGS, "COMMANDS", "UserError", "__version__"]


def __getattr__(name: str):
    if name in _API:
        return _load(f"rto.api:{name}")
    if name in _CONFIGS:
        return _CONFIGS[name].config_class()
    if name == "UserError":
        return _load("rto.io.errors:UserError")
    raise AttributeError(f"module 'rto' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *__all__])
