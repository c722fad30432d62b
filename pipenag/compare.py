"""`pipenag compare`: train several methods on identical data and weights, at equal tokens.

    pipenag compare --methods nesterov,pipedream,gpipe --config configs/small.toml --train.microbatch_budget=1500 \
        --out runs/cmp

Every method starts from the same initial weights (build_stages seeds the whole model from
train.seed) and reads the same microbatches in the same order (the training stream is keyed
by microbatch index). The budget is counted in microbatches: `train.microbatch_budget` is the
number of updates a one-microbatch-per-update method (pipedream and its variants) makes, and a
method with M microbatches per update (gpipe and 1f1b: M = 4, 2bw: M = max(4, K)) makes
budget // M updates. Evaluation and log intervals are divided by M too, so that every method is
evaluated at the same token counts. `pipenag train` reads the budget the same way
(apply_microbatch_budget), so a run of a comparison is `pipenag train` with the same line. The
older spelling, train.steps as the budget here (and as updates in train), is still read, with
a note.

A method name may carry overrides for that run only, joined by ':', so that one comparison
can hold variants of a method:

    pipenag compare --methods nesterov,nesterov:optim.momentum_decay=0.26,pipedream --out runs/md

Each run goes to DIR/<label>/ (train_sim's config.json, metrics.jsonl, summary.json); then
DIR/summary.md, DIR/summary.csv (one row per method), DIR/summary.json (rows and curves) and
DIR/loss.png (validation loss against tokens and against simulated pipeline time).

Simulated pipeline time (the time the schedule would take on K devices, not the time this
single process took): pipenag.timing.simulate on the method's schedule with per-stage costs
from `stage_forward_costs` -- FLOPs per token of the stage's blocks (24 C^2 + 4 T C each) and,
on the last stage, the LM head (2 C V), in units of one block's forward on one microbatch;
backward = 2 x forward (two matmuls per forward matmul), optimizer step, transfers and latency
= 0. The time of update u is the moment the last stage finishes its step u.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from pipenag.config import Config, ModelConfig
from pipenag.methods import METHODS, resolve
from pipenag.metrics import read_metrics
from pipenag.schedules import Schedule
from pipenag.split import partition_layers

BACKWARD_FACTOR = 2.0
"""Backward time / forward time of a stage in the simulated time axis."""

CSV_FIELDS = ["method", "status", "val_loss", "val_ppl", "updates", "microbatches_per_update", "tokens",
              "wall_time_s", "sim_time", "val_loss_at_equal_time"]


@dataclass(frozen=True)
class Variant:
    """One entry of --methods: a method name, its overrides, and the folder label."""

    label: str
    method: str
    overrides: tuple[str, ...]  # "section.key=value"


def parse_methods(text: str) -> list[Variant]:
    """Split "a,b:optim.lr=1e-3,c" into variants; check every name before anything runs.

    Raises:
        ValueError: an empty list, an unknown method (the message lists the valid ones), a
            malformed override, or the same label twice.
    """
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if not specs:
        raise ValueError(f"--methods={text!r}: give at least one method; valid methods: {', '.join(METHODS)}")
    variants, seen = [], set()
    for spec in specs:
        name, *overrides = spec.split(":")
        if name not in METHODS:
            raise ValueError(f"--methods: unknown method {name!r}; valid methods: {', '.join(METHODS)}")
        for o in overrides:
            key = o.split("=", 1)[0]
            if "=" not in o or key.count(".") != 1:
                raise ValueError(f"--methods: override {o!r} of {name!r}: expected section.key=value")
        if spec in seen:
            raise ValueError(f"--methods: {spec!r} is listed twice")
        seen.add(spec)
        variants.append(Variant(spec, name, tuple(overrides)))
    return variants


def folder_name(label: str) -> str:
    """A file-system-safe folder name for a label ("nesterov:optim.lr=1e-3" -> "nesterov_optim.lr-1e-3")."""
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", label.replace("=", "-"))


def method_config(cfg: Config, variant: Variant, out_dir: Path) -> tuple[Config, int]:
    """The run config of one variant at the comparison's token budget.

    Returns:
        (config, M): train.steps is budget // M updates, the eval/log/checkpoint intervals are
        divided by M, run.out_dir is out_dir / folder_name(label).
    Raises:
        ValueError: a bad override, a budget smaller than M, or anything resolve() rejects.
    """
    probe = cfg.with_overrides([f"--pipeline.method={variant.method}", *(f"--{o}" for o in variant.overrides),
                                f"--train.microbatch_budget={budget_of(cfg)}",
                                f"--run.out_dir={out_dir / folder_name(variant.label)}"])
    run_cfg = apply_microbatch_budget(probe, label=variant.label)
    return run_cfg, resolve(run_cfg).schedule.num_microbatches


def budget_of(cfg: Config) -> int:
    """A comparison's budget in microbatches: train.microbatch_budget, or (the older spelling,
    still read by compare and sweep) train.steps."""
    return cfg.train.microbatch_budget or cfg.train.steps


def legacy_budget_note(command: str, cfg: Config) -> None:
    """Say so when a comparison reads train.steps as its budget (the older spelling)."""
    if not cfg.train.microbatch_budget:
        print(f"pipenag {command}: reading train.steps={cfg.train.steps} as a budget of {cfg.train.steps} "
              f"microbatches; `pipenag train` reads train.steps as updates. Give the budget as "
              f"--train.microbatch_budget={cfg.train.steps}: it means the same in train, compare and sweep.")


def apply_microbatch_budget(cfg: Config, label: str = "") -> Config:
    """`cfg` with train.microbatch_budget turned into updates: train.steps = budget // M and
    the eval/log/checkpoint intervals divided by M (at least 1), the budget then 0 (spent, so
    that applying this twice changes nothing). Without a budget, `cfg` itself.

    Raises:
        ValueError: a budget smaller than M, or anything resolve() rejects.
    """
    budget = cfg.train.microbatch_budget
    if not budget:
        return cfg
    tree = cfg.to_dict()
    M = resolve(cfg).schedule.num_microbatches
    if budget < M:
        raise ValueError(f"train.microbatch_budget={budget}: method {label or cfg.pipeline.method!r} takes {M} "
                         f"microbatches per update, so the budget must be at least {M}")
    t = tree["train"]
    t["steps"], t["microbatch_budget"] = budget // M, 0
    for key in ("eval_every", "log_every", "checkpoint_every"):
        if t[key]:
            t[key] = max(1, t[key] // M)
    run_cfg = Config.from_dict(tree)
    resolve(run_cfg)
    return run_cfg


def stage_forward_costs(model: ModelConfig, num_stages: int, vocab_size: int) -> list[float]:
    """Forward time of each stage, in units of one transformer block's forward (same microbatch).

    FLOPs per token: a block 24 C^2 (the qkv, proj and two MLP matmuls, 2 FLOPs per weight) +
    4 T C (attention scores and their weighted sum); the LM head 2 C V on the last stage; the
    embedding lookup and layer norms are taken as free.
    """
    C, T = model.n_embd, model.block_size
    block = 24 * C * C + 4 * T * C
    head = 2 * C * vocab_size / block
    ranges = partition_layers(model.n_layer, num_stages)
    return [(end - start) + (head if k == num_stages - 1 else 0.0) for k, (start, end) in enumerate(ranges)]


def update_times(schedule: Schedule, num_updates: int, forward: list[float],
                 backward_factor: float = BACKWARD_FACTOR) -> list[float]:
    """Simulated time at which each update (1..num_updates) is done on every stage.

    Returns:
        A list whose entry u-1 is the end of the last stage's step u (pipenag.timing).
    """
    from pipenag.timing import simulate

    timeline = simulate(schedule, num_updates, forward_time=forward,
                        backward_time=[backward_factor * f for f in forward])
    done = [0.0] * num_updates
    for ev in timeline.events:
        if ev.action.kind == "S":
            done[ev.action.index] = max(done[ev.action.index], ev.end)
    return done


def _fmt(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def compare(variants: list[Variant], cfg: Config, out_dir: Path) -> list[dict]:
    """Train every variant with train_sim, one after another; returns one row per variant."""
    from pipenag.train import train_sim

    plans = [(v, *method_config(cfg, v, out_dir)) for v in variants]  # all checked before training
    rows = []
    for i, (v, run_cfg, M) in enumerate(plans, 1):
        print(f"pipenag compare: [{i}/{len(plans)}] {v.label}: {run_cfg.train.steps} updates x {M} "
              f"microbatch(es) -> {run_cfg.run.out_dir}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        summary = train_sim(run_cfg)
        records = read_metrics(run_cfg.run.out_dir)
        schedule = Schedule(summary["schedule"], summary["stages"], M)
        vocab = run_cfg.model.vocab_size or _vocab_size(run_cfg)
        forward = stage_forward_costs(run_cfg.model, summary["stages"], vocab)
        done = update_times(schedule, run_cfg.train.steps, forward)
        evals = [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"],
                  "sim_time": done[r["step"] - 1], "time_s": r["time_s"]}
                 for r in records if "val_loss" in r]
        trains = [{"step": r["step"], "tokens": r["tokens"], "train_loss": r["train_loss"]} for r in records]
        row = {
            "method": v.label,
            "status": summary["status"],
            "val_loss": summary["val_loss"],
            "val_ppl": summary["val_ppl"],
            "updates": summary["updates"],
            "microbatches_per_update": M,
            "tokens": summary["tokens"],
            "wall_time_s": summary["wall_time_s"],
            "sim_time": done[summary["updates"] - 1] if summary["updates"] else 0.0,
            "stage_forward_costs": forward,
            "evals": evals,
            "train": trains,
        }
        rows.append(row)
        print(f"pipenag compare: {v.label}: {summary['status']}, val_loss {_fmt(summary['val_loss'])}, "
              f"{summary['updates']} updates, {summary['tokens']:,} tokens, "
              f"{time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    return rows


def loss_at_time(evals: list[dict], t: float) -> Optional[float]:
    """Validation loss at simulated time t, linearly interpolated between evaluations (None
    before the first evaluation or after the last)."""
    pts = [(e["sim_time"], e["val_loss"]) for e in evals]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if t0 <= t <= t1:
            return l0 + (l1 - l0) * (t - t0) / (t1 - t0) if t1 > t0 else l1
    if pts and abs(pts[-1][0] - t) <= 1e-9 * max(1.0, t):
        return pts[-1][1]
    return None


def add_equal_time_losses(rows: list[dict]) -> float:
    """Set row["val_loss_at_equal_time"]: each method's loss at the earliest finishing time
    among the methods that finished (what a fixed wall-clock budget would give); returns it."""
    ok = [r["sim_time"] for r in rows if r["status"] == "ok"]
    t = min(ok) if ok else 0.0
    for r in rows:
        r["val_loss_at_equal_time"] = loss_at_time(r["evals"], t) if ok else None
    return t


def _vocab_size(cfg: Config) -> int:
    from pipenag.data import build_data

    return build_data(cfg.data, cfg.model.block_size, cfg.train.seed).vocab_size


def write_summary(rows: list[dict], cfg: Config, out_dir: Path) -> None:
    """DIR/summary.csv, summary.md and summary.json (rows with their curves)."""
    t_equal = add_equal_time_losses(rows)
    with open(out_dir / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r[k] is None else r[k]) for k in CSV_FIELDS})
    m, p, t = cfg.model, cfg.pipeline, cfg.train
    lines = [
        f"# pipenag compare: {', '.join(r['method'] for r in rows)}",
        "",
        f"Budget: {budget_of(cfg)} microbatches of {cfg.data.microbatch_size} x {m.block_size} tokens per method "
        f"(a method with M microbatches per update makes {budget_of(cfg)} // M updates); K = {p.num_stages} "
        f"stages; model n_layer {m.n_layer}, n_embd {m.n_embd}, n_head {m.n_head}; data "
        f"{cfg.data.source} ({cfg.data.tokenizer}); seed {t.seed}; peak lr {cfg.optim.lr}.",
        "",
        f"| method | status | final val loss | ppl | updates | M | tokens | wall time (s) | simulated time "
        f"| val loss at simulated time {t_equal:.0f} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| `{r['method']}` | {r['status']} | {_fmt(r['val_loss'])} | {_fmt(r['val_ppl'], 2)} | "
                     f"{r['updates']} | {r['microbatches_per_update']} | {r['tokens']:,} | "
                     f"{r['wall_time_s']:.1f} | {r['sim_time']:.0f} | {_fmt(r['val_loss_at_equal_time'])} |")
    lines += [
        "",
        "Simulated time: pipenag.timing.simulate of the method's schedule, in units of one "
        "transformer block's forward on one microbatch; stage forward costs from FLOPs (blocks "
        "24C^2 + 4TC per token, LM head 2CV), backward = 2 x forward, no step or link time. "
        "The last column is each method's validation loss (interpolated between evaluations) at "
        "the time the fastest method finished: the comparison at equal wall-clock time. "
        "Wall time: this process running the exact simulator (all stages on one CPU), not a "
        "pipeline's time.",
        "",
    ]
    (out_dir / "summary.md").write_text("\n".join(lines))
    (out_dir / "summary.json").write_text(json.dumps({"config": cfg.to_dict(), "rows": rows}, indent=1) + "\n")


def compare_main(methods: str, cfg: Config, out_dir: Optional[str] = None) -> int:
    """Entry point of `pipenag compare`; returns the exit status (1 if any method diverged).

    Args:
        methods: comma-separated method names, each optionally with ':section.key=value'.
        cfg: the shared config; train.microbatch_budget (or, the older spelling, train.steps) is
            the budget in microbatches; run.out_dir the comparison folder (unless out_dir is given).
    Raises:
        ValueError: an unknown method or bad override, before any training.
    """
    from pipenag.plots import plot_compare

    variants = parse_methods(methods)
    out = Path(out_dir or cfg.run.out_dir)
    legacy_budget_note("compare", cfg)
    for v in variants:  # fail on any bad variant before training the first
        method_config(cfg, v, out)
    out.mkdir(parents=True, exist_ok=True)
    rows = compare(variants, cfg, out)
    write_summary(rows, cfg, out)
    png = plot_compare(rows, out / "loss.png",
                       title=f"K={cfg.pipeline.num_stages}, budget {budget_of(cfg)} microbatches, seed {cfg.train.seed}")
    print((out / "summary.md").read_text())
    print(f"pipenag compare: wrote {out}/summary.md, summary.csv" + (", loss.png" if png else ""))
    return 0 if all(r["status"] == "ok" for r in rows) else 1
