"""The stages trained with TRL's trainers (SFT, RM, DPO), `rto eval`, and a task's data files; each
stage's config dataclass beside its run function.

Imports `core`, `io`, `runtime`, `lm`, `tasks` (never `rl`); the commands table is `rto.COMMANDS`.
"""
