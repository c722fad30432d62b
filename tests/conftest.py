"""Shared test set-up: one torch thread per process, the `slow` tier, common fixtures.

    python -m pytest -q                   # everything (the README's command, what CI runs)
    python -m pytest -q -m "not slow"     # the fast tier: no process spawning, no training runs
"""

from __future__ import annotations

import os

import pytest
import torch

# One intra-op thread in the test process and in every worker it forks: the suite's numbers
# do not depend on the machine's core count, and parallel workers do not oversubscribe.


@pytest.fixture
def tiny_config(tmp_path):
    """tiny_config(*overrides, out=None) -> a Config of configs/tiny.toml cut to a few updates
    (see helpers.FAST), writing to tmp_path (or `out`)."""
    from helpers import tiny_config as make

    def factory(*extra: str, out=None):
        return make(out if out is not None else tmp_path / "run", *extra)

    return factory

# The BPE tokenizer (HF tokenizers) warns when a process that used it forks, as the runtime's
# launcher does in these tests; its thread pool is not used after a fork here.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
