"""Simulator overhead: time per update and extra memory against plain single-process training.

    pipenag bench simulator --methods nesterov,gpipe --stages 8 --json runs/bench_simulator.json
    pipenag bench simulator --config configs/small.toml --no-rss

The model, the microbatch, the stages and the optimizer settings come from the config (--config,
--stages, --section.key=value as for `pipenag train`); random tokens of model.vocab_size (256
when 0) stand in for data.

For each method it builds the pipeline exactly as `pipenag train` does (build_pipeline: the GPT
split into K stages, one optimizer per stage, the method's learning rates) and runs it in the
Simulator; the baseline is the same GPT unsplit (same seed, hence the same initial weights),
the same optimizer over all its parameters, the same microbatches and the same number of
microbatches per update (gradient accumulation for gpipe's M=4), with a global grad-norm clip.
Both run in this process on the same random token batches.

Time: a few untimed warm-up updates each, then timed rounds; every round runs one update of
each contender back to back in rotating order, so that drifts of a shared machine hit all
alike. Reported: the median time per update and the median over rounds of the per-round
ratio sim/plain.

Memory: tracemalloc does not see torch's CPU tensors, and ru_maxrss survives fork and exec
(a child reports its parent's peak), so three other numbers are given.
- stash: the bytes of the weight versions the StageRunners hold as snapshots (their peak over
  the timed updates), next to the minimum any stashing scheme needs, sum_k (versions_kept(k)-1)
  x (bytes of stage k): the live weights are one version, the others must be copies.
- RSS: each contender also runs alone in a fresh child process (`--child`), K+2 updates so
  that every stage holds all the versions it will ever hold; the child reports its peak
  resident set (VmHWM) minus its resident set after the imports. glibc is told to mmap every
  block above 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the resident set.
  The difference sim - plain is the extra memory of the simulator at its peak (weights,
  gradients, optimizer state and activations are the same size in both).
- live (--timeline, slow): the same children under torch.profiler(profile_memory=True) from
  before the model is built; the peak of the live tensor bytes (export_memory_timeline), free
  of allocator effects.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable

import torch

from pipenag.bench import bench_config, bench_parser, machine_info, machine_line
from pipenag.build import PipelineParts, build_pipeline, stage_optimizer
from pipenag.config import Config
from pipenag.model import GPT, lm_loss
from pipenag.run import preflight

MB = 1024 * 1024


def proc_status_kb(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status in kB (Linux), or -1."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return -1


def method_config(cfg: Config, method: str, args: argparse.Namespace) -> Config:
    """The run config of one contender: the method, and as many updates as the bench makes."""
    return cfg.with_overrides([f"--pipeline.method={method}", f"--train.steps={args.warmup + args.updates}"])


def vocab_size(cfg: Config) -> int:
    return cfg.model.vocab_size or 256


def pipeline_parts(cfg: Config, method: str, args: argparse.Namespace) -> PipelineParts:
    # The random tokens stand in for the training data (model.unigram_head reads them).
    ids = torch.cat([x.reshape(-1) for x, _ in batches(cfg, 4)])
    return build_pipeline(method_config(cfg, method, args), vocab_size=vocab_size(cfg), train_ids=ids)


def batches(cfg: Config, count: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`count` random (x, y) microbatches of shape (microbatch_size, block_size)."""
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    B, T = cfg.data.microbatch_size, cfg.model.block_size
    out = []
    for _ in range(count):
        ids = torch.randint(vocab_size(cfg), (B, T + 1), generator=gen)
        out.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    return out


class Plain:
    """The unsplit GPT with the method's optimizer: the baseline one update of which is
    M x (forward, backward of loss / M), clip, set lr, step, zero_grad."""

    def __init__(self, parts: PipelineParts, seed: int):
        torch.manual_seed(seed)  # as build_stages does: the same initial weights
        self.model = GPT(parts.model_cfg)
        self.params = list(self.model.parameters())
        self.optimizer = stage_optimizer(parts.cfg.optim, parts.resolved.optimizer, self.model, 0, 1)
        self.lr_fn = parts.lr_fns[-1]  # the last stage has no delay: the plain schedule
        self.grad_clip = parts.cfg.optim.grad_clip
        self.num_microbatches = parts.resolved.schedule.num_microbatches
        self.num_updates = 0

    def step(self, microbatches) -> float:
        M = len(microbatches)
        total = 0.0
        for x, y in microbatches:
            loss = lm_loss(self.model(x), y)
            total += float(loss.detach())
            (loss / M).backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.num_updates += 1
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr_fn(self.num_updates)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total / M


