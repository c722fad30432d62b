"""Benchmarks run as `pipenag bench NAME` (see pipenag.cli.BENCHES)."""

import platform


def cpu_model() -> str:
    """The CPU's model name (for the machine line of benchmark reports)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
