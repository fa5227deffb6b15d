"""Functions that `.dl` code can call which map onto primitives (and `mean`, built from them).

Each builtin is declared with its parameter list; arguments are bound and checked here so
that every builtin reports arity and keyword mistakes the same way.
"""
from __future__ import annotations

import math

import numpy as np

from dsl import ast as A
from dsl.diagnostics import DlcError

from .ops import OPS
from .shapes import FLOATS, INTS, ShapeError, broadcast, fmt_shape, norm_axes, same_dim

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


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fold(e, op, *vals):
    """A primitive applied to numbers alone is computed now, with the op's NumPy reference."""
    with np.errstate(all="ignore"):
        v = OPS[op].ref(*(np.float64(x) for x in vals)).item()
    if not math.isfinite(v) and all(math.isfinite(x) for x in vals):
        raise DlcError(f"`{e.func}({', '.join(map(repr, vals))})` is {v}", e.loc)
    if op == "floor" or op in ("abs", "sign") and all(isinstance(x, int) for x in vals):
        return int(v)                           # floor(7 / 2) is the integer 3, usable as a size
    return v


def _unary(name):
    @builtin(name, "x")
    def f(lw, e, x):
        if _number(x):
            return _fold(e, name, x)
        return _T(lw.g.add(name, _tensor(lw, e, x)))


def _binary(name):
    @builtin(name, "a", "b")
    def f(lw, e, a, b):
        from .lower import Tensor
        if _number(a) and _number(b):
            return OPS[name].ref(a, b).item()
        da = lw.g.dtype(a.node) if isinstance(a, Tensor) else None
        db = lw.g.dtype(b.node) if isinstance(b, Tensor) else None
        return _T(lw.g.add(name, lw.to_tensor(a, db, e.loc).node, lw.to_tensor(b, da, e.loc).node))


# The simple builtins, generated from the op registry: `exp(x)`, `floor(x)`, `maximum(a, b)`, ...
# (on numbers alone, computed now with the op's reference)
for _op in list(OPS.values()):
    if _op.builtin == ("x",):
        _unary(_op.name)
    elif _op.builtin == ("a", "b"):
        _binary(_op.name)


def matmul(lw, a: int, b: int) -> int:
    """a @ b with NumPy's batch broadcasting: an operand whose batch dimensions differ from the
    broadcast batch is broadcast to it first (a 2-D right operand is applied to every row as is)."""
    sa, sb = lw.g.shape(a), lw.g.shape(b)
    if len(sa) >= 2 and len(sb) >= 2 and not (len(sb) == 2 or sa[:-2] == sb[:-2]):
        try:
            batch = broadcast(tuple(sa[:-2]), tuple(sb[:-2]))
        except ShapeError:
            return lw.g.add("matmul", a, b)          # its shape rule reports the mismatch
        if tuple(sa[:-2]) != batch:
            a = lw.g.add("broadcast_to", a, shape=batch + tuple(sa[-2:]))
        if tuple(sb[:-2]) != batch:
            b = lw.g.add("broadcast_to", b, shape=batch + tuple(sb[-2:]))
    return lw.g.add("matmul", a, b)


@builtin("matmul", "a", "b")
def _matmul(lw, e, a, b):
    return _T(matmul(lw, _tensor(lw, e, a), _tensor(lw, e, b)))


@builtin("where", "cond", "a", "b")
def _where(lw, e, cond, a, b):
    from .lower import Tensor
    if isinstance(cond, bool):              # known at compile time (`mask = true`)
        pick, other = (a, b) if cond else (b, a)
        if isinstance(pick, Tensor) and not isinstance(other, Tensor):
            return pick
        cond = _T(lw.g.const(cond, "bool"))
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


def _flag(lw, e, v, what):
    if not isinstance(v, bool):
        raise DlcError(f"`{e.func}`: {what} must be true or false, got {_show(lw, v)}", e.loc)
    return v


