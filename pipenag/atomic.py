"""Atomic file writes: a reader, or a run that dies mid-write, sees the old file or the whole new one.

    from pipenag.atomic import write_text
    write_text("runs/a/summary.json", "{}\n")

Every write goes to a temporary file in the target's folder, is flushed to disk (fsync), and
is renamed over the target (os.replace, atomic on POSIX). The temporary file is removed when
anything fails, so no half-written file is ever left behind under any name.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["write_bytes", "write_text", "torch_save", "sha256_file"]


def write_bytes(path: str | Path, data: bytes) -> str:
    """Write `data` to `path` atomically, creating the folder if needed.

    Returns:
        The sha256 hex digest of `data` (what a later reader can verify the file against).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; run folders and caches may be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return hashlib.sha256(data).hexdigest()


def write_text(path: str | Path, text: str) -> str:
    """write_bytes of `text` in UTF-8; returns the sha256 hex digest."""
    return write_bytes(path, text.encode("utf-8"))


def torch_save(obj: Any, path: str | Path) -> str:
    """torch.save `obj` to `path` atomically; returns the sha256 hex digest of the file."""
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return write_bytes(path, buf.getvalue())


def sha256_file(path: str | Path) -> str:
    """The sha256 hex digest of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
