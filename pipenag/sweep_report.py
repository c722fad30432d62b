"""The tables and plots of a sweep (pipenag.sweep), from its runs or from its compact data files.

    pipenag sweep ... --out runs/sweep                         # trains, then writes the report
    pipenag sweep --report-from docs/results/data/convergence --out runs/replot   # data files only

Data files (small enough to commit): runs.csv, one line per run and K (method, K, seed, lr,
grid, status, final validation loss, updates, tokens, weight-memory multiple, optimizer state
per parameter byte), and curves.csv, every evaluation of every run (step, tokens, val_loss,
simulated time). A synchronous run stands for every K of its method's list (its numbers do not
depend on K): it appears once per K, with the simulated time of that K, and trained_stages
says at which K it ran. Everything below is computed from these two files.

Per (method, K, grid) row:
- final validation loss: mean and sample std over the reported seeds;
- delay penalty: mean over seeds of (loss at K - loss at K = 1), same method, lr and seed,
  with its standard error (std of the paired differences / sqrt(n));
- tokens to target: where the seed-mean validation curve first reaches the target loss
  (linear interpolation between evaluations), as a ratio to gpipe's; "not reached" if never;
- time to target: the same point on the simulated-time axis (pipenag.timing with per-stage
  FLOP costs, pipenag.compare.stage_forward_costs) as a ratio to gpipe's at the same K;
- memory: the weight versions held, as a multiple of the model (sum over stages of versions x
  stage parameters / all parameters), and the optimizer state in bytes per parameter byte;
- with `sweep --wallclock`: the wall-clock model's seconds per update of each run's config (its
  [link], codecs and in_flight depths included; pipenag.wallclock, stage costs calibrated on
  this machine) and the wall time to target (updates to the target x that), as a ratio to
  gpipe's at the same K.
The target defaults to gpipe's mean final loss (the synchronous baseline).
"""

from __future__ import annotations

import csv
import math
import statistics
from pathlib import Path
from typing import Optional

from pipenag.metrics import dumps, read_metrics

RUN_FIELDS = ["method", "schedule", "stages", "trained_stages", "seed", "lr", "grid", "tuning", "chosen_lr", "status",
              "val_loss", "updates",
              "tokens", "microbatches_per_update", "weight_memory", "optimizer_state_per_param", "wall_time_s",
              "model_s_per_update"]
CURVE_FIELDS = ["method", "stages", "seed", "lr", "grid", "step", "tokens", "val_loss", "sim_time"]
BASELINE = "gpipe"


# -- collecting the runs --------------------------------------------------------------------------


def collect_runs(sweep, specs, done: dict[str, dict], chosen: dict[tuple, float]) -> list[dict]:
    """One record per finished run (with its evaluation curve and simulated time); a
    synchronous run stands for every K of its method's stage list (its numbers do not depend
    on K), with the simulated time of each. `chosen` marks the runs at the lr of their row."""
    from pipenag.compare import stage_forward_costs, update_times
    from pipenag.schedules import Schedule

    records = []
    for spec in specs:
        summary = done.get(spec.key)
        if summary is None:
            continue
        cfg = sweep.run_config(spec)
        metrics = read_metrics(cfg.run.out_dir)
        evals = [r for r in metrics if r.get("val_loss") is not None]
        memory = summary.get("memory") or []
        params = sum(m["param_bytes"] for m in memory) or 1
        ks = sweep.stages[spec.variant.label] if sweep.is_sync(spec.variant) else [spec.stages]
        for k in ks:
            model_s = _model_seconds(cfg, k) if getattr(sweep, "wallclock", False) else None
            M = summary["microbatches_per_update"]
            schedule = Schedule(summary["schedule"], k, M)
            forward = stage_forward_costs(cfg.model, k, summary["vocab_size"])
            done_at = update_times(schedule, cfg.train.steps, forward)
            records.append({
                "method": spec.variant.label, "schedule": summary["schedule"], "stages": k,
                "trained_stages": spec.stages, "seed": spec.seed,
                "lr": spec.lr,
                "grid": " ".join(spec.grid), "tuning": spec.tuning,
                "chosen_lr": not spec.tuning and chosen.get((spec.variant.label, spec.stages, spec.grid)) == spec.lr,
                "status": summary["status"],
                "val_loss": summary.get("val_loss"), "updates": summary["updates"], "tokens": summary["tokens"],
                "microbatches_per_update": M,
                # Versions a k-stage split holds: recomputed for the K this record stands for.
                "weight_memory": _weight_memory(schedule, memory, k) if memory else None,
                "optimizer_state_per_param": (sum(m["optimizer_state_bytes"] for m in memory) / params
                                              if memory else None),
                "wall_time_s": summary.get("wall_time_s"),
                "model_s_per_update": model_s,
                "evals": [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"],
                           # rounded as curves.csv stores it, so the report of the data files
                           # is the report of the sweep
                           "sim_time": round(done_at[r["step"] - 1], 3)} for r in evals],
            })
    return records


