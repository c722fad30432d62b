"""Wall-clock model of a training run: calibrated per-stage costs, the link on the real bytes,
and (optionally) stages that share fewer cores than there are stages.

    python -c "from pipenag import load_config; from pipenag.wallclock import calibrate, predict; \
cfg = load_config('configs/tiny.toml'); print(predict(cfg, calibrate(cfg)))"

- `calibrate(cfg)` times the run's own StageRunners (the method's optimizer, stashing and
  prediction included) on one process: forward, backward and optimizer step of every stage,
  medians over a few repetitions after a warm-up, with the torch threads the run would use.
  The result is cached per config and machine (JSON under data.cache_dir or
  ~/.cache/pipenag/calibration), so a sweep pays for it once.
- `predict(cfg, costs)` event-simulates the resolved schedule (pipeline.in_flight included)
  with those costs, the [link] latency, and each direction's bytes after its codec
  (pipenag.link.messages), and returns seconds per update in the steady state and for the
  whole run.
- `simulate_shared(..., cores=C)`: the same event model when the K stage processes share C < K
  cores (as on a 2-core test machine): a stage computing while n stages compute runs at
  min(1, C / n) of its speed (processor sharing). With C >= K it equals
  pipenag.timing.simulate.
- `measure_contention(n, cfg)`: how much slower one process computes while n processes compute
  on this machine at once (one torch thread each), each process running the forward, backward
  and step of one of cfg's stages (the run's own process layout and work; without cfg, a fixed
  matmul workload). Cores that share caches, memory bandwidth or a physical core (a VM's vCPUs)
  slow each other down even when there are as many as processes: on one 2-vCPU test machine two
  matmul processes ran 0.98x, 1.37x and 1.87x slower each in three measurements
  (docs/results/time_model.md). Given to simulate_shared / predict as `slowdown`, it replaces
  processor sharing's min(1, C / n).
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch

from pipenag.config import Config
from pipenag.schedules import Schedule
from pipenag.timing import Event, Timeline, _per_stage, simulate

CALIBRATION_VERSION = 3  # bump when what calibrate() measures changes (2: the codecs; 3: B and W of a split backward)


@dataclass(frozen=True)
class StageCosts:
    """Seconds per forward and per backward of one microbatch, and per optimizer step, of
    every stage, with the machine and threads they were measured on. With a split backward
    (zb-h1), `backward` is the B pass (the input gradient) and `weight` the W pass (the weight
    gradient), each as the executor runs it; otherwise `weight` is empty."""

    forward: tuple[float, ...]
    backward: tuple[float, ...]
    step: tuple[float, ...]
    threads: int
    machine: str
    # Seconds to encode and to decode one message with the run's codecs, on the sending and the
    # receiving stage's compute thread: (activation, gradient); 0 without a codec.
    encode: tuple[float, float] = (0.0, 0.0)
    decode: tuple[float, float] = (0.0, 0.0)
    weight: tuple[float, ...] = ()

    @property
    def num_stages(self) -> int:
        return len(self.forward)


def machine_key() -> str:
    """CPU model, family and kernel level, core count, torch version: what the costs depend on
    besides the config (pipenag.machine.machine_info)."""
    from pipenag.machine import machine_info

    m = machine_info()
    detail = ", ".join(str(v) for v in (m["cpu_id"], m["cpu_capability"]) if v)
    return f"{m['cpu']}{f' ({detail})' if detail else ''}; {m['cores']} cores; torch {m['torch']}"


def _cache_file(cfg: Config, threads: int) -> Path:
    d = cfg.to_dict()
    key = {"v": CALIBRATION_VERSION, "model": d["model"], "data": {k: d["data"][k] for k in
                                                                     ("microbatch_size", "tokenizer", "bpe_vocab_size")},
           "pipeline": d["pipeline"], "optim": d["optim"], "threads": threads, "machine": machine_key(),
           "codecs": {k: d["link"][k] for k in ("compress_activations", "compress_gradients", "block_size")},
           "device": d["run"]["device"]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    root = Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path.home() / ".cache" / "pipenag"
    return root / "calibration" / f"{digest}.json"


def calibrate(cfg: Config, threads: int = 0, repeats: int = 8, warmup: int = 3, cache: bool = True) -> StageCosts:
    """Time forward, backward and step of every stage of `cfg`'s pipeline on this machine.

    Args:
        cfg: the run's config (model, method, stages, microbatch).
        threads: torch threads while timing (0: run.threads, else 1 per stage process).
        repeats: timed repetitions (medians are kept); warmup: untimed ones first.
        cache: read and write the cached result for this config and machine.
    Returns:
        The StageCosts.
    """
    from pipenag.build import build_pipeline
    from pipenag.model import lm_loss  # noqa: F401  (the runners' loss)

    threads = threads or cfg.run.threads or 1
    path = _cache_file(cfg, threads)
    if cache and path.is_file():
        saved = json.loads(path.read_text())
        return StageCosts(tuple(saved["forward"]), tuple(saved["backward"]), tuple(saved["step"]),
                          saved["threads"], saved["machine"], tuple(saved["encode"]), tuple(saved["decode"]),
                          tuple(saved.get("weight", ())))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        costs = _measure(cfg, build_pipeline, repeats, warmup)
        encode, decode = measure_codecs(cfg, repeats, warmup)
    finally:
        torch.set_num_threads(before)
    fwd, bwd, stp, wgt = costs
    result = StageCosts(fwd, bwd, stp, threads=threads, machine=machine_key(), encode=encode, decode=decode,
                        weight=wgt)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(result), indent=1) + "\n")
    return result


def _measure(cfg: Config, build_pipeline, repeats: int, warmup: int):
    from pipenag.plan import plan_vocab_size

    vocab = plan_vocab_size(cfg)
    train_ids = torch.randint(0, vocab, (4096,)) if cfg.model.unigram_head else None
    parts = build_pipeline(cfg, vocab, train_ids=train_ids)
    K, M = parts.resolved.schedule.num_stages, parts.resolved.schedule.num_microbatches
    B, T, C = cfg.data.microbatch_size, cfg.model.block_size, cfg.model.n_embd
    g = torch.Generator().manual_seed(0)
    split = parts.resolved.schedule.splits_backward
    fwd, bwd, stp, wgt = [], [], [], []
    for k in range(K):
        runner = parts.runner(k)
        times = {"F": [], "B": [], "W": [], "S": []}
        j = 0
        for rep in range(warmup + repeats):
            first = j
            for _ in range(M):  # one update of M microbatches, in the simulator's order for a stage
                x = (torch.randint(0, vocab, (B, T), generator=g) if k == 0
                     else torch.randn(B, T, C, generator=g))
                y = torch.randint(0, vocab, (B, T), generator=g) if k == K - 1 else None
                grad = None if k == K - 1 else torch.randn(B, T, C, generator=g)
                t0 = time.perf_counter()
                runner.forward(j, x, y)
                t1 = time.perf_counter()
                if split:  # zb-h1: the B pass now, the W passes after the update's last B (as the simulator)
                    runner.backward_input(j, grad)
                else:
                    runner.backward(j, grad)
                t2 = time.perf_counter()
                if rep >= warmup:
                    times["F"].append(t1 - t0)
                    times["B"].append(t2 - t1)
                j += 1
            for mb in range(first, j) if split else ():
                t0 = time.perf_counter()
                runner.backward_weight(mb)
                if rep >= warmup:
                    times["W"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            runner.step()
            if rep >= warmup:
                times["S"].append(time.perf_counter() - t0)
        fwd.append(statistics.median(times["F"]))
        bwd.append(statistics.median(times["B"]))
        stp.append(statistics.median(times["S"]))
        if split:
            wgt.append(statistics.median(times["W"]))
    return tuple(fwd), tuple(bwd), tuple(stp), tuple(wgt)


def measure_codecs(cfg: Config, repeats: int = 8, warmup: int = 3) -> tuple[tuple[float, float], tuple[float, float]]:
    """Median seconds of encode and decode of one message of the run's shape with each
    direction's codec: ((activation, gradient), (activation, gradient))."""
    from pipenag.link.messages import codecs, message_shape

    shape = message_shape(cfg)
    g = torch.Generator().manual_seed(0)
    enc, dec = [], []
    for codec in codecs(cfg):
        if codec is None:
            enc.append(0.0)
            dec.append(0.0)
            continue
        times_e, times_d = [], []
        for rep in range(warmup + repeats):
            x = torch.randn(shape, generator=g)
            t0 = time.perf_counter()
            packed = codec.encode(x)
            t1 = time.perf_counter()
            codec.decode(packed, shape, x.dtype)
            t2 = time.perf_counter()
            if rep >= warmup:
                times_e.append(t1 - t0)
                times_d.append(t2 - t1)
        enc.append(statistics.median(times_e))
        dec.append(statistics.median(times_d))
    return (enc[0], enc[1]), (dec[0], dec[1])


