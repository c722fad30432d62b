"""Helpers of the paired experiments (compression.py, corrections.py): the finished runs of a
`pipenag sweep`, their data files, and the paired difference of two methods over seeds."""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import subprocess
from pathlib import Path
from typing import Callable


def collect(out: Path, methods: list[str]) -> list[dict]:
    """The finished runs of the sweep in folder `out` (`pipenag sweep --out`), read from their run
    folders (summary.json and metrics.jsonl): method label, K, seed, final validation loss, the
    machine (machine_key of summary.json's `machine`; "" for runs made before it was recorded),
    and the curve."""
    from pipenag.compare import folder_name
    from pipenag.metrics import read_metrics

    labels = {folder_name(m): m for m in methods}
    runs = []
    for path in sorted(Path(out, "runs").glob("*/K*/seed*/lr*/summary.json")):
        folder = path.parent
        label = labels.get(folder.parents[2].name)
        summary = json.loads(path.read_text())
        if label is None or summary.get("status") != "ok":
            continue
        curve = [{"step": r["step"], "tokens": r["tokens"], "val_loss": r["val_loss"]}
                 for r in read_metrics(folder) if r.get("val_loss") is not None]
        runs.append({"method": label, "stages": int(folder.parents[1].name[1:]), "seed": int(folder.parent.name[4:]),
                     "lr": float(folder.name[2:]),
                     "val_loss": summary["val_loss"], "updates": summary["updates"], "tokens": summary["tokens"],
                     "wall_time_s": summary["wall_time_s"], "machine": machine_key(summary.get("machine")),
                     "curve": curve})
    return runs


# Hosts whose runs are the runs of another host, bit for bit, as checked by training the same
# runs on both: key -> the key its runs are filed under, so that they pair.
SAME_NUMERICS = {
    # "machine c" (Zen 4): configs/bench.toml at K = 8, lr 3e-3, seed 1 gave machine a's final
    # losses to every digit for pipedream (2.650104969739914), nesterov (2.4146053194999695) and
    # muon-wp (1.950559251010418): AdamW, NAdam and Muon's bfloat16 Newton-Schulz alike.
    "AuthenticAMD family 25 model 17 stepping 1 AVX512": "AuthenticAMD family 26 model 2 stepping 1 AVX512",
}


def machine_key(info: dict | None) -> str:
    """A short name for the machine of summary.json's `machine`: "cpu_id cpu_capability"
    (for example "AuthenticAMD family 25 model 1 stepping 1 AVX2"), or the key of the host
    whose runs it reproduces (SAME_NUMERICS); "" when unknown."""
    if not info:
        return ""
    key = " ".join(str(info.get(k)) for k in ("cpu_id", "cpu_capability") if info.get(k))
    return SAME_NUMERICS.get(key, key)


