"""Named methods: the paper's method and its baselines as presets (the README's methods table).

    pipenag train --method pipemare --stages 8

A method fixes the schedule, weight stashing, the optimizer and the delay corrections; the
config may override the schedule or stashing only where the method still makes sense.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass

from pipenag.config import Config, MethodName
from pipenag.schedules import ASYNC_SCHEDULES, Schedule, microbatches_per_update


@dataclass(frozen=True)
class Method:
    name: str
    schedule: str
    stash: bool
    optimizer: str
    delay_lr: bool  # PipeMare's delay learning-rate discount
    predict: bool  # PipeMare's backward weight prediction
    schedules: tuple[str, ...]  # schedules the method may run on
    description: str
    predict_forward: bool = False  # forward weight prediction (SpecTrain-style)
    delay_compensation: bool = False  # DC-ASGD's gradient correction (optim.dc_lambda)


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("gpipe", "gpipe", True, "adamw", False, False, ("gpipe", "1f1b"),
           "synchronous GPipe, M=4 microbatches per update, AdamW: the synchronous reference"),
    Method("1f1b", "1f1b", True, "adamw", False, False, ("gpipe", "1f1b"),
           "synchronous 1F1B with flush (PipeDream-flush): same numbers as gpipe"),
    Method("pipedream", "pipedream", True, "adamw", False, False, ("pipedream", "2bw"),
           "asynchronous 1F1B, weight stashing, AdamW: the plain asynchronous baseline"),
    Method("2bw", "2bw", True, "adamw", False, False, ("2bw",),
           "PipeDream-2BW: double-buffered weights (delay 1), M >= K, AdamW"),
    Method("pipedream-lr", "pipedream", True, "adamw", True, False, ("pipedream",),
           "pipedream + PipeMare's delay learning-rate discount"),
    Method("pipemare", "pipedream", False, "adamw", True, True, ("pipedream",),
           "no stashing, delay learning-rate discount + backward weight prediction (PipeMare)"),
    Method("nesterov", "pipedream", True, "nesterov", False, False, ("pipedream", "2bw"),
           "the paper's method: NAdam beta1 0.99 (Nesterov look-ahead), weight stashing"),
    Method("nesterov-nows", "pipedream", False, "nesterov-nows", True, False, ("pipedream",),
           "the paper's method without stashing: stage momentum 0.9 + 0.09 tau_k/K, delay lr discount"),
    Method("nesterov-sgd", "pipedream", True, "nesterov-sgd", False, False, ("pipedream", "2bw"),
           "Eq. 10 in SGD form (DelayedNesterov): the theory form; optim.discount ablation"),
    Method("basis-rotation", "pipedream", True, "basis-rotation", False, False, ("pipedream", "2bw"),
           "Adam in each block matrix's gradient-covariance eigenbasis, AdamW elsewhere (arXiv 2602.03515)"),
    Method("muon", "pipedream", True, "muon", False, False, ("pipedream", "2bw"),
           "torch Muon on the blocks' matrices (lr matched to AdamW's RMS), AdamW elsewhere"),
    Method("pipedream-wp", "pipedream", True, "adamw", False, False, ("pipedream", "2bw"),
           "pipedream + forward weight prediction w + s tau (w - w_prev) (SpecTrain-style)",
           predict_forward=True),
    Method("muon-wp", "pipedream", True, "muon", False, False, ("pipedream", "2bw"),
           "muon + forward weight prediction", predict_forward=True),
    # Error feedback, x_{t+1} = x_t - u_t - c (u_t - u_{t-1}) (arXiv 2606.30634; pipenag.optim.ErrorFeedback).
    Method("pipedream-ef", "pipedream", True, "adamw-ef", False, False, ("pipedream", "2bw"),
           "pipedream + error feedback on AdamW's update, c = optim.ef_scale (arXiv 2606.30634)"),
    Method("muon-ef", "pipedream", True, "muon-ef", False, False, ("pipedream", "2bw"),
           "muon + error feedback on the update, c = optim.ef_scale (arXiv 2606.30634)"),
    Method("muon-wp-ef", "pipedream", True, "muon-ef", False, False, ("pipedream", "2bw"),
           "muon-wp + error feedback: forward weight prediction and error feedback on Muon's update",
           predict_forward=True),
    Method("2bw-muon-ef", "2bw", True, "muon-ef", False, False, ("2bw",),
           "PipeDream-2BW with Muon and error feedback (arXiv 2606.30634)"),
    # Delay compensation, g + lambda g * g (w_now - w_stale) (Zheng et al., "Asynchronous
    # Stochastic Gradient Descent with Delay Compensation", ICML 2017; StageRunner).
    Method("pipedream-dc", "pipedream", True, "adamw", False, False, ("pipedream", "2bw"),
           "pipedream + DC-ASGD delay compensation g + lambda g*g (w_now - w_stale), lambda = optim.dc_lambda",
           delay_compensation=True),
    # Zero bubble ZB-H1 (Qi et al., "Zero Bubble Pipeline Parallelism", ICLR 2024): the strongest
    # synchronous baseline; its numbers are gpipe's (docs/schedules.md).
    Method("zb-h1", "zb-h1", True, "adamw", False, False, ("zb-h1",),
           "zero bubble ZB-H1 (backward split into B and W, 1F1B's memory), AdamW: same numbers as gpipe"),
    Method("gpipe-muon", "gpipe", True, "muon", False, False, ("gpipe", "1f1b", "zb-h1"),
           "synchronous GPipe with muon's optimizer: the synchronous reference of the Muon methods"),
]}
assert set(METHODS) == set(typing.get_args(MethodName)), "pipenag.config.MethodName lists the methods"


@dataclass(frozen=True)
class ResolvedMethod:
    """A method with the config's overrides applied: everything the engines need to know."""

    method: Method
    schedule: Schedule
    stash: bool
    optimizer: str
    delay_lr: bool
    predict: bool
    num_updates: int
    delay_lr_anneal: int
    forward_prediction: float  # the scale s of forward weight prediction, 0 when off
    delay_compensation: float = 0.0  # DC-ASGD's lambda, 0 when off


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; valid methods: {', '.join(METHODS)}")
    return METHODS[name]


