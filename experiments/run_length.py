"""The delay penalty against run length (issue 19): the same methods at K = 8 and 32 and their
K = 1 controls, trained for 2,000 and for 8,000 (one method: 32,000) microbatches on the benchmark regime
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
  2k and 8k serve: the same method, seed, length and machine);
- 2k32ef, 8k32ef: muon-wp-ef (the best method at K = 32 in docs/results/slow_links.md) at
  K = 32, seed 1: no K = 1 control (error feedback changes the update at K = 1 too), so it
  enters the comparison with the synchronous reference only;
- 2k32s23, 8k32s23: muon-wp (the closest method to the target) at K = 32 and K = 1, seeds 2 and 3;
- 8ksync: the best synchronous schedule (gpipe-muon, M = 4, lr 3e-2, evaluated every 160
  microbatches) for 8,000 microbatches, seeds 2 and 3 (seed 1's run, and every seed's run of
  2,000, are in docs/results/data/slow_links); 32ksync: the same for 32,000 microbatches, seed 1;
- 32k32, 32k1: muon-wp at K = 32 and K = 1, seed 1, 32,000 microbatches (evaluated every 320);
- 8k32c3, 32k32c3: muon-wp-ef with the error feedback's c at 3 (EF_C3: the best c at K = 32 of
  corrections.py's first c probes, {0.3, 1, 3, 10}) at K = 32, seed 1, 8,000 microbatches with
  its K = 1 control and 32,000 without one; 8k32c3s2, 8k32c3s3: the same at 8,000 on seeds 2 and 3, without K = 1
  controls (they enter the comparison with the synchronous reference). Its runs of 2,000
  microbatches are the c probes' (corrections.py's data, C_SWEEPS: the same regime, evaluation
  interval and machine);
- 8k32c5, 8k32c5s2, 8k32c5s3: the same at c = 5 (EF_C5: better than 3 and 10 at K = 32 in the
  later c probes), seeds 1-3, 8,000 microbatches, no K = 1 controls; its runs of 2,000 are the
  c probes' too.
The delay penalty of a run is its final validation loss minus its K = 1 control's (same method,
seed and length). Both lengths run on the same machine: runs on two CPUs differ
(docs/results/compression.md). The data files go to docs/results/data/run_length/<x>/.
"""

from __future__ import annotations

import csv
import math
import statistics
import sys
from pathlib import Path

from corrections import DATA as CORRECTIONS
from corrections import EF_C3  # muon-wp-ef with the error feedback's c at 3
from corrections import EF_C5  # at c = 5, the best c at K = 32 in the c probes
from paired_runs import mean_se, read_data, read_runs, run_sweeps

METHODS = ["pipedream", "nesterov", "muon-wp"]
EF = ["muon-wp-ef"]  # the best method at K = 16 and 32 in docs/results/slow_links.md
SYNC_METHOD, SYNC_LR = "gpipe-muon", 3e-2  # the best synchronous schedule (M = 4 by default), tuned
STAGES = (8, 32)
ORDER = METHODS + EF + [EF_C3, EF_C5]  # the order of the rows
LENGTH = {"2k": (2000, 80), "8k": (8000, 320), "32k": (32000, 320)}  # microbatches, evaluation interval
# name -> (length, seeds, K, with K = 1 controls, methods)
SWEEPS = {"2k": ("2k", "1", 8, True, METHODS), "8k": ("8k", "1", 8, True, METHODS),
          "2k23": ("2k", "2,3", 8, True, METHODS), "8k23": ("8k", "2,3", 8, True, METHODS),
          "2k32": ("2k", "1", 32, False, METHODS), "8k32": ("8k", "1", 32, False, METHODS),
          "2k32ef": ("2k", "1", 32, False, EF), "8k32ef": ("8k", "1", 32, False, EF),
          "2k32s23": ("2k", "2,3", 32, True, ["muon-wp"]), "8k32s23": ("8k", "2,3", 32, True, ["muon-wp"]),
          "8ksync": ("8k", "2,3", 1, False, [SYNC_METHOD]),
          "32k32": ("32k", "1", 32, False, ["muon-wp"]), "32k1": ("32k", "1", 1, False, ["muon-wp"]),
          "8k32c3": ("8k", "1", 32, True, [EF_C3]), "32k32c3": ("32k", "1", 32, False, [EF_C3]),
          "8k32c3s2": ("8k", "2", 32, False, [EF_C3]), "8k32c3s3": ("8k", "3", 32, False, [EF_C3]),
          "32ksync": ("32k", "1", 1, False, [SYNC_METHOD]),
          "8k32c5": ("8k", "1", 32, False, [EF_C5]), "8k32c5s2": ("8k", "2", 32, False, [EF_C5]),
          "8k32c5s3": ("8k", "3", 32, False, [EF_C5])}
