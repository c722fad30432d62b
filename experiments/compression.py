"""The loss cost of compressed links: int8 and 4-bit against none, paired by seed, on the
benchmark regime (configs/bench.toml), from the repository root.

    python experiments/compression.py --run     # the sweeps (about 75 minutes on 2 cores; resumable)
    python experiments/compression.py           # the table of the runs finished so far

The sweeps (`pipenag sweep`, seeds 1-3, lr 3e-3: the lr the convergence benchmark tuned each of
these methods to, docs/results/convergence.md) write runs/compression_<x>/:
- check: pipedream at K = 8, seed 1, no compression: it must reproduce the convergence
  benchmark's committed final loss exactly (the default link is bit-identical to before);
- k8: pipedream, nesterov and muon-wp (the convergence benchmark's best method) at K = 8 with
  int8 both ways, int4-hadamard on the activations only, and int4-hadamard both ways;
- k32: the same three methods at K = 32 with int8 both ways.
The uncompressed runs are the convergence benchmark's (docs/results/data/convergence/{a,b}),
which the check shows this code reproduces. Compression needs no K = 1 control (one stage sends
nothing), so the sweeps skip them. The data files go to docs/results/data/compression/<x>/.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from pipenag.sweep_report import read_data

METHODS = ("pipedream", "nesterov", "muon-wp")
CODECS = {
    "int8": ("int8", "int8"),
    "int4h-act": ("int4-hadamard", "none"),
    "int4h": ("int4-hadamard", "int4-hadamard"),
}


def variant(method: str, codec: str) -> str:
    act, grad = CODECS[codec]
    return f"{method}:link.compress_activations={act}:link.compress_gradients={grad}"


SWEEPS = {
    "check": (["pipedream"], "8", "1"),
    "k8": ([variant(m, c) for c in CODECS for m in METHODS], "8", "1,2,3"),
    "k32": ([variant(m, "int8") for m in METHODS], "32", "1,2,3"),
}
DATA = Path("docs/results/data/compression")
CONVERGENCE = Path("docs/results/data/convergence")


def command(name: str, jobs: int) -> list[str]:
    methods, stages, seeds = SWEEPS[name]
    return [sys.executable, "-m", "pipenag", "sweep", "--config", "configs/bench.toml", "--methods", ",".join(methods),
            "--stages", stages, "--seeds", seeds, "--lrs", "3e-3", "--no-k1-controls", "--jobs", str(jobs),
            "--out", f"runs/compression_{name}"]


def none_losses() -> dict[tuple[str, int, int], float]:
    """(method, K, seed) -> final loss without compression, from the convergence benchmark."""
    out = {}
    for folder in ("a", "b"):
        for r in read_data(CONVERGENCE / folder):
            if not r["tuning"] and r["chosen_lr"] and r["lr"] == 3e-3 and r["stages"] == r["trained_stages"]:
                out[(r["method"], r["stages"], r["seed"])] = r["val_loss"]
    return out


def table() -> list[str]:
    base = none_losses()
    lines = []
    check = [r for r in read_data(DATA / "check") if r["method"] == "pipedream"] if (DATA / "check").is_dir() else []
    for r in check:
        ref = base.get(("pipedream", r["stages"], r["seed"]))
        lines.append(f"- reproduction check: pipedream K = {r['stages']} seed {r['seed']} without compression: "
                     f"{r['val_loss']!r} here, {ref!r} in the convergence benchmark "
                     f"({'identical' if r['val_loss'] == ref else 'DIFFERENT'})")
    lines += ["", "| method | K | codec (activations / gradients) | bytes per message | seeds | loss none | "
              "loss compressed | paired difference +- s.e. |", "|---|---|---|---|---|---|---|---|"]
    from pipenag.config import load_config
    from pipenag.link.messages import message_bytes

    for name in ("k8", "k32"):
        if not (DATA / name).is_dir():
            continue
        records = [r for r in read_data(DATA / name) if not r["tuning"]]
        for codec, (act, grad) in CODECS.items():
            for method in METHODS:
                label = variant(method, codec)
                rows = [r for r in records if r["method"] == label]
                pairs = [(base[(method, r["stages"], r["seed"])], r["val_loss"]) for r in rows
                         if (method, r["stages"], r["seed"]) in base and r["val_loss"] is not None]
                if not pairs:
                    continue
                cfg = load_config("configs/bench.toml", [f"--link.compress_activations={act}",
                                                          f"--link.compress_gradients={grad}"])
                sizes = f"{message_bytes(cfg, 'activation'):,} / {message_bytes(cfg, 'gradient'):,} of {message_bytes(cfg):,}"
                diffs = [c - n for n, c in pairs]
                se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
                lines.append(f"| {method} | {rows[0]['stages']} | {act} / {grad} | {sizes} | {len(pairs)} | "
                             f"{statistics.fmean(n for n, _ in pairs):.4f} | {statistics.fmean(c for _, c in pairs):.4f} | "
                             f"{statistics.fmean(diffs):+.4f} +- {se:.4f} |")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="store_true", help="run (or resume) the sweeps first")
    parser.add_argument("--sweeps", default="check,k8,k32")
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    for name in args.sweeps.split(","):
        out = Path(f"runs/compression_{name}")
        if args.run:
            subprocess.run(command(name, args.jobs), check=True)
        elif out.is_dir():  # the table of the runs finished so far (a sweep still going, or cut short)
            subprocess.run(command(name, args.jobs) + ["--report-only"], check=True, stdout=subprocess.DEVNULL)
        if (out / "runs.csv").is_file():
            (DATA / name).mkdir(parents=True, exist_ok=True)
            for f in ("runs.csv", "curves.csv"):
                shutil.copy(out / f, DATA / name / f)
    print("\n".join(table()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
