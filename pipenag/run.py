"""The bookkeeping both engines share: when to evaluate and checkpoint, the per-update record,
divergence, checkpoints and resume, summary.json and the final line.

    pipenag train --config configs/tiny.toml --out runs/a                  # the simulator
    pipenag train --config configs/tiny.toml --engine dist --out runs/b    # one process per stage

An engine trains; it hands each update's numbers to its `Recorder`, which writes the record
(metrics.jsonl, TensorBoard, the progress line), stops a run whose loss is not finite, saves
and finds checkpoints (pipenag.checkpoint), and writes summary.json. A new metric or summary
field is added here once, for both engines. In the runtime every stage has a Recorder for
its checkpoints; the last stage's also writes the records and the summary.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from pipenag import atomic, faults
from pipenag.checkpoint import CheckpointStore
from pipenag.config import Config
from pipenag.machine import machine_info
from pipenag.metrics import (STRAGGLER_RATIO, MetricsWriter, Progress, TensorBoardWriter, check_tensorboard, dumps,
                             find_stragglers, strict_json)

VAL_SEED = 1234
"""Seed of the fixed validation batches (the same for every run, engine and method)."""

SUMMARY = "summary.json"
EVENTS = "events.jsonl"
"""Restarts of a run: the launcher's failures and every resume, one JSON object per line."""

# Sections and train fields that decide a run's numbers: a folder resumed automatically must
# hold the same run (the others -- engine, threads, logging, timeouts -- change no number here
# or only the last bits, which pipenag checks separately).
_SAME_RUN_SECTIONS = ("model", "data", "optim", "pipeline")
_SAME_RUN_TRAIN = ("steps", "seed", "eval_every", "eval_batches")


class NonFiniteLoss(RuntimeError):
    """The training loss of an update was NaN or infinite: the run stops."""


def log_event(out_dir: str | Path, event: dict) -> None:
    """Append one event to RUN/events.jsonl (with the wall-clock time)."""
    path = Path(out_dir) / EVENTS
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(dumps(dict(event, time=round(time.time(), 3))) + "\n")


def read_events(out_dir: str | Path) -> list[dict]:
    import json

    path = Path(out_dir) / EVENTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_same_run(cfg: Config) -> None:
    """Raise ValueError when run.out_dir holds another run (its config.json differs in a
    setting that decides the numbers): train.resume="auto" must not continue it."""
    import json

    path = Path(cfg.run.out_dir) / "config.json"
    if not path.is_file():
        return
    saved, now = json.loads(path.read_text()), cfg.to_dict()
    diffs = [f"{s}.{k}" for s in _SAME_RUN_SECTIONS for k in now[s] if saved.get(s, {}).get(k) != now[s][k]]
    diffs += [f"train.{k}" for k in _SAME_RUN_TRAIN if saved.get("train", {}).get(k) != now["train"][k]]
    if diffs:
        raise ValueError(f"train.resume='auto': {str(path)!r} is another run ({', '.join(diffs[:4])} differ); "
                         "use another run.out_dir, or --resume DIR to continue that run with overrides")


def resume_mode(cfg: Config, explicit: bool) -> str:
    """"explicit" (--resume: a checkpoint must exist), "auto" (train.resume: one is used if
    there is one) or "no"."""
    return "explicit" if explicit else cfg.train.resume


def tokens_per_update(cfg: Config, num_microbatches: int) -> int:
    return num_microbatches * cfg.data.microbatch_size * cfg.model.block_size


def preflight(cfg: Config):
    """Every check that needs neither data nor model, so that a bad config fails before any
    work: the method and its overrides, the split, the optional TensorBoard package.

    Returns:
        The ResolvedMethod.
    Raises:
        ValueError: naming the bad setting.
    """
    from pipenag.methods import resolve
    from pipenag.split import partition_layers

    resolved = resolve(cfg)
    try:
        partition_layers(cfg.model.n_layer, resolved.schedule.num_stages)
    except ValueError as e:
        raise ValueError(f"pipeline.num_stages={resolved.schedule.num_stages} with model.n_layer={cfg.model.n_layer}: "
                         f"{e}") from None
    if cfg.run.tensorboard:
        check_tensorboard()
    sim_device(cfg)
    return resolved


