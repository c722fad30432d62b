"""Build a stage's optimizer from a name: the optimizers behind the named methods (README).

    python -c "import torch; from pipenag.optim import build_optimizer; print(build_optimizer('nesterov', [torch.nn.Parameter(torch.zeros(3))], lr=3e-4))"

Where the math is torch's, this returns torch's optimizer: the paper's Adam form of the
look-ahead recursion is exactly torch.optim.NAdam (its mu_{t+1} is the paper's gamma_{t+1}),
and Muon is torch.optim.Muon. The matrix optimizers (basis-rotation, muon) treat a stage's
hidden weight matrices apart from the rest and so take the stage module, not a parameter list.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from pipenag.optim.basis_rotation import BasisRotation
from pipenag.optim.composite import CompositeOptimizer, cuda_fused, hidden_matrix_params
from pipenag.optim.delayed_nesterov import MOMENTUM_SCHEDULES, DelayedNesterov
from pipenag.optim.error_feedback import ErrorFeedback
from pipenag.optim.muon import build_muon

__all__ = ["OPTIMIZERS", "build_optimizer", "nows_beta1"]

OPTIMIZERS = ("adamw", "nesterov", "nesterov-nows", "nesterov-sgd", "sgd", "basis-rotation", "muon",
              "adamw-ef", "muon-ef")
MATRIX_OPTIMIZERS = ("basis-rotation", "muon", "muon-ef")
# name -> the base optimizer that ErrorFeedback wraps
ERROR_FEEDBACK = {"adamw-ef": "adamw", "muon-ef": "muon"}


def _check_number(name: str, value, low: float, high: float | None = None, high_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        bound = f"[{low}, {high})" if high_open else f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")


def nows_beta1(stage_idx: int, num_stages: int, staleness: Optional[Sequence[int]] = None) -> float:
    """NAdam beta1 of `nesterov-nows` at a stage: 0.9 + 0.09 * tau_k / (tau_0 + 1), where tau_k
    is the stage's staleness; with the default depths tau_k = K-1-k, so this is the paper's
    0.9 + 0.09 * tau_k / K. Deeper pipelines (pipeline.in_flight) scale by their stalest stage,
    so beta1 stays below 0.99.

    Args:
        stage_idx: the stage's position k in the pipeline, 0 <= k < K.
        num_stages: the number of stages K.
        staleness: tau_k of every stage (Schedule.staleness); None = K-1-k.

    Returns:
        beta1: 0.9 at the last stage (no delay), up to 0.9 + 0.09 tau_0/(tau_0 + 1) at the first.
    """
    if stage_idx is None or num_stages is None:
        raise ValueError(
            f"nesterov-nows needs stage_idx and num_stages, got stage_idx={stage_idx}, num_stages={num_stages}"
        )
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be an int >= 1, got {num_stages!r}")
    if not isinstance(stage_idx, int) or not 0 <= stage_idx < num_stages:
        raise ValueError(f"stage_idx must be an int in [0, {num_stages}), got {stage_idx!r}")
    if staleness is None:
        return 0.9 + 0.09 * (num_stages - 1 - stage_idx) / num_stages
    if len(staleness) != num_stages or any(t < 0 for t in staleness):
        raise ValueError(f"staleness={list(staleness)}: need one value >= 0 per stage ({num_stages})")
    return 0.9 + 0.09 * staleness[stage_idx] / (max(staleness) + 1)


def build_optimizer(
    name: str,
    params,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float | None = None,
    momentum_decay: float = 0.004,
    momentum_schedule: str = "constant",
    discount: bool = True,
    stage_idx: int | None = None,
    num_stages: int | None = None,
    staleness: Sequence[int] | None = None,
    foreach: bool | None = None,
    ef_scale: float = 1.0,
) -> torch.optim.Optimizer:
    """Return the torch optimizer that a method name stands for.

    Names (OPTIMIZERS):
        adamw: torch.optim.AdamW, betas (momentum or 0.9, 0.999), eps 1e-8.
        nesterov: torch.optim.NAdam, betas (momentum or 0.99, 0.999), eps 1e-8,
            momentum_decay, decoupled weight decay (the paper's method in Adam form).
        nesterov-nows: NAdam as above with a per-stage beta1 = 0.9 + 0.09 tau_k / K
            (nows_beta1); an explicit `momentum` overrides it.
        nesterov-sgd: DelayedNesterov (Eq. 10 in SGD form), momentum or 0.99,
            momentum_schedule, discount.
        sgd: torch.optim.SGD, momentum or 0 (plain, no Nesterov); its weight decay is
            torch's coupled L2 term (added to the gradient), not decoupled.
        basis-rotation: BasisRotation (betas (momentum or 0.9, 0.999), eps 1e-8, refresh
            every 10 steps, both sides rotated) on the module's hidden matrices
            (hidden_matrix_params), AdamW (same betas) on the rest, in one CompositeOptimizer.
        muon: torch.optim.Muon (momentum or 0.95, Nesterov, lr matched to AdamW's RMS) on
            the hidden matrices, AdamW (0.9, 0.999) on the rest (pipenag.optim.muon).
        adamw-ef, muon-ef: adamw / muon as above inside ErrorFeedback with c = ef_scale
            (x_{t+1} = x_t - u_t - c (u_t - u_{t-1}), arXiv 2606.30634).
    "momentum or X" means X when momentum is None; an explicit 0.0 is kept.

    Args:
        name: one of OPTIMIZERS.
        params: parameters or parameter groups, as for any torch optimizer, or an nn.Module
            (its parameters); basis-rotation and muon need the module.
        lr: learning rate >= 0.
        weight_decay: >= 0; decoupled for adamw, nesterov*, nesterov-sgd.
        momentum: beta1 / momentum coefficient in [0, 1); None picks the name's default.
        momentum_decay: NAdam's momentum warm-up rate psi (mu_t = beta1 (1 - 0.5 0.96^(t psi))).
        momentum_schedule: DelayedNesterov's "constant" or "theory".
        discount: DelayedNesterov's (1 - gamma) gradient discount.
        stage_idx: the stage's position (nesterov-nows).
        num_stages: the number of stages (nesterov-nows).
        staleness: every stage's staleness (nesterov-nows; None = K-1-k).
        foreach: passed to the torch optimizer (None = its default). AdamW (alone and as the
            rest of basis-rotation and muon) takes torch's fused kernel on CUDA (cuda_fused).
        ef_scale: the error-feedback scale c >= 0 of the "-ef" names.

    Returns:
        A torch.optim.Optimizer over `params`.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; expected one of {', '.join(OPTIMIZERS)}")
    if name in MATRIX_OPTIMIZERS and not isinstance(params, torch.nn.Module):
        raise ValueError(f"optimizer {name!r} splits a stage into hidden matrices and the rest: "
                         f"pass the stage module, not {type(params).__name__}")
    _check_number("ef_scale", ef_scale, 0.0)
    if name in ERROR_FEEDBACK:
        base = build_optimizer(ERROR_FEEDBACK[name], params, lr=lr, weight_decay=weight_decay, momentum=momentum,
                               momentum_decay=momentum_decay, momentum_schedule=momentum_schedule,
                               discount=discount, stage_idx=stage_idx, num_stages=num_stages,
                               staleness=staleness, foreach=foreach)
        return ErrorFeedback(base, c=ef_scale, foreach=foreach)
    module = params if isinstance(params, torch.nn.Module) else None
    if module is not None:
        params = module.parameters()
    _check_number("lr", lr, 0.0)
    _check_number("weight_decay", weight_decay, 0.0)
    if momentum is not None:
        _check_number("momentum", momentum, 0.0, 1.0, high_open=True)
    _check_number("momentum_decay", momentum_decay, 0.0)
    if momentum_schedule not in MOMENTUM_SCHEDULES:
        raise ValueError(f"momentum_schedule must be one of {MOMENTUM_SCHEDULES}, got {momentum_schedule!r}")
    # Stage arguments are checked whenever given, not only for the name that uses them.
    nows = None
    if stage_idx is not None or num_stages is not None or name == "nesterov-nows":
        nows = nows_beta1(stage_idx, num_stages, staleness)

    def default(value: float) -> float:
        return value if momentum is None else momentum

    if name == "adamw":
        params = list(params)
        return torch.optim.AdamW(
            params, lr=lr, betas=(default(0.9), 0.999), eps=1e-8, weight_decay=weight_decay, foreach=foreach,
            fused=cuda_fused(params, foreach),
        )
    if name in ("nesterov", "nesterov-nows"):
        beta1 = default(0.99) if name == "nesterov" else default(nows)
        return torch.optim.NAdam(
            params,
            lr=lr,
            betas=(beta1, 0.999),
            eps=1e-8,
            weight_decay=weight_decay,
            momentum_decay=momentum_decay,
            decoupled_weight_decay=True,
            foreach=foreach,
        )
    if name == "nesterov-sgd":
        return DelayedNesterov(
            params,
            lr=lr,
            momentum=default(0.99),
            weight_decay=weight_decay,
            momentum_schedule=momentum_schedule,
            discount=discount,
            foreach=foreach,
        )
    if name == "basis-rotation":
        hidden, rest = hidden_matrix_params(module)
        betas = (default(0.9), 0.999)
        children = []
        if hidden:
            children.append(BasisRotation(hidden, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay))
        if rest:
            children.append(torch.optim.AdamW(rest, lr=lr, betas=betas, eps=1e-8, weight_decay=weight_decay,
                                              foreach=foreach, fused=cuda_fused(rest, foreach)))
        return CompositeOptimizer(children)
    if name == "muon":
        return build_muon(module, lr=lr, weight_decay=weight_decay, momentum=default(0.95))
    # sgd
    return torch.optim.SGD(params, lr=lr, momentum=default(0.0), weight_decay=weight_decay, foreach=foreach)
