"""Functions that `.dl` code can call which map onto primitives (and `mean`, built from them).

Each builtin is declared with its parameter list; arguments are bound and checked here so
that every builtin reports arity and keyword mistakes the same way.
"""
from __future__ import annotations

from dsl.diagnostics import DlcError

from .shapes import FLOATS, INTS, norm_axes, ShapeError

_REQUIRED = object()
BUILTINS: dict = {}


def builtin(name, *params, **defaults):
    """Register `fn(lw, e, **bound)`: `params` are required, `defaults` optional."""
    names = list(params) + list(defaults)

    def deco(fn):
        def call(lw, e, args, kwargs):
            if len(args) > len(names):
                raise DlcError(f"`{name}` takes at most {len(names)} argument{'s' * (len(names) != 1)} "
                               f"({', '.join(names)}), got {len(args)}", e.loc)
            bound = dict(zip(names, args))
            for k, v in kwargs.items():
                if k not in names:
                    raise DlcError(f"`{name}` has no parameter `{k}`", e.loc, [f"parameters: {', '.join(names)}"])
                if k in bound:
                    raise DlcError(f"`{name}`: argument `{k}` given twice", e.loc)
                bound[k] = v
            for p in params:
                if p not in bound:
                    raise DlcError(f"`{name}` is missing argument `{p}`", e.loc, [f"parameters: {', '.join(names)}"])
            for k, v in defaults.items():
                bound.setdefault(k, v)
            return fn(lw, e, **bound)
        BUILTINS[name] = call
        return fn
    return deco


def _tensor(lw, e, v, what="argument"):
    from .lower import Tensor
    if isinstance(v, Tensor):
        return v.node
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return lw.to_tensor(v, None, e.loc).node
    raise DlcError(f"`{e.func}`: {what} must be a tensor, got {lw._describe(v)}", e.loc)


def _T(n):
    from .lower import Tensor
    return Tensor(n)


def _unary(name, op=None):
    @builtin(name, "x")
    def f(lw, e, x):
        return _T(lw.g.add(op or name, _tensor(lw, e, x)))


for _n in ("exp", "log", "sqrt", "tanh", "sigmoid", "relu", "erf"):
    _unary(_n)
_unary("abs")
_unary("sign")


def _binary(name, op):
    @builtin(name, "a", "b")
    def f(lw, e, a, b):
        from .lower import Tensor
        if not isinstance(a, Tensor) and not isinstance(b, Tensor):
            import builtins as py
            return {"maximum": py.max, "minimum": py.min}[name](a, b)
        da = lw.g.dtype(a.node) if isinstance(a, Tensor) else None
        db = lw.g.dtype(b.node) if isinstance(b, Tensor) else None
        return _T(lw.g.add(op, lw.to_tensor(a, db, e.loc).node, lw.to_tensor(b, da, e.loc).node))


_binary("maximum", "maximum")
_binary("minimum", "minimum")


@builtin("where", "cond", "a", "b")
def _where(lw, e, cond, a, b):
    from .lower import Tensor
    c = _tensor(lw, e, cond, "the condition")
    da = lw.g.dtype(a.node) if isinstance(a, Tensor) else None
    db = lw.g.dtype(b.node) if isinstance(b, Tensor) else None
    return _T(lw.g.add("where", c, lw.to_tensor(a, db or da, e.loc).node, lw.to_tensor(b, da or db, e.loc).node))


def _axes(lw, e, x, axis):
    rank = len(lw.g.shape(x))
    if axis is None:
        return tuple(range(rank))
    ax = tuple(axis) if isinstance(axis, list) else (axis,)
    if not all(isinstance(a, int) and not isinstance(a, bool) for a in ax):
        raise DlcError(f"`{e.func}`: axis must be an integer or a list of integers", e.loc)
    try:
        return norm_axes(ax, rank)
    except ShapeError as err:
        raise DlcError(f"`{e.func}`: {err}", e.loc) from None


@builtin("sum", "x", axis=None, keepdims=False)
def _sum(lw, e, x, axis, keepdims):
    x = _tensor(lw, e, x)
    return _T(lw.g.add("reduce_sum", x, axes=_axes(lw, e, x, axis), keepdims=bool(keepdims)))


@builtin("max", "x", axis=None, keepdims=False)
def _max(lw, e, x, axis, keepdims):
    x = _tensor(lw, e, x)
    return _T(lw.g.add("reduce_max", x, axes=_axes(lw, e, x, axis), keepdims=bool(keepdims)))


@builtin("mean", "x", axis=None, keepdims=False)
def _mean(lw, e, x, axis, keepdims):
    """mean = sum / size: `size` is a run-time count when the axes are symbolic (the batch)."""
    x = _tensor(lw, e, x)
    if lw.g.dtype(x) not in FLOATS:
        x = lw.g.add("cast", x, dtype=lw.float_dtype)
    axes = _axes(lw, e, x, axis)
    s = lw.g.add("reduce_sum", x, axes=axes, keepdims=bool(keepdims))
    n = lw.g.add("size", x, axes=axes, dtype=lw.g.dtype(x))
    return _T(lw.g.add("div", s, n))


@builtin("softmax", "x", axis=-1)
def _softmax(lw, e, x, axis):
    return _T(lw.g.add("softmax", _tensor(lw, e, x), axis=axis))


@builtin("log_softmax", "x", axis=-1)
def _log_softmax(lw, e, x, axis):
    return _T(lw.g.add("log_softmax", _tensor(lw, e, x), axis=axis))


@builtin("onehot", "labels", "depth")
def _onehot(lw, e, labels, depth):
    if not isinstance(depth, int) or isinstance(depth, bool) or depth <= 0:
        raise DlcError("`onehot`: depth must be a positive integer", e.loc)
    return _T(lw.g.add("onehot", _tensor(lw, e, labels), depth=depth, dtype=lw.float_dtype))


@builtin("float", "x")
def _float(lw, e, x):
    x = _tensor(lw, e, x)
    return _T(lw.g.add("cast", x, dtype=lw.float_dtype))


@builtin("reshape", "x", "shape")
def _reshape(lw, e, x, shape):
    x = _tensor(lw, e, x)
    if not isinstance(shape, list) or not all(isinstance(d, (int, str)) for d in shape):
        raise DlcError("`reshape`: shape must be a list of integers (one may be -1)", e.loc)
    return _T(lw.g.add("reshape", x, shape=tuple(shape)))


@builtin("transpose", "x", perm=None)
def _transpose(lw, e, x, perm):
    x = _tensor(lw, e, x)
    rank = len(lw.g.shape(x))
    perm = tuple(range(rank))[::-1] if perm is None else tuple(perm)
    return _T(lw.g.add("transpose", x, perm=perm))
