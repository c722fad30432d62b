"""The delay corrections of issue 19 against their base methods, paired by seed, on the benchmark
regime (configs/bench.toml), from the repository root.

    python experiments/corrections.py --run     # the sweeps (resumable), then the table
    python experiments/corrections.py           # the table of the runs finished so far

The sweeps (`pipenag sweep`, seeds 1-3, lr 3e-3: the lr the convergence benchmark tuned
pipedream and muon to, docs/results/convergence.md; not tuned for the corrections) write
runs/corrections_<x>/:
- k8: at K = 8, pipedream and its corrections pipedream-ef (error feedback on AdamW's update,
  c = 1) and pipedream-dc (DC-ASGD, lambda = 0.04), muon and muon-ef (c = 1);
- k32m: muon and muon-ef at K = 32;
- k32: pipedream, pipedream-ef and pipedream-dc at K = 32;
- k8w: muon-wp-ef (forward weight prediction and error feedback) at K = 8, paired with the
  muon-wp runs of compression.py's sweep k8, made on the same machine;
- k32w: muon-wp and muon-wp-ef at K = 32;
- k16w: the same at K = 16;
- k16e, k16m: the sweeps k32 and k32m at K = 16;
- k1w: muon-wp-ef at K = 1 (no delay: what error feedback does by itself), paired with the K = 1
  muon-wp runs of run_length.py (sweeps 2k and 2k32s23: the same runs, made on machines whose
  runs are equal bit for bit);
- k1e, k1f: pipedream and pipedream-ef at K = 1; k1m: muon-ef at K = 1, seed 1 (forward prediction
  is the identity without delay, so muon-ef there is muon-wp-ef of k1w bit for bit, as seed 1 shows);
- b8, b8sync: the EF paper's own setting at K = 8: PipeDream-2BW with Muon (a delay of one
  update, M = 8) with and without error feedback (b8), and synchronous GPipe with Muon at the
  same M and K (b8sync), all at lr 3e-2 (gpipe-muon's best lr at M = 8 in
  docs/results/slow_links.md), paired with the synchronous run as well as with each other;
- b8lr: the two 2BW methods at lr 1e-2, seed 1: whether 3e-2, tuned for the synchronous
  schedule, is too large for a delayed one;
- c1, c32: muon-wp-ef with the error feedback's c at 0.3 and 3 (besides 1, and 0, which is
  muon-wp bit for bit) at K = 1 and K = 32, seed 1 (c1s2, c32s2: seed 2; c32x, c1x: c = 10, since
  c = 3 was best at K = 32): if error feedback were a delay correction, its best c would grow
  with the delay; c32s3, c1s3: c = 3 on seed 3; c32xs2: c = 10 on seed 2;
- k8c3, k16c3: muon-wp-ef at c = 3 (EF_C3) at K = 8 and 16, seeds 1-3. EF_C3 is paired with
  muon-wp and with muon-wp-ef (c = 1) in the paired table, its runs in the c probes included;
  c8x, c16x: c = 10 at K = 8 and 16, seed 1, where c = 3 was the top of the grid; c5k32, c5k:
  c = 5 (EF_C5), between the two, at K = 32 (seeds 1, 2) and at K = 1, 8, 16 (seed 1);
  c5k16s23, c5s23: c = 5 at K = 16 and at K = 1 and 8 on seeds 2 and 3;
- c3lr32, c3lr8: EF_C3 at lr 1e-3 and 1e-2 (besides 3e-3), K = 32 and 8, seed 1: c and the lr
  tuned jointly (muon-wp-ef's lr was tuned at c = 1, where K = 8 chose 1e-2; docs/results/
  convergence.md, "The lr at depth"); c3lr8x: 3e-2 at K = 8 (1e-2 was the top edge there);
  c3lr8s23: 1e-2 at K = 8 on seeds 2 and 3; c3lr1, c3lr16: 1e-2 at K = 1 and 16, seed 1;
  c5lr8: EF_C5 at 1e-2, K = 8, seed 1;
- c5s3, c7k32: c = 5 at K = 32 on seed 3, c = 7 on seeds 1 and 2 (c = 5 beat 3 and 10 there).
The base methods are run again here, not read from the convergence benchmark's data: runs on
another CPU differ (docs/results/compression.md, "The uncompressed runs are made again here").
Every correction is paired with its base method at the same K and seed. The sweeps at depth
have no K = 1 controls of their own (the table is the correction's effect at a depth); the K = 1
sweeps (k1w, k1e, k1f, k1m) give the correction's effect without delay, from which
docs/results/convergence.md reads each correction's delay penalty. The data files go to
docs/results/data/corrections/<x>/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from paired_runs import paired, read_data, read_runs, run_sweeps

# The paper's own setting (arXiv 2606.30634): PipeDream-2BW (a delay of one update) with Muon,
# with and without error feedback, against the synchronous schedule at the same M = 8 and K.
SYNC_2BW, ASYNC_2BW = "gpipe-muon:pipeline.num_microbatches=8", "muon:pipeline.schedule=2bw"
def ef_at(c: str) -> str:
    """muon-wp-ef with the error feedback's c at c, as a sweep's method."""
    return f"muon-wp-ef:optim.ef_scale={c}"


EF_C3 = ef_at("3")  # the best c at K = 32 of {0.3, 1, 3, 10} (sweeps c32, c32s2)
EF_C5 = ef_at("5")  # better still at K = 32 (sweeps c5k32, c5s3)
EF_SCALES = ("0.3", "3")  # the error feedback's c probed besides its default 1 (and 0: muon-wp)
# (method, base): every correction against its base method, and the 2BW runs against synchronous
PAIRS = [("pipedream-ef", "pipedream"), ("pipedream-dc", "pipedream"), ("muon-ef", "muon"), ("muon-wp-ef", "muon-wp"),
         ("2bw-muon-ef", ASYNC_2BW), (ASYNC_2BW, SYNC_2BW), ("2bw-muon-ef", SYNC_2BW),
         (EF_C3, "muon-wp"), (EF_C3, "muon-wp-ef"), (EF_C5, "muon-wp"), (EF_C5, EF_C3)]
SWEEPS = {
    "k8": (["pipedream", "pipedream-ef", "pipedream-dc", "muon", "muon-ef"], "8", "1,2,3"),
    "k32m": (["muon", "muon-ef"], "32", "1,2,3"),
    "k32": (["pipedream", "pipedream-ef", "pipedream-dc"], "32", "1,2,3"),
    "k8w": (["muon-wp-ef"], "8", "1,2,3"),
    "k32w": (["muon-wp", "muon-wp-ef"], "32", "1,2,3"),
    "k16w": (["muon-wp", "muon-wp-ef"], "16", "1,2,3"),
    "k16e": (["pipedream", "pipedream-ef", "pipedream-dc"], "16", "1,2,3"),
    "k16m": (["muon", "muon-ef"], "16", "1,2,3"),
    "k1w": (["muon-wp-ef"], "1", "1,2,3"),
    "k1e": (["pipedream"], "1", "1,2,3"),
    "k1f": (["pipedream-ef"], "1", "1,2,3"),
    "k1m": (["muon-ef"], "1", "1"),
    "b8": ([ASYNC_2BW, "2bw-muon-ef"], "8", "1,2,3", "3e-2"),
    "b8sync": ([SYNC_2BW], "8", "1,2,3", "3e-2"),
    "b8lr": ([ASYNC_2BW, "2bw-muon-ef"], "8", "1", "1e-2"),
    "c1": ([ef_at(c) for c in EF_SCALES], "1", "1"),
    "c32": ([ef_at(c) for c in EF_SCALES], "32", "1"),
    "c1s2": ([ef_at(c) for c in EF_SCALES], "1", "2"),
    "c32s2": ([ef_at(c) for c in EF_SCALES], "32", "2"),
    "c32x": ([ef_at("10")], "32", "1"),
    "c1x": ([ef_at("10")], "1", "1"),
    "c32s3": ([EF_C3], "32", "3"),
    "c1s3": ([EF_C3], "1", "3"),
    "c32xs2": ([ef_at("10")], "32", "2"),
    "k8c3": ([EF_C3], "8", "1,2,3"),
    "k16c3": ([EF_C3], "16", "1,2,3"),
    "c8x": ([ef_at("10")], "8", "1"),
    "c16x": ([ef_at("10")], "16", "1"),
    "c3lr32": ([EF_C3], "32", "1", "1e-3,1e-2"),
    "c5k32": ([EF_C5], "32", "1,2"),
    "c3lr8": ([EF_C3], "8", "1", "1e-3,1e-2"),
    "c5k": ([EF_C5], "1,8,16", "1"),
    "c5s3": ([EF_C5], "32", "3"),
    "c7k32": ([ef_at("7")], "32", "1,2"),
    "c3lr8x": ([EF_C3], "8", "1", "3e-2"),
    "c3lr8s23": ([EF_C3], "8", "2,3", "1e-2"),
    "c3lr1": ([EF_C3], "1", "1", "1e-2"),
    "c3lr16": ([EF_C3], "16", "1", "1e-2"),
    "c5k16s23": ([EF_C5], "16", "2,3"),
    "c5lr8": ([EF_C5], "8", "1", "1e-2"),
    "c5s23": ([EF_C5], "1,8", "2,3"),
}
DATA = Path("docs/results/data/corrections")
# muon-wp at K = 8 (the base of k8w) is not run again: compression.py's sweep k8 ran it on the
# same machine ("a") as its uncompressed variant, which is muon-wp bit for bit
# (tests/test_compression.py).
COMPRESSION_K8 = Path("docs/results/data/compression/k8")
MACHINE_A = "AuthenticAMD family 26 model 2 stepping 1 AVX512"


def compression_muon_wp() -> list[dict]:
    none = "muon-wp:link.compress_activations=none:link.compress_gradients=none"
    return [dict(r, method="muon-wp", machine=MACHINE_A) for r in read_runs(COMPRESSION_K8) if r["method"] == none]


RUN_LENGTH = Path("docs/results/data/run_length")


def run_length_muon_wp_k1() -> list[dict]:
    """muon-wp's K = 1 runs of 2,000 microbatches from run_length.py's data (seeds 1-3), also as
    muon's: at K = 1 the two are the same run bit for bit (tests/test_methods.py,
    test_delay_corrections_are_their_base_method_at_one_stage)."""
    runs = [r for name in ("2k", "2k32s23") for r in read_runs(RUN_LENGTH / name)
            if r["method"] == "muon-wp" and r["stages"] == 1]
    return runs + [dict(r, method="muon") for r in runs]


def command(name: str, jobs: int) -> list[str]:
    methods, stages, seeds, *lr = SWEEPS[name]
    return [sys.executable, "-m", "pipenag", "sweep", "--config", "configs/bench.toml", "--methods", ",".join(methods),
            "--stages", stages, "--seeds", seeds, "--lrs", lr[0] if lr else "3e-3", "--no-k1-controls", "--jobs", str(jobs),
            "--out", f"runs/corrections_{name}"]


def table(records: list[dict]) -> list[str]:
    """The paired table: one line per correction and K, then every run's loss."""
    lines = ["| method | base | K | seeds | loss base | loss method | paired difference +- s.e. |",
             "|---|---|---|---|---|---|---|"]
    for K in sorted({r["stages"] for r in records}):
        for method, base in PAIRS:
            stats = paired(records, method, base, K)
            if stats is not None:
                n, loss_base, loss_method, diff, se = stats
                lines.append(f"| {method} | {base} | {K} | {n} | {loss_base:.4f} | {loss_method:.4f} | "
                             f"{diff:+.4f}" + (f" +- {se:.4f} |" if n > 1 else " (one seed) |"))
    lines += ["", "| method | K | final validation loss, seeds in order |", "|---|---|---|"]
    for method, K in sorted({(r["method"], r["stages"]) for r in records}, key=lambda mk: (mk[1], mk[0])):
        runs = sorted((r["seed"], r["val_loss"]) for r in records if r["method"] == method and r["stages"] == K)
        lines.append(f"| {method} | {K} | " + " / ".join(f"{v:.4f}" for _, v in runs)
                     + f" (seeds {','.join(str(s) for s, _ in runs)}) |")
    return lines


