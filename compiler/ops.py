"""The op registry: every primitive defined once, in one place.

For each primitive this file holds, side by side:
  * its shape/dtype rule (`infer`),
  * its NumPy reference semantics (`ref`, what tests compare kernels against),
  * its gradient rule (a graph -> graph rule returning one entry per input),
  * its fusion kind (TVM's op patterns), read by the fusion pass,
  * its kernel template: a scalar expression for elementwise ops, or a loop-nest template
    for the few non-elementwise ones. A backend overrides entries of this base table.

Everything else (dense, activations beyond the primitives, losses) is written in `.dl` in
`dsl/stdlib/` on top of these.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import special

from .shapes import (DTYPES, FLOATS, INTS, ShapeError, broadcast, dim_div, fmt_shape,
                     norm_axes, numel, promote, resolve, same_dim)


class Kind:
    """Fusion kinds, after TVM's TOpPattern."""

    SOURCE = "source"                     # inputs and constants: no kernel
    ELEMENTWISE = "elementwise"           # out[i] = f(in[i])
    BROADCAST = "broadcast"               # elementwise with broadcast reads of some inputs
    INJECTIVE = "injective"               # index remapping (reshape, transpose)
    REDUCE = "reduce"                     # reductions over axes
    OUT_ELEMENTWISE_FUSABLE = "out_elementwise_fusable"  # matmul: elementwise epilogue fuses
    OPAQUE = "opaque"                     # its own kernel (softmax)


@dataclass
class Op:
    name: str
    kind: str
    infer: Callable                       # (shapes, dtypes, attrs) -> (shape, dtype)
    ref: Callable                         # (*arrays, **attrs) -> ndarray
    grad: Callable | None = None          # (graph, node, dy) -> [grad or None per input]
    scalar: str | None = None             # elementwise template: {0} {1} args, {T} out dtype
    kernel: str | Callable | None = None  # loop-nest template for non-elementwise ops, or
                                          # (sizes) -> template, chosen by the named sizes
    user_name: str | None = None
    canon: Callable | None = None         # (shapes, attrs) -> attrs in canonical form
    helpers: str | None = None            # @njit helper source the kernel template calls
    kernel_sizes: Callable | None = None  # (graph, node) -> named sizes for the kernel template
    literal_sizes: tuple = ()             # those written into the kernel as numbers (a window's
                                          # geometry: its loops unroll), not passed as parameters
    remaps: tuple = ()                    # args read at an index other than the output's own:
                                          # the fusion pass keeps their producers out of its kernel
    read_at: Callable | None = None       # (attrs, pos, idx) -> the index expressions at which
                                          # arg `pos` (one of `remaps`) is read at output index
                                          # `idx`; "{k}" stands for arg k's value there
    builtin: tuple = ()                   # the parameters of the `.dl` builtin of its name that
                                          # applies it alone (generated in compiler/builtins.py)
    rowwise: bool = False                 # a row-wise kernel over the last axis (softmax): it can
                                          # end an elementwise or matmul kernel, in place on its rows

    def __post_init__(self):
        self.user_name = self.user_name or self.name

    @property
    def flat(self) -> bool:
        """Can its scalar template run in a loop over one flat index? Not when it reads at a
        remapped index or uses the loop's index or sizes ({ax}, {last}, {size})."""
        return not self.remaps and not any(k in (self.scalar or "") for k in ("{ax}", "{last}", "{size}"))

    def def_grad(self, fn):
        self.grad = fn
        return fn


OPS: dict[str, Op] = {}


def register(op: Op) -> Op:
    assert op.name not in OPS, op.name
    OPS[op.name] = op
    return op


# ---- helpers used by the gradient rules -----------------------------------------------------
def fit_shape(g, dx: int, shape: tuple) -> int:
    """Undo broadcasting: sum `dx` down to `shape` (the one place this is done)."""
    xs = g.shape(dx)
    if len(xs) == len(shape) and all(same_dim(a, b) for a, b in zip(xs, shape)):
        return dx
    lead = len(xs) - len(shape)
    axes = tuple(range(lead)) + tuple(lead + i for i, d in enumerate(shape) if d == 1 and xs[lead + i] != 1)
    out = g.add("reduce_sum", dx, axes=axes, keepdims=False) if axes else dx
    if g.shape(out) != tuple(shape):
        out = g.add("reshape", out, shape=tuple(shape))
    return out


