"""The simulator and StageRunner: the weight versions of docs/schedules.md, bit for bit
against independent single-process references, and checkpoints that resume exactly.

    python -m pytest tests/test_sim.py -q

References written here from the table in docs/schedules.md, never from pipenag.schedules:
- plain training / gradient accumulation on the unsplit GPT (K=1, gpipe, 1f1b);
- the delayed-update rule on the unsplit GPT, keeping every weight version: stage k's forward
  of microbatch j uses version max(0, j - tau_k) (pipedream) or max(0, j // M - 1) (2bw); with
  stashing the backward uses the same weights, without it the stage is recomputed from its
  input with the latest weights;
"""

import copy

import pytest
import torch
from torch import nn
from helpers import SEED, assert_same_weights, microbatches, stage_params
from helpers import tiny_model_cfg as tiny_cfg

from pipenag.engine.sim import Simulator
from pipenag.engine.stage import Record
from pipenag.model import GPT, lm_loss
from pipenag.split import build_stages


# Block ranges of the tiny GPT's stages, written out (partition_layers(4, K), larger first).
RANGES = {1: [(0, 4)], 2: [(0, 2), (2, 4)], 3: [(0, 2), (2, 3), (3, 4)], 4: [(0, 1), (1, 2), (2, 3), (3, 4)]}


def spec_versions(name: str, K: int, M: int, k: int, j: int, stash: bool) -> tuple[int, int]:
    """(forward version, backward version) of microbatch j at stage k (docs/schedules.md)."""
    u = j // M
    if name in ("gpipe", "1f1b"):
        return u, u
    if name == "pipedream":
        fwd = max(0, j - (K - 1 - k))
        return fwd, fwd if stash else j
    if name == "2bw":
        fwd = max(0, u - 1)
        return fwd, fwd if stash else u
    raise AssertionError(name)


# ---------------------------------------------------------------------------------------------
# The versions a running Simulator uses, read from its record and from the weights its
#    modules actually see.


class Probe(nn.Module):
    """A Linear (+ tanh) stage that logs (the action running it, the weight it computes with)."""

    def __init__(self, d_in, d_out, record, log, last=False):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out)
        self.record, self.log, self.last = record, log, last

    def forward(self, x):
        # Under functional_call self.lin.weight is the version the runner passes in.
        self.log.append((self.record[-1], self.lin.weight.detach().clone()))
        y = self.lin(x)
        return y if self.last else torch.tanh(y)


VERSION_CASES = [
    ("gpipe", 1, 2, True), ("gpipe", 3, 2, True), ("1f1b", 2, 3, True), ("1f1b", 4, 2, True),
    ("pipedream", 1, 1, True), ("pipedream", 2, 1, True), ("pipedream", 4, 1, True),
    ("pipedream", 2, 1, False), ("pipedream", 4, 1, False),
    ("2bw", 1, 2, True), ("2bw", 2, 2, True), ("2bw", 3, 4, True), ("2bw", 3, 3, False),
]


@pytest.mark.parametrize("name,K,M,stash", VERSION_CASES)
def test_simulator_uses_spec_versions(name, K, M, stash):
    torch.manual_seed(0)
    record, log = [], []
    d = 3
    stages = [Probe(d, d, record, log, last=(k == K - 1)) for k in range(K)]
    opts = [torch.optim.SGD(s.parameters(), lr=0.1) for s in stages]
    sim = Simulator(stages, nn.functional.mse_loss, opts, schedule=name, stash=stash,
                    num_microbatches=M, record=record)
    num_updates = 7
    hist = [[s.lin.weight.detach().clone()] for s in stages]  # hist[k][v]: stage k, version v
    g = torch.Generator().manual_seed(1)
    for _ in range(num_updates):
        sim.step([(torch.randn(2, d, generator=g), torch.randn(2, d, generator=g)) for _ in range(M)])
        for k, s in enumerate(stages):
            hist[k].append(s.lin.weight.detach().clone())
    for k in range(K):  # every update changes every stage, so versions are distinguishable
        assert all(not torch.equal(hist[k][v], hist[k][v + 1]) for v in range(num_updates))

    # one F and one B record per (stage, microbatch), with the table's versions
    seen = {}
    for r in record:
        assert isinstance(r, Record)
        key = (r.stage, r.kind, r.microbatch)
        assert key not in seen, key
        seen[key] = r.version
    for k in range(K):
        for j in range(num_updates * M):
            fwd, bwd = spec_versions(name, K, M, k, j, stash)
            assert seen[(k, "F", j)] == fwd, (k, j)
            assert seen[(k, "B", j)] == bwd, (k, j)

    # the weights each module call computed with are the recorded version's
    forwards = set()
    for r, w in log:
        assert torch.equal(w, hist[r.stage][r.version]), r
        if r.kind == "F":
            forwards.add((r.stage, r.microbatch))
    assert len(forwards) == K * num_updates * M


