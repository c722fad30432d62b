"""Experiment: torch.distributed.pipelining (PipelineStage + ScheduleGPipe / Schedule1F1B, gloo,
CPU) against the simulator, bit for bit.

    python -m pipenag.dist.pipelining_check --schedule 1f1b --stages 3 --microbatches 3 --updates 3

One process per stage trains `configs/tiny.toml` (shrunk) with torch's pipeline schedules; each
stage's update is our StageRunner.step (its learning rate, gradient clip and optimizer). The
parent then runs the simulator on the same config and compares every update's loss and every
stage's final weights. Two settings matter for an exact match: torch must not rescale the
accumulated gradients (scale_grads=False) and the loss must be divided by M before its backward,
as StageRunner does; --scale-grads shows the difference torch's default makes when M is not a
power of two. docs/dist.md says why the runtime still uses its own executor for gpipe and 1f1b.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed.pipelining  # noqa: F401 - imported once here, before the workers fork

CONFIG = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.toml")


def _config(args: argparse.Namespace):
    from pipenag.config import load_config

    return load_config(args.config, [
        "--data.max_chars=60000", f"--train.steps={args.updates}", "--pipeline.method=gpipe",
        f"--pipeline.schedule={args.schedule}", f"--pipeline.num_stages={args.stages}",
        f"--pipeline.num_microbatches={args.microbatches}", "--run.threads=1"])


def _worker(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

    from pipenag.build import build_pipeline
    from pipenag.data import build_data
    from pipenag.model import lm_loss

    torch.set_num_threads(1)
    rank, K = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    cfg = _config(args)
    M = args.microbatches
    dist.init_process_group("gloo", timeout=timedelta(seconds=60), rank=rank, world_size=K)
    data = build_data(cfg.data, cfg.model.block_size, cfg.train.seed)
    parts = build_pipeline(cfg, data.vocab_size)
    runner = parts.runner(rank)
    B, T, C = cfg.data.microbatch_size, cfg.model.block_size, cfg.model.n_embd
    example = torch.zeros(B, T, dtype=torch.long) if rank == 0 else torch.zeros(B, T, C)
    stage = PipelineStage(parts.stages[rank], rank, K, torch.device("cpu"), input_args=(example,))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = lm_loss(out, y)
        return loss if args.scale_grads else loss / M  # StageRunner: backward of loss / M

    cls = ScheduleGPipe if args.schedule == "gpipe" else Schedule1F1B
    schedule = cls(stage, M, loss_fn=loss_fn, scale_grads=args.scale_grads)
    losses = []
    for u in range(args.updates):
        batch = [data.train.get(u * M + i) for i in range(M)]
        x = torch.cat([b[0] for b in batch])  # torch splits it back into the M microbatches
        y = torch.cat([b[1] for b in batch])
        if rank == 0:
            schedule.step(x)
        elif rank == K - 1:
            outputs = schedule.step(target=y)
            # The simulator's loss: the float sum of the microbatch losses in order, over M.
            total = 0.0
            for out_i, (_, y_i) in zip(torch.chunk(outputs, M), batch):
                total += float(lm_loss(out_i, y_i))
            losses.append(total / M)
        else:
            schedule.step()
        runner.step()
    torch.save({"weights": parts.stages[rank].state_dict(), "losses": losses},
               Path(args.result) / f"stage{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()
    return 0


def compare(args: argparse.Namespace) -> dict:
    """Run the workers and the simulator; returns {"losses_equal", "weights_equal", ...}."""
    from pipenag.build import build_pipeline
    from pipenag.data import build_data
    from pipenag.dist.launch import launch_local

    cfg = _config(args)
    with tempfile.TemporaryDirectory(prefix="pipenag-pipelining-") as tmp:
        worker = ["--worker", "--result", tmp, "--config", args.config, "--schedule", args.schedule,
                  "--stages", str(args.stages), "--microbatches", str(args.microbatches),
                  "--updates", str(args.updates)] + (["--scale-grads"] if args.scale_grads else [])
        rc = launch_local("pipenag.dist.pipelining_check", worker, args.stages, {},
                          prog="pipelining_check", start_method="fork")
        if rc != 0:
            raise RuntimeError(f"the torch.distributed.pipelining workers failed (status {rc})")
        got = [torch.load(Path(tmp) / f"stage{k}.pt", weights_only=False) for k in range(args.stages)]
    torch.set_num_threads(1)
    data = build_data(cfg.data, cfg.model.block_size, cfg.train.seed)
    parts = build_pipeline(cfg, data.vocab_size)
    sim = parts.simulator()
    M = args.microbatches
    ref_losses = [sim.step([data.train.get(u * M + i) for i in range(M)]) for u in range(args.updates)]
    max_diff = 0.0
    weights_equal = True
    for k, stage in enumerate(parts.stages):
        for name, ref in stage.state_dict().items():
            mine = got[k]["weights"][name]
            weights_equal &= torch.equal(mine, ref)
            max_diff = max(max_diff, float((mine - ref).abs().max()))
    losses = got[-1]["losses"]
    return {"losses_equal": losses == ref_losses, "weights_equal": weights_equal,
            "max_weight_diff": max_diff, "losses": losses, "simulator_losses": ref_losses}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipenag.dist.pipelining_check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=CONFIG)
    parser.add_argument("--schedule", choices=["gpipe", "1f1b"], default="1f1b")
    parser.add_argument("--stages", type=int, default=3)
    parser.add_argument("--microbatches", type=int, default=3)
    parser.add_argument("--updates", type=int, default=3)
    parser.add_argument("--scale-grads", action="store_true", help="torch's default gradient rescaling")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return _worker(args)
    result = compare(args)
    print(json.dumps(result))
    return 0 if result["losses_equal"] and result["weights_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
