"""Adversarial fine-tuning of CLIP streamed from shards: FT, TeCoA, FARE, MAT, MAT+ (see modes.py)."""

from pipeline.train.config import DataConfig, OptimConfig, PretrainConfig, TrainAttackConfig, TrainConfig

__all__ = ["DataConfig", "OptimConfig", "PretrainConfig", "TrainAttackConfig", "TrainConfig"]