LR_PROBES = ("b8lr",)  # sweeps at another lr than their pairs': kept out of the paired table
# EF_C3 and EF_C5 at other lrs than 3e-3: kept out of the paired table too
C_LR_PROBES = ("c3lr32", "c3lr8", "c3lr8x", "c3lr8s23", "c3lr1", "c3lr16", "c5lr8")
# the c probes: kept out of the paired table too, but for their runs at c = 3 and 5 (EF_C3, EF_C5: methods of
# their own there)
SCALE_PROBES = ("c1", "c32", "c1s2", "c32s2", "c32x", "c1x", "c32s3", "c1s3", "c32xs2", "c8x", "c16x", "c5k32", "c5k",
                "c5s3", "c7k32", "c5k16s23", "c5s23")


def scale_table(records: list[dict]) -> list[str]:
    """muon-wp-ef's final loss against its c, per K and seed (c = 0 is muon-wp, c = 1 the
    default), for every K and seed with a c probe."""
    def scale(method: str) -> float | None:
        prefix = ef_at("")
        return float(method[len(prefix):]) if method.startswith(prefix) else {"muon-wp": 0.0, "muon-wp-ef": 1.0}.get(method)

    probed = {(r["stages"], r["seed"]) for r in records if r["method"].startswith("muon-wp-ef:")}
    scales = sorted({scale(r["method"]) for r in records if (r["stages"], r["seed"]) in probed} - {None})
    lines = ["| K | seed | " + " | ".join(f"c = {c:g}" for c in scales) + " | best c |",
             "|---|---|" + "---|" * (len(scales) + 1)]
    for K, seed in sorted(probed):
        loss = {scale(r["method"]): r["val_loss"] for r in records
                if (r["stages"], r["seed"]) == (K, seed) and scale(r["method"]) is not None}
        cells = " | ".join(f"{loss[c]:.4f}" if c in loss else "" for c in scales)
        best = min(loss, key=loss.get)
        edge = " (top of the grid)" if best == max(loss) else ""
        lines.append(f"| {K} | {seed} | {cells} | {best:g}{edge} |")
    return lines


