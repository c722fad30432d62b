"""Child processes that never outlive their parent.

    from pipenag.procs import die_with_parent
    die_with_parent(parent_pid)     # first thing in a worker process

Used by the runtime's workers (pipenag.runtime.launch) and the sweep's (pipenag.sweep): a
launcher killed with SIGKILL cannot clean up, so each child asks the kernel for SIGKILL when
its parent dies (Linux prctl PR_SET_PDEATHSIG; elsewhere this does nothing).
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Get SIGKILL when the parent dies; exit now if it already has (before the prctl)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:
        os._exit(1)