def _zero_like(g, n):
    return g.const(0, g.dtype(n))


def _float(dtypes):
    for d in dtypes:
        if d not in FLOATS:
            raise ShapeError(f"expects floating-point tensors, got {d}")


# ---- sources ---------------------------------------------------------------------------------
register(Op("input", Kind.SOURCE, lambda s, d, a: (a["shape"], a["dtype"]), ref=None))
register(Op("const", Kind.SOURCE, lambda s, d, a: ((), a["dtype"]),
            ref=lambda *, value, dtype: np.array(value, DTYPES[dtype]), scalar="{T}({value!r})"))


def _size_infer(s, d, a):
    return (), a["dtype"]


# `size(x, axes)`: the number of elements of x over `axes`, known only at run time when the
# dims are symbolic; this is how `mean` is written in the library (sum / size).
register(Op("size", Kind.ELEMENTWISE, _size_infer, scalar="{T}({size})",
            canon=lambda s, a: {**a, "axes": norm_axes(a["axes"], len(s[0]))},
            ref=lambda x, *, axes, dtype: np.array(math.prod(x.shape[i] for i in norm_axes(axes, x.ndim)),
                                                   DTYPES[dtype])))


# ---- elementwise unary ---------------------------------------------------------------------------
def _unary_infer(float_only=True):
    def infer(s, d, a):
        if float_only:
            _float(d)
        return s[0], d[0]
    return infer


def unary(name, ref, scalar, float_only=True, builtin=("x",)):
    """An elementwise op of one argument, by default also the builtin `name(x)`."""
    return register(Op(name, Kind.ELEMENTWISE, _unary_infer(float_only), ref=ref, scalar=scalar, builtin=builtin))


neg = unary("neg", np.negative, "(-{0})", float_only=False, builtin=())     # the operator `-x`
exp = unary("exp", np.exp, "np.exp({0})")
log = unary("log", np.log, "np.log({0})")
sqrt = unary("sqrt", np.sqrt, "np.sqrt({0})")
tanh = unary("tanh", np.tanh, "np.tanh({0})")
sigmoid = unary("sigmoid", lambda x: special.expit(x), "({T}(1.0) / ({T}(1.0) + np.exp(-{0})))")
relu = unary("relu", lambda x: np.maximum(x, 0), "({0} if {0} > {T}(0.0) else {T}(0.0))")
absolute = unary("abs", np.abs, "abs({0})", float_only=False)
sign = unary("sign", np.sign, "np.sign({0})", float_only=False)
erf = unary("erf", special.erf, "math.erf({0})")
# identity in the forward pass; differentiation treats its result as a constant (gradient None)
stop_gradient = unary("stop_gradient", lambda x: x, "{0}", float_only=False)


@neg.def_grad
def _(g, n, dy):
    return [g.add("neg", dy)]


@exp.def_grad
def _(g, n, dy):
    return [g.add("mul", dy, n)]


@log.def_grad
def _(g, n, dy):
    return [g.add("div", dy, g.args(n)[0])]


@sqrt.def_grad
def _(g, n, dy):
    return [g.add("div", g.add("mul", dy, g.const(0.5, g.dtype(n))), n)]


@tanh.def_grad
def _(g, n, dy):
    one = g.const(1, g.dtype(n))
    return [g.add("mul", dy, g.add("sub", one, g.add("mul", n, n)))]


@sigmoid.def_grad
def _(g, n, dy):
    one = g.const(1, g.dtype(n))
    return [g.add("mul", dy, g.add("mul", n, g.add("sub", one, n)))]


@relu.def_grad
def _(g, n, dy):
    # Written on the output (y > 0 iff x > 0), so the pre-activation need not be kept.
    return [g.add("where", g.add("gt", n, _zero_like(g, n)), dy, _zero_like(g, n))]


@absolute.def_grad
def _(g, n, dy):
    return [g.add("mul", dy, g.add("sign", g.args(n)[0]))]


