"""Optimizers: the paper's look-ahead Nesterov update, the matrix optimizers, error feedback, the
method presets, learning-rate schedules.

    pipenag bench optimizer --config configs/small.toml
    from pipenag.optim import build_optimizer; opt = build_optimizer("muon", stage_module, lr=3e-4)
"""

from pipenag.optim.basis_rotation import BasisRotation
from pipenag.optim.composite import CompositeOptimizer, hidden_matrix_params
from pipenag.optim.delayed_nesterov import DelayedNesterov
from pipenag.optim.error_feedback import ErrorFeedback
from pipenag.optim.factory import OPTIMIZERS, build_optimizer
from pipenag.optim.lr import delay_discount_lr, warmup_cosine_lr
from pipenag.optim.muon import build_muon

__all__ = ["BasisRotation", "CompositeOptimizer", "DelayedNesterov", "ErrorFeedback", "OPTIMIZERS", "build_muon",
           "build_optimizer", "delay_discount_lr", "hidden_matrix_params", "warmup_cosine_lr"]