def sim_device(cfg: Config) -> torch.device:
    """The simulator's device from run.device ("auto": cuda when there is a GPU).

    Raises:
        ValueError: run.device="cuda" on a machine without CUDA.
    """
    if cfg.run.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("run.device='cuda': this torch has no CUDA device (use cpu or auto)")
    use_cuda = cfg.run.device == "cuda" or (cfg.run.device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def set_threads(cfg: Config, processes_per_machine: int) -> int:
    """Set torch's intra-op threads: run.threads, or else the cores divided among the processes
    that share this machine. Both engines call it with the number of processes the runtime
    would start here (pipeline.num_stages for the simulator), so that they reduce in the same
    order and agree bit for bit. Returns the thread count."""
    threads = cfg.run.threads or default_threads(processes_per_machine)
    torch.set_num_threads(threads)
    return threads


def default_threads(processes_per_machine: int) -> int:
    """The thread count of run.threads = 0: the cores divided among the processes, at least 1.

    Args:
        processes_per_machine: processes sharing this machine's cores.
    Returns:
        The thread count.
    """
    return max(1, (os.cpu_count() or 1) // max(1, processes_per_machine))


def validation_batches(cfg: Config, data, device: torch.device | str = "cpu") -> list:
    """The fixed validation microbatches every evaluation of every run uses, on `device`."""
    from pipenag.data import fixed_batches

    batches = fixed_batches(data.val_ids, cfg.model.block_size, cfg.data.microbatch_size,
                            cfg.train.eval_batches, seed=VAL_SEED)
    return [(x.to(device), y.to(device)) for x, y in batches]


class Recorder:
    """One process's bookkeeping of a training run.

    Args:
        cfg: the run's config (run.out_dir is the run folder).
        parts: the PipelineParts (pipenag.build) of the run.
        data: the DataBundle (for its fingerprint).
        engine: "sim" or "dist" (goes into summary.json).
        part: this process's checkpoint part (checkpoint.SIM_PART or stage_part(k)).
        checkpoint_parts: every part of a checkpoint set.
        writes_records: whether this process writes metrics.jsonl, TensorBoard, the progress
            line and summary.json (the simulator; the runtime's last stage).
        stage_idx: the runtime's stage, None for the simulator (for pipenag.faults).
    """

    def __init__(self, cfg: Config, parts, data, *, engine: str, part: str, checkpoint_parts: list[str],
                 writes_records: bool = True, stage_idx: Optional[int] = None):
        self.cfg, self.parts, self.data = cfg, parts, data
        self.engine, self.part, self.writes_records = engine, part, writes_records
        self.stage_idx = stage_idx
        self.out = Path(cfg.run.out_dir)
        self.num_microbatches = parts.resolved.schedule.num_microbatches
        self.per_update = tokens_per_update(cfg, self.num_microbatches)
        self.store = CheckpointStore(self.out, checkpoint_parts)
        from pipenag.plan import flops_per_token, peak_tflops

        own = parts.stages[0 if stage_idx is None else stage_idx]  # the runtime: this stage's device
        first = next(own.parameters(), None)
        self.device = first.device if first is not None else torch.device("cpu")
        self.flops_per_token = flops_per_token(parts.model_cfg)
        self.peak_tflops = peak_tflops(cfg, self.device)
        self.progress = Progress(cfg.train.steps, cfg.train.log_every, cfg.run.progress and writes_records,
                                 flops_per_token=self.flops_per_token, peak_tflops=self.peak_tflops)
        self._t_segment = time.perf_counter()  # the start of this process's updates (throughput)
        self.start = 0
        self.last_update = 0  # the latest update recorded (or resumed from)
        self.val_loss = float("nan")  # the latest validation loss
        self._t0 = time.perf_counter()
        self._writers: list = []
        self._stragglers: set[int] = set()  # the stages named by the last straggler check

    # -- when -------------------------------------------------------------------------------
    def is_eval(self, update: int) -> bool:
        t = self.cfg.train
        return update == t.steps or bool(t.eval_every and update % t.eval_every == 0)

    def is_checkpoint(self, update: int) -> bool:
        t = self.cfg.train
        return update == t.steps or bool(t.checkpoint_every and update % t.checkpoint_every == 0)

    def is_log(self, update: int) -> bool:
        """Whether `update` has a progress line (train.log_every, and the last update); the
        runtime also gathers the stage times then."""
        return update == self.cfg.train.steps or update % max(1, self.cfg.train.log_every) == 0

    def eval_updates(self) -> set[int]:
        return {u for u in range(1, self.cfg.train.steps + 1) if self.is_eval(u)}

    def checkpoint_updates(self) -> set[int]:
        return {u for u in range(1, self.cfg.train.steps + 1) if self.is_checkpoint(u)}

    # -- start ------------------------------------------------------------------------------
    def load_checkpoint(self, update: int, map_location="cpu") -> dict:
        """This part's checkpoint of `update`, checked against the data; sets the start point
        (and the clock) of the run and drops this part's files after it.

        Raises:
            ValueError: the data changed since the checkpoint was written.
        """
        state = self.store.load(update, self.part, map_location=map_location)
        if state["fingerprint"] != self.data.fingerprint:
            raise ValueError(f"--resume {str(self.out)!r}: the data changed since the checkpoint "
                             f"(fingerprint {self.data.fingerprint} != {state['fingerprint']})")
        self.store.discard_after(update, self.part)
        self.start = self.last_update = update
        self._t0 = time.perf_counter() - state["elapsed"]
        self.progress.start_step = update
        return state

    def begin(self, message: str, mode: str = "no") -> None:
        """Open the run folder's outputs and print the run's first line. A fresh run writes
        config.json and drops this part's old checkpoints; a resumed one keeps the records up
        to its start and logs the resume in events.jsonl.

        Args:
            message: the engine's words for the first line.
            mode: resume_mode() of the run ("no" starts a new run: no earlier events are kept).
        """
        self.out.mkdir(parents=True, exist_ok=True)
        self.store.clean_temporary(self.part)
        if not self.start:
            self.store.discard_after(0, self.part)
        if self.writes_records:
            resume_step = self.start if self.start else None
            if resume_step is None:
                self.cfg.save(self.out / "config.json")
                if mode == "no":
                    for name in (EVENTS, faults.FIRED):
                        (self.out / name).unlink(missing_ok=True)
            if self.start or (mode == "auto" and read_events(self.out)):  # a restart, checkpoint or not
                log_event(self.out, {"event": "resume", "update": self.start, "engine": self.engine})
            self._writers.append(MetricsWriter(self.out, resume_step=resume_step))
            if self.cfg.run.tensorboard:
                self._writers.append(TensorBoardWriter(self.out, resume_step=resume_step))
        self._t_segment = time.perf_counter()
        if self.start:
            self.progress.message(f"pipenag: resumed {self.out} at update {self.start}")
        self.progress.message(f"pipenag: {self.parts.describe()}; {message}")

    # -- every update -----------------------------------------------------------------------
    def record(self, update: int, train_loss: float, val_loss: Optional[float] = None,
               stage_times: Optional[dict] = None) -> dict:
        """Write the record of `update` (1-based): step, tokens, train_loss, lr, time_s and
        val_loss when given, and the runtime's stage_times. Returns it.

        Args:
            update, train_loss, val_loss: the update's numbers.
            stage_times: the runtime's moving medians {"forward_ms": [K], "backward_ms": [K],
                "step_ms": [K]} (None for a stage not heard from): recorded, and checked for a
                straggler (check_stragglers).
        Raises:
            NonFiniteLoss: the training loss is not finite (after the record is written).
        """
        lr = self.parts.lr_fns[0](update)
        rec = {"step": update, "tokens": update * self.per_update, "train_loss": train_loss, "lr": lr,
               "time_s": round(self.elapsed(), 4)}
        self.last_update = update
        if val_loss is not None:
            rec["val_loss"] = val_loss
            self.val_loss = val_loss
        note = ""
        if stage_times is not None:
            rec["stage_times"] = stage_times
            note = self.check_stragglers(update, stage_times)
        for writer in self._writers:
            writer.write(rec)
        if not math.isfinite(train_loss):
            raise NonFiniteLoss(f"non-finite training loss {train_loss} at update {update}; the last good "
                                f"checkpoint (if any) is kept in {self.out}")
        if self.is_log(update):
            note = f" mem {peak_memory(self.device)['bytes'] / 2**30:.2f} GiB" + note
        self.progress.update(update, train_loss, lr, self.per_update,
                             (f" val {val_loss:.4f}" if val_loss is not None else "") + note)
        return rec

    def check_stragglers(self, update: int, stage_times: dict) -> str:
        """Name the stages whose time per microbatch is more than STRAGGLER_RATIO times the
        median over the stages: a "straggler" event in events.jsonl when a stage becomes one,
        and the words for the progress line while it is one.

        Args:
            update: the update the times were gathered at.
            stage_times: as for record().
        Returns:
            " straggler: stage k (X ms per microbatch, R x the median Y ms)" per straggler, or "".
        """
        per_mb = per_microbatch_ms(stage_times, self.num_microbatches)
        found = find_stragglers(per_mb, STRAGGLER_RATIO)
        for k, median in found.items():
            if k not in self._stragglers:
                log_event(self.out, {"event": "straggler", "update": update, "stage": k,
                                     "ms_per_microbatch": round(per_mb[k], 3), "median_ms": round(median, 3),
                                     "ratio": round(per_mb[k] / median, 3)})
        self._stragglers = set(found)
        return "".join(f" straggler: stage {k} ({per_mb[k]:.1f} ms per microbatch, {per_mb[k] / median:.1f}x "
                       f"the median {median:.1f} ms)" for k, median in found.items())

    def save_checkpoint(self, update: int, state: dict) -> None:
        """Save this part's checkpoint of `update` (the fingerprint and clock are added)."""
        state = dict(state, update=update, elapsed=self.elapsed(), fingerprint=self.data.fingerprint)
        faults.during_checkpoint(self.out, self.stage_idx, update, self.store.path(update, self.part), state)
        self.store.save(update, self.part, state)

    def after_step(self, update: int) -> None:
        """The engines call this right after the step creating version `update`: the place
        where pipenag.faults injects a failure."""
        faults.after_update(self.out, self.stage_idx, update)

    def elapsed(self) -> float:
        return time.perf_counter() - self._t0

    # -- end --------------------------------------------------------------------------------
    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []

    def finish(self, status: str, updates: int, **extra) -> dict:
        """Close the outputs and (if this process writes records) write summary.json.

        Args:
            status: "ok" or "diverged".
            updates: updates done.
            extra: engine-specific summary fields.
        Returns:
            The summary.
        """
        self.close()
        val = self.val_loss if status == "ok" else float("nan")
        summary = {
            "status": status,
            "method": self.cfg.pipeline.method,
            "schedule": self.parts.resolved.schedule.name,
            "stages": self.parts.resolved.schedule.num_stages,
            "microbatches_per_update": self.num_microbatches,
            "updates": updates,
            "tokens": updates * self.per_update,
            "val_loss": val,
            "val_ppl": math.exp(val) if math.isfinite(val) and val < 50 else None,
            "wall_time_s": round(self.elapsed(), 3),
            "engine": self.engine,
            "threads": torch.get_num_threads(),
            "machine": machine_info(),
            "data_fingerprint": self.data.fingerprint,
            "num_params": self.parts.num_params,
            "vocab_size": self.parts.model_cfg.vocab_size,
            "restarts": restarts(read_events(self.out)),
            "throughput": self.throughput(updates),
            "peak_memory": dict(peak_memory(self.device),
                                stages=(list(range(self.parts.resolved.schedule.num_stages))
                                        if self.stage_idx is None else [self.stage_idx])),
            **extra,
        }
        summary = strict_json(summary)  # the file's values: null for a loss that is not finite
        if self.writes_records:
            atomic.write_text(self.out / SUMMARY, dumps(summary, indent=2) + "\n")
        return summary


    def throughput(self, updates: int) -> dict:
        """summary.json's throughput of this process's updates (a resumed run: since the resume):
        tokens/s, the achieved TFLOP/s at flops_per_token (6 N + 12 L C T, pipenag.plan), and MFU
        against the device's peak (None when the peak is unknown: a CPU without run.peak_tflops)."""
        seconds = time.perf_counter() - self._t_segment
        done = max(0, updates - self.start) * self.per_update
        tokens_per_s = done / seconds if seconds > 0 else None
        achieved = None if tokens_per_s is None else tokens_per_s * self.flops_per_token / 1e12
        return {"tokens_per_s": tokens_per_s, "flops_per_token": self.flops_per_token,
                "flops_formula": "6 N + 12 n_layer n_embd block_size (N: parameters but wte, wpe)",
                "achieved_tflops": achieved, "peak_tflops": self.peak_tflops,
                "mfu": achieved / self.peak_tflops if achieved is not None and self.peak_tflops else None}


def peak_memory(device: torch.device) -> dict:
    """This process's peak memory: torch.cuda.max_memory_allocated on a CUDA device, else the
    process's peak resident set size (resource.getrusage; kilobytes on Linux, bytes on macOS)."""
    if device.type == "cuda":
        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "source": "torch.cuda.max_memory_allocated"}
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"bytes": int(rss if sys.platform == "darwin" else rss * 1024), "source": "process peak RSS"}


