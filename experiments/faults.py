"""The fault matrix of docs/results/faults.md: fault kind x engine -> restarts, updates redone,
wall time lost, bit-identical to the uninterrupted run.

    python experiments/faults.py --out runs/faults            # from the repository root

Every case runs `pipenag train` as a user would, in fresh processes, on configs/tiny.toml (K = 4,
60 updates, a checkpoint every 10, method nesterov), with a fault from pipenag.faults
(PIPENAG_FAIL). The runtime (--engine dist) restarts itself (--dist.max_restarts=3); the
simulator is restarted by this script, standing in for a job supervisor, with the same command
and train.resume=auto. "Damaged" cases stop the run, damage the newest checkpoint file on disk,
then restart. A case is bit-identical when metrics.jsonl (every loss, lr and validation loss)
and the final weights equal those of the uninterrupted run of the same engine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from pipenag.bench import machine_line
from pipenag.checkpoint import SIM_PART, CheckpointStore, stage_part
from pipenag.metrics import read_metrics

K, STEPS, EVERY = 4, 60, 10
BASE = ["--config", "configs/tiny.toml", "--method", "nesterov", "--stages", str(K), f"--train.steps={STEPS}",
        f"--train.checkpoint_every={EVERY}", "--train.eval_every=10", "--run.progress=false"]

# (name, engine, PIPENAG_FAIL, damage after the first attempt, what it is)
CASES = [
    ("kill", "dist", "2:23:kill", None, "SIGKILL of stage 2 after update 23"),
    ("kill", "sim", "0:23:kill", None, "SIGKILL of the simulator after update 23"),
    ("exit", "dist", "1:37:exit", None, "stage 1 exits (status 17) after update 37"),
    ("hang", "dist", "3:15:hang", None, "stage 3 stops answering after update 15 (dist.timeout_s=5)"),
    ("kill while checkpointing", "dist", "1:30:checkpoint", None, "stage 1 dies half-way through checkpoint 30"),
    ("kill while checkpointing", "sim", "0:30:checkpoint", None, "the simulator dies half-way through checkpoint 30"),
    ("corrupt newest checkpoint", "dist", "0:45:exit", "corrupt", "stop after 45, flip a byte of checkpoint 40 (stage 2)"),
    ("truncated newest checkpoint", "sim", "0:45:exit", "truncate", "stop after 45, cut checkpoint 40 in half"),
    ("two faults", "dist", "0:12:kill,3:47:exit", None, "SIGKILL of stage 0 after 12, exit of stage 3 after 47"),
]


def run_train(out: Path, engine: str, fault: str, extra: list[str]) -> tuple[int, float, str]:
    env = None
    if fault:
        import os

        env = dict(os.environ, PIPENAG_FAIL=fault)
    cmd = [sys.executable, "-m", "pipenag", "train", *BASE, "--engine", engine, "--out", str(out), *extra]
    t0 = time.perf_counter()
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    return res.returncode, time.perf_counter() - t0, res.stderr


def weights(out: Path, engine: str) -> list[dict]:
    if engine == "sim":
        state = CheckpointStore(out, [SIM_PART]).load(STEPS, SIM_PART)
        return [s["module"] for s in state["sim"]["stages"]]
    store = CheckpointStore(out, [stage_part(k) for k in range(K)])
    return [store.load(STEPS, stage_part(k))["runner"]["module"] for k in range(K)]


def same_run(a: Path, b: Path, engine: str) -> bool:
    keys = ("step", "tokens", "train_loss", "lr", "val_loss")
    ra = [{k: r.get(k) for k in keys} for r in read_metrics(a)]
    rb = [{k: r.get(k) for k in keys} for r in read_metrics(b)]
    wa, wb = weights(a, engine), weights(b, engine)
    return ra == rb and all(torch.equal(x[n], y[n]) for x, y in zip(wa, wb) for n in x)


def damage(out: Path, engine: str, how: str) -> str:
    store = CheckpointStore(out, [SIM_PART] if engine == "sim" else [stage_part(k) for k in range(K)])
    update = store.complete_updates()[-1]
    path = store.path(update, SIM_PART if engine == "sim" else stage_part(2))
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path.name


def run_case(root: Path, name: str, engine: str, fault: str, how, reference: Path, ref_wall: float) -> dict:
    out = root / f"{engine}-{name.replace(' ', '_')}"
    shutil.rmtree(out, ignore_errors=True)
    spec = fault
    extra = ["--dist.max_restarts=3", "--dist.timeout_s=5"] if engine == "dist" else []
    if how:  # first attempt without restarts, then damage a file, then go on
        rc, wall, _ = run_train(out, engine, fault, [x for x in extra if "max_restarts" not in x])
        assert rc != 0
        damage(out, engine, how)
        fault = ""
    else:
        rc, wall = None, 0.0
    attempts, stderr = 0, ""
    # The simulator has no launcher: restart it as a job supervisor would, with auto resume.
    while attempts < 4:
        rc, dt, err = run_train(out, engine, fault, extra + (["--train.resume=auto"] if attempts or how else []))
        wall += dt
        stderr += err
        attempts += 1
        if rc == 0 or engine == "dist":
            break
    summary = json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {}
    restarts = summary.get("restarts", {"count": 0, "events": []})
    resumed = [e["resumed_from"] for e in restarts["events"]]
    # Updates redone: each fault hit after its update U; the run resumed from checkpoint r and
    # computed updates r+1..U again.
    hit = [int(f.split(":")[1]) for f in spec.split(",")] if spec else []
    redone = sum(max(0, u - r) for u, r in zip(hit, resumed))
    warnings = [line for line in stderr.splitlines() if "warning" in line]
    return {"case": name, "engine": engine, "fault": spec, "rc": rc, "restarts": restarts["count"],
            "resumed_from": resumed, "updates_redone": redone, "wall_s": round(wall, 1),
            "wall_lost_s": round(wall - ref_wall, 1), "bit_identical": rc == 0 and same_run(out, reference, engine),
            "warnings": warnings}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/faults")
    args = parser.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    refs = {}
    for engine in ("sim", "dist"):
        out = root / f"{engine}-reference"
        shutil.rmtree(out, ignore_errors=True)
        rc, wall, err = run_train(out, engine, "", [])
        assert rc == 0, err
        refs[engine] = (out, wall)
        print(f"reference {engine}: {wall:.1f} s", flush=True)
    rows = []
    for name, engine, fault, how, what in CASES:
        row = run_case(root, name, engine, fault, how, *refs[engine])
        row["what"] = what
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(machine_line())
    print("| fault | engine | injected | restarts | resumed from | updates redone | wall time lost (s) | bit-identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['case']} | {r['engine']} | {r['what']} | {r['restarts']} | "
              f"{', '.join(map(str, r['resumed_from'])) or '-'} | {r['updates_redone']} | {r['wall_lost_s']} | "
              f"{'yes' if r['bit_identical'] else 'NO'} |")
    (root / "faults.json").write_text(json.dumps({"rows": rows, "reference_wall_s": {k: v[1] for k, v in refs.items()}},
                                                 indent=1))
    return 0 if all(r["bit_identical"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