@erf.def_grad
def _(g, n, dy):
    x = g.args(n)[0]
    k = g.const(2.0 / math.sqrt(math.pi), g.dtype(n))
    return [g.add("mul", dy, g.add("mul", k, g.add("exp", g.add("neg", g.add("mul", x, x)))))]


def _cast_infer(s, d, a):
    if a["dtype"] not in DTYPES:
        raise ShapeError(f"unknown dtype {a['dtype']}")
    return s[0], a["dtype"]


cast = register(Op("cast", Kind.ELEMENTWISE, _cast_infer, ref=lambda x, *, dtype: x.astype(DTYPES[dtype]),
                   scalar="{T}({0})"))


@cast.def_grad
def _(g, n, dy):
    x = g.args(n)[0]
    return [g.add("cast", dy, dtype=g.dtype(x)) if g.dtype(x) in FLOATS else None]


# ---- elementwise binary (broadcasting) -------------------------------------------------------------
def _binary_infer(s, d, a):
    return broadcast(s[0], s[1]), promote(d[0], d[1])


def _div_infer(s, d, a):
    if d[0] not in FLOATS and d[1] not in FLOATS:
        raise ShapeError("division needs a floating-point operand; cast integers with float()")
    return _binary_infer(s, d, a)


def binary(name, ref, scalar, infer=_binary_infer, builtin=()):
    """A broadcasting op of two arguments (an operator, or with `builtin` the builtin `name(a, b)`)."""
    return register(Op(name, Kind.BROADCAST, infer, ref=ref, scalar=scalar, builtin=builtin))


add = binary("add", np.add, "({0} + {1})")
sub = binary("sub", np.subtract, "({0} - {1})")
mul = binary("mul", np.multiply, "({0} * {1})")
div = binary("div", np.divide, "({0} / {1})", _div_infer)
pow_ = binary("pow", np.power, "({0} ** {1})")
maximum = binary("maximum", np.maximum, "({0} if {0} >= {1} else {1})", builtin=("a", "b"))
minimum = binary("minimum", np.minimum, "({0} if {0} <= {1} else {1})", builtin=("a", "b"))


@add.def_grad
def _(g, n, dy):
    a, b = g.args(n)
    return [fit_shape(g, dy, g.shape(a)), fit_shape(g, dy, g.shape(b))]


@sub.def_grad
def _(g, n, dy):
    a, b = g.args(n)
    return [fit_shape(g, dy, g.shape(a)), fit_shape(g, g.add("neg", dy), g.shape(b))]


@mul.def_grad
def _(g, n, dy):
    a, b = g.args(n)
    return [fit_shape(g, g.add("mul", dy, b), g.shape(a)), fit_shape(g, g.add("mul", dy, a), g.shape(b))]


@div.def_grad
def _(g, n, dy):
    a, b = g.args(n)
    da = g.add("div", dy, b)
    db = g.add("neg", g.add("div", g.add("mul", dy, n), b))
    return [fit_shape(g, da, g.shape(a)), fit_shape(g, db, g.shape(b))]


@pow_.def_grad
def _(g, n, dy):
    a, b = g.args(n)
    one = g.const(1, g.dtype(n))
    da = g.add("mul", dy, g.add("mul", b, g.add("pow", a, g.add("sub", b, one))))
    db = g.add("mul", dy, g.add("mul", g.add("log", a), n))
    return [fit_shape(g, da, g.shape(a)), fit_shape(g, db, g.shape(b))]


def _select_grad(cmp):
    def rule(g, n, dy):
        a, b = g.args(n)
        c = g.add(cmp, a, b)
        z = _zero_like(g, dy)
        return [fit_shape(g, g.add("where", c, dy, z), g.shape(a)),
                fit_shape(g, g.add("where", c, z, dy), g.shape(b))]
    return rule


maximum.def_grad(_select_grad("ge"))
minimum.def_grad(_select_grad("le"))


def _compare_infer(s, d, a):
    return broadcast(s[0], s[1]), "bool"


