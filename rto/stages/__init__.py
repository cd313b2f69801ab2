"""The stages, each a config dataclass and a run function, registered by command name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str  # where the run function (the trainer) lives
    config: str
    run: str
    summary: str
    config_module: str = ""  # where the config class lives, when apart from the trainer

    def config_class(self):
        """The config class alone: building flags imports no trainer."""
        return getattr(importlib.import_module(self.config_module or self.module), self.config)

    def load(self):
        return self.config_class(), getattr(importlib.import_module(self.module), self.run)


STAGES = {
    "data": Stage("rto.stages.task_data", "DataStageConfig", "run_data", "write a task's SFT data and prompt files"),
    "sft": Stage("rto.stages.sft", "SFTStageConfig", "run", "supervised fine-tuning (TRL SFTTrainer)"),
    "pairs": Stage("rto.stages.task_data", "PairsStageConfig", "run_pairs",
                   "sample SFT pairs and label them with a task's gold reward"),
    "rm": Stage("rto.stages.rm", "RMStageConfig", "run", "Bradley-Terry reward model (TRL RewardTrainer)"),
    "dpo": Stage("rto.stages.dpo", "DPOStageConfig", "run", "DPO from the SFT model (TRL DPOTrainer)"),
    "ppo": Stage("rto.stages.ppo", "PPOStageConfig", "run", "PPO with a critic; --reward rto for RTO",
                 config_module="rto.stages.ppo_config"),
    "eval": Stage("rto.stages.eval", "EvalStageConfig", "run", "compare models on held-out prompts"),
}
