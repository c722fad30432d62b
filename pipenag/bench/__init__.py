"""Benchmarks run as `pipenag bench NAME` (pipenag.cli.BENCHES), and what their reports share.

    pipenag bench optimizer --config configs/small.toml
    pipenag bench simulator --stages 8 --no-rss
    pipenag bench pipeline --stages 8 --microbatches 4 --compute-ms 20

Each benchmark prints ratios against a baseline measured in the same run, and a machine line
(`machine_line`) so that a result pasted into docs/results/ says where it came from.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys


def cpu_model() -> str:
    """The CPU's model name."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """The machine and versions behind a measurement (the JSON of every benchmark report)."""
    import torch

    return {"cpu": cpu_model(), "num_cpus": os.cpu_count(), "system": f"{platform.system()} {platform.release()}",
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def machine_line(info: dict | None = None) -> str:
    """One line for a report: CPU, cores, system, Python, torch, threads (and the GPU if any)."""
    m = info or machine_info()
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ""
    return (f"machine: {m['cpu']}, {m['num_cpus']} CPUs, {m['system']}; Python {m['python']}, torch {m['torch']}, "
            f"{m['torch_threads']} torch thread(s){gpu}")


def bench_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """An argparse parser for a benchmark that takes --config, the shortcuts and the
    --section.key=value overrides (pipenag.config), like `pipenag train`."""
    from pipenag.config import add_config_arguments

    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    add_config_arguments(parser, skip=("engine", "out", "steps"))
    return parser


def bench_config(parser: argparse.ArgumentParser, argv: list[str]):
    """Parse a benchmark's command line: (its args, the Config), or exit 2 with one line."""
    from pipenag.config import config_from_args

    args, rest = parser.parse_known_args(argv)
    try:
        return args, config_from_args(args, rest)
    except ValueError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
