"""Adversarial fine-tuning of CLIP streamed from shards: FT, TeCoA, FARE, MAT, MAT+ (see modes.py)."""

from pipeline.train.config import AttackConfig, DataConfig, OptimConfig, PretrainConfig, TrainConfig

__all__ = ["AttackConfig", "DataConfig", "OptimConfig", "PretrainConfig", "TrainConfig"]
