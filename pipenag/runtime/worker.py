"""One pipeline stage's training process (rank r runs stage r).

    torchrun --nproc-per-node 4 -m pipenag train --config configs/tiny.toml --engine dist --out runs/d

Started by the local launcher (pipenag.runtime.launch, as `python -m pipenag.runtime.worker` with the
config in $PIPENAG_DIST_CONFIG) or by torchrun (which runs `pipenag train` in every process).
Every process builds the data and the whole model from the seed and keeps its stage, so the
weights and batches are those of the simulator; its StageRunner then runs its action list under
the executor (pipenag.runtime.executor), or, with dist.sync_executor="torch", torch's gpipe / 1f1b / zb-h1
schedule (pipenag.runtime.torch_pipelining). The last stage writes metrics.jsonl and summary.json with
the records of the simulator engine; every stage writes its own checkpoints.

Exit status: 0 done; 3 a neighbour died or stopped answering; 4 the training loss became
non-finite (last stage); 1 any other error. A failing worker prints one line naming its stage
and leaves with os._exit, so no thread or half-closed connection keeps it alive.

Testing hook: PIPENAG_FAIL=STAGE:UPDATE[:KIND] makes that stage fail right after its step
creating version UPDATE (exit with status 17, SIGKILL itself, hang, die while writing its
checkpoint, go silent, or turn slow; pipenag.faults).

Stage times: every stage keeps moving medians of its forward, backward and step times (the
executor measures them). On the updates with a progress line (train.log_every) each stage puts
its medians into the rendezvous store (MASTER_ADDR:MASTER_PORT, which every machine reaches),
and the last stage reads them there for its record: no barrier, no extra message on a link.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from pipenag import faults
from pipenag.checkpoint import CheckpointStore, stage_part
from pipenag.config import Config
from pipenag.engine.stage import compute_call
from pipenag.model import lm_loss
from pipenag.procs import die_with_parent
from pipenag.run import (NonFiniteLoss, Recorder, check_same_run, default_threads, final_line, preflight, resume_mode,
                         set_threads, validation_batches)
from pipenag.link.messages import codecs, message_shape, wire_summary
from pipenag.runtime.comm import LinkModel, PeerFailure, Transport, make_link_groups
from pipenag.runtime.executor import Executor
from pipenag.runtime.torch_pipelining import check_supported, run_torch_schedule

EXIT_PEER = 3
EXIT_DIVERGED = 4
CONFIG_ENV = "PIPENAG_DIST_CONFIG"
RESUME_ENV = "PIPENAG_DIST_RESUME"
ERRDIR_ENV = "PIPENAG_DIST_ERRDIR"
PARENT_ENV = "PIPENAG_DIST_PARENT"


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
    """dist.backend ("" = nccl when CUDA is there, else gloo) and this process's device.

    gloo computes on the CPU, unless run.device is "cuda": then the stages compute on the GPUs
    (local rank modulo their number, so that K processes can share one GPU) and every message
    travels through host memory (gloo's point-to-point sends take CPU tensors only)."""
    backend = cfg.dist.backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise ValueError("dist.backend='nccl' needs CUDA; use gloo on CPU")
        return backend, torch.device("cuda", local_rank)
    if cfg.run.device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("run.device='cuda' with dist.backend='gloo': this torch has no CUDA device")
        if cfg.dist.sync_executor == "torch":
            raise ValueError("dist.sync_executor='torch' with dist.backend='gloo' and run.device='cuda': "
                             "torch's schedules send the GPU tensors themselves, which gloo cannot; "
                             "use dist.backend=nccl or pipenag's executor")
        return backend, torch.device("cuda", local_rank % torch.cuda.device_count())
    return backend, torch.device("cpu")


def _fail(message: str, code: int, peer_stage: Optional[int] = None, timed_out: bool = False) -> None:
    """Report one line (stderr, and the launcher's error file with the neighbour blamed, whether
    it timed out, and when) and leave at once."""
    print(f"pipenag train: error: {message}", file=sys.stderr, flush=True)
    errdir = os.environ.get(ERRDIR_ENV)
    if errdir:
        try:
            Path(errdir, f"rank{os.environ.get('RANK', '0')}.json").write_text(
                json.dumps({"message": message, "peer_stage": peer_stage, "timed_out": timed_out,
                            "time": time.time()}))
        except OSError:
            pass
    sys.stdout.flush()
    os._exit(code)


def _die_with_parent() -> None:
    """Under our launcher: get SIGKILL if the launcher dies, so no worker outlives it."""
    parent = os.environ.get(PARENT_ENV)
    if parent:
        die_with_parent(int(parent))


def run_worker(cfg: Config, resume: bool, env: Optional[DistEnv] = None) -> int:
    """Train stage `env.rank` of the pipeline; returns 0 when done (exits on failure).

    Raises:
        ValueError: the world size is not pipeline.num_stages, or a bad config (before any
            process group is set up).
    """
    env = env or DistEnv.from_env()
    if env is None:
        raise ValueError("run_worker needs RANK and WORLD_SIZE in the environment (torchrun or pipenag's launcher)")
    K = cfg.pipeline.num_stages
    if env.world_size != K:
        raise ValueError(f"WORLD_SIZE={env.world_size}: the dist engine runs one process per stage, "
                         f"so it must equal pipeline.num_stages={K}")
    preflight(cfg)
    check_supported(cfg)
    if resume_mode(cfg, resume) == "auto":
        check_same_run(cfg)
    _die_with_parent()
    backend, device = backend_and_device(cfg, env.local_rank)
    threads = set_threads(cfg, env.local_world_size)
    if cfg.run.threads == 0 and env.local_world_size != env.world_size and env.local_rank == 0:
        # Several machines: the simulator divides the cores by all K stages, a worker by the
        # processes on its machine, so the reduction order (and the last bits) can differ.
        print(f"pipenag: warning: run.threads=0 with {env.local_world_size} of {env.world_size} processes on "
              f"this machine: {threads} torch thread(s) each, the simulator would use "
              f"{default_threads(env.world_size)}; set run.threads (e.g. --run.threads=1) for numbers "
              "that equal the simulator's bit for bit", file=sys.stderr, flush=True)
    k = env.rank
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend, timeout=timedelta(seconds=cfg.dist.timeout_s),
                                rank=env.rank, world_size=env.world_size, store=_restart_store(env, cfg),
                                device_id=device if device.type == "cuda" else None)
        _train(cfg, resume, k, backend, device, _times_store(env, cfg))
        dist.destroy_process_group()
    except PeerFailure as e:
        _fail(str(e), EXIT_PEER, e.peer_stage, e.timed_out)
    except NonFiniteLoss as e:
        _fail(f"stage {k}: {e}", EXIT_DIVERGED)
    except BaseException as e:  # noqa: BLE001 - every failure must end this process
        if not isinstance(e, (ValueError, KeyboardInterrupt)):
            traceback.print_exc()
        _fail(f"stage {k}: {type(e).__name__}: {e}", 1)
    return 0


