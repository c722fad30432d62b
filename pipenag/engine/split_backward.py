"""A backward split in two passes that together cost one backward: B (the gradient of the stage
input) and W (the gradient of the weights), as zero-bubble schedules need them.

    b = SplitBackward(out, inp, leaves)     # the forward's output (or loss), input and weight leaves
    g_in = b.input_gradient(grad_out)       # B: autograd runs only the paths to the input
    grads = b.weight_gradients()            # W, later: one gradient per leaf (None if unused)

Autograd computes a weight's gradient inside the node that consumes the weight (an addmm's
backward gives the gradient of its input and of its weight from the same incoming gradient).
B asks autograd for the input gradient alone, so these nodes skip their weight halves; but the
incoming gradient of every such node lies on the input's path and is computed anyway. B keeps
it (a pre-hook on the node), and W starts from it: it runs only the weight halves of those
nodes and the weight-only nodes behind them (a transpose, a cast), instead of running the
whole graph from the output again. B + W then costs about one backward, where a W that
restarts from the output costs a second one (the measured 1.6x of docs/results/time_model.md).

The nodes whose incoming gradients B keeps: walking from each weight's gradient accumulator
toward the output, the first nodes that lie on a path from the input to the output (the
"meeting nodes"). The gradients W computes are the same operations on the same tensors as the
whole backward's, so they are equal bit for bit (tests/test_zero_bubble.py,
tests/test_split_backward.py). W takes the weights in groups (the weights that share a meeting
node), one autograd call each, so that no call starts above another group's meeting node and
runs the input's path down to it. One case still does: a weight used twice in a stage, on both
sides of some activation path (its two meeting nodes, one behind the other, are one group);
there W runs that path again, and a pre-hook replaces what reaches the lower meeting node by
what B kept there, so that nothing is counted twice. A GPT block uses each weight once.
"""

from __future__ import annotations

from collections import defaultdict, deque
from typing import Optional, Sequence

import torch
from torch.autograd.graph import GradientEdge, Node


def _node_of(t: torch.Tensor) -> Optional[Node]:
    """t's grad_fn, or for a leaf that requires grad its gradient accumulator (made on demand:
    a view's grad_fn points at it)."""
    if t.grad_fn is not None:
        return t.grad_fn
    if not t.requires_grad:
        return None
    return t.view_as(t).grad_fn.next_functions[0][0]


def _consumers(root: Node) -> dict[Node, list[Node]]:
    """For every node of the graph below `root`, the nodes that feed it gradients (the graph's
    edges reversed: toward the output)."""
    toward_output: dict[Node, list[Node]] = defaultdict(list)
    seen, queue = {root}, deque([root])
    while queue:
        node = queue.popleft()
        for child, _ in node.next_functions:
            if child is None:
                continue
            toward_output[child].append(node)
            if child not in seen:
                seen.add(child)
                queue.append(child)
    return toward_output


def _reachable(starts: Sequence[Node], toward_output: dict[Node, list[Node]], stop: set[Node] = frozenset()):
    """The nodes reached from `starts` toward the output, and those of them in `stop` (where
    the walk ends)."""
    inside, met = set(), set()
    queue = deque(n for n in starts if n is not None)
    inside.update(queue)
    while queue:
        node = queue.popleft()
        for parent in toward_output.get(node, ()):
            if parent in inside:
                continue
            if parent in stop:
                met.add(parent)
                continue
            inside.add(parent)
            queue.append(parent)
    return inside, met


class SplitBackward:
    """The B and W passes of one microbatch's backward at one stage.

    Args:
        out: the stage output (or the last stage's loss), with its graph.
        inp: the stage input, a leaf that requires grad.
        leaves: the weight tensors the graph was built on (the live parameters, or a stashed
            copy's leaves).
    """

    def __init__(self, out: torch.Tensor, inp: torch.Tensor, leaves: Sequence[torch.Tensor]):
        self.out, self.inp, self.leaves = out, inp, list(leaves)
        root = out.grad_fn
        assert root is not None, "the output has no graph"
        toward_output = _consumers(root)
        on_input_path, _ = _reachable([_node_of(inp)], toward_output)
        # meeting node -> the leaves behind it; each leaf's meeting nodes
        self.meeting: list[Node] = []
        self.leaf_meets: list[list[Node]] = []
        index: dict[Node, int] = {}
        # the leaves' gradient accumulators (held here: autograd keeps one per leaf only while
        # something refers to it)
        self.accumulators = [_node_of(leaf) for leaf in self.leaves]
        for acc in self.accumulators:
            if acc not in toward_output:  # the leaf does not reach the output: no gradient
                self.leaf_meets.append([])
                continue
            _, met = _reachable([acc], toward_output, stop=on_input_path)
            for node in met:
                if node not in index:
                    index[node] = len(self.meeting)
                    self.meeting.append(node)
            self.leaf_meets.append(sorted(met, key=index.get))
        # The leaves that share a meeting node take their gradients together: (leaf indices,
        # their meeting nodes) per group.
        group_of: dict[Node, int] = {}
        groups: list[tuple[list[int], list[Node]]] = []
        for i, meets in enumerate(self.leaf_meets):
            if not meets:
                continue
            joined = sorted({group_of[n] for n in meets if n in group_of})
            leaves, nodes = [i], list(meets)
            for g in joined:
                leaves += groups[g][0]
                nodes += groups[g][1]
                groups[g] = ([], [])
            groups.append((sorted(leaves), sorted(set(nodes), key=index.get)))
            for n in groups[-1][1]:
                group_of[n] = len(groups) - 1
        self.groups = [g for g in groups if g[0]]
        self.kept: dict[Node, tuple] = {}

    def input_gradient(self, grad: Optional[torch.Tensor]) -> torch.Tensor:
        """B: the gradient of the stage input (grad: of the output; None for a loss). Keeps the
        incoming gradients of the meeting nodes for weight_gradients; .grad is left alone."""
        def keep(node):
            def hook(grad_outputs):
                self.kept[node] = grad_outputs
            return hook

        handles = [node.register_prehook(keep(node)) for node in self.meeting]
        try:
            (g_in,) = torch.autograd.grad(self.out, (self.inp,), grad, retain_graph=True)
        finally:
            for h in handles:
                h.remove()
        return g_in

    def weight_gradients(self) -> list[Optional[torch.Tensor]]:
        """W: each leaf's gradient (None for a leaf that does not reach the output), from the
        gradients B kept; the graph is freed afterwards."""
        out: list[Optional[torch.Tensor]] = [None] * len(self.leaves)
        # A meeting node behind another would also receive the other's gradient: it gets
        # exactly what B gave it.
        handles = [node.register_prehook(lambda _, g=self.kept[node]: g) for node in self.meeting
                   if node in self.kept]
        try:
            for leaves, nodes in self.groups:
                edges, grads = [], []
                for node in nodes:
                    for i, g in enumerate(self.kept.get(node, ())):
                        if g is not None:
                            edges.append(GradientEdge(node, i))
                            grads.append(g)
                if not edges:
                    continue
                # One call per group: its meeting nodes reach its leaves through weight-only
                # nodes, so autograd runs nothing on the input's path. (One call for every leaf
                # would run the input's path again, from the upper meeting nodes to the lower
                # leaves.)
                got = torch.autograd.grad(edges, [GradientEdge(self.accumulators[i], 0) for i in leaves], grads,
                                          retain_graph=True, allow_unused=True)
                for i, g in zip(leaves, got):
                    out[i] = g
        finally:
            for h in handles:
                h.remove()
        self.kept.clear()
        self.out = None  # frees the graph
        return out
