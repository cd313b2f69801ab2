"""The RL trainer behind `rto ppo` (PPO with a critic, REINFORCE++, the RTO reward): the loop read top
to bottom in trainer.py, its config, its networks, checkpoints, experience, custom rewards, vLLM.

Imports `core`, `io`, `runtime`, `lm`, `tasks`; nothing imports it but the commands above it.
"""
