"""Shapes with symbolic dimensions, dtypes, and broadcasting.

A dimension is an `int` or a `str`: a symbol bound from an input at run time (`"B"`), or a
product of symbols and one integer written canonically (`"B*T"`, `"4*H"` is folded to ints
when H is known). Shapes are tuples of dimensions.
"""
from __future__ import annotations

from math import prod

import numpy as np

DTYPES = {"f32": np.float32, "f64": np.float64, "i32": np.int32, "i64": np.int64, "bool": np.bool_}
FLOATS = ("f32", "f64")
INTS = ("i32", "i64")


class ShapeError(Exception):
    """Raised by shape rules; the IR turns it into a located `DlcError`."""


Dim = "int | str"


def fmt_dim(d) -> str:
    return str(d)


def fmt_shape(s) -> str:
    return "[" + ", ".join(fmt_dim(d) for d in s) + "]"


def fmt_type(dtype, shape) -> str:
    return f"{dtype}{fmt_shape(shape)}"


def dim_factors(d) -> tuple[int, tuple[str, ...]]:
    if isinstance(d, int):
        return d, ()
    coef, syms = 1, []
    for f in d.split("*"):
        if f.isdigit():
            coef *= int(f)
        else:
            syms.append(f)
    return coef, tuple(sorted(syms))


def _from_factors(coef: int, syms) -> "int | str":
    if not syms:
        return coef
    parts = ([str(coef)] if coef != 1 else []) + list(syms)
    return "*".join(parts)


def dim_mul(a, b):
    ca, sa = dim_factors(a)
    cb, sb = dim_factors(b)
    return _from_factors(ca * cb, tuple(sorted(sa + sb)))


def dim_div(a, b):
    """Exact division of dims (for reshape's -1); None if not exact."""
    ca, sa = dim_factors(a)
    cb, sb = dim_factors(b)
    rest = list(sa)
    for s in sb:
        if s not in rest:
            return None
        rest.remove(s)
    if cb == 0 or ca % cb:
        return None
    return _from_factors(ca // cb, tuple(rest))


def numel(shape):
    out = 1
    for d in shape:
        out = dim_mul(out, d)
    return out


def same_dim(a, b) -> bool:
    return dim_factors(a) == dim_factors(b)


def broadcast(*shapes):
    """NumPy broadcasting over symbolic shapes. A symbol only matches itself or 1."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        ds = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        d = 1
        for x in ds:
            if x == 1:
                continue
            if d == 1:
                d = x
            elif not same_dim(d, x):
                raise ShapeError("cannot broadcast shapes " + " and ".join(fmt_shape(s) for s in shapes))
        out.append(d)
    return tuple(out)


def norm_axes(axes, rank: int) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(rank))
    if isinstance(axes, int):
        axes = (axes,)
    out = []
    for a in axes:
        if not -rank <= a < rank:
            raise ShapeError(f"axis {a} is out of range for a tensor of rank {rank}")
        out.append(a % rank)
    return tuple(sorted(set(out)))


def resolve(shape, env: dict) -> tuple[int, ...]:
    """Concrete shape given symbol values."""
    out = []
    for d in shape:
        c, syms = dim_factors(d)
        out.append(c * prod(env[s] for s in syms))
    return tuple(out)


def symbols(shape) -> set[str]:
    out = set()
    for d in shape:
        out.update(dim_factors(d)[1])
    return out


def promote(*dtypes) -> str:
    """Result dtype of an arithmetic op: the widest float, else the widest int."""
    order = ["bool", "i32", "i64", "f32", "f64"]
    return max(dtypes, key=order.index)