@pytest.mark.parametrize("K,decay", [(2, 0.5), (3, 0.8)])
def test_pipemare_backward_uses_predicted_weights(K, decay):
    """Stash off with PipeMare prediction: the backward of microbatch j at stage k recomputes
    with w_j - tau_k * delta_j, delta the average of the per-update weight change
    delta_t = decay * delta_{t-1} + (1 - decay) (w_t - w_{t-1}), delta_0 = 0. The test forms the
    average with its own float ops, hence a tolerance of a few ulps instead of equality."""
    torch.manual_seed(0)
    record, log = [], []
    d = 3
    stages = [Probe(d, d, record, log, last=(k == K - 1)) for k in range(K)]
    opts = [torch.optim.SGD(s.parameters(), lr=0.1, momentum=0.5) for s in stages]
    sim = Simulator(stages, nn.functional.mse_loss, opts, schedule="pipedream", stash=False,
                    predict=True, predict_decay=decay, record=record)
    num_updates = 6
    hist = [[s.lin.weight.detach().clone()] for s in stages]
    g = torch.Generator().manual_seed(2)
    for _ in range(num_updates):
        sim.step([(torch.randn(2, d, generator=g), torch.randn(2, d, generator=g))])
        for k, s in enumerate(stages):
            hist[k].append(s.lin.weight.detach().clone())
    backward_calls = 0
    for r, w in log:
        if r.kind != "B":
            continue
        k, j = r.stage, r.microbatch
        tau = K - 1 - k
        assert tau > 0 and r.version == -1  # only delayed stages predict
        delta = torch.zeros_like(w)
        for t in range(1, j + 1):
            delta = decay * delta + (1 - decay) * (hist[k][t] - hist[k][t - 1])
        expected = hist[k][j] - tau * delta
        torch.testing.assert_close(w, expected, rtol=1e-6, atol=1e-7)
        if j >= 2:
            assert not torch.allclose(expected, hist[k][j])  # the prediction moved the weights
        backward_calls += 1
    # every backward of a delayed stage recomputes; the last stage keeps its graph
    assert backward_calls == (K - 1) * num_updates
    assert all(r.version == r.microbatch for r in record if r.kind == "B" and r.stage == K - 1)


# ---------------------------------------------------------------------------------------------
# K=1 == plain training; gpipe and 1f1b == gradient accumulation on the unsplit model;
#    the zero-delay last stage of pipedream.


def plain_training(model, batches, M, num_updates, lr, lr_fn=None, grad_clip=0.0,
                   param_groups=None):
    """Gradient accumulation over M microbatches on one model: loss = mean over microbatches."""
    opt = torch.optim.AdamW(param_groups or model.parameters(), lr=lr, weight_decay=0.01)
    params = list(model.parameters())
    losses = []
    for u in range(num_updates):
        total = 0.0
        for x, y in batches[u * M:(u + 1) * M]:
            loss = lm_loss(model(x), y)
            total += float(loss.detach())
            (loss / M).backward()
        if lr_fn is not None:
            for group in opt.param_groups:
                group["lr"] = lr_fn(u + 1)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total / M)
    return losses


