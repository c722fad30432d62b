"""gpipe, 1f1b and zb-h1 in the dist engine on torch.distributed.pipelining (--dist.sync_executor=torch).

    pipenag train --config configs/tiny.toml --method 1f1b --stages 3 --engine dist \
        --dist.sync_executor=torch --out runs/t

The worker (pipenag.runtime.worker) sets up the stage as for its own executor: the data, the
stage module, its StageRunner (optimizer, lr function, grad clip), the metrics and checkpoint
callbacks. `run_torch_schedule` then trains the stage with torch's PipelineStage and
ScheduleGPipe / Schedule1F1B (zb-h1: ScheduleInterleavedZeroBubble with one stage per rank, a
backward split into input- and weight-gradient actions) instead of pipenag's Executor. Two settings make the numbers the
simulator's bit for bit (docs/dist.md has the experiment): torch must not rescale
the summed gradients (scale_grads=False), and the loss it backpropagates is lm_loss / M, as
StageRunner does. Each update is StageRunner.step, so the learning rate, the clip and the
optimizer are the same code as in every other engine.

Validation is a plain forward through the pipeline after the update (blocking send / recv
between neighbours, no gradient), with the batch losses summed as floats in order and divided
by the count, as pipenag.build.evaluate does. The synchronous schedules have nothing in flight
at an update boundary, so the per-stage checkpoint files of the own executor (StageRunner
state) serve this path unchanged, and a run can resume with either executor.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from pipenag.config import Config
from pipenag.runtime.comm import PeerFailure, short_error

SCHEDULES = ("gpipe", "1f1b", "zb-h1")


def check_supported(cfg: Config) -> None:
    """Fail before any process group or data exists when dist.sync_executor="torch" cannot run.

    Raises:
        ValueError: the schedule is not gpipe, 1f1b or zb-h1, link emulation or compression is on,
            or (zb-h1) M is not a multiple of torch's number of rounds, max(1, M // K).
    """
    if cfg.dist.sync_executor != "torch":
        return
    from pipenag.methods import resolve

    name = resolve(cfg).schedule.name
    if name not in SCHEDULES:
        raise ValueError(f"dist.sync_executor='torch': schedule {name!r} (method {cfg.pipeline.method!r}) is "
                         f"asynchronous; torch.distributed.pipelining runs only {', '.join(SCHEDULES)}. "
                         "Use dist.sync_executor='own'")
    if name == "zb-h1":
        M, K = resolve(cfg).schedule.num_microbatches, cfg.pipeline.num_stages
        rounds = max(1, M // K)
        if M % rounds:
            raise ValueError(f"dist.sync_executor='torch' with schedule 'zb-h1': pipeline.num_microbatches={M} "
                             f"is not a multiple of torch's number of rounds max(1, M // K) = {rounds} "
                             f"(ScheduleInterleavedZeroBubble, K = {K}). Use M <= {2 * K - 1}, a multiple "
                             "of the rounds, or dist.sync_executor='own'")
    if cfg.link.latency_ms > 0 or cfg.link.bandwidth_mbps > 0:
        raise ValueError(f"dist.sync_executor='torch' with link.latency_ms={cfg.link.latency_ms}, "
                         f"link.bandwidth_mbps={cfg.link.bandwidth_mbps}: torch's schedules send through "
                         "their own batch_isend_irecv, which link emulation cannot delay. Use "
                         "dist.sync_executor='own' or set both to 0")
    if cfg.link.compress_activations != "none" or cfg.link.compress_gradients != "none":
        raise ValueError(f"dist.sync_executor='torch' with link.compress_activations="
                         f"{cfg.link.compress_activations!r}, link.compress_gradients={cfg.link.compress_gradients!r}: "
                         "torch's schedules send the tensors themselves. Use dist.sync_executor='own'")


def run_torch_schedule(st) -> dict:
    """Train one stage with torch's schedule, from update st.rec.start to train.steps.

    Args:
        st: the stage's pipenag.runtime.worker.StageTraining: its runner (module, optimizer, lr
            function, clip; runner.step() is each update), its batches, its Recorder (start
            update, evaluation updates) and the callbacks on_loss and after_update.
    Returns:
        The stage's timing: wall_s, schedule_s (torch's step: forwards, backwards and their
        communication, which it does not separate), optimizer_s, eval_s, and counts.
    """
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
    from torch.distributed.pipelining.schedules import ScheduleInterleavedZeroBubble

    from pipenag.model import lm_loss

    runner, device, k, K = st.runner, st.device, st.stage_idx, st.num_stages
    first, last = st.first, st.last
    cfg = st.cfg
    act_shape = (cfg.data.microbatch_size, cfg.model.block_size, cfg.model.n_embd)
    eval_updates = st.rec.eval_updates()
    schedule_name = runner.schedule.name
    assert schedule_name in SCHEDULES, schedule_name  # check_supported ran before
    M = runner.schedule.num_microbatches
    module = runner.module
    B, T, C = act_shape
    example = torch.zeros(B, T, dtype=torch.long, device=device) if first else torch.zeros(B, T, C, device=device)
    stage = PipelineStage(module, k, K, device, input_args=(example,))

    def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return lm_loss(out, y) / M  # StageRunner backpropagates loss / M per microbatch

    # Every rank passes loss_fn: without one torch's schedule runs no backward on that rank.
    if schedule_name == "zb-h1":
        # One local stage: torch's interleaved zero-bubble order with a single virtual stage per
        # rank, forwards, input-gradient (I) and weight-gradient (W) actions.
        schedule = ScheduleInterleavedZeroBubble([stage], M, loss_fn=loss_fn, scale_grads=False)
    else:
        cls = ScheduleGPipe if schedule_name == "gpipe" else Schedule1F1B
        schedule = cls(stage, M, loss_fn=loss_fn, scale_grads=False)

    clock = time.perf_counter
    stats = {"executor": "torch", "wall_s": 0.0, "schedule_s": 0.0, "optimizer_s": 0.0, "eval_s": 0.0,
             "counts": {"S": 0, "E": 0}}
    t_start = clock()
    for u in range(st.rec.start, cfg.train.steps):
        batch = [st.train_batch(u * M + i) for i in range(M)]
        t = clock()
        with _neighbour_errors(k, K, f"update {u + 1}"):
            outputs = _step(schedule, batch, first, last)
        stats["schedule_s"] += clock() - t
        if last:
            # The microbatch losses from the outputs torch returns (its loss_fn also runs once
            # for shape inference, so recording inside it would count one loss too many).
            with torch.no_grad():
                for i, (out_i, (_, y_i)) in enumerate(zip(torch.chunk(outputs, M), batch)):
                    st.on_loss(u * M + i, lm_loss(out_i, y_i))
        t = clock()
        runner.next_forward = (u + 1) * M  # this update's forwards are done: keep no old version
        runner.step()
        stats["optimizer_s"] += clock() - t
        stats["counts"]["S"] += 1
        val_loss = None
        if u + 1 in eval_updates:
            t = clock()
            with _neighbour_errors(k, K, f"the validation after update {u + 1}"):
                val_loss = evaluate_pipeline(module, k, K, device, act_shape, st.val_batches)
            stats["eval_s"] += clock() - t
            stats["counts"]["E"] += 1
        st.after_update(u + 1, val_loss)
    stats["wall_s"] = clock() - t_start
    return stats


def _step(schedule, batch: list, first: bool, last: bool) -> Optional[torch.Tensor]:
    """One torch schedule step over the update's microbatches; the last stage gets the merged
    outputs back. torch splits the whole batch into the M microbatches again (torch.chunk)."""
    x = torch.cat([x for x, _ in batch]) if first else None
    y = torch.cat([y for _, y in batch]) if last else None
    if first and last:
        return schedule.step(x, target=y)
    if first:
        return schedule.step(x)
    if last:
        return schedule.step(target=y)
    return schedule.step()


@contextmanager
def _neighbour_errors(stage_idx: int, num_stages: int, during: str) -> Iterator[None]:
    """Turn a c10d error inside torch's communication into PeerFailure, so the worker exits
    with the peer status and the launcher blames the stage that failed first. torch does not
    say which neighbour it was waiting for; with one neighbour it is that one."""
    try:
        yield
    except RuntimeError as e:
        if not (isinstance(e, dist.DistError) or "gloo" in str(e)):
            raise
        k = stage_idx
        peers = [p for p in (k - 1, k + 1) if 0 <= p < num_stages]
        who = f"stage {peers[0]}" if len(peers) == 1 else f"stage {peers[0]} or {peers[1]}"
        if "timed out" in str(e).lower() or "timeout" in str(e).lower():
            message = f"stage {k}: {who} stopped answering during {during} (torch.distributed.pipelining)"
        else:
            message = f"stage {k}: lost {who} during {during} ({short_error(e)})"
        raise PeerFailure(message, peers[0] if len(peers) == 1 else None) from None


@torch.no_grad()
def evaluate_pipeline(module: torch.nn.Module, stage_idx: int, num_stages: int, device: torch.device,
                      act_shape: tuple[int, int, int], batches: list) -> Optional[float]:
    """Forward every validation batch through the pipeline on the current weights.

    Runs between torch's steps, when none of its messages is in flight, so plain send / recv
    on the default group cannot be confused with them.

    Returns:
        On the last stage the mean batch loss, summed as floats in order as
        pipenag.build.evaluate does; None elsewhere.
    """
    from pipenag.model import lm_loss

    k, K = stage_idx, num_stages
    total = 0.0
    for x, y in batches:
        if k == 0:
            h = x.to(device)
        else:
            h = torch.empty(act_shape, dtype=torch.float32, device=device)
            dist.recv(h, src=k - 1)
        out = module(h)
        if k == K - 1:
            total += float(lm_loss(out, y.to(device)))
        else:
            dist.send(out.contiguous(), dst=k + 1)
    return total / len(batches) if k == K - 1 else None
