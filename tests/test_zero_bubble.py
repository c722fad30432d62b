"""Zero bubble ZB-H1: the split backward (B = input gradient, W = weight gradient) in the action
lists, the time model, both engines, and its numbers, which equal gpipe's bit for bit.

    python -m pytest tests/test_zero_bubble.py -q
"""

import io
import random
from pathlib import Path

import pytest
import torch
from helpers import (SEED, assert_same_records, assert_same_state_dicts, assert_same_weights, complete_updates,
                     dist_weights, make_dist_cfg, microbatches, run_dist_against_sim, stage_params)
from helpers import tiny_model_cfg as tiny_cfg

from pipenag.cli import main as cli_main
from pipenag.config import load_config
from pipenag.engine.sim import Simulator
from pipenag.metrics import read_metrics
from pipenag.methods import resolve
from pipenag.model import lm_loss
from pipenag.schedules import Action, Schedule
from pipenag.split import build_stages
from pipenag.timing import simulate

CASES = [(K, M) for K in range(1, 6) for M in (1, 2, 3, 5, 8)]
RANGES = [(0, 1), (0, 3), (1, 3), (2, 4)]  # (start_update, num_updates)


# -- the lists ---------------------------------------------------------------------------------


@pytest.mark.parametrize("K,M", CASES)
def test_lists_run_every_pass_once_in_order(K, M):
    s = Schedule("zb-h1", K, M)
    assert s.splits_backward and not s.asynchronous
    for start, n in RANGES:
        mbs = range(start * M, n * M)
        for k in range(K):
            acts = s.actions(k, n, start)
            pos = {(a.kind, a.index): i for i, a in enumerate(acts)}
            assert len(pos) == len(acts)  # nothing twice
            for kind in "FBW":
                assert sorted(a.index for a in acts if a.kind == kind) == list(mbs), (k, kind)
            assert [a.index for a in acts if a.kind == "S"] == list(range(start, n))
            # W's in microbatch order: the weight gradient is summed in gpipe's order
            assert [a.index for a in acts if a.kind == "W"] == list(mbs)
            for j in mbs:
                assert pos[("F", j)] < pos[("B", j)] < pos[("W", j)], (k, j)
            for u in range(start, n):
                last_w = max(pos[("W", j)] for j in range(u * M, (u + 1) * M))
                assert pos[("S", u)] > last_w
                # a flush: nothing of update u + 1 before S(u)
                assert all(pos[(kind, j)] > pos[("S", u)] for kind in "FBW" for j in range((u + 1) * M, n * M))


@pytest.mark.parametrize("K,M", CASES)
def test_memory_is_1f1b_memory(K, M):
    """Between F and B at most min(K - k, M) microbatches, as 1F1B; between F and W (what a W
    still needs) at most min(K, M) at every stage (the paper: every stage holds the same number)."""
    s, ref = Schedule("zb-h1", K, M), Schedule("1f1b", K, M)
    for k in range(K):
        def most(acts, done):
            live, top = 0, 0
            for a in acts:
                live += 1 if a.kind == "F" else -1 if a.kind == done else 0
                top = max(top, live)
            return top
        assert most(s.actions(k, 3), "B") == most(ref.actions(k, 3), "B") == min(K - k, M)
        assert most(s.actions(k, 3), "W") <= min(K, M)


def test_versions_are_gpipe_versions():
    s, g = Schedule("zb-h1", 3, 4), Schedule("gpipe", 3, 4)
    for k in range(3):
        assert s.versions_kept(k) == 1 and s.staleness(k) == 0
        for j in range(12):
            assert s.forward_version(k, j) == g.forward_version(k, j) == j // 4
            assert s.backward_version(k, j, False) == s.backward_version(k, j, True) == j // 4


def test_action_text_form():
    assert str(Action(2, "W", 0)) == "2W0"
    assert Action.parse("2W0") == Action(2, "W", 0)
    assert Action.parse("12W345") == Action(12, "W", 345)
    for k in range(4):
        for a in Schedule("zb-h1", 4, 5).actions(k, 3):
            assert Action.parse(str(a)) == a
    with pytest.raises(ValueError, match="STAGE"):
        Action.parse("2X0")