for _name, _ref, _sym in [("lt", np.less, "<"), ("le", np.less_equal, "<="), ("gt", np.greater, ">"),
                          ("ge", np.greater_equal, ">="), ("eq", np.equal, "=="), ("ne", np.not_equal, "!=")]:
    binary(_name, _ref, "({0} %s {1})" % _sym, _compare_infer)


def _where_infer(s, d, a):
    if d[0] != "bool":
        raise ShapeError(f"the condition must be a comparison (bool), got {d[0]}")
    return broadcast(*s), promote(d[1], d[2])


where = register(Op("where", Kind.BROADCAST, _where_infer, ref=np.where, scalar="({1} if {0} else {2})"))


@where.def_grad
def _(g, n, dy):
    c, a, b = g.args(n)
    z = _zero_like(g, dy)
    return [None, fit_shape(g, g.add("where", c, dy, z), g.shape(a)),
            fit_shape(g, g.add("where", c, z, dy), g.shape(b))]


# ---- index-producing and layout ops ----------------------------------------------------------------
def _onehot_infer(s, d, a):
    if d[0] not in INTS:
        raise ShapeError(f"labels must be integers, got {d[0]}")
    return s[0] + (a["depth"],), a["dtype"]


def _onehot_ref(x, *, depth, dtype):
    return (x[..., None] == np.arange(depth)).astype(DTYPES[dtype])


# The label is read at the output index without its last axis ({last} is that last index).
register(Op("onehot", Kind.BROADCAST, _onehot_infer, ref=_onehot_ref, remaps=(0,),
            read_at=lambda a, pos, idx: idx[:-1], scalar="({T}(1.0) if {0} == {last} else {T}(0.0))"))


def _broadcast_to_infer(s, d, a):
    shape = tuple(a["shape"])
    if broadcast(s[0], shape) != shape:
        raise ShapeError(f"cannot broadcast {fmt_shape(s[0])} to {fmt_shape(shape)}")
    return shape, d[0]


broadcast_to = register(Op("broadcast_to", Kind.BROADCAST, _broadcast_to_infer,
                           ref=lambda x, *, shape: np.broadcast_to(x, shape).copy(), scalar="{0}"))


@broadcast_to.def_grad
def _(g, n, dy):
    return [fit_shape(g, dy, g.shape(g.args(n)[0]))]


def _reshape_infer(s, d, a):
    shape = list(a["shape"])
    if shape.count(-1) > 1:
        raise ShapeError("reshape takes at most one -1")
    total = numel(s[0])
    if -1 in shape:
        known = numel([x for x in shape if x != -1])
        rest = dim_div(total, known)
        if rest is None:
            raise ShapeError(f"cannot reshape {fmt_shape(s[0])} to {fmt_shape(a['shape'])}")
        shape[shape.index(-1)] = rest
    if not same_dim(numel(shape), total):
        raise ShapeError(f"cannot reshape {fmt_shape(s[0])} ({total} elements) to {fmt_shape(shape)}")
    return tuple(shape), d[0]


# References take concrete shapes; `evaluate` resolves symbolic ones first.
reshape = register(Op("reshape", Kind.INJECTIVE, _reshape_infer, ref=lambda x, *, shape: x.reshape(shape)))


@reshape.def_grad
def _(g, n, dy):
    return [g.add("reshape", dy, shape=g.shape(g.args(n)[0]))]


def _transpose_infer(s, d, a):
    perm = tuple(a["perm"])
    if sorted(perm) != list(range(len(s[0]))):
        raise ShapeError(f"bad permutation {perm} for a tensor of rank {len(s[0])}")
    return tuple(s[0][p] for p in perm), d[0]


def _transpose_read(a, pos, idx):
    """x[j] with j[perm[k]] = i[k]: a gather loop over the output."""
    j = [None] * len(idx)
    for k, p in enumerate(a["perm"]):
        j[p] = idx[k]
    return j


transpose = register(Op("transpose", Kind.INJECTIVE, _transpose_infer, remaps=(0,), read_at=_transpose_read,
                        ref=lambda x, *, perm: np.transpose(x, perm).copy(), scalar="{0}"))


@transpose.def_grad
def _(g, n, dy):
    perm = g.attrs(n)["perm"]
    inv = tuple(int(i) for i in np.argsort(perm))
    return [g.add("transpose", dy, perm=inv)]


