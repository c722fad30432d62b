"""The loss cost of compressed links: int8 and 4-bit against none, paired by seed, on the
benchmark regime (configs/bench.toml), from the repository root.

    python experiments/compression.py --run     # the sweeps (about 3 hours on 2 cores; resumable)
    python experiments/compression.py           # the table of the runs finished so far

The sweeps (`pipenag sweep`, seeds 1-3, lr 3e-3: the lr the convergence benchmark tuned each of
these methods to, docs/results/convergence.md) write runs/compression_<x>/:
- check: pipedream at K = 8, seed 1, no compression, against the convergence benchmark's
  committed final loss (which the code on main before compression did not reproduce either:
  see docs/results/compression.md), so the uncompressed runs are made again here;
- k8: pipedream, nesterov and muon-wp (the convergence benchmark's best method) at K = 8,
  none and int8 both ways; pipedream and nesterov with int4-hadamard both ways;
- k8act: pipedream and nesterov at K = 8 with int4-hadamard on the activations only;
- k32, k32n: pipedream and nesterov at K = 32, none and int8 both ways;
- k32m: muon-wp at K = 32, none and int8 both ways;
- k8m45: muon-wp at K = 8, none and int8, seeds 4 and 5 (the int8 cost of muon-wp is the
  smallest difference in the table, so it gets five pairs);
- k8m4: muon-wp at K = 8 with int4-hadamard, activations only and both ways;
- k32q4: pipedream and nesterov at K = 32 with int4-hadamard, activations only and both ways.
Every compressed run is paired with the uncompressed run of the same method, K and seed.
Compression needs no K = 1 control (one stage sends nothing), so the sweeps skip them. The data
files go to docs/results/data/compression/<x>/.
"""

from __future__ import annotations

import argparse
import math
import statistics
import subprocess
import sys
from pathlib import Path

from pipenag.sweep_report import read_data

METHODS = ("pipedream", "nesterov", "muon-wp")
CODECS = {
    "none": ("none", "none"),
    "int8": ("int8", "int8"),
    "int4h-act": ("int4-hadamard", "none"),
    "int4h": ("int4-hadamard", "int4-hadamard"),
}


def variant(method: str, codec: str) -> str:
    act, grad = CODECS[codec]
    return f"{method}:link.compress_activations={act}:link.compress_gradients={grad}"


SWEEPS = {
    "check": (["pipedream"], "8", "1"),
    "k8": ([variant(m, c) for c in ("none", "int8") for m in METHODS] + [variant(m, "int4h") for m in METHODS[:2]],
           "8", "1,2,3"),
    "k8act": ([variant(m, "int4h-act") for m in METHODS[:2]], "8", "1,2,3"),
    "k32": ([variant("pipedream", c) for c in ("none", "int8")], "32", "1,2,3"),
    "k32n": ([variant("nesterov", c) for c in ("none", "int8")], "32", "1,2,3"),
    "k32m": ([variant("muon-wp", c) for c in ("none", "int8")], "32", "1,2,3"),
    "k8m45": ([variant("muon-wp", c) for c in ("none", "int8")], "8", "4,5"),
    "k8m4": ([variant("muon-wp", c) for c in ("int4h-act", "int4h")], "8", "1,2,3"),
    "k32q4": ([variant(m, c) for c in ("int4h-act", "int4h") for m in METHODS[:2]], "32", "1,2,3"),
}
DATA = Path("docs/results/data/compression")
CONVERGENCE = Path("docs/results/data/convergence")


def command(name: str, jobs: int) -> list[str]:
    methods, stages, seeds = SWEEPS[name]
    return [sys.executable, "-m", "pipenag", "sweep", "--config", "configs/bench.toml", "--methods", ",".join(methods),
            "--stages", stages, "--seeds", seeds, "--lrs", "3e-3", "--no-k1-controls", "--jobs", str(jobs),
            "--out", f"runs/compression_{name}"]


def committed_none_losses() -> dict[tuple[str, int, int], float]:
    """(method, K, seed) -> final loss of the convergence benchmark's committed data at lr 3e-3."""
    out = {}
    for folder in ("a", "b"):
        for r in read_data(CONVERGENCE / folder):
            if not r["tuning"] and r["chosen_lr"] and r["lr"] == 3e-3 and r["stages"] == r["trained_stages"]:
                out[(r["method"], r["stages"], r["seed"])] = r["val_loss"]
    return out


