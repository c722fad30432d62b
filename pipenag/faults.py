"""Fault injection for tests and the fault matrix (docs/results/faults.md): make a process fail
at a chosen update, once per run.

    PIPENAG_FAIL=1:7:kill pipenag train --config configs/tiny.toml --engine dist --dist.max_restarts=2
    PIPENAG_FAIL=0:4,2:9:hang pipenag train ... --engine dist --dist.max_restarts=2     # two faults
    PIPENAG_FAIL=1:3:slow:40 pipenag train ... --engine dist --train.log_every=2      # a straggler

PIPENAG_FAIL holds comma-separated faults STAGE:UPDATE[:KIND[:MS]]: stage STAGE fails right after
its step creating version UPDATE (the simulator, which runs every stage, takes any STAGE). KIND:
- exit (default): print one line and exit with status 17;
- kill: SIGKILL itself (no cleanup, like an out-of-memory kill or a lost machine);
- hang: stop answering (sleep forever), so its neighbours time out;
- checkpoint: die in the middle of writing its checkpoint of UPDATE (half the bytes in the
  temporary file, then SIGKILL), as a kill during the write would leave it;
- silent (runtime only): the stage stays alive but never sends again: it goes on until its next
  send and blocks there forever, its process, connections and posted receives kept, as behind a
  link that black-holes its traffic (a half-open connection, a firewall that drops packets).
  Its neighbours learn of it only by their receive timeout (dist.timeout_s);
- slow (runtime only): the stage sleeps MS milliseconds (default 20) more in every forward and
  backward from then on, inside its timed compute: a straggler (pipenag.metrics.find_stragglers).
  It costs time only, never a number.
The simulator has no links and one clock for all stages, so it ignores silent and slow.
Each fault fires once per run folder (RUN/faults_fired.txt records it), so a restarted run
goes past it: two faults in one spec fail two attempts. silent and slow last for the rest of
the process they fired in.
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
KINDS = ("exit", "kill", "hang", "checkpoint", "silent", "slow")
EXIT_FAULT = 17
SLOW_MS = 20.0  # default extra sleep per pass of a slow fault: well above a tiny stage's pass

# The silent and slow faults that fired in this process: stage -> extra seconds per pass, and
# the silent stages. Module state, because the fault fires in the Recorder and acts in the
# executor's sends and passes (pipenag.runtime.worker passes is_silent / extra_pass_s to it).
_silent: set[int] = set()
_slow_s: dict[int, float] = {}


@dataclass(frozen=True)
class Fault:
    stage: int
    update: int
    kind: str
    ms: Optional[float] = None  # slow: the extra sleep per pass

    def __str__(self) -> str:
        return f"{self.stage}:{self.update}:{self.kind}" + (f":{self.ms:g}" if self.ms is not None else "")


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
        if kind not in KINDS or len(parts) > (4 if kind == "slow" else 3):
            raise ValueError(f"{FAIL_ENV}={spec!r}: {item!r}: KIND must be one of {', '.join(KINDS)} "
                             "(only slow takes a fourth field, :MS)")
        ms = None
        if kind == "slow":
            try:
                ms = float(parts[3]) if len(parts) > 3 else SLOW_MS
            except ValueError:
                ms = -1.0
            if not ms >= 0 or ms == float("inf"):
                raise ValueError(f"{FAIL_ENV}={spec!r}: {item!r}: MS must be a number of milliseconds >= 0")
        faults.append(Fault(stage, update, kind, ms))
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
    """Fail now if a fault of kind exit, kill or hang is due (stage_idx None: any stage); a
    runtime stage (stage_idx given) also starts a due silent or slow fault.

    Args:
        out_dir: the run folder (its faults_fired.txt).
        stage_idx: the runtime's stage, None for the simulator.
        update: the version the step just created.
    """
    kinds = ("exit", "kill", "hang") + (("silent", "slow") if stage_idx is not None else ())
    fault = _due(out_dir, stage_idx, update, kinds)
    if fault is None:
        return
    who = "the simulator" if stage_idx is None else f"stage {stage_idx}"
    print(f"{who}: {FAIL_ENV} fault {fault}: {fault.kind} after update {update}", file=sys.stderr, flush=True)
    if fault.kind == "silent":
        _silent.add(stage_idx)
        return
    if fault.kind == "slow":
        _slow_s[stage_idx] = _slow_s.get(stage_idx, 0.0) + fault.ms / 1e3
        return
    if fault.kind == "hang":
        while True:
            time.sleep(3600)
    if fault.kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(EXIT_FAULT)


def is_silent(stage_idx: int) -> bool:
    """Whether a silent fault fired in this process for this stage: it must never send again."""
    return stage_idx in _silent


def extra_pass_s(stage_idx: int) -> float:
    """Seconds a slow fault adds to every forward and backward of this stage (0.0: none)."""
    return _slow_s.get(stage_idx, 0.0)


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
