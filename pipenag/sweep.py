"""`pipenag sweep`: methods x stages x seeds x learning rates (x any config grid), in parallel,
resumable, with the table that tells methods apart.

    pipenag sweep --config configs/bench.toml --methods gpipe,pipedream,nesterov --stages 1,4,8,16,32 \\
        --seeds 1,2,3 --lrs 3e-4,1e-3,3e-3 --tune-lr --out runs/sweep
    pipenag sweep --config configs/tiny.toml --methods gpipe,pipedream --stages 1,2 --seeds 1,2 --jobs 2

Every run is one `pipenag compare` variant (pipenag.compare.method_config: equal tokens, so
train.microbatch_budget, or the older train.steps, is the budget in microbatches; identical
initial weights and data per seed) trained with the simulator in a worker process (--jobs at a
time, default: the cores, or the GPUs with run.device=cuda). Methods may carry overrides
("gpipe:pipeline.num_microbatches=1") and a stage list of their own ("pipemare@8/32");
--grid section.key=v1,v2 adds a config axis.

- Runs go to OUT/runs/<method>/K<k>/seed<s>/lr<lr>[/<grid>]. A run whose folder holds a
  summary.json for the same config is done and skipped; any other is redone from the start,
  so a killed sweep continues where it stopped (kill the workers with it: they die with it).
- Synchronous methods (gpipe, 1f1b) compute the same numbers at every K, so they run once per
  seed (at the smallest K) and only their simulated time is recomputed per K.
- --tune-lr: each (method, K) first trains on --tune-seed (not a reported seed) at every lr of
  --lrs; the lr with the lowest final validation loss is then used for the reported seeds.
  With --tune-stages K the tuning runs at that K only and its lr serves every K of the method.
- Every asynchronous method also runs at K = 1 with the lr of each of its K (plain training
  at the microbatch batch size, no delay), for the delay penalty: loss at K - loss at K = 1.
- Run threads: run.threads (default 1 here), the same in serial and parallel sweeps, so --jobs
  never changes a number.

The table (pipenag.sweep_report) goes to OUT/summary.{md,csv,json} with the plots.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from pipenag.compare import Variant, folder_name, method_config, parse_methods
from pipenag.config import Config, add_config_arguments, config_from_args
from pipenag.methods import resolve
from pipenag.run import preflight

SYNC_SCHEDULES = ("gpipe", "1f1b", "zb-h1")  # flushing: the numbers do not depend on K


@dataclass(frozen=True)
class RunSpec:
    """One training run of the sweep."""

    variant: Variant
    stages: int
    seed: int
    lr: float
    grid: tuple[str, ...] = ()  # "section.key=value" of the --grid axes
    tuning: bool = False  # a run on the tuning seed (lr selection)

    @property
    def key(self) -> str:
        grid = "/".join(folder_name(g) for g in self.grid)
        return f"{folder_name(self.variant.label)}/K{self.stages}/seed{self.seed}/lr{self.lr:g}" + (
            f"/{grid}" if grid else "")

    def describe(self) -> str:
        extra = f" {' '.join(self.grid)}" if self.grid else ""
        return f"{self.variant.label} K={self.stages} seed {self.seed} lr {self.lr:g}{extra}"


@dataclass
class Sweep:
    """What to run: the parsed command line."""

    cfg: Config
    variants: list[Variant]
    stages: dict[str, list[int]]  # variant label -> its K values
    seeds: list[int]
    lrs: list[float]
    grid: list[tuple[str, ...]] = field(default_factory=lambda: [()])
    tune_lr: bool = False
    tune_seed: int = 0
    tune_stages: int = 0  # > 0: tune each method's lr at this K only and use it at every K
    out: Path = Path("runs/sweep")
    sync: dict[str, bool] = field(default_factory=dict)  # variant label -> synchronous schedule
    k1_controls: bool = True  # run every asynchronous variant's K = 1 control
    wallclock: bool = False  # report the wall-clock model's columns (pipenag.wallclock)

    def is_sync(self, variant: Variant) -> bool:
        """Whether the variant's schedule flushes (its numbers do not depend on K)."""
        if variant.label not in self.sync:
            cfg = self.run_config(RunSpec(variant, max(self.stages[variant.label]), self.seeds[0], self.lrs[0]))
            self.sync[variant.label] = resolve(cfg).schedule.name in SYNC_SCHEDULES
        return self.sync[variant.label]

    def run_config(self, spec: RunSpec) -> Config:
        """The config of one run: the variant at the comparison's budget, with its K, seed, lr."""
        base = self.cfg.with_overrides([f"--pipeline.num_stages={spec.stages}", f"--train.seed={spec.seed}",
                                        f"--optim.lr={spec.lr!r}", *(f"--{g}" for g in spec.grid)])
        cfg, _ = method_config(base, spec.variant, self.out / "runs")
        cfg.run.out_dir = str(self.out / "runs" / spec.key)
        cfg.run.progress = False
        return cfg