def test_pinned_lists():
    s = Schedule("zb-h1", 3, 4)
    assert " ".join(map(str, s.actions(0, 1))) == "0F0 0F1 0F2 0B0 0W0 0F3 0B1 0W1 0B2 0W2 0B3 0W3 0S0"
    assert " ".join(map(str, s.actions(1, 1))) == "1F0 1F1 1B0 1F2 1B1 1W0 1F3 1B2 1W1 1B3 1W2 1W3 1S0"
    assert " ".join(map(str, s.actions(2, 1))) == "2F0 2B0 2F1 2B1 2F2 2B2 2W0 2F3 2B3 2W1 2W2 2W3 2S0"


# -- the time model ------------------------------------------------------------------------------


@pytest.mark.parametrize("K,M", CASES)
def test_no_deadlock_with_random_times(K, M):
    rng = random.Random(K * 100 + M)
    s = Schedule("zb-h1", K, M)

    def times():
        return [rng.uniform(0.1, 3.0) for _ in range(K)]

    for _ in range(3):
        tl = simulate(s, 3, times(), times(), times(), latency=rng.uniform(0, 2), transfer_time=rng.uniform(0, 2),
                      weight_time=times())
        assert len(tl.events) == sum(len(s.actions(k, 3)) for k in range(K))
        end = {(e.action.stage, e.action.kind, e.action.index): e.end for e in tl.events}
        for e in tl.events:
            a = e.action
            if a.kind == "F" and a.stage > 0:
                assert e.start >= end[(a.stage - 1, "F", a.index)]
            if a.kind == "B" and a.stage < K - 1:
                assert e.start >= end[(a.stage + 1, "B", a.index)]
            if a.kind == "W":
                assert e.start >= end[(a.stage, "B", a.index)]


def test_bubble_is_smaller_than_1f1b_with_the_same_work():
    """K = 4, M = 8: ZB-H1 with F = B = W = 1 against 1F1B with F = 1, B = 2 (the same work,
    3 M per stage): the bubble drops from (K-1)(F+B+W) = 9 to (K-1)(F+B-W) = 3."""
    K, M = 4, 8
    zb = simulate(Schedule("zb-h1", K, M), 1, 1.0, 1.0, weight_time=1.0)
    ref = simulate(Schedule("1f1b", K, M), 1, 1.0, 2.0)
    assert ref.makespan - 3 * M == (K - 1) * 3
    assert zb.makespan - 3 * M == (K - 1) * (1 + 1 - 1)
    assert zb.makespan < ref.makespan
    assert all(b == 3 * M for b in zb.busy)


@pytest.mark.parametrize("K", [2, 3, 5, 6])
@pytest.mark.parametrize("t", [1.0, 2.5])
def test_bubble_formula_with_equal_times(K, t):
    """With F = B = W = t the makespan is M (F + B + W) + (K - 1)(F + B - W) for M >= K (with
    fewer, K - M slots more: the last stage's cool-down W's run past stage 0's end)."""
    for M in (K, K + 1, 2 * K + 1):
        tl = simulate(Schedule("zb-h1", K, M), 1, t, t, weight_time=t)
        assert tl.makespan == pytest.approx(3 * M * t + (K - 1) * t)


def test_one_backward_time_is_split_in_half():
    """Without weight_time, backward_time is the whole backward: B and W get half each."""
    s = Schedule("zb-h1", 3, 4)
    assert simulate(s, 2, 1.0, 2.0).makespan == simulate(s, 2, 1.0, 1.0, weight_time=1.0).makespan
    # ... and the schedules without W are unchanged by weight_time
    g = Schedule("1f1b", 3, 4)
    assert simulate(g, 2, 1.0, 2.0, weight_time=5.0).makespan == simulate(g, 2, 1.0, 2.0).makespan


