"""Fault injection for tests and the fault matrix (docs/results/faults.md): make a process fail
at a chosen update, once per run.

    PIPENAG_FAIL=1:7:kill pipenag train --config configs/tiny.toml --engine dist --dist.max_restarts=2
    PIPENAG_FAIL=0:4,2:9:hang pipenag train ... --engine dist --dist.max_restarts=2     # two faults

PIPENAG_FAIL holds comma-separated faults STAGE:UPDATE[:KIND]: stage STAGE fails right after its
step creating version UPDATE (the simulator, which runs every stage, takes any STAGE). KIND:
- exit (default): print one line and exit with status 17;
- kill: SIGKILL itself (no cleanup, like an out-of-memory kill or a lost machine);
- hang: stop answering (sleep forever), so its neighbours time out;
- checkpoint: die in the middle of writing its checkpoint of UPDATE (half the bytes in the
  temporary file, then SIGKILL), as a kill during the write would leave it.
Each fault fires once per run folder (RUN/faults_fired.txt records it), so a restarted run
goes past it: two faults in one spec fail two attempts.
"""

from __future__ import annotations

import io
import os
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

FAIL_ENV = "PIPENAG_FAIL"
FIRED = "faults_fired.txt"
KINDS = ("exit", "kill", "hang", "checkpoint")
EXIT_FAULT = 17


@dataclass(frozen=True)
class Fault:
    stage: int
    update: int
    kind: str

    def __str__(self) -> str:
        return f"{self.stage}:{self.update}:{self.kind}"


def parse(spec: str) -> list[Fault]:
    """The faults of a PIPENAG_FAIL value.

    Raises:
        ValueError: a malformed entry (named).
    """
    faults = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        parts = item.split(":")
        try:
            stage, update = int(parts[0]), int(parts[1])
            kind = parts[2] if len(parts) > 2 else "exit"
        except (ValueError, IndexError):
            raise ValueError(f"{FAIL_ENV}={spec!r}: {item!r} is not STAGE:UPDATE[:KIND]") from None
        if kind not in KINDS or len(parts) > 3:
            raise ValueError(f"{FAIL_ENV}={spec!r}: {item!r}: KIND must be one of {', '.join(KINDS)}")
        faults.append(Fault(stage, update, kind))
    return faults


def _due(out_dir: str | Path, stage_idx: Optional[int], update: int, kinds: tuple[str, ...]) -> Optional[Fault]:
    """The first fault of PIPENAG_FAIL for this stage and update (and of these kinds) that has
    not fired yet in this run folder; it is marked fired before it is returned."""
    spec = os.environ.get(FAIL_ENV, "")
    if not spec:
        return None
    fired_path = Path(out_dir) / FIRED
    fired = set(fired_path.read_text().split()) if fired_path.is_file() else set()
    for fault in parse(spec):
        if fault.update == update and fault.kind in kinds and str(fault) not in fired \
                and (stage_idx is None or fault.stage == stage_idx):
            with open(fired_path, "a") as f:
                f.write(f"{fault}\n")
                f.flush()
                os.fsync(f.fileno())
            return fault
    return None


def after_update(out_dir: str | Path, stage_idx: Optional[int], update: int) -> None:
    """Fail now if a fault of kind exit, kill or hang is due (stage_idx None: any stage)."""
    fault = _due(out_dir, stage_idx, update, ("exit", "kill", "hang"))
    if fault is None:
        return
    who = "the simulator" if stage_idx is None else f"stage {stage_idx}"
    print(f"{who}: {FAIL_ENV} fault {fault}: {fault.kind} after update {update}", file=sys.stderr, flush=True)
    if fault.kind == "hang":
        while True:
            time.sleep(3600)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(EXIT_FAULT)


def during_checkpoint(out_dir: str | Path, stage_idx: Optional[int], update: int, path: Path, state: Any) -> None:
    """Die half-way through writing `state` to `path` if a checkpoint fault is due: the
    temporary file of an atomic write holds half the bytes, the checkpoint itself is absent."""
    if _due(out_dir, stage_idx, update, ("checkpoint",)) is None:
        return
    import torch

    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, _ = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.write(fd, data[: len(data) // 2])
    os.fsync(fd)
    print(f"{'the simulator' if stage_idx is None else f'stage {stage_idx}'}: {FAIL_ENV} fault: killed while "
          f"writing the checkpoint of update {update}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
