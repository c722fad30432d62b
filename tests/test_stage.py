"""StageRunner in the multi-process runtime's order: the action lists run one action at a time
equal the simulator bit for bit, no stage holds more weight versions than the schedule keeps,
and checkpoints (drained or with forwards in flight) resume exactly.

    python -m pytest tests/test_stage.py -q

The simulator runs microbatch after microbatch; the runtime runs each stage's action list
(pipenag.schedules) as soon as inputs arrive. docs/schedules.md explains why both give the
same numbers; here the lists run in one process in dependency order (run_action_lists).
"""

import io

import pytest
import torch
from helpers import SEED, assert_same_weights, microbatches, stage_params
from helpers import tiny_model_cfg as tiny_cfg

from pipenag.engine.sim import Simulator
from pipenag.engine.stage import StageRunner
from pipenag.model import lm_loss
from pipenag.schedules import Schedule
from pipenag.split import build_stages



def held_versions(runner: StageRunner) -> int:
    """Distinct weight versions the runner holds: its stashed snapshots plus the live weights
    when no snapshot is a copy of them."""
    return len(set(runner.snapshots) | {runner.version})


class CheckingList(list):
    """A record list that checks the held versions of every runner at every action."""

    def __init__(self):
        super().__init__()
        self.runners, self.max_held = [], {}

    def append(self, item):
        super().append(item)
        for r in self.runners:
            n = held_versions(r)
            assert n <= r.schedule.versions_kept(r.stage_idx), (r.stage_idx, n, item)
            self.max_held[r.stage_idx] = max(self.max_held.get(r.stage_idx, 0), n)


def make_sim(name, K, M, stash, predict=False, seed=SEED, record=None, lr_fn=None, forward_prediction=0.0):
    """A Simulator on fresh stages (AdamW, grad clip, PipeMare and forward-prediction options);
    its runners also run the action lists in run_action_lists."""
    stages = build_stages(tiny_cfg(), K, seed)
    opts = [torch.optim.AdamW(s.parameters(), lr=1e-2, weight_decay=0.01) for s in stages]
    sim = Simulator(stages, lm_loss, opts, schedule=name, stash=stash, num_microbatches=M,
                    lr_fns=None if lr_fn is None else [lr_fn] * K, grad_clip=0.5,
                    predict=predict, predict_decay=0.8, forward_prediction=forward_prediction, record=record)
    return stages, sim


def run_action_lists(schedule, runners, batches, num_updates, start_update=0, check=None):
    """Execute each stage's action list in order, an action as soon as its input is there
    (the multi-process runtime's order, in one process). Returns the mean loss per update."""
    K, M = schedule.num_stages, schedule.num_microbatches
    lists = schedule.all_actions(num_updates, start_update)
    pos = [0] * K
    inbox = {}
    mb_loss = {}
    while any(pos[k] < len(lists[k]) for k in range(K)):
        progressed = False
        for k in range(K):
            while pos[k] < len(lists[k]):
                a, r = lists[k][pos[k]], runners[k]
                if a.kind == "F":
                    x = batches[a.index][0] if k == 0 else inbox.pop((k, "F", a.index), None)
                    if x is None:
                        break
                    out = r.forward(a.index, x, batches[a.index][1] if r.is_last else None)
                    if r.is_last:
                        mb_loss[a.index] = float(out)
                    else:
                        inbox[(k + 1, "F", a.index)] = out
                elif a.kind == "B":
                    g = None if r.is_last else inbox.pop((k, "B", a.index), None)
                    if g is None and not r.is_last:
                        break
                    gin = r.backward(a.index, g)
                    if k > 0:
                        inbox[(k - 1, "B", a.index)] = gin
                else:
                    r.step()
                if check is not None:
                    check(runners)
                pos[k] += 1
                progressed = True
        assert progressed, "deadlock"
    assert not inbox
    return [sum(mb_loss[j] for j in range(u * M, (u + 1) * M)) / M
            for u in range(start_update, num_updates)]


LIST_CASES = [
    ("pipedream", 4, 1, True, False), ("pipedream", 4, 1, False, False),
    ("pipedream", 3, 1, False, True), ("2bw", 2, 2, True, False), ("2bw", 3, 3, False, False),
    ("1f1b", 3, 3, True, False), ("gpipe", 2, 2, True, False),
]


