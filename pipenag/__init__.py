"""pipenag: asynchronous pipeline-parallel training with the Nesterov look-ahead correction.

    pipenag train --config configs/tiny.toml

    from pipenag import Schedule, Simulator, build_stages, DelayedNesterov, lm_loss
    stages = build_stages(model_cfg, num_stages=4, seed=0)        # a GPT cut into 4 stage modules
    sim = Simulator(stages, lm_loss, [DelayedNesterov(s.parameters(), lr=0.1) for s in stages],
                    Schedule("pipedream", 4, 1))
    loss = sim.step([(x, y)])

The names below are the library's surface (`__all__`); they are imported on first use (PEP 562),
so that `pipenag --help` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_EXPORTS = {
    # config
    "Config": "pipenag.config",
    "load_config": "pipenag.config",
    # model and split
    "GPT": "pipenag.model",
    "lm_loss": "pipenag.model",
    "build_stages": "pipenag.split",
    "split_gpt": "pipenag.split",
    "partition_layers": "pipenag.split",
    # schedules and engines
    "Schedule": "pipenag.schedules",
    "Simulator": "pipenag.engine.sim",
    "StageRunner": "pipenag.engine.stage",
    "make_runner": "pipenag.engine.stage",
    # optimizers
    "DelayedNesterov": "pipenag.optim",
    "BasisRotation": "pipenag.optim",
    "CompositeOptimizer": "pipenag.optim",
    "build_optimizer": "pipenag.optim",
    "build_muon": "pipenag.optim",
    # methods, whole runs
    "METHODS": "pipenag.methods",
    "resolve": "pipenag.methods",
    "build_pipeline": "pipenag.build",
    "train_sim": "pipenag.train",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from pipenag.build import build_pipeline
    from pipenag.config import Config, load_config
    from pipenag.engine.sim import Simulator
    from pipenag.engine.stage import StageRunner, make_runner
    from pipenag.methods import METHODS, resolve
    from pipenag.model import GPT, lm_loss
    from pipenag.optim import BasisRotation, CompositeOptimizer, DelayedNesterov, build_muon, build_optimizer
    from pipenag.schedules import Schedule
    from pipenag.split import build_stages, partition_layers, split_gpt
    from pipenag.train import train_sim


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipenag' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(list(globals()) + __all__)