def _restart_store(env: DistEnv, cfg: Config):
    """Under torchrun after a restart: the agent's store with a prefix of this attempt, else
    None (the default env:// store). torchrun keeps its store across restarts, and the keys
    of the previous attempt's groups (the addresses of processes that are gone) would make
    the new ones connect to dead ports."""
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    if restart == "0" or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), env.world_size,
                          is_master=False, timeout=timedelta(seconds=cfg.dist.timeout_s))
    return dist.PrefixStore(f"pipenag/attempt{restart}/", store)


def _times_store(env: DistEnv, cfg: Config):
    """A client of the rendezvous store for the stage times (None when it cannot be reached:
    the times are a report, never a reason to stop training). Called after the process group
    is up, so the store's server (rank 0's, or torchrun's agent's) is there."""
    host, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    if not host or not port:
        return None
    try:
        store = dist.TCPStore(host, int(port), is_master=False,
                              timeout=timedelta(seconds=min(cfg.dist.timeout_s, 10.0)))
    except Exception:  # noqa: BLE001 - any store error only costs the report
        return None
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"pipenag/attempt{restart}/stage_times/", store)


class StageTraining:
    """One stage's training in the runtime: its StageRunner, its Recorder, and the callbacks
    either executor calls (on_loss, eval_forward, after_update).

    Args:
        cfg, parts, data: the run's config, PipelineParts and DataBundle.
        stage_idx: this process's stage (= rank).
        device: where the stage lives.
        times_store: a store every stage reaches, for the stage times (None: no stage times).
    """

    def __init__(self, cfg: Config, parts, data, stage_idx: int, device: torch.device, times_store=None):
        K = parts.resolved.schedule.num_stages
        self.cfg, self.data, self.device = cfg, data, device
        self.stage_idx, self.num_stages = stage_idx, K
        self.first, self.last = stage_idx == 0, stage_idx == K - 1
        self.schedule, self.stash = parts.resolved.schedule, parts.resolved.stash
        self.module = parts.stages[stage_idx].to(device)
        if device.type != "cpu":
            from pipenag.build import stage_optimizer

            # Build the optimizer again over the moved parameters: its kernels (cuda_fused)
            # follow their device, as in the simulator, which builds the stages there.
            parts.optimizers[stage_idx] = stage_optimizer(
                cfg.optim, parts.resolved.optimizer, self.module, stage_idx, K,
                [parts.resolved.schedule.staleness(i) for i in range(K)])
        self.runner = parts.runner(stage_idx)
        self.rec = Recorder(cfg, parts, data, engine="dist", part=stage_part(stage_idx),
                            checkpoint_parts=[stage_part(i) for i in range(K)], writes_records=self.last,
                            stage_idx=stage_idx)
        self.val_batches = validation_batches(cfg, data)
        self._loss_sums: dict[int, float] = {}
        self.times_store = times_store
        self.executor: Optional[Executor] = None  # set by _run_executor: its moving medians

    def train_batch(self, microbatch: int) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(t.to(self.device) for t in self.data.train.get(microbatch))

    def on_loss(self, microbatch: int, loss: torch.Tensor) -> None:
        """The last stage's loss of a microbatch, summed in microbatch order as the simulator."""
        u = microbatch // self.schedule.num_microbatches
        self._loss_sums[u] = self._loss_sums.get(u, 0.0) + float(loss)

    def eval_forward(self, x: torch.Tensor, y: Optional[torch.Tensor]) -> torch.Tensor:
        from pipenag.build import compute_dtype

        out = compute_call(self.module, x, compute_dtype(self.cfg))
        return lm_loss(out, y) if self.last else out

    def after_update(self, update: int, val_loss: Optional[float]) -> None:
        """After the step creating version `update` (and its validation): record, checkpoint."""
        self.rec.after_step(update)
        times = self._stage_times() if self.rec.is_log(update) else None
        if self.last:
            self.rec.record(update, self._loss_sums.pop(update - 1) / self.schedule.num_microbatches, val_loss,
                            stage_times=times)
        if self.rec.is_checkpoint(update):
            self.rec.save_checkpoint(update, {"stage": self.stage_idx, "num_stages": self.num_stages,
                                              "runner": self.runner.state_dict()})

    def _stage_times(self) -> Optional[dict]:
        """Publish this stage's moving medians; on the last stage, collect every stage's.

        Returns:
            On the last stage {"forward_ms": [K], "backward_ms": [K], "step_ms": [K]} (None
            for a stage that has published nothing yet); elsewhere, or without an executor or
            store, None.
        """
        if self.executor is None or self.times_store is None:
            return None
        mine = self.executor.medians_ms()
        if not self.last:
            try:
                self.times_store.set(f"stage{self.stage_idx}", json.dumps(mine))
            except Exception:  # noqa: BLE001 - a store that went away costs the report, not the run
                pass
            return None
        per_stage: list = [None] * self.num_stages
        per_stage[-1] = mine
        for i in range(self.num_stages - 1):
            try:
                if self.times_store.check([f"stage{i}"]):
                    per_stage[i] = json.loads(self.times_store.get(f"stage{i}"))
            except Exception:  # noqa: BLE001 - as above
                pass
        return {name: [p[name] if p else None for p in per_stage] for name in ("forward_ms", "backward_ms", "step_ms")}

    def resume(self, required: bool) -> None:
        """Load the newest checkpoint set that every stage holds and verifies (none: start
        from scratch, unless `required`)."""
        update = _agree_on_resume_update(self.rec.store, self.stage_idx, self.num_stages)
        if update is None:
            if required:
                raise ValueError(f"--resume {self.cfg.run.out_dir!r}: no update has a verified checkpoint from "
                                 f"all {self.num_stages} stages")
            return
        self.runner.load_state_dict(self.rec.load_checkpoint(update, map_location=self.device)["runner"])

    def finish(self, status: str, updates: int, backend: str, stage_stats: Optional[list]) -> dict:
        return self.rec.finish(status, updates, backend=backend, sync_executor=self.cfg.dist.sync_executor,
                               link={"latency_ms": self.cfg.link.latency_ms,
                                     "bandwidth_mbps": self.cfg.link.bandwidth_mbps},
                               messages=wire_summary(self.cfg),
                               stage_stats=stage_stats)


