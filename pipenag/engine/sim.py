"""The exact single-process simulator of a pipeline schedule.

    from pipenag import Schedule, Simulator
    sim = Simulator(stages, loss_fn, optimizers, Schedule("pipedream", len(stages), 1), stash=True)
    loss = sim.step([(x, y)])       # one update: M (input, target) pairs, here M = 1

In every schedule here, the weight version a microbatch meets at a stage depends only on the
updates made before that microbatch (docs/schedules.md). So running the microbatches
one after another (forward through all stages, backward through all stages, then the updates
that are due) reproduces an asynchronous pipeline exactly, provided each stage reads the
version the schedule prescribes. The per-stage work is done by StageRunner, the same code the
multi-process runtime runs, so both engines produce the same numbers bit for bit.

With a split backward (zb-h1, Schedule.splits_backward) the backward through all stages is
the B half (the input gradients), and each stage's W halves (the weight gradients) run after
the update's last microbatch, in microbatch order, right before the steps: as in the
runtime's lists, every stage adds its W's in microbatch order, and that order is all that
decides the accumulated gradient (tests/test_zero_bubble.py).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from pipenag.engine.stage import make_runner
from pipenag.schedules import Schedule


class Simulator:
    """Train a list of stage modules under a pipeline schedule in one process.

    Args:
        stages: the stage modules, first to last; stage k's output is stage k+1's input.
        loss_fn: loss_fn(last stage output, target) -> scalar mean loss of a microbatch.
        optimizers: one torch optimizer per stage.
        schedule: a Schedule over len(stages) stages, or its name ("gpipe", "1f1b",
            "pipedream", "2bw" or "zb-h1") with `num_microbatches`.
        stash: weight stashing (the backward uses the forward's weights) or not.
        num_microbatches: microbatches per update M when `schedule` is a name (pipedream: 1;
            2bw: >= len(stages)).
        lr_fns: optional per-stage functions update (1-based) -> lr.
        grad_clip: per-stage gradient-norm clip (0: off).
        predict: PipeMare weight prediction for the backward (needs stash=False).
        predict_decay: decay of PipeMare's weight-change average.
        forward_prediction: forward weight prediction's scale s (0: off; StageRunner).
        record: a list that receives a Record for every forward and backward (for tests).
        activation_codec, gradient_codec: pipenag.link codecs (None: none) applied to every
            activation passed forward and every gradient passed backward between stages, the
            quantize -> dequantize that the runtime's transport applies on the wire.
        delay_compensation: DC-ASGD's lambda of every stage (0: off; StageRunner).
        autocast_dtype: compute dtype under torch.autocast (None: float32; StageRunner).

    `step(microbatches)` takes M (input, target) pairs, runs them with exactly the weight
    versions the schedule dictates, makes one update per stage with the gradient of the mean
    loss, and returns that mean loss. Afterwards the stage modules hold their latest weights.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizers: Sequence[torch.optim.Optimizer],
        schedule: Schedule | str = "pipedream",
        stash: bool = True,
        num_microbatches: int = 1,
        lr_fns: Optional[Sequence[Callable[[int], float]]] = None,
        grad_clip: float = 0.0,
        predict: bool = False,
        predict_decay: float = 0.9,
        forward_prediction: float = 0.0,
        record: Optional[list] = None,
        activation_codec=None,
        gradient_codec=None,
        delay_compensation: float = 0.0,
        autocast_dtype: Optional[torch.dtype] = None,
    ):
        if len(stages) < 1:
            raise ValueError("stages: need at least one stage module")
        if len(optimizers) != len(stages):
            raise ValueError(f"optimizers: got {len(optimizers)} for {len(stages)} stages (need one per stage)")
        if lr_fns is not None and len(lr_fns) != len(stages):
            raise ValueError(f"lr_fns: got {len(lr_fns)} for {len(stages)} stages")
        if predict and stash:
            raise ValueError("predict=True (PipeMare weight prediction) needs stash=False")
        if isinstance(schedule, str):
            schedule = Schedule(schedule, len(stages), num_microbatches)
        elif schedule.num_stages != len(stages):
            raise ValueError(f"schedule: {schedule.num_stages} stages, but {len(stages)} stage modules")
        self.schedule = schedule
        self.runners = [
            make_runner(schedule, k, module, optimizers[k], loss_fn, stash=stash,
                        lr_fn=lr_fns[k] if lr_fns is not None else None, grad_clip=grad_clip,
                        predict=predict, predict_decay=predict_decay, forward_prediction=forward_prediction,
                        record=record, delay_compensation=delay_compensation, autocast_dtype=autocast_dtype)
            for k, module in enumerate(stages)
        ]
        self.num_updates = 0
        self.activation_codec, self.gradient_codec = activation_codec, gradient_codec

    @property
    def num_microbatches(self) -> int:
        return self.schedule.num_microbatches

    def step(self, microbatches: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Run one update's microbatches; returns their mean loss."""
        M = self.num_microbatches
        if len(microbatches) != M:
            raise ValueError(f"step() got {len(microbatches)} microbatches; this schedule takes {M} per update")
        first = self.num_updates * M
        split = self.schedule.splits_backward
        total = 0.0
        for i, (x, y) in enumerate(microbatches):
            mb = first + i
            for runner in self.runners:
                x = runner.forward(mb, x, y if runner.is_last else None)
                if not runner.is_last and self.activation_codec is not None:
                    x = self.activation_codec.roundtrip(x)
            total += float(x)
            grad = None
            for runner in reversed(self.runners):
                grad = runner.backward_input(mb, grad) if split else runner.backward(mb, grad)
                if not runner.is_first and self.gradient_codec is not None:
                    grad = self.gradient_codec.roundtrip(grad)
        if split:
            for runner in self.runners:
                for mb in range(first, first + M):
                    runner.backward_weight(mb)
        for runner in self.runners:
            runner.step()
        self.num_updates += 1
        return total / M

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "stages": [r.state_dict() for r in self.runners]}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = state["num_updates"]
        for runner, s in zip(self.runners, state["stages"]):
            runner.load_state_dict(s)