# ---- matmul ------------------------------------------------------------------------------------------
def _mm_dims(s, ta, tb):
    a, b = list(s[0]), list(s[1])
    if ta:
        a[-1], a[-2] = a[-2], a[-1]
    if tb:
        b[-1], b[-2] = b[-2], b[-1]
    return a, b


def _matmul_infer(s, d, attrs):
    if len(s[0]) < 2 or len(s[1]) < 2:
        raise ShapeError(f"the operands must be of rank >= 2, got {fmt_shape(s[0])} @ {fmt_shape(s[1])}")
    if attrs.get("ta") and len(s[0]) != 2 and len(s[0]) != len(s[1]):
        raise ShapeError("a transposed left operand must be 2-D or batched like the right one")
    a, b = _mm_dims(s, attrs.get("ta"), attrs.get("tb"))
    if not same_dim(a[-1], b[-2]):
        raise ShapeError(f"inner dimensions differ: {fmt_shape(a)} @ {fmt_shape(b)} ({a[-1]} vs {b[-2]})")
    if d[0] != d[1] or d[0] not in FLOATS:
        raise ShapeError(f"the operands must be float tensors of one dtype, got {d[0]} and {d[1]}")
    batch = broadcast(tuple(a[:-2]), tuple(b[:-2]))
    return batch + (a[-2], b[-1]), d[0]


def _matmul_ref(a, b, *, ta=False, tb=False):
    if ta:
        a = np.swapaxes(a, -1, -2)
    if tb:
        b = np.swapaxes(b, -1, -2)
    return np.matmul(a, b)


matmul = register(Op("matmul", Kind.OUT_ELEMENTWISE_FUSABLE, _matmul_infer, ref=_matmul_ref))


@matmul.def_grad
def _(g, n, dy):
    a, b = g.args(n)
    at = g.attrs(n)
    ta, tb = at.get("ta", False), at.get("tb", False)
    sa, sb = g.shape(a), g.shape(b)
    if len(sb) == 2 and len(sa) > 2 and not ta:
        # x[..., K] @ W[K, N]: dW sums over every leading axis, as one 2-D product.
        da = g.add("matmul", dy, b, ta=False, tb=not tb)
        a2 = g.add("reshape", a, shape=(-1, sa[-1]))
        d2 = g.add("reshape", dy, shape=(-1, g.shape(dy)[-1]))
        db = g.add("matmul", d2, a2, ta=True, tb=False) if tb else g.add("matmul", a2, d2, ta=True, tb=False)
        return [da, db]
    if not ta and not tb:
        da, db = g.add("matmul", dy, b, tb=True), _mm_t(g, a, dy, True, False)
    elif not ta and tb:
        da, db = g.add("matmul", dy, b), _mm_t(g, dy, a, True, False)
    elif ta and not tb:
        da, db = g.add("matmul", b, dy, tb=True), g.add("matmul", a, dy)
    else:
        da, db = _mm_t(g, b, dy, True, True), _mm_t(g, dy, a, True, True)   # b, dy may be batched
    return [fit_shape(g, da, sa), fit_shape(g, db, sb)]


def _mm_t(g, x, y, ta, tb):
    """x^T @ y for batched x: transpose the last two axes explicitly (ta is 2-D only)."""
    if len(g.shape(x)) == 2:
        return g.add("matmul", x, y, ta=ta, tb=tb)
    r = len(g.shape(x))
    perm = tuple(range(r - 2)) + (r - 1, r - 2)
    return g.add("matmul", g.add("transpose", x, perm=perm), y, tb=tb)


# ---- reductions --------------------------------------------------------------------------------------
def _reduce_infer(s, d, a):
    axes = norm_axes(a["axes"], len(s[0]))
    if a.get("keepdims"):
        return tuple(1 if i in axes else x for i, x in enumerate(s[0])), d[0]
    return tuple(x for i, x in enumerate(s[0]) if i not in axes), d[0]


def _reduce_ref(fn):
    def ref(x, *, axes, keepdims=False):
        return fn(x, axis=tuple(norm_axes(axes, x.ndim)), keepdims=keepdims)
    return ref