def write_data(folder: Path, runs: list[dict]) -> None:
    """folder/runs.csv (one line per run) and folder/curves.csv (every evaluation)."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "stages", "seed", "val_loss", "updates", "tokens", "wall_time_s", "machine", "lr"])
        for r in runs:
            w.writerow([r["method"], r["stages"], r["seed"], repr(r["val_loss"]), r["updates"], r["tokens"],
                        r["wall_time_s"], r.get("machine", ""), r.get("lr", "")])
    with open(folder / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "stages", "seed", "step", "tokens", "val_loss", "lr"])
        for r in runs:
            for e in r["curve"]:
                w.writerow([r["method"], r["stages"], r["seed"], e["step"], e["tokens"], repr(e["val_loss"]),
                            r.get("lr", "")])


def read_data(folder: Path) -> list[dict]:
    """The runs of folder's data files as write_data wrote them, curves included (none when
    there are no files). Files written before curves.csv had an lr column give each run the
    curve rows that follow, in the order of runs.csv, while they name its method, K and seed
    and their step grows: write_data writes the curves in that order."""
    runs = read_runs(folder, full=True)
    for run in runs:
        run["curve"] = []
    rows = []
    if (folder / "curves.csv").is_file():
        with open(folder / "curves.csv", newline="") as f:
            rows = list(csv.DictReader(f))
    i = 0
    for run in runs:
        while i < len(rows):
            c = rows[i]
            if (c["method"], int(c["stages"]), int(c["seed"])) != (run["method"], run["stages"], run["seed"]):
                break
            if c.get("lr") and float(c["lr"]) != run.get("lr"):
                break
            if run["curve"] and int(c["step"]) <= run["curve"][-1]["step"]:
                break
            run["curve"].append({"step": int(c["step"]), "tokens": int(c["tokens"]), "val_loss": float(c["val_loss"])})
            i += 1
    return runs


def merge_data(folder: Path, runs: list[dict]) -> int:
    """write_data of `runs` and of the runs already in folder's data files that they do not
    replace (the same method, K, seed and lr): a sweep's run folders are gone after the session
    that made them, and the runs of a later session must not erase them. A run keeps its place
    in the files when it is made again (so that reading the table does not reorder them); new
    runs go last. Returns the runs kept."""
    def key(r: dict) -> tuple:
        return r["method"], r["stages"], r["seed"], r.get("lr")

    replacing = {key(r): r for r in runs}
    old = read_data(folder)
    merged = [replacing.pop(key(r), r) for r in old]
    write_data(folder, merged + [r for r in runs if key(r) in replacing])
    return len(old) - (len(runs) - len(replacing))


def read_runs(folder: Path, full: bool = False) -> list[dict]:
    """The runs of folder/runs.csv (none when the sweep has not written it yet), with their
    machine and lr when the file names them (files written before did not); with `full`, also
    their updates, tokens and wall time (read_data)."""
    path = folder / "runs.csv"
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{"method": r["method"], "stages": int(r["stages"]), "seed": int(r["seed"]),
                 "val_loss": float(r["val_loss"]),
                 **({"updates": int(r["updates"]), "tokens": int(r["tokens"]),
                     "wall_time_s": float(r["wall_time_s"])} if full else {}),
                 **({"machine": r["machine"]} if r.get("machine") else {}),
                 **({"lr": float(r["lr"])} if r.get("lr") else {})}
                for r in csv.DictReader(f)]


def mean_se(values: list[float]) -> str:
    """"+m" for one value, "+m +- s.e." (the standard error of the mean) for more."""
    if len(values) == 1:
        return f"{values[0]:+.4f}"
    return f"{statistics.fmean(values):+.4f} +- {statistics.stdev(values) / math.sqrt(len(values)):.4f}"


def best_of(losses: dict) -> object:
    """The key with the lowest loss; a diverged run (nan or inf) counts as infinitely bad."""
    return min(losses, key=lambda k: losses[k] if math.isfinite(losses[k]) else math.inf)


def paired(records: list[dict], method: str, base: str, stages: int,
           base_stages: int | None = None) -> tuple[int, float, float, float, float] | None:
    """(pairs, mean loss of base, mean loss of method, mean difference, its standard error) over
    the seeds that both have at this K on the same machine (a record's optional "machine"; runs
    on two hosts differ in their last bits, and 2,000 updates make that a different run); None
    when no seed has both. With base_stages, the base runs are those at that K instead (the
    method against its own K = 1 runs: its delay penalty)."""
    base_k = stages if base_stages is None else base_stages
    losses = {(r["method"], r["stages"], r["seed"], r.get("machine")): r["val_loss"] for r in records}
    pairs = [(losses[(base, base_k, s, m)], v) for (name, k, s, m), v in sorted(losses.items(), key=str)
             if name == method and k == stages and (base, base_k, s, m) in losses]
    if not pairs:
        return None
    diffs = [v - b for b, v in pairs]
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return (len(pairs), statistics.fmean(b for b, _ in pairs), statistics.fmean(v for _, v in pairs),
            statistics.fmean(diffs), se)


def unpaired(records: list[dict], method: str, base: str, stages: int) -> tuple[int, int, float, float, float, float] | None:
    """(runs of base, runs of method, their mean losses, the difference of the means, and its
    unpaired standard error, sqrt(s_base^2 / n_base + s_method^2 / n_method)) at this K, over
    every machine: the estimate for two arms that were run on different machines, so that no
    seed pairs; None when either arm has fewer than two runs."""
    base_losses = [r["val_loss"] for r in records if r["method"] == base and r["stages"] == stages]
    losses = [r["val_loss"] for r in records if r["method"] == method and r["stages"] == stages]
    if len(base_losses) < 2 or len(losses) < 2:
        return None
    se = math.sqrt(statistics.variance(base_losses) / len(base_losses) + statistics.variance(losses) / len(losses))
    mean_base, mean = statistics.fmean(base_losses), statistics.fmean(losses)
    return len(base_losses), len(losses), mean_base, mean, mean - mean_base, se


def run_sweeps(argv: list[str], description: str, sweeps: dict, command: Callable[[str, int], list[str]],
               prefix: str, data: Path, methods: Callable[[str], list[str]] | None = None) -> None:
    """The command line shared by the paired experiments: --run runs (or resumes) the named
    sweeps (`command(name, jobs)`, folder runs/<prefix><name>); then the finished runs of each
    go to data/<name>/, also those of a sweep still going or cut short. `methods(name)` gives a
    sweep's method labels (default: the first item of its entry in `sweeps`)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--run", action="store_true", help="run (or resume) the sweeps first")
    parser.add_argument("--sweeps", default=",".join(sweeps))
    parser.add_argument("--jobs", type=int, default=2)
    args = parser.parse_args(argv)
    for name in args.sweeps.split(","):
        if name not in sweeps:
            raise SystemExit(f"error: no sweep {name!r}; the sweeps are {', '.join(sweeps)}")
        if args.run:
            subprocess.run(command(name, args.jobs), check=True)
        runs = collect(Path(f"runs/{prefix}{name}"), methods(name) if methods else sweeps[name][0])
        if runs:
            merge_data(data / name, runs)
