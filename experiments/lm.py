"""Experiments (a)-(d) of docs/results/: language-model comparisons run with `pipenag compare`.

    nice -n 10 python experiments/lm.py d        # one experiment: a, b, c or d
    python experiments/lm.py a --report-only    # tables and PNGs from finished runs

Each experiment is a list of comparisons (pipenag.compare: identical weights and data, equal
tokens) on configs/small.toml, written to runs/exp_<name>/<part>/. After the runs it prints a
markdown table of the final validation losses (mean over seeds where there are several) and
writes docs/results/exp_<name>_*.png. The commands, the machine and the versions go in
docs/results/exp_<name>.md; this script prints them too.

Run lengths: configs/small.toml sets a budget of 1,200 microbatches (train.steps); every
method sees the same 1,200 x 8 x 64 = 614,400 training tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipenag.compare import compare_main
from pipenag.config import load_config

CONFIG = "configs/small.toml"
RUNS = Path("runs")
DOCS = Path("docs/results")

# The paper's method and its baselines: the README's methods table without 2bw.
SPEC_METHODS = "gpipe,1f1b,pipedream,pipedream-lr,pipemare,nesterov,nesterov-nows,nesterov-sgd"

# NAdam's momentum warm-up mu_t = beta1 (1 - 0.5 * 0.96^(t psi)) reaches 0.9 beta1 when
# 0.96^(t psi) = 0.2, i.e. t psi = ln(0.2) / ln(0.96) = 39.4. For that to happen at 10% of a
# run of T updates: psi = 39.4 / (0.1 T) = 394 / T.
def scaled_momentum_decay(num_updates: int, fraction: float = 0.1) -> float:
    """psi such that NAdam's mu_t reaches 0.9 * beta1 after `fraction` of `num_updates`."""
    return math.log(0.2) / math.log(0.96) / (fraction * num_updates)


# The SGD-form method (DelayedNesterov) needs an SGD learning rate, not Adam's. Its decoupled
# weight decay multiplies the weights by (1 - lr * weight_decay) per step, so at lr ~ 1 the
# config's weight_decay 0.01 would shrink them by 1% per step; we keep the per-step decay
# lr * weight_decay at the Adam methods' 1e-3 * 0.01 = 1e-5.
SGD_LRS = (0.3, 1.0, 3.0)
DECAY_PER_STEP = 1e-5


def sgd_variant(lr: float, discount: bool = True) -> str:
    """A nesterov-sgd variant at `lr` with lr * weight_decay = DECAY_PER_STEP."""
    v = f"nesterov-sgd:optim.lr={lr:g}:optim.weight_decay={DECAY_PER_STEP / lr:g}"
    return v if discount else v + ":optim.discount=false"


def sgd_lr() -> float:
    """The best lr of experiment (d)'s sweep (lowest final validation loss, discount on), or 1.0
    when (d) has not run yet."""
    best = (math.inf, 1.0)
    for part in ("discount", "lr"):
        path = RUNS / "exp_d" / part / "summary.json"
        if path.is_file():
            for r in json.loads(path.read_text())["rows"]:
                lr = float(r["method"].split("optim.lr=")[1].split(":")[0])
                if "discount=false" not in r["method"] and math.isfinite(r["val_loss"]):
                    best = min(best, (r["val_loss"], lr))
    return best[1]


@dataclass
class Part:
    """One `pipenag compare` call."""

    name: str
    methods: str
    overrides: list[str] = field(default_factory=list)