def with_message_costs(costs: StageCosts) -> tuple[list[float], list[float]]:
    """Per-stage forward and backward seconds with the codec work each pass does on its
    stage's compute thread: a forward decodes its input activation (k > 0) and encodes its
    output (k < K - 1); a backward decodes its input gradient (k < K - 1) and encodes the one
    it sends (k > 0)."""
    K = costs.num_stages
    (enc_a, enc_g), (dec_a, dec_g) = costs.encode, costs.decode
    fwd = [f + (dec_a if k > 0 else 0.0) + (enc_a if k < K - 1 else 0.0) for k, f in enumerate(costs.forward)]
    bwd = [b + (dec_g if k < K - 1 else 0.0) + (enc_g if k > 0 else 0.0) for k, b in enumerate(costs.backward)]
    return fwd, bwd


@dataclass(frozen=True)
class Prediction:
    """What predict() returns: seconds per update in the steady state and over the whole run
    (fill and drain included), the schedule's depths, and the per-direction link times."""

    steady_s_per_update: float
    run_s_per_update: float
    num_updates: int
    in_flight: tuple[int, ...]
    latency_s: float
    transfer_s: tuple[float, float]  # activations, gradients


def measure_contention(max_procs: int, seconds: float = 4.0, cfg: Optional[Config] = None) -> tuple[float, ...]:
    """Slowdown of a process's compute while n = 1..max_procs processes compute at once.

    Args:
        max_procs: the largest n (the run's K).
        seconds: how long each process computes per measurement.
        cfg: a run's config: process i runs forward, backward and step of stage i mod K of its
            pipeline on random inputs of the microbatch's shape (the stage modules, the method's
            optimizer and stashing), and its slowdown is against that stage alone. None: every
            process runs a fixed matmul workload (1024 x 128 by 128 x 512 and back, the shape of
            a width-128 block's MLP on a microbatch of 1,024 tokens).
    Returns:
        (1.0, s(2), ..., s(max_procs)): each the mean over the n processes of the median time of
        one iteration over its median alone.
    """
    import multiprocessing as mp

    cfg_dict = None if cfg is None else cfg.to_dict()
    K = 1 if cfg is None else cfg.pipeline.num_stages
    before = torch.get_num_threads()
    try:
        alone = [_contention_work(cfg_dict, k, seconds) for k in range(min(K, max_procs))]
    finally:
        torch.set_num_threads(before)
    out = [1.0]
    ctx = mp.get_context("spawn")
    for n in range(2, max_procs + 1):
        start, q = ctx.Barrier(n + 1), ctx.Queue()
        procs = [ctx.Process(target=_contention_child, args=(start, q, cfg_dict, i % K, seconds)) for i in range(n)]
        for p in procs:
            p.start()
        start.wait(timeout=120)  # releases the children together, each with its work built and warm
        results = [q.get(timeout=120 + 10 * seconds) for _ in procs]
        for p in procs:
            p.join()
        out.append(statistics.fmean(t / alone[k] for k, t in results))
    return tuple(out)


