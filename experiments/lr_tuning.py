"""The learning rate of every method at K = 8 and at K = 32, on a grid extended until the best
value is interior (issue 19, "tuning that cannot hide an optimum"), from the repository root.

    python experiments/lr_tuning.py --run     # the sweeps (resumable), then the table
    python experiments/lr_tuning.py           # the table of the runs finished so far

configs/bench.toml (2,000 microbatches), the tuning seed 0 of the convergence benchmark, the
simulator. Every method is tuned at K = 8 and at K = 32 separately (the convergence benchmark
tuned once, at K = 8, on {3e-4, 1e-3, 3e-3}, and most methods chose the top of that grid). The
synchronous references (gpipe: AdamW, gpipe-muon: Muon) do not depend on K and are tuned once.
The sweeps write runs/lr_<x>/:
- tune: half-decades 1e-3, 3e-3, 1e-2 for gpipe, gpipe-muon, pipedream, nesterov, muon,
  muon-wp and muon-wp-ef (the best method of docs/results/convergence.md at K = 8);
- up: 3e-2 where the best of the grid was 1e-2 (the top edge): muon-wp-ef and pipedream at K = 8;
- down: 3e-4 where it was 1e-3 (the bottom edge): muon at K = 32, nesterov at K = 8.
The data files go to docs/results/data/lr_tuning/<x>/; the table marks a best value that is
still on the edge of what was tried.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

from paired_runs import read_runs, run_sweeps

DATA = Path("docs/results/data/lr_tuning")
METHODS = ["gpipe", "gpipe-muon", "pipedream", "nesterov", "muon", "muon-wp", "muon-wp-ef"]
SWEEPS = {
    "tune": (METHODS, "8,32", "0", "1e-3,3e-3,1e-2"),
    "up": (["muon-wp-ef@8", "pipedream@8"], "8,32", "0", "3e-2"),
    "down": (["muon@32", "nesterov@8"], "8,32", "0", "3e-4"),
}


def command(name: str, jobs: int) -> list[str]:
    methods, stages, seeds, lrs = SWEEPS[name]
    return [sys.executable, "-m", "pipenag", "sweep", "--config", "configs/bench.toml", "--methods", ",".join(methods),
            "--stages", stages, "--seeds", seeds, "--lrs", lrs, "--no-k1-controls", "--jobs", str(jobs),
            "--out", f"runs/lr_{name}"]


def labels(name: str) -> list[str]:
    return [m.split("@")[0] for m in SWEEPS[name][0]]


def table(records: list[dict]) -> list[str]:
    """One line per method and K: the final loss at every lr tried, the best, and whether it is
    on the edge of the lrs tried (a diverged run counts as infinitely bad)."""
    lrs = sorted({r["lr"] for r in records})
    lines = ["| method | K | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr | interior? |",
             "|---|---|" + "---|" * len(lrs) + "---|---|"]
    sync = {"gpipe", "gpipe-muon"}
    for method in METHODS:
        for K in sorted({r["stages"] for r in records if r["method"] == method}):
            losses = {r["lr"]: r["val_loss"] for r in records if r["method"] == method and r["stages"] == K}
            scored = {lr: (v if math.isfinite(v) else math.inf) for lr, v in losses.items()}
            best = min(scored, key=scored.get)
            tried = sorted(scored)
            interior = tried[0] < best < tried[-1]
            cells = [(f"**{losses[lr]:.4f}**" if lr == best else f"{losses[lr]:.4f}") if lr in losses else ""
                     for lr in lrs]
            lines.append(f"| {method} | {'any' if method in sync else K} | " + " | ".join(cells)
                         + f" | {best:g} | {'yes' if interior else 'NO: on the edge'} |")
    return lines


def main(argv: list[str]) -> int:
    run_sweeps(argv, __doc__.split("\n\n")[0], {k: v for k, v in SWEEPS.items() if v[0]}, command, "lr_", DATA,
               methods=labels)
    print("\n".join(table([r for name in SWEEPS for r in read_runs(DATA / name)])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
