"""One pipeline stage's training process (rank r runs stage r).

    torchrun --nproc-per-node 4 -m pipenag train --config configs/tiny.toml --engine dist --out runs/d

Started by the local launcher (pipenag.runtime.launch, as `python -m pipenag.runtime.worker` with the
config in $PIPENAG_DIST_CONFIG) or by torchrun (which runs `pipenag train` in every process).
Every process builds the data and the whole model from the seed and keeps its stage, so the
weights and batches are those of the simulator; its StageRunner then runs its action list under
the executor (pipenag.runtime.executor), or, with dist.sync_executor="torch", torch's gpipe / 1f1b
schedule (pipenag.runtime.torch_pipelining). The last stage writes metrics.jsonl and summary.json with
the records of the simulator engine; every stage writes its own checkpoints.

Exit status: 0 done; 3 a neighbour died or stopped answering; 4 the training loss became
non-finite (last stage); 1 any other error. A failing worker prints one line naming its stage
and leaves with os._exit, so no thread or half-closed connection keeps it alive.

Testing hook: PIPENAG_DIST_FAIL=STAGE:UPDATE makes that stage exit (status 17) right after its
step creating version UPDATE; PIPENAG_DIST_FAIL=STAGE:UPDATE:hang makes it stop answering.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pipenag import checkpoint
from pipenag.config import Config
from pipenag.runtime import checkpoints as ckpts
from pipenag.runtime.comm import LinkModel, PeerFailure, Transport, make_link_groups
from pipenag.runtime.executor import Executor
from pipenag.runtime.torch_pipelining import check_supported, run_torch_schedule

EXIT_PEER = 3
EXIT_DIVERGED = 4
FAIL_ENV = "PIPENAG_DIST_FAIL"
CONFIG_ENV = "PIPENAG_DIST_CONFIG"
RESUME_ENV = "PIPENAG_DIST_RESUME"
ERRDIR_ENV = "PIPENAG_DIST_ERRDIR"
PARENT_ENV = "PIPENAG_DIST_PARENT"


class NonFiniteLoss(RuntimeError):
    pass


@dataclass(frozen=True)
class DistEnv:
    """The process's place, from the variables torchrun (and our launcher) set."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls) -> Optional["DistEnv"]:
        """None when RANK / WORLD_SIZE are not set (not started by a launcher)."""
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            return None
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        return cls(rank, world, local_rank, local_world)


def backend_and_device(cfg: Config, local_rank: int) -> tuple[str, torch.device]:
    """dist.backend ("" = nccl when CUDA is there, else gloo) and this process's device."""
    backend = cfg.dist.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("dist.backend='nccl' needs CUDA; use gloo on CPU")
        return backend, torch.device("cuda", local_rank)
    return backend, torch.device("cpu")


def update_sets(cfg: Config) -> tuple[set[int], set[int]]:
    """(updates followed by validation, updates with a checkpoint), 1-based, as train_sim."""
    t = cfg.train
    evals = {u for u in range(1, t.steps + 1) if u == t.steps or (t.eval_every and u % t.eval_every == 0)}
    saves = {u for u in range(1, t.steps + 1)
             if u == t.steps or (t.checkpoint_every and u % t.checkpoint_every == 0)}
    return evals, saves


def _fail(message: str, code: int, peer_stage: Optional[int] = None) -> None:
    """Report one line (stderr, and the launcher's error file with the neighbour blamed) and
    leave at once."""
    print(f"pipenag train: error: {message}", file=sys.stderr, flush=True)
    errdir = os.environ.get(ERRDIR_ENV)
    if errdir:
        try:
            Path(errdir, f"rank{os.environ.get('RANK', '0')}.json").write_text(
                json.dumps({"message": message, "peer_stage": peer_stage}))
        except OSError:
            pass
    sys.stdout.flush()
    os._exit(code)


def _die_with_parent() -> None:
    """Under our launcher: get SIGKILL if the launcher dies (Linux), so no worker outlives it."""
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != int(parent):  # the launcher died before prctl
        os._exit(1)


def _fail_hook(stage_idx: int, update: int) -> None:
    spec = os.environ.get(FAIL_ENV, "")
    if not spec:
        return
    parts = spec.split(":")
    if int(parts[0]) != stage_idx or int(parts[1]) != update:
        return
    if len(parts) > 2 and parts[2] == "hang":
        print(f"stage {stage_idx}: {FAIL_ENV}={spec}: hanging after update {update}", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)
    print(f"stage {stage_idx}: {FAIL_ENV}={spec}: exiting after update {update}", file=sys.stderr, flush=True)
    os._exit(17)