def _contention_work(cfg_dict: Optional[dict], stage_idx: int, seconds: float, start=None) -> float:
    """The median seconds of one iteration of the contention workload (see measure_contention),
    after `start()` when given (the barrier that releases the processes together)."""
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    if cfg_dict is None:
        a, w1, w2 = torch.randn(1024, 128, generator=g), torch.randn(128, 512, generator=g), torch.randn(512, 128, generator=g)

        def once() -> None:
            for _ in range(4):
                (a @ w1).relu() @ w2
    else:
        once = _stage_iteration(Config.from_dict(cfg_dict), stage_idx, g)
    for _ in range(3):  # warm-up (allocator, first-call costs)
        once()
    if start is not None:
        start()
    times, end = [], time.perf_counter() + seconds
    while time.perf_counter() < end or len(times) < 5:
        t0 = time.perf_counter()
        once()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _stage_iteration(cfg: Config, stage_idx: int, g: torch.Generator):
    """A function that runs one forward, backward and step of `cfg`'s stage `stage_idx` on
    fixed random inputs (a pipeline built the way calibrate builds it)."""
    from pipenag.build import build_pipeline
    from pipenag.plan import plan_vocab_size

    vocab = plan_vocab_size(cfg)
    train_ids = torch.randint(0, vocab, (4096,), generator=g) if cfg.model.unigram_head else None
    parts = build_pipeline(cfg, vocab, train_ids=train_ids)
    K = parts.resolved.schedule.num_stages
    runner = parts.runner(stage_idx)
    B, T, C = cfg.data.microbatch_size, cfg.model.block_size, cfg.model.n_embd
    x = torch.randint(0, vocab, (B, T), generator=g) if stage_idx == 0 else torch.randn(B, T, C, generator=g)
    y = torch.randint(0, vocab, (B, T), generator=g) if stage_idx == K - 1 else None
    grad = None if stage_idx == K - 1 else torch.randn(B, T, C, generator=g)
    count = [0]

    def once() -> None:
        j = count[0]
        runner.forward(j, x, y)
        runner.backward(j, grad)
        runner.step()
        count[0] += 1

    return once