def penalty_table(records: list[dict]) -> list[str]:
    """The delay penalty of every method with K = 1 runs: its loss at K minus its loss at K = 1,
    paired by seed (and machine), mean +- s.e. over the seeds with both runs."""
    lines = ["| method | K | seeds | loss at K = 1 | loss at K | delay penalty +- s.e. |", "|---|---|---|---|---|---|"]
    for method in sorted({r["method"] for r in records if r["stages"] == 1}):
        for K in sorted({r["stages"] for r in records if r["method"] == method and r["stages"] > 1}):
            stats = paired(records, method, method, K, base_stages=1)
            if stats is not None:
                n, k1, at_k, diff, se = stats
                lines.append(f"| {method} | {K} | {n} | {k1:.4f} | {at_k:.4f} | {diff:+.4f}"
                             + (f" +- {se:.4f} |" if n > 1 else " |"))
    return lines


def lr_table(records: list[dict], methods: list[str], stages: int) -> list[str]:
    """Each method's final loss at every lr it has runs for, per seed (the lr probes)."""
    lines = ["| method | K | seed | lr | final validation loss |", "|---|---|---|---|---|"]
    for r in sorted((r for r in records if r["method"] in methods and r["stages"] == stages),
                    key=lambda r: (methods.index(r["method"]), r["seed"], r["lr"])):
        lines.append(f"| {r['method']} | {stages} | {r['seed']} | {r['lr']:g} | {r['val_loss']:.4f} |")
    return lines


