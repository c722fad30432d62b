"""Run one stage's action list in its own process: compute, receive, send, step.

    pipenag bench pipeline --stages 4 --microbatches 4 --compute-ms 10

The executor walks the stage's program: its action list from pipenag.schedules (the only place
schedules are defined), plus validation passes it inserts itself (`Eval`, below). For each
action it takes the input (stage 0: the data; otherwise a received activation), calls the stage
object, and sends the result on. The stage object is anything with

    forward(microbatch, x, target) -> activation (or the loss on the last stage)
    backward(microbatch, grad) -> gradient of the input (None on the first stage)
    step()

and, for a schedule that splits the backward (zb-h1: Schedule.splits_backward), also

    backward_input(microbatch, grad) -> gradient of the input (B: sent back at once)
    backward_weight(microbatch)       (W: the weight gradient, no communication)

such as pipenag.engine.stage.StageRunner, or the sleeping stages of the pipeline benchmark.

Message order. Every message a stage sends follows from its program alone: F actions send
activations ("F", j) forward, B actions send gradients ("B", j) backward, an Eval(u) sends the
validation activations ("E", u, i) forward. A receiver computes its neighbour's program with
the same function and so knows the whole incoming sequence; pipenag.runtime.comm posts the
receives in that order ahead of need.

Validation. The simulator evaluates all stages at version u after update u. Here stage k runs
its validation forwards right after its own step creating version u, on its live weights, and
passes the activations on; stage k+1 does the same after its own step u. The numbers are those
of the simulator, and no stage waits for a global barrier.
"""

from __future__ import annotations

import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Collection, Hashable, Iterator, Optional, Sequence, Union

import torch

from pipenag.runtime.comm import Transport
from pipenag.schedules import Action, Schedule


@dataclass(frozen=True)
class Eval:
    """Validation forwards after update `update` (1-based), inserted by the executor."""

    stage: int
    update: int

    def __str__(self) -> str:
        return f"{self.stage}E{self.update}"


Item = Union[Action, Eval]

MEDIAN_WINDOW = 32
"""Passes per kind (forward, backward, step) in a stage's moving median of its compute times."""


def build_program(schedule: Schedule, stage_idx: int, num_updates: int, start_update: int = 0,
                  eval_updates: Collection[int] = (), drain_updates: Collection[int] = ()) -> list[Item]:
    """A stage's program: its action lists, with Eval(u) right after the step creating version u
    for u in eval_updates.

    Args:
        schedule, stage_idx: the stage.
        num_updates, start_update: run updates start_update .. num_updates-1 (0-based).
        eval_updates: 1-based updates after which to validate.
        drain_updates: 1-based updates at which the pipeline drains: the program is the
            concatenation of the action lists of the segments between them (each segment redoes
            the forwards the previous one did not start, as a resumed run does). Used where a
            stage cannot checkpoint with forwards in flight (no weight stashing).
    Returns:
        The list of Action and Eval items.
    """
    bounds = sorted({u for u in drain_updates if start_update < u < num_updates}) + [num_updates]
    program: list[Item] = []
    first = start_update
    for end in bounds:
        for action in schedule.actions(stage_idx, end, first):
            program.append(action)
            if action.kind == "S" and action.index + 1 in eval_updates:
                program.append(Eval(stage_idx, action.index + 1))
        first = end
    return program


def outgoing_keys(program: Sequence[Item], direction: str, num_eval: int) -> Iterator[Hashable]:
    """The keys of the messages a program sends toward `direction` ("next" or "prev"), in order."""
    for item in program:
        if isinstance(item, Eval):
            if direction == "next":
                yield from (("E", item.update, i) for i in range(num_eval))
        elif item.kind == "F" and direction == "next":
            yield ("F", item.index)
        elif item.kind == "B" and direction == "prev":
            yield ("B", item.index)


@dataclass
class Stats:
    """Where a stage's wall time went."""

    wall_s: float = 0.0
    compute_s: float = 0.0  # training forward, backward and step
    eval_s: float = 0.0  # validation forwards, including their receives
    recv_wait_s: float = 0.0  # blocked waiting for a message
    send_s: float = 0.0  # handing messages to the transport, and the final flush
    counts: dict = field(default_factory=lambda: {"F": 0, "B": 0, "W": 0, "S": 0, "E": 0})
    wire: dict = field(default_factory=dict)  # Transport.wire_stats(): bytes per message sent
    # The last MEDIAN_WINDOW compute times of each kind: a median over a window follows a stage
    # that turns slow, and one slow pass (a page fault, the first pass) does not move it.
    recent: dict = field(default_factory=lambda: {k: deque(maxlen=MEDIAN_WINDOW) for k in "FBWS"})

    def medians_ms(self) -> dict:
        """The moving medians of this stage's compute times.

        Returns:
            {"forward_ms", "backward_ms", "step_ms"}: the median of the last MEDIAN_WINDOW
            passes of each kind in milliseconds, None for a kind not run yet; with a split
            backward (zb-h1) also "weight_ms" (W) and backward_ms is the B half.
        """
        kinds = (("F", "forward_ms"), ("B", "backward_ms"), ("S", "step_ms"))
        if self.recent["W"]:
            kinds += (("W", "weight_ms"),)
        return {name: (statistics.median(self.recent[kind]) * 1e3 if self.recent[kind] else None)
                for kind, name in kinds}

    @property
    def utilization(self) -> float:
        """Busy fraction: training compute (validation excluded) over wall time."""
        return self.compute_s / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"wall_s": self.wall_s, "compute_s": self.compute_s, "eval_s": self.eval_s,
                "recv_wait_s": self.recv_wait_s,
                "send_s": self.send_s, "utilization": self.utilization, "counts": dict(self.counts),
                "wire": dict(self.wire), "median_ms": self.medians_ms()}


