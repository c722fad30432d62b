"""Pipeline schedules as data: per-stage action lists and the weight-version table.

    pipenag schedule --name pipedream --stages 4 --updates 3

    from pipenag import Schedule
    s = Schedule("pipedream", num_stages=4, num_microbatches=1)
    [str(a) for a in s.actions(0, num_updates=3)]  # 0F0 0F1 0F2 0B0 0S0 0B1 0S1 0B2 0S2
    s.forward_version(0, 5)  # 2: stage 0's forward of microbatch 5 reads version 5 - 3

An action is (stage, kind, index) with kind F (forward of a microbatch), B (backward of a
microbatch), W (weight-gradient half of a split backward, zb-h1 only; see below) or S
(optimizer step; index = the update, 0-based), written compactly as "2F0": stage 2, forward,
microbatch 0. Microbatches are numbered globally 0, 1, 2, ... over the run.
Both engines execute these lists: the simulator in one process, the runtime one stage per
process. Nothing here knows about communication.

Weight versions (docs/schedules.md): version v of a stage's weights is the weights after v
optimizer updates. `Schedule.forward_version` and `Schedule.backward_version` give the
version a microbatch's forward and backward use at a stage; the action lists are built so that
this version is always available when the action runs (tests/test_schedules.py checks it by
counting the steps that precede each action).

Split backward (zb-h1, `Schedule.splits_backward`): B is then only the gradient of the stage
input, which goes to the previous stage at once, and W the gradient of the weights (no
communication). Zero bubble's ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR
2024) delays the W passes into what would be the bubbles of 1F1B's cool-down.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

SCHEDULES = ("gpipe", "1f1b", "pipedream", "2bw", "zb-h1")
ASYNC_SCHEDULES = ("pipedream", "2bw")
SPLIT_BACKWARD_SCHEDULES = ("zb-h1",)


@dataclass(frozen=True)
class Action:
    stage: int
    kind: str  # "F", "B", "W" or "S"
    index: int  # microbatch for F, B and W, update for S

    def __str__(self) -> str:
        return f"{self.stage}{self.kind}{self.index}"

    @classmethod
    def parse(cls, text: str) -> "Action":
        for kind in "FBWS":
            if kind in text:
                stage, _, index = text.partition(kind)
                if stage.isdigit() and index.isdigit():
                    return cls(int(stage), kind, int(index))
        raise ValueError(f"action {text!r}: expected STAGE{{F,B,W,S}}INDEX such as '2F0'")


DEFAULT_MICROBATCHES = 4
"""Microbatches per update of the synchronous schedules when none is asked for (the paper's M)."""


def microbatches_per_update(name: str, num_stages: int, requested: int = 0) -> int:
    """The microbatches per update M that schedule `name` runs when `requested` are asked for
    (0: DEFAULT_MICROBATCHES): pipedream makes one update per microbatch (always 1), 2bw needs
    M >= num_stages (max(requested, K)), gpipe, 1f1b and zb-h1 take `requested`."""
    requested = requested or DEFAULT_MICROBATCHES
    if name == "pipedream":
        return 1
    if name == "2bw":
        return max(requested, num_stages)
    return requested


def default_in_flight(num_stages: int) -> tuple[int, ...]:
    """The asynchronous schedules' depths without pipeline.in_flight: K - k at stage k."""
    return tuple(num_stages - k for k in range(num_stages))


def in_flight_problem(name: str, num_stages: int, num_microbatches: int, depths: tuple[int, ...]) -> str:
    """Why `depths` cannot be the in-flight depths of schedule `name`, or "" when they can.

    The rules (docs/schedules.md derives them):
    - one depth per stage, each >= 1;
    - non-increasing, d_0 >= d_1 >= ... >= d_{K-1}: stage k runs F(j + d_k - 1) before B(j),
      and stage k-1 sends that activation only after its own B(j + d_k - d_{k-1}), which needs
      stage k's B of the same microbatch: with d_k > d_{k-1} the two wait for each other;
    - 2bw: d_k <= M + 1, so that every forward of update u still finds version u - 1 (the
      forward of the first microbatch of u runs after d_k - 1 more backwards, which must not
      complete update u - 1 and so create version u before it).
    """
    if name not in ASYNC_SCHEDULES:
        return (f"the {name} schedule flushes every update and keeps its own depth; in_flight applies to "
                f"the asynchronous schedules ({', '.join(ASYNC_SCHEDULES)})")
    if len(depths) != num_stages:
        return f"needs one depth per stage ({num_stages}), got {len(depths)}"
    if any(d < 1 for d in depths):
        return "every depth must be >= 1 (a stage holds at least the microbatch it is working on)"
    if any(a < b for a, b in zip(depths, depths[1:])):
        return ("depths must not increase from one stage to the next (d_0 >= d_1 >= ...): a stage cannot "
                "keep more microbatches in flight than the stage before it feeds it (deadlock)")
    if name == "2bw" and max(depths) > num_microbatches + 1:
        return (f"2bw needs every depth <= M + 1 = {num_microbatches + 1} (M = {num_microbatches} microbatches "
                "per update), so that a forward of update u still finds version u - 1; raise "
                "pipeline.num_microbatches")
    return ""


@dataclass(frozen=True)
class Schedule:
    """A named schedule for `num_stages` stages and `num_microbatches` microbatches per update.

    `in_flight` (asynchronous schedules only) sets the depth d_k of each stage: the number of
    microbatches whose forward stage k has run and whose backward it has not, just before a
    backward. () keeps the default K - k (the classic 1F1B warm-up). Everything else derives
    from the depths: the warm-up of d_k - 1 forwards, the versions, staleness d_k - 1 (pipedream)
    and the d_k versions a stashing stage keeps.

    Raises:
        ValueError: unknown name, num_stages < 1, a microbatch count the schedule forbids
            (pipedream needs 1, 2bw needs M >= num_stages), or depths in_flight_problem rejects.
    """

    name: str
    num_stages: int
    num_microbatches: int
    in_flight: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; valid: {', '.join(SCHEDULES)}")
        if self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages}: must be >= 1")
        if self.num_microbatches < 1:
            raise ValueError(f"num_microbatches={self.num_microbatches}: must be >= 1")
        if self.name == "pipedream" and self.num_microbatches != 1:
            raise ValueError(
                f"num_microbatches={self.num_microbatches}: the pipedream schedule makes one update "
                "per microbatch (use 1, or the 2bw schedule for several)")
        if self.name == "2bw" and self.num_microbatches < self.num_stages:
            raise ValueError(
                f"num_microbatches={self.num_microbatches}: 2bw needs at least num_stages="
                f"{self.num_stages} microbatches per update")
        if self.in_flight:
            depths = tuple(self.in_flight)
            if any(not isinstance(d, int) or isinstance(d, bool) for d in depths):
                raise ValueError(f"in_flight={list(depths)}: depths must be integers")
            object.__setattr__(self, "in_flight", depths)
            why = in_flight_problem(self.name, self.num_stages, self.num_microbatches, depths)
            if why:
                raise ValueError(f"in_flight={list(depths)}: {why}")

    @property
    def asynchronous(self) -> bool:
        return self.name in ASYNC_SCHEDULES

    @property
    def splits_backward(self) -> bool:
        """Whether the lists split each backward into B (input gradient) and W (weight
        gradient): zb-h1. Otherwise B is the whole backward and there is no W."""
        return self.name in SPLIT_BACKWARD_SCHEDULES

    def depth(self, stage_idx: int) -> int:
        """d_k: microbatches in flight at stage k of an asynchronous schedule (forward run,
        backward not yet) just before a backward; K - k unless in_flight sets it."""
        if self.in_flight:
            return self.in_flight[stage_idx]
        return self.num_stages - stage_idx

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(self.depth(k) for k in range(self.num_stages))

    def delay(self, stage_idx: int) -> int:
        """d_k - 1 (K-1-k by default): how many microbatches stage k runs ahead of its backward."""
        return self.depth(stage_idx) - 1

    def staleness(self, stage_idx: int) -> int:
        """How many updates old the weights of a gradient are when stage `stage_idx` applies it:
        tau_k for pipedream, 1 for 2bw, 0 for the synchronous schedules. The delay that PipeMare's
        lr discount and the weight predictions correct for. It equals the number of steps the
        stage makes between a microbatch's forward and its backward."""
        if self.name == "pipedream":
            return self.delay(stage_idx)
        if self.name == "2bw":
            return 1
        return 0

    def update_of(self, microbatch: int) -> int:
        return microbatch // self.num_microbatches

    def forward_version(self, stage_idx: int, microbatch: int) -> int:
        """Version of stage `stage_idx`'s weights that the forward of `microbatch` uses."""
        u = self.update_of(microbatch)
        if self.name == "pipedream":
            return max(0, microbatch - self.delay(stage_idx))
        if self.name == "2bw":
            return max(0, u - 1)
        return u

    def backward_version(self, stage_idx: int, microbatch: int, stash: bool) -> int:
        """Version the backward uses: the forward's with stashing, else the latest one (the
        number of updates the stage has made when the backward runs)."""
        if stash:
            return self.forward_version(stage_idx, microbatch)
        return self.update_of(microbatch)

    def versions_kept(self, stage_idx: int) -> int:
        """How many weight versions a stage must hold (the latest included)."""
        if self.name == "pipedream":
            return self.delay(stage_idx) + 1
        if self.name == "2bw":
            return 2
        return 1

    def actions(self, stage_idx: int, num_updates: int, start_update: int = 0) -> list[Action]:
        """The ordered action list of one stage for updates start_update .. num_updates-1.

        A run resumed at update u starts its lists there: the stages redo the forwards that
        were in flight at the checkpoint (with the stashed versions), so nothing else changes.
        """
        if not 0 <= stage_idx < self.num_stages:
            raise ValueError(f"stage_idx={stage_idx}: must be in [0, {self.num_stages})")
        if not 0 <= start_update <= num_updates:
            raise ValueError(f"start_update={start_update}: must be in [0, {num_updates}]")
        return list(_ACTIONS[self.name](self, stage_idx, start_update, num_updates))

    def all_actions(self, num_updates: int, start_update: int = 0) -> list[list[Action]]:
        return [self.actions(k, num_updates, start_update) for k in range(self.num_stages)]