def lr_grid(records: list[dict], method: str) -> list[str]:
    """method's final loss against its lr, per K and seed with runs at more than one lr; the best
    lr is marked when it sits on an edge of what was tried."""
    runs = [r for r in records if r["method"] == method]
    lrs = sorted({r["lr"] for r in runs})
    lines = ["| K | seed | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best lr |", "|---|---|" + "---|" * (len(lrs) + 1)]
    for K, seed in sorted({(r["stages"], r["seed"]) for r in runs}):
        loss = {r["lr"]: r["val_loss"] for r in runs if (r["stages"], r["seed"]) == (K, seed)}
        if len(loss) < 2:
            continue
        best = min(loss, key=loss.get)
        edge = " (top of the grid)" if best == max(loss) else " (bottom of the grid)" if best == min(loss) else ""
        cells = " | ".join(f"{loss[lr]:.4f}" if lr in loss else "" for lr in lrs)
        lines.append(f"| {K} | {seed} | {cells} | {best:g}{edge} |")
    return lines


def against_sync(runs: list[dict]) -> list[str]:
    """Runs of 2,000 microbatches (read_data's, curves included) against the best synchronous
    schedule of their seed, as run_length.py reads its own runs (sync_table): the gap, and the
    microbatch at which each first reaches the synchronous loss, over the synchronous run's."""
    from run_length import load_sync, sync_table  # run_length imports this module

    return sync_table(runs, load_sync([]))


def main(argv: list[str]) -> int:
    run_sweeps(argv, __doc__.split("\n\n")[0], SWEEPS, command, "corrections_", DATA)
    runs = {name: read_runs(DATA / name) for name in SWEEPS}
    pairable = [r for name in SWEEPS if name not in LR_PROBES + C_LR_PROBES + SCALE_PROBES for r in runs[name]]
    pairable += [r for name in SCALE_PROBES for r in runs[name] if r["method"] in (EF_C3, EF_C5)]
    records = pairable + compression_muon_wp() + run_length_muon_wp_k1()
    print("\n".join(table(records)))
    probes = [r for name in LR_PROBES for r in runs[name]]
    if probes:
        print("\nThe 2BW runs at two lrs:")
        print("\n".join(lr_table(runs["b8"] + probes, [ASYNC_2BW, "2bw-muon-ef"], 8)))
    scales = [r for name in SCALE_PROBES for r in runs[name]]
    if scales:
        print("\nmuon-wp-ef against the error feedback's c:")
        print("\n".join(scale_table(scales + records)))
    c_lrs = [r for name in C_LR_PROBES for r in read_data(DATA / name)]  # with curves, for against_sync
    for method in (EF_C3, EF_C5):
        grid = lr_grid(c_lrs + records, method)
        if len(grid) > 2:
            print(f"\n{method} against the lr (3e-3: the runs of the tables above):")
            print("\n".join(grid))
    tuned = [r for r in c_lrs if r["lr"] == 1e-2]
    if tuned:
        print("\nAt lr 1e-2 against the best synchronous schedule (gpipe-muon, M = 4, lr 3e-2):")
        print("\n".join(against_sync(tuned)))
    print("\nThe delay penalty of every method with K = 1 runs (paired by seed):")
    print("\n".join(penalty_table(records)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