def _int(lw, e, v, what, low=None):
    if not _integer(v) or (low is not None and v < low):
        need = "an integer" if low is None else f"an integer >= {low}"
        raise DlcError(f"`{e.func}`: {what} must be {need}, got {_show(lw, v)}", e.loc)
    return v


def _integer(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(lw, v, inner=False) -> str:
    """A value as a message shows it: tensors by type, lists as written, dimensions by name."""
    from .lower import SymDim
    if isinstance(v, list):
        return "[" + ", ".join(_show(lw, x, True) for x in v) + "]"
    if isinstance(v, SymDim) or inner and _number(v):
        return str(v)
    return lw._describe(v)


def _shape(lw, e, shape, what="shape", infer=False) -> tuple:
    """A list of dimensions: positive integers or symbolic names such as B (and one -1 with `infer`)."""
    from .lower import SymDim
    ok = isinstance(shape, list) and all(isinstance(d, SymDim) or (_integer(d) and (d > 0 or infer and d == -1))
                                         for d in shape)
    if not ok or (infer and shape.count(-1) > 1):
        extra = " (one may be -1)" if infer else ""
        raise DlcError(f"`{e.func}`: {what} must be a list of dimensions{extra}: positive integers or names such as "
                       f"B, got {_show(lw, shape)}", e.loc)
    return tuple(shape)


@builtin("sum", "x", axis=None, keepdims=False)
def _sum(lw, e, x, axis, keepdims):
    """The sum; of booleans, the count (as an i32)."""
    x = _tensor(lw, e, x)
    if lw.g.dtype(x) == "bool":
        x = lw.g.add("cast", x, dtype="i32")
    return _T(lw.g.add("reduce_sum", x, axes=_axes(lw, e, x, axis), keepdims=_flag(lw, e, keepdims, "keepdims")))


@builtin("max", "x", axis=None, keepdims=False)
def _max(lw, e, x, axis, keepdims):
    x = _tensor(lw, e, x)
    return _T(lw.g.add("reduce_max", x, axes=_axes(lw, e, x, axis), keepdims=_flag(lw, e, keepdims, "keepdims")))


@builtin("mean", "x", axis=None, keepdims=False)
def _mean(lw, e, x, axis, keepdims):
    """mean = sum / size: `size` is a run-time count when the axes are symbolic (the batch)."""
    x = _tensor(lw, e, x)
    if lw.g.dtype(x) not in FLOATS:
        x = lw.g.add("cast", x, dtype=lw.float_dtype)
    axes = _axes(lw, e, x, axis)
    s = lw.g.add("reduce_sum", x, axes=axes, keepdims=_flag(lw, e, keepdims, "keepdims"))
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
    return _T(lw.g.add("reshape", x, shape=_shape(lw, e, shape, infer=True)))


@builtin("transpose", "x", perm=None)
def _transpose(lw, e, x, perm):
    x = _tensor(lw, e, x)
    rank = len(lw.g.shape(x))
    if perm is None:
        perm = list(range(rank))[::-1]
    if not isinstance(perm, list) or sorted(p for p in perm if _integer(p)) != list(range(rank)):
        raise DlcError(f"`transpose`: perm must list the axes 0 to {rank - 1} in a new order, got {_show(lw, perm)}",
                       e.loc)
    return _T(lw.g.add("transpose", x, perm=tuple(perm)))


@builtin("choice", "value", "options")
def _choice(lw, e, value, options):
    """`returns = choice(returns, ["sequence", "last", "state"])`: an option checked at compile
    time against its allowed values (a misspelt option must not silently mean the default)."""
    if not isinstance(options, list) or not options:
        raise DlcError("`choice` takes the allowed values as a non-empty list", e.loc)
    if value not in options or isinstance(value, bool) != isinstance(options[0], bool):
        what = f"`{e.args[0].name}`" if e.args and isinstance(e.args[0], A.Name) else "the option"
        allowed = ", ".join(f'"{o}"' if isinstance(o, str) else str(o) for o in options)
        got = f'"{value}"' if isinstance(value, str) else _show(lw, value)
        raise DlcError(f"{what} must be one of {allowed}, got {got}", e.loc)
    return value


@builtin("in_range", "value", "interval")
def _in_range(lw, e, value, interval):
    """`rate = in_range(rate, "[0, 1)")`: a number option checked at compile time against an
    interval, written with brackets for included ends and parentheses for excluded ones
    ("(0, inf)": positive), so a layer's option that cannot work is refused where it is given."""
    import re
    m = re.fullmatch(r"\s*([\[(])\s*(-?(?:inf|[0-9.e+-]+))\s*,\s*(-?(?:inf|[0-9.e+-]+))\s*([\])])\s*",
                     interval) if isinstance(interval, str) else None
    if m is None:
        raise DlcError('`in_range` takes an interval such as "[0, 1)" or "(0, inf)"', e.loc)
    low, high = float(m[2]), float(m[3])
    low_in, high_in = m[1] == "[", m[4] == "]"
    what = f"`{e.args[0].name}`" if e.args and isinstance(e.args[0], A.Name) else "the option"
    if not _number(value):
        raise DlcError(f"{what} must be a number, got {_show(lw, value)}", e.loc)
    if (low <= value if low_in else low < value) and (value <= high if high_in else value < high):
        return value
    if (low, high) == (0.0, math.inf):
        need = "non-negative" if low_in else "positive"
    else:
        need = f"in {m[1]}{m[2]}, {m[3]}{m[4]}"
    raise DlcError(f"{what} must be {need}, got {value}", e.loc)


@builtin("divides", "k", "n", "what")
def _divides(lw, e, k, n, what):
    """`heads = divides(heads, D, "the model width")`: k, checked at compile time to be a
    positive integer dividing the size n (a symbolic n is left to the reshape that follows)."""
    name = e.args[0].name if e.args and isinstance(e.args[0], A.Name) else "the value"
    if not _integer(k) or k < 1:
        raise DlcError(f"{name} must be a positive integer, got {_show(lw, k)}", e.loc)
    if _integer(n) and n % k:
        raise DlcError(f"{name} ({k}) must divide {what} ({n})", e.loc)
    return k


@builtin("same_shape", "a", "b", drop=0)
def _same_shape(lw, e, a, b, drop):
    """`a`, checked to have `b`'s shape without b's last `drop` axes (numbers pass): a loss
    compares predictions and targets element by element; broadcasting [B, 1] against [B]
    would compare every example with every other one."""
    if _number(a):
        return a
    na, nb = _tensor(lw, e, a), _tensor(lw, e, b)
    sa, sb = lw.g.shape(na), lw.g.shape(nb)
    want = sb[:len(sb) - _int(lw, e, drop, "drop", 0)]
    if len(sa) != len(want) or not all(same_dim(x, y) for x, y in zip(sa, want)):
        name = [f"`{x.name}`" if isinstance(x, A.Name) else f"argument {i + 1}" for i, x in enumerate(e.args[:2])]
        raise DlcError(f"{name[0]} is {lw._describe(_T(na))} but {name[1]} is {lw._describe(_T(nb))}: they are "
                       f"compared element by element, so {name[0]} must be {fmt_shape(want)}", e.loc,
                       ["reshape one of them to the other's shape"])
    return a


# ---- convolutional networks ---------------------------------------------------------------------
def _ints(lw, e, v, what, n=2):
    vals = v if isinstance(v, list) else [v] * n
    if len(vals) != n or not all(isinstance(x, int) and not isinstance(x, bool) for x in vals):
        raise DlcError(f"`{e.func}`: {what} must be an integer or a list of {n} integers, got {v!r}", e.loc)
    return tuple(vals)


@builtin("conv", "x", "w", stride=1, padding=0, dilation=1)
def _conv(lw, e, x, w, stride, padding, dilation):
    st, pd, dl = _ints(lw, e, stride, "stride"), _ints(lw, e, padding, "padding"), _ints(lw, e, dilation, "dilation")
    if min(st) < 1 or min(dl) < 1 or min(pd) < 0:
        raise DlcError(f"`{e.func}`: stride and dilation must be >= 1 and padding >= 0", e.loc)
    return _T(lw.g.add("conv2d", _tensor(lw, e, x), _tensor(lw, e, w), stride=st, padding=pd, dilation=dl))


def _pool(op):
    def f(lw, e, x, kernel, stride, padding):
        k = _ints(lw, e, kernel, "kernel")
        st = k if stride is None else _ints(lw, e, stride, "stride")
        if min(k) < 1 or min(st) < 1:
            raise DlcError(f"`{e.func}`: kernel and stride must be >= 1", e.loc)
        return _T(lw.g.add(op, _tensor(lw, e, x), kernel=k, stride=st, padding=_ints(lw, e, padding, "padding")))
    return f


@builtin("conv_transpose", "x", "w", stride=1, padding=0, dilation=1, output_padding=0)
def _conv_transpose(lw, e, x, w, stride, padding, dilation, output_padding):
    """The adjoint of `conv` in its input (weights [in, out, kh, kw]): upsamples by `stride`."""
    geo = {k: _ints(lw, e, v, k.replace("_", " ")) for k, v in
           dict(stride=stride, padding=padding, dilation=dilation, output_padding=output_padding).items()}
    if min(geo["stride"] + geo["dilation"]) < 1 or min(geo["padding"] + geo["output_padding"]) < 0:
        raise DlcError(f"`{e.func}`: stride and dilation must be >= 1, padding and output_padding >= 0", e.loc)
    return _T(lw.g.add("conv_transpose2d", _tensor(lw, e, x), _tensor(lw, e, w), **geo))


@builtin("pair", "v")
def _pair_builtin(lw, e, v):
    """An integer or a list of two as a pair: `kh, kw = pair(kernel)` (non-square kernels)."""
    return _ints(lw, e, v, "the value")


builtin("max_pool", "x", kernel=2, stride=None, padding=0)(_pool("max_pool2d"))
builtin("avg_pool", "x", kernel=2, stride=None, padding=0)(_pool("avg_pool2d"))


@builtin("flatten", "x", start=1)
def _flatten(lw, e, x, start):
    x = _tensor(lw, e, x)
    shape = lw.g.shape(x)
    if not _integer(start) or not 0 <= start < len(shape):
        raise DlcError(f"`flatten`: start must be an axis of the input (rank {len(shape)})", e.loc)
    return _T(lw.g.add("reshape", x, shape=tuple(shape[:start]) + (-1,)))


# ---- helpers for normalization layers ---------------------------------------------------------
@builtin("count", "x", "axis")
def _count(lw, e, x, axis):
    """Number of elements over `axis` (a run-time value when the batch is involved)."""
    x = _tensor(lw, e, x)
    return _T(lw.g.add("size", x, axes=_axes(lw, e, x, axis), dtype=lw.float_dtype))


@builtin("other_axes", "x", axis=1)
def _other_axes(lw, e, x, axis):
    """Every axis of x but `axis`: the axes batch norm takes statistics over."""
    x = _tensor(lw, e, x)
    (a,) = _axes(lw, e, x, axis)
    return [i for i in range(len(lw.g.shape(x))) if i != a]


@builtin("expand", "v", "x", axis=1)
def _expand(lw, e, v, x, axis):
    """Reshape a vector so it broadcasts along `axis` of x: [C] -> [1, C, 1, 1] for NCHW."""
    v, x = _tensor(lw, e, v), _tensor(lw, e, x)
    rank = len(lw.g.shape(x))
    (a,) = _axes(lw, e, x, axis)
    if len(lw.g.shape(v)) != 1:
        raise DlcError(f"`expand` takes a vector, got {lw._describe(_T(v))}", e.loc)
    shape = tuple(lw.g.shape(v)[0] if i == a else 1 for i in range(rank))
    return _T(lw.g.add("reshape", v, shape=shape))


# ---- randomness ------------------------------------------------------------------------------------
@builtin("rand_like", "x")
def _rand_like(lw, e, x):
    """Uniform [0, 1) numbers shaped like x, from the run's seeded generator (a fresh draw each
    step; each call site draws its own stream)."""
    x = _tensor(lw, e, x)
    lw.rng_salt += 1
    return _T(lw.g.add("rand_uniform", lw.draw_seed(lw.g.shape(x), 1, e.loc), shape=lw.g.shape(x), salt=lw.rng_salt,
                       dtype=lw.float_dtype if lw.g.dtype(x) not in FLOATS else lw.g.dtype(x)))


@builtin("range", "n")
def _range(lw, e, n):
    """`scan t in range(n)`: n steps with no per-step input (generation)."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise DlcError("`range` takes a positive integer", e.loc)
    return range(n)


# ---- sequences ------------------------------------------------------------------------------------
@builtin("slice", "x", "start", "stop", axis=-1)
def _slice(lw, e, x, start, stop, axis):
    x = _tensor(lw, e, x)
    (ax,) = _axes(lw, e, x, axis)
    start, stop = _int(lw, e, start, "start", 0), _int(lw, e, stop, "stop", 0)
    return _T(lw.g.add("slice", x, axis=ax, start=start, stop=stop))


@builtin("split", "x", "parts", axis=-1)
def _split(lw, e, x, parts, axis):
    """Equal parts along an axis: `i, f, g, o = split(gates, 4)`."""
    x = _tensor(lw, e, x)
    (ax,) = _axes(lw, e, x, axis)
    size = lw.g.shape(x)[ax]
    if not _integer(parts) or parts < 1 or not isinstance(size, int) or size % parts:
        raise DlcError(f"`split`: cannot cut axis {ax} of size {size} into {parts} equal parts", e.loc)
    k = size // parts
    return tuple(_T(lw.g.add("slice", x, axis=ax, start=i * k, stop=(i + 1) * k)) for i in range(parts))


@builtin("concat", "parts", axis=-1)
def _concat(lw, e, parts, axis):
    """Join tensors along an axis (the sum of each part placed at its offset)."""
    if not isinstance(parts, list) or not parts:
        raise DlcError("`concat` takes a list of tensors", e.loc)
    xs = [_tensor(lw, e, p) for p in parts]
    ranks = {len(lw.g.shape(x)) for x in xs}
    if len(ranks) > 1 or 0 in ranks:
        raise DlcError("`concat` joins tensors of one rank (at least 1), got "
                       + ", ".join(lw._describe(_T(x)) for x in xs), e.loc)
    (ax,) = _axes(lw, e, xs[0], axis)
    sizes = [lw.g.shape(x)[ax] for x in xs]
    if not all(isinstance(s, int) for s in sizes):
        raise DlcError("`concat`: the joined axis must have fixed sizes", e.loc)
    total, off, out = sum(sizes), 0, None
    for x, s in zip(xs, sizes):
        piece = lw.g.add("unslice", x, axis=ax, start=off, stop=off + s, size=total)
        out = piece if out is None else lw.g.add("add", out, piece)
        off += s
    return _T(out)


@builtin("take", "table", "ids")
def _take(lw, e, table, ids):
    """Rows of `table` [V, D] at integer `ids` [...] -> [..., D] (an embedding lookup)."""
    return _T(lw.g.add("take", _tensor(lw, e, table), _tensor(lw, e, ids)))


@builtin("argmax", "x")
def _argmax(lw, e, x):
    """Index of the largest value along the last axis (i32)."""
    return _T(lw.g.add("argmax", _tensor(lw, e, x)))


@builtin("zeros", "shape")
def _zeros(lw, e, shape):
    """A zero tensor; `shape` may name symbolic dimensions: zeros([N, units])."""
    return _T(lw.g.add("broadcast_to", lw.g.const(0.0, lw.float_dtype), shape=_shape(lw, e, shape)))


@builtin("initial", "value", "shape")
def _initial(lw, e, value, shape):
    """An initial state: a tensor of `shape` as given, or a number broadcast to it."""
    from .lower import Tensor
    shape = _shape(lw, e, shape)
    if isinstance(value, Tensor):
        got = lw.g.shape(value.node)
        if len(got) != len(shape) or any(isinstance(w, int) and w != d for w, d in zip(shape, got)):
            raise DlcError(f"an initial state must be {_show(lw, list(shape))}, got {lw._describe(value)}", e.loc)
        return value
    if not _number(value):
        raise DlcError(f"`initial`: value must be a tensor or a number, got {_show(lw, value)}", e.loc)
    return _T(lw.g.add("broadcast_to", lw.to_tensor(value, None, e.loc).node, shape=shape))


@builtin("full", "shape", "value", dtype="float")
def _full(lw, e, shape, value, dtype):
    """A tensor filled with `value`; dtype "float" (the model's float type), "i32" or "i64"."""
    dt = lw.float_dtype if dtype == "float" else dtype
    if dt not in ("f32", "f64", "i32", "i64"):
        raise DlcError('`full`: dtype is "float", "i32" or "i64"', e.loc)
    if not _number(value):
        raise DlcError(f"`full`: value must be a number, got {_show(lw, value)}", e.loc,
                       ["for a tensor's shape and values use initial(value, shape)"])
    if dt in INTS and value != int(value):
        raise DlcError(f"`full`: an {dt} tensor holds integers, got {value}", e.loc)
    return _T(lw.g.add("broadcast_to", lw.g.const(value if dt in FLOATS else int(value), dt), shape=_shape(lw, e, shape)))


@builtin("sample", "logits", temperature=1.0)
def _sample(lw, e, logits, temperature):
    """One class per row drawn from softmax(logits / temperature) (i32), seeded per step."""
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise DlcError("`sample`: temperature must be a positive number", e.loc)
    lw.rng_salt += 1
    logits = _tensor(lw, e, logits)          # one counter per row of classes
    return _T(lw.g.add("sample", logits, lw.draw_seed(lw.g.shape(logits)[:-1], 1, e.loc), salt=lw.rng_salt,
                       temperature=float(temperature)))


@builtin("top_k", "logits", "k")
def _top_k(lw, e, logits, k):
    """The logits with all but the k largest of each row set to -inf (ties kept), for sampling."""
    return _T(lw.g.add("top_k", _tensor(lw, e, logits), k=_int(lw, e, k, "k", 1)))


# ---- math: flip, cumsum, arange, iota (floor, sin, cos: generated from the registry above) ----------


def _one_axis(lw, e, x, axis):
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise DlcError(f"`{e.func}`: axis must be an integer, got {lw._describe(axis)}", e.loc)
    (ax,) = _axes(lw, e, x, axis)
    return ax


@builtin("flip", "x", axis=-1)
def _flip(lw, e, x, axis):
    """Reverse the order along an axis (or each axis of a list)."""
    x = _tensor(lw, e, x)
    for ax in _axes(lw, e, x, axis) if isinstance(axis, list) else (_one_axis(lw, e, x, axis),):
        x = lw.g.add("flip", x, axis=ax)
    return _T(x)


@builtin("cumsum", "x", axis=-1, reverse=False)
def _cumsum(lw, e, x, axis, reverse):
    """Inclusive running sum along an axis (from the end with `reverse = true`); a running
    count for a boolean mask."""
    x = _tensor(lw, e, x)
    if not isinstance(reverse, bool):
        raise DlcError("`cumsum`: reverse must be true or false", e.loc)
    return _T(lw.g.add("cumsum", x, axis=_one_axis(lw, e, x, axis), reverse=reverse))


def _dims(lw, e, shape, what="shape"):
    from .lower import SymDim
    dims = shape if isinstance(shape, list) else [shape]
    ok = all((isinstance(d, int) and not isinstance(d, bool) and d > 0) or isinstance(d, SymDim) for d in dims)
    if not dims or not ok:
        raise DlcError(f"`{e.func}`: {what} must be a positive size or a list of sizes, got {lw._describe(shape)}",
                       e.loc)
    return tuple(dims)


def _index_dtype(lw, e, dtype):
    if dtype not in ("i32", "i64", "float"):
        raise DlcError(f'`{e.func}`: dtype is "i32", "i64" or "float", got {lw._describe(dtype)}', e.loc)
    return lw.float_dtype if dtype == "float" else dtype


@builtin("iota", "shape", "axis", dtype="i32")
def _iota(lw, e, shape, axis, dtype):
    """A tensor of `shape` holding each element's index along `axis`: iota([T, T], 0) >=
    iota([T, T], 1) is a causal mask."""
    shape = _dims(lw, e, shape)
    dt = _index_dtype(lw, e, dtype)
    like = lw.g.add("broadcast_to", lw.g.const(0, dt), shape=shape)
    return _T(lw.g.add("iota", like, axis=_one_axis(lw, e, like, axis), dtype=dt))


@builtin("arange", "n", dtype="i32")
def _arange(lw, e, n, dtype):
    """0, 1, ..., n - 1 (n may be a symbolic size such as a sequence length)."""
    (n,) = _dims(lw, e, n, "n")
    dt = _index_dtype(lw, e, dtype)
    return _T(lw.g.add("iota", lw.g.add("broadcast_to", lw.g.const(0, dt), shape=(n,)), axis=0, dtype=dt))


# ---- random draws: normal, uniform, bernoulli (ops in compiler/ops_random.py) --------------------
def _draw(lw, e, op, shape, dtype):
    """A fresh draw of `op` (standard normal, or uniform [0, 1)) from the run's seeded stream;
    each call site has its own salt, so no two draws share numbers."""
    if dtype not in ("float", "f32", "f64"):
        raise DlcError(f'`{e.func}`: dtype is "float", "f32" or "f64", got {lw._describe(dtype)}', e.loc)
    lw.rng_salt += 1
    seed = lw.draw_seed(tuple(shape), 2 if op == "rand_normal" else 1, e.loc)    # Box-Muller: 2 uniforms each
    return _T(lw.g.add(op, seed, shape=tuple(shape), salt=lw.rng_salt,
                       dtype=lw.float_dtype if dtype == "float" else dtype))


def _like(lw, e, x):
    """The shape and float dtype of a `_like` draw."""
    x = _tensor(lw, e, x, "x")
    return lw.g.shape(x), (lw.g.dtype(x) if lw.g.dtype(x) in FLOATS else "float")


def _scaled(lw, e, u, scale, shift):
    """u * scale + shift (numbers or broadcasting tensors), skipping the identity."""
    from .lower import Tensor
    for v in (scale, shift):
        if not isinstance(v, Tensor) and (not isinstance(v, (int, float)) or isinstance(v, bool)):
            raise DlcError(f"`{e.func}`: the location and scale must be numbers or tensors, got "
                           f"{lw._describe(v)}", e.loc)
    if isinstance(scale, Tensor) or scale != 1:
        u = lw.binop("*", u, scale, e)
    if isinstance(shift, Tensor) or shift != 0:
        u = lw.binop("+", u, shift, e)
    return u


def _initializer(lw, e, name, **given):
    """`normal(std = 0.1)` without a shape is the parameter initializer of that name."""
    from .lower import InitSpec
    kw = {k: v for k, v in given.items() if v is not None}
    return InitSpec(name, tuple(sorted(kw.items())))


@builtin("normal", shape=None, mean=None, std=None, dtype="float")
def _normal(lw, e, shape, mean, std, dtype):
    """Normal numbers of a shape (sizes may be symbolic: `normal([N, 16])`), mean 0 and std 1
    unless given (numbers, or tensors that broadcast), fresh every step. Without a shape, the
    parameter initializer `normal(mean, std)`."""
    if shape is None:
        return _initializer(lw, e, "normal", mean=mean, std=std)
    u = _draw(lw, e, "rand_normal", _dims(lw, e, shape), dtype)
    return _scaled(lw, e, u, 1 if std is None else std, 0 if mean is None else mean)


@builtin("normal_like", "x", mean=0, std=1)
def _normal_like(lw, e, x, mean, std):
    """Normal numbers shaped like x (its float dtype)."""
    return _scaled(lw, e, _draw(lw, e, "rand_normal", *_like(lw, e, x)), std, mean)


def _uniform_between(lw, e, u, low, high):
    from .lower import Tensor
    width = lw.binop("-", high, low, e) if isinstance(high, Tensor) or isinstance(low, Tensor) else None
    return _scaled(lw, e, u, width if width is not None else high - low, low)


@builtin("uniform", shape=None, low=None, high=None, dtype="float")
def _uniform(lw, e, shape, low, high, dtype):
    """Uniform numbers in [low, high) (default [0, 1)) of a shape. Without a shape, the
    parameter initializer `uniform(low, high)`."""
    if shape is None:
        return _initializer(lw, e, "uniform", low=low, high=high)
    u = _draw(lw, e, "rand_uniform", _dims(lw, e, shape), dtype)
    return _uniform_between(lw, e, u, 0 if low is None else low, 1 if high is None else high)


@builtin("uniform_like", "x", low=0, high=1)
def _uniform_like(lw, e, x, low, high):
    """Uniform numbers in [low, high) shaped like x."""
    return _uniform_between(lw, e, _draw(lw, e, "rand_uniform", *_like(lw, e, x)), low, high)


def _bernoulli(lw, e, p, shape, dtype):
    if dtype not in ("float", "f32", "f64", "bool"):
        raise DlcError(f'`{e.func}`: dtype is "float", "f32", "f64" or "bool", got {lw._describe(dtype)}', e.loc)
    from .lower import Tensor
    if not isinstance(p, Tensor) and not (isinstance(p, (int, float)) and not isinstance(p, bool) and 0 <= p <= 1):
        raise DlcError(f"`{e.func}`: p must be a probability in [0, 1] or a tensor of them, got "
                       f"{lw._describe(p)}", e.loc)
    fdt = lw.g.dtype(p.node) if isinstance(p, Tensor) and lw.g.dtype(p.node) in FLOATS else "float"
    hit = lw.binop("<", _draw(lw, e, "rand_uniform", shape, fdt), p, e)   # P(u < p) = p
    if dtype == "bool":
        return hit
    return _T(lw.g.add("cast", hit.node, dtype=lw.float_dtype if dtype == "float" else dtype))


@builtin("bernoulli", "p", shape=None, dtype="float")
def _bernoulli_builtin(lw, e, p, shape, dtype):
    """1 with probability p, else 0 (dtype "float", "f32", "f64" or "bool"); p is a tensor (the
    draw has its shape) or a number with a `shape`. Not differentiable in p."""
    from .lower import Tensor
    if shape is None:
        if not isinstance(p, Tensor):
            raise DlcError("`bernoulli` needs a shape when p is a number: `bernoulli(0.5, [N, 8])`", e.loc)
        shape = lw.g.shape(p.node)
    else:
        shape = _dims(lw, e, shape)
    return _bernoulli(lw, e, p, shape, dtype)


@builtin("bernoulli_like", "x", p=0.5, dtype="float")
def _bernoulli_like(lw, e, x, p, dtype):
    """1 with probability p, else 0, shaped like x."""
    return _bernoulli(lw, e, p, lw.g.shape(_tensor(lw, e, x, "x")), dtype)
