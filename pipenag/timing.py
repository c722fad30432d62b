"""Timing model: the makespan and utilization of a schedule, by event simulation, and the
text grid that `pipenag schedule` prints from it.

    pipenag schedule --name gpipe --stages 4 --updates 2
    python -c "from pipenag import Schedule; from pipenag.timing import simulate; \
print(simulate(Schedule('gpipe', 4, 4), 10).makespan)"

Each stage runs its action list (pipenag.schedules) in order. An action starts when its stage is
free and its input has arrived: a forward at stage k > 0 needs the activation of the same
microbatch from stage k-1, a backward at stage k < K-1 the gradient from stage k+1. A transfer
leaves when the producing action ends, occupies its link (one per direction between neighbours)
for bytes / bandwidth, and arrives `latency` later. Sends never block the sender: this is the
overlap of communication and computation the runtime implements.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

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
) -> Timeline:
    """Event-simulate `num_updates` updates of `schedule`.

    Args:
        forward_time, backward_time, step_time: seconds (or any unit) per action, one value or
            one per stage.
        latency: one-way link latency added to every transfer.
        transfer_time: time a transfer occupies its link (bytes / bandwidth).
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
    if latency < 0 or transfer_time < 0:
        raise ValueError(f"latency={latency}, transfer_time={transfer_time}: must be >= 0")
    lists = schedule.all_actions(num_updates)
    pos = [0] * K
    clock = [0.0] * K
    busy = [0.0] * K
    arrived: dict[tuple[int, str, int], float] = {}  # (receiving stage, kind, mb) -> arrival
    link_free: dict[tuple[int, int], float] = {}
    events: list[Event] = []
    duration = {"F": fwd, "B": bwd, "S": stp}

    def send(src: int, dst: int, kind: str, mb: int, t: float) -> None:
        leave = max(t, link_free.get((src, dst), 0.0))
        link_free[(src, dst)] = leave + transfer_time
        arrived[(dst, kind, mb)] = leave + transfer_time + latency

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


def bubble_fraction(num_stages: int, num_microbatches: int) -> float:
    """Idle fraction (K-1)/(M+K-1) of a flushing schedule with equal forward and backward times."""
    return (num_stages - 1) / (num_microbatches + num_stages - 1)


def format_grid(schedule: Schedule, num_updates: int) -> str:
    """A text grid: one row per stage, one column per unit time slot (forward = backward = 1,
    step = 0), computed by the timing model; then each stage's version table."""
    timeline = simulate(schedule, num_updates)
    width = max(len(f"{e.action.kind}{e.action.index}") for e in timeline.events) + 1
    num_slots = int(round(timeline.makespan))
    lines = [f"{schedule.name}: {schedule.num_stages} stages, {schedule.num_microbatches} "
             f"microbatch(es) per update, {num_updates} updates (F/B = forward/backward of a "
             f"microbatch, '.' = idle)"]
    for k in range(schedule.num_stages):
        cells = ["."] * num_slots
        for ev in timeline.events:
            if ev.action.stage == k and ev.action.kind in "FB":
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
