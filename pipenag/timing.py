"""Timing model: the makespan and utilization of a schedule, by event simulation, and the
text grid that `pipenag schedule` prints from it.

    pipenag schedule --name gpipe --stages 4 --updates 2
    python -c "from pipenag import Schedule; from pipenag.timing import simulate; \
print(simulate(Schedule('gpipe', 4, 4), 10).makespan)"

Each stage runs its action list (pipenag.schedules) in order. An action starts when its stage is
free and its input has arrived: a forward at stage k > 0 needs the activation of the same
microbatch from stage k-1, a backward at stage k < K-1 the gradient from stage k+1 (a W, the
weight-gradient half of zb-h1's split backward, needs nothing from a neighbour). A transfer
leaves when the producing action ends, occupies its link (one per direction between neighbours)
for bytes / bandwidth, and arrives `latency` later. Sends never block the sender: this is the
overlap of communication and computation the runtime implements.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

from pipenag.schedules import Action, Schedule


@dataclass(frozen=True)
class Event:
    action: Action
    start: float
    end: float


@dataclass
class Timeline:
    events: list[Event]
    makespan: float
    busy: list[float]
    utilization: list[float] = field(default_factory=list)

    @property
    def mean_utilization(self) -> float:
        return sum(self.utilization) / len(self.utilization)


def _per_stage(value: float | Sequence[float], num_stages: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        values = [float(value)] * num_stages
    else:
        values = [float(v) for v in value]
    if len(values) != num_stages or any(v < 0 for v in values):
        raise ValueError(f"{name}={value!r}: need one non-negative value per stage ({num_stages})")
    return values


def simulate(
    schedule: Schedule,
    num_updates: int,
    forward_time: float | Sequence[float] = 1.0,
    backward_time: float | Sequence[float] = 1.0,
    step_time: float | Sequence[float] = 0.0,
    latency: float = 0.0,
    transfer_time: float = 0.0,
    backward_transfer_time: Optional[float] = None,
    weight_time: Optional[float | Sequence[float]] = None,
) -> Timeline:
    """Event-simulate `num_updates` updates of `schedule`.

    Args:
        forward_time, backward_time, step_time: seconds (or any unit) per action, one value or
            one per stage. With a split backward (zb-h1) and a weight_time, backward_time is
            the B pass alone (the input gradient).
        latency: one-way link latency added to every transfer.
        transfer_time: time a transfer occupies its link (bytes / bandwidth).
        backward_transfer_time: the same for the gradients sent backward, when they are
            another size (a different codec); None = transfer_time.
        weight_time: per W action (the weight gradient of a split backward, zb-h1), one value
            or one per stage; None: backward_time is the whole backward, split in half between
            B and W (what a caller that knows one backward time means). Unused without W.
    Returns:
        A Timeline with every action's start and end, the makespan, and per-stage busy time and
        utilization (busy / makespan).
    Raises:
        RuntimeError: if the action lists deadlock (a schedule bug).
    """
    K = schedule.num_stages
    fwd = _per_stage(forward_time, K, "forward_time")
    bwd = _per_stage(backward_time, K, "backward_time")
    stp = _per_stage(step_time, K, "step_time")
    if weight_time is not None:
        wgt = _per_stage(weight_time, K, "weight_time")
    elif schedule.splits_backward:
        bwd = wgt = [b / 2 for b in bwd]
    else:
        wgt = [0.0] * K
    back_transfer = transfer_time if backward_transfer_time is None else backward_transfer_time
    if latency < 0 or transfer_time < 0 or back_transfer < 0:
        raise ValueError(f"latency={latency}, transfer_time={transfer_time}, backward_transfer_time="
                         f"{backward_transfer_time}: must be >= 0")
    lists = schedule.all_actions(num_updates)
    pos = [0] * K
    clock = [0.0] * K
    busy = [0.0] * K
    arrived: dict[tuple[int, str, int], float] = {}  # (receiving stage, kind, mb) -> arrival
    link_free: dict[tuple[int, int], float] = {}
    events: list[Event] = []
    duration = {"F": fwd, "B": bwd, "W": wgt, "S": stp}

    def send(src: int, dst: int, kind: str, mb: int, t: float) -> None:
        occupy = transfer_time if kind == "F" else back_transfer
        leave = max(t, link_free.get((src, dst), 0.0))
        link_free[(src, dst)] = leave + occupy
        arrived[(dst, kind, mb)] = leave + occupy + latency

    remaining = sum(len(a) for a in lists)
    while remaining:
        progressed = False
        for k in range(K):
            while pos[k] < len(lists[k]):
                a = lists[k][pos[k]]
                ready = 0.0
                if (a.kind == "F" and k > 0) or (a.kind == "B" and k < K - 1):
                    key = (k, a.kind, a.index)
                    if key not in arrived:
                        break
                    ready = arrived.pop(key)
                start = max(clock[k], ready)
                end = start + duration[a.kind][k]
                clock[k] = end
                if a.kind != "S":
                    busy[k] += end - start
                events.append(Event(a, start, end))
                if a.kind == "F" and k < K - 1:
                    send(k, k + 1, "F", a.index, end)
                elif a.kind == "B" and k > 0:
                    send(k, k - 1, "B", a.index, end)
                pos[k] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = [str(lists[k][pos[k]]) for k in range(K) if pos[k] < len(lists[k])]
            raise RuntimeError(f"schedule {schedule.name} deadlocks at actions {stuck}")
    makespan = max(clock)
    utilization = [b / makespan if makespan > 0 else 0.0 for b in busy]
    events.sort(key=lambda e: (e.start, e.action.stage))
    return Timeline(events, makespan, busy, utilization)


def steady_utilization(schedule: Schedule, forward_time: float, backward_time: float, latency: float = 0.0,
                       transfer_time: float = 0.0, num_microbatches: int = 0,
                       backward_transfer_time: Optional[float] = None) -> float:
    """The busy fraction of a stage in the steady state of an asynchronous schedule: forward +
    backward time over the period between two microbatches, measured on stage 0's backwards
    between the fill and the drain of a long event simulation. (The last d_0 backwards of stage
    0 run back to back, with no forwards left to interleave: they must not count.)

    Args:
        schedule: an asynchronous Schedule (its depths set the microbatches in flight).
        forward_time, backward_time: per pass, every stage.
        latency, transfer_time: of every message, as in simulate().
        num_microbatches: how many to simulate (0: 6 x the deepest stage + 40, enough for the
            period to settle).
        backward_transfer_time: as in simulate().
    """
    M = schedule.num_microbatches
    deepest = max(schedule.depths)
    n = max(num_microbatches or 6 * deepest + 40, 4 * deepest + 8)
    num_updates = max(2, -(-n // M))
    total = num_updates * M
    timeline = simulate(schedule, num_updates, forward_time, backward_time, latency=latency,
                        transfer_time=transfer_time, backward_transfer_time=backward_transfer_time)
    ends = {e.action.index: e.end for e in timeline.events if e.action.stage == 0 and e.action.kind == "B"}
    first, last = 2 * deepest + M, total - schedule.depth(0) - M  # past the fill, before the drain
    if last <= first or forward_time + backward_time <= 0:
        return 1.0
    period = (ends[last] - ends[first]) / (last - first)
    return min(1.0, (forward_time + backward_time) / period) if period > 0 else 1.0


def utilization_bound(forward_time: float, backward_time: float, transfer_time: float) -> float:
    """The compute/bandwidth bound of a stage's busy fraction: each direction of a link carries
    one message per microbatch, so a microbatch takes at least max(F + B, transfer)."""
    work = forward_time + backward_time
    return work / max(work, transfer_time) if work > 0 else 1.0


AUTO_TARGET = 0.97
"""in_flight="auto" reaches this fraction of utilization_bound in the steady state."""


def plan_in_flight(name: str, num_stages: int, num_microbatches: int, forward_time: float,
                   backward_time: float, latency: float, transfer_time: float,
                   target: float = AUTO_TARGET, backward_transfer_time: Optional[float] = None) -> tuple[int, ...]:
    """Depths for pipeline.in_flight="auto": the smallest per-stage depths with which the timing
    model keeps every stage at >= `target` of utilization_bound in the steady state.

    The search starts from Little's law, d_k = c * (round trip of stage k) / (period), with the
    round trip the passes of stages k..K-1 plus 2 (K-1-k) hops of latency + transfer and the
    period max(F + B, transfer), takes the smallest c that reaches the target (bisection), then
    lowers each depth while the target holds (binary search per stage, last stage first, until
    no depth moves): no single depth can then drop by one without missing the target.

    Args:
        name: "pipedream" or "2bw" (for another schedule the result is ()).
        num_stages, num_microbatches: K and M.
        forward_time, backward_time, latency, transfer_time: as in simulate(), one value for
            every stage and link.
        target: the fraction of the bound to reach.
        backward_transfer_time: of the gradients, when another codec makes them another size
            (None = transfer_time).
    Returns:
        The depths d_0 >= ... >= d_{K-1} >= 1; K - k when there is no link cost at all.
    """
    from pipenag.schedules import ASYNC_SCHEDULES, default_in_flight, in_flight_problem

    K, M = num_stages, num_microbatches
    if name not in ASYNC_SCHEDULES:
        return ()
    back = transfer_time if backward_transfer_time is None else backward_transfer_time
    if latency <= 0 and transfer_time <= 0 and back <= 0:
        return default_in_flight(K)
    slowest = max(transfer_time, back)
    goal = target * utilization_bound(forward_time, backward_time, slowest)
    cap = M + 1 if name == "2bw" else None
    cycle = max(forward_time + backward_time, slowest)
    hop = latency + (transfer_time + back) / 2
    round_trip = [(K - k) * (forward_time + backward_time) + 2 * (K - 1 - k) * hop for k in range(K)]

    def clamp(depths) -> tuple[int, ...]:
        out, floor = [], 1
        for d in reversed(depths):  # non-increasing toward stage 0, each >= 1
            floor = max(floor, int(d))
            out.append(floor)
        depths = tuple(reversed(out))
        return tuple(min(d, cap) for d in depths) if cap else depths

    def ok(depths) -> bool:
        return steady_utilization(Schedule(name, K, M, depths), forward_time, backward_time, latency,
                                  transfer_time, backward_transfer_time=back) >= goal

    def little(c: float) -> tuple[int, ...]:
        return clamp([math.ceil(c * rt / cycle - 1e-9) if cycle > 0 else 1 for rt in round_trip])

    hi = 1.0
    while not ok(little(hi)) and hi < 64:
        hi *= 2
    depths = little(hi)
    if not ok(depths):  # out of reach (2bw's cap, or a bound the schedule cannot meet): deepest tried
        return depths
    lo = 0.0
    for _ in range(12):
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if ok(little(mid)) else (mid, hi)
    depths = list(little(hi))
    moved = True
    while moved:
        moved = False
        for k in reversed(range(K)):
            floor = depths[k + 1] if k + 1 < K else 1
            low, high = floor, depths[k]  # ok at high; find the smallest ok depth
            while low < high:
                mid = (low + high) // 2
                trial = depths[:k] + [mid] + depths[k + 1:]
                if ok(trial):
                    high = mid
                else:
                    low = mid + 1
            if high < depths[k]:
                depths[k] = high
                moved = True
    assert not in_flight_problem(name, K, M, tuple(depths)), depths
    return tuple(depths)


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Idle fraction (K-1)/(M+K-1) of a flushing schedule with equal forward and backward times."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def format_grid(schedule: Schedule, num_updates: int) -> str:
    """A text grid: one row per stage, one column per unit time slot (forward = backward = 1,
    and W = 1 for a split backward; step = 0), computed by the timing model."""
    timeline = simulate(schedule, num_updates, weight_time=1.0)
    width = max(len(f"{e.action.kind}{e.action.index}") for e in timeline.events) + 1
    num_slots = int(round(timeline.makespan))
    lines = [f"{schedule.name}: {schedule.num_stages} stages, {schedule.num_microbatches} "
             f"microbatch(es) per update, {num_updates} updates (F/B = forward/backward of a "
             + ("microbatch, B = input gradient, W = weight gradient, " if schedule.splits_backward else "microbatch, ")
             + "'.' = idle)"]
    for k in range(schedule.num_stages):
        cells = ["."] * num_slots
        for ev in timeline.events:
            if ev.action.stage == k and ev.action.kind in "FBW":
                cells[int(round(ev.start))] = f"{ev.action.kind}{ev.action.index}"
        lines.append(f"stage {k}: " + "".join(c.ljust(width) for c in cells).rstrip())
    lines.append(f"utilization: " + ", ".join(f"{u:.0%}" for u in timeline.utilization))
    return "\n".join(lines)


def format_versions(schedule: Schedule, num_updates: int) -> str:
    """For every stage, the weight version each microbatch's forward and backward uses."""
    total = num_updates * schedule.num_microbatches
    lines = ["versions used (forward / backward with stash on / backward with stash off):"]
    for k in range(schedule.num_stages):
        cells = [
            f"{j}:{schedule.forward_version(k, j)}/{schedule.backward_version(k, j, True)}"
            f"/{schedule.backward_version(k, j, False)}"
            for j in range(total)
        ]
        lines.append(f"stage {k} (keeps {schedule.versions_kept(k)}): " + " ".join(cells))
    return "\n".join(lines)
