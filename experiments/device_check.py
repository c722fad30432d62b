"""GPU checks: the simulator on CUDA against the CPU, the runtime with NCCL, benchmark numbers.

    make device-check                      # or: python experiments/device_check.py
    python experiments/device_check.py --json runs/device_check.json

On a machine without CUDA it says so and exits with status 0 (nothing to check). Otherwise:
1. the simulator trains configs/tiny.toml (method nesterov, K = 4, 20 updates) with
   run.device=cpu and run.device=cuda; the per-update training losses must agree to
   TOLERANCE (relative): GPU kernels reduce in another order, so bit equality is not expected;
2. the runtime trains the same run with dist.backend=nccl, K = 2, one process per GPU, and is
   compared with the CUDA simulator to the same tolerance. NCCL refuses two ranks on one GPU,
   so with a single GPU this check is skipped and says why;
3. `pipenag bench optimizer` times the optimizers on a stage on the GPU (run.device=cuda).
Exit status 1 if a check fails.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

TOLERANCE = 1e-3
BASE = ["--config", "configs/tiny.toml", "--method", "nesterov", "--train.steps=20", "--train.eval_every=10",
        "--run.progress=false"]


def train(out: Path, *extra: str) -> list[float]:
    cmd = [sys.executable, "-m", "pipenag", "train", *BASE, "--out", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    return [json.loads(line)["train_loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def max_rel_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(f"device-check: no CUDA device on this machine (torch {torch.__version__}); nothing to check")
        return 0
    gpus = torch.cuda.device_count()
    print(f"device-check: {gpus} CUDA device(s): {torch.cuda.get_device_name(0)}; torch {torch.__version__}, "
          f"CUDA {torch.version.cuda}")
    results: dict = {"gpus": gpus, "device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cpu = train(root / "cpu", "--stages", "4", "--run.device=cpu")
        gpu = train(root / "gpu", "--stages", "4", "--run.device=cuda")
        diff = max_rel_diff(gpu, cpu)
        results["sim_cuda_vs_cpu_max_rel_diff"] = diff
        passed = diff <= TOLERANCE
        ok &= passed
        print(f"1. simulator cuda vs cpu, 20 updates: max relative loss difference {diff:.2e} "
              f"({'ok' if passed else 'FAIL'}, tolerance {TOLERANCE:g})")
        if gpus >= 2:
            sim2 = train(root / "gpu2", "--stages", "2", "--run.device=cuda")
            nccl = train(root / "nccl", "--stages", "2", "--engine", "dist", "--dist.backend=nccl")
            diff = max_rel_diff(nccl, sim2)
            results["dist_nccl_vs_sim_cuda_max_rel_diff"] = diff
            passed = diff <= TOLERANCE
            ok &= passed
            print(f"2. runtime with NCCL, K=2 on 2 GPUs vs the CUDA simulator: max relative difference "
                  f"{diff:.2e} ({'ok' if passed else 'FAIL'})")
        else:
            results["dist_nccl"] = "skipped: one GPU (NCCL needs one GPU per rank)"
            print("2. runtime with NCCL: skipped, this machine has one GPU and NCCL needs a GPU per rank")
    bench = subprocess.run([sys.executable, "-m", "pipenag", "bench", "optimizer", "--config", "configs/small.toml",
                            "--stages", "8", "--run.device=cuda", "--repeats", "10"],
                           capture_output=True, text=True, timeout=1800)
    print("3. pipenag bench optimizer --config configs/small.toml --stages 8 --run.device=cuda")
    print(bench.stdout[-3000:] if bench.returncode == 0 else bench.stderr[-3000:])
    ok &= bench.returncode == 0
    results["bench_optimizer"] = bench.stdout[-3000:]
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"device-check: {'all checks passed' if ok else 'a check FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
