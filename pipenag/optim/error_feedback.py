"""Error feedback for asynchronous updates: a wrapper around any torch optimizer.

    python -c "import torch; from pipenag.optim import ErrorFeedback; p = torch.nn.Parameter(torch.ones(3)); opt = ErrorFeedback(torch.optim.AdamW([p], lr=0.1), c=1.0); p.grad = torch.ones(3); opt.step(); print(p)"
    pipenag train --method muon-ef --optim.ef_scale=0.5

Source: the error-feedback update of arXiv 2606.30634 (PipeDream-2BW with Muon and error
feedback; SPEC.md sections 5 and 6), in the form issue 19 gives it. The paper's text was not
available to us: this implements exactly that form and nothing else (no other term of the
paper, whatever it may hold, is guessed at).
"""

from __future__ import annotations

import math
from collections import ChainMap
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor
from torch.optim import Optimizer

__all__ = ["ErrorFeedback"]

_FOREACH_TYPES = (Tensor, torch.nn.Parameter)
_FOREACH_DEVICES = ("cpu", "cuda")


class _StateView(Mapping):
    """Read-only view param -> ChainMap(the wrapper's state, the base optimizer's state), so
    that code which sums an optimizer's state (memory reports) sees both. Looked up live: the
    base's load_state_dict replaces its `state`."""

    def __init__(self, wrapper: "ErrorFeedback"):
        self._wrapper = wrapper

    def _parts(self) -> tuple[dict, Mapping]:
        return self._wrapper._ef_state, self._wrapper.base_optimizer.state

    def __getitem__(self, param: Tensor) -> ChainMap:
        own, base = self._parts()
        if param not in own and param not in base:
            raise KeyError(f"no state for a parameter of shape {tuple(param.shape)}")
        # `in` first: indexing the base's defaultdict would insert an empty entry into it.
        return ChainMap(own[param] if param in own else {}, base[param] if param in base else {})

    def __iter__(self) -> Iterator[Tensor]:
        own, base = self._parts()
        yield from own
        yield from (p for p in base if p not in own)

    def __len__(self) -> int:
        return sum(1 for _ in self)


