"""Language models: loaded and saved (safetensors, reward/value heads), adapted (LoRA), sampled and
scored (rollouts), evaluated on held-out prompts, and judged.

Imports `rto.io` and `rto.runtime`; the trainers and stages build on it.
"""