def test_cli_grid_shows_w(capsys):
    assert cli_main(["schedule", "--name", "zb-h1", "--stages", "4", "--microbatches", "8", "--updates", "1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    grid = [line.split()[2:] for line in lines if line.startswith("stage ")][:4]
    assert grid[3][:9] == [".", ".", ".", "F0", "B0", "F1", "B1", "F2", "B2"]
    assert grid[0][:11] == ["F0", "F1", "F2", "F3", ".", ".", ".", "B0", "W0", "F4", "B1"]
    assert len(grid[0]) == 27  # M (F + B + W) + (K - 1)(F + B - W), stage 0 ends last
    assert all(sum(c.startswith("W") for c in row) == 8 for row in grid)
    assert "W = weight gradient" in lines[0]


# -- the engines ---------------------------------------------------------------------------------


def make_sim(name, K, M, stash=True, seed=SEED, delay_compensation=0.0):
    stages = build_stages(tiny_cfg(), K, seed)
    opts = [torch.optim.AdamW(s.parameters(), lr=1e-2, weight_decay=0.01) for s in stages]
    sim = Simulator(stages, lm_loss, opts, schedule=name, stash=stash, num_microbatches=M, grad_clip=0.5,
                    delay_compensation=delay_compensation)
    return stages, sim


def train(sim, batches, num_updates):
    M = sim.num_microbatches
    return [sim.step(batches[u * M:(u + 1) * M]) for u in range(num_updates)]


@pytest.mark.parametrize("K,M,stash", [(1, 2, True), (2, 3, True), (3, 2, False), (4, 3, True)])
def test_simulator_equals_gpipe_bit_for_bit(K, M, stash):
    """The split backward takes the same weight gradients as the whole backward, and the W's
    add them in microbatch order: zb-h1's losses and weights are gpipe's exactly. (Stash off
    changes nothing: a synchronous backward reads the forward's version, so the graph is kept.)"""
    batches = microbatches(2 * M, seed=2)
    ref_stages, ref = make_sim("gpipe", K, M)
    stages, sim = make_sim("zb-h1", K, M, stash)
    assert train(sim, batches, 2) == train(ref, batches, 2)
    assert_same_weights(stage_params(stages), stage_params(ref_stages))


def test_split_backward_equals_backward_on_one_stage():
    """backward_input leaves .grad alone and returns backward()'s input gradient; backward_weight
    then adds backward()'s weight gradient, bit for bit."""
    x = torch.randn(4, 16, 32)
    grads = {}
    for name in ("gpipe", "zb-h1"):
        _, sim = make_sim(name, 3, 2)
        r = sim.runners[1]
        r.forward(0, x)
        g_out = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))
        if name == "gpipe":
            g_in = r.backward(0, g_out)
        else:
            g_in = r.backward_input(0, g_out)
            assert all(p.grad is None for p in r.params)
            r.backward_weight(0)
            assert not r.awaiting_weight and not r.pending
        grads[name] = (g_in, [p.grad for p in r.params])
    assert torch.equal(grads["gpipe"][0], grads["zb-h1"][0])
    assert all(torch.equal(a, b) for a, b in zip(grads["gpipe"][1], grads["zb-h1"][1]))


def test_split_backward_without_a_graph_is_a_clear_error():
    """A recompute backward (stash off on an asynchronous schedule) keeps no graph to split."""
    _, sim = make_sim("pipedream", 2, 1, stash=False)
    r = sim.runners[0]
    r.forward(1, microbatches(1)[0][0])  # forward version 0, backward (stash off) version 1
    with pytest.raises(ValueError, match="split backward"):
        r.backward_input(1, torch.zeros(4, 16, 32))


def run_lists(schedule, runners, batches, num_updates, start_update=0, check=None, w_first=False):
    """Each stage's action list in order, an action as soon as its input is there: the
    runtime's order in one process. w_first: run a stage's pending W's as early as possible
    (right after their B), another order with the same W order. Returns the mean loss per update."""
    K, M = schedule.num_stages, schedule.num_microbatches
    lists = schedule.all_actions(num_updates, start_update)
    if w_first:
        lists = [[a for a in acts if a.kind != "W"] for acts in lists]
        lists = [[b for a in acts for b in ([a, Action(a.stage, "W", a.index)] if a.kind == "B" else [a])]
                 for acts in lists]
    pos, inbox, mb_loss = [0] * K, {}, {}
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
                    g_in = r.backward_input(a.index, g)
                    if k > 0:
                        inbox[(k - 1, "B", a.index)] = g_in
                elif a.kind == "W":
                    r.backward_weight(a.index)
                else:
                    r.step()
                    if check is not None:
                        check(r)
                pos[k] += 1
                progressed = True
        assert progressed, "deadlock"
    assert not inbox
    return [sum(mb_loss[j] for j in range(u * M, (u + 1) * M)) / M for u in range(start_update, num_updates)]


@pytest.mark.parametrize("K,M,w_first", [(3, 3, False), (4, 2, False), (3, 3, True)])
def test_runtime_order_equals_simulator(K, M, w_first):
    """The lists run in dependency order (B's and W's of other microbatches interleaved as in
    a real pipeline, or every W right after its B) give the simulator's numbers bit for bit:
    only the W order within a stage and update decides the sum, and it is microbatch order."""
    n = 2
    batches = microbatches(n * M, seed=4)
    stages, listed = make_sim("zb-h1", K, M)
    sim_stages, sim = make_sim("zb-h1", K, M)
    assert run_lists(listed.schedule, listed.runners, batches, n, w_first=w_first) == train(sim, batches, n)
    assert_same_weights(stage_params(stages), stage_params(sim_stages))
    assert all(not r.snapshots and not r.pending and not r.awaiting_weight for r in listed.runners)