DATA = Path("docs/results/data/run_length")
# the runs of 2,000 microbatches at c = 3 and 5: corrections.py's c probes (same regime, evaluation
# interval and machine), at K = 1 and 32
C_SWEEPS = {EF_C3: ("c1", "c32", "c1s2", "c32s2", "c1s3", "c32s3"), EF_C5: ("c5k", "c5k32", "c5s3", "c5s23")}


def corrections_ef(read) -> list[dict]:
    """EF_C3's and EF_C5's runs in corrections.py's data (C_SWEEPS), read with read_runs or read_data."""
    return [r for method, names in C_SWEEPS.items() for name in names for r in read(CORRECTIONS / name)
            if r["method"] == method and r["stages"] in (1, 32)]


def command(name: str, jobs: int) -> list[str]:
    length, seeds, stages, controls, methods = SWEEPS[name]
    budget, every = LENGTH[length]
    sync = methods == [SYNC_METHOD]
    if sync:  # evaluated as often as seed 1's run in docs/results/data/slow_links (every 160)
        every //= 2
    return [sys.executable, "-m", "pipenag", "sweep", "--config", "configs/bench.toml", "--methods", ",".join(methods),
            "--stages", str(stages), "--seeds", seeds, "--lrs", str(SYNC_LR) if sync else "3e-3",
            "--jobs", str(jobs),
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


def table(records: list[dict]) -> list[str]:
    lines = ["| method | K | microbatches | seeds | loss K = 1 | loss at K | delay penalty (mean +- s.e.) |",
             "|---|---|---|---|---|---|---|"]
    for K in STAGES:
        pens = penalties(records, K)
        for method in ORDER:
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
        for method in ORDER:
            short = {s: p for s, _, p in pens.get((method, "2k"), [])}
            exponents = []
            for seed, _, p in pens.get((method, "8k"), []):
                if seed in short:
                    ratio = p / short[seed]
                    exponent = f"{math.log(ratio) / math.log(4):+.2f}" if ratio > 0 else "n/a (sign change)"
                    exponents += [math.log(ratio) / math.log(4)] if ratio > 0 else []
                    lines.append(f"| {method} | {K} | {seed} | {short[seed]:+.4f} | {p:+.4f} | {ratio:.2f} | {exponent} |")
            if len(exponents) > 1:
                se = statistics.stdev(exponents) / math.sqrt(len(exponents))
                lines.append(f"| {method} | {K} | mean of {len(exponents)} | | | | "
                             f"{statistics.fmean(exponents):+.2f} +- {se:.2f} |")
    return lines


def trend_table(records: list[dict]) -> list[str]:
    """The seeds with runs of every length: each penalty, the penalty at the longest length that
    the exponent of the two shorter ones predicts, the exponent between the two longest, and the
    least-squares exponent over all of them (log penalty against log length)."""
    lengths = list(LENGTH)
    if len(lengths) < 3:
        return []
    mid, long = lengths[-2:]
    ns = [LENGTH[length][0] for length in lengths]
    lines = ["| method | K | seed | " + " | ".join(f"penalty at {n:,}" for n in ns)
             + f" | predicted at {LENGTH[long][0]:,} | exponent {mid} to {long} | least-squares exponent |",
             "|---|---|---|" + "---|" * (len(ns) + 3)]
    for K in STAGES:
        pens = penalties(records, K)
        for method in METHODS:
            by = {length: {s: p for s, _, p in pens.get((method, length), [])} for length in lengths}
            for seed in sorted(set.intersection(*(set(v) for v in by.values()))):
                ps = [by[length][seed] for length in lengths]
                cells = " | ".join(f"{p:+.4f}" for p in ps)
                if min(ps) <= 0:
                    lines.append(f"| {method} | {K} | {seed} | {cells} | n/a (sign change) | | |")
                    continue
                p_short, p_mid, p_long = ps[-3:]
                step = math.log(ns[-1] / ns[-2])
                a = math.log(p_mid / p_short) / math.log(ns[-2] / ns[-3])
                xs, ys = [math.log(n) for n in ns], [math.log(p) for p in ps]
                mx, my = statistics.fmean(xs), statistics.fmean(ys)
                fit = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
                lines.append(f"| {method} | {K} | {seed} | {cells} | {p_mid * math.exp(a * step):+.4f} | "
                             f"{math.log(p_long / p_mid) / step:+.2f} | {fit:+.2f} |")
    return lines if len(lines) > 2 else []


def plot(records: list[dict], path: Path) -> None:
    """The delay penalty against the run's length, one line per method and K: the mean over the
    seeds that have runs of every length the line has (so a seed run at one length only does
    not move a point), on log-log axes when every penalty is positive (a power law is straight)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    positive = True
    for K, style in zip(STAGES, ("-", "--")):
        pens = penalties(records, K)
        for i, method in enumerate(METHODS):
            lengths = [length for length in LENGTH if pens.get((method, length))]
            if not lengths:
                continue
            seeds = set.intersection(*({s for s, _, _ in pens[(method, length)]} for length in lengths))
            points = [(LENGTH[length][0], statistics.fmean(p for s, _, p in pens[(method, length)] if s in seeds))
                      for length in lengths]
            if seeds:
                xs, ys = zip(*points)
                positive &= min(ys) > 0
                ax.plot(xs, ys, style, marker="o", color=f"C{i}",
                        label=f"{method}, K = {K} (seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, sorted(seeds)))})")
    ax.set_xscale("log")
    ax.set_xticks([n for n, _ in LENGTH.values()], [f"{n:,}" for n, _ in LENGTH.values()])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    if positive:
        ax.set_yscale("log")
    ax.set_xlabel("run length (microbatches of 8 x 64 tokens)")
    ax.set_ylabel("delay penalty (loss - K = 1 loss)")
    if not positive:
        ax.axhline(0.0, color="k", lw=0.6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


SYNC = Path("docs/results/data/slow_links")  # where the best synchronous schedule's runs are
TOKENS_PER_MICROBATCH = 8 * 64  # configs/bench.toml: 8 sequences of 64 tokens


def sync_reference(runs: list[dict], curves: list[dict]) -> dict[tuple[int, int], tuple[float, list[tuple[int, float]]]]:
    """(seed, microbatches) -> the final loss and the curve [(microbatch, loss)] of the best
    synchronous schedule of this regime, gpipe-muon at M = 4 and lr 3e-2 without a codec
    (docs/results/slow_links.md tuned it), from the rows of SYNC's runs.csv and curves.csv; two
    runs for one key must agree."""
    def ours(r: dict) -> bool:
        return (r["method"], r["M"], r["codec"], float(r["lr"])) == (SYNC_METHOD, "4", "none", SYNC_LR)

    def key(r: dict) -> tuple[int, int]:
        return int(r["seed"]), int(r["budget"]) // TOKENS_PER_MICROBATCH

    return merge_sync(*({key(r): (float(r["val_loss"]),
                                  sorted({(int(c["tokens"]) // TOKENS_PER_MICROBATCH, float(c["val_loss"]))
                                          for c in curves if ours(c) and key(c) == key(r)}))}
                        for r in filter(ours, runs)))


def sync_of_runs(records: list[dict]) -> dict[tuple[int, int], tuple[float, list[tuple[int, float]]]]:
    """sync_reference's map from this experiment's own synchronous runs (sweep 8ksync, as
    read_data reads them): microbatches from tokens, since an update of gpipe-muon takes M = 4."""
    return {(r["seed"], r["tokens"] // TOKENS_PER_MICROBATCH):
            (r["val_loss"], [(c["tokens"] // TOKENS_PER_MICROBATCH, c["val_loss"]) for c in r["curve"]])
            for r in records if r["method"] == SYNC_METHOD and r.get("lr") == SYNC_LR}


def load_sync(data: list[dict]) -> dict[tuple[int, int], tuple[float, list[tuple[int, float]]]]:
    """sync_reference's map from SYNC's data files and this experiment's own synchronous runs
    among `data` (read_data's runs)."""
    with open(SYNC / "runs.csv", newline="") as f, open(SYNC / "curves.csv", newline="") as g:
        sync = sync_reference(list(csv.DictReader(f)), list(csv.DictReader(g)))
    return merge_sync(sync, sync_of_runs(data))


def merge_sync(*maps: dict) -> dict:
    """One map of synchronous references from several; two runs for one key must agree."""
    out: dict = {}
    for m in maps:
        for key, value in m.items():
            if out.setdefault(key, value)[0] != value[0]:
                raise ValueError(f"two synchronous runs for seed {key[0]}, {key[1]} microbatches differ")
    return out


def curve_of(run: dict) -> list[tuple[int, float]]:
    """A run's evaluations as read_data reads them: [(microbatch, validation loss)] (an update of
    the asynchronous methods is one microbatch)."""
    return [(c["step"], c["val_loss"]) for c in run["curve"]]


def first_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """The first evaluated microbatch whose validation loss is at or below target."""
    return next((mb for mb, loss in curve if loss <= target), None)


def reach(run: dict, sync: dict) -> tuple[int | None, int | None] | None:
    """(the first evaluation of the run at or below the synchronous loss of the shortest run at
    its seed, the first evaluation of the synchronous run of the run's length there); None when
    the seed has no such references."""
    n, short = run["updates"], LENGTH["2k"][0]
    if (run["seed"], n) not in sync or (run["seed"], short) not in sync:
        return None
    target = sync[(run["seed"], short)][0]
    return (first_reach(curve_of(run), target),
            first_reach(sync[(run["seed"], n)][1], target))


def sync_table(runs: list[dict], sync: dict) -> list[str]:
    """Every run against the best synchronous schedule at its seed: the gap at the same run
    length, and the first evaluation (microbatch) at which it reaches the synchronous loss of the
    shortest run (the project's target: at most 1.1x the synchronous tokens at K = 32). The last
    column divides that microbatch by the one at which the synchronous run of the same length
    reaches the same loss: both curves then come from the same cosine schedule, mid-way. A
    second table gives the seed mean of the ratios of the runs that reach the loss."""
    short = LENGTH["2k"][0]
    lines = ["| method | K | microbatches | seed | loss | synchronous loss | gap | reaches the synchronous "
             f"{short:,}-microbatch loss at | synchronous run of this length reaches it at | token ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    def label(reached: int | None, ref_reached: int | None, n: int) -> str:
        return (f"{reached / ref_reached:.2f}x" if reached and ref_reached else
                f"> {n / ref_reached:.2f}x" if ref_reached else "")

    ratios: dict[tuple[str, int, int], list[tuple[int | None, int | None]]] = {}
    for r in sorted(runs, key=lambda r: (r["stages"], ORDER.index(r["method"]), r["updates"], r["seed"])):
        n = r["updates"]
        got = reach(r, sync)
        if got is None:
            continue
        reached, ref_reached = got
        ratios.setdefault((r["method"], r["stages"], n), []).append(got)
        ref = sync[(r["seed"], n)][0]
        lines.append(f"| {r['method']} | {r['stages']} | {n:,} | {r['seed']} | {r['val_loss']:.4f} | {ref:.4f} | "
                     f"{r['val_loss'] - ref:+.4f} | {f'{reached:,}' if reached else 'not reached'} | "
                     f"{f'{ref_reached:,}' if ref_reached else ''} | {label(reached, ref_reached, n)} |")
    lines += ["", "| method | K | microbatches | token ratio per seed | mean +- s.e. (seeds that reach it) |",
              "|---|---|---|---|---|"]
    for (method, K, n), per_seed in ratios.items():
        reached = [round(a / b, 2) for a, b in per_seed if a and b]  # the ratios as the table prints them
        mean = (f"{statistics.fmean(reached):.2f}x" + (f" +- {statistics.stdev(reached) / math.sqrt(len(reached)):.2f}"
                                                      if len(reached) > 1 else "")) if reached else "none reach it"
        if reached and len(reached) < len(per_seed):
            mean += f" ({len(reached)} of {len(per_seed)} seeds)"
        lines.append(f"| {method} | {K} | {n:,} | {', '.join(label(a, b, n) for a, b in per_seed)} | {mean} |")
    return lines


def best_reach_table(runs: list[dict], sync: dict) -> list[str]:
    """Tokens to each synchronous loss of a seed (the final loss of its run of every length),
    each side with its best run: the first evaluation at or below the loss over all the
    method's runs at that K and seed, of any length, against the same over the seed's
    synchronous runs. Unlike sync_table, a run needs no synchronous run of its own length; the
    two curves may come from different cosine schedules. A target that the method's longest run
    misses and that the synchronous run reaches only after it has no row (its bound would be
    below 1x)."""
    def best(curves: list[tuple[int, list[tuple[int, float]]]], target: float) -> tuple[int, int] | None:
        hits = [(mb, n) for n, curve in curves if (mb := first_reach(curve, target)) is not None]
        return min(hits) if hits else None

    lines = ["| method | K | seed | synchronous loss (its run's length) | reached at (run length) | synchronous run "
             "reaches it at (run length) | token ratio |", "|---|---|---|---|---|---|---|"]
    groups: dict[tuple[str, int, int], list[tuple[int, list[tuple[int, float]]]]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["stages"], r["seed"]), []).append(
            (r["updates"], curve_of(r)))
    for (method, K, seed), curves in sorted(groups.items(), key=lambda kv: (kv[0][1], ORDER.index(kv[0][0]), kv[0][2])):
        longest = max(n for n, _ in curves)
        refs = sorted((n, value) for (s, n), value in sync.items() if s == seed)
        for n_ref, (target, _) in refs:
            theirs = best([(n, curve) for n, (_, curve) in refs], target)
            ours = best(curves, target)
            if theirs is None or (ours is None and longest < theirs[0]):
                continue  # a run that stops before the synchronous one gets there says nothing
            got = f"{ours[0]:,} ({ours[1]:,})" if ours else f"not reached in {longest:,}"
            ratio = f"{ours[0] / theirs[0]:.2f}x" if ours else f"> {longest / theirs[0]:.2f}x"
            lines.append(f"| {method} | {K} | {seed} | {target:.4f} ({n_ref:,}) | {got} | {theirs[0]:,} ({theirs[1]:,}) "
                         f"| {ratio} |")
    return lines


FRACTIONS = (0.125, 0.25, 0.5, 1.0)


MUON_K1 = "muon-wp"  # at K = 1 muon-wp is Muon bit for bit (no delay to predict across)


def same_schedule_table(runs: list[dict], K: int = 32, sync: dict | None = None) -> list[str]:
    """Tokens at K against tokens at K = 1 inside the same run length (the same cosine schedule):
    for the K = 1 run's evaluation at each fraction of the run, the first evaluation at which the
    run at K reaches that loss, divided by the first at which the K = 1 run does. A ratio read at
    the end of the K = 1 run needs the run at K to get there within the same length. Each run at
    K is read against its own method's K = 1 run and, for a method other than muon-wp, also
    against Muon's (MUON_K1's) K = 1 run of the same seed and length, and against the best
    synchronous schedule's run of the same seed and length where `sync` (sync_reference's map)
    has one: the project's target read inside one schedule."""
    curves = {(r["method"], r["stages"], r["updates"], r["seed"]): curve_of(r) for r in runs}
    lines = ["| method | microbatches | seed | K = 1 run | " + " | ".join(f"at {f:g} of the run" for f in FRACTIONS) + " |",
             "|---|---|---|---|" + "---|" * len(FRACTIONS)]
    for (method, stages, n, seed), deep in sorted(curves.items(), key=lambda kv: (ORDER.index(kv[0][0]), kv[0][2], kv[0][3])):
        if stages != K or not deep:
            continue
        refs = [("its own" if reference == method else f"Muon's ({reference})", curves.get((reference, 1, n, seed)))
                for reference in dict.fromkeys([method, MUON_K1])]
        refs.append((f"synchronous ({SYNC_METHOD})", (sync or {}).get((seed, n), (None, None))[1]))
        for label, flat in refs:
            if not flat:
                continue
            cells = []
            for f in FRACTIONS:
                _, target = min(flat, key=lambda c: abs(c[0] - f * n))
                theirs, ours = first_reach(flat, target), first_reach(deep, target)
                cells.append(f"{target:.4f}: {ours / theirs:.2f}x" if ours else f"{target:.4f}: > {n / theirs:.2f}x")
            lines.append(f"| {method} | {n:,} | {seed} | {label} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str]) -> int:
    run_sweeps(argv, __doc__.split("\n\n")[0], SWEEPS, command, "run_length_", DATA, lambda name: SWEEPS[name][4])
    records = [dict(r, length=SWEEPS[name][0]) for name in SWEEPS for r in read_runs(DATA / name)]
    records += [dict(r, length="2k") for r in corrections_ef(read_runs)]
    print("\n".join(table(records)))
    trend = trend_table(records)
    if trend:
        print("\nThe seeds with runs of every length:")
        print("\n".join(trend))
    data = [r for name in SWEEPS for r in read_data(DATA / name)] + corrections_ef(read_data)
    sync = load_sync(data)
    print("\nAgainst the best synchronous schedule (gpipe-muon, M = 4, lr 3e-2):")
    print("\n".join(sync_table([r for r in data if r["method"] != SYNC_METHOD], sync)))
    print("\nEach side's best run of any length:")
    print("\n".join(best_reach_table([r for r in data if r["method"] != SYNC_METHOD], sync)))
    print("\nK = 32 against K = 1 and the synchronous schedule in the same schedule (the reference's loss at a fraction"
          " of the run: the token ratio to it):")
    print("\n".join(same_schedule_table([r for r in data if r["method"] != SYNC_METHOD], sync=sync)))
    if records:
        plot(records, Path("docs/results/run_length.png"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