def resolve(cfg: Config) -> ResolvedMethod:
    """Apply the pipeline and optim overrides of `cfg` to its method.

    Raises:
        ValueError: an unknown method, a schedule the method cannot run on, a stash setting
            the method forbids (stash on with PipeMare's prediction, stash off with delay
            compensation), or a microbatch count the schedule forbids.
    """
    p = cfg.pipeline
    method = get_method(p.method)
    schedule_name = p.schedule or method.schedule
    if schedule_name not in method.schedules:
        raise ValueError(f"pipeline.schedule={schedule_name!r}: method {method.name!r} runs on "
                         f"{', '.join(method.schedules)}")
    stash = method.stash if p.stash == "" else p.stash == "on"
    if method.delay_compensation and not stash:
        raise ValueError(f"pipeline.stash='off': method {method.name!r} corrects a gradient by the distance "
                         "between the weights it is applied to and those its backward used; without stashing "
                         "those are the same weights and the correction is zero")
    if method.predict and stash:
        raise ValueError(f"pipeline.stash='on': method {method.name!r} predicts the backward weights "
                         "and needs stashing off")
    predict_forward = method.predict_forward if p.predict_forward == "" else p.predict_forward == "on"
    if predict_forward and method.predict:
        raise ValueError(f"pipeline.predict_forward='on': method {method.name!r} already predicts the backward "
                         "weights (PipeMare); the two predictions are exclusive")
    num_microbatches = p.num_microbatches or microbatches_per_update(schedule_name, p.num_stages)
    depths: tuple[int, ...] = ()
    if p.in_flight == "auto":
        if schedule_name in ASYNC_SCHEDULES:  # a flushing schedule has no depth to plan
            from pipenag.link.messages import auto_in_flight

            depths = auto_in_flight(cfg, schedule_name, p.num_stages, num_microbatches)
    else:
        depths = p.depths
    try:
        schedule = Schedule(schedule_name, p.num_stages, num_microbatches, depths)
    except ValueError as e:
        # Schedule names its own arguments (num_microbatches=..., num_stages=...): say which
        # config field and which method they came from.
        raise ValueError(f"pipeline.{e} (method {method.name!r})") from None
    optimizer = cfg.optim.name or method.optimizer
    anneal = cfg.optim.delay_lr_anneal
    anneal = int(anneal) if anneal >= 0 else max(1, cfg.train.steps // 5)
    return ResolvedMethod(method, schedule, stash, optimizer, method.delay_lr, method.predict,
                          cfg.train.steps, anneal, cfg.optim.predict_scale if predict_forward else 0.0,
                          cfg.optim.dc_lambda if method.delay_compensation else 0.0)


def methods_table() -> str:
    """The README's table of methods (markdown)."""
    rows = ["| method | schedule | stash | optimizer | delay lr | prediction | what it is |",
            "|---|---|---|---|---|---|---|"]
    for m in METHODS.values():
        prediction = "backward" if m.predict else "forward" if m.predict_forward else "no"
        rows.append(f"| `{m.name}` | {m.schedule} | {'on' if m.stash else 'off'} | {m.optimizer} | "
                    f"{'yes' if m.delay_lr else 'no'} | {prediction} | {m.description} |")
    return "\n".join(rows)