def _contention_child(start, q, cfg_dict: Optional[dict], stage_idx: int, seconds: float) -> None:
    q.put((stage_idx, _contention_work(cfg_dict, stage_idx, seconds, lambda: start.wait(timeout=120))))


def predict(cfg: Config, costs: StageCosts, num_updates: int = 0, cores: int = 0,
            slowdown: Sequence[float] = ()) -> Prediction:
    """The event model's wall time of `cfg` with `costs`.

    Args:
        cfg: the run's config (schedule, in_flight, [link], codecs, train.steps).
        costs: calibrate(cfg) (one entry per stage).
        num_updates: updates to simulate (0: train.steps, at most 400 microbatches' worth
            beyond which the steady state is reached anyway).
        cores: cores the stage processes share (0: one each).
        slowdown: measure_contention()'s table (empty: no contention beyond `cores`).
    Returns:
        A Prediction.
    Raises:
        ValueError: costs for another number of stages.
    """
    from pipenag.link.messages import link_times, message_bytes
    from pipenag.methods import resolve

    schedule = resolve(cfg).schedule
    K, M = schedule.num_stages, schedule.num_microbatches
    if costs.num_stages != K:
        raise ValueError(f"costs for {costs.num_stages} stages, the config has {K}")
    latency, fwd_transfer = link_times(cfg, message_bytes(cfg, "activation"))
    _, bwd_transfer = link_times(cfg, message_bytes(cfg, "gradient"))
    n = num_updates or max(1, min(cfg.train.steps, max(8, 400 // M)))
    fwd, bwd = with_message_costs(costs)
    timeline = simulate_shared(schedule, n, fwd, bwd, costs.step, latency, fwd_transfer,
                               bwd_transfer, cores, slowdown, weight_time=costs.weight or None)
    steady = _steady_period(timeline, schedule, n)
    return Prediction(steady, timeline.makespan / n, n, schedule.depths if schedule.asynchronous else (),
                      latency, (fwd_transfer, bwd_transfer))


def measured_seconds_per_update(run_dir: Path | str) -> float:
    """Seconds per update of a finished run in its steady state: metrics.jsonl's time_s (the
    last stage writes one record per update) between 20% and 90% of the run.

    Raises:
        ValueError: fewer than 10 records.
    """
    from pipenag.metrics import read_metrics

    records = read_metrics(Path(run_dir))
    n = len(records)
    if n < 10:
        raise ValueError(f"{run_dir}: {n} metrics records; the steady state needs at least 10 updates")
    a, b = int(0.2 * n), int(0.9 * n) - 1
    return (records[b]["time_s"] - records[a]["time_s"]) / (b - a)


def _steady_period(timeline: Timeline, schedule: Schedule, num_updates: int) -> float:
    """Seconds between two updates of the last stage in the middle of the run (the fill and the
    drain excluded); the whole run's mean when the run is too short for that."""
    K = schedule.num_stages
    steps = sorted(e.end for e in timeline.events if e.action.stage == K - 1 and e.action.kind == "S")
    skip = max(1, (max(schedule.depths) if schedule.asynchronous else K) // schedule.num_microbatches + 1)
    first, last = skip, len(steps) - 1 - skip
    if last - first < 2:
        return timeline.makespan / num_updates
    return (steps[last] - steps[first]) / (last - first)


def simulate_shared(schedule: Schedule, num_updates: int, forward_time: float | Sequence[float] = 1.0,
                    backward_time: float | Sequence[float] = 1.0, step_time: float | Sequence[float] = 0.0,
                    latency: float = 0.0, transfer_time: float = 0.0,
                    backward_transfer_time: Optional[float] = None, cores: int = 0,
                    slowdown: Sequence[float] = (), weight_time: Optional[float | Sequence[float]] = None) -> Timeline:
    """pipenag.timing.simulate when the stages share `cores` cores (processor sharing): while n
    stages compute, each advances at min(1, cores / n) of its speed, or, with a `slowdown`
    table (measure_contention: s(1) = 1, s(2), ...), at 1 / s(n) (beyond the table:
    s(last) * n / last). cores = 0 or >= K and no table: the plain model (and the same numbers).
    weight_time: the W pass of a split backward, as timing.simulate takes it."""
    K = schedule.num_stages
    if (cores <= 0 or cores >= K) and not slowdown:
        return simulate(schedule, num_updates, forward_time, backward_time, step_time, latency, transfer_time,
                        backward_transfer_time, weight_time)
    table = list(slowdown)

    def rate(n: int) -> float:  # the speed of each of n stages that compute at once
        if not table:
            return min(1.0, cores / n)
        return 1.0 / (table[n - 1] if n <= len(table) else table[-1] * n / len(table))

    return _processor_sharing(schedule, num_updates, forward_time, backward_time, step_time, latency,
                              transfer_time, backward_transfer_time, rate, weight_time)


def _processor_sharing(schedule: Schedule, num_updates: int, forward_time, backward_time, step_time,
                       latency: float, transfer_time: float, backward_transfer_time: Optional[float],
                       rate_of, weight_time=None) -> Timeline:
    """The event loop of simulate_shared: rate_of(n) is the speed of each of n stages that
    compute at once (tests run it with rate 1 against simulate)."""
    K = schedule.num_stages
    bwd = _per_stage(backward_time, K, "backward_time")
    if weight_time is not None:
        wgt = _per_stage(weight_time, K, "weight_time")
    elif schedule.splits_backward:  # zb-h1 without W costs: the whole backward split in half (as simulate())
        bwd = wgt = [b / 2 for b in bwd]
    else:
        wgt = [0.0] * K
    duration = {"F": _per_stage(forward_time, K, "forward_time"), "B": bwd, "W": wgt,
                "S": _per_stage(step_time, K, "step_time")}
    back = transfer_time if backward_transfer_time is None else backward_transfer_time
    lists = schedule.all_actions(num_updates)
    pos, busy = [0] * K, [0.0] * K
    running: dict[int, list] = {}  # stage -> [action, remaining work, start]
    arrived: dict[tuple[int, str, int], float] = {}
    link_free: dict[tuple[int, int], float] = {}
    events: list[Event] = []
    now = 0.0

    def needs_input(k: int, a) -> bool:
        return (a.kind == "F" and k > 0) or (a.kind == "B" and k < K - 1)

    def send(src: int, dst: int, kind: str, mb: int, t: float) -> None:
        occupy = transfer_time if kind == "F" else back
        leave = max(t, link_free.get((src, dst), 0.0))
        link_free[(src, dst)] = leave + occupy
        arrived[(dst, kind, mb)] = leave + occupy + latency

    while True:
        for k in range(K):  # start every action whose stage is free and whose input is here
            while k not in running and pos[k] < len(lists[k]):
                a = lists[k][pos[k]]
                key = (k, a.kind, a.index)
                if needs_input(k, a) and not (key in arrived and arrived[key] <= now + 1e-12):
                    break
                arrived.pop(key, None)
                pos[k] += 1
                work = duration[a.kind][k]
                if work <= 0:
                    events.append(Event(a, now, now))
                    _after(k, a, now, K, send)
                    continue
                running[k] = [a, work, now]
        if not running:
            waiting = [arrived[(k, lists[k][pos[k]].kind, lists[k][pos[k]].index)] for k in range(K)
                       if pos[k] < len(lists[k]) and (k, lists[k][pos[k]].kind, lists[k][pos[k]].index) in arrived]
            if not waiting:
                if any(pos[k] < len(lists[k]) for k in range(K)):
                    stuck = [str(lists[k][pos[k]]) for k in range(K) if pos[k] < len(lists[k])]
                    raise RuntimeError(f"schedule {schedule.name} deadlocks at actions {stuck}")
                break
            now = min(waiting)
            continue
        rate = rate_of(len(running))
        finish = min(r[1] for r in running.values()) / rate
        upcoming = [t - now for t in arrived.values() if t > now + 1e-12]
        step = min([finish] + upcoming)
        now += step
        done = []
        for k, r in running.items():
            r[1] -= step * rate
            busy[k] += step * rate
            if r[1] <= 1e-12:
                done.append(k)
        for k in done:
            a, _, start = running.pop(k)
            events.append(Event(a, start, now))
            _after(k, a, now, K, send)
    makespan = max((e.end for e in events), default=0.0)
    events.sort(key=lambda e: (e.start, e.action.stage))
    # busy: work done (compute time at full speed), as simulate() counts it
    busy = [sum(duration[e.action.kind][e.action.stage] for e in events if e.action.stage == k and e.action.kind != "S")
            for k in range(K)]
    return Timeline(events, makespan, busy, [b / makespan if makespan > 0 else 0.0 for b in busy])


def _after(k: int, a, t: float, K: int, send) -> None:
    if a.kind == "F" and k < K - 1:
        send(k, k + 1, "F", a.index, t)
    elif a.kind == "B" and k > 0:
        send(k, k - 1, "B", a.index, t)
