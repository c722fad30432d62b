"""build_muon against torch's Muon and AdamW run separately; CompositeOptimizer's contract.

    python -m pytest tests/test_muon.py -q

The references are built here without build_muon, CompositeOptimizer or hidden_matrix_params:
the hidden matrices are picked by parameter name, the two torch optimizers stepped side by side.
"""

from __future__ import annotations

import copy
import io
import re

import pytest
import torch
from torch import nn

from pipenag.config import ModelConfig
from pipenag.model import lm_loss
from pipenag.optim.composite import CompositeOptimizer, hidden_matrix_params
from pipenag.split import build_stages

if not hasattr(torch.optim, "Muon"):
    pytest.skip("torch.optim.Muon needs torch >= 2.9", allow_module_level=True)

from pipenag.optim.muon import build_muon  # noqa: E402


DT = torch.float64  # torch's Muon accepts float64 parameters (its Newton-Schulz runs in bf16)
VOCAB, N_EMBD = 32, 16
BLOCK_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# build_muon's defaults, written again so that a silent change of them fails the equality test.
DEFAULTS = dict(weight_decay=0.0, momentum=0.95, nesterov=True, adam_betas=(0.9, 0.999), eps=1e-8,
                adjust_lr_fn="match_rms_adamw", ns_steps=5)
LRS = [1e-2, 3e-3, 2e-2, 5e-3, 1e-2, 7e-3]  # changed between steps, as the engine's schedule does


def tiny_stages(num_stages: int = 2, n_layer: int = 2, bias: bool = True):
    cfg = ModelConfig(n_layer=n_layer, n_head=2, n_embd=N_EMBD, block_size=8, vocab_size=VOCAB, bias=bias)
    return build_stages(cfg, num_stages=num_stages, seed=0)


def fresh_stage(stage_idx: int):
    return tiny_stages()[stage_idx].to(DT)


def stage_loss(stage, step: int) -> torch.Tensor:
    """A deterministic loss per step: the LM loss on the last stage, a random probe of the
    output elsewhere (the gradient an upstream stage receives from the next one)."""
    g = torch.Generator().manual_seed(1000 + step)
    B, T = 2, 8
    targets = torch.randint(0, VOCAB, (B, T), generator=g)
    if stage.is_first:
        x = torch.randint(0, VOCAB, (B, T), generator=g)
    else:
        x = torch.randn(B, T, N_EMBD, generator=g, dtype=DT)
    out = stage(x)
    if stage.is_last:
        return lm_loss(out, targets)
    return (out * torch.randn(out.shape, generator=g, dtype=out.dtype)).sum()


def train(stage, optimizers: list, lrs: list[float], start: int = 0) -> None:
    """Steps as StageRunner.step does them: lr into every group, step, zero_grad."""
    for i, lr in enumerate(lrs):
        for opt in optimizers:
            for group in opt.param_groups:
                group["lr"] = lr
        stage_loss(stage, start + i).backward()
        for opt in optimizers:
            opt.step()
        for opt in optimizers:
            opt.zero_grad(set_to_none=True)


def name_split(stage):
    named = list(stage.named_parameters())
    hidden = [p for n, p in named if n.endswith(BLOCK_WEIGHTS)]
    rest = [p for n, p in named if not n.endswith(BLOCK_WEIGHTS)]
    return hidden, rest


def reference_optimizers(stage, lr: float, **kw) -> list:
    """torch's Muon and AdamW, built directly with build_muon's documented meaning of each argument."""
    h = {**DEFAULTS, **kw}
    hidden, rest = name_split(stage)
    muon = torch.optim.Muon(hidden, lr=lr, weight_decay=h["weight_decay"], momentum=h["momentum"],
                            nesterov=h["nesterov"], ns_steps=h["ns_steps"], adjust_lr_fn=h["adjust_lr_fn"])
    adamw = torch.optim.AdamW(rest, lr=lr, betas=h["adam_betas"], eps=h["eps"], weight_decay=h["weight_decay"])
    return [muon, adamw]


def names_of(module, params) -> list[str]:
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [by_id[id(p)] for p in params]


# -- hidden_matrix_params -------------------------------------------------------------------

