"""Helpers shared by the test modules (tests import this, never each other).

    from helpers import TINY, tiny_config, assert_same_records
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from pipenag.checkpoint import SIM_PART, CheckpointStore, stage_part
from pipenag.config import Config, ModelConfig, load_config
from pipenag.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.toml")
# configs/tiny.toml cut to seconds: a 100k-character corpus, one thread, no progress lines.
FAST = ["--data.max_chars=100000", "--run.threads=1", "--run.progress=false"]


def tiny_config(out: str | Path, *extra: str) -> Config:
    """configs/tiny.toml with FAST and `extra` overrides, writing to `out`."""
    return load_config(TINY, FAST + [f"--run.out_dir={out}", *extra])


def subprocess_env(**extra: str) -> dict:
    """The environment for a `python -m pipenag ...` child: this checkout first on the path,
    one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def children_of(pid: int) -> set[int]:
    """Pids of the processes whose parent is `pid`, zombies included (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return set(found)


RECORD_KEYS = ("step", "tokens", "train_loss", "lr", "val_loss")


def assert_same_records(a: list[dict], b: list[dict]) -> None:
    """Two runs' metrics.jsonl records agree exactly on every number but the wall time."""
    assert [{k: r.get(k) for k in RECORD_KEYS} for r in a] == [{k: r.get(k) for k in RECORD_KEYS} for r in b]


def assert_same_state_dicts(a: list[dict], b: list[dict]) -> None:
    """Per-stage module state dicts are equal bit for bit."""
    assert len(a) == len(b)
    for k, (sa, sb) in enumerate(zip(a, b)):
        assert sa.keys() == sb.keys()
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (k, name)


def sim_weights(out: str | Path, update: int) -> list[dict]:
    """The per-stage module state dicts of a simulator run's checkpoint of `update`."""
    state = CheckpointStore(out, [SIM_PART]).load(update, SIM_PART)
    return [s["module"] for s in state["sim"]["stages"]]


def dist_weights(out: str | Path, update: int, num_stages: int) -> list[dict]:
    """The per-stage module state dicts of a runtime run's checkpoints of `update`."""
    store = CheckpointStore(out, [stage_part(k) for k in range(num_stages)])
    return [store.load(update, stage_part(k))["runner"]["module"] for k in range(num_stages)]


DIST_BASE = ["--data.max_chars=60000", "--train.steps=6", "--train.eval_every=3", "--train.eval_batches=2",
             "--dist.timeout_s=60"]


def make_dist_cfg(out: Path, method: str, K: int, *extra: str) -> Config:
    """A tiny config for runtime tests: 6 updates, validation after 3 and 6, K stages."""
    return tiny_config(out, *DIST_BASE, f"--pipeline.method={method}", f"--pipeline.num_stages={K}", *extra)


def complete_updates(out: Path, K: int) -> list[int]:
    """The complete checkpoint sets of a K-stage runtime run."""
    return CheckpointStore(out, [stage_part(k) for k in range(K)]).complete_updates()


def run_dist_against_sim(tmp_path, method, K, extra, val_steps):
    """Train with the simulator and with the dist engine; assert every record (losses, lrs,
    validation losses at `val_steps`) and the final weights of every stage are equal.
    Returns (run folder, summary, child pids before the run)."""
    records, weights = sim_reference(make_dist_cfg(tmp_path / f"sim-{method}-{K}", method, K, *extra))
    from pipenag.runtime.launch import train_dist

    cfg = make_dist_cfg(tmp_path / "dist", method, K, "--train.engine=dist", *extra)
    before = children_of(os.getpid())
    assert train_dist(cfg, start_method="fork") == 0
    out = Path(cfg.run.out_dir)
    got = read_metrics(out)
    assert_same_records(got, records)
    assert [r["step"] for r in got if "val_loss" in r] == val_steps
    assert_same_state_dicts(dist_weights(out, cfg.train.steps, K), weights)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "ok"
    assert summary["val_loss"] == records[-1]["val_loss"]
    return out, summary, before


