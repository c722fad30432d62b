"""The paper's Nesterov update for stale gradients (Eq. 10), as a torch optimizer.

    from pipenag.optim import DelayedNesterov
    opt = DelayedNesterov(model.parameters(), lr=0.1, momentum=0.99, momentum_schedule="constant")
    pipenag train --method nesterov-sgd --optim.lr=1.0 --optim.weight_decay=1e-5

Ajanthan, Ramasinghe, Zuo, Avraham, Long, "Nesterov Method for Asynchronous Pipeline
Parallel Optimization", ICML 2025, arXiv 2505.01099. The optimizer is written in the
look-ahead coordinates y (the weights the next forward uses), so that the pipeline engine can
hand it whatever stale gradient the schedule produced; weight stashing lives in the engine.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["DelayedNesterov", "MOMENTUM_SCHEDULES", "momentum_at"]

MOMENTUM_SCHEDULES = ("constant", "theory")

# Tensor types the torch._foreach_* ops accept (torch.optim uses the same two).
_FOREACH_TYPES = (Tensor, torch.nn.Parameter)
_FOREACH_DEVICES = ("cpu", "cuda")


def momentum_at(t: int, schedule: str, momentum: float) -> float:
    """The momentum coefficient gamma_t of optimizer step t (1-based).

    Args:
        t: the step index, t >= 1.
        schedule: "constant" (gamma_t = momentum) or "theory" (gamma_t = max(0, (t-2)/t),
            the schedule of the paper's convergence proof; `momentum` is then unused).
        momentum: the constant coefficient.

    Returns:
        gamma_t as a float.
    """
    if schedule == "constant":
        return momentum
    if schedule == "theory":
        return max(0.0, (t - 2) / t)
    raise ValueError(f"unknown momentum_schedule {schedule!r}; expected one of {MOMENTUM_SCHEDULES}")


class DelayedNesterov(Optimizer):
    r"""Nesterov's method with a discounted (possibly stale) gradient, Ajanthan et al. Eq. 10.

    The paper's recursion in the weights w, with a gradient taken tau steps ago at the
    look-ahead point w_s + d_s, d_s = gamma_s (w_s - w_{s-1}):

        w_{t+1} = w_t + gamma_t (w_t - w_{t-1}) - lr (1 - gamma_t) grad f(w_{t-tau} + d_{t-tau})

    The optimizer stores the look-ahead point y_t = w_{t+1} + gamma_{t+1} (w_{t+1} - w_t),
    i.e. the weights the next forward pass uses (so y_{t-1} = w_t + d_t, and the stale
    gradient above is simply the gradient at y_{t-1-tau}). With m_t = -(w_{t+1} - w_t) / lr
    the same recursion reads, for steps t = 1, 2, ... and the gradient g_t handed to step t::

        input: lr, lambda (weight decay), gamma_t (momentum schedule), y_0 (params), m_0 = 0
        for t = 1, 2, ...:
            g_t     <- -g_t                                   if maximize
            y_{t-1} <- (1 - lr lambda) y_{t-1}                decoupled weight decay
            m_t     <- gamma_t m_{t-1} + (1 - gamma_t) g_t
            y_t     <- y_{t-1} - lr [gamma_{t+1} m_t + (1 - gamma_t) g_t]

    Momentum schedules: ``constant`` gamma_t = momentum; ``theory`` gamma_t = max(0, (t-2)/t)
    (the schedule of the paper's convergence result; ``momentum`` is then unused).
    ``discount=False`` replaces both (1 - gamma_t) factors by 1. With constant momentum and
    no weight decay that is exactly ``torch.optim.SGD(momentum=mu, nesterov=True)``: the
    paper's ablation, which it reports to diverge under delay.

    State per parameter (created on its first step with a gradient): ``step`` (a CPU float
    tensor, like torch's Adam: the t above, counted per parameter) and ``momentum_buffer``
    (m_t). The learning rate is read from ``group["lr"]`` at every step, so torch's LR
    schedulers work unchanged.

    Args:
        params: iterable of parameters or dicts defining parameter groups.
        lr: learning rate (float or 1-element tensor), >= 0.
        momentum: the constant gamma for ``momentum_schedule="constant"``, in [0, 1).
        weight_decay: decoupled weight decay lambda >= 0 (multiplies the params by
            1 - lr * lambda before the update, like AdamW).
        momentum_schedule: "constant" or "theory".
        discount: multiply the gradient by (1 - gamma_t) (the paper's method) or not.
        foreach: use the torch._foreach_* path. None picks it when every parameter is a plain
            tensor on CPU or CUDA (torch's own optimizers pick it only on accelerators; on CPU
            ours is as fast as the loop and makes fewer passes over memory).
        maximize: maximize the objective (negates the gradient).
    """

    def __init__(
        self,
        params,
        lr: float | Tensor,
        momentum: float = 0.99,
        weight_decay: float = 0.0,
        momentum_schedule: str = "constant",
        discount: bool = True,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError(f"Tensor lr must have 1 element, got shape {tuple(lr.shape)}")
        if not (float(lr) >= 0.0 and math.isfinite(float(lr))):
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"Invalid momentum value: {momentum} (need 0 <= momentum < 1)")
        if not (weight_decay >= 0.0 and math.isfinite(weight_decay)):
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if momentum_schedule not in MOMENTUM_SCHEDULES:
            raise ValueError(
                f"Invalid momentum_schedule: {momentum_schedule!r}; expected one of {MOMENTUM_SCHEDULES}"
            )
        if not isinstance(discount, bool):
            raise ValueError(f"Invalid discount value: {discount!r} (need True or False)")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "momentum_schedule": momentum_schedule,
            "discount": discount,
            "foreach": foreach,
            "maximize": maximize,
        }
        super().__init__(params, defaults)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("momentum_schedule", "constant")
            group.setdefault("discount", True)
            group.setdefault("foreach", None)
            group.setdefault("maximize", False)

    def _init_group(self, group, params, grads, momentum_buffers, steps) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("DelayedNesterov does not support sparse gradients")
            state = self.state[p]
            if len(state) == 0:
                # m_0 = 0, so the first step needs no special case (torch's SGD instead
                # copies the first gradient, which is the same thing when discount=False).
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(p)
            grads.append(p.grad)
            momentum_buffers.append(state["momentum_buffer"])
            steps.append(state["step"])

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Perform one optimization step.

        Args:
            closure: optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            momentum_buffers: list[Tensor] = []
            steps: list[Tensor] = []
            self._init_group(group, params, grads, momentum_buffers, steps)
            if not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(
                    type(p) in _FOREACH_TYPES and p.device.type in _FOREACH_DEVICES for p in params
                )
            fn = _foreach_delayed_nesterov if foreach else _single_tensor_delayed_nesterov
            fn(
                params,
                grads,
                momentum_buffers,
                steps,
                lr=float(group["lr"]),
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                momentum_schedule=group["momentum_schedule"],
                discount=group["discount"],
                maximize=group["maximize"],
            )
        return loss


def _single_tensor_delayed_nesterov(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    momentum_schedule: str,
    discount: bool,
    maximize: bool,
) -> None:
    """The reference path: the docstring's recursion, one tensor at a time."""
    for p, g, m, step_t in zip(params, grads, momentum_buffers, steps):
        step_t += 1
        t = int(step_t.item())
        gamma = momentum_at(t, momentum_schedule, momentum)
        gamma_next = momentum_at(t + 1, momentum_schedule, momentum)
        c = (1.0 - gamma) if discount else 1.0
        if maximize:
            g = -g
        if weight_decay != 0.0:
            p.mul_(1.0 - lr * weight_decay)
        m.mul_(gamma).add_(g, alpha=c)
        p.add_(m, alpha=-lr * gamma_next)
        p.add_(g, alpha=-lr * c)


def _foreach_delayed_nesterov(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor],
    steps: list[Tensor],
    *,
    lr: float,
    momentum: float,
    weight_decay: float,
    momentum_schedule: str,
    discount: bool,
    maximize: bool,
) -> None:
    """The same update with torch._foreach_* ops.

    Three passes over memory per step (without weight decay): m <- lerp(m, g, 1 - gamma),
    y -= lr gamma' m, y -= lr c g. torch's foreach SGD-nesterov needs four, and overwrites
    p.grad; we leave the gradients untouched.
    """
    torch._foreach_add_(steps, 1.0)
    if maximize:
        grads = torch._foreach_neg(grads)
    # Tensors of one bucket share a device, a dtype and a step count (and so gamma_t);
    # step counts differ only when some parameter skipped steps without a gradient.
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for i, (p, step_t) in enumerate(zip(params, steps)):
        buckets[(p.device, p.dtype, int(step_t.item()))].append(i)
    for (_, _, t), idx in buckets.items():
        ps = [params[i] for i in idx]
        gs = [grads[i] for i in idx]
        ms = [momentum_buffers[i] for i in idx]
        gamma = momentum_at(t, momentum_schedule, momentum)
        gamma_next = momentum_at(t + 1, momentum_schedule, momentum)
        if weight_decay != 0.0:
            torch._foreach_mul_(ps, 1.0 - lr * weight_decay)
        if discount:
            c = 1.0 - gamma
            torch._foreach_lerp_(ms, gs, c)  # m <- gamma m + (1 - gamma) g in one pass
        else:
            c = 1.0
            torch._foreach_mul_(ms, gamma)
            torch._foreach_add_(ms, gs)
        torch._foreach_add_(ps, ms, alpha=-lr * gamma_next)
        torch._foreach_add_(ps, gs, alpha=-lr * c)