@pytest.mark.parametrize("stage_idx", [0, 1])
def test_hidden_matrix_params_are_the_block_linear_weights(stage_idx):
    stage = tiny_stages()[stage_idx]
    hidden, rest = hidden_matrix_params(stage)
    assert names_of(stage, hidden) == [
        "h.0.attn.c_attn.weight", "h.0.attn.c_proj.weight", "h.0.mlp.c_fc.weight", "h.0.mlp.c_proj.weight"]
    rest_names = names_of(stage, rest)
    if stage_idx == 0:
        assert rest_names[:2] == ["wte.weight", "wpe.weight"]
    else:
        assert rest_names[-3:] == ["ln_f.weight", "ln_f.bias", "lm_head.weight"]
    assert "h.0.attn.c_attn.bias" in rest_names and "h.0.ln_1.weight" in rest_names
    # A partition of the parameters, in module order.
    all_names = [n for n, _ in stage.named_parameters()]
    assert sorted(names_of(stage, hidden) + rest_names) == sorted(all_names)
    assert len(set(map(id, hidden)) | set(map(id, rest))) == len(all_names) == len(hidden) + len(rest)
    assert rest_names == [n for n in all_names if n in set(rest_names)]


def test_hidden_matrix_params_generic_module():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(5, 4)
            self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4, bias=False))
            self.lm_head = nn.Linear(4, 5, bias=False)
            self.out = nn.Linear(4, 2)

    net = Net()
    hidden, rest = hidden_matrix_params(net)
    assert names_of(net, hidden) == ["body.0.weight", "body.2.weight", "out.weight"]
    assert names_of(net, rest) == ["emb.weight", "body.0.bias", "lm_head.weight", "out.bias"]
    hidden, _ = hidden_matrix_params(net, exclude=("lm_head", "out"))
    assert names_of(net, hidden) == ["body.0.weight", "body.2.weight"]
    # A head tied to a hidden layer's weight is treated as the head.
    net.lm_head.weight = net.body[2].weight
    hidden, _ = hidden_matrix_params(net)
    assert names_of(net, hidden) == ["body.0.weight", "out.weight"]
    with pytest.raises(ValueError, match="'lm_head'"):
        hidden_matrix_params(net, exclude="lm_head")


# -- build_muon == torch's Muon + AdamW -----------------------------------------------------

@pytest.mark.parametrize("stage_idx", [0, 1])
@pytest.mark.parametrize("kw", [
    {},
    dict(weight_decay=0.1, momentum=0.9, nesterov=False, adam_betas=(0.8, 0.99), eps=1e-6,
         adjust_lr_fn="original", ns_steps=3),
], ids=["defaults", "custom"])
def test_build_muon_equals_separate_torch_optimizers(stage_idx, kw):
    ours, ref, adamw_only = fresh_stage(stage_idx), fresh_stage(stage_idx), fresh_stage(stage_idx)
    init = [p.detach().clone() for p in ours.parameters()]
    opt = build_muon(ours, lr=LRS[0], **kw)
    assert [type(o) for o in opt.optimizers] == [torch.optim.Muon, torch.optim.AdamW]
    train(ours, [opt], LRS)
    train(ref, reference_optimizers(ref, LRS[0], **kw), LRS)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        assert a.dtype == DT
        assert torch.equal(a, b), name
    # Not vacuous: every parameter moved, and the hidden matrices moved differently from AdamW.
    assert all(not torch.equal(p, q) for p, q in zip(ours.parameters(), init))
    h = {**DEFAULTS, **kw}
    train(adamw_only, [torch.optim.AdamW(adamw_only.parameters(), lr=LRS[0], betas=h["adam_betas"], eps=h["eps"],
                                         weight_decay=h["weight_decay"])], LRS)
    for a, b in zip(name_split(ours)[0], name_split(adamw_only)[0]):
        assert not torch.equal(a, b)


def test_build_muon_state_uses_torch_names():
    stage = fresh_stage(0)
    opt = build_muon(stage, lr=1e-3)
    train(stage, [opt], LRS[:1])
    hidden, rest = name_split(stage)
    assert set(opt.state[hidden[0]]) == {"momentum_buffer"}
    assert {"step", "exp_avg", "exp_avg_sq"} <= set(opt.state[rest[0]])
    assert len(opt.state) == len(hidden) + len(rest)
    assert opt.defaults["lr"] == 1e-3 and opt.defaults["weight_decay"] == 0.0