def _reduce_canon(s, a):
    return {**a, "axes": norm_axes(a["axes"], len(s[0])), "keepdims": bool(a.get("keepdims", False))}


reduce_sum = register(Op("reduce_sum", Kind.REDUCE, _reduce_infer, ref=_reduce_ref(np.sum), user_name="sum",
                         canon=_reduce_canon))
reduce_max = register(Op("reduce_max", Kind.REDUCE, _reduce_infer, ref=_reduce_ref(np.max), user_name="max",
                         canon=_reduce_canon))


def _expand_back(g, n, dy):
    """Broadcast a reduction's gradient back over the reduced axes."""
    x = g.args(n)[0]
    axes = norm_axes(g.attrs(n)["axes"], len(g.shape(x)))
    kshape = tuple(1 if i in axes else d for i, d in enumerate(g.shape(x)))
    if g.shape(dy) != kshape:
        dy = g.add("reshape", dy, shape=kshape)
    return dy, x, kshape


@reduce_sum.def_grad
def _(g, n, dy):
    dy, x, _ = _expand_back(g, n, dy)
    return [g.add("broadcast_to", dy, shape=g.shape(x))]


@reduce_max.def_grad
def _(g, n, dy):
    dy, x, kshape = _expand_back(g, n, dy)
    m = n if g.shape(n) == kshape else g.add("reshape", n, shape=kshape)
    return [g.add("where", g.add("eq", x, m), g.add("broadcast_to", dy, shape=g.shape(x)), _zero_like(g, dy))]


# ---- softmax family (row-wise over the last axis) ---------------------------------------------------
def _softmax_infer(s, d, a):
    _float(d)
    if a.get("axis", -1) not in (-1, len(s[0]) - 1):
        raise ShapeError("softmax is taken over the last axis; transpose first")
    if len(s[0]) == 0:
        raise ShapeError("softmax needs at least one axis")
    return s[0], d[0]


def _softmax_ref(x, *, axis=-1):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _log_softmax_ref(x, *, axis=-1):
    z = x - x.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


# Both row-wise kernels start from the row's maximum, for numerical stability, taken by a
# helper (compiled once, not in each kernel: translate's softmax kernels compiled 0.6 s slower
# with these loops inside each). It keeps four running maxima: LLVM does not vectorize a
# floating-point max without `nnan` (the kernels keep NaN checks), and one running max is a chain
# of dependent compare-selects (GPT's attention softmax, 4096 rows of 64: 247 -> 185 us; a
# stepped `range(1, n, 4)` kept it at 235). A NaN anywhere in the row still makes the whole row
# NaN (through its exp, in the sum).
ROW_MAX_HELPER = """\
@njit(cache=True, fastmath=FASTMATH, error_model='numpy')
def _row_max(x, out):
    # out[r] = max(x[r, :]) for every row r of a 2-D array
    n = x.shape[1]
    for r in range(x.shape[0]):
        mx0 = x[r, 0]
        mx1 = mx0
        mx2 = mx0
        mx3 = mx0
        q = (n - 1) // 4
        for jq in range(q):
            j = 1 + 4 * jq
            mx0 = x[r, j] if x[r, j] > mx0 else mx0
            mx1 = x[r, j + 1] if x[r, j + 1] > mx1 else mx1
            mx2 = x[r, j + 2] if x[r, j + 2] > mx2 else mx2
            mx3 = x[r, j + 3] if x[r, j + 3] > mx3 else mx3
        for j in range(4 * q + 1, n):
            mx0 = x[r, j] if x[r, j] > mx0 else mx0
        mx0 = mx1 if mx1 > mx0 else mx0
        mx2 = mx3 if mx3 > mx2 else mx2
        out[r] = mx2 if mx2 > mx0 else mx0
"""

_ROW_MAX = """\
rmax = np.empty({rows}, {T})
_row_max({0}, rmax)
for r in range({rows}):
    m = rmax[r]
"""