def snapshot_bytes(sim) -> int:
    return sum(t.numel() * t.element_size() for r in sim.runners for ts in r.snapshots.values() for t in ts)


def minimal_stash_bytes(sim) -> int:
    total = 0
    for r in sim.runners:
        stage = sum(p.numel() * p.element_size() for p in r.params)
        total += (r.schedule.versions_kept(r.stage_idx) - 1) * stage
    return total


def contenders(cfg: Config, args: argparse.Namespace, method: str, which: tuple[str, ...] = ("sim", "plain")):
    """name -> (step function over an update's microbatches, the object), plus the parts."""
    parts = pipeline_parts(cfg, method, args)
    out = {}
    if "sim" in which:
        sim = parts.simulator()
        out["sim"] = (sim.step, sim)
    if "plain" in which:
        plain = Plain(parts, cfg.train.seed)
        out["plain"] = (plain.step, plain)
    if "sim" not in which:
        # A plain run alone (the memory child) must not keep the pipeline's copy of the model.
        parts.stages.clear()
        parts.optimizers.clear()
    return out, parts


def time_method(cfg: Config, args: argparse.Namespace, method: str) -> dict:
    runs, parts = contenders(cfg, args, method)
    M = parts.resolved.schedule.num_microbatches
    pool = batches(cfg, 8 * M)
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    first_loss: dict[str, float] = {}
    peak_snap = 0
    for r in range(args.warmup + args.updates):
        update = [pool[(r * M + i) % len(pool)] for i in range(M)]
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            step: Callable = runs[name][0]
            t0 = time.perf_counter()
            loss = step(update)
            dt = time.perf_counter() - t0
            if r == 0:
                first_loss[name] = loss
            if r >= args.warmup:
                times[name].append(dt)
        peak_snap = max(peak_snap, snapshot_bytes(runs["sim"][1]))
    sim = runs["sim"][1]
    return {
        "method": method,
        "describe": parts.describe(),
        "num_microbatches": M,
        "median_s": {n: statistics.median(ts) for n, ts in times.items()},
        "times_s": times,
        "paired_ratio": statistics.median(s / p for s, p in zip(times["sim"], times["plain"])),
        "first_loss": first_loss,
        "param_bytes": sum(p.numel() * p.element_size() for r in sim.runners for p in r.params),
        "snapshot_bytes_peak": peak_snap,
        "minimal_stash_bytes": minimal_stash_bytes(sim),
    }


def child_main(cfg: Config, args: argparse.Namespace) -> int:
    """Run one contender alone and print its memory as JSON (for the parent's memory numbers).

    `--child METHOD:WHICH` reports the resident set; `--child METHOD:WHICH:timeline` instead
    records every tensor allocation and free with torch.profiler (profile_memory) from before
    the model is built, and reports the peak of the live tensor bytes by category.
    """
    method, which, *mode = args.child.split(":")
    timeline = mode == ["timeline"]
    rss0 = proc_status_kb("VmRSS")
    prof = None
    if timeline:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                       with_stack=True)
        prof.__enter__()
    runs, parts = contenders(cfg, args, method, (which,))
    step = runs[which][0]
    M = parts.resolved.schedule.num_microbatches
    pool = batches(cfg, 8 * M)
    # Enough updates for every stage to hold all the versions it ever holds (K - 1 updates).
    for r in range(max(parts.resolved.schedule.num_stages + 2, 4)):
        step([pool[(r * M + i) % len(pool)] for i in range(M)])
    out = {"rss_start_kb": rss0, "hwm_kb": proc_status_kb("VmHWM")}
    if prof is not None:
        prof.__exit__(None, None, None)
        path = f"{args.child_tmp}/timeline-{method}-{which}.json"
        prof.export_memory_timeline(path, device="cpu")
        with open(path) as f:
            _, sizes = json.load(f)
        totals = [sum(row) for row in sizes]
        peak = max(range(len(totals)), key=totals.__getitem__)
        out = {"peak_live_bytes": totals[peak],
               "at_peak": dict(zip(TIMELINE_CATEGORIES, sizes[peak][1:]))}
    print(json.dumps(out))
    return 0


# Columns of torch.profiler's memory timeline after the leading 0 (its _CATEGORY_TO_INDEX order).
TIMELINE_CATEGORIES = ("parameter", "optimizer_state", "input", "temporary", "activation", "gradient",
                       "autograd_detail", "unknown")


