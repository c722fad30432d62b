"""Checkpoints a crash cannot spoil: one file per process and update, verified by checksum.

    pipenag train --config configs/tiny.toml --train.checkpoint_every=10 --out runs/a
    pipenag train --resume runs/a

Layout: RUN/checkpoints/u{update:08d}-{part}.pt, where a part is what one process saves
("sim" for the simulator, "stage{k}" for stage k of the runtime), and beside each file a
sidecar u{update:08d}-{part}.sha256 ("<sha256> <bytes>") written after it. Both are written
atomically (pipenag.atomic), so a file is either absent or whole as written; a kill between
the two leaves a file without a sidecar, which does not count.

- A checkpoint *set* (one update) is complete when every part has its file and sidecar.
- A set *verifies* when each file's size and sha256 match its sidecar: a truncated or
  corrupted file (a bad disk, a copy cut short) makes the run fall back to the previous
  complete set with a one-line warning.
- Each process keeps its files of the newest `keep` (2) complete sets and of any newer update
  not yet complete (the other parts may still be writing it), and deletes the rest of its own.
- A part is loaded weights-only (torch.load(weights_only=True)): tensors, numbers, strings and
  plain containers, never an arbitrary pickled object. A checksum cannot make a file safe
  (whoever can write the file can write its sidecar), so a crafted file that would run code when
  unpickled is refused (UnsafeCheckpoint) before any of it runs. Everything pipenag writes is
  such plain data, so its own checkpoints need no conversion.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from pipenag import atomic

CHECKPOINT_DIR = "checkpoints"
KEEP = 2
_NAME = re.compile(r"^u(\d+)-([a-z0-9]+)\.(pt|sha256)$")


def stage_part(stage_idx: int) -> str:
    """The part name of pipeline stage `stage_idx` in the runtime."""
    return f"stage{stage_idx}"


SIM_PART = "sim"


class UnsafeCheckpoint(ValueError):
    """A checkpoint file holds something other than tensors and plain data (it may run code)."""


def load_weights_only(path: str | Path, map_location: Any = "cpu") -> Any:
    """torch.load of a checkpoint file that refuses anything but tensors and plain data.

    Raises:
        UnsafeCheckpoint: the file pickles another object (a crafted or foreign file); nothing
            in it was run.
    """
    import pickle

    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message is a page of advice; keep its one line naming what was refused.
        found = re.search(r"(Unsupported [^\n]*?)(?: was not an allowed global|\. |\n|$)", str(e))
        first = found.group(1).strip() if found else type(e).__name__
        raise UnsafeCheckpoint(
            f"checkpoint {str(path)!r} refused: it holds objects other than tensors and plain data, and "
            f"pipenag loads checkpoints weights-only so that a crafted file cannot run code ({first}). "
            "pipenag never writes such a file: it comes from elsewhere; delete it, or resume from a "
            "checkpoint you made") from None


def _warn(message: str) -> None:
    print(f"pipenag: warning: {message}", file=sys.stderr, flush=True)


class CheckpointStore:
    """The checkpoint files of one run folder.

    Args:
        run_dir: the run folder.
        parts: the parts of a complete set (["sim"], or stage_part(k) for every stage).
        keep: complete sets each part keeps (>= 1).
    """

    def __init__(self, run_dir: str | Path, parts: Sequence[str], keep: int = KEEP):
        if keep < 1:
            raise ValueError(f"keep={keep}: must be >= 1")
        if not parts:
            raise ValueError("parts: a checkpoint set needs at least one part")
        self.folder = Path(run_dir) / CHECKPOINT_DIR
        self.parts = list(parts)
        self.keep = keep

    def path(self, update: int, part: str) -> Path:
        return self.folder / f"u{update:08d}-{part}.pt"

    def _sidecar(self, update: int, part: str) -> Path:
        return self.folder / f"u{update:08d}-{part}.sha256"

    # -- writing ------------------------------------------------------------------------------
    def save(self, update: int, part: str, state: Any) -> None:
        """Write `part`'s checkpoint of `update` (file, then sidecar), then prune this part."""
        path = self.path(update, part)
        digest = atomic.torch_save(state, path)
        atomic.write_text(self._sidecar(update, part), f"{digest} {path.stat().st_size}\n")
        self.prune(part)

    def prune(self, part: str) -> None:
        """Delete this part's files older than the newest `keep` complete sets."""
        complete = self.complete_updates()
        if len(complete) < self.keep:
            return
        oldest_kept = complete[-self.keep]
        for update in self.updates(part, with_orphans=True):
            if update < oldest_kept:
                self.delete(update, part)

    def delete(self, update: int, part: str) -> None:
        self._sidecar(update, part).unlink(missing_ok=True)
        self.path(update, part).unlink(missing_ok=True)

    def discard_after(self, update: int, part: str) -> None:
        """Delete this part's files of updates after `update`: what a run resumed at `update`
        will write again (a restart must not mix them with a set of the earlier attempt)."""
        for u in self.updates(part, with_orphans=True):
            if u > update:
                self.delete(u, part)

    def clean_temporary(self, part: str) -> None:
        """Delete this part's temporary files: what a process killed while writing left."""
        if self.folder.is_dir():
            for path in self.folder.glob(f".u*-{part}.*.tmp"):
                path.unlink(missing_ok=True)

    # -- reading ------------------------------------------------------------------------------
    def updates(self, part: str, with_orphans: bool = False) -> list[int]:
        """Updates for which `part` has a file and a sidecar, ascending (with_orphans: also a
        file without a sidecar, or a sidecar without a file)."""
        if not self.folder.is_dir():
            return []
        found: dict[int, set[str]] = {}
        for path in self.folder.iterdir():
            m = _NAME.match(path.name)
            if m and m.group(2) == part:
                found.setdefault(int(m.group(1)), set()).add(m.group(3))
        return sorted(u for u, kinds in found.items() if with_orphans or len(kinds) == 2)

    def complete_updates(self) -> list[int]:
        """Updates for which every part has a file and a sidecar, ascending (not verified)."""
        common = set(self.updates(self.parts[0]))
        for part in self.parts[1:]:
            common &= set(self.updates(part))
        return sorted(common)

    def verify(self, update: int, part: str) -> Optional[str]:
        """None when the file matches its sidecar, else why not (one line)."""
        path, sidecar = self.path(update, part), self._sidecar(update, part)
        try:
            digest, size = sidecar.read_text().split()
            actual_size = path.stat().st_size
        except (OSError, ValueError) as e:
            return f"{path.name}: unreadable ({type(e).__name__})"
        if actual_size != int(size):
            return f"{path.name}: {actual_size} bytes, {size} were written (truncated or torn)"
        if atomic.sha256_file(path) != digest:
            return f"{path.name}: checksum mismatch (corrupted on disk)"
        return None

    def verified_updates(self, part: str, warn: Callable[[str], None] = _warn) -> list[int]:
        """This part's updates whose file verifies, ascending; a warning for each that does not."""
        good = []
        for update in self.updates(part):
            why = self.verify(update, part)
            if why is None:
                good.append(update)
            else:
                warn(f"ignoring checkpoint {why}")
        return good

    def newest_verified_set(self, warn: Callable[[str], None] = _warn) -> Optional[int]:
        """The newest complete set whose every part verifies (None if there is none), warning
        once for each newer complete set that fails."""
        for update in reversed(self.complete_updates()):
            bad = [why for part in self.parts if (why := self.verify(update, part)) is not None]
            if not bad:
                return update
            warn(f"checkpoint of update {update} is damaged ({bad[0]}); falling back to the previous one")
        return None

    def missing_reason(self) -> str:
        """Why newest_verified_set() found nothing, in words for an error message: no complete
        set at all, or every complete set damaged (each named with what failed)."""
        complete = self.complete_updates()
        if not complete:
            return f"no complete checkpoint in {self.folder} (the run stopped before its first checkpoint)"
        bad = []
        for update in complete:
            whys = [why for part in self.parts if (why := self.verify(update, part)) is not None]
            bad.append(f"update {update}: {whys[0] if whys else 'ok'}")
        return f"every complete checkpoint in {self.folder} is damaged ({'; '.join(bad)})"

    def load(self, update: int, part: str, map_location: Any = "cpu") -> Any:
        """`part`'s checkpoint of `update`, loaded weights-only (load_weights_only)."""
        return load_weights_only(self.path(update, part), map_location=map_location)

    def check_loadable(self, update: int) -> None:
        """Load every part of the set of `update` weights-only (and drop it): a launcher's check
        before it starts any worker on that set.

        Raises:
            UnsafeCheckpoint: a part is not plain data.
        """
        for part in self.parts:
            self.load(update, part)
