"""The wall-clock model against the real runtime: real compute, emulated links, K = 4.

    python experiments/time_model.py --out runs/time_model      # about 10 minutes on 2 cores

For links {none; 1 Gbit/s 5 ms; 100 Mbit/s 30 ms} x schedules {pipedream, 1f1b, gpipe}, trains
a small GPT (4 blocks of width 128, context 128, microbatch 8: 512 KiB activations, one block
per stage) with `--engine dist` (one process per stage, gloo, link emulation), and compares the
measured seconds per update in the steady state (metrics.jsonl time_s between 20% and 90% of the
run, written by the last stage after each update) with pipenag.wallclock.predict on costs from
pipenag.wallclock.calibrate (one process, one thread, measured before the runs). The 4 stage
processes share this machine's cores: the model is told so (`cores`), by processor sharing.
Writes OUT/time_model.json and OUT/time_model.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

LINKS = [("none", 0.0, 0.0), ("1 Gbit/s, 5 ms", 5.0, 1000.0), ("100 Mbit/s, 30 ms", 30.0, 100.0)]
METHODS = [("pipedream", 200), ("1f1b", 50), ("gpipe", 50)]  # (method, updates): 200 microbatches each
MODEL = ["--model.n_layer=4", "--model.n_embd=128", "--model.n_head=4", "--model.block_size=128",
         "--data.microbatch_size=8", "--data.max_chars=400000", "--pipeline.num_stages=4", "--run.threads=1",
         "--train.eval_every=0", "--train.eval_batches=1", "--train.checkpoint_every=0", "--run.progress=false",
         "--dist.timeout_s=300"]


def measured_seconds_per_update(out: Path) -> float:
    from pipenag.metrics import read_metrics

    records = read_metrics(out)
    n = len(records)
    a, b = int(0.2 * n), int(0.9 * n) - 1
    return (records[b]["time_s"] - records[a]["time_s"]) / (b - a)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="cores the stages share")
    parser.add_argument("--stages", type=int, default=4, help="K (the model's 4 blocks split evenly)")
    args = parser.parse_args(argv)
    from pipenag.config import load_config
    from pipenag.runtime.launch import train_dist
    from pipenag.wallclock import calibrate, predict

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, updates in METHODS:
        base = load_config(None, MODEL + [f"--pipeline.method={method}", f"--train.steps={updates}",
                                          f"--data.cache_dir={out / 'cache'}", f"--pipeline.num_stages={args.stages}"])
        costs = calibrate(base, repeats=10, warmup=3)
        for name, latency, bandwidth in LINKS:
            cfg = base.with_overrides([f"--link.latency_ms={latency}", f"--link.bandwidth_mbps={bandwidth}",
                                       "--train.engine=dist", f"--run.out_dir={out / method / name.replace(' ', '')}"])
            t0 = time.perf_counter()
            assert train_dist(cfg, start_method="fork") == 0
            measured = measured_seconds_per_update(Path(cfg.run.out_dir))
            pred = predict(cfg, costs, cores=args.cores)
            alone = predict(cfg, costs)
            rows.append({"method": method, "link": name, "stages": args.stages, "updates": updates, "measured_s": measured,
                         "predicted_s": pred.steady_s_per_update, "predicted_one_core_each_s": alone.steady_s_per_update,
                         "ratio": pred.steady_s_per_update / measured, "costs": {"forward": costs.forward,
                         "backward": costs.backward, "step": costs.step}, "wall_s": round(time.perf_counter() - t0, 1)})
            print(f"{method} {name}: measured {measured * 1e3:.1f} ms/update, predicted {pred.steady_s_per_update * 1e3:.1f} "
                  f"({pred.steady_s_per_update / measured:.3f}x; one core per stage: {alone.steady_s_per_update * 1e3:.1f})",
                  flush=True)
            (out / "time_model.json").write_text(json.dumps(rows, indent=1))
    lines = ["| method | link | updates | measured ms / update | predicted | predicted / measured | one core per stage |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['link']} | {r['updates']} | {r['measured_s'] * 1e3:.1f} | "
                     f"{r['predicted_s'] * 1e3:.1f} | {r['ratio']:.3f} | {r['predicted_one_core_each_s'] * 1e3:.1f} |")
    (out / "time_model.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