def _train(cfg: Config, resume: bool, k: int, backend: str, device: torch.device, times_store=None) -> None:
    from pipenag.build import build_pipeline
    from pipenag.data import build_data

    on_torch = cfg.dist.sync_executor == "torch"  # torch.distributed.pipelining runs gpipe / 1f1b / zb-h1
    groups = None if on_torch else make_link_groups(cfg.pipeline.num_stages)
    data = build_data(cfg.data, cfg.model.block_size, cfg.train.seed)
    st = StageTraining(cfg, build_pipeline(cfg, data.vocab_size, train_ids=data.train_ids), data, k, device,
                       times_store)
    mode = resume_mode(cfg, resume)
    if mode != "no":
        st.resume(required=mode == "explicit")
    st.rec.begin(f"dist engine, {st.num_stages} processes, backend {backend}"
                 f"{', torch.distributed.pipelining' if on_torch else ''}; "
                 f"data {data.corpus.source} ({len(data.train_ids):,} train tokens)", mode)
    try:
        stats = run_torch_schedule(st) if on_torch else _run_executor(st, groups, backend).to_dict()
    except NonFiniteLoss:
        st.finish("diverged", st.rec.last_update, backend, None)
        raise
    finally:
        st.rec.close()
    gathered: list = [None] * st.num_stages
    dist.all_gather_object(gathered, stats)  # also: every stage wrote its last checkpoint
    st.rec.store.prune(stage_part(k))
    summary = st.finish("ok", cfg.train.steps, backend, gathered)
    if st.last:
        print(final_line(summary, cfg.run.out_dir), flush=True)