def test_runtime_order_resume_after_a_step():
    """Each stage saves right after its step n1 (no drain: the next update's forwards may
    already be running elsewhere); fresh runners continue bit-identically."""
    K, M, n1, n = 3, 2, 1, 3
    batches = microbatches(n * M, seed=6)
    stages, sim = make_sim("zb-h1", K, M)
    saved = {}

    def capture(r):
        if r.version == n1:
            buf = io.BytesIO()
            torch.save(r.state_dict(), buf)
            saved[r.stage_idx] = buf

    losses = run_lists(sim.schedule, sim.runners, batches, n, check=capture)
    stages_b, sim_b = make_sim("zb-h1", K, M, seed=SEED + 1)
    for k, r in enumerate(sim_b.runners):
        saved[k].seek(0)
        r.load_state_dict(torch.load(saved[k], weights_only=True))
    assert run_lists(sim.schedule, sim_b.runners, batches, n, start_update=n1) == losses[n1:]
    assert_same_weights(stage_params(stages_b), stage_params(stages))


def test_method_resolves_to_the_schedule(tmp_path):
    from helpers import TINY
    cfg = load_config(TINY, [f"--run.out_dir={tmp_path}", "--pipeline.method=zb-h1", "--pipeline.num_stages=3"])
    r = resolve(cfg)
    assert (r.schedule.name, r.schedule.num_microbatches, r.stash, r.optimizer) == ("zb-h1", 4, True, "adamw")
    bad = load_config(TINY, [f"--run.out_dir={tmp_path}", "--pipeline.method=zb-h1", "--pipeline.schedule=gpipe"])
    with pytest.raises(ValueError, match="zb-h1"):
        resolve(bad)


# -- the multi-process runtime (slow) ---------------------------------------------------------------


@pytest.mark.slow
def test_dist_equals_simulator(tmp_path):
    out, summary, _ = run_dist_against_sim(tmp_path, "zb-h1", 3, (), val_steps=[3, 6])
    assert summary["engine"] == "dist"
    counts = [s["counts"] for s in summary["stage_stats"]]
    assert all(c["W"] == c["B"] == c["F"] for c in counts), counts


@pytest.mark.slow
def test_dist_equals_gpipe_in_the_simulator(tmp_path):
    """The runtime's zb-h1 run trains exactly as the simulator's gpipe."""
    from helpers import sim_reference
    from pipenag.runtime.launch import train_dist

    records, weights = sim_reference(make_dist_cfg(tmp_path / "gpipe", "gpipe", 2))
    cfg = make_dist_cfg(tmp_path / "zb", "zb-h1", 2, "--train.engine=dist")
    assert train_dist(cfg, start_method="fork") == 0
    assert_same_records(read_metrics(cfg.run.out_dir), records)
    assert_same_state_dicts(dist_weights(Path(cfg.run.out_dir), 6, 2), weights)


@pytest.mark.slow
def test_dist_resumed_run_equals_uninterrupted(tmp_path, monkeypatch):
    """Stage 0 killed after update 6 (checkpoints every 2); --resume from update 4 ends like
    the uninterrupted run, bit for bit."""
    from pipenag.runtime.launch import train_dist
    from pipenag.train import load_run_config

    K = 3
    extra = ("--train.engine=dist", "--train.steps=8", "--train.checkpoint_every=2")
    full = make_dist_cfg(tmp_path / "full", "zb-h1", K, *extra)
    assert train_dist(full, start_method="fork") == 0
    cfg = make_dist_cfg(tmp_path / "cut", "zb-h1", K, *extra)
    monkeypatch.setenv("PIPENAG_FAIL", "0:6")
    assert train_dist(cfg, start_method="fork") == 1
    monkeypatch.delenv("PIPENAG_FAIL")
    out = Path(cfg.run.out_dir)
    assert complete_updates(out, K)[-1] == 4
    assert train_dist(load_run_config(out), resume=True, start_method="fork") == 0
    assert_same_records(read_metrics(out), read_metrics(full.run.out_dir))
    assert_same_state_dicts(dist_weights(out, 8, K), dist_weights(Path(full.run.out_dir), 8, K))
