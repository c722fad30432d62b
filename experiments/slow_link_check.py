"""The slow-link chain end to end, on real runs: the depths `in_flight = "auto"` plans, the loss
at those depths (the runtime equal to the simulator), and the wall-clock model's time to the
target against the runtime's own clock, on the benchmark regime.

    python experiments/slow_link_check.py --out runs/slow_link_check     # about 50 minutes on 2 cores

docs/results/slow_links.md takes its losses from simulator runs at the depths each link implies
and its times from the wall-clock model. This checks that chain once with the real runtime:
configs/bench.toml at K = 4 (8 blocks of width 32 per stage, 64 KiB messages, 17 KiB with
int8), on an emulated 100 Mbit/s, 30 ms link with int8 on both directions, the whole
2,000-microbatch budget, for a synchronous schedule and the asynchronous methods of the table:
1. the stages of each method are calibrated on this machine (pipenag.wallclock.calibrate, kept
   in OUT/<method>/costs.json, the costs the model uses); pipeline.pass_ms, which "auto" plans with, is the slowest stage's forward + backward times
   K / cores (the stage processes share the cores), so the depths are the planner's for this
   machine;
2. each method trains with `--engine dist` (one process per stage, gloo, the link emulated),
   alone on the machine, then again in the simulator with the dist run's config (the other
   work of the machine may go on then): the validation losses must be equal, bit for bit;
3. the measured time to a target (each synchronous schedule's final loss, and 2.70)
   is the runtime's clock at the first evaluation at or below it, less the evaluations' own
   time (the runtime's eval_s of the last stage, spread evenly over its evaluations); the
   model's is the microbatches to that evaluation times pipenag.wallclock.predict's seconds per
   microbatch (processor sharing on the machine's cores), plus its fill.
Writes OUT/slow_link_check.json and OUT/slow_link_check.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

LINK = ["--link.latency_ms=30", "--link.bandwidth_mbps=100", "--link.compress_activations=int8",
        "--link.compress_gradients=int8"]
BASE = ["--pipeline.num_stages=4", "--optim.lr=3e-3", "--train.seed=1", "--run.progress=false",
        "--dist.timeout_s=600", "--train.checkpoint_every=0"]
# (label, overrides): the synchronous reference first, then the asynchronous methods at "auto"
METHODS = [("gpipe", ["--pipeline.method=gpipe"]),
           ("pipedream", ["--pipeline.method=pipedream", "--pipeline.in_flight=auto"]),
           ("nesterov", ["--pipeline.method=nesterov", "--pipeline.in_flight=auto"]),
           ("gpipe-muon", ["--pipeline.method=gpipe-muon", "--optim.lr=1e-2"]),
           ("muon-wp", ["--pipeline.method=muon-wp", "--pipeline.in_flight=auto"])]


def time_to(records: list[dict], target: float, eval_s_each: float) -> tuple[int, float] | None:
    """(microbatches, seconds less the evaluations' time) at the first evaluation at or below
    `target`; None if the run never gets there."""
    evals = 0
    for r in records:
        if r.get("val_loss") is None:
            continue
        evals += 1
        if r["val_loss"] <= target:
            return r["tokens"] // r["_tokens_per_mb"], r["time_s"] - evals * eval_s_each
    return None


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default=",".join(m for m, _ in METHODS))
    parser.add_argument("--budget", type=int, default=0, help="microbatches (0: the config's 2,000)")
    parser.add_argument("--engines", default="dist,sim",
                        help="which runs to make now (the dist runs want the machine to themselves, the simulator "
                             "runs do not); the table needs both")
    args = parser.parse_args(argv)
    from pipenag.config import Config, load_config
    from pipenag.metrics import read_metrics
    from pipenag.runtime.launch import train_dist
    from pipenag.train import train_sim
    from pipenag.methods import resolve
    from pipenag.wallclock import StageCosts, calibrate, measured_seconds_per_update, predict

    out = Path(args.out)
    cores = os.cpu_count() or 1
    chosen = [(m, o) for m, o in METHODS if m in args.methods.split(",")]
    budget = [f"--train.microbatch_budget={args.budget}"] if args.budget else []
    results = []
    for label, overrides in chosen:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        common = BASE + LINK + overrides + budget + [f"--data.cache_dir={out / 'cache'}"]
        if not (folder / "costs.json").is_file():  # calibrated once, with the dist run, on the quiet machine
            if "dist" not in args.engines.split(","):
                print(f"{label}: not calibrated yet (it comes with the dist run)", flush=True)
                continue
            costs = calibrate(load_config("configs/bench.toml", common + ["--pipeline.in_flight="]),
                              repeats=10, warmup=3, cache=False)
            (folder / "costs.json").write_text(json.dumps(dataclasses.asdict(costs), indent=1) + "\n")
        saved = json.loads((folder / "costs.json").read_text())
        costs = StageCosts(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
        K = len(costs.forward)
        pass_ms = max(f + b for f, b in zip(costs.forward, costs.backward)) * 1e3 * K / min(cores, K)
        runs = {}
        for engine in ("dist", "sim"):
            run_dir = folder / engine
            if (folder / "dist" / "config.json").is_file():  # the simulator gets the dist run's config exactly
                cfg = Config.from_dict(json.loads((folder / "dist" / "config.json").read_text())).with_overrides(
                    [f"--train.engine={engine}", f"--run.out_dir={run_dir}"])
            else:
                cfg = load_config("configs/bench.toml", common + [f"--pipeline.pass_ms={pass_ms:.1f}",
                                                                  f"--train.engine={engine}", f"--run.out_dir={run_dir}"])
            if not (run_dir / "summary.json").is_file():
                if engine not in args.engines.split(","):
                    continue
                if engine == "dist":
                    assert train_dist(cfg, start_method="fork") == 0
                else:
                    train_sim(cfg)
            runs[engine] = (cfg, json.loads((run_dir / "summary.json").read_text()), read_metrics(run_dir))
        if len(runs) < 2:
            print(f"{label}: {', '.join(runs) or 'no run'} made; the table waits for both engines", flush=True)
            continue
        cfg, summary, records = runs["dist"]
        resolved = resolve(cfg)
        M = resolved.schedule.num_microbatches
        for r in records:
            r["_tokens_per_mb"] = cfg.data.microbatch_size * cfg.model.block_size
        losses = {e: [r["val_loss"] for r in runs[e][2] if r.get("val_loss") is not None] for e in runs}
        last = summary["stage_stats"][-1]
        eval_s_each = last["eval_s"] / max(1, last["counts"]["E"])
        pred = predict(cfg, costs, cores=cores if cores < K else 0)
        results.append({
            "method": label, "depths": list(resolved.schedule.depths) if resolved.schedule.asynchronous else [],
            "M": M, "pass_ms": cfg.pipeline.pass_ms, "val_loss_dist": summary["val_loss"],
            "val_loss_sim": runs["sim"][1]["val_loss"], "sim_equals_dist": losses["dist"] == losses["sim"],
            "evaluations": len(losses["dist"]), "eval_s_each": eval_s_each,
            # the steady state's seconds per microbatch, its evaluations taken out
            # (train.eval_every counts updates here: the budget was spent into updates)
            "measured_s_per_microbatch": (measured_seconds_per_update(out / label / "dist")
                                          - eval_s_each / cfg.train.eval_every) / M,
            "model_s_per_microbatch": pred.steady_s_per_update / M,
            "model_fill_s": max(0.0, pred.run_s_per_update * pred.num_updates - pred.steady_s_per_update
                                * pred.num_updates),
            "records": [{k: r[k] for k in ("step", "tokens", "time_s", "val_loss") if k in r}
                        for r in records if r.get("val_loss") is not None],
            "tokens_per_mb": cfg.data.microbatch_size * cfg.model.block_size})
        print(f"{label}: depths {results[-1]['depths'] or 'M = ' + str(M)}, loss dist {summary['val_loss']:.4f} "
              f"sim {results[-1]['val_loss_sim']:.4f} (equal: {results[-1]['sim_equals_dist']}), "
              f"{results[-1]['measured_s_per_microbatch'] * 1e3:.1f} ms / microbatch measured, "
              f"{results[-1]['model_s_per_microbatch'] * 1e3:.1f} modelled", flush=True)
        (out / "slow_link_check.json").write_text(json.dumps(results, indent=1))
    report(results, out)
    return 0


def report(results: list[dict], out: Path) -> None:
    sync = [r for r in results if not r["depths"]]
    # each synchronous schedule's own final loss (so its time to it is its whole run), and a looser one
    targets = sorted({r["val_loss_dist"] for r in sync} | {2.70})
    lines = ["| method | depths or M | final loss, dist (= sim?) | ms / microbatch measured | modelled | ratio |"
             + "".join(f" to {t:.4f}: measured s | modelled s | ratio |" for t in targets),
             "|---|---|---|---|---|---|" + "---|---|---|" * len(targets)]
    for r in results:
        row = (f"| {r['method']} | {r['depths'] or 'M = ' + str(r['M'])} | {r['val_loss_dist']:.4f} "
               f"({'equal' if r['sim_equals_dist'] else 'DIFFERENT'}) | {r['measured_s_per_microbatch'] * 1e3:.1f} | "
               f"{r['model_s_per_microbatch'] * 1e3:.1f} | "
               f"{r['model_s_per_microbatch'] / r['measured_s_per_microbatch']:.3f} |")
        for t in targets:
            records = [dict(x, _tokens_per_mb=r["tokens_per_mb"]) for x in r["records"]]
            hit = time_to(records, t, r["eval_s_each"])
            if hit is None:
                row += " never | never | |"
                continue
            mb, measured = hit
            model = mb * r["model_s_per_microbatch"] + r["model_fill_s"]
            r.setdefault("to_target", {})[f"{t:.4f}"] = {"microbatches": mb, "measured_s": measured, "model_s": model}
            row += f" {measured:.0f} | {model:.0f} | {model / measured:.3f} |"
        lines.append(row)
    text = "\n".join(lines) + "\n"
    (out / "slow_link_check.md").write_text(text)
    (out / "slow_link_check.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
