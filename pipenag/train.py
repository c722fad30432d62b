"""`pipenag train`: train a GPT split into pipeline stages under a named method.

    pipenag train --config configs/tiny.toml --method nesterov --stages 4 --steps 40 --out runs/tiny
    pipenag train --resume runs/tiny

The run folder gets config.json (the resolved config), metrics.jsonl (one line per update:
step, tokens, train_loss, lr, time_s, and val_loss on evaluation steps), summary.json, and
checkpoint.pt (written atomically every train.checkpoint_every updates and at the end). A run
resumed from its checkpoint continues with bit-identical losses. A non-finite loss stops the
run (exit status 1) and leaves the last good checkpoint in place.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from pipenag import checkpoint
from pipenag.build import build_pipeline, evaluate
from pipenag.config import Config, load_config
from pipenag.data import build_data, fixed_batches
from pipenag.methods import resolve
from pipenag.metrics import MetricsWriter, Progress
from pipenag.split import partition_layers

VAL_SEED = 1234


class NonFiniteLoss(RuntimeError):
    pass


def load_run_config(run_dir: str | Path, extra: Optional[list[str]] = None) -> Config:
    """The config saved in a run folder, with optional --section.key=value overrides."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"--resume {str(run_dir)!r}: no config.json there (not a pipenag run folder)")
    cfg = Config.from_dict(json.loads(path.read_text()))
    if extra:
        from pipenag.config import _merge, parse_overrides

        cfg = Config.from_dict(_merge(cfg.to_dict(), parse_overrides(extra)))
    cfg.run.out_dir = str(run_dir)
    return cfg


def tokens_per_update(cfg: Config, num_microbatches: int) -> int:
    return num_microbatches * cfg.data.microbatch_size * cfg.model.block_size


def train_sim(cfg: Config, resume: bool = False) -> dict:
    """Train with the simulator engine; returns the summary (also written to summary.json)."""
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    out = Path(cfg.run.out_dir)
    # Fail on a bad method, schedule or split before loading data or writing anything.
    partition_layers(cfg.model.n_layer, resolve(cfg).schedule.num_stages)
    if resume and not (out / checkpoint.CHECKPOINT).is_file():
        raise ValueError(f"--resume {str(out)!r}: no {checkpoint.CHECKPOINT} there (the run stopped "
                         "before its first checkpoint)")
    progress = Progress(cfg.train.steps, cfg.train.log_every, cfg.run.progress)
    data = build_data(cfg.data, cfg.model.block_size, cfg.train.seed)
    parts = build_pipeline(cfg, data.vocab_size)
    progress.message(f"pipenag: {parts.describe()}; data {data.corpus.source} "
                     f"({len(data.train_ids):,} train tokens, fingerprint {data.fingerprint})")
    sim = parts.simulator()
    M = sim.num_microbatches
    val = fixed_batches(data.val_ids, cfg.model.block_size, cfg.data.microbatch_size,
                        cfg.train.eval_batches, seed=VAL_SEED)
    per_update = tokens_per_update(cfg, M)
    start, elapsed = 0, 0.0
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        state = checkpoint.load(out / checkpoint.CHECKPOINT)
        if state["fingerprint"] != data.fingerprint:
            raise ValueError(f"--resume {str(out)!r}: the data changed since the checkpoint "
                             f"(fingerprint {data.fingerprint} != {state['fingerprint']})")
        sim.load_state_dict(state["sim"])
        start, elapsed = state["update"], state["elapsed"]
        progress.start_step = start
        progress.message(f"pipenag: resumed {out} at update {start}")
    else:
        cfg.save(out / "config.json")
    writer = MetricsWriter(out, resume_step=start if resume else None)
    t0 = time.perf_counter() - elapsed
    val_loss = float("nan")
    status = "ok"
    try:
        for update in range(start + 1, cfg.train.steps + 1):
            first = (update - 1) * M
            batch = [data.train.get(first + i) for i in range(M)]
            lr = parts.lr_fns[0](update)
            loss = sim.step(batch)
            record = {"step": update, "tokens": update * per_update, "train_loss": loss, "lr": lr,
                      "time_s": round(time.perf_counter() - t0, 4)}
            if not math.isfinite(loss):
                writer.write(record)
                raise NonFiniteLoss(f"non-finite training loss {loss} at update {update}; the last good "
                                    f"checkpoint (if any) is kept in {out}")
            last = update == cfg.train.steps
            if last or (cfg.train.eval_every and update % cfg.train.eval_every == 0):
                val_loss = evaluate(parts.stages, val)
                record["val_loss"] = val_loss
            writer.write(record)
            progress.update(update, loss, lr, per_update,
                            f" val {val_loss:.4f}" if "val_loss" in record else "")
            if last or (cfg.train.checkpoint_every and update % cfg.train.checkpoint_every == 0):
                checkpoint.save_atomic({"update": update, "sim": sim.state_dict(),
                                        "elapsed": time.perf_counter() - t0,
                                        "fingerprint": data.fingerprint},
                                       out / checkpoint.CHECKPOINT)
    except NonFiniteLoss as e:
        status = "diverged"
        print(f"pipenag train: error: {e}", file=sys.stderr, flush=True)
        val_loss = float("nan")
    finally:
        writer.close()
    summary = {
        "status": status,
        "method": cfg.pipeline.method,
        "schedule": parts.resolved.schedule.name,
        "stages": parts.resolved.schedule.num_stages,
        "microbatches_per_update": M,
        "updates": cfg.train.steps if status == "ok" else update,
        "tokens": (cfg.train.steps if status == "ok" else update) * per_update,
        "val_loss": val_loss,
        "val_ppl": math.exp(val_loss) if math.isfinite(val_loss) and val_loss < 50 else None,
        "wall_time_s": round(time.perf_counter() - t0, 3),
        "engine": "sim",
        "data_fingerprint": data.fingerprint,
        "num_params": sum(p.numel() for s in parts.stages for p in s.parameters()),
    }
    checkpoint.write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


def train_main(cfg: Optional[Config], resume: Optional[str] = None, extra: Optional[list[str]] = None) -> int:
    """Entry point of `pipenag train`; returns the process exit status."""
    if resume:
        cfg = load_run_config(resume, extra)
    assert cfg is not None
    if cfg.train.engine == "dist":
        from pipenag.runtime.launch import train_dist

        return train_dist(cfg, resume=bool(resume))
    summary = train_sim(cfg, resume=bool(resume))
    if summary["status"] != "ok":
        return 1
    ppl = "n/a" if summary["val_ppl"] is None else f"{summary['val_ppl']:.2f}"
    print(f"val_loss {summary['val_loss']:.4f} (ppl {ppl}) after {summary['updates']} "
          f"updates, {summary['tokens']:,} tokens, {summary['wall_time_s']:.1f}s -> "
          f"{cfg.run.out_dir}/summary.json")
    return 0
