"""Per-stage checkpoints of the multi-process runtime: one file per stage and update, no barrier.

    pipenag train --config configs/tiny.toml --engine dist --train.checkpoint_every=10 --out runs/d
    pipenag train --resume runs/d

Stage k writes RUN/checkpoints/u{update:08d}-stage{k}.pt (atomically) right after its step
creating version `update`. The stages reach an update at different times, so at any moment the
newest update may have files from only some stages; a run resumes from the newest update that
has a file from every stage. A stage deletes its own older files once a newer update is
complete, so the newest complete set is never removed.
"""

from __future__ import annotations

import re
from pathlib import Path

CHECKPOINT_DIR = "checkpoints"
_NAME = re.compile(r"^u(\d+)-stage(\d+)\.pt$")


def stage_checkpoint(out_dir: str | Path, update: int, stage_idx: int) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR / f"u{update:08d}-stage{stage_idx}.pt"


def stage_updates(out_dir: str | Path, stage_idx: int) -> list[int]:
    """Updates for which stage `stage_idx` has a checkpoint file, ascending."""
    folder = Path(out_dir) / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        m = _NAME.match(path.name)
        if m and int(m.group(2)) == stage_idx:
            found.append(int(m.group(1)))
    return sorted(found)


def complete_updates(out_dir: str | Path, num_stages: int) -> list[int]:
    """Updates with a checkpoint file from every one of `num_stages` stages, ascending."""
    common = set(stage_updates(out_dir, 0))
    for k in range(1, num_stages):
        common &= set(stage_updates(out_dir, k))
    return sorted(common)


def prune(out_dir: str | Path, stage_idx: int, num_stages: int) -> None:
    """Delete this stage's files older than the newest update that every stage has written."""
    complete = complete_updates(out_dir, num_stages)
    if not complete:
        return
    for update in stage_updates(out_dir, stage_idx):
        if update < complete[-1]:
            stage_checkpoint(out_dir, update, stage_idx).unlink(missing_ok=True)
