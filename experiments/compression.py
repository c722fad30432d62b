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
- k32q4: pipedream and nesterov at K = 32 with int4-hadamard, activations only and both ways;
- k8mb, k32b: the uncompressed runs again on machine b (below): muon-wp at K = 8, pipedream
  and nesterov at K = 32, for the 4-bit sweeps made there;
- k8m4a, k32q4a: the 4-bit sweeps k8m4 and k32q4 again on machine a, whose uncompressed runs
  they pair with.
The sweeps ran on two hosts that both call themselves "AMD EPYC" (MACHINE, MACHINE_NAMES): a
(AuthenticAMD family 26 model 2, AVX-512: check, k8, k8act, k32, k32n, k8m4a, k32q4a) and b
(family 25 model 1, AVX2: k32m, k8m45, k8m4, k32q4). Their runs agree to about 6 digits at the
first evaluation and then drift apart as runs on two CPUs do, so every compressed run is paired
with the uncompressed run of the same method, K and seed made on the same machine; where no
such run exists the table gives the unpaired difference of the means, and says so.
Compression needs no K = 1 control (one stage sends nothing), so the sweeps skip them. The data
files go to docs/results/data/compression/<x>/.
"""

from __future__ import annotations

import sys
from pathlib import Path

from paired_runs import paired, read_runs, run_sweeps, unpaired

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
    "k8mb": ([variant("muon-wp", "none")], "8", "1,2,3"),
    "k32b": ([variant(m, "none") for m in METHODS[:2]], "32", "1,2,3"),
    "k8m4a": ([variant("muon-wp", c) for c in ("int4h-act", "int4h")], "8", "1,2,3"),
    "k32q4a": ([variant(m, c) for c in ("int4h-act", "int4h") for m in METHODS[:2]], "32", "1,2,3"),
}
# The machine of the sweeps whose data files do not name it (written before runs recorded it).
MACHINE = {name: "a" if name in ("check", "k8", "k8act", "k32", "k32n") else "b" for name in SWEEPS}
# The names of the machines that the data files name (paired_runs.machine_key), by prefix.
MACHINE_NAMES = {"AuthenticAMD family 26 model 2 ": "a", "AuthenticAMD family 25 model 1 ": "b"}


def machine_name(key: str) -> str:
    """a or b for the two hosts of these sweeps; the key itself for any other machine."""
    return next((name for prefix, name in MACHINE_NAMES.items() if key.startswith(prefix)), key)


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


def table() -> list[str]:
    committed = committed_none_losses()
    lines = []
    for r in read_runs(DATA / "check"):
        ref = committed.get(("pipedream", r["stages"], r["seed"]))
        lines.append(f"- reproduction check: pipedream K = {r['stages']} seed {r['seed']} without compression: "
                     f"{r['val_loss']!r} here, {ref!r} in the convergence benchmark's data "
                     f"({'identical' if r['val_loss'] == ref else 'DIFFERENT'})")
    lines += ["", "| method | K | codec (activations / gradients) | bytes per message (act / grad of raw) | seeds | "
              "loss none | loss compressed | paired difference +- s.e. |", "|---|---|---|---|---|---|---|---|"]
    from pipenag.config import load_config
    from pipenag.link.messages import message_bytes

    records = machine_records()
    for K in (8, 32):
        for codec, (act, grad) in CODECS.items():
            if codec == "none":
                continue
            for method in METHODS:
                stats = paired(records, variant(method, codec), variant(method, "none"), K)
                if stats is not None:
                    n, loss_none, loss_codec, diff, se = stats
                    seeds, estimate = f"{n}", f"{diff:+.4f} +- {se:.4f}"
                else:  # the two arms ran on different machines: no seed pairs
                    stats = unpaired(records, variant(method, codec), variant(method, "none"), K)
                    if stats is None:
                        continue
                    n_none, n, loss_none, loss_codec, diff, se = stats
                    seeds, estimate = f"{n_none} / {n}", f"{diff:+.4f} +- {se:.4f} (unpaired, across machines)"
                cfg = load_config("configs/bench.toml", [f"--link.compress_activations={act}",
                                                          f"--link.compress_gradients={grad}"])
                sizes = (f"{message_bytes(cfg, 'activation'):,} / {message_bytes(cfg, 'gradient'):,} of "
                         f"{message_bytes(cfg):,}")
                lines.append(f"| {method} | {K} | {act} / {grad} | {sizes} | {seeds} | {loss_none:.4f} | "
                             f"{loss_codec:.4f} | {estimate} |")
    return lines


def machine_records() -> list[dict]:
    """Every run of the sweeps but the check, with the machine its sweep ran on."""
    return [dict(r, machine=machine_name(r["machine"]) if r.get("machine") else MACHINE[name])
            for name in SWEEPS if name != "check" for r in read_runs(DATA / name)]


def per_seed() -> list[str]:
    """Per K, a table of the final validation loss of every run: a line per codec, a column per
    method, the seeds in order, machine by machine."""
    records = machine_records()
    lines = []
    for K in (8, 32):
        lines += ["", f"Final validation loss per seed, K = {K}:", "",
                  "| variant | " + " | ".join(METHODS) + " |", "|---|" + "---|" * len(METHODS)]
        for codec, (act, grad) in CODECS.items():
            cells = []
            for method in METHODS:
                parts = []
                for machine in sorted(set(MACHINE.values())):
                    runs = sorted((r["seed"], r["val_loss"]) for r in records if r["machine"] == machine
                                  and r["method"] == variant(method, codec) and r["stages"] == K)
                    if runs:
                        parts.append(" / ".join(f"{v:.4f}" for _, v in runs)
                                     + f" (seeds {','.join(str(s) for s, _ in runs)} on {machine})")
                cells.append("; ".join(parts) or "not run")
            lines.append(f"| {act} / {grad} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str]) -> int:
    run_sweeps(argv, __doc__.split("\n\n")[0], SWEEPS, command, "compression_", DATA)
    print("\n".join(table() + per_seed()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
