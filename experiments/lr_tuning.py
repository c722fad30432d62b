"""The learning rate of every method at K = 8 and at K = 32, on a grid extended until the best
value is interior (issue 19, "tuning that cannot hide an optimum"), from the repository root.

    python experiments/lr_tuning.py --run     # the sweeps (resumable), then the table
    python experiments/lr_tuning.py           # the table of the runs finished so far

configs/bench.toml (2,000 microbatches), the tuning seed 0 of the convergence benchmark, the
simulator. Every method is tuned at K = 8 and at K = 32 separately (the convergence benchmark
tuned once, at K = 8, on {3e-4, 1e-3, 3e-3}, and most methods chose the top of that grid). The
synchronous references (gpipe: AdamW, gpipe-muon: Muon) do not depend on K and are tuned once.
The sweeps write runs/lr_<x>/:
- tune: half-decades 1e-3, 3e-3, 1e-2 for pipedream, nesterov, muon, muon-wp and muon-wp-ef
  (the best method of docs/results/convergence.md at K = 8);
- up: 3e-2 where the best of the grid was 1e-2 (the top edge): muon-wp-ef and pipedream at K = 8;
- down: 3e-4 where it was 1e-3 (the bottom edge): muon at K = 32, nesterov at K = 8;
- sync: gpipe at 1e-3, 3e-3 and 1e-2; syncm: gpipe-muon at 1e-2, 3e-2 and 1e-1 (Muon's lr at
  M = 4 sits a decade above AdamW's: on seed 1, docs/results/slow_links.md found 3e-2 best);
  syncup: gpipe at 3e-2 (1e-2 was the top edge on seed 0);
- seed1, seed1n: a second seed (1) where the optimum at K = 8 moved off the convergence
  benchmark's 3e-3: pipedream and muon-wp-ef at 1e-2, nesterov at 1e-3;
- warmup: optim.warmup_fraction 0.02 and 0.2 (default 0.06) for muon-wp and pipedream at K = 32;
  warmup2: pipedream without warm-up (0.02 was its edge) and nesterov at 0.02;
- seeds23, seeds23n: seeds 2 and 3 at those K = 8 lrs, for a 3-seed table at the tuned lr;
- k1n, k1ef: their K = 1 controls at those lrs (seeds 1-3), for the delay penalty at the tuned lr.
The runs at 3e-3 on seeds 1-3 that the last tables compare with are not run again:
compression.py (k8), corrections.py (k8w) and run_length.py (2k) made them, same config, same
numerics (BASE_3E3).
The data files go to docs/results/data/lr_tuning/<x>/; the table (seed 0) marks a best value
that is still on the edge of what was tried; the next tables say whether seed 1 agrees, what
the warm-up does at K = 32, and what the tuned lr gives over seeds 1-3, paired by seed.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from paired_runs import best_of, mean_se, read_runs, run_sweeps

DATA = Path("docs/results/data/lr_tuning")
METHODS = ["gpipe", "gpipe-muon", "pipedream", "nesterov", "muon", "muon-wp", "muon-wp-ef"]
SWEEPS = {
    "tune": (METHODS[2:], "8,32", "0", "1e-3,3e-3,1e-2"),
    "up": (["muon-wp-ef@8", "pipedream@8"], "8,32", "0", "3e-2"),
    "down": (["muon@32", "nesterov@8"], "8,32", "0", "3e-4"),
    "sync": (["gpipe"], "8", "0", "1e-3,3e-3,1e-2"),
    "syncm": (["gpipe-muon"], "8", "0", "1e-2,3e-2,1e-1"),
    "syncup": (["gpipe"], "8", "0", "3e-2"),
    "seed1": (["pipedream@8", "muon-wp-ef@8"], "8,32", "1", "1e-2"),
    "seed1n": (["nesterov@8"], "8,32", "1", "1e-3"),
    "warmup": ([f"{m}:optim.warmup_fraction={w}" for m in ("muon-wp", "pipedream") for w in (0.2, 0.02)], "32", "0",
               "3e-3"),
    "warmup2": (["pipedream:optim.warmup_fraction=0.0", "nesterov:optim.warmup_fraction=0.02"], "32", "0", "3e-3"),
    "seeds23": (["pipedream@8", "muon-wp-ef@8"], "8,32", "2,3", "1e-2"),
    "seeds23n": (["nesterov@8"], "8,32", "2,3", "1e-3"),
    "k1n": (["nesterov"], "1", "1,2,3", "1e-3"),
    "k1ef": (["muon-wp-ef"], "1", "1,2,3", "1e-2"),
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
            best = best_of(losses)
            tried = sorted(losses)
            interior = tried[0] < best < tried[-1]
            cells = [(f"**{losses[lr]:.4f}**" if lr == best else f"{losses[lr]:.4f}") if lr in losses else ""
                     for lr in lrs]
            lines.append(f"| {method} | {'any' if method in sync else K} | " + " | ".join(cells)
                         + f" | {best:g} | {'yes' if interior else 'NO: on the edge'} |")
    return lines


# The seed-1 runs at 3e-3 on configs/bench.toml that other experiments made: (data folder, methods)
BASE_3E3 = [(Path("docs/results/data/run_length/2k"), {"pipedream": "pipedream", "nesterov": "nesterov"}),
            (Path("docs/results/data/corrections/k8w"), {"muon-wp-ef": "muon-wp-ef"}),
            (Path("docs/results/data/compression/k8"), {
                f"{m}:link.compress_activations=none:link.compress_gradients=none": m for m in ("pipedream", "nesterov")})]


def base_runs() -> list[dict]:
    """The runs of BASE_3E3 under their plain method names, lr 3e-3, one per (method, K, seed)
    (the same run made by two experiments is the same number, bit for bit)."""
    out = {}
    for folder, names in BASE_3E3:
        for r in read_runs(folder):
            if r["method"] in names:
                r = dict(r, method=names[r["method"]], lr=3e-3)
                out.setdefault((r["method"], r["stages"], r["seed"]), r)
    return list(out.values())


FLAT = 0.01  # a loss difference this small between two lrs is within the matrix optimizers' seed spread


def second_seed(records: list[dict], base: list[dict]) -> list[str]:
    """Seed 1 at the lr seed 0 chose against seed 1 at 3e-3 (`base`), for every method and K
    that has both: does the second seed agree that the optimum moved?"""
    lines = ["| method | K | seed-0 best lr | seed 1 at 3e-3 | seed 1 at seed 0's best | difference | agrees? |",
             "|---|---|---|---|---|---|---|"]
    seed0 = [r for r in records if r["seed"] == 0]
    for r in sorted((r for r in records if r["seed"] == 1), key=lambda r: (METHODS.index(r["method"]), r["stages"])):
        at_3e3 = [b["val_loss"] for b in base if (b["method"], b["stages"], b["seed"]) == (r["method"], r["stages"], 1)]
        tried = {x["lr"]: x["val_loss"] for x in seed0 if (x["method"], x["stages"]) == (r["method"], r["stages"])}
        if not at_3e3 or not tried:
            continue
        best0 = best_of(tried)
        diff = r["val_loss"] - at_3e3[0]
        verdict = "yes" if diff < -FLAT else "no: 3e-3 is better" if diff > FLAT else f"flat (within {FLAT})"
        chosen = f"{best0:g}" if r["lr"] == best0 else f"{best0:g} (run at {r['lr']:g})"
        lines.append(f"| {r['method']} | {r['stages']} | {chosen} | {at_3e3[0]:.4f} | {r['val_loss']:.4f} | "
                     f"{diff:+.4f} | {verdict} |")
    return lines


def tuned_table(records: list[dict], base: list[dict]) -> list[str]:
    """The reported seeds (1-3) at a tuned lr other than 3e-3 against the same seeds at 3e-3
    (`base`), paired by seed: mean losses and the mean paired difference +- its s.e."""
    at_3e3 = {(r["method"], r["stages"], r["seed"]): r["val_loss"] for r in base}
    groups: dict[tuple, list[tuple[int, float, float]]] = {}
    for r in records:
        key = (r["method"], r["stages"], r["seed"])
        if r["seed"] > 0 and r["lr"] != 3e-3 and key in at_3e3 and r["method"] in METHODS:
            groups.setdefault((r["method"], r["stages"], r["lr"]), []).append((r["seed"], at_3e3[key], r["val_loss"]))
    lines = ["| method | K | lr | seeds | loss at 3e-3 | loss at lr | paired difference +- s.e. |",
             "|---|---|---|---|---|---|---|"]
    for (method, K, lr), rows in sorted(groups.items(), key=lambda kv: (METHODS.index(kv[0][0]), kv[0][1:])):
        rows.sort()
        lines.append(f"| {method} | {K} | {lr:g} | {','.join(str(s) for s, _, _ in rows)} | "
                     f"{statistics.fmean(b for _, b, _ in rows):.4f} | {statistics.fmean(v for _, _, v in rows):.4f} | "
                     f"{mean_se([v - b for _, b, v in rows])} |")
    return lines


def penalty_table(records: list[dict]) -> list[str]:
    """The delay penalty at the tuned lr: loss at K minus the K = 1 control's, same method, lr
    and seed (seeds 1-3), mean +- the s.e. of the paired differences."""
    loss = {(r["method"], r["stages"], r["seed"], r["lr"]): r["val_loss"] for r in records if r["seed"] > 0}
    groups: dict[tuple, list[float]] = {}
    for (method, K, seed, lr), value in sorted(loss.items()):
        control = loss.get((method, 1, seed, lr))
        if K > 1 and control is not None:
            groups.setdefault((method, K, lr), []).append(value - control)
    lines = ["| method | K | lr | seeds | delay penalty (mean +- s.e.) |", "|---|---|---|---|---|"]
    for (method, K, lr), diffs in groups.items():
        lines.append(f"| {method} | {K} | {lr:g} | {len(diffs)} | {mean_se(diffs)} |")
    return lines


WARMUP_DEFAULT = 0.06  # optim.warmup_fraction of configs/bench.toml (the config's default)


def warmup_table(records: list[dict]) -> list[str]:
    """The warm-up fraction at K = 32 (seed 0, lr 3e-3): the runs of sweep warmup, whose method
    labels carry optim.warmup_fraction, beside the tuning run with the default fraction."""
    by = {}
    for r in records:
        method, _, override = r["method"].partition(":optim.warmup_fraction=")
        if r["seed"] == 0 and r["stages"] == 32 and r["lr"] == 3e-3 and (override or method in METHODS):
            by.setdefault(method, {})[float(override) if override else WARMUP_DEFAULT] = r["val_loss"]
    by = {m: losses for m, losses in by.items() if len(losses) > 1}
    fractions = sorted({w for losses in by.values() for w in losses})
    lines = ["| method | K | " + " | ".join(f"warm-up {w:g}" for w in fractions) + " | best |",
             "|---|---|" + "---|" * len(fractions) + "---|"]
    for method, losses in by.items():
        best = best_of(losses)
        lines.append(f"| {method} | 32 | " + " | ".join(f"{losses[w]:.4f}" if w in losses else "" for w in fractions)
                     + f" | {best:g} |")
    return lines


def main(argv: list[str]) -> int:
    run_sweeps(argv, __doc__.split("\n\n")[0], {k: v for k, v in SWEEPS.items() if v[0]}, command, "lr_", DATA,
               methods=labels)
    records = [r for name in SWEEPS for r in read_runs(DATA / name)]
    print("\n".join(table([r for r in records if r["seed"] == 0])))
    base = base_runs()
    print("\nThe second seed:\n" + "\n".join(second_seed(records, base)))
    print("\nThe warm-up at K = 32:\n" + "\n".join(warmup_table(records)))
    print("\nSeeds 1-3 at the tuned lr, against 3e-3:\n" + "\n".join(tuned_table(records, base)))
    print("\nThe delay penalty at the tuned lr:\n" + "\n".join(penalty_table(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
