"""`pipenag train`: train a GPT split into pipeline stages under a named method.

    pipenag train --config configs/tiny.toml --method nesterov --stages 4 --steps 40 --out runs/tiny
    pipenag train --resume runs/tiny

The run folder gets config.json (the resolved config), metrics.jsonl (one line per update:
step, tokens, train_loss, lr, time_s, and val_loss on evaluation steps), summary.json, and
checkpoints/ (every train.checkpoint_every updates and at the end; pipenag.checkpoint). A run
resumed from its checkpoint continues with bit-identical losses. A non-finite loss stops the
run (exit status 1) and leaves the last good checkpoint in place. The bookkeeping is
pipenag.run's Recorder, which the multi-process runtime (--engine dist) shares.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

from pipenag.build import build_pipeline, compute_dtype, evaluate, memory_report
from pipenag.checkpoint import SIM_PART, CheckpointStore
from pipenag.config import Config
from pipenag.data import build_data
from pipenag.link.messages import wire_summary
from pipenag.run import (NonFiniteLoss, Recorder, check_same_run, final_line, preflight, resume_mode, set_threads,
                         sim_device, validation_batches)


def load_run_config(run_dir: str | Path, extra: Optional[list[str]] = None) -> Config:
    """The config saved in a run folder, with optional --section.key=value overrides."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise ValueError(f"--resume {str(run_dir)!r}: no config.json there (not a pipenag run folder)")
    try:
        saved = json.loads(path.read_text())
        cfg = Config.from_dict(saved)
    except ValueError as e:
        raise ValueError(f"--resume {str(run_dir)!r}: its config.json does not load ({e})") from None
    if extra:
        cfg = cfg.with_overrides(extra)
        now = cfg.to_dict()
        # The checkpoint holds this model, split and data order: an override of them cannot resume.
        fixed = [f"{s}.{k}" for s in ("model", "data", "pipeline") for k in now[s] if saved[s].get(k) != now[s][k]]
        fixed += [f"train.{k}" for k in ("seed",) if saved["train"].get(k) != now["train"][k]]
        if fixed:
            first = fixed[0].split(".")
            raise ValueError(f"--resume {str(run_dir)!r}: {fixed[0]}={now[first[0]][first[1]]!r} differs from the "
                             f"run's {saved[first[0]].get(first[1])!r}" + (f" (and {', '.join(fixed[1:4])})" if fixed[1:] else "")
                             + "; its checkpoints hold another model, split or data order: start a new run instead")
    cfg.run.out_dir = str(run_dir)
    return cfg


def train_sim(cfg: Config, resume: bool = False) -> dict:
    """Train with the simulator engine; returns the summary (also written to summary.json).

    Args:
        cfg: the run's config (train.resume="auto": continue the run in run.out_dir if it has
            a complete checkpoint).
        resume: continue from the newest complete checkpoint, which must exist (--resume).
    Raises:
        ValueError: a bad config, or resume without a usable checkpoint (before any training).
    """
    from pipenag.compare import apply_microbatch_budget

    cfg = apply_microbatch_budget(cfg)  # a budget in microbatches means the same here as in `pipenag train`
    resolved = preflight(cfg)
    mode = resume_mode(cfg, resume)
    if mode == "auto":
        check_same_run(cfg)
    start = 0
    if mode != "no":
        store = CheckpointStore(cfg.run.out_dir, [SIM_PART])
        start = store.newest_verified_set() or 0
        if not start and mode == "explicit":
            raise ValueError(f"--resume {cfg.run.out_dir!r}: {store.missing_reason()}")
    set_threads(cfg, resolved.schedule.num_stages)
    device = sim_device(cfg)
    data = build_data(cfg.data, cfg.model.block_size, cfg.train.seed)
    parts = build_pipeline(cfg, data.vocab_size, device=device, train_ids=data.train_ids)
    sim = parts.simulator()
    rec = Recorder(cfg, parts, data, engine="sim", part=SIM_PART, checkpoint_parts=[SIM_PART])
    if start:
        sim.load_state_dict(rec.load_checkpoint(start, map_location=device)["sim"])
    rec.begin(f"data {data.corpus.source} ({len(data.train_ids):,} train tokens, fingerprint {data.fingerprint})",
              mode)
    val_batches = validation_batches(cfg, data, device)
    M = sim.num_microbatches
    try:
        for update in range(rec.start + 1, cfg.train.steps + 1):
            batch = [data.train.get((update - 1) * M + i) for i in range(M)]
            loss = sim.step([(x.to(device), y.to(device)) for x, y in batch])
            rec.after_step(update)
            val = (evaluate(parts.stages, val_batches, sim.activation_codec, compute_dtype(cfg))
                   if rec.is_eval(update) and math.isfinite(loss) else None)
            rec.record(update, loss, val)
            if rec.is_checkpoint(update):
                rec.save_checkpoint(update, {"sim": sim.state_dict()})
    except NonFiniteLoss as e:
        print(f"pipenag train: error: {e}", file=sys.stderr, flush=True)
        return rec.finish("diverged", rec.last_update)
    finally:
        rec.close()
    return rec.finish("ok", cfg.train.steps, memory=memory_report(parts), messages=wire_summary(cfg))


def train_main(cfg: Optional[Config], resume: Optional[str] = None, extra: Optional[list[str]] = None) -> int:
    """Entry point of `pipenag train`; returns the process exit status."""
    if resume:
        cfg = load_run_config(resume, extra)
    assert cfg is not None
    from pipenag.compare import apply_microbatch_budget

    cfg = apply_microbatch_budget(cfg)
    if cfg.train.engine == "dist":
        from pipenag.runtime.launch import train_dist

        return train_dist(cfg, resume=bool(resume))
    summary = train_sim(cfg, resume=bool(resume))
    if summary["status"] != "ok":
        return 1
    print(final_line(summary, cfg.run.out_dir))
    return 0
