"""The wall-clock model against the real runtime: real compute, emulated links, K = 4 (or --stages).

    python experiments/time_model.py --out runs/time_model      # about 8 minutes on 2 cores

For links {none; 1 Gbit/s 5 ms; 100 Mbit/s 30 ms; 100 Mbit/s 30 ms with int8 both ways} x
schedules {pipedream, 1f1b, gpipe}, trains a small GPT (4 blocks of width 128, context 128,
microbatch 8: 512 KiB activations) with `--engine dist` (one process per stage, gloo, link
emulation), and compares the measured seconds per update in the steady state (metrics.jsonl
time_s between 20% and 90% of the run, written by the last stage after each update) with
pipenag.wallclock.predict on costs from pipenag.wallclock.calibrate: the stage modules timed in
one process with one thread (forward, backward, step per stage), once, before any run, and used
for every schedule (they share the modules and the optimizer), plus the codecs' encode/decode
(pipenag.wallclock.measure_codecs) for the int8 rows. The first row is run again at the end:
the difference between its two measurements is the machine's run-to-run noise. The stage
processes' contention for the machine is measured too (pipenag.wallclock.measure_contention, 1
to K processes computing at once) and given to the model as its `slowdown` table; the
processor-sharing model (`cores`, which assumes no contention while the processes fit on the
cores) is the other column.
Writes OUT/time_model.json and OUT/time_model.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

INT8 = ["--link.compress_activations=int8", "--link.compress_gradients=int8"]
LINKS = [("none", 0.0, 0.0, []), ("1 Gbit/s, 5 ms", 5.0, 1000.0, []), ("100 Mbit/s, 30 ms", 30.0, 100.0, []),
         ("100 Mbit/s, 30 ms, int8", 30.0, 100.0, INT8)]
METHODS = [("pipedream", 200), ("1f1b", 50), ("gpipe", 50)]  # (method, updates): 200 microbatches each
MODEL = ["--model.n_layer=4", "--model.n_embd=128", "--model.n_head=4", "--model.block_size=128",
         "--data.microbatch_size=8", "--data.max_chars=400000", "--pipeline.num_stages=4", "--run.threads=1",
         "--train.eval_every=0", "--train.eval_batches=1", "--train.checkpoint_every=0", "--run.progress=false",
         "--dist.timeout_s=300"]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the stages share")
    parser.add_argument("--stages", type=int, default=4, help="K (the model's 4 blocks split evenly)")
    args = parser.parse_args(argv)
    from pipenag.config import load_config
    from pipenag.runtime.launch import train_dist
    from pipenag.wallclock import calibrate, measure_codecs, measure_contention, measured_seconds_per_update, predict

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cores = args.cores if args.cores < args.stages else 0
    common = MODEL + [f"--data.cache_dir={out / 'cache'}", f"--pipeline.num_stages={args.stages}"]
    base_costs = calibrate(load_config(None, common + ["--pipeline.method=pipedream"]), repeats=20, warmup=5,
                           cache=False)
    slowdown = measure_contention(args.stages)
    print(f"contention: {' '.join(f'{n + 1} procs {x:.2f}x' for n, x in enumerate(slowdown))}", flush=True)
    rows = []
    plan = [(m, u, link) for m, u in METHODS for link in LINKS]
    for i, (method, updates, (name, latency, bandwidth, extra)) in enumerate(plan + plan[:1]):
        folder = out / method / (name.replace(" ", "").replace(",", "_") + ("_repeat" if i == len(plan) else ""))
        cfg = load_config(None, common + [f"--pipeline.method={method}", f"--train.steps={updates}",
                                          f"--link.latency_ms={latency}", f"--link.bandwidth_mbps={bandwidth}", *extra,
                                          "--train.engine=dist", f"--run.out_dir={folder}"])
        encode, decode = measure_codecs(cfg, repeats=20, warmup=5)
        costs = dataclasses.replace(base_costs, encode=encode, decode=decode)
        t0 = time.perf_counter()
        assert train_dist(cfg, start_method="fork") == 0
        measured = measured_seconds_per_update(Path(cfg.run.out_dir))
        pred = predict(cfg, costs, slowdown=slowdown)
        shared = predict(cfg, costs, cores=cores)
        rows.append({"method": method, "link": name, "stages": args.stages, "updates": updates, "repeat": i == len(plan),
                     "measured_s": measured, "predicted_s": pred.steady_s_per_update,
                     "predicted_processor_sharing_s": shared.steady_s_per_update, "slowdown": slowdown,
                     "ratio": pred.steady_s_per_update / measured, "cores": cores,
                     "costs": {"forward": costs.forward, "backward": costs.backward, "step": costs.step,
                               "encode": costs.encode, "decode": costs.decode},
                     "wall_s": round(time.perf_counter() - t0, 1)})
        print(f"{method} {name}{' (repeat)' if i == len(plan) else ''}: measured {measured * 1e3:.1f} ms/update, "
              f"predicted {pred.steady_s_per_update * 1e3:.1f} ({pred.steady_s_per_update / measured:.3f}x)", flush=True)
        (out / "time_model.json").write_text(json.dumps(rows, indent=1))
    lines = [f"Contention (one process's slowdown with 1..{args.stages} computing): "
             f"{', '.join(f'{x:.2f}' for x in slowdown)}", "",
             "| method | link | updates | measured ms / update | predicted | predicted / measured | "
             "processor sharing instead | its ratio |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']}{' (repeat)' if r['repeat'] else ''} | {r['link']} | {r['updates']} | "
                     f"{r['measured_s'] * 1e3:.1f} | {r['predicted_s'] * 1e3:.1f} | {r['ratio']:.3f} | "
                     f"{r['predicted_processor_sharing_s'] * 1e3:.1f} | "
                     f"{r['predicted_processor_sharing_s'] / r['measured_s']:.3f} |")
    within = sum(abs(r["ratio"] - 1) <= 0.10 for r in rows if not r["repeat"])
    lines.append(f"\n{within} of {len(plan)} settings within 10%.")
    (out / "time_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