def per_microbatch_ms(stage_times: dict, num_microbatches: int) -> list[Optional[float]]:
    """Each stage's compute time per microbatch from its moving medians: forward + backward +
    its share of the step (one step per num_microbatches microbatches).

    Args:
        stage_times: {"forward_ms": [K], "backward_ms": [K], "step_ms": [K]} (None entries allowed).
        num_microbatches: microbatches per update.
    Returns:
        K milliseconds, None for a stage whose forward or backward median is unknown.
    """
    out: list[Optional[float]] = []
    for f, b, s in zip(stage_times["forward_ms"], stage_times["backward_ms"], stage_times["step_ms"]):
        out.append(None if f is None or b is None else f + b + (s or 0.0) / num_microbatches)
    return out


def restarts(events: list[dict]) -> dict:
    """summary.json's account of the restarts: how many resumes, and for each the update it
    resumed from with the failure the launcher saw before it (stage, update, cause), if any."""
    out, failure = [], None
    for e in events:
        if e["event"] == "failure":
            failure = e
        elif e["event"] == "resume":
            entry = {"resumed_from": e["update"]}
            if failure is not None:
                entry.update(stage=failure.get("stage"), failed_after_update=failure.get("last_update"),
                             cause=failure.get("cause"))
            out.append(entry)
            failure = None
    return {"count": len(out), "events": out}


def final_line(summary: dict, out_dir: str | Path) -> str:
    """The line `pipenag train` ends with."""
    val = summary["val_loss"]
    ppl = "n/a" if summary["val_ppl"] is None else f"{summary['val_ppl']:.2f}"
    val_text = "n/a" if val is None or not math.isfinite(val) else f"{val:.4f}"
    return (f"val_loss {val_text} (ppl {ppl}) after {summary['updates']} updates, {summary['tokens']:,} tokens, "
            f"{summary['wall_time_s']:.1f}s -> {Path(out_dir) / SUMMARY}")
