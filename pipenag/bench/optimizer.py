"""Optimizer step time and state memory on one pipeline stage, against a baseline in the same run.

    pipenag bench optimizer --config configs/small.toml --stages 8
    pipenag bench optimizer --model.n_embd=512 --stages 1 --optimizers adamw,muon,basis-rotation --json runs/opt.json

The stage is built as `pipenag train` builds it (the config's model split into
pipeline.num_stages stages; --stage picks which, default the middle one), and every optimizer
gets its own copy of that stage's parameters (on run.device). Each is built by name with the config's [optim]
settings (build_optimizer, as the methods use them) or is one of the torch references below.
The optimizers take turns inside each round, in an order that rotates each round, so that
drifts of a shared machine hit all alike; before every step, untimed, the gradients are reset
to the same values (torch's foreach SGD-nesterov adds its momentum into p.grad in place).
Reported: the median step time, its ratio to the baseline (median/median and the median of the
per-round ratios), and the bytes of optimizer state against the baseline's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time
from typing import Callable

import torch

from pipenag.bench import bench_config, bench_parser, machine_info, machine_line
from pipenag.build import stage_optimizer
from pipenag.config import Config
from pipenag.optim import OPTIMIZERS, DelayedNesterov
from pipenag.run import sim_device
from pipenag.split import build_stages

# Torch references beside the named optimizers: name -> (description, factory(params, cfg)).
REFERENCES: dict[str, tuple[str, Callable]] = {
    "sgd-nesterov": ("torch SGD(momentum=0.9, nesterov=True, foreach=True)",
                     lambda ps, o: torch.optim.SGD(ps, lr=o.lr, momentum=0.9, nesterov=True,
                                                   weight_decay=o.weight_decay, foreach=True)),
    "nesterov-sgd-loop": ("DelayedNesterov(momentum=0.99, foreach=False): the plain-loop reference",
                          lambda ps, o: DelayedNesterov(ps, lr=o.lr, momentum=0.99, weight_decay=o.weight_decay,
                                                        foreach=False)),
}
CHOICES = tuple(OPTIMIZERS) + tuple(REFERENCES)
DEFAULT = "adamw,nesterov,nesterov-sgd,sgd-nesterov,basis-rotation,muon"


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state (per-parameter buffers)."""
    return sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values()
               if isinstance(v, torch.Tensor))


def make_optimizer(name: str, module: torch.nn.Module, cfg: Config, stage_idx: int) -> torch.optim.Optimizer:
    if name in REFERENCES:
        return REFERENCES[name][1](list(module.parameters()), cfg.optim)
    return stage_optimizer(cfg.optim, name, module, stage_idx, cfg.pipeline.num_stages)


