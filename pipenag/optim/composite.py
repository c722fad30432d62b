"""Several torch optimizers over disjoint parameters, seen as one optimizer per stage.

    python -c "import torch; from pipenag.optim.composite import CompositeOptimizer; a, b = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2)); print(CompositeOptimizer([torch.optim.SGD([a], lr=0.1), torch.optim.AdamW([b], lr=0.1)]))"

Methods such as Muon use one update rule for the hidden weight matrices and another (AdamW)
for embeddings, the head, norms and biases. The pipeline engine (pipenag.engine.stage) holds
one optimizer per stage: it sets group["lr"] on every entry of `param_groups`, calls step(),
zero_grad(), state_dict() and load_state_dict(). `CompositeOptimizer` gives it that object
while each part stays the unmodified torch optimizer, so the math remains torch's.

`hidden_matrix_params` is the split those methods share: the weights of the hidden nn.Linear
layers on one side, everything else on the other.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

__all__ = ["CompositeOptimizer", "cuda_fused", "hidden_matrix_params"]


class _MergedState(Mapping):
    """Read-only view of the children's `state`: param -> that param's state dict.

    Looked up live in each child, because a child's load_state_dict replaces its `state`.
    A plain ChainMap would not do: indexing a child's defaultdict with a foreign parameter
    would insert an empty entry into it.
    """

    def __init__(self, optimizers: list[Optimizer]):
        self._optimizers = optimizers

    def __getitem__(self, param: Tensor) -> Any:
        for opt in self._optimizers:
            if param in opt.state:
                return opt.state[param]
        raise KeyError(f"no state for a parameter of shape {tuple(param.shape)}")

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._optimizers)

    def __repr__(self) -> str:
        return f"_MergedState({len(self)} params over {len(self._optimizers)} optimizers)"


def _common_defaults(optimizers: list[Optimizer]) -> dict[str, Any]:
    """The defaults every child shares with the same value (typically lr and weight_decay)."""
    first, *others = optimizers
    common = {}
    for key, value in first.defaults.items():
        if isinstance(value, Tensor):
            continue  # tensor equality is elementwise; no common value to report
        try:
            same = all(key in o.defaults and not isinstance(o.defaults[key], Tensor)
                       and bool(o.defaults[key] == value) for o in others)
        except (TypeError, ValueError, RuntimeError):
            same = False
        if same:
            common[key] = value
    return common


class CompositeOptimizer(Optimizer):
    """One optimizer made of several torch optimizers over disjoint parameter sets.

    It subclasses torch.optim.Optimizer, so isinstance checks, torch's LR schedulers and the
    step / state_dict hooks work, but it owns no parameters and no state itself:
      - `param_groups` is the concatenation of the children's group dicts, the same dict
        objects, so `group["lr"] = x` on the composite sets it in the child;
      - `state` is a read-only merged view of the children's states (write through a child);
      - step() steps every child in order (a closure is evaluated once, before them);
      - zero_grad() and load_state_dict() go to every child;
      - state_dict() is {"optimizers": [child.state_dict(), ...], "optimizer_types": [...]}.
    add_param_group is refused: a new group would belong to no child. After a child's own
    load_state_dict (which replaces its group dicts), call the composite's instead, or the
    composite keeps the old dicts. Global optimizer hooks fire for the composite and for
    each child.

    Args:
        optimizers: at least one torch optimizer; no parameter may be in two of them.

    Raises:
        ValueError: no optimizer, an entry that is not a torch optimizer, or a parameter
            shared by two optimizers.
    """

    def __init__(self, optimizers: Iterable[Optimizer]):
        if isinstance(optimizers, Optimizer):
            raise ValueError(f"optimizers must be a list of torch optimizers, got one optimizer {optimizers!r}")
        optimizers = list(optimizers)
        if not optimizers:
            raise ValueError("CompositeOptimizer needs at least one optimizer, got 0")
        for i, opt in enumerate(optimizers):
            if not isinstance(opt, Optimizer):
                raise ValueError(f"optimizers[{i}] must be a torch.optim.Optimizer, got {type(opt).__name__}")
        owner: dict[Tensor, int] = {}
        shared = []
        for i, opt in enumerate(optimizers):
            for group in opt.param_groups:
                for p in group["params"]:
                    if p in owner:
                        shared.append((tuple(p.shape), owner[p], i))
                    else:
                        owner[p] = i
        if shared:
            shape, a, b = shared[0]
            raise ValueError(
                f"{len(shared)} parameter(s) appear in more than one optimizer, e.g. one of shape "
                f"{shape} in optimizers {a} and {b}")

        # Empty while Optimizer.__init__ registers its placeholder group through
        # add_param_group, which is refused once the children are attached.
        self._optimizers: list[Optimizer] = []
        # The base class sets up the hook tables and the profiled step; the placeholder group
        # and state it builds are replaced right below by the children's.
        super().__init__(list(owner), _common_defaults(optimizers))
        self._optimizers = optimizers
        self._attach()

    def _attach(self) -> None:
        self.param_groups = [g for opt in self._optimizers for g in opt.param_groups]
        self.state = _MergedState(self._optimizers)

    @property
    def optimizers(self) -> list[Optimizer]:
        """The child optimizers, in order (a copy of the list)."""
        return list(self._optimizers)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if self._optimizers:
            raise RuntimeError("add the group to one of the child optimizers, then build a new CompositeOptimizer")
        super().add_param_group(param_group)

    # Pickling and deepcopy go through the children; torch's own __getstate__ would keep
    # only `param_groups` and `state` and lose which child owns what.
    def __getstate__(self) -> dict[str, Any]:
        return {"defaults": self.defaults, "_optimizers": self._optimizers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._attach()

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None):
        """Step every child optimizer once, in order.

        Args:
            closure: re-evaluates the model and returns the loss; called once, before the
                children step (they get no closure).

        Returns:
            The closure's loss, or None.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self._optimizers:
            opt.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of every child's parameters (to None by default, as torch)."""
        for opt in self._optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The children's state dicts, in order.

        Returns:
            {"optimizers": [child.state_dict(), ...], "optimizer_types": [class name, ...]};
            like torch's, it references live tensors: save or deepcopy it before stepping on.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = {
            "optimizers": [opt.state_dict() for opt in self._optimizers],
            "optimizer_types": [type(opt).__name__ for opt in self._optimizers],
        }
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore every child from a `state_dict()` of a composite built the same way.

        Everything is checked before any child is loaded, so a mismatch leaves the optimizer
        unchanged.

        Args:
            state_dict: {"optimizers": [...]} with one entry per child; "optimizer_types",
                when present, must name the children's classes in order.

        Raises:
            ValueError: a missing "optimizers" entry, a different number of children, other
                child classes, or a child whose groups differ in number or size.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, Mapping) or "optimizers" not in state_dict:
            keys = sorted(state_dict) if isinstance(state_dict, Mapping) else type(state_dict).__name__
            raise ValueError(f"expected a CompositeOptimizer state_dict with an 'optimizers' entry, got {keys}")
        saved = list(state_dict["optimizers"])
        if len(saved) != len(self._optimizers):
            raise ValueError(
                f"state_dict holds {len(saved)} optimizer(s), this CompositeOptimizer has {len(self._optimizers)}")
        types = [type(opt).__name__ for opt in self._optimizers]
        saved_types = state_dict.get("optimizer_types")
        if saved_types is not None and list(saved_types) != types:
            raise ValueError(f"state_dict holds optimizers {list(saved_types)}, this CompositeOptimizer has {types}")
        # torch checks these too, but child by child: a mismatch in the second child would
        # leave the first one already loaded.
        for i, (opt, sd) in enumerate(zip(self._optimizers, saved)):
            sizes = [len(g["params"]) for g in opt.param_groups]
            saved_sizes = [len(g["params"]) for g in sd["param_groups"]]
            if sizes != saved_sizes:
                raise ValueError(
                    f"optimizer {i} ({types[i]}): state_dict has groups of {saved_sizes} parameters, "
                    f"the optimizer has {sizes}")
        for opt, sd in zip(self._optimizers, saved):
            opt.load_state_dict(sd)
        # torch's load_state_dict replaces a child's group dicts with new ones.
        self._attach()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def __repr__(self) -> str:
        lines = [f"{type(self).__name__} ("]
        for i, opt in enumerate(self._optimizers):
            child = repr(opt).replace("\n", "\n    ")
            lines.append(f"  [{i}] {child}")
        lines.append(")")
        return "\n".join(lines)