class Executor:
    """Drives one stage object through its program.

    Args:
        stage: the stage object (forward / backward / step, see the module docstring).
        schedule, stage_idx: the schedule and this stage's position.
        transport: the Transport of this stage (None for a single-stage pipeline).
        num_updates: updates of the whole run.
        start_update: first update to run (a resumed run; 0-based count of updates done).
        inputs: microbatch -> stage input (stage 0).
        targets: microbatch -> target (last stage).
        eval_updates: 1-based updates after which to validate.
        drain_updates: 1-based updates at which the pipeline drains (see build_program).
        eval_inputs: i -> validation input i (stage 0); eval_targets: i -> target i (last).
        num_eval: validation microbatches per evaluation.
        eval_forward: (x, target) -> activation, or the loss on the last stage (no gradient).
        on_loss: (microbatch, loss) on the last stage, after each forward.
        after_update: (update, val_loss or None) after each step (and its validation); the
            val_loss is given on the last stage only.
        window: receives posted ahead per incoming channel.
        max_pending: outstanding sends per outgoing channel.
        clock: the timer.
        muted: () -> True once the stage must never send again: it blocks forever at its next
            send (pipenag.faults silent).
        pass_delay_s: () -> extra seconds to sleep in every forward and backward, counted as
            compute (pipenag.faults slow).
    """

    def __init__(self, stage, schedule: Schedule, stage_idx: int, transport: Optional[Transport],
                 num_updates: int, start_update: int = 0, *,
                 inputs: Optional[Callable[[int], torch.Tensor]] = None,
                 targets: Optional[Callable[[int], torch.Tensor]] = None,
                 eval_updates: Collection[int] = (), drain_updates: Collection[int] = (),
                 eval_inputs: Optional[Callable[[int], torch.Tensor]] = None,
                 eval_targets: Optional[Callable[[int], torch.Tensor]] = None, num_eval: int = 0,
                 eval_forward: Optional[Callable] = None,
                 on_loss: Optional[Callable[[int, torch.Tensor], None]] = None,
                 after_update: Optional[Callable[[int, Optional[float]], None]] = None,
                 window: int = 0, max_pending: int = 0, clock: Callable[[], float] = time.perf_counter,
                 muted: Optional[Callable[[], bool]] = None, pass_delay_s: Optional[Callable[[], float]] = None):
        K = schedule.num_stages
        if not 0 <= stage_idx < K:
            raise ValueError(f"stage_idx={stage_idx}: must be in [0, {K})")
        if K > 1 and transport is None:
            raise ValueError(f"a {K}-stage pipeline needs a transport")
        self.first, self.last = stage_idx == 0, stage_idx == K - 1
        if self.first and inputs is None:
            raise ValueError("the first stage needs inputs")
        if self.last and targets is None:
            raise ValueError("the last stage needs targets")
        if eval_updates and (num_eval < 1 or eval_forward is None
                             or (self.first and eval_inputs is None) or (self.last and eval_targets is None)):
            raise ValueError("eval_updates needs num_eval >= 1, eval_forward, eval_inputs on the first "
                             "stage and eval_targets on the last")
        self.stage, self.schedule, self.stage_idx = stage, schedule, stage_idx
        self.split = schedule.splits_backward  # B is backward_input, W backward_weight
        self.transport = transport
        self.inputs, self.targets = inputs, targets
        self.eval_inputs, self.eval_targets = eval_inputs, eval_targets
        self.num_eval, self.eval_forward = num_eval, eval_forward
        self.on_loss, self.after_update = on_loss, after_update
        self.clock = clock
        self._muted = muted or (lambda: False)
        self._pass_delay_s = pass_delay_s or (lambda: 0.0)
        eval_updates, drain_updates = set(eval_updates), set(drain_updates)

        def program(k: int) -> list[Item]:
            return build_program(schedule, k, num_updates, start_update, eval_updates, drain_updates)

        self.program = program(stage_idx)
        # Updates whose after_update waits for the validation that follows their step.
        self._evals = {item.update for item in self.program if isinstance(item, Eval)}
        M = schedule.num_microbatches
        # Enough posted receives for a burst of M (gpipe) plus the validation passes; an
        # asynchronous schedule has at most its deepest stage's depth of microbatches between
        # two neighbours (on the link or waiting), so a slow link with deep in-flight depths
        # finds its receives posted and its sends never wait on each other. One buffer of one
        # message per posted receive: memory stays bounded by the depth.
        depth = max(schedule.depths) if schedule.asynchronous else 0
        self.window = window or max(M, depth) + 1 + (num_eval if eval_updates else 0)
        self.max_pending = max_pending or self.window + K
        self._keys_from_prev = outgoing_keys(program(stage_idx - 1), "next", num_eval) if not self.first else ()
        self._keys_from_next = outgoing_keys(program(stage_idx + 1), "prev", num_eval) if not self.last else ()
        self.stats = Stats()

    def run(self) -> Stats:
        """Execute the whole program; returns the Stats (also in self.stats)."""
        st, clock = self.stats, self.clock
        t_start = clock()
        if self.transport is not None:
            self.transport.open(self._keys_from_prev, self._keys_from_next, self.window, self.max_pending)
        for item in self.program:
            if isinstance(item, Eval):
                val_loss = self._evaluate(item.update)
                if self.after_update is not None:
                    self.after_update(item.update, val_loss)
                continue
            j = item.index
            if item.kind == "F":
                x = self.inputs(j) if self.first else self._recv_prev(("F", j))
                y = self.targets(j) if self.last else None
                t = clock()
                out = self.stage.forward(j, x, y)
                self._slow_down()
                st.compute_s += self._timed("F", clock() - t)
                if self.last:
                    if self.on_loss is not None:
                        self.on_loss(j, out)
                else:
                    self._send_next(out)
            elif item.kind == "B":
                g = None if self.last else self._recv_next(("B", j))
                t = clock()
                g_in = self.stage.backward_input(j, g) if self.split else self.stage.backward(j, g)
                self._slow_down()
                st.compute_s += self._timed("B", clock() - t)
                if not self.first:
                    self._send_prev(g_in)
            elif item.kind == "W":
                t = clock()
                self.stage.backward_weight(j)
                self._slow_down()
                st.compute_s += self._timed("W", clock() - t)
            else:
                t = clock()
                self.stage.step()
                st.compute_s += self._timed("S", clock() - t)
                if self.after_update is not None and j + 1 not in self._evals:
                    self.after_update(j + 1, None)
            st.counts[item.kind] += 1
            if self.transport is not None:
                self.transport.refill()  # after the send: the peer waits for that, not for this
        if self.transport is not None:
            t = clock()
            self.transport.close()
            st.send_s += clock() - t
            st.wire = self.transport.wire_stats()
        st.wall_s = clock() - t_start
        return st

    @torch.no_grad()
    def _evaluate(self, update: int) -> Optional[float]:
        """The validation forwards of `update`; on the last stage, the mean loss as the simulator
        computes it (float sum in order, divided by the count)."""
        t0, wait0 = self.clock(), self.stats.recv_wait_s
        total = 0.0
        for i in range(self.num_eval):
            x = self.eval_inputs(i) if self.first else self._recv_prev(("E", update, i))
            y = self.eval_targets(i) if self.last else None
            out = self.eval_forward(x, y)
            if self.last:
                total += float(out)
            else:
                self._send_next(out)
            if self.transport is not None:
                self.transport.refill()
        self.stats.counts["E"] += 1
        # Validation time (its waits included) is its own item, not a training receive wait.
        self.stats.eval_s += self.clock() - t0
        self.stats.recv_wait_s = wait0
        return total / self.num_eval if self.last else None

    def _timed(self, kind: str, seconds: float) -> float:
        """Keep a pass's compute time for the moving median; returns it."""
        self.stats.recent[kind].append(seconds)
        return seconds

    def _slow_down(self) -> None:
        delay = self._pass_delay_s()
        if delay > 0:
            time.sleep(delay)

    @staticmethod
    def _block_forever() -> None:
        # A silent stage never sends again but keeps its process, its connections and its
        # posted receives. Blocking (rather than dropping the message and computing on) means
        # it never starves and times out itself, so only its neighbours report, naming it.
        while True:
            time.sleep(3600)

    def medians_ms(self) -> dict:
        """The stage's moving medians so far (Stats.medians_ms): forward_ms, backward_ms, step_ms."""
        return self.stats.medians_ms()

    # -- communication with timing ------------------------------------------------------------
    def _recv_prev(self, key) -> torch.Tensor:
        t = self.clock()
        x = self.transport.from_prev.recv(key)
        self.stats.recv_wait_s += self.clock() - t
        return x

    def _recv_next(self, key) -> torch.Tensor:
        t = self.clock()
        g = self.transport.from_next.recv(key)
        self.stats.recv_wait_s += self.clock() - t
        return g

    def _send_next(self, tensor: torch.Tensor) -> None:
        if self._muted():
            self._block_forever()
        t = self.clock()
        self.transport.to_next.send(tensor)
        self.stats.send_s += self.clock() - t

    def _send_prev(self, tensor: torch.Tensor) -> None:
        if self._muted():
            self._block_forever()
        t = self.clock()
        self.transport.to_prev.send(tensor)
        self.stats.send_s += self.clock() - t
