"""What a run's numbers depend on besides its config: the CPU (its model, family and the vector
instructions torch dispatches to), the cores and torch. Two machines that print the same CPU
name can still differ here: "AMD EPYC" is a Zen 3 with AVX2 or a Zen 4 with AVX-512, and their
kernels round differently, so 2,000 asynchronous updates end at different losses
(docs/results/compression.md). summary.json records it as `machine`.

    python -c "from pipenag.machine import machine_info; print(machine_info())"
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def machine_info() -> dict:
    """cpu (model name), cpu_id (vendor family model stepping, from /proc/cpuinfo where there
    is one), cpu_capability (torch's kernel dispatch level: DEFAULT, AVX2, AVX512, ...), cores,
    torch, and the CUDA device's name when there is one."""
    info = {"cpu": platform.processor() or platform.machine(), "cpu_id": None}
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor is enough
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    if "model name" in fields:
        info["cpu"] = fields["model name"]
    if "cpu family" in fields:
        info["cpu_id"] = (f"{fields.get('vendor_id', '?')} family {fields['cpu family']} model "
                          f"{fields.get('model', '?')} stepping {fields.get('stepping', '?')}")
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        info["cpu_capability"] = None
    info["cores"] = os.cpu_count()
    info["torch"] = torch.__version__
    info["cuda_device"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return info