def _model_seconds(cfg, num_stages: int) -> float:
    """The wall-clock model's seconds per update of `cfg` at `num_stages` stages with its [link]
    and depths (pipenag.wallclock: stage costs calibrated on this machine, cached per config)."""
    from pipenag.wallclock import calibrate, predict

    cfg_k = cfg.with_overrides([f"--pipeline.num_stages={num_stages}"])
    return predict(cfg_k, calibrate(cfg_k)).steady_s_per_update


def _weight_memory(schedule, memory: list[dict], num_stages: int) -> float:
    """Weight bytes held (every version of every stage) / the model's weight bytes."""
    if len(memory) == num_stages:
        sizes = [m["param_bytes"] for m in memory]
    else:  # a synchronous run at another K: its versions are 1 per stage at any split
        return 1.0 if all(schedule.versions_kept(k) == 1 for k in range(num_stages)) else float("nan")
    return sum(schedule.versions_kept(k) * s for k, s in enumerate(sizes)) / sum(sizes)


def write_data(records: list[dict], out: Path) -> None:
    """runs.csv and curves.csv (see the module docstring)."""
    with open(out / "runs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({k: "" if r.get(k) is None else r[k] for k in RUN_FIELDS})
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CURVE_FIELDS)
        w.writeheader()
        for r in records:
            for e in r["evals"]:
                w.writerow({"method": r["method"], "stages": r["stages"], "seed": r["seed"], "lr": r["lr"],
                            "grid": r["grid"], "step": e["step"], "tokens": e["tokens"],
                            "val_loss": e["val_loss"], "sim_time": e["sim_time"]})


def read_data(folder: Path) -> list[dict]:
    """The records of write_data, read back."""
    def num(text: str, cast=float):
        return None if text in ("", "None") else cast(text)

    records, by_key = [], {}
    with open(folder / "runs.csv", newline="") as f:
        for row in csv.DictReader(f):
            r = {"method": row["method"], "schedule": row["schedule"], "stages": int(row["stages"]),
                 "trained_stages": int(row["trained_stages"]),
                 "seed": int(row["seed"]),
                 "lr": float(row["lr"]), "grid": row["grid"], "tuning": row["tuning"] == "True",
                 "chosen_lr": row["chosen_lr"] == "True",
                 "status": row["status"], "val_loss": num(row["val_loss"]), "updates": int(row["updates"]),
                 "tokens": int(row["tokens"]), "microbatches_per_update": int(row["microbatches_per_update"]),
                 "weight_memory": num(row["weight_memory"]),
                 "optimizer_state_per_param": num(row["optimizer_state_per_param"]),
                 "wall_time_s": num(row["wall_time_s"]), "model_s_per_update": num(row.get("model_s_per_update", "")),
                 "evals": []}
            records.append(r)
            by_key[(r["method"], r["stages"], r["seed"], r["lr"], r["grid"])] = r
    with open(folder / "curves.csv", newline="") as f:
        for row in csv.DictReader(f):
            key = (row["method"], int(row["stages"]), int(row["seed"]), float(row["lr"]), row["grid"])
            if key in by_key:
                by_key[key]["evals"].append({"step": int(row["step"]), "tokens": int(row["tokens"]),
                                             "val_loss": float(row["val_loss"]), "sim_time": float(row["sim_time"])})
    return records