def child_memory(argv: list[str], method: str, which: str, tmp: str, timeline: bool = False) -> dict:
    cmd = [sys.executable, "-m", "pipenag", "bench", "simulator", *argv, "--child-tmp", tmp,
           "--child", f"{method}:{which}" + (":timeline" if timeline else "")]
    # Every allocation above 64 KiB gets its own mmap, returned to the system when freed (glibc
    # otherwise raises this threshold as it goes and keeps freed blocks resident), so that the
    # peak resident set follows the peak of the live tensors more closely.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"child {' '.join(cmd)} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> int:
    parser = bench_parser("pipenag bench simulator", __doc__)
    parser.add_argument("--methods", default="nesterov,gpipe", help="comma-separated method names")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    parser.add_argument("--updates", type=int, default=15, help="timed updates (median)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    parser.add_argument("--no-rss", action="store_true", help="skip the child-process RSS runs")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--timeline", action="store_true",
                        help="also measure the peak live tensor bytes with torch.profiler (slow)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-tmp", help=argparse.SUPPRESS)
    args, cfg = bench_config(parser, argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        if args.updates < 1 or args.warmup < 0:
            raise ValueError(f"need --updates >= 1 and --warmup >= 0, got {args.updates} and {args.warmup}")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for method in methods:  # a bad method or model fails here, before any timing
            preflight(method_config(cfg, method, args))
    except ValueError as e:
        print(f"pipenag bench simulator: error: {e}", file=sys.stderr)
        return 2
    if args.child:
        return child_main(cfg, args)

    machine = machine_info()
    print(machine_line(machine))
    m = cfg.model
    print(f"GPT n_layer {m.n_layer}, n_embd {m.n_embd}, n_head {m.n_head}, block {m.block_size}, "
          f"vocab {vocab_size(cfg)}; microbatch {cfg.data.microbatch_size}; K={cfg.pipeline.num_stages}; "
          f"{args.warmup} warm-up + {args.updates} timed updates", flush=True)
    child_argv = [a for a in argv if a not in ("--no-rss", "--timeline")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            res = time_method(cfg, args, method)
            print(f"  {res['describe']}", flush=True)
            if not args.no_rss:
                mem = {w: child_memory(child_argv, method, w, tmp) for w in ("plain", "sim")}
                res["rss"] = mem
                res["rss_extra_bytes"] = 1024 * ((mem["sim"]["hwm_kb"] - mem["sim"]["rss_start_kb"])
                                                 - (mem["plain"]["hwm_kb"] - mem["plain"]["rss_start_kb"]))
            if args.timeline:
                mem = {w: child_memory(child_argv, method, w, tmp, timeline=True) for w in ("plain", "sim")}
                res["timeline"] = mem
                res["live_extra_bytes"] = mem["sim"]["peak_live_bytes"] - mem["plain"]["peak_live_bytes"]
            results.append(res)

    header = (f"{'method':<14} {'M':>2} {'sim ms':>9} {'plain ms':>9} {'sim/plain':>10} {'paired':>8} "
              f"{'stash MB':>9} {'min MB':>7} {'RSS extra MB':>13} {'live extra MB':>14} {'params MB':>10}")
    print(header)
    print("-" * len(header))
    for res in results:
        med = res["median_s"]
        rss = f"{res['rss_extra_bytes'] / MB:.1f}" if "rss_extra_bytes" in res else "-"
        live = f"{res['live_extra_bytes'] / MB:.1f}" if "live_extra_bytes" in res else "-"
        print(f"{res['method']:<14} {res['num_microbatches']:>2} "
              f"{med['sim'] * 1e3:>9.1f} {med['plain'] * 1e3:>9.1f} "
              f"{med['sim'] / med['plain']:>9.3f}x {res['paired_ratio']:>7.3f}x "
              f"{res['snapshot_bytes_peak'] / MB:>9.1f} {res['minimal_stash_bytes'] / MB:>7.1f} {rss:>13} "
              f"{live:>14} {res['param_bytes'] / MB:>10.1f}")
    print("sim/plain = median/median; paired = median of per-round ratios; stash = weight snapshots the "
          "StageRunners hold (peak); min = the versions stashing needs; RSS extra = peak RSS over start "
          "of the sim alone minus that of the plain run alone (child processes); live extra = the same "
          "for the peak live tensor bytes (torch.profiler memory timeline, --timeline)")
    for res in results:
        fl = res["first_loss"]
        print(f"check {res['method']}: first-update loss sim {fl['sim']:.6f} plain {fl['plain']:.6f}")
        for key in ("rss", "timeline"):
            if key in res:
                print(f"  {key}: {json.dumps(res[key])}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "config": cfg.to_dict(), "results": results}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
