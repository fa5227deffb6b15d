"""Reverse-mode symbolic differentiation: the backward pass is built in the same IR.

Walking the forward graph backwards from the loss, each op's gradient rule (in `ops.py`) adds
the nodes computing the gradient of each of its inputs; gradients reaching a node along
several paths are summed.
"""
from __future__ import annotations

import networkx as nx

from dsl.diagnostics import DlcError

from .ops import OPS
from .shapes import FLOATS


def grad(g, loss: int, wrt: list[int]) -> dict[int, int]:
    """Add d loss / d w for each w in `wrt` to graph `g`; return {w: gradient node}."""
    if g.shape(loss) != ():
        raise DlcError("the loss must be a scalar", g[loss]["loc"])
    reaches_loss = nx.ancestors(g.g, loss) | {loss}
    from_wrt = set()
    for w in wrt:
        from_wrt |= nx.descendants(g.g, w) | {w}
    active = reaches_loss & from_wrt
    grads: dict[int, int] = {}
    with g.at(g[loss]["loc"], role="grad"):
        grads[loss] = g.const(1.0, g.dtype(loss))
    for n in reversed([n for n in g.topo() if n in active]):
        if n not in grads or g.op(n) == "input":
            continue
        spec = OPS[g.op(n)]
        if spec.grad is None:
            raise DlcError(f"`{spec.user_name}` has no gradient, but the loss depends on it through a parameter",
                           g[n]["loc"])
        with g.at(g[n]["loc"], role="grad"):
            ins = spec.grad(g, n, grads[n])
            for a, da in zip(g.args(n), ins):
                if da is None or a not in active or g.dtype(a) not in FLOATS:
                    continue
                grads[a] = da if a not in grads else g.add("add", grads[a], da)
    out = {}
    for w in wrt:
        if w in grads:
            out[w] = grads[w]
        else:  # the loss does not depend on w
            with g.at(g[w]["loc"], role="grad"):
                out[w] = g.add("broadcast_to", g.const(0.0, g.dtype(w)), shape=g.shape(w))
    return out
