"""The delay penalty against run length (issue 19): the same methods at K = 8 and 32 and their
K = 1 controls, trained for 2,000 and for 8,000 microbatches on the benchmark regime
(configs/bench.toml), from the repository root.

    python experiments/run_length.py --run     # the sweeps (resumable), then the table
    python experiments/run_length.py           # the table of the runs finished so far

The sweeps (`pipenag sweep`, lr 3e-3: the lr the convergence benchmark tuned pipedream,
nesterov and muon-wp to at 2,000 microbatches, not tuned again for the longer runs) write
runs/run_length_<x>/, with the cosine schedule and its warm-up (optim.warmup_fraction) scaled to
the length:
- 2k: pipedream, nesterov and muon-wp at K = 8 and K = 1, 2,000 microbatches, seed 1;
- 8k: the same, 8,000 microbatches (evaluated every 320), seed 1;
- 2k23, 8k23: the same for seeds 2 and 3;
- 2k32, 8k32: the same methods at K = 32, seed 1, without K = 1 controls of their own (those of
  2k and 8k serve: the same method, seed, length and machine).
The delay penalty of a run is its final validation loss minus its K = 1 control's (same method,
seed and length). Both lengths run on the same machine: runs on two CPUs differ
(docs/results/compression.md). The data files go to docs/results/data/run_length/<x>/.
"""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path

from paired_runs import read_runs, run_sweeps

METHODS = ["pipedream", "nesterov", "muon-wp"]
STAGES = (8, 32)
LENGTH = {"2k": (2000, 80), "8k": (8000, 320)}  # microbatches, evaluation interval
# name -> (length, seeds, K, with K = 1 controls)
SWEEPS = {"2k": ("2k", "1", 8, True), "8k": ("8k", "1", 8, True), "2k23": ("2k", "2,3", 8, True),
          "8k23": ("8k", "2,3", 8, True), "2k32": ("2k", "1", 32, False), "8k32": ("8k", "1", 32, False)}
DATA = Path("docs/results/data/run_length")


def command(name: str, jobs: int) -> list[str]:
    length, seeds, stages, controls = SWEEPS[name]
    budget, every = LENGTH[length]
    return [sys.executable, "-m", "pipenag", "sweep", "--config", "configs/bench.toml", "--methods", ",".join(METHODS),
            "--stages", str(stages), "--seeds", seeds, "--lrs", "3e-3", "--jobs", str(jobs),
            "--out", f"runs/run_length_{name}", f"--train.microbatch_budget={budget}", f"--train.eval_every={every}",
            f"--train.log_every={every * 5}"] + ([] if controls else ["--no-k1-controls"])


def penalties(records: list[dict], K: int = 8) -> dict[tuple[str, str], list[tuple[int, float, float]]]:
    """(method, length) -> [(seed, loss at K, delay penalty)] for every seed with both runs."""
    loss = {(r["method"], r["length"], r["stages"], r["seed"]): r["val_loss"] for r in records}
    out: dict[tuple[str, str], list[tuple[int, float, float]]] = {}
    for (method, length, stages, seed), value in sorted(loss.items()):
        control = loss.get((method, length, 1, seed))
        if stages == K and control is not None:
            out.setdefault((method, length), []).append((seed, value, value - control))
    return out


def mean_se(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:+.4f}"
    return f"{statistics.fmean(values):+.4f} +- {statistics.stdev(values) / math.sqrt(len(values)):.4f}"


def table(records: list[dict]) -> list[str]:
    lines = ["| method | K | microbatches | seeds | loss K = 1 | loss at K | delay penalty (mean +- s.e.) |",
             "|---|---|---|---|---|---|---|"]
    for K in STAGES:
        pens = penalties(records, K)
        for method in METHODS:
            for length in LENGTH:
                rows = pens.get((method, length))
                if rows:
                    seeds = ",".join(str(s) for s, _, _ in rows)
                    at_k = statistics.fmean(v for _, v, _ in rows)
                    k1 = statistics.fmean(v - p for _, v, p in rows)
                    lines.append(f"| {method} | {K} | {LENGTH[length][0]:,} | {seeds} | {k1:.4f} | {at_k:.4f} | "
                                 f"{mean_se([p for _, _, p in rows])} |")
    lines += ["", "| method | K | seed | penalty at 2,000 | penalty at 8,000 | ratio 8k / 2k | "
              "exponent a in penalty ~ N^a |", "|---|---|---|---|---|---|---|"]
    for K in STAGES:
        pens = penalties(records, K)
        for method in METHODS:
            short = {s: p for s, _, p in pens.get((method, "2k"), [])}
            for seed, _, p in pens.get((method, "8k"), []):
                if seed in short:
                    ratio = p / short[seed]
                    exponent = f"{math.log(ratio) / math.log(4):+.2f}" if ratio > 0 else "n/a (sign change)"
                    lines.append(f"| {method} | {K} | {seed} | {short[seed]:+.4f} | {p:+.4f} | {ratio:.2f} | {exponent} |")
    return lines


def plot(records: list[dict], path: Path) -> None:
    """The delay penalty against the run's length, one line per method (seed means)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for K, style in zip(STAGES, ("-", "--")):
        pens = penalties(records, K)
        for i, method in enumerate(METHODS):
            points = [(LENGTH[length][0], statistics.fmean(p for _, _, p in pens[(method, length)]))
                      for length in LENGTH if pens.get((method, length))]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, style, marker="o", color=f"C{i}", label=f"{method}, K = {K}")
    ax.set_xscale("log")
    ax.set_xlabel("run length (microbatches of 8 x 64 tokens)")
    ax.set_ylabel("delay penalty (loss - K = 1 loss)")
    ax.axhline(0.0, color="k", lw=0.6)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str]) -> int:
    run_sweeps(argv, __doc__.split("\n\n")[0], SWEEPS, command, "run_length_", DATA, lambda name: METHODS)
    records = [dict(r, length=SWEEPS[name][0]) for name in SWEEPS for r in read_runs(DATA / name)]
    print("\n".join(table(records)))
    if records:
        plot(records, Path("docs/results/run_length.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
