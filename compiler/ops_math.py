"""Primitives for math beyond the basics: `floor`, `sin`, `cos`, integer division `//`,
the logical ops behind `and`/`or`/`not`, `iota` (the index along an axis: `arange`, masks),
`flip` along an axis and `cumsum`.

`flip` and `cumsum` read along a whole axis, so each is its own kernel: the input is viewed
as [P, N, Q] (the axis in the middle), and the output written at the same view.
"""
from __future__ import annotations

import numpy as np

from .ops import Kind, Op, register, unary
from .shapes import DTYPES, FLOATS, ShapeError, broadcast, norm_axes, numel, promote


def _axis(s, a):
    return {**a, "axis": norm_axes((a["axis"],), len(s[0]))[0]}


def _no_grad(g, n, dy):
    return [None] * len(g.args(n))


# ---- elementwise ---------------------------------------------------------------------------------
floor = unary("floor", np.floor, "np.floor({0})")
sin = unary("sin", np.sin, "np.sin({0})")
cos = unary("cos", np.cos, "np.cos({0})")
floor.grad = _no_grad                     # piecewise constant


@sin.def_grad
def _(g, n, dy):
    return [g.add("mul", dy, g.add("cos", g.args(n)[0]))]


@cos.def_grad
def _(g, n, dy):
    return [g.add("neg", g.add("mul", dy, g.add("sin", g.args(n)[0])))]


def _floordiv_infer(s, d, a):
    if "bool" in d:
        raise ShapeError(f"`//` takes numbers, got {d[0]} and {d[1]}")
    return broadcast(s[0], s[1]), promote(d[0], d[1])


# Python's (and NumPy's) floor division: rounds toward -inf, for integers and floats alike.
floordiv = register(Op("floordiv", Kind.BROADCAST, _floordiv_infer, ref=np.floor_divide,
                       scalar="({0} // {1})", user_name="//", grad=_no_grad))


def _logical_infer(s, d, a):
    if any(x != "bool" for x in d):
        raise ShapeError(f"expects booleans (comparisons), got {' and '.join(d)}")
    return broadcast(*s), "bool"


register(Op("logical_and", Kind.BROADCAST, _logical_infer, ref=np.logical_and, scalar="({0} & {1})",
            user_name="and", grad=_no_grad))
register(Op("logical_or", Kind.BROADCAST, _logical_infer, ref=np.logical_or, scalar="({0} | {1})",
            user_name="or", grad=_no_grad))
register(Op("logical_not", Kind.ELEMENTWISE, _logical_infer, ref=np.logical_not, scalar="(not {0})",
            user_name="not", grad=_no_grad))


# ---- iota: each element's index along one axis ---------------------------------------------------
def _iota_infer(s, d, a):
    if not s[0]:
        raise ShapeError("needs a tensor of rank >= 1")
    if a["dtype"] not in DTYPES or a["dtype"] == "bool":
        raise ShapeError(f"dtype must be a number type, got {a['dtype']}")
    return s[0], a["dtype"]


def _iota_ref(x, *, axis, dtype):
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return np.broadcast_to(np.arange(x.shape[axis]).reshape(shape), x.shape).astype(DTYPES[dtype])


# Shaped like its argument, which it never reads (the argument carries the symbolic shape).
register(Op("iota", Kind.BROADCAST, _iota_infer, ref=_iota_ref, scalar="{T}({ax})", canon=_axis,
            grad=_no_grad))


# ---- flip and cumsum: along a whole axis -------------------------------------------------------
def _pnq(g, n):
    """The input viewed as [P, N, Q] around the op's axis."""
    shape, ax = g.shape(g.args(n)[0]), g.attrs(n)["axis"]
    return {"P": numel(shape[:ax]), "N": shape[ax], "Q": numel(shape[ax + 1:])}


def _axis_infer(s, d, a):
    if not s[0]:
        raise ShapeError("needs a tensor of rank >= 1")
    return s[0], d[0]


flip = register(Op(
    "flip", Kind.OPAQUE, _axis_infer, canon=_axis, kernel_sizes=_pnq,
    ref=lambda x, *, axis: np.flip(x, axis).copy(),
    kernel="""\
xin = {x0}.reshape(({P}, {N}, {Q}))
yout = {out}.reshape(({P}, {N}, {Q}))
for p in range({P}):
    for k in range({N}):
        for q in range({Q}):
            yout[p, k, q] = xin[p, {N} - 1 - k, q]
"""))


@flip.def_grad
def _(g, n, dy):
    return [g.add("flip", dy, axis=g.attrs(n)["axis"])]


def _cumsum_infer(s, d, a):
    _axis_infer(s, d, a)
    return s[0], "i32" if d[0] == "bool" else d[0]     # a running count of a mask


def _cumsum_ref(x, *, axis, reverse):
    if reverse:
        return np.flip(np.cumsum(np.flip(x, axis), axis), axis)
    return np.cumsum(x, axis)


# Inclusive running sum along the axis; `reverse` sums from the end (the adjoint of the other).
# Row by row, each row the previous row plus the input: the inner loop runs over contiguous Q.
cumsum = register(Op(
    "cumsum", Kind.OPAQUE, _cumsum_infer, canon=_axis, kernel_sizes=_pnq, ref=_cumsum_ref,
    kernel="""\
xin = {x0}.reshape(({P}, {N}, {Q}))
yout = {out}.reshape(({P}, {N}, {Q}))
for p in range({P}):
    k = {N} - 1 if {reverse} else 0
    for q in range({Q}):
        yout[p, k, q] = xin[p, k, q]
    for s in range(1, {N}):
        k = {N} - 1 - s if {reverse} else s
        j = k + 1 if {reverse} else k - 1
        for q in range({Q}):
            yout[p, k, q] = yout[p, j, q] + xin[p, k, q]
"""))


@cumsum.def_grad
def _(g, n, dy):
    if g.dtype(g.args(n)[0]) not in FLOATS:
        return [None]
    a = g.attrs(n)
    return [g.add("cumsum", dy, axis=a["axis"], reverse=not a["reverse"])]