def pipeline_training(K, name, M, batches, num_updates, lr, stash=True, lr_fn=None, grad_clip=0.0,
                      stage_lrs=None):
    stages = build_stages(tiny_cfg(), K, SEED)
    opts = [torch.optim.AdamW(s.parameters(), lr=lr if stage_lrs is None else stage_lrs[k],
                              weight_decay=0.01) for k, s in enumerate(stages)]
    sim = Simulator(stages, lm_loss, opts, schedule=name, stash=stash, num_microbatches=M,
                    lr_fns=None if lr_fn is None else [lr_fn] * K, grad_clip=grad_clip)
    losses = [sim.step(batches[u * M:(u + 1) * M]) for u in range(num_updates)]
    return stages, losses


@pytest.mark.parametrize("name,M,stash,lr_fn,clip", [
    ("gpipe", 3, True, None, 0.0),
    ("1f1b", 2, True, None, 0.0),
    ("pipedream", 1, True, None, 0.0),
    ("pipedream", 1, False, None, 0.0),
    ("gpipe", 2, True, lambda t: 1e-2 / t, 0.05),
    ("pipedream", 1, True, lambda t: 1e-2 * (1 + t % 3), 0.05),
])
def test_one_stage_equals_plain_training(name, M, stash, lr_fn, clip):
    num_updates = 4
    batches = microbatches(num_updates * M)
    torch.manual_seed(SEED)
    model = GPT(tiny_cfg())
    ref_losses = plain_training(model, batches, M, num_updates, 1e-2, lr_fn, clip)
    stages, losses = pipeline_training(1, name, M, batches, num_updates, 1e-2, stash, lr_fn, clip)
    assert losses == ref_losses
    assert_same_weights(stage_params(stages), dict(model.named_parameters()))
    # the run moved the weights (the comparison is not of two initial models)
    torch.manual_seed(SEED)
    init = dict(GPT(tiny_cfg()).named_parameters())
    assert not torch.equal(init["h.0.mlp.c_fc.weight"], model.h[0].mlp.c_fc.weight)


@pytest.mark.parametrize("name,K,M", [("gpipe", 2, 3), ("gpipe", 4, 2), ("1f1b", 3, 4), ("1f1b", 4, 1)])
def test_sync_pipeline_equals_gradient_accumulation(name, K, M):
    # Exact: each stage runs the same ops as the unsplit model (tests/test_model.py), the
    # last stage backpropagates loss / M like the reference, and the gradients accumulate in
    # microbatch order; AdamW's per-tensor math does not depend on how tensors are grouped.
    num_updates = 3
    batches = microbatches(num_updates * M, seed=K)
    torch.manual_seed(SEED)
    model = GPT(tiny_cfg())
    ref_losses = plain_training(model, batches, M, num_updates, 1e-2)
    stages, losses = pipeline_training(K, name, M, batches, num_updates, 1e-2)
    assert losses == ref_losses
    assert_same_weights(stage_params(stages), dict(model.named_parameters()))


@pytest.mark.parametrize("stash", [True, False])
def test_pipedream_last_stage_has_no_delay(stash):
    """Freeze every stage but the last (lr 0): the delays of the frozen stages then change
    nothing, and pipedream must be plain per-microbatch training of the last stage."""
    K, num_updates = 3, 5
    batches = microbatches(num_updates)
    torch.manual_seed(SEED)
    model = GPT(tiny_cfg())
    last = {n for n, _ in model.named_parameters() if n.startswith(("h.3.", "ln_f", "lm_head"))}
    groups = [
        {"params": [p for n, p in model.named_parameters() if n in last], "lr": 1e-2},
        {"params": [p for n, p in model.named_parameters() if n not in last], "lr": 0.0},
    ]
    ref_losses = plain_training(model, batches, 1, num_updates, 1e-2, param_groups=groups)
    stages, losses = pipeline_training(K, "pipedream", 1, batches, num_updates, 1e-2, stash,
                                       stage_lrs=[0.0, 0.0, 1e-2])
    assert losses == ref_losses
    assert_same_weights(stage_params(stages), dict(model.named_parameters()))


# ---------------------------------------------------------------------------------------------
# An independent implementation of the delayed-update rule on the unsplit model.


def owner(name: str, ranges) -> int:
    """The stage that owns a parameter of the whole GPT."""
    if name.startswith(("wte.", "wpe.")):
        return 0
    if name.startswith(("ln_f.", "lm_head.")):
        return len(ranges) - 1
    block = int(name.split(".")[1])
    return next(k for k, (a, b) in enumerate(ranges) if a <= block < b)