def test_build_muon_skips_an_empty_part():
    # A middle stage (no embedding, no head), without biases: blocks and norms only.
    mid = tiny_stages(num_stages=3, n_layer=3, bias=False)[1]
    opt = build_muon(mid, lr=1e-3)
    assert [type(o) for o in opt.optimizers] == [torch.optim.Muon, torch.optim.AdamW]
    assert names_of(mid, opt.optimizers[1].param_groups[0]["params"]) == ["h.0.ln_1.weight", "h.0.ln_2.weight"]
    only_adamw = build_muon(nn.LayerNorm(4), lr=1e-3)
    assert [type(o) for o in only_adamw.optimizers] == [torch.optim.AdamW]
    only_muon = build_muon(nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)), lr=1e-3)
    assert [type(o) for o in only_muon.optimizers] == [torch.optim.Muon]
    with pytest.raises(ValueError, match="ReLU"):
        build_muon(nn.ReLU(), lr=1e-3)


@pytest.mark.parametrize("kw, text", [
    (dict(lr=-1.0), "-1.0"),
    (dict(lr=float("nan")), "nan"),
    (dict(weight_decay=-0.1), "-0.1"),
    (dict(momentum=1.0), "momentum must be a finite number in [0.0, 1.0), got 1.0"),
    (dict(momentum=-0.5), "-0.5"),
    (dict(nesterov=1), "nesterov must be a bool, got 1"),
    (dict(adam_betas=(0.9,)), "(0.9,)"),
    (dict(adam_betas=(0.9, 1.0)), "adam_betas[1] must be a finite number in [0.0, 1.0), got 1.0"),
    (dict(eps=0.0), "eps must be a finite number in (0.0, inf), got 0.0"),
    (dict(adjust_lr_fn="spectral"), "'spectral'"),
    (dict(adjust_lr_fn=None), "got None"),
    (dict(ns_steps=0), "got 0"),
    (dict(ns_steps=100), "got 100"),
    (dict(ns_steps=2.0), "got 2.0"),
])
def test_build_muon_rejects_bad_arguments(kw, text):
    args = {"lr": 1e-3, **kw}
    with pytest.raises(ValueError, match=re.escape(text)):
        build_muon(nn.Linear(4, 4), **args)


# -- CompositeOptimizer ---------------------------------------------------------------------

def two_part(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(3, 2, generator=g, dtype=DT))
    b = nn.Parameter(torch.randn(3, generator=g, dtype=DT))
    return w, b


def set_grads(params, step: int) -> None:
    g = torch.Generator().manual_seed(2000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)


def test_composite_param_groups_are_the_childrens_dicts():
    w, b = two_part()
    sgd, adamw = torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.AdamW([b], lr=0.01)
    comp = CompositeOptimizer([sgd, adamw])
    assert isinstance(comp, torch.optim.Optimizer)
    assert len(comp.param_groups) == 2
    assert comp.param_groups[0] is sgd.param_groups[0] and comp.param_groups[1] is adamw.param_groups[0]
    comp.param_groups[1]["lr"] = 0.5
    assert adamw.param_groups[0]["lr"] == 0.5
    assert "lr" not in comp.defaults  # the children's lrs differ
    # torch's LR schedulers accept it and reach every child.
    sched = torch.optim.lr_scheduler.LambdaLR(comp, lambda epoch: 0.5 ** epoch)
    set_grads([w, b], 0)
    comp.step()
    sched.step()
    assert sgd.param_groups[0]["lr"] == 0.05 and adamw.param_groups[0]["lr"] == 0.25
    assert "CompositeOptimizer" in repr(comp) and "SGD" in repr(comp) and "AdamW" in repr(comp)


def test_composite_step_zero_grad_and_closure():
    w, b = two_part()
    w_ref, b_ref = (p.detach().clone().requires_grad_(True) for p in (w, b))
    comp = CompositeOptimizer([torch.optim.SGD([w], lr=0.1), torch.optim.AdamW([b], lr=0.01)])
    ref = [torch.optim.SGD([w_ref], lr=0.1), torch.optim.AdamW([b_ref], lr=0.01)]
    calls = []

    def closure():
        calls.append(1)
        return torch.tensor(3.0)

    for step in range(3):
        set_grads([w, b], step)
        set_grads([w_ref, b_ref], step)
        loss = comp.step(closure)
        for opt in ref:
            opt.step()
        assert loss.item() == 3.0 and len(calls) == step + 1
    assert torch.equal(w, w_ref) and torch.equal(b, b_ref)
    comp.zero_grad(set_to_none=False)
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    comp.zero_grad()
    assert w.grad is None and b.grad is None