def parse_stage_lists(methods: str, stages: list[int]) -> tuple[str, dict[str, list[int]]]:
    """Split "a,b@8/32" into ("a,b", {"b": [8, 32]}): per-method stage lists."""
    plain, own = [], {}
    for spec in [s.strip() for s in methods.split(",") if s.strip()]:
        name, at, ks = spec.partition("@")
        if at:
            try:
                own[name] = sorted({int(k) for k in ks.split("/")})
            except ValueError:
                raise ValueError(f"--methods: {spec!r}: expected METHOD@K1/K2/...") from None
        plain.append(name)
    return ",".join(plain), own


def parse_list(text: str, cast, name: str) -> list:
    try:
        values = [cast(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected a comma-separated list") from None
    if not values:
        raise ValueError(f"{name}={text!r}: give at least one value")
    return values


LIST_KEYS = ("pipeline.in_flight",)  # grid keys whose values are lists: always separated by ";"


def parse_grid(items: list[str]) -> list[tuple[str, ...]]:
    """["optim.momentum=0.9,0.99", "model.n_embd=32,64"] -> the cross product of overrides.
    Values that hold commas themselves are separated by ";" instead (always for
    pipeline.in_flight): "pipeline.in_flight=8,6,4,1;16,11,6,1;auto"."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or key.count(".") != 1 or not values:
            raise ValueError(f"--grid {item!r}: expected section.key=v1,v2,... (or v1;v2;... for list values)")
        sep = ";" if ";" in values or key in LIST_KEYS else ","
        axes.append([f"{key}={v}" for v in values.split(sep)])
    product: list[tuple[str, ...]] = [()]
    for axis in axes:
        product = [p + (v,) for p in product for v in axis]
    return product


# -- planning -------------------------------------------------------------------------------------


def tuning_runs(sweep: Sweep) -> list[RunSpec]:
    if not sweep.tune_lr:
        return []
    return [RunSpec(v, k, sweep.tune_seed, lr, g, tuning=True)
            for v in sweep.variants for k in sorted({_tuned_at(sweep, v, k) for k in _run_stages(sweep, v)})
            for g in sweep.grid for lr in sweep.lrs]


def _tuned_at(sweep: Sweep, variant: Variant, k: int) -> int:
    """The K whose tuning runs choose the lr of (variant, k): k itself, or --tune-stages."""
    return sweep.tune_stages if sweep.tune_stages and not sweep.is_sync(variant) else k


def _run_stages(sweep: Sweep, variant: Variant) -> list[int]:
    """The K values a variant trains at: all of its stage list, or the smallest for a
    synchronous method (its numbers do not depend on K)."""
    ks = sweep.stages[variant.label]
    return [min(ks)] if sweep.is_sync(variant) else ks


def chosen_lrs(sweep: Sweep, done: dict[str, dict]) -> dict[tuple, float]:
    """(variant label, K, grid) -> the lr its reported seeds use: the tuning run with the
    lowest final validation loss (a diverged run counts as infinitely bad), or the only lr."""
    chosen = {}
    for v in sweep.variants:
        for k in _run_stages(sweep, v):
            for g in sweep.grid:
                if not sweep.tune_lr:
                    for lr in sweep.lrs:
                        chosen.setdefault((v.label, k, g), lr)
                    continue
                scores = []
                for lr in sweep.lrs:
                    s = done.get(RunSpec(v, _tuned_at(sweep, v, k), sweep.tune_seed, lr, g, tuning=True).key)
                    loss = s.get("val_loss") if s else None
                    scores.append((loss if loss is not None and math.isfinite(loss) else math.inf, lr))
                chosen[(v.label, k, g)] = min(scores)[1]
    return chosen


def reported_runs(sweep: Sweep, chosen: dict[tuple, float]) -> list[RunSpec]:
    """The reported seeds at the chosen lrs (every lr without --tune-lr), and the K = 1 control
    of every asynchronous method at the lr of each of its K."""
    runs: dict[str, RunSpec] = {}
    for v in sweep.variants:
        for k in _run_stages(sweep, v):
            for g in sweep.grid:
                lrs = [chosen[(v.label, k, g)]] if sweep.tune_lr else sweep.lrs
                for lr in lrs:
                    for seed in sweep.seeds:
                        for kk in ([k] if sweep.is_sync(v) or k == 1 or not sweep.k1_controls else [k, 1]):
                            spec = RunSpec(v, kk, seed, lr, g)
                            runs.setdefault(spec.key, spec)
    return list(runs.values())


# -- running --------------------------------------------------------------------------------------


def is_done(cfg: Config) -> Optional[dict]:
    """The summary of a finished run with exactly this config, else None."""
    out = Path(cfg.run.out_dir)
    try:
        saved = json.loads((out / "config.json").read_text())
        summary = json.loads((out / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if saved == cfg.to_dict() else None


def _worker_init(parent: int, devices: Optional["multiprocessing.Queue"]) -> None:
    from pipenag.procs import die_with_parent

    die_with_parent(parent)
    if devices is not None:  # one GPU per worker process
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())


def _train_one(cfg_dict: dict) -> dict:
    """Train one run in a worker process; returns its summary."""
    from pipenag.train import train_sim

    return train_sim(Config.from_dict(cfg_dict))


def run_all(specs: list[RunSpec], sweep: Sweep, jobs: int, done: dict[str, dict], label: str) -> None:
    """Train every spec not yet done (longest first), `jobs` at a time; fills `done`."""
    todo = []
    for spec in specs:
        cfg = sweep.run_config(spec)
        summary = is_done(cfg)
        if summary is not None:
            done[spec.key] = summary
        elif spec.key not in done:
            todo.append((spec, cfg))
    skipped = len(specs) - len(todo)
    _say(f"{label}: {len(specs)} runs, {skipped} already done, {len(todo)} to train with {jobs} job(s)")
    if not todo:
        return
    # Longest first (more stages, then more updates), so that the last job to finish is short.
    todo.sort(key=lambda sc: (-sc[1].pipeline.num_stages, -sc[1].train.steps))
    for _, cfg in todo:  # a run killed half-way restarts from scratch
        shutil.rmtree(cfg.run.out_dir, ignore_errors=True)
    t0 = time.perf_counter()
    if jobs == 1:
        for i, (spec, cfg) in enumerate(todo, 1):
            t = time.perf_counter()
            done[spec.key] = _train_one(cfg.to_dict())
            _report(i, len(todo), spec, done[spec.key], time.perf_counter() - t)
        return
    devices = None
    if sweep.cfg.run.device == "cuda":
        devices = multiprocessing.get_context("spawn").Queue()
        for d in range(jobs):
            devices.put(d)
    ctx = multiprocessing.get_context("spawn")  # never fork a process that may hold torch threads
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_worker_init,
                             initargs=(os.getpid(), devices)) as pool:
        pending: dict[Future, tuple[RunSpec, float]] = {}
        queue = list(todo)
        finished = 0
        while queue or pending:
            while queue and len(pending) < jobs:
                spec, cfg = queue.pop(0)
                pending[pool.submit(_train_one, cfg.to_dict())] = (spec, time.perf_counter())
            ready, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in ready:
                spec, started = pending.pop(fut)
                done[spec.key] = fut.result()
                finished += 1
                _report(finished, len(todo), spec, done[spec.key], time.perf_counter() - started)
    _say(f"{label}: done in {time.perf_counter() - t0:.0f} s")


def _report(i: int, n: int, spec: RunSpec, summary: dict, seconds: float) -> None:
    val = summary.get("val_loss")
    val_text = f"{val:.4f}" if val is not None else "n/a"
    _say(f"[{i}/{n}] {spec.describe()}: {summary['status']}, val {val_text}, {seconds:.0f} s")


def _say(text: str) -> None:
    print(f"pipenag sweep: {text}", file=sys.stderr, flush=True)


# -- the command ----------------------------------------------------------------------------------


def build_sweep(args: argparse.Namespace, cfg: Config) -> Sweep:
    """The Sweep of a parsed command line; every run config is checked before any training.

    Raises:
        ValueError: a bad method, stage, seed, lr or grid value, or a run config that fails.
    """
    stages = parse_list(args.stages_list, int, "--stages")
    methods, own = parse_stage_lists(args.methods, stages)
    variants = parse_methods(methods)
    seeds = parse_list(args.seeds, int, "--seeds")
    lrs = parse_list(args.lrs, float, "--lrs") if args.lrs else [cfg.optim.lr]
    if args.tune_lr and args.tune_seed in seeds:
        raise ValueError(f"--tune-seed={args.tune_seed} is also a reported seed (--seeds={args.seeds}); "
                         "tune on a seed that is not reported")
    if args.tune_lr and len(lrs) < 2:
        raise ValueError(f"--tune-lr needs at least two learning rates in --lrs (got {lrs})")
    if cfg.run.threads == 0:  # the same threads whatever --jobs, so --jobs changes no number
        cfg = cfg.with_overrides(["--run.threads=1"])
    sweep = Sweep(cfg, variants, {v.label: own.get(v.label, stages) for v in variants}, seeds,
                  lrs, parse_grid(args.grid or []), args.tune_lr, args.tune_seed, tune_stages=args.tune_stages,
                  out=Path(args.out), k1_controls=not args.no_k1_controls, wallclock=args.wallclock)
    for v in variants:
        for k in sweep.stages[v.label] + ([args.tune_stages] if args.tune_stages else []):
            for g in sweep.grid:
                preflight(sweep.run_config(RunSpec(v, k, seeds[0], lrs[0], g)))  # raises on anything impossible
    return sweep


def default_jobs(cfg: Config) -> int:
    if cfg.run.device == "cuda":
        import torch

        return max(1, torch.cuda.device_count())
    return os.cpu_count() or 1


# `train`'s shortcuts that mean something else in a sweep, and what to write instead. (--method,
# --seed and --stage are argparse abbreviations of --methods, --seeds and --stages, and work.)
TRAIN_SHORTCUTS = {
    "--steps": "a sweep compares methods at equal tokens: give its budget in microbatches, "
               "--train.microbatch_budget=N (the same key means the same run in train and compare)",
    "--engine": "a sweep trains every run with the simulator (train.engine = \"sim\"); the runtime "
                "gives the same numbers (docs/dist.md)",
}


def refuse_train_shortcuts(rest: list[str]) -> None:
    """A ValueError naming a `train` shortcut that `sweep` does not take, with what to write."""
    for arg in rest:
        flag = arg.split("=", 1)[0]
        if flag in TRAIN_SHORTCUTS:
            raise ValueError(f"{flag} is a shortcut of `pipenag train`, not of sweep: {TRAIN_SHORTCUTS[flag]}")


def sweep_main(argv: list[str]) -> int:
    """Entry point of `pipenag sweep`; returns the exit status."""
    from pipenag.sweep_report import report_from_data, write_report

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if args.report_from:
        out = Path(args.out or "runs/sweep")
        folders = [Path(f) for f in args.report_from.split(",") if f]
        missing = [str(f) for f in folders if not (f / "runs.csv").is_file()]
        if missing or not folders:
            print(f"pipenag sweep: error: --report-from {args.report_from!r}: no runs.csv in {', '.join(missing)}",
                  file=sys.stderr)
            return 2
        report_from_data(folders, out, args.target)
        print((out / "summary.md").read_text())
        return 0
    if not args.methods:
        parser.error("--methods is required (unless --report-from)")
    try:
        refuse_train_shortcuts(rest)
        cfg = config_from_args(args, rest)
        args.out = args.out or "runs/sweep"
        sweep = build_sweep(args, cfg)
        from pipenag.compare import legacy_budget_note

        legacy_budget_note("sweep", cfg)
        jobs = args.jobs or default_jobs(cfg)
        if jobs < 1:
            raise ValueError(f"--jobs={jobs}: must be >= 1")
    except ValueError as e:
        print(f"pipenag sweep: error: {e}", file=sys.stderr)
        return 2
    sweep.out.mkdir(parents=True, exist_ok=True)
    done: dict[str, dict] = {}
    train = _load_done if args.report_only else lambda specs, sw, d, label: run_all(specs, sw, jobs, d, label)
    train(tuning_runs(sweep), sweep, done, "lr tuning")
    chosen = chosen_lrs(sweep, done)
    reported = reported_runs(sweep, chosen)
    train(reported, sweep, done, "reported runs")
    write_report(sweep, tuning_runs(sweep) + reported, chosen, done, target=args.target)
    print((sweep.out / "summary.md").read_text())
    return 0


def _load_done(specs: list[RunSpec], sweep: Sweep, done: dict[str, dict], label: str) -> None:
    """--report-only: the finished runs among `specs` into `done`; the rest are left out."""
    for spec in specs:
        summary = is_done(sweep.run_config(spec))
        if summary is not None:
            done[spec.key] = summary
    missing = sum(spec.key not in done for spec in specs)
    _say(f"{label}: {len(specs) - missing} of {len(specs)} runs finished" + (
        f" ({missing} not run: left out of the table)" if missing else ""))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipenag sweep", description=__doc__.split("\n\n")[0],
                                     epilog="Other arguments are --section.key=value config overrides.")
    add_config_arguments(parser, skip=("method", "stages", "seed", "steps", "engine"))
    parser.add_argument("--methods",
                        help="comma-separated methods, each optionally with :section.key=value overrides and "
                             "@K1/K2 stage lists, e.g. gpipe,gpipe:pipeline.num_microbatches=1,pipemare@8/32")
    parser.add_argument("--stages", dest="stages_list", default="1,4,8",
                        help="comma-separated pipeline stage counts K (default 1,4,8)")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated reported seeds (default 1,2,3)")
    parser.add_argument("--lrs", help="comma-separated peak learning rates (default: optim.lr)")
    parser.add_argument("--tune-lr", action="store_true",
                        help="pick each (method, K)'s lr from --lrs on --tune-seed, then report --seeds at it")
    parser.add_argument("--tune-seed", type=int, default=0, help="the lr-tuning seed (default 0)")
    parser.add_argument("--tune-stages", type=int, default=0, metavar="K",
                        help="tune each method's lr at this K only and use it at every K (one lr per method, "
                             "so the K = 1 control has the lr of every K); default: tune every (method, K)")
    parser.add_argument("--wallclock", action="store_true",
                        help="also report the wall-clock model's seconds per update of every run (its [link], "
                             "codecs and in_flight; stage costs calibrated on this machine, cached) and the wall "
                             "time to target")
    parser.add_argument("--no-k1-controls", action="store_true",
                        help="skip the K = 1 control runs of the asynchronous methods (when another sweep has "
                             "them, or when a variant is its base method at K = 1, as link compression is: "
                             "one stage sends nothing)")
    parser.add_argument("--grid", action="append", metavar="SECTION.KEY=V1,V2",
                        help="a config axis to sweep (repeatable); separate values by ';' when they hold "
                             "commas, e.g. 'pipeline.in_flight=8,6,4,1;16,11,6,1;auto'")
    parser.add_argument("--target", type=float,
                        help="target validation loss for tokens/time-to-target (default: the mean final "
                             "loss of gpipe)")
    parser.add_argument("--jobs", type=int, default=0,
                        help="runs in parallel (default: the CPU cores; with run.device=cuda the GPUs)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: tables from finished runs")
    parser.add_argument("--report-from", metavar="DIR[,DIR...]",
                        help="train nothing: the tables and plots of the data files (runs.csv, curves.csv) in DIR "
                             "(several sweeps' together when comma-separated)")
    return parser