def bench_stage(cfg: Config, stage_idx: int, names: list[str], repeats: int, warmup: int) -> dict:
    """Median step time and state bytes of each optimizer on one stage; see the module docstring."""
    cfg_model = copy.deepcopy(cfg.model)
    cfg_model.vocab_size = cfg_model.vocab_size or 256
    device = sim_device(cfg)
    stage = build_stages(cfg_model, cfg.pipeline.num_stages, seed=cfg.train.seed)[stage_idx].to(device)
    gen = torch.Generator().manual_seed(cfg.train.seed + 1)
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(device) for p in stage.parameters()]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    runs = {}
    for name in names:
        module = copy.deepcopy(stage)
        for p, g in zip(module.parameters(), grads):
            p.grad = g.clone()
        runs[name] = (module, make_optimizer(name, module, cfg, stage_idx))
    times: dict[str, list[float]] = {name: [] for name in names}
    num_rounds = warmup + repeats
    for r in range(num_rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            module, opt = runs[name]
            with torch.no_grad():
                for p, g in zip(module.parameters(), grads):
                    p.grad.copy_(g)
            sync()
            t0 = time.perf_counter()
            opt.step()
            sync()
            dt = time.perf_counter() - t0
            if r >= warmup:
                times[name].append(dt)
        if (r + 1) % max(1, num_rounds // 4) == 0 or r + 1 == num_rounds:
            print(f"  round {r + 1}/{num_rounds}", flush=True)
    for name, (module, _) in runs.items():
        if not all(torch.isfinite(p).all() for p in module.parameters()):
            raise RuntimeError(f"{name} produced non-finite parameters")
    return {
        "stage": stage_idx,
        "num_params": sum(p.numel() for p in stage.parameters()),
        "param_bytes": sum(p.numel() * p.element_size() for p in stage.parameters()),
        "shapes": sorted({tuple(p.shape) for p in stage.parameters()}, key=lambda s: -math.prod(s)),
        "median_s": {n: statistics.median(ts) for n, ts in times.items()},
        "min_s": {n: min(ts) for n, ts in times.items()},
        "times_s": times,
        "state_bytes": {n: state_bytes(opt) for n, (_, opt) in runs.items()},
    }


def format_table(res: dict, names: list[str], baseline: str) -> str:
    base_t, base_b = res["median_s"][baseline], res["state_bytes"][baseline]
    header = (f"{'optimizer':<20} {'median ms':>10} {'min ms':>9} {'vs ' + baseline:>14} {'paired':>8} "
              f"{'state MB':>9} {'state vs ' + baseline:>18}")
    lines = [header, "-" * len(header)]
    for name in names:
        med = res["median_s"][name]
        paired = statistics.median(t / b for t, b in zip(res["times_s"][name], res["times_s"][baseline]))
        sb = res["state_bytes"][name]
        lines.append(f"{name:<20} {med * 1e3:>10.2f} {res['min_s'][name] * 1e3:>9.2f} {med / base_t:>13.2f}x "
                     f"{paired:>7.2f}x {sb / 2**20:>9.2f} {sb / base_b if base_b else float('nan'):>17.2f}x")
    return "\n".join(lines) + (f"\nratios against {baseline}; paired = median over rounds of the per-round "
                               "ratio; state = bytes of the optimizer's per-parameter tensors")


def main(argv: list[str]) -> int:
    parser = bench_parser("pipenag bench optimizer", __doc__)
    parser.add_argument("--optimizers", default=DEFAULT, help="comma-separated, from " + ", ".join(CHOICES))
    parser.add_argument("--baseline", default="adamw", help="the optimizer the ratios are taken against")
    parser.add_argument("--stage", type=int, default=-1, help="which stage's parameters (default: K // 2)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per optimizer (median)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args, cfg = bench_config(parser, argv)
    K = cfg.pipeline.num_stages
    stage_idx = K // 2 if args.stage < 0 else args.stage
    try:
        names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
        unknown = [n for n in names if n not in CHOICES]
        if unknown:
            raise ValueError(f"--optimizers: unknown {unknown}; choose from {', '.join(CHOICES)}")
        if args.baseline not in names:
            names.append(args.baseline)
        if args.repeats < 1 or args.warmup < 0:
            raise ValueError(f"need --repeats >= 1 and --warmup >= 0, got {args.repeats} and {args.warmup}")
        if not 0 <= stage_idx < K:
            raise ValueError(f"--stage={stage_idx}: must be in [0, {K})")
    except ValueError as e:
        print(f"pipenag bench optimizer: error: {e}", file=sys.stderr)
        return 2
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    print(machine_line(machine))
    m = cfg.model
    print(f"stage {stage_idx} of K={K}: GPT n_layer {m.n_layer}, n_embd {m.n_embd}; float32, lr {cfg.optim.lr}, "
          f"weight decay {cfg.optim.weight_decay}; {args.warmup} warm-up + {args.repeats} timed steps each",
          flush=True)
    for name in names:
        print(f"  {name:<20} {REFERENCES[name][0] if name in REFERENCES else 'build_optimizer(' + repr(name) + ')'}")
    res = bench_stage(cfg, stage_idx, names, args.repeats, args.warmup)
    print(f"{res['num_params']:,} parameters in the stage")
    print()
    print(format_table(res, names, args.baseline))
    if args.json:
        if os.path.dirname(args.json):
            os.makedirs(os.path.dirname(args.json), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"machine": machine, "args": vars(args), "config": cfg.to_dict(), "results": res}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