def sim_reference(cfg: Config) -> tuple[list[dict], list[dict]]:
    """Train `cfg` with the simulator: (metrics records, final per-stage weights)."""
    from pipenag.train import train_sim

    summary = train_sim(cfg)
    assert summary["status"] == "ok"
    return read_metrics(cfg.run.out_dir), sim_weights(cfg.run.out_dir, cfg.train.steps)


def assert_like_uninterrupted(out: Path, reference, steps: int, num_stages: int) -> dict:
    """A restarted runtime run in `out` ends like the uninterrupted one (`reference`: records
    and final weights): each update recorded once, the same numbers bit for bit. Returns the
    summary."""
    records, weights = reference
    got = read_metrics(out)
    assert [r["step"] for r in got] == list(range(1, steps + 1))  # each update exactly once
    assert_same_records(got, records)
    assert_same_state_dicts(dist_weights(out, steps, num_stages), weights)
    summary = json.loads((Path(out) / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["val_loss"] == records[-1]["val_loss"]
    return summary


def train_random_tokens(cfg: Config, num_updates: int = 4, seed: int = 0, vocab_size: int = 32):
    """Train cfg's pipeline with the simulator on random (2, 8) token microbatches: (losses,
    final per-stage state dicts)."""
    from pipenag.build import build_pipeline

    parts = build_pipeline(cfg, vocab_size=vocab_size)
    sim = parts.simulator()
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(num_updates):
        mbs = [(torch.randint(0, vocab_size, (2, 8), generator=g), torch.randint(0, vocab_size, (2, 8), generator=g))
               for _ in range(sim.num_microbatches)]
        losses.append(sim.step(mbs))
    return losses, [{k: v.clone() for k, v in s.state_dict().items()} for s in parts.stages]


# -- a tiny GPT for the engine-level equivalence tests ------------------------------------------

SEED = 1234


def tiny_model_cfg() -> ModelConfig:
    """4 blocks, width 32, context 16, vocabulary 64."""
    return ModelConfig(n_layer=4, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)


def microbatches(n: int, B: int = 4, T: int = 16, seed: int = 0) -> list:
    """n random (x, y) token microbatches of tiny_model_cfg's vocabulary."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (B, T), generator=g), torch.randint(0, 64, (B, T), generator=g))
            for _ in range(n)]


def stage_params(stages) -> dict:
    """Whole-model name -> parameter, over all stages."""
    return {n: p for s in stages for n, p in s.named_model_parameters()}


def assert_same_weights(params_a: dict, params_b: dict) -> None:
    """Two name -> tensor dicts are equal bit for bit."""
    assert params_a.keys() == params_b.keys()
    for name in params_a:
        assert torch.equal(params_a[name], params_b[name]), name


def assert_resume_is_bit_identical(tmp_path: Path, monkeypatch, extra: list[str], stop_at: int = 7) -> None:
    """A simulator run of tiny_config(*extra) stopped after `stop_at` updates and resumed with
    --resume ends with the records of the uninterrupted run, bit for bit."""
    import pytest

    from pipenag.train import train_main, train_sim

    train_sim(tiny_config(tmp_path / "straight", *extra))
    with simulator_stopped_at(monkeypatch, stop_at), pytest.raises(Interrupt):
        train_sim(tiny_config(tmp_path / "cut", *extra))
    assert train_main(None, resume=str(tmp_path / "cut")) == 0
    assert_same_records(read_metrics(tmp_path / "cut"), read_metrics(tmp_path / "straight"))


class Interrupt(Exception):
    """Raised by simulator_stopped_at: a crash in the middle of a run."""


@contextlib.contextmanager
def simulator_stopped_at(monkeypatch, num_updates: int):
    """Inside the block, Simulator.step raises Interrupt when `num_updates` updates are done
    (the run stops during update num_updates + 1, after its checkpoints and records so far)."""
    from pipenag.engine.sim import Simulator

    step = Simulator.step

    def failing_step(self, batch):
        if self.num_updates == num_updates:
            raise Interrupt
        return step(self, batch)

    monkeypatch.setattr(Simulator, "step", failing_step)
    try:
        yield
    finally:
        monkeypatch.setattr(Simulator, "step", step)