def _run_executor(st: StageTraining, groups, backend: str):
    """Run the stage's action list with pipenag's executor; returns its Stats."""
    cfg, k, K = st.cfg, st.stage_idx, st.num_stages
    transport = None
    if K > 1:
        act, grad = codecs(cfg)
        transport = Transport(k, K, groups, message_shape(cfg), torch.float32, st.device,
                              LinkModel.from_config(cfg.link.latency_ms, cfg.link.bandwidth_mbps),
                              timeout_s=cfg.dist.timeout_s if backend == "gloo" else None,
                              activation_codec=act, gradient_codec=grad,
                              wire_device=torch.device("cpu") if backend == "gloo" else st.device)
    # Without stashing a stage keeps no old versions in the runtime's order, and a checkpoint
    # must let a resumed run redo the forwards in flight: drain the pipeline at checkpoints.
    drains = st.rec.checkpoint_updates() if not st.stash else set()
    val = st.val_batches
    executor = Executor(
        st.runner, st.schedule, k, transport, cfg.train.steps, st.rec.start,
        inputs=(lambda j: st.train_batch(j)[0]) if st.first else None,
        targets=(lambda j: st.train_batch(j)[1]) if st.last else None,
        eval_updates=st.rec.eval_updates(), drain_updates=drains,
        eval_inputs=(lambda i: val[i][0].to(st.device)) if st.first else None,
        eval_targets=(lambda i: val[i][1].to(st.device)) if st.last else None,
        num_eval=len(val), eval_forward=st.eval_forward, on_loss=st.on_loss if st.last else None,
        after_update=st.after_update, muted=lambda: faults.is_silent(k), pass_delay_s=lambda: faults.extra_pass_s(k))
    st.executor = executor
    return executor.run()


def _agree_on_resume_update(store: CheckpointStore, k: int, K: int) -> Optional[int]:
    """The newest update with a verified checkpoint from every stage, agreed by all ranks (each
    may see only its own files when the run folder is not shared between machines); None if
    there is none. A damaged file costs a one-line warning and falls back to an older set."""
    mine = store.verified_updates(stage_part(k))
    everyone: list = [None] * K
    dist.all_gather_object(everyone, mine)
    common = set(everyone[0])
    for updates in everyone[1:]:
        common &= set(updates)
    return max(common) if common else None


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
