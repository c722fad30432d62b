"""Optimizers: the paper's look-ahead Nesterov update, the method presets, LR schedules.

    python -m pipenag bench optimizer --sizes 1M --repeats 5
"""

from pipenag.optim.delayed_nesterov import DelayedNesterov
from pipenag.optim.factory import OPTIMIZERS, build_optimizer
from pipenag.optim.lr import delay_discount_lr, warmup_cosine_lr

__all__ = ["DelayedNesterov", "build_optimizer", "OPTIMIZERS", "warmup_cosine_lr", "delay_discount_lr"]
