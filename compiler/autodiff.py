"""Reverse-mode symbolic differentiation: the backward pass is built in the same IR.

Walking the graph backwards from the seeded outputs, each op's gradient rule (in the op
registry) adds the nodes computing the gradient of each of its inputs; gradients reaching a
node along several paths are summed. Ops with several results (a `scan`) are read through
`get` nodes; their rule receives one cotangent per result (None where nothing flows back).
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
    with g.at(g[loss]["loc"], role="grad"):
        seed = g.const(1.0, g.dtype(loss))
    return vjp(g, {loss: seed}, wrt)


def vjp(g, seeds: dict[int, int], wrt: list[int], zeros_for_missing: bool = True) -> dict[int, int]:
    """Vector-Jacobian product: given cotangents `seeds` {node: cotangent node}, add the
    gradient of sum(node * cotangent) with respect to each node of `wrt`."""
    roots = list(seeds)
    reaches = set()
    for r in roots:
        reaches |= nx.ancestors(g.g, r) | {r}
    from_wrt = set()
    for w in wrt:
        from_wrt |= nx.descendants(g.g, w) | {w}
    active = reaches & from_wrt
    grads: dict[int, int] = dict(seeds)
    tuple_grads: dict[int, dict[int, int]] = {}

    def accumulate(a, da):
        grads[a] = da if a not in grads else g.add("add", grads[a], da)

    for n in reversed([n for n in g.topo() if n in active]):
        op = g.op(n)
        if op == "input":
            continue
        if op == "get":                     # one result of a multi-result op
            if n in grads:
                src, i = g.args(n)[0], g.attrs(n)["index"]
                parts = tuple_grads.setdefault(src, {})
                with g.at(g[n]["loc"], role="grad"):
                    parts[i] = grads[n] if i not in parts else g.add("add", parts[i], grads[n])
            continue
        cot = tuple_grads.get(n) if g.dtype(n) == "tuple" else grads.get(n)
        if cot is None:
            continue
        spec = OPS[op]
        if spec.grad is None:
            raise DlcError(f"`{spec.user_name}` has no gradient, but the loss depends on it through a parameter",
                           g[n]["loc"])
        with g.at(g[n]["loc"], role="grad"):
            ins = spec.grad(g, n, cot)
            for a, da in zip(g.args(n), ins):
                if da is None or a not in active or g.dtype(a) not in FLOATS:
                    continue
                accumulate(a, da)
    out = {}
    for w in wrt:
        if w in grads:
            out[w] = grads[w]
        elif zeros_for_missing:             # nothing depends on w
            with g.at(g[w]["loc"], role="grad"):
                out[w] = g.add("broadcast_to", g.const(0.0, g.dtype(w)), shape=g.shape(w))
    return out