def experiments(budget: int) -> dict[str, list[Part]]:
    psi = round(scaled_momentum_decay(budget), 4)
    return {
        # (a) every method of SPEC_METHODS at K = 8 at the config's lr (1e-3), two seeds; and the
        # three main methods at lr 3e-3 too (the pilot's best lr for the asynchronous ones).
        # nesterov-sgd (an SGD lr, from (d)) is a separate part so that (d) can run first.
        "a": [Part(f"seed{s}", SPEC_METHODS.replace(",nesterov-sgd", "")
                   + ",gpipe:optim.lr=3e-3,pipedream:optim.lr=3e-3,nesterov:optim.lr=3e-3",
                   [f"--train.seed={s}"]) for s in (0, 1)]
             + [Part(f"seed{s}-sgd", sgd_variant(sgd_lr()), [f"--train.seed={s}"]) for s in (0, 1)]
             # Seeds 2 and 3 for the three main methods: the seed-to-seed spread of 0-1 is large.
             + [Part(f"seed{s}-main", "gpipe,pipedream,nesterov", [f"--train.seed={s}"]) for s in (2, 3)],
        # (b) K = 4, 8, 16 on 16 thin blocks (n_embd 48), so that K = 16 has a block per stage.
        # gpipe's losses do not depend on K (synchronous: the same math at any K); only its
        # simulated time does. Seed 1 repeats everything (the seed spread is large).
        "b": [Part(f"K{K}", "nesterov,gpipe,pipedream",
                   ["--model.n_layer=16", "--model.n_embd=48", f"--pipeline.num_stages={K}"])
              for K in (4, 8, 16)]
             + [Part(f"seed1K{K}", "nesterov,gpipe,pipedream",
                     ["--model.n_layer=16", "--model.n_embd=48", f"--pipeline.num_stages={K}", "--train.seed=1"])
                for K in (4, 8, 16)],
        # (c) fixed momentum 0.9 / 0.95 / 0.99 (momentum_decay 1000: 0.96^(1000 t) < 1e-17, so
        # mu_t = beta1 from the first step; note psi = 0 would give mu_t = beta1 / 2), against
        # NAdam's warm-up with the default psi = 0.004 and with psi scaled to the run.
        "c": [Part("momentum",
                   "nesterov:optim.momentum=0.9:optim.momentum_decay=1000,"
                   "nesterov:optim.momentum=0.95:optim.momentum_decay=1000,"
                   "nesterov:optim.momentum=0.99:optim.momentum_decay=1000,"
                   "nesterov,"
                   f"nesterov:optim.momentum_decay={psi}"),
              # Controls: is it the low momentum? The default warm-up keeps NAdam's mu_t between
              # 0.50 and 0.58 over 1,200 steps; the same fixed (0.55) and AdamW with beta1 0.55.
              Part("controls", "nesterov:optim.momentum=0.55:optim.momentum_decay=1000,"
                               "pipedream:optim.momentum=0.55"),
              # Seed 1 for the variants that carry the conclusion (seed 1's nesterov and
              # pipedream presets are in (a)).
              Part("seed1", "nesterov:optim.momentum=0.99:optim.momentum_decay=1000,"
                            f"nesterov:optim.momentum_decay={psi},"
                            "nesterov:optim.momentum=0.55:optim.momentum_decay=1000,"
                            "pipedream:optim.momentum=0.55", ["--train.seed=1"])],
        # (d) nesterov-sgd with and without the (1 - gamma) discount: without it at the same lr,
        # and at lr (1 - mu) with weight_decay / (1 - mu), which for constant mu = 0.99 is
        # algebraically the same update as with the discount. Then the lr sweep.
        "d": [Part("discount", f"{sgd_variant(1.0)},{sgd_variant(1.0, False)},"
                   f"{sgd_variant(0.01, False)}"),
              Part("lr", ",".join(sgd_variant(lr) for lr in SGD_LRS if lr != 1.0))],
    }


def machine() -> str:
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    import os

    return (f"{model}, {os.cpu_count()} cores; Python {platform.python_version()}, torch {torch.__version__}, "
            f"{platform.system()} {platform.release()}")


def run_part(exp: str, part: Part, extra: list[str]) -> Path:
    out = RUNS / f"exp_{exp}" / part.name
    overrides = part.overrides + extra + [f"--run.out_dir={out}"]
    cfg = load_config(CONFIG, overrides)
    cmd = (f"pipenag compare --methods {part.methods} --config {CONFIG} "
           f"{' '.join(part.overrides + extra)} --out {out}")
    print(f"== {cmd}", flush=True)
    compare_main(part.methods, cfg)
    return out


def load_rows(out: Path) -> list[dict]:
    return json.loads((out / "summary.json").read_text())["rows"]


