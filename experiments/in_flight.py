"""Utilization on slow links: today's depths (K - k) against pipeline.in_flight="auto".

    python experiments/in_flight.py --out runs/in_flight            # about 15 minutes on 2 cores
    python experiments/in_flight.py --out runs/in_flight --report   # the table from its data

For K in {4, 8} and links {none; 1 Gbit/s 5 ms; 100 Mbit/s 30 ms; 50 Mbit/s 100 ms}, runs
`pipenag bench pipeline` (sleeping stages, 20 ms per forward and per backward, 512 KiB
messages, the real runtime and transport) with the pipedream schedule at the default depths
and at in_flight=auto, and writes the measured and predicted mean utilization, the depths and
their staleness to OUT/in_flight.json and a markdown table to OUT/in_flight.md (the table of
docs/results/pipeline.md). `--compression int8` compresses both directions of every run
(link.compress_activations and link.compress_gradients).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

LINKS = [("none", 0.0, 0.0), ("1 Gbit/s, 5 ms", 5.0, 1000.0), ("100 Mbit/s, 30 ms", 30.0, 100.0),
         ("50 Mbit/s, 100 ms", 100.0, 50.0)]
STAGES = (4, 8)


def bench(K: int, latency_ms: float, bandwidth_mbps: float, in_flight: str, updates: int, compute_ms: float,
          message_kb: float, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "pipenag", "bench", "pipeline", "--stages", str(K), "--compute-ms", str(compute_ms),
           "--message-kb", str(message_kb), f"--link.latency_ms={latency_ms}", f"--link.bandwidth_mbps={bandwidth_mbps}",
           "--schedules", "pipedream", "--updates", str(updates), "--dist.timeout_s=300", "--json", *extra]
    if in_flight:
        cmd.append(f"--pipeline.in_flight={in_flight}")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])["pipedream"]
    result["command"] = "pipenag " + " ".join(cmd[3:])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def report(rows: list[dict]) -> str:
    lines = ["| K | link | depths | in flight per stage | staleness per stage | utilization measured | "
             "predicted | bound | hop ms |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        res = r["result"]
        lines.append(f"| {r['K']} | {r['link']} | {r['mode']} | {res['in_flight']} | {res['staleness']} | "
                     f"{res['mean_utilization']:.3f} | {res['predicted_mean_utilization']:.3f} | {r['bound']:.3f} | "
                     f"{res['fitted_hop_delay_s'] * 1e3:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--report", action="store_true", help="only rebuild the table from OUT/in_flight.json")
    parser.add_argument("--updates", type=int, default=100, help="gpipe-equivalent updates (x4 microbatches)")
    parser.add_argument("--compute-ms", type=float, default=20.0)
    parser.add_argument("--message-kb", type=float, default=512.0)
    parser.add_argument("--stages", default="4,8")
    parser.add_argument("--compression", default="", help="codec of both directions (int8, int4, int4-hadamard)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "in_flight.json"
    if args.report:
        rows = json.loads(data.read_text())
    else:
        from pipenag.timing import utilization_bound

        rows = []
        extra = ([f"--link.compress_activations={args.compression}", f"--link.compress_gradients={args.compression}"]
                 if args.compression else [])
        for K in (int(k) for k in args.stages.split(",")):
            for name, latency, bandwidth in LINKS:
                for mode in ("default", "auto"):
                    res = bench(K, latency, bandwidth, "auto" if mode == "auto" else "", args.updates,
                                args.compute_ms, args.message_kb, extra)
                    c = args.compute_ms / 1e3
                    bound = utilization_bound(c, c, res.get("transfer_s", 0.0))
                    rows.append({"K": K, "link": name, "mode": mode, "bound": bound, "result": res})
                    print(f"K={K} {name} {mode}: utilization {res['mean_utilization']:.3f} (predicted "
                          f"{res['predicted_mean_utilization']:.3f}), depths {res['in_flight']}, {res['seconds']} s",
                          flush=True)
                    data.write_text(json.dumps(rows, indent=1))
    (out / "in_flight.md").write_text(report(rows))
    print(report(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