class ErrorFeedback(Optimizer):
    r"""Error feedback on the updates of a base optimizer (arXiv 2606.30634, the form of issue 19).

    With u_t = x_t - base_step(x_t) the update the base optimizer makes at step t (computed
    from the gradient handed to step t, at the current weights x_t), for steps t = 1, 2, ...::

        x_{t+1} = x_t - u_t - c (u_t - u_{t-1}),        u_0 = 0

    so the first step is x_1 - (1 + c) u_1. Implemented as: run the base step (x_t -> x_t - u_t),
    read u_t off the weights, then subtract c (u_t - u_{t-1}). Read as a look-ahead: the
    sequence z_t = x_t + c u_{t-1} obeys z_{t+1} = z_t - u_t, the base optimizer's own
    trajectory, and the gradients are taken at x_t = z_t - c u_{t-1}, a look-ahead of
    c u_{t-1} along the last update (exactly so when u_t depends on the gradients only; a
    decoupled weight decay term of u_t is evaluated at x_t). c = 0 is the base optimizer, bit
    for bit.

    The wrapper owns no hyperparameters of the base: `param_groups` is the base's list (the
    same group dicts), so setting group["lr"] on the wrapper (pipenag's lr schedule, torch's
    LR schedulers) sets it in the base. State: per parameter, ``prev_update`` (u_{t-1}),
    created on the parameter's first step with a gradient; `state` is a read-only view of it
    chained with the base's state. A parameter without a gradient is skipped, as torch's
    optimizers skip it. state_dict() is {"base": base.state_dict(), "state": {index:
    {"prev_update": tensor}}, "c": c} with torch's parameter indices (the order of
    `param_groups`); load_state_dict restores both parts, and c as torch restores a group's
    hyperparameters. After the base's own load_state_dict (which replaces its group dicts),
    call the wrapper's instead.

    Args:
        base_optimizer: any torch.optim.Optimizer (AdamW, NAdam, pipenag's CompositeOptimizer
            for Muon, ...). It must not be stepped on its own once wrapped.
        c: the error-feedback scale c >= 0 (default 1).
        foreach: use torch._foreach_* ops for the wrapper's own arithmetic; None picks them
            when every parameter is a plain tensor on CPU or CUDA. Both paths give the same
            numbers.

    Raises:
        ValueError: a base that is not a torch optimizer, or c not a finite number >= 0.
    """

    def __init__(self, base_optimizer: Optimizer, c: float = 1.0, *, foreach: bool | None = None):
        if not isinstance(base_optimizer, Optimizer):
            raise ValueError(f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer).__name__}")
        _check_c(c)
        if foreach is not None and not isinstance(foreach, bool):
            raise ValueError(f"foreach must be None, True or False, got {foreach!r}")
        self.base_optimizer = base_optimizer
        self.c = float(c)
        self.foreach = foreach
        self._attached = False
        params = [p for g in base_optimizer.param_groups for p in g["params"]]
        # The base class sets up the hook tables and the profiled step; its placeholder group
        # and state are replaced by the base's in _attach.
        super().__init__(params, {"c": self.c})
        self._ef_state: dict[Tensor, dict[str, Tensor]] = {}
        self._attach()

    def _attach(self) -> None:
        self.param_groups = self.base_optimizer.param_groups
        self.defaults = {**self.base_optimizer.defaults, "c": self.c}
        self.state = _StateView(self)
        self._attached = True

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add the group to the base optimizer (the wrapper shares its group list)."""
        if not self._attached:  # Optimizer.__init__'s placeholder group
            super().add_param_group(param_group)
            return
        self.base_optimizer.add_param_group(param_group)
        self.param_groups = self.base_optimizer.param_groups

    # Pickling and deepcopy keep the base; torch's __getstate__ would keep only param_groups
    # and state.
    def __getstate__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "base_optimizer": self.base_optimizer, "c": self.c,
                "foreach": self.foreach, "_ef_state": self._ef_state}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._attach()

    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """One base step followed by the error-feedback correction.

        Args:
            closure: re-evaluates the model and returns the loss; called once, before the
                base steps (the base gets no closure).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for p in self._params() if p.grad is not None]
        before = [p.detach().clone() for p in params]  # x_t
        self.base_optimizer.step()
        prev = []
        for p in params:
            state = self._ef_state.setdefault(p, {})
            if "prev_update" not in state:
                state["prev_update"] = torch.zeros_like(p, memory_format=torch.preserve_format)  # u_0 = 0
            prev.append(state["prev_update"])
        if not params:
            return loss
        foreach = self.foreach
        if foreach is None:
            foreach = all(type(p) in _FOREACH_TYPES and p.device.type in _FOREACH_DEVICES for p in params)
        fn = _foreach_error_feedback if foreach else _single_tensor_error_feedback
        fn(params, before, prev, c=self.c)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients through the base optimizer (to None by default, as torch)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base's state dict and the previous updates u_{t-1}.

        Returns:
            {"base": ..., "state": {param index: {"prev_update": tensor}}, "c": c}; like torch's,
            it references live tensors: save or deepcopy it before stepping on.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        own = {i: {"prev_update": self._ef_state[p]["prev_update"]}
               for i, p in enumerate(self._params()) if p in self._ef_state}
        state = {"base": self.base_optimizer.state_dict(), "state": own, "c": self.c}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore from a `state_dict()` of an ErrorFeedback over a base built the same way.

        The wrapper's part is checked before the base is loaded, so a mismatch there leaves
        the optimizer unchanged.

        Raises:
            ValueError: missing "base"/"state" entries, a parameter index out of range, a
                previous update of the wrong shape, or a bad c.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, Mapping) or "base" not in state_dict or "state" not in state_dict:
            keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"expected an ErrorFeedback state_dict with 'base' and 'state' entries, got {keys}")
        params = self._params()
        c = state_dict.get("c", self.c)
        _check_c(c)
        loaded = {}
        for i, entry in state_dict["state"].items():
            i = int(i)
            if not 0 <= i < len(params):
                raise ValueError(f"state_dict has a previous update for parameter {i}; the optimizer has "
                                 f"{len(params)} parameters")
            u = entry["prev_update"]
            if tuple(u.shape) != tuple(params[i].shape):
                raise ValueError(f"parameter {i}: saved previous update has shape {tuple(u.shape)}, the "
                                 f"parameter {tuple(params[i].shape)}")
            loaded[params[i]] = {"prev_update": u.detach().to(device=params[i].device, dtype=params[i].dtype,
                                                              copy=True)}
        self.base_optimizer.load_state_dict(state_dict["base"])
        self.c = float(c)
        self._ef_state = loaded
        # torch's load_state_dict replaces the base's group dicts with new ones.
        self._attach()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __repr__(self) -> str:
        base = repr(self.base_optimizer).replace("\n", "\n    ")
        return f"{type(self).__name__} (c={self.c}) over\n    {base}"


def _check_c(c) -> None:
    if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c < 0:
        raise ValueError(f"Invalid error-feedback scale c: {c!r} (need a finite number >= 0)")


def _single_tensor_error_feedback(params: list[Tensor], before: list[Tensor], prev: list[Tensor], *,
                                  c: float) -> None:
    """The reference path, one tensor at a time: `params` hold the base step x_t - u_t,
    `before` x_t (overwritten), `prev` u_{t-1} (becomes u_t)."""
    for p, x, m in zip(params, before, prev):
        u = x.sub_(p)  # u_t = x_t - base_step(x_t)
        if c != 0.0:  # c = 0: the base step untouched, bit for bit
            p.add_(u - m, alpha=-c)
        m.copy_(u)


def _foreach_error_feedback(params: list[Tensor], before: list[Tensor], prev: list[Tensor], *,
                            c: float) -> None:
    """The same update with torch._foreach_* ops."""
    torch._foreach_sub_(before, params)
    us = before
    if c != 0.0:
        torch._foreach_add_(params, torch._foreach_sub(us, prev), alpha=-c)
    torch._foreach_copy_(prev, us)
