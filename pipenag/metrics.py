"""Run metrics: one JSON object per update in metrics.jsonl, TensorBoard events, progress lines.

    pipenag train --config configs/tiny.toml --out runs/a && head -3 runs/a/metrics.jsonl
    pipenag train --config configs/tiny.toml --out runs/a --run.tensorboard=true
    tensorboard --logdir runs/a/tensorboard

metrics.jsonl is strict JSON: a value that is not a finite number (a diverged loss) is written
as null, never as a bare NaN or Infinity token that other JSON readers reject. The runtime's
records on progress-line updates also carry `stage_times`: every stage's moving medians of its
forward, backward and step times (milliseconds), from which find_stragglers names a slow stage.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

METRICS = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
STRAGGLER_RATIO = 1.5
"""A stage whose time per microbatch exceeds this multiple of the median over stages is a straggler."""


def find_stragglers(per_stage_ms: Sequence[Optional[float]], ratio: float = STRAGGLER_RATIO) -> dict[int, float]:
    """The stages slower than `ratio` times the median over the stages.

    Args:
        per_stage_ms: each stage's time per microbatch (None: unknown, left out).
        ratio: the threshold (> 1). With two stages the median is their mean, so one stage
            must be more than ratio / (2 - ratio) times the other (3x for 1.5).
    Returns:
        stage -> the median it was compared with, for every straggler (empty with fewer than
        two known stages).
    Raises:
        ValueError: ratio <= 1.
    """
    if not ratio > 1:
        raise ValueError(f"ratio={ratio!r}: must be > 1")
    known = [t for t in per_stage_ms if t is not None]
    if len(known) < 2:
        return {}
    median = statistics.median(known)
    return {k: median for k, t in enumerate(per_stage_ms) if t is not None and median > 0 and t > ratio * median}


def strict_json(value):
    """`value` with every non-finite float (at any depth) replaced by None."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps(value, **kwargs) -> str:
    """json.dumps that never writes NaN or Infinity (see strict_json)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


class MetricsWriter:
    """Appends one JSON line per record and flushes it, so a crash loses nothing written.

    Args:
        out_dir: the run folder.
        resume_step: on resume, drop the lines of updates after this one (they are redone).
    """

    def __init__(self, out_dir: str | Path, resume_step: Optional[int] = None):
        self.path = Path(out_dir) / METRICS
        if resume_step is None:
            self.path.write_text("")
        else:
            kept = [line for line in read_metrics(self.path) if line["step"] <= resume_step]
            self.path.write_text("".join(dumps(r) + "\n" for r in kept))
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._file.write(dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_tensorboard() -> None:
    """Raise ValueError (with the install command) when run.tensorboard cannot work."""
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        raise ValueError("run.tensorboard=true needs the tensorboard package: "
                         "pip install 'pipenag[tensorboard]' (or pip install tensorboard)") from None


class TensorBoardWriter:
    """The numbers of each metrics.jsonl record as TensorBoard scalars (tag = the key, step =
    the update), in RUN/tensorboard.

    Args:
        out_dir: the run folder.
        resume_step: on resume, drop the events after this update (they are redone).
    """

    def __init__(self, out_dir: str | Path, resume_step: Optional[int] = None):
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(str(Path(out_dir) / TENSORBOARD_DIR),
                                     purge_step=None if resume_step is None else resume_step + 1)

    def write(self, record: dict) -> None:
        step = record["step"]
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)
        for name, values in record.get("stage_times", {}).items():  # the runtime's per-stage medians
            for k, value in enumerate(values):
                if value is not None:
                    self._writer.add_scalar(f"stage_times/{name}/stage{k}", value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class Progress:
    """Prints `[step/total] loss .. lr .. tok/s [.. TFLOP/s [MFU ..%]] eta` every `every` updates
    to stderr: the achieved TFLOP/s when `flops_per_token` is given (pipenag.plan's 6N + 12LCT),
    MFU when the device's `peak_tflops` is known too."""

    def __init__(self, total: int, every: int, enabled: bool = True, start: int = 0, flops_per_token: int = 0,
                 peak_tflops: Optional[float] = None):
        self.total, self.every, self.enabled = total, max(1, every), enabled
        self.start_step, self.t0 = start, time.perf_counter()
        self.flops_per_token, self.peak_tflops = flops_per_token, peak_tflops

    def update(self, step: int, loss: float, lr: float, tokens_per_step: int, extra: str = "") -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        dt = time.perf_counter() - self.t0
        done = step - self.start_step
        rate = done / dt if dt > 0 else 0.0
        eta = (self.total - step) / rate if rate > 0 else 0.0
        bar_len = 20
        filled = int(bar_len * step / self.total)
        bar = "#" * filled + "-" * (bar_len - filled)
        speed = ""
        if self.flops_per_token:
            tflops = rate * tokens_per_step * self.flops_per_token / 1e12
            speed = f" {tflops:.3g} TFLOP/s" + (f" MFU {100 * tflops / self.peak_tflops:.1f}%"
                                                 if self.peak_tflops else "")
        print(f"[{bar}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} "
              f"{rate * tokens_per_step:,.0f} tok/s{speed} eta {eta:.0f}s{extra}", file=sys.stderr, flush=True)

    def message(self, text: str) -> None:
        if self.enabled:
            print(text, file=sys.stderr, flush=True)
