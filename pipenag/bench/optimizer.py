"""Optimizer step time: DelayedNesterov against torch's SGD-nesterov, NAdam and AdamW.

    python -m pipenag bench optimizer --sizes 1M,10M,50M --repeats 15 --json runs/bench_optimizer.json

For each size it builds one set of transformer-shaped float32 tensors (two blocks: qkv, proj,
fc and fc-proj matrices, their biases and layer-norm vectors), gives every optimizer its own
copy, and times `step()` round-robin (the order rotates each round, so neighbours on a shared
machine slow every optimizer alike). Before every step, untimed, the gradients are reset to
the same values: torch's foreach SGD-nesterov adds the momentum into p.grad in place, and
the reset keeps every optimizer's inputs (and cache state) identical. Reports the median
over the timed rounds and its ratio to torch SGD(momentum=0.9, nesterov=True, foreach=True).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch

from pipenag.bench import cpu_model

from pipenag.optim import DelayedNesterov

BASELINE = "sgd-nesterov"

# name -> (description, factory(params, weight_decay))
OPTIMIZERS = {
    "delayed-nesterov": (
        "DelayedNesterov(momentum=0.99, foreach=True)",
        lambda ps, wd: DelayedNesterov(ps, lr=1e-4, momentum=0.99, weight_decay=wd, foreach=True),
    ),
    "delayed-nesterov-loop": (
        "DelayedNesterov(momentum=0.99, foreach=False)",
        lambda ps, wd: DelayedNesterov(ps, lr=1e-4, momentum=0.99, weight_decay=wd, foreach=False),
    ),
    BASELINE: (
        "torch SGD(momentum=0.9, nesterov=True, foreach=True)",
        lambda ps, wd: torch.optim.SGD(ps, lr=1e-4, momentum=0.9, nesterov=True, weight_decay=wd, foreach=True),
    ),
    "nadam": (
        "torch NAdam(betas=(0.99, 0.999), decoupled wd, foreach=True)",
        lambda ps, wd: torch.optim.NAdam(
            ps, lr=1e-4, betas=(0.99, 0.999), weight_decay=wd, decoupled_weight_decay=True, foreach=True
        ),
    ),
    "adamw": (
        "torch AdamW(betas=(0.9, 0.999), foreach=True)",
        lambda ps, wd: torch.optim.AdamW(ps, lr=1e-4, weight_decay=wd, foreach=True),
    ),
}


def parse_size(text: str) -> int:
    """'1M' -> 1_000_000, '500K' -> 500_000, '2.5e6' -> 2_500_000."""
    text = text.strip()
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale != 1 else text
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise ValueError(f"bad size {text!r}; use e.g. 1M, 500K or 2e6") from None
    if value < 1000:
        raise ValueError(f"size {text!r} is below 1000 floats")
    return value


def param_shapes(num_floats: int, num_blocks: int = 2) -> list[tuple[int, ...]]:
    """Shapes of `num_blocks` GPT blocks of width d, d a multiple of 32, totalling ~num_floats.

    A block has 12 d^2 + 13 d floats: qkv (3d, d), proj (d, d), fc (4d, d), fc-proj (d, 4d),
    their biases, and two layer norms (weight and bias).
    """
    d = max(32, 32 * round(math.sqrt(num_floats / (12 * num_blocks)) / 32))
    block = [(3 * d, d), (3 * d,), (d, d), (d,), (4 * d, d), (4 * d,), (d, 4 * d), (d,), (d,), (d,), (d,), (d,)]
    return block * num_blocks


def bench_size(num_floats: int, names: list[str], repeats: int, warmup: int, weight_decay: float) -> dict:
    """Median step time of each optimizer on one parameter set; see the module docstring."""
    gen = torch.Generator().manual_seed(0)
    shapes = param_shapes(num_floats)
    base = [torch.randn(s, generator=gen) * 0.02 for s in shapes]
    base_grads = [torch.randn(s, generator=gen) * 1e-3 for s in shapes]
    actual = sum(t.numel() for t in base)
    runs = {}
    for name in names:
        params = [torch.nn.Parameter(t.clone()) for t in base]
        for p, g in zip(params, base_grads):
            p.grad = g.clone()
        runs[name] = (params, OPTIMIZERS[name][1](params, weight_decay))
    times: dict[str, list[float]] = {name: [] for name in names}
    num_rounds = warmup + repeats
    for r in range(num_rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            params, opt = runs[name]
            with torch.no_grad():
                for p, g in zip(params, base_grads):
                    p.grad.copy_(g)
            t0 = time.perf_counter()
            opt.step()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
        if (r + 1) % max(1, num_rounds // 4) == 0 or r + 1 == num_rounds:
            print(f"  {actual / 1e6:.1f}M floats: round {r + 1}/{num_rounds}", flush=True)
    for name, (params, _) in runs.items():
        if not all(torch.isfinite(p).all() for p in params):
            raise RuntimeError(f"{name} produced non-finite parameters")
    return {
        "num_floats": actual,
        "num_tensors": len(shapes),
        "shapes": sorted(set(shapes), key=lambda s: -math.prod(s)),
        "median_s": {n: statistics.median(ts) for n, ts in times.items()},
        "min_s": {n: min(ts) for n, ts in times.items()},
        # Each round times every optimizer back to back, so a per-round ratio cancels most of
        # the slow drifts a shared machine adds; its median is the robust comparison.
        "paired_ratio": {
            n: statistics.median(t / b for t, b in zip(ts, times[BASELINE])) for n, ts in times.items()
        }
        if BASELINE in times
        else {},
    }


def format_table(results: list[dict], names: list[str]) -> str:
    header = (
        f"{'floats':>8}  {'optimizer':<22} {'median ms':>10} {'min ms':>9} {'median/median':>14} {'paired ratio':>13}"
    )
    lines = [header, "-" * len(header)]
    for res in results:
        base = res["median_s"].get(BASELINE)
        for name in names:
            med, low = res["median_s"][name], res["min_s"][name]
            ratio = f"{med / base:.3f}x" if base else "-"
            paired = f"{res['paired_ratio'][name]:.3f}x" if base else "-"
            lines.append(
                f"{res['num_floats'] / 1e6:>7.2f}M  {name:<22} {med * 1e3:>10.2f} {low * 1e3:>9.2f} {ratio:>14} {paired:>13}"
            )
    return "\n".join(lines) + f"\nratios are against {BASELINE}; paired = median over rounds of the per-round ratio"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="pipenag bench optimizer", description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1M,10M,50M", help="comma-separated float counts, e.g. 1M,10M,50M")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per optimizer and size (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="subset of " + ",".join(OPTIMIZERS))
    parser.add_argument("--weight-decay", type=float, default=0.0, help="the same for every optimizer")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = parser.parse_args(argv)
    try:
        sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        unknown = [n for n in names if n not in OPTIMIZERS]
        if unknown:
            raise ValueError(f"unknown optimizers {unknown}; choose from {', '.join(OPTIMIZERS)}")
        if args.repeats < 1 or args.warmup < 0:
            raise ValueError(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
    except ValueError as e:
        print(f"pipenag bench optimizer: error: {e}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    machine = {
        "cpu": cpu_model(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
    }
    print(f"cpu {machine['cpu']}, torch {machine['torch']}, python {machine['python']}, "
          f"{machine['torch_threads']} torch threads")
    for name in names:
        print(f"  {name:<22} {OPTIMIZERS[name][0]}")
    print(f"float32, weight decay {args.weight_decay}, {args.warmup} warm-up + {args.repeats} timed steps each", flush=True)
    results = []
    for size in sizes:
        results.append(bench_size(size, names, args.repeats, args.warmup, args.weight_decay))
    print()
    print(format_table(results, names))
    if "delayed-nesterov" in names and BASELINE in names:
        for res in results:
            ratio = res["median_s"]["delayed-nesterov"] / res["median_s"][BASELINE]
            paired = res["paired_ratio"]["delayed-nesterov"]
            print(
                f"delayed-nesterov (foreach) / {BASELINE} at {res['num_floats'] / 1e6:.2f}M floats: "
                f"{ratio:.3f}x (median/median), {paired:.3f}x (paired)"
            )
    if args.json:
        if os.path.dirname(args.json):
            os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "results": results}, f, indent=2)
        print(f"wrote {args.json}")
    return 0