def _gpipe(s: Schedule, k: int, start: int, num_updates: int) -> Iterator[Action]:
    # All forwards, then all backwards in the same order (so gradients accumulate in microbatch
    # order, as plain gradient accumulation does), then the step.
    M = s.num_microbatches
    for u in range(start, num_updates):
        mbs = range(u * M, (u + 1) * M)
        yield from (Action(k, "F", j) for j in mbs)
        yield from (Action(k, "B", j) for j in mbs)
        yield Action(k, "S", u)


def _one_f_one_b(s: Schedule, k: int, start: int, num_updates: int) -> Iterator[Action]:
    # PipeDream-flush: min(tau_k, M) warm-up forwards, steady 1F1B, cool-down backwards, step.
    M = s.num_microbatches
    for u in range(start, num_updates):
        base = u * M
        warm = min(s.delay(k), M)
        yield from (Action(k, "F", base + i) for i in range(warm))
        for i in range(M):
            if warm + i < M:
                yield Action(k, "F", base + warm + i)
            yield Action(k, "B", base + i)
        yield Action(k, "S", u)


def _async_1f1b(s: Schedule, k: int, start: int, num_updates: int) -> Iterator[Action]:
    # No flush: d_k - 1 warm-up forwards, then forward(j + d_k - 1), backward(j) for every j,
    # with a step after the last backward of each update. For pipedream M = 1 (a step per
    # microbatch). d_k = K - k unless in_flight sets it.
    M = s.num_microbatches
    first, total = start * M, num_updates * M
    tau = s.delay(k)
    yield from (Action(k, "F", j) for j in range(first, min(first + tau, total)))
    for j in range(first, total):
        if j + tau < total:
            yield Action(k, "F", j + tau)
        yield Action(k, "B", j)
        if (j + 1) % M == 0:
            yield Action(k, "S", j // M)


def _zb_h1(s: Schedule, k: int, start: int, num_updates: int) -> Iterator[Action]:
    # ZB-H1: 1F1B's F and B (so at most min(K - k, M) microbatches between F and B, 1F1B's
    # memory), with each backward split into B and W. Stage k runs W(i - d) right after B(i),
    # d = min(k, M): B's reach the late stages fastest at the start (the warm-up forwards
    # arrive back to back), so there a stage can afford to postpone W's, and the d deferred
    # W's fill its cool-down, where 1F1B waits for gradients. Every stage then holds the same
    # K microbatches between F and W (with M >= K) and, with F = B = W and M >= K, the makespan
    # is M (F + B + W) + (K - 1)(F + B - W) (docs/schedules.md). W's run in microbatch order, so
    # the weight gradient is summed in gpipe's order; the step follows the last W (a flush).
    M = s.num_microbatches
    for u in range(start, num_updates):
        base = u * M
        warm = min(s.delay(k), M)
        defer = min(k, M)
        for i in range(warm):
            yield Action(k, "F", base + i)
        for i in range(M):
            if warm + i < M:
                yield Action(k, "F", base + warm + i)
            yield Action(k, "B", base + i)
            if i >= defer:
                yield Action(k, "W", base + i - defer)
        for i in range(M - defer, M):
            yield Action(k, "W", base + i)
        yield Action(k, "S", u)


_ACTIONS = {"gpipe": _gpipe, "1f1b": _one_f_one_b, "pipedream": _async_1f1b, "2bw": _async_1f1b,
            "zb-h1": _zb_h1}