def report(exp: str, parts: list[Part]) -> None:
    """Markdown table: one row per method; per column (a part, or a seed for (a)) the final
    validation loss and the loss at the simulated time the fastest method finished."""
    from pipenag.compare import add_equal_time_losses
    from pipenag.plots import plot_compare

    tables: dict[str, dict[str, dict]] = {}
    for part in parts:
        out = RUNS / f"exp_{exp}" / part.name
        if not (out / "summary.json").is_file():
            print(f"({out} not finished)")
            continue
        rows = load_rows(out)
        tables.setdefault(part.name.split("-")[0], {}).update({r["method"]: r for r in rows})
    if not tables:
        return
    times = {}
    for name, table in tables.items():
        rows = list(table.values())
        times[name] = add_equal_time_losses(rows)
        plot_compare(rows, DOCS / f"exp_{exp}_{name}.png", title=f"exp {exp}: {name}")
    methods = list(dict.fromkeys(m for t in tables.values() for m in t))
    names = list(tables)
    head = "| method | " + " | ".join(f"{n}: final val loss | {n}: at sim time {times[n]:.0f}" for n in names)
    head += " | mean final | mean at equal time |" if len(names) > 1 and exp == "a" else " |"
    print(head)
    print("|---" * (1 + 2 * len(names) + 2 * (len(names) > 1 and exp == "a")) + "|")
    for m in methods:
        cells, finals, equal = [], [], []
        for n in names:
            r = tables[n].get(m)
            if r is None:
                cells += ["", ""]
                continue
            finals.append(r["val_loss"])
            equal.append(r["val_loss_at_equal_time"])
            if r["status"] == "ok":
                cells.append(f"{r['val_loss']:.4f} ({r['updates']} upd)")
            else:
                cells.append(f"{r['status']} at update {r['updates']}")
            e = r["val_loss_at_equal_time"]
            cells.append("n/a" if e is None else f"{e:.4f}")
        line = f"| `{m}` | " + " | ".join(cells) + " |"
        if len(names) > 1 and exp == "a":
            def mean(xs):
                ok = [x for x in xs if x is not None and math.isfinite(x)]
                return f"{statistics.mean(ok):.4f} (n={len(ok)})" if len(ok) == len(xs) and ok else "n/a"
            line += f" {mean(finals)} | {mean(equal)} |"
        print(line)


def plot_scaling(parts: list[Part]) -> None:
    """Experiment (b): final validation loss and simulated time against K, one line per
    method and seed (docs/results/exp_b_scaling.png)."""
    from pipenag.plots import plot_panels

    loss: dict[str, tuple[list, list]] = {}
    time_: dict[str, tuple[list, list]] = {}
    for part in parts:
        out = RUNS / "exp_b" / part.name
        if not (out / "summary.json").is_file():
            continue
        seed = part.name.split("K")[0] or "seed0"
        K = int(part.name.split("K")[1])
        for r in load_rows(out):
            for store, value in ((loss, r["val_loss"]), (time_, r["sim_time"])):
                xs, ys = store.setdefault(f"{r['method']} ({seed})", ([], []))
                xs.append(K)
                ys.append(value)
    styles = {name: {"marker": "o", "linestyle": "-" if "(seed0)" in name else "--"} for name in loss}
    if loss:
        plot_panels({"final validation loss": loss}, DOCS / "exp_b_loss_vs_K.png", xlabel="stages K",
                    ylabel="validation loss", title="exp b: 614,400 tokens, 16 blocks", styles=styles)
        plot_panels({"simulated time of the run": time_}, DOCS / "exp_b_time_vs_K.png", xlabel="stages K",
                    ylabel="block-forward units", title="exp b: simulated pipeline time", logy=True,
                    styles=styles)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", choices=["a", "b", "c", "d"])
    parser.add_argument("--report-only", action="store_true", help="only tables and PNGs from finished runs")
    parser.add_argument("--parts", default="", help="comma-separated part names to run (default: all)")
    parser.add_argument("extra", nargs="*", help="--section.key=value overrides for every part")
    args, unknown = parser.parse_known_args(argv)
    torch.set_num_threads(1)
    extra = list(args.extra) + unknown
    budget = budget_of(load_config(CONFIG, extra))
    parts = experiments(budget)[args.experiment]
    if args.parts:
        parts = [p for p in parts if p.name in args.parts.split(",")]
    print(f"machine: {machine()}", flush=True)
    if not args.report_only:
        for part in parts:
            run_part(args.experiment, part, extra)
    DOCS.mkdir(parents=True, exist_ok=True)
    report(args.experiment, parts)
    if args.experiment == "b":
        plot_scaling(parts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
