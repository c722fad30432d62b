"""Check the timing model (pipenag.timing.simulate) against the real runtime's throughput.

    python experiments/timing_check.py --out runs/timing_check
    python experiments/timing_check.py --scaling     # the model only: time vs K

For each setting (K stages, M microbatches per update, compute time per forward and per
backward, updates) it runs `pipenag bench pipeline --json` (K processes on gloo whose stages
sleep instead of computing, see pipenag/bench/pipeline.py), reads the measured throughput of
every schedule from the bench's last line, and predicts it independently with
pipenag.timing.simulate: microbatches / makespan with forward = backward = compute time, no
step, latency or transfer time. The model passes a setting when |measured / predicted - 1| <= 10%.

This is a documented check rather than a unit test: its numbers are wall-clock times of a
shared machine (house style: no timed assertions in tests). Results: docs/results/exp_timing.md.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from pipenag.schedules import Schedule
from pipenag.timing import simulate

SETTINGS = [  # (K, M, compute_ms, updates)
    (4, 4, 10.0, 10),
    (4, 4, 40.0, 10),
    (8, 4, 20.0, 10),
    (8, 8, 20.0, 5),
]
TOLERANCE = 0.10


def predicted_throughput(name: str, K: int, M: int, compute_s: float, updates: int) -> float:
    """Microbatches per second of the event model for what the bench runs under `name`."""
    schedule = Schedule(name, K, 1 if name == "pipedream" else max(M, K) if name == "2bw" else M)
    total = updates * M  # the bench runs updates x M microbatches under every schedule
    n = math.ceil(total / schedule.num_microbatches)
    tl = simulate(schedule, n, forward_time=compute_s, backward_time=compute_s)
    return n * schedule.num_microbatches / tl.makespan


def run_bench(K: int, M: int, compute_ms: float, updates: int) -> dict:
    cmd = [sys.executable, "-m", "pipenag", "bench", "pipeline", "--stages", str(K), "--microbatches", str(M),
           "--compute-ms", str(compute_ms), "--updates", str(updates), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def scaling(stages=(4, 8, 16, 24), num_microbatches: int = 4, total: int = 4000) -> None:
    """The model's time for `total` microbatches when the model grows by one block per stage
    (the paper's setting: per-stage time fixed, forward 1, backward 2), gpipe (M = 4) vs
    pipedream, relative to K = stages[0]."""
    print(f"| K | gpipe time | x K={stages[0]} | pipedream time | x K={stages[0]} | gpipe / pipedream |")
    print("|---|---|---|---|---|---|")
    base = None
    for K in stages:
        g = simulate(Schedule("gpipe", K, num_microbatches), total // num_microbatches, 1.0, 2.0).makespan
        a = simulate(Schedule("pipedream", K, 1), total, 1.0, 2.0).makespan
        base = base or (g, a)
        print(f"| {K} | {g:.0f} | {g / base[0]:.2f} | {a:.0f} | {a / base[1]:.3f} | {g / a:.2f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/timing_check")
    parser.add_argument("--repeats", type=int, default=1, help="bench runs per setting (median taken)")
    parser.add_argument("--scaling", action="store_true", help="only print the model's time against K")
    args = parser.parse_args(argv)
    if args.scaling:
        scaling()
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], 0
    print("| K | M | compute ms | updates | schedule | measured mb/s | predicted mb/s | measured / predicted "
          "| within 10% | fitted hop delay ms |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for K, M, compute_ms, updates in SETTINGS:
        runs = [run_bench(K, M, compute_ms, updates) for _ in range(args.repeats)]
        for name in runs[0]:
            measured = sorted(r[name]["throughput"] for r in runs)[len(runs) // 2]
            pred = predicted_throughput(name, K, M, compute_ms / 1e3, updates)
            ratio = measured / pred
            ok = abs(ratio - 1) <= TOLERANCE
            failures += not ok
            rows.append({"K": K, "M": M, "compute_ms": compute_ms, "updates": updates, "schedule": name,
                         "measured": measured, "predicted": pred, "ratio": ratio, "ok": ok,
                         "bench_predicted": runs[0][name].get("predicted_throughput"),
                         "fitted_hop_delay_ms": [r[name].get("fitted_hop_delay_s", 0) * 1e3 for r in runs]})
            hop = sorted(rows[-1]["fitted_hop_delay_ms"])[len(runs) // 2]
            print(f"| {K} | {M} | {compute_ms:g} | {updates} | {name} | {measured:.2f} | {pred:.2f} | "
                  f"{ratio:.3f} | {'yes' if ok else 'NO'} | {hop:.2f} |", flush=True)
    (out / "timing_check.json").write_text(json.dumps(rows, indent=1) + "\n")
    # The speed-up of the asynchronous schedules over the synchronous ones: per-message
    # overheads hit both, so the model should predict the ratio better than either throughput.
    print()
    print("| K | M | compute ms | pipedream / gpipe measured | predicted | 2bw / 1f1b measured | predicted |")
    print("|---|---|---|---|---|---|---|")
    for K, M, compute_ms, updates in SETTINGS:
        r = {x["schedule"]: x for x in rows if (x["K"], x["M"], x["compute_ms"]) == (K, M, compute_ms)}
        if all(n in r for n in ("pipedream", "gpipe", "2bw", "1f1b")):
            print(f"| {K} | {M} | {compute_ms:g} | {r['pipedream']['measured'] / r['gpipe']['measured']:.3f} | "
                  f"{r['pipedream']['predicted'] / r['gpipe']['predicted']:.3f} | "
                  f"{r['2bw']['measured'] / r['1f1b']['measured']:.3f} | "
                  f"{r['2bw']['predicted'] / r['1f1b']['predicted']:.3f} |")
    print(f"{len(rows) - failures}/{len(rows)} within {TOLERANCE:.0%}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
