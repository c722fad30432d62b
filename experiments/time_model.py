"""The wall-clock model against the real runtime: real compute, emulated links, K = 4 (or --stages).

    python experiments/time_model.py --out runs/time_model      # about 25 minutes on 2 cores

For links {none; 1 Gbit/s 5 ms; 100 Mbit/s 30 ms; 100 Mbit/s 30 ms with int8 both ways} x
schedules {pipedream, 1f1b, gpipe}, trains a small GPT (4 blocks of width 128, context 128,
microbatch 8: 512 KiB activations) with `--engine dist` (one process per stage, gloo, link
emulation), and compares the measured seconds per update in the steady state (metrics.jsonl
time_s between 20% and 90% of the run, written by the last stage after each update) with
pipenag.wallclock.predict on costs from pipenag.wallclock.calibrate: the stage modules timed in
one process with one thread (forward, backward, step per stage) and used for every schedule
(they share the modules and the optimizer), plus the codecs' encode/decode
(pipenag.wallclock.measure_codecs) for the int8 rows.

Every setting is run --repeats times, the settings taking turns (round robin), so that the
machine's drift over the minutes of a pass falls on all of them alike; the table gives the
median of the repeats and their spread (max / min), the machine's own run-to-run noise. The
machine (calibration and contention) is measured before every round and after the last, and
each run is predicted from the mean of the two measurements around its round: the stage costs
of one VM drift by 25% within 20 minutes. The last column shows the model with the first
calibration alone.

The model's contention for the cores comes in two forms, both columns of the table:
- processor sharing (`cores`: the machine's cores): while n stages compute, each runs at
  min(1, cores / n) of its speed;
- measured contention (pipenag.wallclock.measure_contention with the run's config: 1 to K
  processes, each running the forward, backward and step of one of the run's stages at once,
  around each round, as the calibration), given to the model as its `slowdown` table.
Writes OUT/time_model.json and OUT/time_model.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

INT8 = ["--link.compress_activations=int8", "--link.compress_gradients=int8"]
LINKS = [("none", 0.0, 0.0, []), ("1 Gbit/s, 5 ms", 5.0, 1000.0, []), ("100 Mbit/s, 30 ms", 30.0, 100.0, []),
         ("100 Mbit/s, 30 ms, int8", 30.0, 100.0, INT8)]
METHODS = [("pipedream", 200), ("1f1b", 50), ("gpipe", 50)]  # (method, updates): 200 microbatches each
# --methods may also name these: the zero-bubble schedule on pipenag's executor, and on torch's
# ScheduleInterleavedZeroBubble (dist.sync_executor = "torch", which refuses link emulation).
OTHER_METHODS = {"zb-h1": (50, [], None), "zb-h1-torch": (50, ["--dist.sync_executor=torch"], ["none"])}
MODEL = ["--model.n_layer=4", "--model.n_embd=128", "--model.n_head=4", "--model.block_size=128",
         "--data.microbatch_size=8", "--data.max_chars=400000", "--pipeline.num_stages=4", "--run.threads=1",
         "--train.eval_every=0", "--train.eval_batches=1", "--train.checkpoint_every=0", "--run.progress=false",
         "--dist.timeout_s=300"]


def _mean_costs(a, b):
    """The stage costs averaged over two calibrations (before and after the runs)."""
    mean = lambda x, y: tuple((u + v) / 2 for u, v in zip(x, y))  # noqa: E731
    return dataclasses.replace(a, forward=mean(a.forward, b.forward), backward=mean(a.backward, b.backward),
                               step=mean(a.step, b.step), weight=mean(a.weight, b.weight))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the stages share")
    parser.add_argument("--stages", type=int, default=4, help="K (the model's 4 blocks split evenly)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of every setting (round robin)")
    parser.add_argument("--methods", default=",".join(m for m, _ in METHODS),
                        help=f"comma-separated, of {', '.join([m for m, _ in METHODS] + list(OTHER_METHODS))}")
    args = parser.parse_args(argv)
    from pipenag.config import load_config
    from pipenag.runtime.launch import train_dist
    from pipenag.wallclock import calibrate, measure_codecs, measure_contention, measured_seconds_per_update, predict

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = args.cores if args.cores < args.stages else 0
    common = MODEL + [f"--data.cache_dir={out / 'cache'}", f"--pipeline.num_stages={args.stages}"]
    base_cfg = load_config(None, common + ["--pipeline.method=pipedream"])
    # zb-h1's B and W passes are calibrated on a zb-h1 config (the other schedules share
    # pipedream's modules, optimizer and passes)
    split_cfg = load_config(None, common + ["--pipeline.method=zb-h1"])
    labels = args.methods.split(",")

    def measure_machine():
        costs = {"whole": calibrate(base_cfg, repeats=20, warmup=5, cache=False)}
        if any(label.startswith("zb-h1") for label in labels):
            costs["split"] = calibrate(split_cfg, repeats=20, warmup=5, cache=False)
        table = measure_contention(args.stages, cfg=base_cfg)
        c = costs["whole"]
        print(f"calibration: forward {[round(x * 1e3, 2) for x in c.forward]} ms, backward "
              f"{[round(x * 1e3, 2) for x in c.backward]} ms; contention "
              f"{' '.join(f'{x:.2f}' for x in table)}", flush=True)
        if "split" in costs:
            print(f"  zb-h1: B {[round(x * 1e3, 2) for x in costs['split'].backward]} ms, W "
                  f"{[round(x * 1e3, 2) for x in costs['split'].weight]} ms", flush=True)
        return costs, table

    # The machine drifts by tens of percent within minutes (docs/results/time_model.md), so it is
    # measured before every round of runs and after the last: each run is predicted with the
    # mean of the two measurements around its round.
    machine = [measure_machine()]
    plan = []
    for label in labels:
        updates, extra, links = OTHER_METHODS.get(label, (dict(METHODS).get(label), [], None))
        if updates is None:
            raise SystemExit(f"error: --methods: no method {label!r}")
        method = label.removesuffix("-torch")
        plan += [(label, updates, (name, latency, bandwidth, lx + extra + [f"--pipeline.method={method}"]))
                 for name, latency, bandwidth, lx in LINKS if links is None or name in links]
    measured: dict[int, list[float]] = {i: [] for i in range(len(plan))}
    configs = {}
    for rep in range(args.repeats):
        for i, (method, updates, (name, latency, bandwidth, extra)) in enumerate(plan):
            folder = out / f"rep{rep}" / method / (name.replace(" ", "").replace(",", "_").replace("/", ""))
            cfg = load_config(None, common + [f"--train.steps={updates}",
                                              f"--link.latency_ms={latency}", f"--link.bandwidth_mbps={bandwidth}",
                                              *extra, "--train.engine=dist", f"--run.out_dir={folder}"])
            configs[i] = cfg
            assert train_dist(cfg, start_method="fork") == 0
            measured[i].append(measured_seconds_per_update(folder))
            print(f"repeat {rep + 1}/{args.repeats} {method} {name}: {measured[i][-1] * 1e3:.1f} ms/update", flush=True)
        machine.append(measure_machine())
    rows = []
    for i, (method, updates, (name, *_)) in enumerate(plan):
        cfg = configs[i]
        encode, decode = measure_codecs(cfg, repeats=20, warmup=5)
        shared, contended = [], []
        for rep in range(args.repeats):
            (before, table_before), (after, table_after) = machine[rep], machine[rep + 1]
            which = "split" if method.startswith("zb-h1") else "whole"
            costs = dataclasses.replace(_mean_costs(before[which], after[which]), encode=encode, decode=decode)
            slowdown = tuple((x + y) / 2 for x, y in zip(table_before, table_after))
            shared.append(predict(cfg, costs, cores=cores).steady_s_per_update)
            contended.append(predict(cfg, costs, slowdown=slowdown).steady_s_per_update)
        median = statistics.median(measured[i])
        shared_s, contended_s = statistics.median(shared), statistics.median(contended)
        first = dataclasses.replace(machine[0][0]["split" if method.startswith("zb-h1") else "whole"], encode=encode,
                                    decode=decode)
        rows.append({"method": method, "link": name, "stages": args.stages, "updates": updates,
                     "measured_s": median, "measured_runs_s": measured[i], "cores": cores,
                     "predicted_processor_sharing_s": shared_s, "ratio_processor_sharing": shared_s / median,
                     "predicted_processor_sharing_runs_s": shared,
                     "predicted_contention_s": contended_s, "ratio_contention": contended_s / median,
                     "predicted_contention_runs_s": contended,
                     # the model with the first calibration alone (how much the drift matters)
                     "ratio_processor_sharing_first_calibration":
                         predict(cfg, first, cores=cores).steady_s_per_update / median,
                     "slowdown_tables": [t for _, t in machine],
                     "calibrations": [{name: {"forward": c.forward, "backward": c.backward, "step": c.step,
                                              "weight": c.weight} for name, c in cs.items()} for cs, _ in machine],
                     "encode": encode, "decode": decode})
    (out / "time_model.json").write_text(json.dumps(rows, indent=1))
    tables = "; ".join(", ".join(f"{x:.2f}" for x in t) for _, t in machine)
    fwd = ", ".join(f"{statistics.fmean(c['whole'].forward) * 1e3:.1f}" for c, _ in machine)
    lines = [f"K = {args.stages}, {args.repeats} runs of every setting, round robin. The machine measured before "
             f"every round and after the last: contention (one process's slowdown with 1..{args.stages} stages "
             f"computing) {tables}; mean forward per stage {fwd} ms.", "",
             f"| method | link | updates | measured ms / update (median of {args.repeats}) | spread (max / min) | "
             f"processor sharing ({cores or args.stages} cores) | ratio | measured contention | ratio | "
             "processor sharing, first calibration only: ratio |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        runs = r["measured_runs_s"]
        lines.append(f"| {r['method']} | {r['link']} | {r['updates']} | {r['measured_s'] * 1e3:.1f} | "
                     f"{max(runs) / min(runs):.3f} | {r['predicted_processor_sharing_s'] * 1e3:.1f} | "
                     f"{r['ratio_processor_sharing']:.3f} | {r['predicted_contention_s'] * 1e3:.1f} | "
                     f"{r['ratio_contention']:.3f} | {r['ratio_processor_sharing_first_calibration']:.3f} |")
    for key, name in (("ratio_processor_sharing", "processor sharing"), ("ratio_contention", "measured contention"),
                      ("ratio_processor_sharing_first_calibration", "processor sharing, first calibration only")):
        within = sum(abs(r[key] - 1) <= 0.10 for r in rows)
        lines.append(f"\n{name}: {within} of {len(rows)} settings within 10%.")
    (out / "time_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
