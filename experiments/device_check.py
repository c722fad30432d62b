"""GPU checks: the simulator on CUDA against the CPU, the runtime with NCCL, benchmark numbers.

    make device-check                      # or: python experiments/device_check.py
    python experiments/device_check.py --json runs/device_check.json

On a machine without CUDA it says so and exits with status 0 (nothing to check). Otherwise:
1. the simulator trains configs/tiny.toml (method nesterov, K = 4, 20 updates) with
   run.device=cpu and run.device=cuda; the per-update training losses must agree to
   TOLERANCE (relative): GPU kernels reduce in another order, so bit equality is not expected;
2. the runtime trains the same run with dist.backend=nccl, K = 2, one process per GPU, and is
   compared with the CUDA simulator to the same tolerance. NCCL refuses two ranks on one GPU,
   so with a single GPU this check is skipped and says why; 2b. the runtime with gloo and
   run.device=cuda (K = 2 processes computing on the GPUs, sharing one if there is one, the
   messages through host memory) against the CUDA simulator, on any number of GPUs;
3. `pipenag bench optimizer` times the optimizers on a stage on the GPU (run.device=cuda);
4. paper scale: configs/paper-base.toml (134M parameters) at K = 4 in the simulator, bf16,
   30 updates (byte tokens, so no tokenizer is trained; the model keeps GPT-2's vocabulary
   size): tokens/s, TFLOP/s, MFU and peak memory, with `pipenag plan`'s prediction next to
   them (memory: the stages' weights, gradients, optimizer state, stashes and activations,
   without the runtime's receive buffers, since the simulator holds every stage in one
   process; time: the FLOPs at the device's peak, so measured / predicted is 1 / MFU).
   The plan counts activations in float32; under bf16 autocast some of them are bfloat16, so
   the measured peak is expected below it. Reported, not a pass/fail check.
Exit status 1 if a check fails.

    python experiments/device_check.py --smoke     # check 4 on the CPU with configs/tiny.toml
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


def paper_scale(out: Path, device: str, config: str = "configs/paper-base.toml", stages: int = 4,
                updates: int = 30) -> dict:
    """Check 4: train `config` at K = `stages` in the simulator, bf16, for `updates` updates on
    `device`, and put its measured throughput and peak memory next to `pipenag plan`'s."""
    overrides = ["--stages", str(stages), "--run.dtype=bfloat16", "--data.tokenizer=bytes"]
    cmd = [sys.executable, "-m", "pipenag", "train", "--config", config, *overrides, f"--run.device={device}",
           f"--train.steps={updates}", f"--train.eval_every={updates}", "--train.eval_batches=2",
           "--train.checkpoint_every=0", "--train.log_every=10", "--run.progress=false", "--out", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
    summary = json.loads((out / "summary.json").read_text())
    tp = summary["throughput"]
    peak = tp["peak_tflops"]
    plan_cmd = [sys.executable, "-m", "pipenag", "plan", "--config", config, *overrides, "--json"]
    if peak:
        plan_cmd += ["--tflops", str(peak)]
    res = subprocess.run(plan_cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(plan_cmd)} failed:\n{res.stderr[-2000:]}")
    plan = json.loads(res.stdout)
    predicted = sum(st["total_bytes"] - st["recv_bytes"] for st in plan["stages"])
    measured = summary["peak_memory"]["bytes"]
    s_per_update = summary["wall_time_s"] / summary["updates"]
    predicted_s = plan["time"]["s_per_update"] if plan["time"] else None
    return {"config": config, "stages": stages, "updates": summary["updates"], "dtype": "bfloat16",
            "device": device, "tokens_per_s": tp["tokens_per_s"], "achieved_tflops": tp["achieved_tflops"],
            "peak_tflops": peak, "mfu": tp["mfu"], "peak_memory_bytes": measured,
            "peak_memory_source": summary["peak_memory"]["source"], "plan_memory_bytes": predicted,
            "memory_measured_over_plan": measured / predicted, "s_per_update": s_per_update,
            "plan_s_per_update_at_peak": predicted_s, "val_loss": summary["val_loss"]}


def format_paper_scale(r: dict) -> str:
    mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "unknown peak"
    at_peak = (f", {r['plan_s_per_update_at_peak'] * 1e3:.1f} ms at the device's peak"
               if r["plan_s_per_update_at_peak"] else "")
    return (f"4. {r['config']} K={r['stages']} bf16, {r['updates']} updates on {r['device']}: "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['achieved_tflops']:.2f} TFLOP/s, MFU {mfu}; "
            f"{r['s_per_update'] * 1e3:.1f} ms per update (whole run){at_peak}; peak memory "
            f"{r['peak_memory_bytes'] / 2**30:.2f} GiB ({r['peak_memory_source']}) against plan's "
            f"{r['plan_memory_bytes'] / 2**30:.2f} GiB (measured / plan {r['memory_measured_over_plan']:.2f})")


def max_rel_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", help="write the results here too")
    parser.add_argument("--smoke", action="store_true",
                        help="run check 4 on the CPU with configs/tiny.toml (tests the script, no GPU)")
    args = parser.parse_args(argv)
    if args.smoke:
        with tempfile.TemporaryDirectory() as tmp:
            result = paper_scale(Path(tmp) / "paper", "cpu", config="configs/tiny.toml", stages=2, updates=3)
        print(format_paper_scale(result))
        if args.json:
            Path(args.json).write_text(json.dumps({"paper_scale": result}, indent=2))
        return 0
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
        sim2 = train(root / "gpu2", "--stages", "2", "--run.device=cuda")
        if gpus >= 2:
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
        # Every GPU count: K = 2 processes computing on the GPU(s), messages through host memory.
        try:
            gloo = train(root / "gloo", "--stages", "2", "--engine", "dist", "--dist.backend=gloo",
                         "--run.device=cuda")
            diff = max_rel_diff(gloo, sim2)
            passed = diff <= TOLERANCE
            print(f"2b. runtime with gloo, K=2 processes computing on the GPU vs the CUDA simulator: max "
                  f"relative difference {diff:.2e} ({'ok' if passed else 'FAIL'})")
        except RuntimeError as e:
            diff, passed = f"failed: {e}", False
            print(f"2b. runtime with gloo on the GPU: FAILED: {e}")
        results["dist_gloo_cuda_vs_sim_cuda_max_rel_diff"] = diff
        ok &= passed
    bench = subprocess.run([sys.executable, "-m", "pipenag", "bench", "optimizer", "--config", "configs/small.toml",
                            "--stages", "8", "--run.device=cuda", "--repeats", "10"],
                           capture_output=True, text=True, timeout=1800)
    print("3. pipenag bench optimizer --config configs/small.toml --stages 8 --run.device=cuda")
    print(bench.stdout[-3000:] if bench.returncode == 0 else bench.stderr[-3000:])
    ok &= bench.returncode == 0
    results["bench_optimizer"] = bench.stdout[-3000:]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            results["paper_scale"] = paper_scale(Path(tmp) / "paper", "cuda")
        print(format_paper_scale(results["paper_scale"]))
    except RuntimeError as e:
        results["paper_scale"] = f"failed: {e}"
        ok = False
        print(f"4. paper scale: FAILED: {e}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"device-check: {'all checks passed' if ok else 'a check FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