def run_stage(m: GPT, k: int, ranges, h):
    """Stage k of the whole model m, written out from GPT.forward."""
    a, b = ranges[k]
    if k == 0:
        h = m.drop(m.wte(h) + m.wpe(torch.arange(h.shape[1])))
    for i in range(a, b):
        h = m.h[i](h)
    if k == len(ranges) - 1:
        h = m.lm_head(m.ln_f(h))
    return h


def reference_delayed(K, M, batches, num_updates, versions, lr=0.3, extrapolation=None):
    """Train the unsplit GPT with per-stage torch SGD where microbatch j's forward at stage k
    uses weight version fwd and its backward version bwd, (fwd, bwd) = versions(k, j), keeping
    every version. bwd == fwd: one forward and backward of the whole model with stage k's
    weights at version fwd (a consistent, stale gradient). bwd != fwd (no stashing): forward
    with the old versions, then each stage recomputed from its stored input with the latest
    weights and backpropagated. extrapolation[k] = c > 0 (forward weight prediction): stage k's
    forward weights are w_v + c (w_v - w_{v-1}) instead of w_v (v >= 1), and a consistent
    backward uses them too."""
    ranges = RANGES[K]
    torch.manual_seed(SEED)
    live = GPT(tiny_cfg())
    names = [n for n, _ in live.named_parameters()]
    own = {n: owner(n, ranges) for n in names}
    live_params = dict(live.named_parameters())
    opts = [torch.optim.SGD([live_params[n] for n in names if own[n] == k], lr=lr, momentum=0.9)
            for k in range(K)]
    hist = [{n: p.detach().clone() for n, p in live.named_parameters()}]  # hist[v]: after v updates
    work = copy.deepcopy(live)  # holds old versions
    work_params = dict(work.named_parameters())
    losses = []
    for u in range(num_updates):
        work.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(u * M, (u + 1) * M):
            x, y = batches[j]
            fwd = [versions(k, j)[0] for k in range(K)]
            bwd = [versions(k, j)[1] for k in range(K)]
            with torch.no_grad():
                for n in names:
                    v, c = fwd[own[n]], (extrapolation or [0.0] * K)[own[n]]
                    w = hist[v][n]
                    work_params[n].copy_(w + c * (w - hist[v - 1][n]) if c > 0 and v > 0 else w)
            if fwd == bwd:
                loss = lm_loss(work(x), y)
                (loss / M).backward()  # grads accumulate in work
            else:
                assert all(v == u for v in bwd), "without stashing the backward uses the latest weights"
                inputs, h = [], x
                with torch.no_grad():
                    for k in range(K):
                        inputs.append(h)
                        h = run_stage(work, k, ranges, h)
                    loss = lm_loss(h, y)
                grad = None
                for k in reversed(range(K)):
                    inp = inputs[k] if k == 0 else inputs[k].clone().requires_grad_(True)
                    out = run_stage(live, k, ranges, inp)
                    if k == K - 1:
                        (lm_loss(out, y) / M).backward()
                    else:
                        out.backward(grad)
                    grad = inp.grad
            total += float(loss.detach())
        for n in names:
            g = work_params[n].grad
            if g is not None:
                live_params[n].grad = g.clone()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        hist.append({n: p.detach().clone() for n, p in live.named_parameters()})
        losses.append(total / M)
    return live, losses


def simulator_run(name, K, M, batches, num_updates, stash, lr=0.3, **kw):
    stages = build_stages(tiny_cfg(), K, SEED)
    opts = [torch.optim.SGD(s.parameters(), lr=lr, momentum=0.9) for s in stages]
    sim = Simulator(stages, lm_loss, opts, schedule=name, stash=stash, num_microbatches=M, **kw)
    losses = [sim.step(batches[u * M:(u + 1) * M]) for u in range(num_updates)]
    return stages, losses, sim


