"""The split backward of zero-bubble schedules (pipenag/engine/split_backward.py): B and W give
the whole backward's gradients bit for bit, and W does not run the input's path again.

    python -m pytest tests/test_split_backward.py -q
"""

import pytest
import torch
from torch import nn

from pipenag.engine.split_backward import SplitBackward


class Count(torch.autograd.Function):
    """The identity, counting how often autograd runs its backward."""

    calls = 0

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        Count.calls += 1
        return g


class Net(nn.Module):
    """Two matmuls and a layer norm, a weight behind a weight-only op (a transpose, as in
    F.linear), an unused weight, a counter on the activation path, and (reuse=True) a weight
    used on both sides of the counter."""

    def __init__(self, reuse: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(8, 8, generator=g) / 3)
        self.b = nn.Parameter(torch.randn(8, 8, generator=g) / 3)
        self.norm = nn.LayerNorm(8)
        self.unused = nn.Parameter(torch.randn(3))
        self.reuse = reuse

    def forward(self, x):
        h = torch.tanh(x @ self.a)
        h = Count.apply(h)
        z = h @ self.b.t()
        if self.reuse:
            z = z + h @ self.a  # a twice: two meeting nodes for one weight, one behind the other
        return self.norm(z) * 2.0



@pytest.mark.parametrize("loss,reuse", [(False, False), (True, False), (False, True)])
def test_b_and_w_equal_the_whole_backward_and_w_skips_the_input_path(loss, reuse):
    net = Net(reuse)
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    g_out = None if loss else torch.randn(5, 8, generator=torch.Generator().manual_seed(2))

    def out_of(inp):
        y = net(inp)
        return (y ** 2).mean() if loss else y

    inp = x.detach().requires_grad_(True)
    net.zero_grad(set_to_none=True)
    out_of(inp).backward(g_out)
    ref_in, ref_w = inp.grad, [None if p.grad is None else p.grad.clone() for p in net.parameters()]

    net.zero_grad(set_to_none=True)
    inp = x.detach().requires_grad_(True)
    split = SplitBackward(out_of(inp), inp, list(net.parameters()))
    Count.calls = 0
    g_in = split.input_gradient(g_out)
    assert Count.calls == 1 and all(p.grad is None for p in net.parameters())  # B leaves .grad alone
    got = split.weight_gradients()
    # W does not run the activation path again, but for a weight used on both sides of it: from
    # the upper use autograd reaches the weight through the lower one too (the gradient that
    # arrives there is replaced by what B kept, so it is not counted twice)
    assert Count.calls == (2 if reuse else 1)
    assert torch.equal(g_in, ref_in)
    for g, ref in zip(got, ref_w):
        assert (g is None and ref is None) or torch.equal(g, ref)
    unused = [i for i, p in enumerate(net.parameters()) if p is net.unused]
    assert got[unused[0]] is None and ref_w[unused[0]] is None  # the unused weight
