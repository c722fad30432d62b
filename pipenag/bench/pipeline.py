"""Pipeline throughput of the real runtime with stages that sleep instead of computing.

    pipenag bench pipeline --stages 8 --microbatches 4 --compute-ms 20 --updates 100 --json
    pipenag bench pipeline --stages 4 --link.latency_ms=20 --link.bandwidth_mbps=100
    pipenag bench pipeline --stages 4 --stage-ms 20,20,40,20 --updates 50      # a straggler

K worker processes (gloo on 127.0.0.1) run the real executor (pipenag.runtime.executor) and
transport under each schedule, one after another with a barrier in between. A stage sleeps
`compute-ms` per forward and per backward (zb-h1: half in B, half in W) and does nothing in its step, so the measurement
is the schedule and the runtime's overhead, not arithmetic: sleeping stages also let 8 processes
share 2 cores honestly. Every stage checks that each message it receives carries the microbatch
it expects. All schedules run the same number of microbatches (updates x M; pipedream makes one
update per microbatch, 2bw uses M' = max(M, K) per update). The stages, M (pipeline.num_microbatches,
0 = 4), the emulated link ([link]) and the timeout (dist.timeout_s) come from the config, as for
`pipenag train`; the model is not used.

Reported per schedule: throughput (microbatches per second over the slowest stage's wall
time), per-stage utilization (time inside forward/backward/step over that wall time), where the
rest went (receive waits, sends), and the event-simulation prediction (pipenag.timing.simulate)
for the same setting. Then the ratios asynchronous/synchronous beside the ideal bubble model
(M+K-1)/M. With --json the last line is one JSON object: schedule -> {"throughput": ...,
"utilization": [...], ...}.

A straggler: `--stage-ms A,B,...` (one value per stage) sets each stage's sleep per forward and
per backward instead of --compute-ms. Every schedule then also runs with all stages at the median
of those values (the same pipeline without its straggler), and the report adds what the
straggler costs: 1 - throughput / throughput without it, measured and predicted by the event
model (`straggler_cost`); under "straggler_cost" in the JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipenag.bench import bench_config, bench_parser, machine_line
from pipenag.config import Config
from pipenag.link.messages import codecs
from pipenag.schedules import ASYNC_SCHEDULES, Schedule, microbatches_per_update
from pipenag.timing import plan_in_flight, simulate

SCHEDULES = ("pipedream", "2bw", "gpipe", "1f1b", "zb-h1")
SYNC = ("gpipe", "1f1b", "zb-h1")


class SleepStage:
    """A stage that sleeps `forward_s` / `backward_s` per pass and checks its messages: the
    activation and gradient of microbatch j are tensors filled with j.

    Raises:
        AssertionError: a received tensor belongs to another microbatch.
    """

    def __init__(self, stage_idx: int, num_stages: int, forward_s: float, backward_s: float,
                 shape: tuple[int, ...]):
        self.stage_idx = stage_idx
        self.is_first, self.is_last = stage_idx == 0, stage_idx == num_stages - 1
        self.forward_s, self.backward_s, self.shape = forward_s, backward_s, shape

    def _check(self, what: str, microbatch: int, t: torch.Tensor) -> None:
        # round(): a codec on the link (link.compress_*) may return j only approximately
        got = float(t.reshape(-1)[0])
        assert round(got) == microbatch and tuple(t.shape) == self.shape, (
            f"stage {self.stage_idx}: {what} of microbatch {microbatch} carries microbatch {got}")

    def forward(self, microbatch: int, x: torch.Tensor, target=None) -> torch.Tensor:
        if not self.is_first:
            self._check("the activation", microbatch, x)
        time.sleep(self.forward_s)
        if self.is_last:
            return torch.tensor(float(microbatch))  # the "loss"
        return torch.full(self.shape, float(microbatch))

    def backward(self, microbatch: int, grad: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if not self.is_last:
            self._check("the gradient", microbatch, grad)
        time.sleep(self.backward_s)
        return None if self.is_first else torch.full(self.shape, float(microbatch))

    # zb-h1 splits the backward: half of backward_s for B (the input gradient, sent at once)
    # and half for W (the weight gradient), which is also what pipenag.timing.simulate assumes
    # for it when given only one backward time.
    def backward_input(self, microbatch: int, grad: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
        if not self.is_last:
            self._check("the gradient", microbatch, grad)
        time.sleep(self.backward_s / 2)
        return None if self.is_first else torch.full(self.shape, float(microbatch))

    def backward_weight(self, microbatch: int) -> None:
        time.sleep(self.backward_s / 2)

    def step(self) -> None:
        pass


def parse_stage_ms(text: str, num_stages: int) -> list[float]:
    """The per-stage compute milliseconds of --stage-ms.

    Args:
        text: comma-separated milliseconds, e.g. "20,20,40,20".
        num_stages: the pipeline's stages; one value per stage is needed.
    Returns:
        The values.
    Raises:
        ValueError: a value that is not a number >= 0, or not one value per stage (named).
    """
    items = [t.strip() for t in text.split(",")]
    try:
        values = [float(t) for t in items]
    except ValueError:
        raise ValueError(f"--stage-ms={text!r}: not comma-separated milliseconds (e.g. 20,20,40,20)") from None
    if len(values) != num_stages:
        raise ValueError(f"--stage-ms={text!r}: {len(values)} value(s) for {num_stages} stages; give one per stage")
    if any(not 0 <= v < math.inf for v in values):
        raise ValueError(f"--stage-ms={text!r}: every value must be a number of milliseconds >= 0")
    return values


def uniform_stage_s(stage_s: Sequence[float]) -> list[float]:
    """The same pipeline without its straggler: every stage at the median of the stage times."""
    return [statistics.median(stage_s)] * len(stage_s)


def straggler_cost(schedule: Schedule, num_updates: int, stage_s: Sequence[float],
                   baseline_s: Optional[Sequence[float]] = None, latency: float = 0.0,
                   transfer_time: float = 0.0, backward_transfer_time: Optional[float] = None) -> dict:
    """What per-stage compute times cost against a baseline, by the event model.

    Args:
        schedule, num_updates: what runs.
        stage_s: each stage's seconds per forward and per backward.
        baseline_s: the times to compare with (None: uniform_stage_s(stage_s)).
        latency, transfer_time, backward_transfer_time: the link, as for pipenag.timing.simulate.
    Returns:
        {"predicted_throughput", "predicted_uniform_throughput" (microbatches per second),
        "predicted_cost": 1 - the first / the second}.
    """
    baseline_s = uniform_stage_s(stage_s) if baseline_s is None else list(baseline_s)
    total = num_updates * schedule.num_microbatches
    rates = []
    for times in (stage_s, baseline_s):
        t = simulate(schedule, num_updates, forward_time=list(times), backward_time=list(times), latency=latency,
                     transfer_time=transfer_time, backward_transfer_time=backward_transfer_time).makespan
        rates.append(total / t if t > 0 else float("inf"))
    cost = 1 - rates[0] / rates[1] if math.isfinite(rates[1]) and rates[1] > 0 else 0.0
    return {"predicted_throughput": rates[0], "predicted_uniform_throughput": rates[1], "predicted_cost": cost}


def wire_bytes(cfg: Config, numel: int) -> tuple[int, int]:
    """Bytes on the wire of one activation and of one gradient of `numel` float32 values, after
    the [link] codecs."""
    return tuple(c.packed_numel(numel) if c is not None else numel * 4 for c in codecs(cfg))


def plan(name: str, num_stages: int, num_microbatches: int, cfg: Optional[Config] = None,
         compute_s: float = 0.0, wire: tuple[int, int] = (0, 0)) -> Schedule:
    """The schedule a benchmark runs for `name` (M per update as the schedule allows), with
    cfg's pipeline.in_flight for the asynchronous schedules: "auto" plans the depths from the
    [link], the `wire` bytes (activation, gradient) and `compute_s` per forward and backward."""
    M = microbatches_per_update(name, num_stages, num_microbatches)
    depths: tuple[int, ...] = ()
    if cfg is not None and name in ASYNC_SCHEDULES:
        depths = cfg.pipeline.depths
        if cfg.pipeline.in_flight == "auto":
            from pipenag.link.messages import link_times

            latency, transfer = link_times(cfg, wire[0])
            back = link_times(cfg, wire[1])[1]
            depths = plan_in_flight(name, num_stages, M, compute_s, compute_s, latency, transfer,
                                    backward_transfer_time=back)
    try:
        return Schedule(name, num_stages, M, depths)
    except ValueError as e:
        raise ValueError(f"pipeline.{e} (schedule {name})" if str(e).startswith("in_flight") else str(e)) from None


def updates_for(schedule: Schedule, total_microbatches: int) -> int:
    return math.ceil(total_microbatches / schedule.num_microbatches)


def message_shape(message_kb: float) -> tuple[int, ...]:
    return (max(1, int(message_kb * 1024 / 4)),)  # float32


# -- the worker processes -----------------------------------------------------------------------


def _worker(args: argparse.Namespace, cfg: Config) -> int:
    import torch.distributed as dist

    from pipenag.runtime.comm import LinkModel, Transport, make_link_groups
    from pipenag.runtime.executor import Executor

    torch.set_num_threads(1)
    rank, K = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    timeout_s = cfg.dist.timeout_s
    dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s), rank=rank, world_size=K)
    groups = make_link_groups(K)
    link = LinkModel.from_config(cfg.link.latency_ms, cfg.link.bandwidth_mbps)
    shape = message_shape(args.message_kb)
    act, grad = codecs(cfg)
    M = microbatches_per_update("gpipe", K, cfg.pipeline.num_microbatches)
    total = args.updates * M
    stage_s = _stage_s(args, K)
    runs = [("", stage_s)] + ([(UNIFORM, uniform_stage_s(stage_s))] if args.stage_ms else [])
    results = {}
    for name in args.schedules.split(","):
        schedule = plan(name, K, M, cfg, max(stage_s), wire_bytes(cfg, shape[0]))
        for suffix, times in runs:  # with the straggler, then (with --stage-ms) without it
            stage = SleepStage(rank, K, times[rank], times[rank], shape)
            transport = Transport(rank, K, groups, shape, link=link, timeout_s=timeout_s, activation_codec=act,
                                  gradient_codec=grad) if K > 1 else None
            executor = Executor(stage, schedule, rank, transport, updates_for(schedule, total),
                                inputs=lambda j: torch.zeros(1), targets=lambda j: torch.zeros(1))
            dist.barrier()
            cpu0 = time.process_time()
            stats = executor.run().to_dict()
            stats["cpu_s"] = time.process_time() - cpu0  # all threads of the process (gloo's too)
            everyone: list = [None] * K
            dist.all_gather_object(everyone, stats)
            results[name + suffix] = everyone
    if rank == 0:
        Path(args.result).write_text(json.dumps(results))
    dist.barrier()
    dist.destroy_process_group()
    return 0


UNIFORM = "@uniform"  # result key suffix of a schedule's run without the straggler


def _stage_s(args: argparse.Namespace, num_stages: int) -> list[float]:
    """Seconds per forward and per backward of each stage: --stage-ms, else --compute-ms."""
    if args.stage_ms:
        return [ms / 1e3 for ms in parse_stage_ms(args.stage_ms, num_stages)]
    return [args.compute_ms / 1e3] * num_stages


# -- the report ----------------------------------------------------------------------------------


def summarize(name: str, stage_stats: list[dict], schedule: Schedule, num_updates: int,
              compute_s: float | Sequence[float], link_latency_s: float, transfer_s: float,
              backward_transfer_s: Optional[float] = None) -> dict:
    """Throughput and utilization measured, and the event simulation's prediction.

    Args:
        name: the schedule's name.
        stage_stats: every stage's executor Stats.to_dict() (with cpu_s).
        schedule, num_updates: what ran.
        compute_s: seconds per forward and per backward, one value or one per stage.
        link_latency_s, transfer_s, backward_transfer_s: the emulated link.
    Returns:
        The report of the schedule (see the module docstring).
    """
    compute_s = compute_s if isinstance(compute_s, (int, float)) else list(compute_s)
    wall = max(s["wall_s"] for s in stage_stats)
    total = num_updates * schedule.num_microbatches
    pred = simulate(schedule, num_updates, forward_time=compute_s, backward_time=compute_s,
                    latency=link_latency_s, transfer_time=transfer_s, backward_transfer_time=backward_transfer_s)
    util = [s["compute_s"] / wall for s in stage_stats]
    # Where the time went: the extra per-message delay that makes the event model's makespan
    # equal the measured wall time (bisection; the model is monotone in the latency).
    lo, hi = 0.0, max(wall, 1e-3)
    if pred.makespan < wall:
        for _ in range(30):
            mid = (lo + hi) / 2
            model = simulate(schedule, num_updates, forward_time=compute_s, backward_time=compute_s,
                             latency=link_latency_s + mid, transfer_time=transfer_s,
                             backward_transfer_time=backward_transfer_s)
            lo, hi = (mid, hi) if model.makespan < wall else (lo, mid)
    return {
        "throughput": total / wall,
        "utilization": util,
        "mean_utilization": sum(util) / len(util),
        "predicted_throughput": total / pred.makespan if pred.makespan > 0 else float("inf"),
        "predicted_utilization": pred.utilization,
        "wall_s": wall,
        "microbatches": total,
        "updates": num_updates,
        "microbatches_per_update": schedule.num_microbatches,
        "recv_wait_s": [s["recv_wait_s"] for s in stage_stats],
        "send_s": [s["send_s"] for s in stage_stats],
        "cpu_s": [s["cpu_s"] for s in stage_stats],
        "fitted_hop_delay_s": lo,
        "in_flight": list(schedule.depths) if schedule.asynchronous else None,
        "staleness": [schedule.staleness(k) for k in range(schedule.num_stages)],
        "predicted_mean_utilization": sum(pred.utilization) / len(pred.utilization),
        "transfer_s": max(transfer_s, transfer_s if backward_transfer_s is None else backward_transfer_s),
        "wire": [s.get("wire", {}) for s in stage_stats],
    }


def main(argv: list[str]) -> int:
    parser = bench_parser("pipenag bench pipeline", __doc__)
    parser.add_argument("--compute-ms", type=float, default=20.0, help="sleep per forward and per backward")
    parser.add_argument("--stage-ms", default="",
                        help="per-stage sleep per forward and per backward, one value per stage (e.g. 20,20,40,20): "
                             "a straggler; overrides --compute-ms and adds a run without it")
    parser.add_argument("--updates", type=int, default=100,
                        help="updates of gpipe/1f1b; every schedule runs updates x M microbatches")
    parser.add_argument("--schedules", default=",".join(SCHEDULES), help="comma-separated")
    parser.add_argument("--message-kb", type=float, default=4.0, help="size of every activation and gradient")
    parser.add_argument("--json", action="store_true", help="end with one JSON line of the results")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args, cfg = bench_config(parser, argv)
    if args.worker:
        return _worker(args, cfg)
    names = [n for n in args.schedules.split(",") if n]
    bad = [n for n in names if n not in SCHEDULES]
    if bad or not names:
        parser.error(f"--schedules: unknown {bad}; valid: {', '.join(SCHEDULES)}")
    if args.updates < 1 or args.compute_ms < 0:
        parser.error(f"--updates={args.updates} must be >= 1 and --compute-ms={args.compute_ms} >= 0")
    K = cfg.pipeline.num_stages
    M = microbatches_per_update("gpipe", K, cfg.pipeline.num_microbatches)
    try:  # a bad --stage-ms or pipeline.in_flight fails here, in one line, before any worker starts
        stage_s = _stage_s(args, K)
        for name in names:
            plan(name, K, M, cfg, max(stage_s), wire_bytes(cfg, message_shape(args.message_kb)[0]))
    except ValueError as e:
        parser.error(str(e))
    return _run(args, cfg, argv, names)


def _run(args: argparse.Namespace, cfg: Config, argv: list[str], names: list[str]) -> int:
    from pipenag.runtime.comm import LinkModel
    from pipenag.runtime.launch import launch_local

    K = cfg.pipeline.num_stages
    stage_s = _stage_s(args, K)
    C = max(stage_s)  # what plans pipeline.in_flight = "auto": the slowest stage
    M = microbatches_per_update("gpipe", K, cfg.pipeline.num_microbatches)
    total = args.updates * M
    link = LinkModel.from_config(cfg.link.latency_ms, cfg.link.bandwidth_mbps)
    shape = message_shape(args.message_kb)
    wire = wire_bytes(cfg, shape[0])
    transfer_s, back_s = link.transfer_s(wire[0]), link.transfer_s(wire[1])
    compute_words = (f"{args.compute_ms:g} ms" if not args.stage_ms else
                     f"per stage {','.join(f'{t * 1e3:g}' for t in stage_s)} ms (a straggler; also run with "
                     f"every stage at {uniform_stage_s(stage_s)[0] * 1e3:g} ms)")
    print(f"pipenag bench pipeline: K={K} stages, M={M} microbatches per update (2bw: {max(M, K)}, "
          f"pipedream: 1), {compute_words} per forward and per backward (sleep), {total} "
          f"microbatches per schedule ({args.updates} gpipe/1f1b updates), messages "
          f"{shape[0] * 4 / 1024:g} KiB, link latency {cfg.link.latency_ms:g} ms, bandwidth "
          f"{cfg.link.bandwidth_mbps:g} Mbit/s (0 = unlimited); on the wire {wire[0] / 1024:g} KiB forward "
          f"({cfg.link.compress_activations}), {wire[1] / 1024:g} KiB backward ({cfg.link.compress_gradients})")
    print(f"{machine_line()}; {K} worker processes, gloo")
    for name in names:
        schedule = plan(name, K, M, cfg, C, wire)
        if schedule.asynchronous:
            print(f"{name}: in flight per stage {list(schedule.depths)}"
                  f"{' (auto)' if cfg.pipeline.in_flight == 'auto' else ''}, staleness "
                  f"{[schedule.staleness(k) for k in range(K)]}")
    with tempfile.TemporaryDirectory(prefix="pipenag-bench-") as tmp:
        result = Path(tmp) / "result.json"
        worker_args = [a for a in argv if a != "--json"] + ["--worker", "--result", str(result)]
        t0 = time.perf_counter()
        rc = launch_local("pipenag.bench.pipeline", worker_args, K, {}, prog="pipenag bench pipeline",
                          start_method="fork")
        if rc != 0:
            return rc
        raw = json.loads(result.read_text())
    print(f"(all schedules: {time.perf_counter() - t0:.1f} s including process start)")
    report = {}
    for name in names:
        schedule = plan(name, K, M, cfg, C, wire)
        report[name] = summarize(name, raw[name], schedule, updates_for(schedule, total), stage_s,
                                 link.latency_s, transfer_s, back_s)
        if args.stage_ms:
            uniform = summarize(name, raw[name + UNIFORM], schedule, updates_for(schedule, total),
                                uniform_stage_s(stage_s), link.latency_s, transfer_s, back_s)
            cost = straggler_cost(schedule, updates_for(schedule, total), stage_s, latency=link.latency_s,
                                  transfer_time=transfer_s, backward_transfer_time=back_s)
            report[name]["uniform"] = uniform
            report[name]["straggler_cost"] = {"measured": 1 - report[name]["throughput"] / uniform["throughput"],
                                              "predicted": cost["predicted_cost"]}
    print()
    print(f"{'schedule':<10} {'mb/s':>8} {'predicted':>10} {'util mean':>10} {'min':>7} {'max':>7} "
          f"{'predicted':>10} {'recv wait':>10} {'hop ms':>7} {'cpu ms':>7} {'wall s':>8}")
    for name in names:
        r = report[name]
        waits = sum(r["recv_wait_s"]) / K / r["wall_s"]
        pred_util = sum(r["predicted_utilization"]) / K
        print(f"{name:<10} {r['throughput']:>8.2f} {r['predicted_throughput']:>10.2f} "
              f"{r['mean_utilization']:>10.1%} {min(r['utilization']):>7.1%} {max(r['utilization']):>7.1%} "
              f"{pred_util:>10.1%} {waits:>10.1%} {r['fitted_hop_delay_s'] * 1e3:>7.2f} "
              f"{sum(r['cpu_s']) / K / (2 * r['microbatches']) * 1e3:>7.2f} {r['wall_s']:>8.2f}")
    print("(util: busy / wall per stage; predicted: pipenag.timing.simulate with the same compute times; "
          "recv wait: mean share of the wall time blocked on a message; hop ms: the per-message delay "
          "that makes the event model match the measured wall time; cpu ms: CPU time per pass and "
          "stage, all threads, sleep excluded)")
    if args.stage_ms:
        print()
        print(f"{'straggler':<10} {'mb/s':>8} {'without':>8} {'cost':>7} {'predicted':>10} {'without':>8} {'cost':>7}")
        for name in names:
            r, u, c = report[name], report[name]["uniform"], report[name]["straggler_cost"]
            print(f"{name:<10} {r['throughput']:>8.2f} {u['throughput']:>8.2f} {c['measured']:>7.1%} "
                  f"{r['predicted_throughput']:>10.2f} {u['predicted_throughput']:>8.2f} {c['predicted']:>7.1%}")
        print("(without: every stage at the median of --stage-ms; cost: 1 - throughput / throughput without the "
              "straggler, measured and by pipenag.timing.simulate)")
    ideal = (M + K - 1) / M
    lines = []
    for a in [n for n in names if n in ASYNC_SCHEDULES]:
        for s in [n for n in names if n in SYNC]:
            ratio = report[a]["throughput"] / report[s]["throughput"]
            pred = report[a]["predicted_throughput"] / report[s]["predicted_throughput"]
            lines.append(f"{a}/{s} {ratio:.3f} (predicted {pred:.3f}; ideal (M+K-1)/M = {ideal:.3f}: "
                         f"{ratio / ideal:.1%} of it)")
    if lines:
        print("throughput ratios: " + "; ".join(lines))
    if args.json:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
