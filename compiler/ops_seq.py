"""Primitives for sequence models: slicing along an axis (and its adjoint), gathering rows of
a table (embeddings; the adjoint is a scatter-add), and argmax (greedy decoding).

`slice`, `unslice` and `take` are elementwise ops whose arguments are read at a remapped
index, so they fuse with the ops around them; the remapping lives in the codegen's `read`.
"""
from __future__ import annotations

import numpy as np

from .ops import OPS, Kind, Op, register
from .shapes import INTS, ShapeError, fmt_shape, norm_axes


def _axis(a, rank):
    return norm_axes((a["axis"],), rank)[0]


def _shift(idx: list, axis: int, by: str) -> list:
    """The index `idx` moved along `axis` (`by`: "+ 3", "- 3")."""
    return [f"{i} {by}" if k == axis else i for k, i in enumerate(idx)]


def _slice_infer(s, d, a):
    x = s[0]
    ax = _axis(a, len(x))
    start, stop = a["start"], a["stop"]
    if not isinstance(x[ax], int):
        raise ShapeError(f"cannot slice the symbolic axis {ax} of {fmt_shape(x)}")
    if not 0 <= start < stop <= x[ax]:
        raise ShapeError(f"slice [{start}:{stop}] is outside axis {ax} of {fmt_shape(x)}")
    return tuple(stop - start if i == ax else v for i, v in enumerate(x)), d[0]


def _slice_ref(x, *, axis, start, stop):
    ix = [slice(None)] * x.ndim
    ix[axis] = slice(start, stop)
    return x[tuple(ix)].copy()


slice_ = register(Op("slice", Kind.BROADCAST, _slice_infer, ref=_slice_ref, scalar="{0}", remaps=(0,),
                     read_at=lambda a, pos, idx: _shift(idx, a["axis"], f"+ {a['start']}"),
                     canon=lambda s, a: {**a, "axis": _axis(a, len(s[0]))}))


def _unslice_infer(s, d, a):
    y = s[0]
    ax = _axis(a, len(y))
    if y[ax] != a["stop"] - a["start"]:
        raise ShapeError(f"unslice of {fmt_shape(y)} into [{a['start']}:{a['stop']}] of {a['size']}")
    return tuple(a["size"] if i == ax else v for i, v in enumerate(y)), d[0]


def _unslice_ref(y, *, axis, start, stop, size):
    shape = list(y.shape)
    shape[axis] = size
    out = np.zeros(shape, y.dtype)
    ix = [slice(None)] * y.ndim
    ix[axis] = slice(start, stop)
    out[tuple(ix)] = y
    return out


# The adjoint of slice: dy placed at [start:stop] of a zero tensor.
unslice = register(Op("unslice", Kind.BROADCAST, _unslice_infer, ref=_unslice_ref, remaps=(0,),
                      read_at=lambda a, pos, idx: _shift(idx, a["axis"], f"- {a['start']}"),  # (guarded by the template)
                      scalar="({0} if {start} <= {ax} < {stop} else {T}(0.0))",
                      canon=lambda s, a: {**a, "axis": _axis(a, len(s[0]))}))


@slice_.def_grad
def _(g, n, dy):
    a = g.attrs(n)
    x = g.args(n)[0]
    return [g.add("unslice", dy, axis=a["axis"], start=a["start"], stop=a["stop"], size=g.shape(x)[a["axis"]])]


@unslice.def_grad
def _(g, n, dy):
    a = g.attrs(n)
    return [g.add("slice", dy, axis=a["axis"], start=a["start"], stop=a["stop"])]


def _take_infer(s, d, a):
    table, idx = s
    if len(table) != 2:
        raise ShapeError(f"an embedding table is [vocabulary, dim], got {fmt_shape(table)}")
    if d[1] not in INTS:
        raise ShapeError(f"indices must be integers, got {d[1]}")
    return tuple(idx) + (table[1],), d[0]


# out[..., j] = table[idx[...], j]
take = register(Op("take", Kind.BROADCAST, _take_infer, ref=lambda t, i: t[i], scalar="{0}", remaps=(0, 1),
                   read_at=lambda a, pos, idx: ["{1}", idx[-1]] if pos == 0 else idx[:-1]))   # table[ids[i...], j]


def _scatter_infer(s, d, a):
    return (a["rows"], s[1][-1]), d[1]


def _scatter_ref(idx, dy, *, rows):
    out = np.zeros((rows, dy.shape[-1]), dy.dtype)
    np.add.at(out, idx.reshape(-1), dy.reshape(-1, dy.shape[-1]))
    return out


scatter_add = register(Op(
    "scatter_add", Kind.OPAQUE, _scatter_infer, ref=_scatter_ref,
    kernel_sizes=lambda g, n: {"M": _numel(g.shape(g.args(n)[0])), "D": g.shape(n)[1]},
    kernel="""\
{out}[:, :] = 0
ids = {x0}.reshape(-1)
rows = {x1}.reshape(({M}, {D}))
for m in range({M}):
    k = ids[m]
    for j in range({D}):
        {out}[k, j] += rows[m, j]
"""))


def _numel(shape):
    from .shapes import numel
    return numel(shape)


@take.def_grad
def _(g, n, dy):
    table, idx = g.args(n)
    return [g.add("scatter_add", idx, dy, rows=g.shape(table)[0]), None]


def _argmax_infer(s, d, a):
    if len(s[0]) == 0:
        raise ShapeError("argmax needs at least one axis")
    return tuple(s[0][:-1]), "i32"


argmax = register(Op(
    "argmax", Kind.OPAQUE, _argmax_infer, ref=lambda x: np.argmax(x, axis=-1).astype(np.int32),
    kernel_sizes=lambda g, n: {"R": _numel(g.shape(g.args(n)[0])[:-1]), "C": g.shape(g.args(n)[0])[-1]},
    kernel="""\
xin = {x0}.reshape(({R}, {C}))
yout = {out}.reshape(-1)
for r in range({R}):
    best = 0
    for j in range(1, {C}):
        if xin[r, j] > xin[r, best]:
            best = j
    yout[r] = best
"""))
OPS["argmax"].grad = lambda g, n, dy: [None]
