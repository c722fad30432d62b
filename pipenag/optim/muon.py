"""Muon on a stage's hidden weight matrices, AdamW on the rest, as one stage optimizer.

    python -c "from pipenag.config import ModelConfig; from pipenag.split import build_stages; from pipenag.optim.muon import build_muon; print(build_muon(build_stages(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=32), num_stages=2, seed=0)[0], lr=3e-4))"

Muon (Jordan, Jin, Boza, You, Cesista, Newhouse, Bernstein, "Muon: An optimizer for hidden
layers in neural networks", 2024, https://kellerjordan.github.io/posts/muon/) keeps a momentum
buffer per weight matrix and replaces the (Nesterov) momentum by an approximately orthogonal
matrix with the same singular vectors, computed by a few Newton-Schulz iterations. It is
meant for the hidden 2-D weights only; embeddings, the output head, norms and biases keep
AdamW. arXiv 2606.30634 reports that Muon loses less than AdamW under pipeline delay
(stale gradients), the setting of this package.

The math is torch's: torch.optim.Muon on `hidden_matrix_params(module)[0]` (the blocks'
nn.Linear weights) and torch.optim.AdamW on the rest, joined in a CompositeOptimizer. Both
decay weights decoupled from the gradient, by lr * weight_decay per step with the same
(unscaled) lr.

One learning rate for both. The orthogonalized update O of an A x B matrix has singular
values near 1, so its RMS is about 1 / sqrt(max(A, B)), far below AdamW's (about 0.2-0.4 per
unit lr in practice). With adjust_lr_fn="match_rms_adamw" (Liu et al., Moonshot AI, "Muon is
Scalable for LLM Training", arXiv 2502.16982) torch applies Muon's step with
lr * 0.2 * sqrt(max(A, B)), so the update RMS is about 0.2 lr, that of AdamW. The AdamW lr and
schedule then drive both parts: the engine writes the same lr into every param group of the
stage before each step. adjust_lr_fn="original" (Jordan's scaling) uses
lr * sqrt(max(1, A / B)) instead: at the same lr its steps are sqrt(B) / 5 times smaller (B the
matrix's second dimension, an nn.Linear's fan-in; 5.5x at B = 768), so Muon would need its own,
larger lr (0.02 is the default of Jordan's implementation, against a few 1e-4 for AdamW) and a
schedule per group, which the engine, writing one lr everywhere, does not provide.

torch's Muon computes the Newton-Schulz iteration in bfloat16 whatever the parameter dtype
(float64 parameters work; their momentum buffer stays float64), refuses parameters that are
not 2-D, has no foreach path, and keeps one state entry per matrix, "momentum_buffer" (no step
count). Its `eps` is the floor of the norm it divides by before the iteration; `eps` here is
AdamW's.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pipenag.optim.composite import CompositeOptimizer, cuda_fused, hidden_matrix_params

__all__ = ["ADJUST_LR_FNS", "build_muon"]

ADJUST_LR_FNS = ("match_rms_adamw", "original")


def _check_range(name: str, value, low: float, high: float | None = None, low_open: bool = False) -> None:
    """ValueError unless value is a finite real in [low, high) (or (low, high) with low_open)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bound = ("(" if low_open else "[") + f"{low}, " + ("inf)" if high is None else f"{high})")
        raise ValueError(f"{name} must be a finite number in {bound}, got {value!r}")


def build_muon(
    module: nn.Module,
    *,
    lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.95,
    nesterov: bool = True,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    adjust_lr_fn: str = "match_rms_adamw",
    ns_steps: int = 5,
) -> CompositeOptimizer:
    """torch.optim.Muon on a module's hidden matrices and torch.optim.AdamW on the rest.

    A part with no parameters gets no optimizer: a stage without hidden nn.Linear layers is
    optimized by AdamW alone, one with nothing else by Muon alone. The composite's children
    are [Muon, AdamW] in that order (whichever exist), one param group each.

    Args:
        module: the stage (or any nn.Module); split by hidden_matrix_params.
        lr: learning rate >= 0 of both parts (Muon's is rescaled per matrix by torch, see
            adjust_lr_fn).
        weight_decay: decoupled weight decay >= 0 of both parts.
        momentum: Muon's momentum in [0, 1).
        nesterov: Muon's Nesterov momentum.
        adam_betas: AdamW's (beta1, beta2), each in [0, 1).
        eps: AdamW's denominator term > 0 (Muon keeps torch's own Newton-Schulz eps).
        adjust_lr_fn: "match_rms_adamw" (one lr for both parts) or "original" (Jordan's
            scaling; Muon then needs a larger lr than AdamW).
        ns_steps: Newton-Schulz iterations, an int in [1, 100) (torch's bound).

    Returns:
        A CompositeOptimizer over all of module's parameters.

    Raises:
        ValueError: an argument out of range, or a module without parameters.
        RuntimeError: the installed torch has no torch.optim.Muon (added in torch 2.9).
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    _check_range("lr", lr, 0.0)
    _check_range("weight_decay", weight_decay, 0.0)
    _check_range("momentum", momentum, 0.0, 1.0)
    if not isinstance(nesterov, bool):
        raise ValueError(f"nesterov must be a bool, got {nesterov!r}")
    if not isinstance(adam_betas, (tuple, list)) or len(adam_betas) != 2:
        raise ValueError(f"adam_betas must be a pair (beta1, beta2), got {adam_betas!r}")
    for i, beta in enumerate(adam_betas):
        _check_range(f"adam_betas[{i}]", beta, 0.0, 1.0)
    _check_range("eps", eps, 0.0, low_open=True)
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"adjust_lr_fn must be one of {ADJUST_LR_FNS}, got {adjust_lr_fn!r}")
    if not isinstance(ns_steps, int) or isinstance(ns_steps, bool) or not 1 <= ns_steps < 100:
        raise ValueError(f"ns_steps must be an int in [1, 100), got {ns_steps!r}")
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        raise RuntimeError(f"build_muon needs torch.optim.Muon (torch >= 2.9), torch is {torch.__version__}")

    hidden, rest = hidden_matrix_params(module)
    if not hidden and not rest:
        raise ValueError(f"module {type(module).__name__} has no parameters to optimize")
    optimizers = []
    if hidden:
        optimizers.append(muon_cls(
            hidden, lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
            ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn))
    if rest:
        optimizers.append(torch.optim.AdamW(
            rest, lr=lr, betas=tuple(adam_betas), eps=eps, weight_decay=weight_decay, fused=cuda_fused(rest)))
    return CompositeOptimizer(optimizers)