def run_worker(cfg: Config, resume: bool, env: Optional[DistEnv] = None) -> int:
    """Train stage `env.rank` of the pipeline; returns 0 when done (exits on failure).

    Raises:
        ValueError: the world size is not pipeline.num_stages, or a bad config (before any
            process group is set up).
    """
    from pipenag.methods import resolve
    from pipenag.split import partition_layers

    env = env or DistEnv.from_env()
    if env is None:
        raise ValueError("run_worker needs RANK and WORLD_SIZE in the environment (torchrun or pipenag's launcher)")
    K = cfg.pipeline.num_stages
    if env.world_size != K:
        raise ValueError(f"WORLD_SIZE={env.world_size}: the dist engine runs one process per stage, "
                         f"so it must equal pipeline.num_stages={K}")
    resolve(cfg)
    partition_layers(cfg.model.n_layer, K)
    check_supported(cfg)
    _die_with_parent()
    backend, device = backend_and_device(cfg, env.local_rank)
    threads = cfg.run.threads or max(1, (os.cpu_count() or 1) // env.local_world_size)
    torch.set_num_threads(threads)
    k = env.rank
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist.timeout_s),
                                rank=env.rank, world_size=env.world_size,
                                device_id=device if device.type == "cuda" else None)
        _train(cfg, resume, k, K, backend, device)
        dist.destroy_process_group()
    except PeerFailure as e:
        _fail(str(e), EXIT_PEER, e.peer_stage)
    except NonFiniteLoss as e:
        _fail(f"stage {k}: {e}", EXIT_DIVERGED)
    except BaseException as e:  # noqa: BLE001 - every failure must end this process
        if not isinstance(e, (ValueError, KeyboardInterrupt)):
            traceback.print_exc()
        _fail(f"stage {k}: {type(e).__name__}: {e}", 1)
    return 0


