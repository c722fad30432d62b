"""The convergence benchmark of docs/results/convergence.md: the sweeps, their table, and the
checks of the benchmark regime (configs/bench.toml), from the repository root.

    python experiments/convergence.py --run              # the four sweeps (hours; resumable)
    python experiments/convergence.py                    # tables, plots and regime checks

The sweeps (`pipenag sweep`, configs/bench.toml, seeds 1-3 reported; in a and b the lr is tuned
on seed 0 at K = 8 from {3e-4, 1e-3, 3e-3}, c takes the lr pipedream was tuned to, d tunes SGD
lrs {0.3, 1, 3}) write runs/conv_<x>/.
Their data files (runs.csv, curves.csv) are copied to docs/results/data/convergence/<x>/, and
the report of all of them together (pipenag sweep --report-from) goes to
docs/results/convergence/ (summary.md, summary.csv, plots). The regime checks read the same
data files: the seed spread of gpipe, when each run leaves the initial plateau, updates and
wall time per run.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from pipenag.sweep_report import read_data, report_from_data

COMMON = ["--config", "configs/bench.toml", "--seeds", "1,2,3", "--jobs", "1"]
ADAM_LRS = ["--lrs", "3e-4,1e-3,3e-3", "--tune-lr", "--tune-stages", "8"]
SWEEPS = {
    # the paper's method, the plain baseline, the synchronous references (M = 4 and M = 1), and
    # forward weight prediction, at K = 1, 4, 8, 16, 32
    "a": ["--methods", "gpipe,gpipe:pipeline.num_microbatches=1,pipedream,nesterov,pipedream-wp@1/8/16/32",
          "--stages", "1,4,8,16,32", *ADAM_LRS],
    # the matrix optimizers, at K = 1, 8, 16, 32
    "b": ["--methods", "basis-rotation,muon,muon-wp", "--stages", "1,8,16,32", *ADAM_LRS],
    # the delay corrections of the paper's comparison, at K = 32 only and not tuned: the lr that
    # pipedream and nesterov were tuned to (3e-3); K = 1 controls added
    "c": ["--methods", "pipedream-lr,pipemare,nesterov-nows", "--stages", "32", "--lrs", "3e-3"],
    # the SGD form of the paper's method (lr * weight_decay = 1e-5 per step, as AdamW's 1e-3 x 0.01);
    # not run yet
    "d": ["--methods", "nesterov-sgd:optim.weight_decay=1e-5", "--stages", "8,32", "--lrs", "0.3,1,3",
          "--tune-lr", "--tune-stages", "8"],
}
DATA = Path("docs/results/data/convergence")
REPORT = Path("docs/results/convergence")
PLATEAU = 3.20 - 0.2  # the untrained (unigram-head) model's val loss is 3.20


def command(name: str) -> list[str]:
    return [sys.executable, "-m", "pipenag", "sweep", *COMMON, *SWEEPS[name], "--out", f"runs/conv_{name}"]


def regime_checks(records: list[dict]) -> list[str]:
    """Lines of markdown: gpipe's seed spread, plateau exit of every reported run, updates and
    wall time per run."""
    reported = [r for r in records if not r["tuning"] and r["stages"] == r["trained_stages"]]
    lines = []
    gpipe = [r["val_loss"] for r in reported if r["method"] == "gpipe" and r["chosen_lr"]]
    if len(gpipe) > 1:
        lines.append(f"- gpipe (M = 4) final validation loss over seeds 1-3: "
                     f"{', '.join(f'{x:.4f}' for x in gpipe)}; mean {statistics.fmean(gpipe):.4f}, "
                     f"std {statistics.stdev(gpipe):.4f} (criterion: <= 0.02)")
    lines += ["", "| method | K | lr | seed | final val | left the plateau (val < 3.00) at microbatch | % of budget "
              "| updates | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(reported, key=lambda r: (r["method"], r["stages"], r["lr"], r["seed"])):
        budget = r["updates"] * r["microbatches_per_update"]
        exit_step = next((e["step"] for e in r["evals"] if e["val_loss"] < PLATEAU), None)
        at = None if exit_step is None else exit_step * r["microbatches_per_update"]
        pct = "never" if at is None else f"{100 * at / budget:.0f}%"
        lines.append(f"| {r['method']} | {r['stages']} | {r['lr']:g} | {r['seed']} | {r['val_loss']:.4f} | "
                     f"{at if at is not None else 'never'} | {pct} | {r['updates']} | {r['wall_time_s']:.0f} |")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run (or finish) the sweeps first")
    parser.add_argument("--sweeps", default="abc", help="which sweeps (letters)")
    args = parser.parse_args(argv)
    for name in args.sweeps:
        print(" ".join(command(name)[1:]))
        if args.run:
            subprocess.run(command(name), check=True)
        else:  # refresh the data files of the finished runs
            subprocess.run(command(name) + ["--report-only"], check=True, stdout=subprocess.DEVNULL)
        src = Path(f"runs/conv_{name}")
        if (src / "runs.csv").is_file():
            (DATA / name).mkdir(parents=True, exist_ok=True)
            for f in ("runs.csv", "curves.csv"):
                shutil.copy(src / f, DATA / name / f)
    folders = [DATA / name for name in args.sweeps if (DATA / name / "runs.csv").is_file()]
    report_from_data(folders, REPORT, header="# Convergence benchmark: every sweep together")
    records = [r for f in folders for r in read_data(f)]
    checks = "\n".join(regime_checks(records))
    (REPORT / "regime.md").write_text("# Regime checks (configs/bench.toml)\n\n" + checks + "\n")
    print((REPORT / "summary.md").read_text())
    print(checks)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
