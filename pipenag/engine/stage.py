"""One pipeline stage's work: forward, backward and step of its module, with weight versions.

    from pipenag import Schedule, make_runner
    runner = make_runner(Schedule("pipedream", 4, 1), 3, module, optimizer, loss_fn)
    loss = runner.forward(0, x, y); runner.backward(0); runner.step()   # the last stage

`StageRunner` is the piece both engines share: the simulator calls it for all stages in one
process, the distributed runtime calls it in each stage's process in the order of the stage's
action list (pipenag.schedules). The version each forward and backward uses comes from the
schedule; the runner keeps exactly the weight versions that later actions still need
("stashing" lives here, never in the optimizer). Because both engines run this code with the
same versions, the same gradients and the same update order, they agree bit for bit.

Forward weight prediction (SpecTrain-style; `forward_prediction` = the scale s > 0): the
forward of a microbatch at a stage with staleness tau (Schedule.staleness) runs at
w_v + s * tau * (w_v - w_{v-1}), where v is the version the schedule gives the forward: the
weights extrapolated by their last update over the delay, so that the gradient is taken near
the weights it will be applied to. It reads two stored versions, so both engines compute it
from the same tensors and agree bit for bit; with stashing the backward uses the same
predicted weights (the graph is kept on them), without it the backward recomputes as usual.
A stage with prediction holds one more version (w_{v-1}).

Delay compensation (DC-ASGD: Zheng et al., "Asynchronous Stochastic Gradient Descent with Delay
Compensation", ICML 2017; `delay_compensation` = lambda > 0): right before a step, each
parameter's accumulated gradient g becomes g + lambda * g * g * (w_now - w_stale), elementwise,
where w_now are the live weights the step applies it to and w_stale the weights the update's
backwards were taken on (the stashed version, or the predicted weights). It needs those two
versions, which only the runner has, so it lives here and not in the optimizer. All the
microbatches of one update read the same version in every schedule here (pipedream: one per
update; 2bw: version u-1 for the whole update-batch u), so the update's gradient has one
w_stale; a stage whose backwards used the live weights (pipedream's last stage, the synchronous
schedules) gets no correction at all.

Backward modes:
- the backward uses the forward's weights (stash on, or no update in between): the autograd
  graph of the forward is kept and reused;
- otherwise (stash off): the forward runs without a graph and keeps only its input; the
  backward recomputes the stage with the current weights, or with the PipeMare prediction of
  the forward's weights (WeightPredictor).

Weight copies: the module always holds the latest version; older versions are frozen copies
("snapshots"), made only when a later action reads a version after a step has replaced it, and
dropped as soon as no later action reads them. A stage therefore holds at most
Schedule.versions_kept versions (the live one included), at most one clone per step. In the
runtime's action order a stash-off pipedream stage never needs an old version (the forward
after a step uses the new weights), so it holds no copy; with stashing, a forward whose graph
waits across steps is built on a frozen copy of the current version (the live one is changed
in place by the step), so the latest version exists twice. The simulator, which runs stage k's
forwards tau_k updates late, keeps the tau_k older versions those forwards read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn
from torch.func import functional_call

from pipenag.engine.split_backward import SplitBackward
from pipenag.schedules import Schedule


@dataclass
class Record:
    """What one action did (kept when `StageRunner.record` is a list): used by tests to read
    the versions a running engine actually used."""

    stage: int
    kind: str  # "F" or "B" (a split backward records its B half)
    microbatch: int
    version: int  # -1 for a PipeMare-predicted backward (not a stored version)


class WeightPredictor:
    """PipeMare discrepancy correction (Yang et al., "PipeMare: Asynchronous Pipeline Parallel
    DNN Training", MLSys 2021, Sec. 3.2): without stashing, the backward at a stage with delay
    tau uses w - tau * delta instead of the current weights w, where delta is an exponential
    moving average of the stage's per-update weight change,
        delta <- decay * delta + (1 - decay) * (w_new - w_old),
    so that the backward weights approximate the (older) weights the forward used.
    """

    def __init__(self, params: list[torch.Tensor], tau: int, decay: float = 0.9):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"pipemare decay={decay}: must be in [0, 1)")
        self.tau = tau
        self.decay = decay
        self.delta = [torch.zeros_like(p) for p in params]

    def observe(self, old: list[torch.Tensor], new: list[torch.Tensor]) -> None:
        for d, o, n in zip(self.delta, old, new):
            d.mul_(self.decay).add_(n - o, alpha=1.0 - self.decay)

    @torch.no_grad()
    def predict(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        return [p - self.tau * d for p, d in zip(params, self.delta)]


@dataclass
class _Pending:
    inp: torch.Tensor  # the stage input (requires grad unless stage 0)
    out: Optional[torch.Tensor]  # the output with its graph, or None (recompute)
    used: Optional[list[torch.Tensor]]  # leaves the graph was built on (None: the live params)
    target: Optional[torch.Tensor]


class StageRunner:
    """Runs one stage of a pipeline.

    Args:
        module: the stage's nn.Module; it always holds the latest weights.
        optimizer: a torch optimizer over module.parameters() (one per stage).
        schedule: the Schedule (gives versions and the number of microbatches per update).
        stage_idx: this stage's position in the pipeline.
        stash: weight stashing on (the backward uses the forward's weights) or off.
        loss_fn: loss_fn(output, target) -> scalar, used on the last stage only.
        lr_fn: lr_fn(update) -> learning rate for the 1-based update about to be applied, or
            None to leave the optimizer's lr alone.
        grad_clip: clip this stage's gradient norm to this value before each step (0: off).
        predictor: a WeightPredictor for PipeMare's backward, or None.
        forward_prediction: the scale s of forward weight prediction (0: off).
        record: a list to append a Record per forward and backward to, or None.
        delay_compensation: DC-ASGD's lambda >= 0 (0: off; see the module docstring).
        autocast_dtype: run the module under torch.autocast in this dtype (torch.bfloat16; None:
            float32). Weights, optimizer state, stashed versions, gradients and the stage's
            output stay float32 (compute_call).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        schedule: Schedule,
        stage_idx: int,
        stash: bool = True,
        loss_fn: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
        lr_fn: Optional[Callable[[int], float]] = None,
        grad_clip: float = 0.0,
        predictor: Optional[WeightPredictor] = None,
        forward_prediction: float = 0.0,
        record: Optional[list] = None,
        delay_compensation: float = 0.0,
        autocast_dtype: Optional[torch.dtype] = None,
    ):
        if forward_prediction < 0:
            raise ValueError(f"forward_prediction={forward_prediction}: must be >= 0 (0 = off)")
        if not (math.isfinite(delay_compensation) and delay_compensation >= 0):
            raise ValueError(f"delay_compensation={delay_compensation}: must be a finite number >= 0 (0 = off)")
        self.module = module
        self.optimizer = optimizer
        self.schedule = schedule
        self.stage_idx = stage_idx
        self.stash = stash
        self.is_first = stage_idx == 0
        self.is_last = stage_idx == schedule.num_stages - 1
        if self.is_last and loss_fn is None:
            raise ValueError("the last stage needs a loss_fn")
        self.loss_fn = loss_fn
        self.lr_fn = lr_fn
        self.grad_clip = grad_clip
        self.predictor = predictor
        # The extrapolation factor s * tau of forward weight prediction (0: none at this stage).
        self.extrapolation = forward_prediction * schedule.staleness(stage_idx)
        self.record = record
        self.delay_compensation = delay_compensation
        self.autocast_dtype = autocast_dtype
        # The weights the backwards since the last step were taken on, and their version
        # (Record's numbering): w_stale of delay compensation.
        self.grad_weights: Optional[list[torch.Tensor]] = None
        self.grad_version: Optional[int] = None
        self.names = [n for n, _ in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.version = 0  # updates applied so far
        # Frozen copies of versions that actions still read after a step replaced them (may
        # include the current version when a graph built on it outlives the next step).
        self.snapshots: dict[int, list[torch.Tensor]] = {}
        self.pending: dict[int, _Pending] = {}
        # Split backward (zb-h1): microbatch -> (graph context, its SplitBackward, or on the
        # first stage the output gradient) between its backward_input and its backward_weight.
        self.awaiting_weight: dict[int, tuple[_Pending, object]] = {}
        self.next_forward = 0  # lowest microbatch not yet forwarded

    # -- versions ---------------------------------------------------------------------------
    @property
    def uses_snapshots(self) -> bool:
        """Whether the schedule can make this stage read a version after a step replaced it
        (asynchronous schedules, all stages but pipedream's last; any stage with prediction)."""
        return self.schedule.versions_kept(self.stage_idx) > 1 or self.extrapolation > 0

    def _oldest_read(self, microbatch: int) -> int:
        """The oldest version the forward of `microbatch` reads (its own, or the one before it
        with forward weight prediction)."""
        v = self.schedule.forward_version(self.stage_idx, microbatch)
        return v - 1 if self.extrapolation > 0 and v > 0 else v

    def _versions_needed(self) -> list[int]:
        """Versions that later actions read: the next forward's (forward versions grow by at
        most one per update, so every version from it on is needed), the version each pending
        graph was built on, and each pending recompute's backward version."""
        s, k = self.schedule, self.stage_idx
        needed = [self._oldest_read(self.next_forward)]
        for mb, ctx in list(self.pending.items()) + [(mb, c) for mb, (c, _) in self.awaiting_weight.items()]:
            if ctx.out is not None:
                # (with prediction: the versions a checkpoint's redone forward reads again)
                needed.append(self._oldest_read(mb))
            else:
                needed.append(s.backward_version(k, mb, self.stash))
        return needed

    def _drop_old_snapshots(self) -> None:
        oldest = min(self._versions_needed())
        for v in [v for v in self.snapshots if v < oldest]:
            del self.snapshots[v]

    def _weights(self, version: int) -> list[torch.Tensor]:
        """The weights of `version`: the live parameters if it is the current one."""
        if version == self.version:
            return self.params
        if version in self.snapshots:
            return self.snapshots[version]
        raise AssertionError(
            f"stage {self.stage_idx}: version {version} is not held (current {self.version}, "
            f"stashed {sorted(self.snapshots)})")

    def _frozen(self, version: int) -> list[torch.Tensor]:
        """A copy of `version` that later steps leave alone (made now if it is the current)."""
        if version not in self.snapshots:
            self._weights(version)  # raises if the version is gone
            self.snapshots[version] = [p.detach().clone() for p in self.params]
        return self.snapshots[version]

    def _call(self, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        if weights is self.params:
            return compute_call(self.module, x, self.autocast_dtype)
        return compute_call(lambda inp: functional_call(self.module, dict(zip(self.names, weights)), (inp,)), x,
                            self.autocast_dtype)

    def _log(self, kind: str, microbatch: int, version: int) -> None:
        if self.record is not None:
            self.record.append(Record(self.stage_idx, kind, microbatch, version))

    # -- actions ----------------------------------------------------------------------------
    def forward(self, microbatch: int, x: torch.Tensor, target: Optional[torch.Tensor] = None):
        """Forward of `microbatch`. Returns the activation to send (detached), or on the last
        stage the microbatch's loss (a detached scalar)."""
        s, k = self.schedule, self.stage_idx
        fwd_v = s.forward_version(k, microbatch)
        bwd_v = s.backward_version(k, microbatch, self.stash)
        predicted = self.extrapolation > 0 and fwd_v > 0
        # With prediction the backward reuses the forward's (predicted) weights only when
        # stashing: without it, it recomputes at its own version like any stash-off backward.
        keep_graph = (self.stash if predicted else fwd_v == bwd_v) and self.predictor is None
        # The number of steps done when the backward runs (the stash-off backward version; the
        # action lists and the simulator both realize it). A graph that lives across a step
        # must not be built on the live parameters, which the step changes in place.
        steps_at_backward = s.backward_version(k, microbatch, stash=False)
        if predicted:
            c = self.extrapolation
            with torch.no_grad():
                weights = [w + c * (w - p) for w, p in zip(self._weights(fwd_v), self._weights(fwd_v - 1))]
        elif keep_graph and steps_at_backward > self.version:
            weights = self._frozen(fwd_v)
        else:
            weights = self._weights(fwd_v)
        self._log("F", microbatch, fwd_v)
        inp = x if self.is_first else x.detach().requires_grad_(keep_graph)
        used = None
        if keep_graph:
            if weights is not self.params:
                used = [w.detach().requires_grad_(True) for w in weights]
                weights = used
            out = self._call(weights, inp)
        else:
            with torch.no_grad():
                out = self._call(weights, inp)
        result = out.detach()
        if self.is_last:
            loss = self.loss_fn(out, target)
            result = loss.detach()
            out = loss / s.num_microbatches
        self.pending[microbatch] = _Pending(inp, out if keep_graph else None, used, target)
        self.next_forward = max(self.next_forward, microbatch + 1)
        self._drop_old_snapshots()
        return result

    def backward(self, microbatch: int, grad: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """Backward of `microbatch` given the gradient of the stage output (None on the last
        stage). Accumulates into the module's .grad; returns the gradient of the stage input
        (None on the first stage)."""
        ctx = self.pending.pop(microbatch)
        s, k = self.schedule, self.stage_idx
        if ctx.out is not None:
            bwd_v = s.forward_version(k, microbatch)
            self._log("B", microbatch, bwd_v)
            out, used = ctx.out, ctx.used
        else:
            bwd_v = s.backward_version(k, microbatch, self.stash)
            weights = self._weights(bwd_v)
            if self.predictor is not None:
                weights = self.predictor.predict(weights)
                bwd_v = -1
            self._log("B", microbatch, bwd_v)
            used = None
            if weights is not self.params:
                used = [w.detach().requires_grad_(True) for w in weights]
                weights = used
            inp = ctx.inp if self.is_first else ctx.inp.detach().requires_grad_(True)
            ctx.inp = inp
            out = self._call(weights, inp)
            if self.is_last:
                out = self.loss_fn(out, ctx.target) / s.num_microbatches
        if self.is_last:
            out.backward()
        else:
            out.backward(grad)
        self._gather_weight_grads(used, bwd_v)
        return None if self.is_first else ctx.inp.grad

    def _gather_weight_grads(self, used: Optional[list[torch.Tensor]], bwd_v: int) -> None:
        """After a backward: move the gradient of the graph's weight leaves (`used`, a stashed
        or predicted copy; None: the live parameters, which autograd filled) into .grad, note
        the version it was taken on (delay compensation's w_stale), drop unneeded snapshots."""
        if used is not None:
            for p, u in zip(self.params, used):
                if u.grad is None:
                    continue
                if p.grad is None:
                    p.grad = u.grad
                else:
                    p.grad.add_(u.grad)
        if self.delay_compensation > 0:
            # The graph's leaves hold the weights the gradient was taken on (None: the live ones).
            assert self.grad_version is None or self.grad_version == bwd_v, (
                f"stage {self.stage_idx}: the backwards of one update used versions {self.grad_version} and "
                f"{bwd_v}; delay compensation needs one")
            self.grad_weights, self.grad_version = (self.params if used is None else used), bwd_v
        self._drop_old_snapshots()

    def backward_input(self, microbatch: int, grad: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        """The B half of a split backward (zb-h1): the gradient of the stage input only, given
        the gradient of the stage output (None on the last stage). Returns it (None on the first
        stage, which computes nothing here) and keeps the graph and `grad` for
        backward_weight; .grad is left alone.

        Raises:
            ValueError: the forward kept no graph (a recompute backward: stash off with a
                schedule whose backward reads another version, or PipeMare's prediction).
        """
        ctx = self.pending.pop(microbatch)
        if ctx.out is None:
            raise ValueError(f"stage {self.stage_idx}: a split backward (schedule {self.schedule.name!r}) needs "
                             f"the forward's graph, but microbatch {microbatch} kept none (recompute backward: "
                             "stash off on an asynchronous schedule, or PipeMare's prediction)")
        self._log("B", microbatch, self.schedule.forward_version(self.stage_idx, microbatch))
        if self.is_first:  # no input gradient to take: W runs the whole backward
            self.awaiting_weight[microbatch] = (ctx, grad)
            return None
        split = SplitBackward(ctx.out, ctx.inp, self.params if ctx.used is None else ctx.used)
        g_in = split.input_gradient(None if self.is_last else grad)
        self.awaiting_weight[microbatch] = (ctx, split)
        return g_in

    def backward_weight(self, microbatch: int) -> None:
        """The W half of a split backward (zb-h1): the weight gradient of `microbatch`, added to
        .grad exactly as backward() adds it (same graph, same output gradient, same order of
        accumulation when the W's run in microbatch order). Frees the graph."""
        ctx, kept = self.awaiting_weight.pop(microbatch)
        k = self.stage_idx
        used = ctx.used
        leaves = self.params if used is None else used
        if isinstance(kept, SplitBackward):  # from the gradients B kept (split_backward.py)
            grads = kept.weight_gradients()
            with torch.no_grad():
                for leaf, g in zip(leaves, grads):
                    if g is None:
                        continue
                    if leaf.grad is None:
                        leaf.grad = g
                    else:
                        leaf.grad.add_(g)
        else:  # the first stage: the whole backward, weights only (the live parameters accumulate)
            ctx.out.backward(None if self.is_last else kept, inputs=leaves)
        self._gather_weight_grads(used, self.schedule.forward_version(k, microbatch))

    def step(self) -> None:
        """One optimizer update with the accumulated gradient; creates version + 1."""
        update = self.version + 1
        assert not self.awaiting_weight, (
            f"stage {self.stage_idx}: step with weight gradients still to take: {sorted(self.awaiting_weight)}")
        assert all(ctx.out is None or ctx.used is not None for ctx in self.pending.values()), (
            "a pending graph is built on the live parameters that this step changes")
        # Keep the version being replaced if a later forward reads it: the simulator runs the
        # forwards of stage k tau_k updates late; in the runtime's order only a forward with
        # weight prediction does (it reads the version before its own).
        if self._oldest_read(self.next_forward) <= self.version:
            self._frozen(self.version)
        if self.lr_fn is not None:
            lr = self.lr_fn(update)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        if self.delay_compensation > 0 and self.grad_weights is not None and self.grad_weights is not self.params:
            compensate_delay_([p.grad for p in self.params], self.params, self.grad_weights, self.delay_compensation)
        self.grad_weights = self.grad_version = None
        if self.grad_clip > 0:  # after the correction: the clip bounds what is applied
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        old = [p.detach().clone() for p in self.params] if self.predictor is not None else None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if old is not None:
            self.predictor.observe(old, [p.detach() for p in self.params])
        self.version = update
        self._drop_old_snapshots()

    # -- checkpointing ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything needed to continue after the current update: weights, optimizer, version,
        stashed versions and the PipeMare state. Forwards in flight are not saved: a resumed
        run redoes them (Schedule.actions with start_update) on the stashed versions, which
        gives the same numbers. Take it right after a step. Like torch's state_dict, the module
        and optimizer entries reference live tensors: save (or deepcopy) it before training on.

        Raises:
            RuntimeError: a version the redone forwards read is not held. This happens only
                with stash off in the runtime's order with forwards in flight (such a stage
                keeps no old versions): finish the update's action lists (drain) first.
        """
        s, k = self.schedule, self.stage_idx
        redo_from = self._oldest_read(self.version * s.num_microbatches)
        missing = [v for v in range(redo_from, self.version) if v not in self.snapshots]
        if missing:
            raise RuntimeError(
                f"stage {k}: cannot checkpoint at update {self.version}: the forwards to redo "
                f"read versions {missing}, which this stage does not hold (stash off keeps no "
                "old versions); drain the pipeline (run the lists up to this update) first")
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "version": self.version,
            "next_forward": self.version * self.schedule.num_microbatches,
            # only the versions the redone forwards read (the current one is "module")
            "snapshots": {v: [t.clone() for t in self.snapshots[v]] for v in range(redo_from, self.version)},
            "delta": None if self.predictor is None else [d.clone() for d in self.predictor.delta],
        }

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.version = state["version"]
        self.next_forward = state["next_forward"]
        self.snapshots = {int(v): [t.clone() for t in ts] for v, ts in state["snapshots"].items()}
        if self.predictor is not None and state["delta"] is not None:
            self.predictor.delta = [d.clone() for d in state["delta"]]
        self.pending.clear()
        self.awaiting_weight.clear()
        self.grad_weights = self.grad_version = None


def compute_call(module: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 autocast_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """module(x), under torch.autocast(autocast_dtype) when one is given, with the result cast
    back to float32: what travels between stages, the loss's input and the stashed graphs' ends
    stay float32, so run.dtype changes the compute and nothing else (both engines call this,
    for training and validation alike)."""
    if autocast_dtype is None:
        return module(x)
    with torch.autocast(device_type=x.device.type, dtype=autocast_dtype):
        out = module(x)
    return out.float()


def make_runner(schedule: Schedule, stage_idx: int, module: nn.Module, optimizer, loss_fn, *,
                stash: bool = True, lr_fn: Optional[Callable[[int], float]] = None, grad_clip: float = 0.0,
                predict: bool = False, predict_decay: float = 0.9, forward_prediction: float = 0.0,
                record: Optional[list] = None, delay_compensation: float = 0.0,
                autocast_dtype: Optional[torch.dtype] = None) -> StageRunner:
    """The StageRunner of one stage, as both engines build it: `loss_fn` is kept on the last
    stage only, `predict` adds PipeMare's WeightPredictor (backward) where the stage has a
    delay, `forward_prediction` > 0 turns on forward weight prediction with that scale,
    `delay_compensation` > 0 DC-ASGD's gradient correction with that lambda.

    Raises:
        ValueError: predict without the pipedream schedule, predict with stash on, or both
            kinds of prediction at once.
    """
    if predict and forward_prediction:
        raise ValueError(f"predict=True with forward_prediction={forward_prediction}: PipeMare's backward "
                         "prediction and forward weight prediction are exclusive")
    if predict and schedule.name != "pipedream":
        raise ValueError(f"predict=True (PipeMare weight prediction) needs the pipedream schedule, "
                         f"got {schedule.name!r}")
    if predict and stash:
        raise ValueError("predict=True (PipeMare weight prediction) needs stash=False")
    predictor = None
    tau = schedule.staleness(stage_idx)
    if predict and tau > 0:
        predictor = WeightPredictor([p.detach() for p in module.parameters()], tau, predict_decay)
    return StageRunner(module, optimizer, schedule, stage_idx, stash=stash,
                       loss_fn=loss_fn if stage_idx == schedule.num_stages - 1 else None,
                       lr_fn=lr_fn, grad_clip=grad_clip, predictor=predictor,
                       forward_prediction=forward_prediction, record=record,
                       delay_compensation=delay_compensation, autocast_dtype=autocast_dtype)


@torch.no_grad()
def compensate_delay_(grads: list[Optional[torch.Tensor]], w_now: list[torch.Tensor],
                      w_stale: list[torch.Tensor], lam: float) -> None:
    """DC-ASGD's delay compensation, in place: g <- g + lam * g * g * (w_now - w_stale),
    elementwise (Zheng et al., ICML 2017, the constant-lambda form).

    Args:
        grads: the gradients (None entries are skipped), taken at w_stale.
        w_now: the weights the gradients are about to be applied to.
        w_stale: the weights the gradients were taken on.
        lam: lambda >= 0.
    """
    for g, now, stale in zip(grads, w_now, w_stale):
        if g is not None:
            g.add_(g * g * (now - stale), alpha=lam)
