"""How a run executes: one process's setup, several processes (`Dist`), FSDP2 sharding, crash-safe
checkpoint files, fault injection, metrics and trackers, progress output.

Imports `rto.io` only; no models, no algorithm.
"""