@pytest.mark.parametrize("name,K,M,stash,predict", LIST_CASES)
def test_action_lists_in_runtime_order_equal_simulator(name, K, M, stash, predict):
    num_updates = 8  # long enough for the steady state of 4 stages
    batches = microbatches(num_updates * M, seed=5)
    record = CheckingList()
    stages, listed = make_sim(name, K, M, stash, predict, record=record)
    record.runners = listed.runners
    sim_stages, sim = make_sim(name, K, M, stash, predict)
    sim_losses = [sim.step(batches[u * M:(u + 1) * M]) for u in range(num_updates)]
    schedule = sim.schedule

    steady = {}  # most versions held while the stage still has forwards to run

    def check(rs):
        for r in rs:
            n = held_versions(r)
            assert n <= schedule.versions_kept(r.stage_idx)
            if r.next_forward < num_updates * M:
                steady[r.stage_idx] = max(steady.get(r.stage_idx, 0), n)

    losses = run_action_lists(schedule, listed.runners, batches, num_updates, check=check)
    assert losses == sim_losses
    assert_same_weights(stage_params(stages), stage_params(sim_stages))
    if not stash and name == "pipedream":
        # Without stashing a pipedream stage needs no old version in runtime order (the forward
        # after a step uses the new weights), so it holds none; only the last tau_k updates of
        # a run keep the versions that a continuation would redo its first forwards with.
        # (2bw's forwards read the previous version by design: 2 versions even without stash.)
        assert all(n == 1 for n in steady.values()), steady
    else:
        assert steady == {k: schedule.versions_kept(k) for k in range(K)}


@pytest.mark.parametrize("name,K,M,stash,predict", [
    ("pipedream", 4, 1, True, False), ("pipedream", 4, 1, False, False), ("pipedream", 3, 1, False, True),
    ("2bw", 3, 3, True, False), ("2bw", 2, 2, False, False), ("gpipe", 3, 2, True, False),
])
def test_simulator_versions_held_and_resume(name, K, M, stash, predict):
    """At every action no stage holds more than versions_kept versions (pipedream: tau_k + 1,
    2bw: 2, gpipe/1f1b: 1; counted with the live weights). A state dict taken mid-run, saved
    and loaded into a simulator on fresh stages, continues bit for bit."""
    n1, n2 = 3, 4
    batches = microbatches((n1 + n2) * M, seed=6)
    lr_fn = lambda t: 1e-2 / (1 + 0.1 * t)  # noqa: E731
    record = CheckingList()
    stages, sim = make_sim(name, K, M, stash, predict, record=record, lr_fn=lr_fn)
    record.runners = sim.runners
    for u in range(n1):
        sim.step(batches[u * M:(u + 1) * M])
    buf = io.BytesIO()
    torch.save(sim.state_dict(), buf)
    losses_a = [sim.step(batches[u * M:(u + 1) * M]) for u in range(n1, n1 + n2)]
    for k, n in record.max_held.items():
        assert n == Schedule(name, K, M).versions_kept(k), (k, n)  # the bound is reached

    buf.seek(0)
    # different init: everything must come from the state
    stages_b, sim_b = make_sim(name, K, M, stash, predict, seed=SEED + 1, lr_fn=lr_fn)
    sim_b.load_state_dict(torch.load(buf, weights_only=True))
    assert sim_b.num_updates == n1
    losses_b = [sim_b.step(batches[u * M:(u + 1) * M]) for u in range(n1, n1 + n2)]
    assert losses_b == losses_a
    assert_same_weights(stage_params(stages_b), stage_params(stages))


@pytest.mark.parametrize("name,K,M,stash,predict", [
    ("pipedream", 4, 1, True, False), ("pipedream", 3, 1, False, True), ("2bw", 2, 2, True, False),
])
def test_runtime_order_resume_with_start_update(name, K, M, stash, predict):
    """Runners that ran the lists of updates [0, n1), saved, and loaded into fresh runners that
    run the lists of [n1, n) (redoing the forwards that were in flight) == the simulator."""
    n1, n = 3, 6
    batches = microbatches(n * M, seed=7)
    sim_stages, sim = make_sim(name, K, M, stash, predict)
    sim_losses = [sim.step(batches[u * M:(u + 1) * M]) for u in range(n)]

    _, first_sim = make_sim(name, K, M, stash, predict)
    first = run_action_lists(sim.schedule, first_sim.runners, batches, n1)
    assert first == sim_losses[:n1]
    buf = io.BytesIO()
    torch.save([r.state_dict() for r in first_sim.runners], buf)
    buf.seek(0)
    stages_b, sim_b = make_sim(name, K, M, stash, predict, seed=SEED + 1)
    for r, s in zip(sim_b.runners, torch.load(buf, weights_only=True)):
        r.load_state_dict(s)
    rest = run_action_lists(sim.schedule, sim_b.runners, batches, n, start_update=n1)
    assert rest == sim_losses[n1:]
    assert_same_weights(stage_params(stages_b), stage_params(sim_stages))


@pytest.mark.parametrize("name,K,M,stash,fp", [("pipedream", 4, 1, True, 0.0), ("2bw", 3, 3, True, 0.0),
                                                ("2bw", 2, 2, False, 0.0), ("pipedream", 3, 1, False, 0.0),
                                                ("pipedream", 4, 1, True, 1.0), ("2bw", 3, 3, True, 1.0)])