def collect(name: str) -> list[dict]:
    """The finished runs of sweep `name`, read from their run folders (summary.json and
    metrics.jsonl): method label, K, seed, final validation loss, and the curve."""
    import json

    from pipenag.compare import folder_name
    from pipenag.metrics import read_metrics

    methods, stages, seeds = SWEEPS[name]
    labels = {folder_name(m): m for m in methods}
    out = []
    for path in sorted(Path(f"runs/compression_{name}/runs").glob("*/K*/seed*/lr*/summary.json")):
        folder = path.parent
        label = labels.get(folder.parents[2].name)
        summary = json.loads(path.read_text())
        if label is None or summary.get("status") != "ok":
            continue
        curve = [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"]}
                 for r in read_metrics(folder) if r.get("val_loss") is not None]
        out.append({"method": label, "stages": int(folder.parents[1].name[1:]), "seed": int(folder.parent.name[4:]),
                    "val_loss": summary["val_loss"], "updates": summary["updates"], "tokens": summary["tokens"],
                    "wall_time_s": summary["wall_time_s"], "messages": summary.get("messages"), "curve": curve})
    return out


def write_data(name: str, runs: list[dict]) -> None:
    """DATA/<name>/runs.csv (one line per run) and curves.csv (every evaluation)."""
    import csv

    folder = DATA / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "stages", "seed", "val_loss", "updates", "tokens", "wall_time_s"])
        for r in runs:
            w.writerow([r["method"], r["stages"], r["seed"], repr(r["val_loss"]), r["updates"], r["tokens"],
                        r["wall_time_s"]])
    with open(folder / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "stages", "seed", "step", "tokens", "val_loss"])
        for r in runs:
            for e in r["curve"]:
                w.writerow([r["method"], r["stages"], r["seed"], e["step"], e["tokens"], repr(e["val_loss"])])


def read_runs(name: str) -> list[dict]:
    import csv

    path = DATA / name / "runs.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"method": r["method"], "stages": int(r["stages"]), "seed": int(r["seed"]),
                 "val_loss": float(r["val_loss"])} for r in csv.DictReader(f)]


def table() -> list[str]:
    committed = committed_none_losses()
    lines = []
    for r in read_runs("check"):
        ref = committed.get(("pipedream", r["stages"], r["seed"]))
        lines.append(f"- reproduction check: pipedream K = {r['stages']} seed {r['seed']} without compression: "
                     f"{r['val_loss']!r} here, {ref!r} in the convergence benchmark's data "
                     f"({'identical' if r['val_loss'] == ref else 'DIFFERENT'})")
    lines += ["", "| method | K | codec (activations / gradients) | bytes per message (act / grad of raw) | seeds | "
              "loss none | loss compressed | paired difference +- s.e. |", "|---|---|---|---|---|---|---|---|"]
    from pipenag.config import load_config
    from pipenag.link.messages import message_bytes

    records = [r for name in SWEEPS if name != "check" for r in read_runs(name)]
    none = {(r["method"], r["stages"], r["seed"]): r["val_loss"] for r in records}
    for K in (8, 32):
        for codec, (act, grad) in CODECS.items():
            if codec == "none":
                continue
            for method in METHODS:
                rows = [r for r in records if r["method"] == variant(method, codec) and r["stages"] == K]
                base = variant(method, "none")
                pairs = [(none[(base, K, r["seed"])], r["val_loss"]) for r in rows if (base, K, r["seed"]) in none]
                if not pairs:
                    continue
                cfg = load_config("configs/bench.toml", [f"--link.compress_activations={act}",
                                                          f"--link.compress_gradients={grad}"])
                sizes = (f"{message_bytes(cfg, 'activation'):,} / {message_bytes(cfg, 'gradient'):,} of "
                         f"{message_bytes(cfg):,}")
                diffs = [c - n for n, c in pairs]
                se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
                lines.append(f"| {method} | {K} | {act} / {grad} | {sizes} | {len(pairs)} | "
                             f"{statistics.fmean(n for n, _ in pairs):.4f} | {statistics.fmean(c for _, c in pairs):.4f} | "
                             f"{statistics.fmean(diffs):+.4f} +- {se:.4f} |")
    return lines


def per_seed() -> list[str]:
    """Per K, a table of the final validation loss of every run: a line per codec, a column per
    method, the seeds in order."""
    records = [r for name in SWEEPS if name != "check" for r in read_runs(name)]
    lines = []
    for K in (8, 32):
        lines += ["", f"Final validation loss per seed, K = {K}:", "",
                  "| variant | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
        for codec, (act, grad) in CODECS.items():
            cells = []
            for method in METHODS:
                runs = sorted((r["seed"], r["val_loss"]) for r in records
                              if r["method"] == variant(method, codec) and r["stages"] == K)
                cells.append(" / ".join(f"{v:.4f}" for _, v in runs) + f" (seeds {','.join(str(s) for s, _ in runs)})"
                             if runs else "not run")
            lines.append(f"| {act} / {grad} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run (or resume) the sweeps first")
    parser.add_argument("--sweeps", default=",".join(SWEEPS))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    for name in args.sweeps.split(","):
        if args.run:
            subprocess.run(command(name, args.jobs), check=True)
        runs = collect(name)
        if runs:  # the data of the runs finished so far (a sweep still going, or cut short)
            write_data(name, runs)
    print("\n".join(table() + per_seed()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
