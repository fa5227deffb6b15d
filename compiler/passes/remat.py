"""Pass `remat`: the backward pass recomputes cheap forward values instead of reading them.

A gradient often reads elementwise values of the forward pass that nothing else needs in
memory: GELU's backward reads `0.5 x`, `1 + tanh(u)`, `tanh(u)` and `x`, all computed in the
epilogue of the forward matmul. Fusion would write each of them out there (four tensors of
the layer's size) for the backward kernel to read again. Here the gradient's elementwise ops
get their own copies of such values instead (clones marked `remat`, role "grad"), computed
from what the forward pass stores anyway (the matmul's output, a parameter), and `fusion`
keeps the clones out of forward kernels, so they land in the backward kernel that reads them.

A forward value is cloned when it is a cheap elementwise op (`CHEAP`) whose readers are all
elementwise ops of its shape (so memory is not needed for another reason); the clone's own
arguments are cloned by the same rule, at most `MAX_CONE` nodes per value read. Values a
matmul, a reduction, a view or an output reads stay read from memory.
"""
from __future__ import annotations

from ..ops import OPS, Kind

CHEAP = frozenset({"abs", "add", "cast", "cos", "div", "erf", "exp", "log", "maximum", "minimum", "mul", "neg",
                   "pow", "relu", "sigmoid", "sign", "sin", "sqrt", "sub", "tanh", "where", "gt", "ge", "lt", "le",
                   "eq", "ne", "logical_and", "logical_or", "logical_not", "floor"})
MAX_CONE = 32


def _elementwise(g, n) -> bool:
    return g.op(n) != "scan" and OPS[g.op(n)].kind in (Kind.ELEMENTWISE, Kind.BROADCAST) and not OPS[g.op(n)].remaps


def remat(g, ctx):
    grads = [n for n in g.topo() if g[n].get("role") == "grad" and _elementwise(g, n)]
    if not grads:
        return g
    roots = set(g.live_roots())
    clones: dict[int, int] = {}

    def clonable(f, shape) -> bool:
        if g[f].get("role") != "forward" or g.op(f) not in CHEAP or f in roots or g.shape(f) != shape:
            return False
        return all(_elementwise(g, c) and g.shape(c) == shape for c in g.consumers(f))

    def clone(f, budget: list) -> int:
        if f in clones:
            return clones[f]
        budget[0] -= 1
        shape = g.shape(f)
        args = [clone(a, budget) if budget[0] > 0 and clonable(a, shape) else a for a in g.args(f)]
        d = g[f]
        with g.at(d["loc"], "grad"):
            c = g.add(d["op"], *args, **d["attrs"])
        g[c]["remat"] = True
        clones[f] = c
        return c

    for r in grads:
        shape = g.shape(r)
        args = g.args(r)
        new = [clone(a, [MAX_CONE]) if clonable(a, shape) else a for a in args]
        if new != list(args):
            g.set_args(r, new)
    return g
