"""rto-rlhf: Reinforced Token Optimization (RTO) for RLHF - SFT, DPO, RM, PPO with dense DPO rewards."""

__version__ = "0.1.0"
