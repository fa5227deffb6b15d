"""Decoding primitives: `top_k`, which keeps the k largest logits of each row (the others become
-inf), so that `sample` -- the categorical draw from the counter-based stream (ops_nn.py) --
or `argmax` then picks among them only.

Ties are kept: every entry at least as large as the row's k-th largest stays, as in the usual
top-k filtering (`logits < topk(logits, k).values[..., -1]` set to -inf). The gradient passes to
the entries kept.
"""
from __future__ import annotations

import numpy as np

from .ops import Kind, Op, _zero_like, register
from .shapes import ShapeError, numel


def _top_k_infer(s, d, a):
    if len(s[0]) == 0:
        raise ShapeError("top_k needs logits with a class axis")
    c = s[0][-1]
    if isinstance(c, int) and not 1 <= a["k"] <= c:
        raise ShapeError(f"keeps 1 to {c} of the {c} classes, not {a['k']}")
    if d[0] not in ("f32", "f64"):
        raise ShapeError(f"top_k takes float logits, got {d[0]}")
    return tuple(s[0]), d[0]


def _top_k_ref(x, *, k):
    kth = np.sort(x, axis=-1)[..., -k][..., None]
    return np.where(x >= kth, x, -np.inf).astype(x.dtype)


top_k = register(Op(
    "top_k", Kind.OPAQUE, _top_k_infer, ref=_top_k_ref,
    kernel_sizes=lambda g, n: {"R": numel(g.shape(g.args(n)[0])[:-1]), "C": g.shape(g.args(n)[0])[-1]},
    kernel="""\
xin = {x0}.reshape(({R}, {C}))
yout = {out}.reshape(({R}, {C}))
for r in range({R}):
    kth = np.sort(xin[r])[{C} - {k}]
    for j in range({C}):
        yout[r, j] = xin[r, j] if xin[r, j] >= kth else -np.inf
"""))


@top_k.def_grad
def _(g, n, dy):
    x = g.args(n)[0]
    return [g.add("where", g.add("eq", n, x), dy, _zero_like(g, dy))]