# -- the numbers ----------------------------------------------------------------------------------


def crossing(evals: list[dict], target: float, axis: str) -> Optional[float]:
    """The `axis` value ("tokens" or "sim_time") where the curve first reaches `target`,
    linearly interpolated between evaluations; None if it never does."""
    prev = None
    for e in evals:
        if e["val_loss"] <= target:
            if prev is None or prev["val_loss"] == e["val_loss"]:
                return float(e[axis])
            frac = (prev["val_loss"] - target) / (prev["val_loss"] - e["val_loss"])
            return prev[axis] + frac * (e[axis] - prev[axis])
        prev = e
    return None


def mean_curve(runs: list[dict]) -> list[dict]:
    """The seed-mean validation curve of runs that share their evaluation steps (the steps
    every run has)."""
    steps = set.intersection(*(set(e["step"] for e in r["evals"]) for r in runs)) if runs else set()
    out = []
    for step in sorted(steps):
        points = [next(e for e in r["evals"] if e["step"] == step) for r in runs]
        out.append({"step": step, "tokens": points[0]["tokens"], "sim_time": points[0]["sim_time"],
                    "val_loss": statistics.fmean(p["val_loss"] for p in points)})
    return out


def _mean_std(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def build_rows(records: list[dict], chosen: dict[tuple, float], target: Optional[float]) -> tuple[list[dict], float]:
    """The table: one row per (method, K, grid) of `chosen` (its lr), from the reported runs.

    Returns:
        (rows, the target loss used; nan when there is none).
    """
    reported = [r for r in records if not r["tuning"]]

    def runs_of(method: str, k: int, lr: float, grid: str) -> list[dict]:
        return sorted((r for r in reported if (r["method"], r["stages"], r["lr"], r["grid"]) == (method, k, lr, grid)),
                      key=lambda r: r["seed"])

    if target is None:
        base = [r["val_loss"] for (m, k, g), lr in chosen.items() if m == BASELINE
                for r in runs_of(m, k, lr, g) if r["status"] == "ok" and r["val_loss"] is not None]
        target = statistics.fmean(base) if base else float("nan")
    rows = []
    for (method, k, grid), lr in sorted(chosen.items(), key=lambda kv: (kv[0][2], kv[0][0], kv[0][1])):
        runs = runs_of(method, k, lr, grid)
        ok = [r for r in runs if r["status"] == "ok" and r["val_loss"] is not None]
        mean, std = _mean_std([r["val_loss"] for r in ok])
        row = {"method": method, "stages": k, "grid": grid, "lr": lr, "seeds": [r["seed"] for r in runs],
               "final": [r["val_loss"] for r in runs], "diverged": len(runs) - len(ok),
               "val_loss_mean": mean, "val_loss_std": std,
               "weight_memory": runs[0]["weight_memory"] if runs else None,
               "model_s_per_update": runs[0].get("model_s_per_update") if runs else None,
               "optimizer_state_per_param": runs[0]["optimizer_state_per_param"] if runs else None}
        # Delay penalty: paired by seed against K = 1 at the same lr (none for the synchronous
        # schedules, whose runs are the same at every K).
        if k > 1 and runs and runs[0]["schedule"] not in ("gpipe", "1f1b", "zb-h1"):
            base = {r["seed"]: r["val_loss"] for r in runs_of(method, 1, lr, grid) if r["status"] == "ok"}
            diffs = [r["val_loss"] - base[r["seed"]] for r in ok if r["seed"] in base and base[r["seed"]] is not None]
            if diffs:
                d_mean, d_std = _mean_std(diffs)
                row["delay_penalty"] = d_mean
                row["delay_penalty_se"] = d_std / math.sqrt(len(diffs)) if d_std is not None else None
        curve = mean_curve(ok) if len(ok) == len(runs) and ok else []
        row["curve"] = curve
        row["tokens_to_target"] = crossing(curve, target, "tokens") if math.isfinite(target) else None
        row["time_to_target"] = crossing(curve, target, "sim_time") if math.isfinite(target) else None
        # The wall-clock model's time to target: the updates to the target (tokens / tokens per
        # update) times the modelled seconds per update of this run's config, link and depths.
        per_update = runs[0]["tokens"] / runs[0]["updates"] if runs and runs[0]["updates"] else None
        row["wall_to_target_s"] = (row["tokens_to_target"] / per_update * row["model_s_per_update"]
                                   if row["tokens_to_target"] is not None and per_update
                                   and row["model_s_per_update"] is not None else None)
        rows.append(row)
    for row in rows:  # ratios against gpipe of the same grid (time: at the same K)
        ref = [r for r in rows if r["method"] == BASELINE and r["grid"] == row["grid"]]
        ref_k = [r for r in ref if r["stages"] == row["stages"]]
        row["tokens_ratio"] = _ratio(row["tokens_to_target"], ref[0]["tokens_to_target"] if ref else None)
        row["time_ratio"] = _ratio(row["time_to_target"], ref_k[0]["time_to_target"] if ref_k else None)
        row["wall_ratio"] = _ratio(row["wall_to_target_s"], ref_k[0]["wall_to_target_s"] if ref_k else None)
    return rows, target


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


# -- writing --------------------------------------------------------------------------------------


def _f(x, fmt: str = ".4f", none: str = "n/a") -> str:
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


TABLE_FIELDS = ["method", "stages", "grid", "lr", "seeds", "diverged", "val_loss_mean", "val_loss_std",
                "delay_penalty", "delay_penalty_se", "tokens_to_target", "tokens_ratio", "time_to_target",
                "time_ratio", "weight_memory", "optimizer_state_per_param", "model_s_per_update", "wall_to_target_s",
                "wall_ratio"]


def write_tables(rows: list[dict], target: float, out: Path, header: str = "") -> None:
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=TABLE_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r[k]) for k in TABLE_FIELDS})
    (out / "summary.json").write_text(dumps({"target": target, "rows": rows}, indent=1) + "\n")
    lines = [header, "", f"Target loss: {_f(target)} (tokens and simulated time to reach it on the seed-mean "
             f"curve, as ratios to {BASELINE}'s; time at the same K).", "",
             "| method | K | lr | seeds | final val loss (mean +- std) | delay penalty (+- s.e.) | tokens to target "
             "| vs gpipe | time to target vs gpipe | weight memory | opt. state / param |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    wall = any(r.get("model_s_per_update") is not None for r in rows)
    if wall:  # the wall-clock model's columns (sweep --wallclock)
        lines[-2] += " model s / update | wall time to target (model) | vs gpipe |"
        lines[-1] += "---|---|---|"
    for r in rows:
        method = r["method"] + (f" [{r['grid']}]" if r["grid"] else "")
        n = len(r["seeds"]) - r["diverged"]
        seeds = f"{n}" + (f" (+{r['diverged']} diverged)" if r["diverged"] else "")
        final = f"{_f(r['val_loss_mean'])} +- {_f(r['val_loss_std'], '.4f', '-')}"
        penalty = ("" if r.get("delay_penalty") is None else
                   f"{r['delay_penalty']:+.4f} +- {_f(r.get('delay_penalty_se'), '.4f', '-')}")
        tokens = "not reached" if r["tokens_to_target"] is None else f"{r['tokens_to_target']:,.0f}"
        lines.append(f"| `{method}` | {r['stages']} | {r['lr']:g} | {seeds} | {final} | {penalty} | {tokens} | "
                     f"{_f(r['tokens_ratio'], '.2f', '-')} | {_f(r['time_ratio'], '.2f', '-')} | "
                     f"{_f(r['weight_memory'], '.2f', '-')}x | {_f(r['optimizer_state_per_param'], '.2f', '-')} |"
                     + (f" {_f(r.get('model_s_per_update'), '.4f', '-')} | {_f(r.get('wall_to_target_s'), '.1f', '-')} | "
                        f"{_f(r.get('wall_ratio'), '.2f', '-')} |" if wall else ""))
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def write_plots(rows: list[dict], out: Path) -> list[str]:
    """loss_tokens.png, loss_time.png (one panel per K, seed-mean curves) and ratio_vs_K.png."""
    from pipenag.plots import plot_panels

    written = []
    ks = sorted({r["stages"] for r in rows})
    for axis, name, label in (("tokens", "loss_tokens.png", "training tokens"),
                              ("sim_time", "loss_time.png", "simulated pipeline time (block-forward units)")):
        panels = {f"K = {k}": {r["method"] + (f" [{r['grid']}]" if r["grid"] else ""):
                               ([e[axis] for e in r["curve"]], [e["val_loss"] for e in r["curve"]])
                               for r in rows if r["stages"] == k and r["curve"]} for k in ks}
        if plot_panels(panels, out / name, xlabel=label, ylabel="validation loss (seed mean)"):
            written.append(name)
    series = {}
    for which in ("tokens_ratio", "time_ratio"):
        panel = {}
        for method in sorted({r["method"] for r in rows} - {BASELINE}):
            pts = sorted((r["stages"], r[which]) for r in rows if r["method"] == method and r[which] is not None)
            if pts:
                panel[method] = ([p[0] for p in pts], [p[1] for p in pts])
        series["tokens to target / gpipe's" if which == "tokens_ratio" else "simulated time to target / gpipe's"] = panel
    if plot_panels(series, out / "ratio_vs_K.png", xlabel="pipeline stages K", ylabel="ratio to gpipe", logx=True):
        written.append("ratio_vs_K.png")
    return written


def write_report(sweep, specs, chosen, done: dict[str, dict], target: Optional[float] = None) -> None:
    """runs.csv, curves.csv, summary.{csv,md,json} and the plots of a sweep, in sweep.out.

    Args:
        sweep: the pipenag.sweep.Sweep.
        specs: every RunSpec of the sweep (tuning and reported).
        chosen: (method label, K, grid tuple) -> the lr of its row.
        done: run key -> summary of the finished runs.
        target: the target loss (None: gpipe's mean final loss).
    """
    records = collect_runs(sweep, specs, done, chosen)
    write_data(records, sweep.out)
    rows = {}
    for (method, k, grid), lr in chosen.items():  # a synchronous method: one row per K of its list
        for kk in (sweep.stages[method] if sweep.is_sync(next(v for v in sweep.variants if v.label == method))
                   else [k]):
            rows[(method, kk, " ".join(grid))] = lr
    report_from_records(records, rows, sweep.out, target, header=_header(sweep))


def report_from_records(records: list[dict], chosen: dict[tuple, float], out: Path, target: Optional[float] = None,
                        header: str = "# pipenag sweep") -> list[dict]:
    rows, used = build_rows(records, chosen, target)
    write_tables(rows, used, out, header)
    write_plots(rows, out)
    return rows


def report_from_data(folders: Path | list[Path], out: Path, target: Optional[float] = None,
                     header: str = "") -> list[dict]:
    """The report of data files (runs.csv, curves.csv) alone, of one sweep or of several
    (their runs together): each (method, K, grid) row takes the lr its runs are marked with
    (chosen_lr)."""
    folders = [folders] if isinstance(folders, Path) else list(folders)
    records = [r for folder in folders for r in read_data(folder)]
    folder = ", ".join(str(f) for f in folders)
    chosen = {(r["method"], r["stages"], r["grid"]): r["lr"] for r in records if r["chosen_lr"]}
    out.mkdir(parents=True, exist_ok=True)
    return report_from_records(records, chosen, out, target, header=header or f"# pipenag sweep: {folder}")


def _header(sweep) -> str:
    from pipenag.compare import budget_of

    c = sweep.cfg
    m = c.model
    return (f"# pipenag sweep: {', '.join(v.label for v in sweep.variants)}\n\n"
            f"Budget {budget_of(c)} microbatches of {c.data.microbatch_size} x {m.block_size} tokens per run; "
            f"model n_layer {m.n_layer}, n_embd {m.n_embd}, n_head {m.n_head}; data {c.data.source} "
            f"({c.data.tokenizer}); seeds {', '.join(map(str, sweep.seeds))}; lrs "
            f"{', '.join(f'{x:g}' for x in sweep.lrs)}" + (f" (tuned on seed {sweep.tune_seed})" if sweep.tune_lr else ""))

