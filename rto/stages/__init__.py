"""The stages, each a config dataclass and a run function, registered by command name."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    module: str
    config: str
    run: str
    summary: str

    def load(self):
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), getattr(mod, self.run)


STAGES = {
    "data": Stage("rto.stages.task_data", "DataStageConfig", "run_data", "write a task's SFT data and prompt files"),
    "sft": Stage("rto.stages.sft", "SFTStageConfig", "run", "supervised fine-tuning (TRL SFTTrainer)"),
    "pairs": Stage("rto.stages.task_data", "PairsStageConfig", "run_pairs",
                   "sample SFT pairs and label them with a task's gold reward"),
    "rm": Stage("rto.stages.rm", "RMStageConfig", "run", "Bradley-Terry reward model (TRL RewardTrainer)"),
    "dpo": Stage("rto.stages.dpo", "DPOStageConfig", "run", "DPO from the SFT model (TRL DPOTrainer)"),
    "ppo": Stage("rto.stages.ppo", "PPOStageConfig", "run", "PPO with a critic; --reward rto for RTO"),
    "eval": Stage("rto.stages.eval", "EvalStageConfig", "run", "compare models on held-out prompts"),
}