def test_composite_rejects_bad_children():
    w, b = two_part()
    with pytest.raises(ValueError, match="got 0"):
        CompositeOptimizer([])
    with pytest.raises(ValueError, match=re.escape("optimizers[1] must be a torch.optim.Optimizer, got Parameter")):
        CompositeOptimizer([torch.optim.SGD([w], lr=0.1), w])
    shared = "1 parameter(s) appear in more than one optimizer, e.g. one of shape (3, 2) in optimizers 0 and 1"
    with pytest.raises(ValueError, match=re.escape(shared)):
        CompositeOptimizer([torch.optim.SGD([w], lr=0.1), torch.optim.AdamW([b, w], lr=0.1)])
    comp = CompositeOptimizer([torch.optim.SGD([w], lr=0.1)])
    with pytest.raises(RuntimeError, match="child"):
        comp.add_param_group({"params": [b]})


def test_composite_deepcopy_keeps_the_children():
    w, b = two_part()
    comp = CompositeOptimizer([torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.AdamW([b], lr=0.01)])
    set_grads([w, b], 0)
    comp.step()
    twin = copy.deepcopy(comp)
    assert twin.param_groups[0] is twin.optimizers[0].param_groups[0]
    w2, b2 = twin.param_groups[0]["params"][0], twin.param_groups[1]["params"][0]
    assert w2 is not w and torch.equal(w2, w)
    for step in (1, 2):
        set_grads([w, b], step)
        set_grads([w2, b2], step)
        comp.step()
        twin.step()
    assert torch.equal(w, w2) and torch.equal(b, b2)


def test_composite_state_dict_round_trip():
    num_saved, num_more = 3, 3
    whole = fresh_stage(1)
    train(whole, [build_muon(whole, lr=LRS[0], weight_decay=0.05)], LRS)

    first = fresh_stage(1)
    opt = build_muon(first, lr=LRS[0], weight_decay=0.05)
    train(first, [opt], LRS[:num_saved])
    buf = io.BytesIO()
    torch.save({"module": first.state_dict(), "optimizer": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)
    assert len(saved["optimizer"]["optimizers"]) == 2

    resumed = copy.deepcopy(fresh_stage(1))  # other tensors than `first`'s
    resumed.load_state_dict(saved["module"])
    opt2 = build_muon(resumed, lr=123.0)
    opt2.load_state_dict(saved["optimizer"])
    # load_state_dict gives the children new group dicts; the composite must follow them.
    assert all(a is b for a, b in zip(opt2.param_groups, [g for o in opt2.optimizers for g in o.param_groups]))
    train(resumed, [opt2], LRS[num_saved:num_saved + num_more], start=num_saved)
    for (name, a), b in zip(resumed.named_parameters(), whole.parameters()):
        assert torch.equal(a, b), name
    # Not vacuous: continuing without the optimizer state gives other weights.
    cold = copy.deepcopy(fresh_stage(1))
    cold.load_state_dict(saved["module"])
    train(cold, [build_muon(cold, lr=LRS[0], weight_decay=0.05)], LRS[num_saved:num_saved + num_more], start=num_saved)
    assert not all(torch.equal(a, b) for a, b in zip(cold.parameters(), whole.parameters()))


def test_composite_load_state_dict_checks_before_loading():
    w, b = two_part()
    comp = CompositeOptimizer([torch.optim.SGD([w], lr=0.1, momentum=0.9), torch.optim.AdamW([b], lr=0.01)])
    set_grads([w, b], 0)
    comp.step()
    state = comp.state_dict()
    with pytest.raises(ValueError, match="holds 1 optimizer"):
        comp.load_state_dict({"optimizers": state["optimizers"][:1]})
    with pytest.raises(ValueError, match="'optimizers'"):
        comp.load_state_dict(state["optimizers"][0])
    with pytest.raises(ValueError, match=re.escape("['AdamW', 'SGD']")):
        comp.load_state_dict({"optimizers": state["optimizers"], "optimizer_types": ["AdamW", "SGD"]})

    w2, b2 = two_part(seed=1)
    c = nn.Parameter(torch.zeros(2, dtype=DT))
    other = CompositeOptimizer([torch.optim.SGD([w2], lr=0.1, momentum=0.9), torch.optim.AdamW([b2, c], lr=0.01)])
    mismatch = "optimizer 1 (AdamW): state_dict has groups of [1] parameters, the optimizer has [2]"
    with pytest.raises(ValueError, match=re.escape(mismatch)):
        other.load_state_dict(state)
    assert len(other.state) == 0  # the SGD child was not loaded either
