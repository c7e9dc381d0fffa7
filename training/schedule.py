"""The learning-rate schedule every training script shares: linear warm-up, then cosine decay."""

from __future__ import annotations

import math
from typing import Protocol


class ScheduleConfig(Protocol):
    steps: int
    warmup_steps: int
    min_lr_ratio: float


def lr_factor(step: int, cfg: ScheduleConfig) -> float:
    """Linear warm-up to 1, then cosine to min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