@pytest.mark.parametrize("name,K,M,stash", [
    ("pipedream", 2, 1, True), ("pipedream", 2, 1, False),
    ("pipedream", 3, 1, True), ("pipedream", 3, 1, False),
    ("2bw", 1, 2, True), ("2bw", 2, 2, True), ("2bw", 2, 3, False),
])
def test_async_schedules_match_delayed_update_reference(name, K, M, stash):
    num_updates = 6
    batches = microbatches(num_updates * M, seed=3)
    versions = lambda k, j: spec_versions(name, K, M, k, j, stash)  # noqa: E731
    ref, ref_losses = reference_delayed(K, M, batches, num_updates, versions)
    stages, losses, _ = simulator_run(name, K, M, batches, num_updates, stash)
    assert losses == ref_losses
    assert_same_weights(stage_params(stages), dict(ref.named_parameters()))
    if K > 1 or name == "2bw":
        # and the delay matters: synchronous training ends elsewhere
        sync, _ = reference_delayed(K, M, batches, num_updates, lambda k, j: (j // M, j // M))
        assert not torch.equal(sync.wte.weight, ref.wte.weight)


@pytest.mark.parametrize("name,K,M,stash,scale", [
    ("pipedream", 3, 1, True, 1.0), ("pipedream", 3, 1, False, 1.0), ("pipedream", 4, 1, True, 0.5),
    ("2bw", 2, 2, True, 1.0),
])
def test_forward_prediction_matches_delayed_update_reference(name, K, M, stash, scale):
    """Forward weight prediction: stage k's forward (and, with stashing, its backward) runs at
    w_v + s tau (w_v - w_{v-1}), tau = K-1-k (pipedream) or 1 (2bw): the reference above with
    the extrapolated weights, bit for bit; and it changes the run."""
    num_updates = 6
    batches = microbatches(num_updates * M, seed=8)
    versions = lambda k, j: spec_versions(name, K, M, k, j, stash)  # noqa: E731
    taus = [K - 1 - k if name == "pipedream" else 1 for k in range(K)]
    ref, ref_losses = reference_delayed(K, M, batches, num_updates, versions,
                                        extrapolation=[scale * t for t in taus])
    stages, losses, _ = simulator_run(name, K, M, batches, num_updates, stash, forward_prediction=scale)
    assert losses == ref_losses
    assert_same_weights(stage_params(stages), dict(ref.named_parameters()))
    plain, _, _ = simulator_run(name, K, M, batches, num_updates, stash)
    assert not torch.equal(plain[0].wte.weight, stages[0].wte.weight)


def test_stash_on_and_off_differ():
    batches = microbatches(5, seed=4)
    on, _, _ = simulator_run("pipedream", 2, 1, batches, 5, True)
    off, _, _ = simulator_run("pipedream", 2, 1, batches, 5, False)
    assert not torch.equal(on[0].wte.weight, off[0].wte.weight)
    # the last stage has no delay but sees different activations, so it differs too
    assert not torch.equal(on[1].lm_head.weight, off[1].lm_head.weight)


def test_simulator_rejects_bad_arguments():
    stages = build_stages(tiny_cfg(), 2, SEED)
    opts = [torch.optim.SGD(s.parameters(), lr=0.1) for s in stages]
    with pytest.raises(ValueError, match="optimizers"):
        Simulator(stages, lm_loss, opts[:1])
    with pytest.raises(ValueError, match="predict"):
        Simulator(stages, lm_loss, opts, stash=True, predict=True)
    with pytest.raises(ValueError, match="needs the pipedream schedule"):
        Simulator(stages, lm_loss, opts, schedule="2bw", num_microbatches=2, stash=False, predict=True)
    with pytest.raises(ValueError, match="unknown schedule"):
        Simulator(stages, lm_loss, opts, schedule="nope")
    with pytest.raises(ValueError, match="exclusive"):
        Simulator(stages, lm_loss, opts, stash=False, predict=True, forward_prediction=1.0)
    with pytest.raises(ValueError, match="forward_prediction=-1"):
        Simulator(stages, lm_loss, opts, forward_prediction=-1.0)
    sim = Simulator(stages, lm_loss, opts, schedule="gpipe", num_microbatches=2)
    with pytest.raises(ValueError, match="got 1 microbatches"):
        sim.step(microbatches(1))