def test_runtime_order_resume_mid_flight(name, K, M, stash, fp):
    """Each stage saves right after its step n1 while later forwards are in flight (no drain),
    as the runtime does with stashing; fresh runners redo those forwards from the stashed
    versions and end bit-identical. Pipedream without stashing holds no old version in this
    order, so its state_dict refuses (the runtime drains instead). fp: forward weight
    prediction, whose redone forwards also read the version before theirs."""
    n1, n = 3, 7
    batches = microbatches(n * M, seed=8)
    stages, sim = make_sim(name, K, M, stash, forward_prediction=fp)
    saved, refused = {}, []

    def capture(rs):
        for r in rs:
            if r.version == n1 and r.stage_idx not in saved:
                try:
                    buf = io.BytesIO()
                    torch.save(r.state_dict(), buf)
                    saved[r.stage_idx] = buf
                except RuntimeError as e:
                    assert "drain" in str(e)
                    saved[r.stage_idx] = None
                    refused.append(r.stage_idx)

    losses = run_action_lists(sim.schedule, sim.runners, batches, n, check=capture)
    if name == "pipedream" and not stash:
        assert sorted(refused) == list(range(K - 1))  # every stage with a delay
        return
    assert not refused
    stages_b, sim_b = make_sim(name, K, M, stash, seed=SEED + 1, forward_prediction=fp)
    for k, r in enumerate(sim_b.runners):
        saved[k].seek(0)
        r.load_state_dict(torch.load(saved[k], weights_only=True))
    rest = run_action_lists(sim.schedule, sim_b.runners, batches, n, start_update=n1)
    assert rest == losses[n1:]
    assert_same_weights(stage_params(stages_b), stage_params(stages))


def test_gpipe_and_1f1b_hold_no_copies():
    """Synchronous schedules never clone weights (one version, the live one)."""
    _, sim = make_sim("1f1b", 2, 2, True)
    run_action_lists(sim.schedule, sim.runners, microbatches(4), 2)
    assert all(not r.snapshots for r in sim.runners)


@pytest.mark.parametrize("name,K,M,stash", [("pipedream", 4, 1, True), ("pipedream", 3, 1, False),
                                             ("2bw", 3, 3, True)])
def test_forward_prediction_in_runtime_order(name, K, M, stash):
    """Forward weight prediction reads two stored versions: in the runtime's order the lists
    give the simulator's numbers bit for bit, a stage holds at most one version more than the
    schedule keeps (w_{v-1}), and a run checkpointed after update n1 (drained when stash is
    off, as the runtime does) and continued by fresh runners ends with the same numbers."""
    n1, n = 3, 7
    batches = microbatches(n * M, seed=9)
    sim_stages, sim = make_sim(name, K, M, stash, forward_prediction=1.0)
    sim_losses = [sim.step(batches[u * M:(u + 1) * M]) for u in range(n)]
    schedule = sim.schedule

    def check(rs):
        for r in rs:
            assert held_versions(r) <= schedule.versions_kept(r.stage_idx) + 1, (r.stage_idx, r.snapshots.keys())

    _, first = make_sim(name, K, M, stash, forward_prediction=1.0)
    assert run_action_lists(schedule, first.runners, batches, n1, check=check) == sim_losses[:n1]
    buf = io.BytesIO()
    torch.save([r.state_dict() for r in first.runners], buf)
    buf.seek(0)
    stages_b, second = make_sim(name, K, M, stash, seed=SEED + 1, forward_prediction=1.0)
    for r, s in zip(second.runners, torch.load(buf, weights_only=True)):
        r.load_state_dict(s)
    rest = run_action_lists(schedule, second.runners, batches, n, start_update=n1, check=check)
    assert rest == sim_losses[n1:]
    assert_same_weights(stage_params(stages_b), stage_params(sim_stages))


def test_forward_prediction_simulator_state_dict_round_trip():
    n1, n2 = 3, 4
    batches = microbatches(n1 + n2, seed=10)
    stages, sim = make_sim("pipedream", 3, 1, True, forward_prediction=0.5)
    for u in range(n1):
        sim.step(batches[u:u + 1])
    buf = io.BytesIO()
    torch.save(sim.state_dict(), buf)
    losses_a = [sim.step(batches[u:u + 1]) for u in range(n1, n1 + n2)]
    buf.seek(0)
    stages_b, sim_b = make_sim("pipedream", 3, 1, True, seed=SEED + 1, forward_prediction=0.5)
    sim_b.load_state_dict(torch.load(buf, weights_only=True))
    assert [sim_b.step(batches[u:u + 1]) for u in range(n1, n1 + n2)] == losses_a
    assert_same_weights(stage_params(stages_b), stage_params(stages))