def hidden_matrix_params(
    module: nn.Module, exclude: Iterable[str] = ("lm_head",)
) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Split a module's parameters into the hidden weight matrices and the rest.

    The hidden matrices are the weights of the nn.Linear submodules, except those of a
    submodule whose own name (the last part of its dotted name) is in `exclude`: in a GPT
    stage, the blocks' attn.c_attn, attn.c_proj, mlp.c_fc and mlp.c_proj weights. The rest
    are the embeddings (nn.Embedding), the excluded head, norms and biases. Matrix
    optimizers (Muon, basis rotation) take the first list, AdamW the second. A weight shared
    with an embedding or an excluded module counts as the rest.

    Args:
        module: any nn.Module (a StageModule, a whole GPT).
        exclude: names of nn.Linear submodules whose weights are not hidden matrices
            (default: the output head "lm_head").

    Returns:
        (hidden, rest): two lists that partition module.parameters(), each in the order of
        module.named_parameters() (module order, shared parameters once).
    """
    if not isinstance(module, nn.Module):
        raise ValueError(f"module must be an nn.Module, got {type(module).__name__}")
    if isinstance(exclude, str):
        raise ValueError(f"exclude must be a collection of names, got the string {exclude!r}")
    exclude = set(exclude)
    linear, other = set(), set()
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear) and name.rsplit(".", 1)[-1] not in exclude:
            linear.add(sub.weight)
        elif isinstance(sub, (nn.Linear, nn.Embedding)):
            other.add(sub.weight)
    hidden, rest = [], []
    for p in module.parameters():
        (hidden if p in linear and p not in other else rest).append(p)
    return hidden, rest


def cuda_fused(params, foreach: bool | None = None) -> bool | None:
    """The `fused` argument for torch's AdamW: True when every parameter is on a CUDA device
    and `foreach` is not forced (torch's fused kernel is its fastest path there), else None
    (torch's default: foreach on CUDA, the plain loop on the CPU, so CPU numbers never change).
    `params` is a list of tensors or of parameter groups."""
    tensors = [t for g in params for t in (g["params"] if isinstance(g, dict) else [g])]
    if foreach is None and tensors and all(t.device.type == "cuda" for t in tensors):
        return True
    return None