def _train(cfg: Config, resume: bool, k: int, K: int, backend: str, device: torch.device) -> None:
    from pipenag.build import build_pipeline
    from pipenag.data import build_data, fixed_batches
    from pipenag.metrics import MetricsWriter, Progress
    from pipenag.model import lm_loss
    from pipenag.train import VAL_SEED, tokens_per_update

    first, last = k == 0, k == K - 1
    out = Path(cfg.run.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / ckpts.CHECKPOINT_DIR).mkdir(exist_ok=True)
    on_torch = cfg.dist.sync_executor == "torch"  # torch.distributed.pipelining runs gpipe / 1f1b
    groups = None if on_torch else make_link_groups(K)
    data = build_data(cfg.data, cfg.model.block_size, cfg.train.seed)
    parts = build_pipeline(cfg, data.vocab_size)
    schedule, stash = parts.resolved.schedule, parts.resolved.stash
    M = schedule.num_microbatches
    module = parts.stages[k]
    module.to(device)
    runner = parts.runner(k)
    progress = Progress(cfg.train.steps, cfg.train.log_every, cfg.run.progress and last)

    start, elapsed = 0, 0.0
    if resume:
        start = _agree_on_resume_update(out, k, K)
        state = torch.load(ckpts.stage_checkpoint(out, start, k), map_location=device, weights_only=False)
        if state["fingerprint"] != data.fingerprint:
            raise ValueError(f"--resume {str(out)!r}: the data changed since the checkpoint "
                             f"(fingerprint {data.fingerprint} != {state['fingerprint']})")
        runner.load_state_dict(state["runner"])
        elapsed = state["elapsed"]
        progress.start_step = start
        progress.message(f"pipenag: resumed {out} at update {start}")
    elif last:
        cfg.save(out / "config.json")
    progress.message(f"pipenag: {parts.describe()}; dist engine, {K} processes, backend {backend}"
                     f"{', torch.distributed.pipelining' if on_torch else ''}; "
                     f"data {data.corpus.source} ({len(data.train_ids):,} train tokens)")

    evals, saves = update_sets(cfg)
    # Without stashing a stage keeps no old versions in the runtime's order, and a checkpoint
    # must let a resumed run redo the forwards in flight: drain the pipeline at checkpoints.
    drains = saves if not stash else set()
    val = fixed_batches(data.val_ids, cfg.model.block_size, cfg.data.microbatch_size,
                        cfg.train.eval_batches, seed=VAL_SEED)
    per_update = tokens_per_update(cfg, M)
    writer = MetricsWriter(out, resume_step=start if resume else None) if last else None
    loss_sums: dict[int, float] = {}
    summary_val = [float("nan")]  # the latest validation loss (last stage)
    t0 = time.perf_counter() - elapsed

    def on_loss(microbatch: int, loss: torch.Tensor) -> None:
        u = microbatch // M
        loss_sums[u] = loss_sums.get(u, 0.0) + float(loss)  # in microbatch order, as the simulator

    def eval_forward(x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        out_ = module(x)
        return lm_loss(out_, y) if last else out_

    def after_update(update: int, val_loss: Optional[float]) -> None:
        _fail_hook(k, update)
        if last:
            loss = loss_sums.pop(update - 1) / M
            lr = parts.lr_fns[0](update)
            record = {"step": update, "tokens": update * per_update, "train_loss": loss, "lr": lr,
                      "time_s": round(time.perf_counter() - t0, 4)}
            if not math.isfinite(loss):
                writer.write(record)
                _write_summary(cfg, parts, data, out, "diverged", update, float("nan"), t0, backend, None)
                raise NonFiniteLoss(f"non-finite training loss {loss} at update {update}; the last good "
                                    f"checkpoint (if any) is kept in {out}")
            if val_loss is not None:
                record["val_loss"] = val_loss
                summary_val[0] = val_loss
            writer.write(record)
            progress.update(update, loss, lr, per_update, f" val {val_loss:.4f}" if val_loss is not None else "")
        if update in saves:
            state = {"update": update, "stage": k, "num_stages": K, "runner": runner.state_dict(),
                     "elapsed": time.perf_counter() - t0, "fingerprint": data.fingerprint}
            checkpoint.save_atomic(state, ckpts.stage_checkpoint(out, update, k))
            ckpts.prune(out, k, K)

    B, T, C = cfg.data.microbatch_size, cfg.model.block_size, cfg.model.n_embd
    if on_torch:
        try:
            stats = run_torch_schedule(
                runner, k, K, device, (B, T, C), cfg.train.steps, start,
                train_batch=lambda j: tuple(t.to(device) for t in data.train.get(j)),
                val_batches=val, eval_updates=evals, on_loss=on_loss if last else None,
                after_update=after_update)
        finally:
            if writer is not None:
                writer.close()
        _finish(cfg, parts, data, out, k, K, stats, summary_val[0], t0, backend)
        return
    transport = None
    if K > 1:
        transport = Transport(k, K, groups, (B, T, C), torch.float32, device,
                              LinkModel.from_config(cfg.link.latency_ms, cfg.link.bandwidth_mbps),
                              timeout_s=cfg.dist.timeout_s if backend == "gloo" else None)
    executor = Executor(
        runner, schedule, k, transport, cfg.train.steps, start,
        inputs=(lambda j: data.train.get(j)[0].to(device)) if first else None,
        targets=(lambda j: data.train.get(j)[1].to(device)) if last else None,
        eval_updates=evals, drain_updates=drains,
        eval_inputs=(lambda i: val[i][0].to(device)) if first else None,
        eval_targets=(lambda i: val[i][1].to(device)) if last else None,
        num_eval=len(val), eval_forward=eval_forward, on_loss=on_loss if last else None,
        after_update=after_update)
    try:
        stats = executor.run()
    finally:
        if writer is not None:
            writer.close()
    _finish(cfg, parts, data, out, k, K, stats.to_dict(), summary_val[0], t0, backend)


def _finish(cfg: Config, parts, data, out: Path, k: int, K: int, stats: dict, val_loss: float, t0: float,
            backend: str) -> None:
    """Gather every stage's timing; the last stage writes summary.json (either executor)."""
    gathered: list = [None] * K
    dist.all_gather_object(gathered, stats)  # also: every stage wrote its last checkpoint
    ckpts.prune(out, k, K)
    if k == K - 1:
        summary = _write_summary(cfg, parts, data, out, "ok", cfg.train.steps, val_loss, t0, backend,
                                 gathered)
        ppl = "n/a" if summary["val_ppl"] is None else f"{summary['val_ppl']:.2f}"
        print(f"val_loss {summary['val_loss']:.4f} (ppl {ppl}) after {summary['updates']} updates, "
              f"{summary['tokens']:,} tokens, {summary['wall_time_s']:.1f}s -> {out}/summary.json", flush=True)


def _agree_on_resume_update(out: Path, k: int, K: int) -> int:
    """The newest update with a checkpoint from every stage, agreed by all ranks (each may see
    only its own files when the run folder is not shared between machines)."""
    mine = ckpts.stage_updates(out, k)
    everyone: list = [None] * K
    dist.all_gather_object(everyone, mine)
    common = set(everyone[0])
    for updates in everyone[1:]:
        common &= set(updates)
    if not common:
        raise ValueError(f"--resume {str(out)!r}: no update has a checkpoint from all {K} stages "
                         f"(updates per stage: {everyone})")
    return max(common)


def _write_summary(cfg: Config, parts, data, out: Path, status: str, updates: int, val_loss: float,
                   t0: float, backend: str, stage_stats: Optional[list]) -> dict:
    from pipenag.train import tokens_per_update

    r = parts.resolved
    summary = {
        "status": status,
        "method": cfg.pipeline.method,
        "schedule": r.schedule.name,
        "stages": r.schedule.num_stages,
        "microbatches_per_update": r.schedule.num_microbatches,
        "updates": updates,
        "tokens": updates * tokens_per_update(cfg, r.schedule.num_microbatches),
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if math.isfinite(val_loss) and val_loss < 50 else None,
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "engine": "dist",
        "backend": backend,
        "sync_executor": cfg.dist.sync_executor,
        "link": {"latency_ms": cfg.link.latency_ms, "bandwidth_mbps": cfg.link.bandwidth_mbps},
        "data_fingerprint": data.fingerprint,
        "num_params": sum(p.numel() for s in parts.stages for p in s.parameters()),
        "stage_stats": stage_stats,
    }
    checkpoint.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    """A worker started by pipenag's local launcher (config and resume flag in the environment).
    Leaves with os._exit: tearing down an interpreter that imported torch takes seconds."""
    cfg = Config.from_dict(json.loads(os.environ[CONFIG_ENV]))
    code = run_worker(cfg, os.environ.get(RESUME_ENV) == "1")
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main(sys.argv[1:])
