"""Learning-rate schedules as pure functions of the step (defaults: the README's Methods section).

    python -c "from pipenag.optim.lr import warmup_cosine_lr as f; print([round(f(s, 100, 3e-4), 7) for s in (1, 6, 53, 100)])"

Both return a float for one step, so the engine can set group["lr"] per stage and per update
(or wrap them in torch.optim.lr_scheduler.LambdaLR).
"""

from __future__ import annotations

import math

__all__ = ["warmup_cosine_lr", "delay_discount_lr"]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def warmup_cosine_lr(
    step: int,
    total_steps: int,
    peak_lr: float,
    warmup_fraction: float = 0.06,
    min_lr_ratio: float = 0.1,
) -> float:
    """Linear warm-up then cosine decay to min_lr_ratio * peak_lr (the paper's schedule).

    With W = round(warmup_fraction * total_steps): steps 1..W give peak_lr * step / W (so step
    W is the peak); steps W..total_steps follow a half cosine from peak_lr at W down to
    min_lr_ratio * peak_lr at total_steps. If W >= total_steps the whole run is warm-up.

    Args:
        step: 1-based index of the update about to be applied, 1 <= step <= total_steps.
        total_steps: number of updates in the run, >= 1.
        peak_lr: the learning rate after warm-up, >= 0.
        warmup_fraction: fraction of the updates spent warming up, in [0, 1].
        min_lr_ratio: final lr as a fraction of peak_lr, in [0, 1].

    Returns:
        The learning rate for this update.
    """
    if not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an int >= 1, got {total_steps!r}")
    if not isinstance(step, int) or not 1 <= step <= total_steps:
        raise ValueError(f"step must be an int in [1, {total_steps}], got {step!r}")
    if not _is_number(peak_lr) or peak_lr < 0:
        raise ValueError(f"peak_lr must be a finite number >= 0, got {peak_lr!r}")
    if not _is_number(warmup_fraction) or not 0.0 <= warmup_fraction <= 1.0:
        raise ValueError(f"warmup_fraction must be in [0, 1], got {warmup_fraction!r}")
    if not _is_number(min_lr_ratio) or not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    warmup_steps = round(warmup_fraction * total_steps)
    if warmup_steps > 0 and step <= warmup_steps:
        return peak_lr * step / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)  # in (0, 1]
    min_lr = min_lr_ratio * peak_lr
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def delay_discount_lr(lr: float, tau: int, step: int, anneal_steps: int) -> float:
    """PipeMare's delay discount: lr / tau^(1 - min(step / anneal_steps, 1)).

    Yang et al., "PipeMare: Asynchronous Pipeline Parallel DNN Training", MLSys 2021. A stage
    whose gradients are tau updates old starts at lr / tau and anneals to lr.

    Args:
        lr: the undiscounted learning rate (e.g. from warmup_cosine_lr), >= 0.
        tau: the stage's delay; 0 (no delay) or >= 1.
        step: the update index, >= 0.
        anneal_steps: updates over which the discount fades; <= 0 means no annealing
            (always lr / tau).

    Returns:
        The discounted learning rate.
    """
    if not _is_number(lr) or lr < 0:
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not _is_number(tau) or tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau!r}")
    if 0 < tau < 1:
        raise ValueError(f"tau must be 0 or >= 1 (a delay in updates), got {tau!r}")
    if not _is_number(step) or step < 0:
        raise ValueError(f"step must be >= 0, got {step!r}")
    if not _is_number(anneal_steps):
        raise ValueError(f"anneal_steps must be a finite number, got {anneal_steps!r}")
    if tau == 0:
        return lr
    exponent = 1.0 - min(step / anneal_steps, 1.0) if anneal_steps > 0 else 1.0
    return lr / tau**exponent