# The exponentials go to a row of scratch, not to `out`: in place (out is x, the fused kernel),
# a loop reading x and writing out fails the vectorizer's runtime overlap check (4.4x slower).
# The softmax's row sum is of the row's type: a float64 sum of float32 values converted every
# value (GPT's attention softmax, 64 x 1024 rows of 64: 314 -> 236 us). The log-softmax keeps
# a float64 sum and log: a float32 one was off by up to 1e-6 near 0 (the cross-entropy's
# log-probabilities of the likely classes), where the tests hold it to 1e-7.
_SOFTMAX_KERNEL = "row = np.empty({n}, {T})\n" + _ROW_MAX + """\
    s = {T}(0.0)
    for j in range({n}):
        e = np.exp({0}[r, j] - m)
        row[j] = e
        s += e
    inv = {T}(1.0) / s
    for j in range({n}):
        {out}[r, j] = row[j] * inv
"""

_LOG_SOFTMAX_KERNEL = _ROW_MAX + """\
    s = 0.0
    for j in range({n}):
        s += np.exp({0}[r, j] - m)
    lse = m + np.log(s)
    for j in range({n}):
        {out}[r, j] = {0}[r, j] - lse
"""

# In place (x and out the same array) as well: each loop reads x[r, j] before writing out[r, j].
softmax = register(Op("softmax", Kind.OPAQUE, _softmax_infer, ref=_softmax_ref, kernel=_SOFTMAX_KERNEL,
                      helpers=ROW_MAX_HELPER, rowwise=True))
log_softmax = register(Op("log_softmax", Kind.OPAQUE, _softmax_infer, ref=_log_softmax_ref,
                          kernel=_LOG_SOFTMAX_KERNEL, helpers=ROW_MAX_HELPER, rowwise=True))


@softmax.def_grad
def _(g, n, dy):
    s = g.add("reduce_sum", g.add("mul", dy, n), axes=(-1,), keepdims=True)
    return [g.add("mul", n, g.add("sub", dy, s))]


@log_softmax.def_grad
def _(g, n, dy):
    s = g.add("reduce_sum", dy, axes=(-1,), keepdims=True)
    return [g.add("sub", dy, g.add("mul", g.add("exp", n), s))]


def evaluate(graph, feeds: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
    """Run a graph with the NumPy references (the slow, obviously-correct interpreter). A
    `shape` attribute (reshape, broadcast_to, the random ops) reaches the reference with its
    symbolic sizes bound by the fed inputs' shapes."""
    vals: dict[int, np.ndarray] = dict(feeds)
    env = {}                                # symbolic size -> its value in this run
    for n in graph.inputs:
        if n in vals:
            for sym, size in zip(graph.shape(n), np.shape(vals[n])):
                if isinstance(sym, str) and "*" not in sym:
                    env[sym] = size
    for n in graph.topo():
        if n in vals:
            continue
        d = graph[n]
        if d["op"] == "input":
            raise KeyError(f"no value fed for input {d['name']!r}")
        attrs = dict(d["attrs"])
        if "shape" in attrs:
            attrs["shape"] = resolve(attrs["shape"], env)
        out = OPS[d["op"]].ref(*[vals[a] for a in d["args"]], **attrs)
        vals[n] = out if d["dtype"] == "tuple" else np.asarray(out).astype(DTYPES[d["dtype"]], copy=False)
    return vals


# Ops whose outputs are piecewise constant or integer: their gradient is zero.
def _no_grad(g, n, dy):
    return [None] * len(g.args(n))


for _name in ("size", "sign", "onehot", "lt", "le", "gt", "ge", "eq", "ne", "stop_gradient"):
    OPS[_name].grad = _no_grad


from . import ops_nn  # noqa: E402,F401  (registers the convolution, pooling and random ops)
from . import ops_scan  # noqa: E402,F401  (registers scan and get)
from . import ops_seq  # noqa: E402,F401  (registers slice, unslice, take, scatter_add, argmax)
from . import ops_math  # noqa: E402,F401  (registers floor, sin, cos, //, logical ops, iota, flip, cumsum)
from . import ops_layers  # noqa: E402,F401  (registers conv_transpose2d)
from . import ops_random  # noqa: E402,F401  (registers rand_normal)
from . import ops_sample  # noqa: E402,F401  (registers top_k)
