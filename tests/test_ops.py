"""Every primitive of the op registry, two ways.

(a) Its gradient rule against central finite differences, and its NumPy reference against an
    independent NumPy/SciPy expression. Only the NumPy evaluator (`ops.evaluate`) runs here,
    no Numba: a tiny f64 graph `y = op(inputs)`, `loss = sum(y * u)` for a fixed random `u`,
    `autodiff.grad`, then d loss / d input against (L(x + eps) - L(x - eps)) / 2 eps.
(b) The generated Numba kernels against the NumPy references: four `.dl` programs
    (elementwise, layout and reductions, a CNN, a scan) that together run every primitive,
    compiled forward and with gradients, compared with `ops.evaluate` on the same optimized
    graph and with plain NumPy; in f32, every kernel output stays float32.

A primitive added to the registry fails `test_every_primitive_has_a_gradient_test` and
`test_kernels_cover_every_primitive` until it is tested here.
"""
from __future__ import annotations

import math
import re
import zlib

import numpy as np
import pytest
from scipy import special

from compiler import autodiff
from compiler.api import compile_function, lower_function
from compiler.ir import Graph
from compiler.ops import OPS, evaluate
from compiler.shapes import DTYPES

PRIMITIVES = sorted(set(OPS) - {"input", "const"})
DT_NAME = {np.dtype(v): k for k, v in DTYPES.items()}
EPS, RTOL, ATOL = 1e-6, 1e-5, 1e-8


# =============================================================================================
# (a) gradient rules and references, with the NumPy evaluator
# =============================================================================================

def _graph(inputs: dict):
    g = Graph("op_test")
    nodes = {k: g.input(k, np.shape(v), DT_NAME[np.asarray(v).dtype], "data") for k, v in inputs.items()}
    return g, nodes


def grad_check(build, inputs: dict, **kw):
    """y = build(g, nodes) on a graph with `inputs`; see `check_graph`."""
    inputs = {k: np.asarray(v) for k, v in inputs.items()}
    g, nodes = _graph(inputs)
    return check_graph(g, build(g, nodes), nodes, inputs, **kw)


def dl_grad_check(src: str, inputs: dict, **kw):
    """The same for the output of a `.dl` model, lowered (not compiled) in f64."""
    _, prog = lower_function(src, dtype="f64")
    g = prog.graph
    nodes = {g[n]["name"]: n for n in g.inputs}
    assert set(nodes) == set(inputs), sorted(nodes)
    return check_graph(g, g.outputs["output"], nodes, {k: np.asarray(v) for k, v in inputs.items()}, **kw)


def check_graph(g, y, nodes, inputs, *, eps=EPS, rtol=RTOL, atol=ATOL, seed=0):
    """loss = sum(y * u) for a fixed random u. Checks the shape rule against the reference
    and every float input's gradient (`autodiff.grad`, run by `ops.evaluate`) against central
    differences. Returns (y, {input: gradient})."""
    feeds = {nodes[k]: v for k, v in inputs.items()}
    shape = g.shape(y)
    yv0 = evaluate(g, feeds)[y]
    u = np.random.default_rng(1000 + seed).normal(size=yv0.shape)
    un = g.input("__u", shape, "f64", "data")
    feeds[un] = u
    prod = g.add("mul", y, un)
    loss = g.add("reduce_sum", prod, axes=tuple(range(len(shape))), keepdims=False) if shape else prod
    fwd = g.copy()                                      # the forward graph, for the differences
    wrt = [k for k, v in inputs.items() if v.dtype == np.float64]
    grads = autodiff.grad(g, loss, [nodes[k] for k in wrt])
    g.verify()
    vals = evaluate(g, feeds)
    yv = vals[y]
    if all(isinstance(d, int) for d in shape):
        assert yv.shape == tuple(shape), f"shape rule says {shape}, reference gives {yv.shape}"
    assert yv.dtype == DTYPES[g.dtype(y)]

    def L(k, x):
        return float(evaluate(fwd, {**feeds, nodes[k]: x})[loss])

    out = {}
    for k in wrt:
        x = inputs[k]
        dn = grads[nodes[k]]
        assert g.shape(dn) == g.shape(nodes[k]) and g.dtype(dn) == "f64", (g.shape(dn), g.dtype(dn))
        analytic = vals[dn]
        assert analytic.shape == x.shape
        fd = np.zeros_like(x)
        for i in np.ndindex(x.shape):
            xp, xm = x.copy(), x.copy()
            xp[i] += eps
            xm[i] -= eps
            fd[i] = (L(k, xp) - L(k, xm)) / (2 * eps)
        np.testing.assert_allclose(analytic, fd, rtol=rtol, atol=atol, err_msg=f"d loss / d {k}")
        out[k] = analytic
    return yv, out


def op(name, *args, **attrs):
    """A builder applying one op to the named inputs."""
    return lambda g, n: g.add(name, *[n[a] for a in args], **attrs)


def rng(seed=0):
    return np.random.default_rng(seed)


def away_from_zero(r, shape, lo=0.2, hi=2.0):
    return r.choice([-1.0, 1.0], size=shape) * r.uniform(lo, hi, size=shape)


# ---- unary --------------------------------------------------------------------------------------
UNARY_DATA = {
    "neg": lambda r, s: r.normal(size=s),
    "exp": lambda r, s: r.normal(size=s),
    "log": lambda r, s: r.uniform(0.3, 3.0, size=s),
    "sqrt": lambda r, s: r.uniform(0.3, 3.0, size=s),
    "tanh": lambda r, s: r.normal(size=s),
    "sigmoid": lambda r, s: 2 * r.normal(size=s),
    "relu": away_from_zero,
    "abs": away_from_zero,
    "erf": lambda r, s: r.normal(size=s),
}


@pytest.mark.parametrize("shape", [(3, 4), (5,), ()], ids=str)
@pytest.mark.parametrize("name", sorted(UNARY_DATA))
def test_unary_grad(name, shape):
    x = UNARY_DATA[name](rng(1), shape)
    y, _ = grad_check(op(name, "x"), {"x": x})
    np.testing.assert_allclose(y, OPS[name].ref(x))


UNARY_INDEPENDENT = {
    "neg": lambda x: 0.0 - x,
    "exp": lambda x: np.vectorize(math.exp)(x),
    "log": lambda x: np.vectorize(math.log)(x),
    "sqrt": lambda x: x ** 0.5,
    "tanh": lambda x: (np.exp(2 * x) - 1) / (np.exp(2 * x) + 1),
    "sigmoid": lambda x: np.vectorize(lambda v: 1 / (1 + math.exp(-v)))(x),
    "relu": lambda x: np.where(x > 0, x, 0.0),
    "abs": lambda x: np.sqrt(x * x),
    "erf": lambda x: np.vectorize(math.erf)(x),
    "sign": lambda x: np.array([int(v > 0) - int(v < 0) for v in x.tolist()], float).reshape(x.shape),
}


@pytest.mark.parametrize("name", sorted(UNARY_INDEPENDENT))
def test_unary_reference(name):
    x = np.array([-30.0, -2.5, -1.0, -1e-3, 0.0, 1e-3, 0.7, 3.0, 30.0])
    if name in ("log", "sqrt"):
        x = np.abs(x) + 0.01
    got = OPS[name].ref(x)
    np.testing.assert_allclose(got, UNARY_INDEPENDENT[name](x), rtol=1e-10, atol=1e-300)


def test_sigmoid_reference_saturates_without_overflow():
    with np.errstate(all="raise"):
        y = OPS["sigmoid"].ref(np.array([-800.0, 800.0]))
    assert y[0] == 0.0 and y[1] == 1.0


# ---- zero-gradient ops: comparisons, sign, onehot, size ---------------------------------------
ZERO_GRAD = ("lt", "le", "gt", "ge", "eq", "ne", "sign", "onehot", "size")


@pytest.mark.parametrize("name", ZERO_GRAD)
def test_zero_gradient_rule_returns_none(name):
    g = Graph()
    x = g.input("x", (3, 4), "f64", "data")
    z = g.input("z", (4,), "f64", "data")
    if name == "onehot":
        n = g.add("onehot", g.input("l", (3,), "i64", "data"), depth=4, dtype="f64")
    elif name == "size":
        n = g.add("size", x, axes=(0,), dtype="f64")
    elif name == "sign":
        n = g.add("sign", x)
    else:
        n = g.add(name, x, z)
    dy = g.input("dy", g.shape(n), "f64", "data")
    assert OPS[name].grad(g, n, dy) == [None] * len(g.args(n))


@pytest.mark.parametrize("name", ["lt", "le", "gt", "ge", "eq", "ne"])
def test_comparison_has_zero_gradient(name):
    r = rng(2)
    # y = cmp(a, b) (bool, promoted by the product with u): the loss is piecewise constant
    _, grads = grad_check(op(name, "a", "b"), {"a": r.normal(size=(3, 4)), "b": r.normal(size=(4,))})
    assert set(grads) == {"a", "b"}
    for v in grads.values():
        assert np.all(v == 0)


def test_sign_and_size_have_zero_gradient():
    x = away_from_zero(rng(3), (2, 3, 4))
    _, gs = grad_check(op("sign", "x"), {"x": x})
    assert np.all(gs["x"] == 0)
    y, gz = grad_check(op("size", "x", axes=(0, 2), dtype="f64"), {"x": x})
    assert y == 8.0 and np.all(gz["x"] == 0)

    # size as a factor: d/dx sum(x * size(x) * u) = size * u, and size itself adds nothing
    def build(g, n):
        return g.add("mul", n["x"], g.add("size", n["x"], axes=(-1,), dtype="f64"))
    y2, _ = grad_check(build, {"x": x})
    np.testing.assert_allclose(y2, 4 * x)


@pytest.mark.parametrize("axes,expected", [((0,), 2), ((1, 2), 12), ((-1,), 4), ((0, 1, 2), 24), ((), 1)])
def test_size_reference(axes, expected):
    x = np.zeros((2, 3, 4))
    g, n = _graph({"x": x})
    s = g.add("size", n["x"], axes=axes, dtype="f64")
    v = evaluate(g, {n["x"]: x})[s]
    assert v.dtype == np.float64 and v.shape == () and v == expected
    assert OPS["size"].ref(x, axes=g.attrs(s)["axes"], dtype="i64") == expected


def test_onehot_gradient_and_reference():
    labels = np.array([[0, 4, 2], [1, 1, 3]])
    x = rng(4).normal(size=(2, 3, 5))

    def build(g, n):
        return g.add("mul", g.add("onehot", n["l"], depth=5, dtype="f64"), n["x"])
    y, grads = grad_check(build, {"l": labels, "x": x})
    eye = np.eye(5)[labels]
    np.testing.assert_array_equal(y, eye * x)
    assert set(grads) == {"x"}                       # integer labels take no gradient
    ref = OPS["onehot"].ref(labels, depth=5, dtype="f32")
    assert ref.dtype == np.float32 and ref.shape == (2, 3, 5)
    np.testing.assert_array_equal(ref, eye)


@pytest.mark.parametrize("name,fn", [("lt", lambda a, b: a < b), ("le", lambda a, b: a <= b),
                                     ("gt", lambda a, b: a > b), ("ge", lambda a, b: a >= b),
                                     ("eq", lambda a, b: a == b), ("ne", lambda a, b: a != b)])
def test_comparison_reference_with_ties(name, fn):
    a = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    b = np.array([2.0, 2.0, 2.0])
    want = np.array([[fn(float(x), float(y)) for x, y in zip(row, b)] for row in a])
    got = OPS[name].ref(a, b)
    assert got.dtype == np.bool_
    np.testing.assert_array_equal(got, want)


# ---- cast ---------------------------------------------------------------------------------------
def test_cast_gradient_through_f32_and_back():
    x = rng(5).normal(size=(3, 4))

    def build(g, n):
        return g.add("cast", g.add("cast", n["x"], dtype="f32"), dtype="f64")
    # f32 rounding limits the differences: a larger step and looser tolerance
    y, _ = grad_check(build, {"x": x}, eps=1e-2, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(y, x, rtol=1e-7)
    assert y.dtype == np.float64


def test_cast_rules():
    g = Graph()
    xi = g.input("i", (3,), "i64", "data")
    xf = g.input("f", (3,), "f64", "data")
    ci = g.add("cast", xi, dtype="f64")
    cf = g.add("cast", xf, dtype="f32")
    assert OPS["cast"].grad(g, ci, g.input("d1", (3,), "f64", "data")) == [None]
    (d,) = OPS["cast"].grad(g, cf, g.input("d2", (3,), "f32", "data"))
    assert g.op(d) == "cast" and g.dtype(d) == "f64"
    np.testing.assert_array_equal(OPS["cast"].ref(np.array([-1.7, 0.2, 2.9]), dtype="i64"), [-1, 0, 2])
    np.testing.assert_array_equal(OPS["cast"].ref(np.array([True, False]), dtype="f64"), [1.0, 0.0])


# ---- binary, with broadcasting ------------------------------------------------------------------
BIN_SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((3, 4), (3, 1)), ((4,), (3, 4)), ((3, 1), (1, 4)),
              ((2, 3, 4), (3, 1)), ((), (3, 4)), ((3, 4), ()), ((2, 1, 4), (3, 1))]


def _binary_data(name, sa, sb, seed):
    r = rng(seed)
    if name == "div":
        return r.normal(size=sa), away_from_zero(r, sb, 0.5, 1.5)
    if name == "pow":
        return r.uniform(0.5, 2.0, size=sa), r.uniform(-1.5, 1.5, size=sb)
    while True:
        a, b = r.normal(size=sa), r.normal(size=sb)
        if name not in ("maximum", "minimum") or np.min(np.abs(a - b)) > 1e-3:   # no ties
            return a, b


BINARY_INDEPENDENT = {
    "add": lambda a, b: a + b, "sub": lambda a, b: a + (-b), "mul": lambda a, b: a * b,
    "div": lambda a, b: a * (1.0 / b), "pow": lambda a, b: np.exp(b * np.log(a)),
    "maximum": lambda a, b: np.where(a >= b, a, b), "minimum": lambda a, b: np.where(a <= b, a, b),
}


@pytest.mark.parametrize("sa,sb", BIN_SHAPES, ids=lambda s: str(list(s)))
@pytest.mark.parametrize("name", sorted(BINARY_INDEPENDENT))
def test_binary_grad(name, sa, sb):
    a, b = _binary_data(name, sa, sb, zlib.crc32(repr((name, sa, sb)).encode()))
    y, grads = grad_check(op(name, "a", "b"), {"a": a, "b": b})
    assert y.shape == np.broadcast_shapes(sa, sb)
    np.testing.assert_allclose(y, BINARY_INDEPENDENT[name](a, b), rtol=1e-12)
    assert grads["a"].shape == sa and grads["b"].shape == sb


def test_maximum_minimum_select_one_side_at_ties():
    """At a tie the gradient goes to one operand, not both (the sum is d loss / d x for max(x, x))."""
    for name in ("maximum", "minimum"):
        g, n = _graph({"a": np.ones(3), "b": np.ones(3)})
        y = g.add(name, n["a"], n["b"])
        loss = g.add("reduce_sum", y, axes=(0,), keepdims=False)
        gr = autodiff.grad(g, loss, [n["a"], n["b"]])
        v = evaluate(g, {n["a"]: np.ones(3), n["b"]: np.ones(3)})
        np.testing.assert_array_equal(v[gr[n["a"]]] + v[gr[n["b"]]], np.ones(3))


# ---- where --------------------------------------------------------------------------------------
@pytest.mark.parametrize("sc,sa,sb", [((3, 4), (3, 4), (3, 4)), ((3, 4), (4,), (3, 1)), ((3, 1), (3, 4), ()),
                                      ((4,), (2, 3, 4), (3, 4))], ids=str)
def test_where_grad(sc, sa, sb):
    r = rng(6)
    c = r.random(size=sc) > 0.5
    a, b = r.normal(size=sa), r.normal(size=sb)
    y, grads = grad_check(op("where", "c", "a", "b"), {"c": c, "a": a, "b": b})
    cb, ab, bb = (v.ravel() for v in np.broadcast_arrays(c, a, b))
    np.testing.assert_array_equal(y.ravel(), [x if cc else z for cc, x, z in zip(cb, ab, bb)])
    assert set(grads) == {"a", "b"}


def test_where_condition_takes_no_gradient():
    g = Graph()
    c = g.input("c", (3,), "bool", "data")
    a, b = g.input("a", (3,), "f64", "data"), g.input("b", (3,), "f64", "data")
    n = g.add("where", c, a, b)
    assert OPS["where"].grad(g, n, g.input("dy", (3,), "f64", "data"))[0] is None


# ---- layout ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sx,shape", [((4,), (3, 4)), ((3, 1), (2, 3, 4)), ((), (2, 3)), ((1, 4), (3, 4))], ids=str)
def test_broadcast_to_grad(sx, shape):
    x = rng(7).normal(size=sx)
    y, _ = grad_check(op("broadcast_to", "x", shape=shape), {"x": x})
    xe = x.reshape((1,) * (len(shape) - len(sx)) + sx)
    np.testing.assert_array_equal(y, np.tile(xe, [s // d for s, d in zip(shape, xe.shape)]))


@pytest.mark.parametrize("sx,shape", [((3, 4), (2, 6)), ((2, 3, 4), (6, 4)), ((2, 3, 4), (4, -1)), ((6,), (2, 1, 3))],
                         ids=str)
def test_reshape_grad(sx, shape):
    x = rng(8).normal(size=sx)
    y, _ = grad_check(op("reshape", "x", shape=shape), {"x": x})
    np.testing.assert_array_equal(y.ravel(), x.ravel())          # row-major order kept
    assert y.shape == np.empty(sx).reshape(shape).shape


@pytest.mark.parametrize("sx,perm", [((3, 4), (1, 0)), ((2, 3, 4), (2, 0, 1)), ((2, 3, 4), (1, 0, 2)),
                                     ((2, 3, 4), (0, 2, 1)), ((2, 3, 1, 2), (3, 1, 0, 2))], ids=str)
def test_transpose_grad(sx, perm):
    x = rng(9).normal(size=sx)
    y, _ = grad_check(op("transpose", "x", perm=perm), {"x": x})
    for i in np.ndindex(x.shape):                                  # y[i[perm]] = x[i]
        assert y[tuple(i[p] for p in perm)] == x[i]


# ---- matmul ------------------------------------------------------------------------------------
MATMUL_CASES = [  # (a shape, b shape, ta, tb)
    ((3, 4), (4, 5), False, False),
    ((4, 3), (4, 5), True, False),
    ((3, 4), (5, 4), False, True),
    ((4, 3), (5, 4), True, True),
    ((2, 3, 4), (4, 5), False, False),
    ((2, 3, 4), (5, 4), False, True),
    ((2, 3, 4), (2, 4, 5), False, False),
    ((2, 3, 4), (2, 5, 4), False, True),
    ((2, 2, 3, 4), (4, 5), False, False),
    ((3, 4), (2, 4, 5), False, False),
    ((2, 3, 4), (1, 4, 5), False, False),
    ((4, 3), (2, 4, 5), True, False),
    ((4, 3), (2, 5, 4), True, True),
]


@pytest.mark.parametrize("sa,sb,ta,tb", MATMUL_CASES, ids=lambda v: str(v))
def test_matmul_grad(sa, sb, ta, tb):
    r = rng(10)
    a, b = r.normal(size=sa), r.normal(size=sb)
    y, _ = grad_check(op("matmul", "a", "b", ta=ta, tb=tb), {"a": a, "b": b})
    ea = "...kj" if ta else "...jk"
    eb = "...nk" if tb else "...kn"
    want = np.einsum(f"{ea},{eb}->...jn", a, b)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-12)


# ---- reductions --------------------------------------------------------------------------------
@pytest.mark.parametrize("keepdims", [False, True])
@pytest.mark.parametrize("axes", [(0,), (1,), (2,), (-1,), (0, 2), (-3, -2), (0, 1, 2)], ids=str)
@pytest.mark.parametrize("name", ["reduce_sum", "reduce_max"])
def test_reduce_grad(name, axes, keepdims):
    x = rng(11).normal(size=(2, 3, 4))                 # continuous: no ties for max
    y, grads = grad_check(op(name, "x", axes=axes, keepdims=keepdims), {"x": x})
    ax = tuple(a % 3 for a in axes)
    want = np.empty(tuple(1 if i in ax else d for i, d in enumerate(x.shape)))
    for i in np.ndindex(want.shape):
        sl = tuple(slice(None) if k in ax else v for k, v in enumerate(i))
        want[i] = (sum if name == "reduce_sum" else max)(x[sl].ravel().tolist())
    if not keepdims:
        want = want.reshape(tuple(d for i, d in enumerate(x.shape) if i not in ax))
    np.testing.assert_allclose(y, want, rtol=1e-12)
    if name == "reduce_max":                           # one 1 per reduced slice, times u
        assert np.count_nonzero(grads["x"]) == want.size


# ---- softmax family ----------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4), (5,)], ids=str)
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_grad(name, shape):
    x = 2 * rng(12).normal(size=shape)
    y, _ = grad_check(op(name, "x"), {"x": x})
    want = special.softmax(x, axis=-1) if name == "softmax" else special.log_softmax(x, axis=-1)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-15)


def test_softmax_references_are_stable():
    x = np.array([[1000.0, 1001.0, 999.0], [-1000.0, -1000.0, -1000.0]])
    with np.errstate(all="raise"):
        s = OPS["softmax"].ref(x)
        ls = OPS["log_softmax"].ref(x)
    np.testing.assert_allclose(s.sum(-1), 1.0)
    e = np.exp([0.0, 1.0, -1.0])
    np.testing.assert_allclose(s[0], e / e.sum())
    np.testing.assert_allclose(ls[1], np.log(np.full(3, 1 / 3)))


# ---- a composite: gradients summed over several paths ----------------------------------------
def test_gradients_accumulate_over_paths():
    x = rng(13).normal(size=(3, 4))
    w = rng(14).normal(size=(4, 4))

    def build(g, n):
        h = g.add("tanh", g.add("matmul", n["x"], n["w"]))
        t = g.add("transpose", g.add("reshape", h, shape=(4, 3)), perm=(1, 0))
        return g.add("add", g.add("mul", h, g.add("exp", n["x"])), g.add("reshape", t, shape=(3, 4)))
    grad_check(build, {"x": x, "w": w})


# ---- convolution and pooling (NCHW, weights [out, in, kh, kw]) ------------------------------------
def _window(i, s, p, k, d, size):
    """Input positions read by output position i along one axis, and which taps they are."""
    return [(t, i * s - p + t * d) for t in range(k) if 0 <= i * s - p + t * d < size]


def conv_naive(x, w, stride, padding, dilation):
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    n, c, h, wd = x.shape
    o, _, kh, kw = w.shape
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pw - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((n, o, ho, wo))
    for i in range(ho):
        for j in range(wo):
            for a, ih in _window(i, sh, ph, kh, dh, h):
                for b, iw in _window(j, sw, pw, kw, dw, wd):
                    out[:, :, i, j] += x[:, :, ih, iw] @ w[:, :, a, b].T
    return out


def pool_naive(x, kernel, stride, padding, how):
    (kh, kw), (sh, sw), (ph, pw) = kernel, stride, padding
    n, c, h, wd = x.shape
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    out = np.zeros((n, c, ho, wo))
    for i in range(ho):
        for j in range(wo):
            rows = [r for _, r in _window(i, sh, ph, kh, 1, h)]
            cols = [q for _, q in _window(j, sw, pw, kw, 1, wd)]
            win = x[:, :, rows][:, :, :, cols].reshape(n, c, -1)
            out[:, :, i, j] = win.max(-1) if how == "max" else win.sum(-1) / (kh * kw)   # pad counts
    return out


CONV_CASES = [  # (x shape, w shape, stride, padding, dilation)
    ((2, 3, 5, 5), (4, 3, 3, 3), (1, 1), (0, 0), (1, 1)),
    ((2, 3, 5, 5), (4, 3, 3, 3), (2, 2), (1, 1), (1, 1)),
    ((1, 2, 6, 5), (3, 2, 2, 3), (1, 2), (1, 0), (1, 1)),
    ((1, 2, 7, 7), (2, 2, 3, 3), (1, 1), (2, 2), (2, 2)),
]


@pytest.mark.parametrize("sx,sw,stride,padding,dilation", CONV_CASES, ids=str)
def test_conv2d_grad(sx, sw, stride, padding, dilation):
    r = rng(15)
    x, w = r.normal(size=sx), r.normal(size=sw)
    y, _ = grad_check(op("conv2d", "x", "w", stride=stride, padding=padding, dilation=dilation), {"x": x, "w": w})
    np.testing.assert_allclose(y, conv_naive(x, w, stride, padding, dilation), rtol=1e-12, atol=1e-12)


POOL_CASES = [((2, 2, 4, 4), (2, 2), (2, 2), (0, 0)), ((1, 3, 5, 5), (3, 3), (2, 2), (1, 1)),
              ((1, 2, 5, 4), (3, 2), (1, 1), (1, 0)), ((2, 1, 6, 6), (2, 3), (2, 3), (1, 1))]


@pytest.mark.parametrize("sx,kernel,stride,padding", POOL_CASES, ids=str)
@pytest.mark.parametrize("how", ["max", "avg"])
def test_pool_grad(how, sx, kernel, stride, padding):
    x = rng(16).normal(size=sx)                      # continuous: no ties in a max window
    y, _ = grad_check(op(f"{how}_pool2d", "x", kernel=kernel, stride=stride, padding=padding), {"x": x})
    np.testing.assert_allclose(y, pool_naive(x, kernel, stride, padding, how), rtol=1e-12, atol=1e-14)


def test_conv_and_pool_gradients_use_their_gradient_ops():
    """The gradient primitives (checked by the differences above) are what the rules emit;
    they have no gradient of their own."""
    for fwd, extra in [("conv2d", {"w": (2, 3, 3, 3)}), ("max_pool2d", {}), ("avg_pool2d", {})]:
        g = Graph()
        x = g.input("x", (1, 3, 4, 4), "f64", "data")
        args = [x] + [g.input(k, s, "f64", "data") for k, s in extra.items()]
        attrs = {} if fwd == "conv2d" else {"kernel": (2, 2), "stride": (2, 2), "padding": (0, 0)}
        n = g.add(fwd, *args, **attrs)
        grads = OPS[fwd].grad(g, n, g.input("dy", g.shape(n), "f64", "data"))
        want = ["conv2d_grad_x", "conv2d_grad_w"] if fwd == "conv2d" else [f"{fwd}_grad"]
        assert [g.op(d) for d in grads] == want
        for d, a in zip(grads, args):
            assert g.shape(d) == g.shape(a)
            assert OPS[g.op(d)].grad is None


# ---- randomness -------------------------------------------------------------------------------
def splitmix_uniform(seed, salt, i):
    """SplitMix64 of (seed, salt, index) in Python integers, mapped to [0, 1) with 53 bits."""
    m = (1 << 64) - 1
    z = (seed + salt * 0xD1B54A32D192ED03 + i * 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    z ^= z >> 31
    return (z >> 11) / float(1 << 53)


def test_rand_uniform_reference_and_gradient():
    g = Graph()
    seed = g.input("seed", (), "i64", "scalar")
    n = g.add("rand_uniform", seed, shape=(40, 50), salt=3, dtype="f64")
    g2 = g.copy()
    assert OPS["rand_uniform"].grad(g2, n, g2.input("dy", (40, 50), "f64", "data")) == [None]
    v = evaluate(g, {seed: np.array(11)})[n]
    assert v.shape == (40, 50) and v.dtype == np.float64
    assert v.min() >= 0 and v.max() < 1 and abs(v.mean() - 0.5) < 0.02 and abs(v.var() - 1 / 12) < 0.01
    assert [v.flat[i] for i in (0, 1, 777)] == [splitmix_uniform(11, 3, i) for i in (0, 1, 777)]
    again = evaluate(g, {seed: np.array(11)})[n]
    np.testing.assert_array_equal(v, again)                                  # deterministic
    other = evaluate(g, {seed: np.array(12)})[n]
    assert np.mean(v == other) < 0.01                                        # a new seed, new numbers
    f32 = OPS["rand_uniform"].ref(np.array(11), shape=(40, 50), salt=3, dtype="f32")
    assert f32.dtype == np.float32 and np.allclose(f32, v, rtol=1e-7)
    # as a factor: d/dx sum(rand * x * u) = rand * u, and the seed takes no gradient
    x = rng(17).normal(size=(3, 4))

    def build(g, nd):
        r = g.add("rand_uniform", nd["s"], shape=(3, 4), salt=1, dtype="f64")
        return g.add("mul", r, nd["x"])
    y, grads = grad_check(build, {"s": np.array(5), "x": x})
    assert set(grads) == {"x"}
    np.testing.assert_allclose(y / x, [[splitmix_uniform(5, 1, i * 4 + j) for j in range(4)] for i in range(3)])


# ---- sequences: slicing, embedding lookup, argmax, scan ----------------------------------------
@pytest.mark.parametrize("sx,axis,start,stop", [((3, 6), -1, 2, 5), ((4, 3, 2), 0, 1, 3), ((2, 5, 3), 1, 0, 1),
                                                ((6,), 0, 0, 6)], ids=str)
def test_slice_and_unslice_grad(sx, axis, start, stop):
    x = rng(18).normal(size=sx)
    y, _ = grad_check(op("slice", "x", axis=axis, start=start, stop=stop), {"x": x})
    np.testing.assert_array_equal(y, np.take(x, range(start, stop), axis=axis))
    size = sx[axis]
    z, _ = grad_check(op("unslice", "y", axis=axis, start=start, stop=stop, size=size), {"y": y})
    want = np.zeros_like(x)
    np.put_along_axis(want, np.arange(start, stop).reshape([-1 if i == axis % x.ndim else 1
                                                            for i in range(x.ndim)]), y, axis=axis)
    np.testing.assert_array_equal(z, want)
    # the two are adjoint: <slice(x), y> = <x, unslice(y)>
    np.testing.assert_allclose(np.sum(y * y), np.sum(x * z))


def test_take_grad_accumulates_repeated_rows():
    table = rng(19).normal(size=(5, 3))
    ids = np.array([[0, 4, 4], [2, 0, 4]])
    y, grads = grad_check(op("take", "t", "i"), {"t": table, "i": ids})
    np.testing.assert_array_equal(y, np.stack([[table[k] for k in row] for row in ids]))
    assert set(grads) == {"t"}
    assert np.all(grads["t"][[1, 3]] == 0)                  # rows never looked up


def test_scatter_add_reference():
    ids = np.array([[1, 1], [0, 3]])
    dy = np.arange(12.0).reshape(2, 2, 3)
    want = np.zeros((4, 3))
    for (a, b), k in np.ndenumerate(ids):
        want[k] += dy[a, b]
    np.testing.assert_array_equal(OPS["scatter_add"].ref(ids, dy, rows=4), want)


def test_argmax_reference_and_gradient():
    x = np.array([[[1.0, 3.0, 3.0], [-1.0, -2.0, -0.5]], [[0.0, 0.0, 0.0], [2.0, 1.0, 5.0]]])
    got = OPS["argmax"].ref(x)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, [[1, 2], [0, 2]])               # the first maximum on ties
    g, n = _graph({"x": x})
    a = g.add("argmax", n["x"])
    assert g.dtype(a) == "i32" and g.shape(a) == (2, 2)
    assert OPS["argmax"].grad(g, a, g.input("dy", (2, 2), "i32", "data")) == [None]


def test_sample_reference_kernel_and_distribution():
    """`sample` draws one class per row from softmax(logits / T) by inverting the CDF at the
    counter-based uniform numbers: the kernel and the reference draw the same classes, the
    frequencies follow the distribution, and there is no gradient."""
    logits = np.log(np.array([[0.1, 0.2, 0.7]] * 4000))
    src = "model s(x: f64[B, 3]) -> i32[B] { return sample(x, 1.0) }"
    f = compile_function(src, training=False)
    got = f(x=logits, rng=7)["output"]
    assert got.dtype == np.int32
    ref = OPS["sample"].ref(logits, np.array(7), salt=1, temperature=1.0)
    np.testing.assert_array_equal(got, ref)
    freq = np.bincount(got, minlength=3) / len(got)
    np.testing.assert_allclose(freq, [0.1, 0.2, 0.7], atol=0.03)
    cold = OPS["sample"].ref(logits[:2000], np.array(7), salt=1, temperature=0.05)
    assert (cold == 2).all()                                           # a low temperature is greedy
    assert not np.array_equal(f(x=logits, rng=8)["output"], got)        # another step, other draws
    g, n = _graph({"x": logits[:2]})
    seed = g.input("rng", (), "i64", "scalar")
    a = g.add("sample", n["x"], seed, salt=1, temperature=1.0)
    assert g.dtype(a) == "i32" and OPS["sample"].grad(g, a, None) == [None, None]


SCAN_SRC = """
model recur(x: f64[B, 4, 3], h0: f64[B, 2], Wx: f64[3, 2], Wh: f64[2, 2]) {
    ys = scan xt in x, h = h0 {
        h = tanh(xt @ Wx + h @ Wh)
        yield h * h
    }
    return ys + reshape(h, [-1, 1, 2])
}
"""


def scan_numpy(d):
    h, ys = d["h0"], []
    for t in range(d["x"].shape[1]):
        h = np.tanh(d["x"][:, t] @ d["Wx"] + h @ d["Wh"])
        ys.append(h * h)
    return np.stack(ys, axis=1) + h[:, None, :]


def test_scan_grad_is_backpropagation_through_time():
    r = rng(23)
    data = {"x": r.normal(size=(2, 4, 3)), "h0": r.normal(size=(2, 2)), "Wx": r.normal(size=(3, 2)),
            "Wh": r.normal(size=(2, 2))}
    y, grads = dl_grad_check(SCAN_SRC, data)
    np.testing.assert_allclose(y, scan_numpy(data), rtol=1e-13)
    assert set(grads) == set(data)


# the ops whose gradient rule the tests above check (a new primitive must be added to them)
GRAD_TESTED = (set(UNARY_DATA) | set(BINARY_INDEPENDENT) | set(ZERO_GRAD) |
               {"cast", "where", "broadcast_to", "reshape", "transpose", "matmul", "reduce_sum", "reduce_max",
                "softmax", "log_softmax", "conv2d", "max_pool2d", "avg_pool2d", "rand_uniform",
                "slice", "unslice", "take", "argmax", "sample", "scan",
                # gradient primitives: their references are the analytic gradients checked above
                "conv2d_grad_x", "conv2d_grad_w", "max_pool2d_grad", "avg_pool2d_grad", "scatter_add",
                # a scan's results, differentiated by autodiff itself with the scan
                "get"})
GRAD_TESTED |= {"floor", "sin", "cos", "floordiv", "logical_and", "logical_or", "logical_not", "iota",
                "flip", "cumsum"}    # in tests/test_lang.py
GRAD_TESTED |= {"stop_gradient"}      # finite differences through it in tests/test_phases.py
GRAD_TESTED |= {"rand_normal"}        # no gradient; reparameterized draws in tests/test_generative.py
GRAD_TESTED |= {"conv_transpose2d"}   # every gradient against PyTorch in tests/test_golden_layers.py
GRAD_TESTED |= {"top_k"}              # finite differences in tests/test_sample_gpt.py


def test_every_primitive_has_a_gradient_test():
    missing = set(PRIMITIVES) - GRAD_TESTED
    assert not missing, f"primitives whose gradient rule is not tested here: {sorted(missing)}"


# =============================================================================================
# (b) generated Numba kernels against the NumPy references
# =============================================================================================

ELEMENTWISE_SRC = """
model ew(x: f64[B, 4], y: f64[B, 4], z: f64[4], w: f64[B, 1]) {
    p = exp(x) + log(abs(y) + 1) + sqrt(abs(x) + 0.1) * tanh(y) - sigmoid(-x) / (1 + relu(y))
    q = erf(x) * sign(y) + maximum(x, z) - minimum(y, w) + (abs(y) + 0.5) ** z
    c = float(x < z) + float(x <= y) + float(x >= w) + float(x == y) + float(x != z) * 0.5
    return where(x > y, p, q) + c
}
model ewloss(x: f64[B, 4], y: f64[B, 4], z: f64[4], w: f64[B, 1], u: f64[B, 4]) {
    return sum(ew(x, y, z, w) * u)
}
"""


def ew_numpy(d):
    x, y, z, w = d["x"], d["y"], d["z"], d["w"]
    sig = 1 / (1 + np.exp(x))
    p = np.exp(x) + np.log(np.abs(y) + 1) + np.sqrt(np.abs(x) + 0.1) * np.tanh(y) - sig / (1 + np.maximum(y, 0))
    q = special.erf(x) * np.sign(y) + np.maximum(x, z) - np.minimum(y, w) + (np.abs(y) + 0.5) ** z
    c = (x < z) + 1.0 * (x <= y) + (x >= w) + (x == y) + (x != z) * 0.5
    return np.where(x > y, p, q) + c


def ew_data(dtype):
    r = rng(20)
    d = dict(x=r.normal(size=(5, 4)), y=r.normal(size=(5, 4)), z=r.normal(size=4), w=r.normal(size=(5, 1)),
             u=r.normal(size=(5, 4)))
    d["y"][0, :2] = d["x"][0, :2]                     # ties for ==, <=, >= and where
    d["w"][1, 0] = d["x"][1, 3]
    return {k: v.astype(dtype) for k, v in d.items()}


LAYOUT_SRC = """
model red(x: f64[B, 3, 4], W: f64[4, 5], E: f64[4, 4], lab: i64[B, 3]) {
    h = x @ W
    s = softmax(h) + log_softmax(h) * 0.5
    t = transpose(s, perm = [0, 2, 1])
    m = t @ reshape(transpose(x, perm = [0, 2, 1]), [-1, 3, 4])
    k = sum(m, axis = 1, keepdims = true) + max(m, axis = -1, keepdims = true) + mean(m, axis = [0, 2], keepdims = true)
    o = onehot(lab, 4) * x + reshape(float(lab), [-1, 3, 1]) * 0.1 + take(E, lab)
    a, b = split(x, 2)
    o = o + concat([b, a * 3.0]) + reshape(float(argmax(x)), [-1, 3, 1]) * 0.2
    return k + sum(o, axis = 1, keepdims = true) - max(x) + mean(x)
}
model redloss(x: f64[B, 3, 4], W: f64[4, 5], E: f64[4, 4], lab: i64[B, 3], u: f64[B, 5, 4]) {
    return sum(red(x, W, E, lab) * u)
}
"""


def red_numpy(d):
    x, W, E, lab = d["x"], d["W"], d["E"], d["lab"]
    h = x @ W
    s = special.softmax(h, axis=-1) + 0.5 * special.log_softmax(h, axis=-1)
    t = np.swapaxes(s, 1, 2)
    m = t @ np.swapaxes(x, 1, 2).reshape(-1, 3, 4)
    k = m.sum(1, keepdims=True) + m.max(-1, keepdims=True) + m.mean((0, 2), keepdims=True)
    o = np.eye(4)[lab] * x + lab[..., None] * 0.1 + E[lab]
    o = o + np.concatenate([x[..., 2:], 3 * x[..., :2]], axis=-1) + np.argmax(x, axis=-1)[..., None] * 0.2
    return k + o.sum(1, keepdims=True) - x.max() + x.mean()


def red_data(dtype):
    r = rng(21)
    d = dict(x=r.normal(size=(2, 3, 4)), W=r.normal(size=(4, 5)), E=r.normal(size=(4, 4)), u=r.normal(size=(2, 5, 4)))
    d = {k: v.astype(dtype) for k, v in d.items()}
    d["lab"] = np.array([[0, 3, 1], [2, 3, 0]])                  # a repeated row of E: scatter-add
    return d


CNN_SRC = """
model cnn(x: f64[B, 2, 6, 6]) {
    param K: [3, 2, 3, 3] = he
    param W: [27, 4] = glorot
    h = relu(conv(x, K, stride = 1, padding = 1))
    h = where(rand_like(h) >= 0.25, h, 0)
    p = max_pool(h, kernel = 2)
    q = avg_pool(h, kernel = 3, stride = 2, padding = 1)
    return flatten(p + q) @ W + reshape(sum(conv(x, K, stride = 2, dilation = 2), axis = [1, 2, 3]), [-1, 1])
}
model cnnloss(x: f64[B, 2, 6, 6], u: f64[B, 4]) {
    return sum(cnn(x) * u)
}
"""


def cnn_numpy(d):
    x, K, W = d["x"], d["cnn/K"], d["cnn/W"]
    h = np.maximum(conv_naive(x, K, (1, 1), (1, 1), (1, 1)), 0)
    keep = np.array([splitmix_uniform(int(d["rng"]), 1, i) for i in range(h.size)]).reshape(h.shape) >= 0.25
    h = np.where(keep, h, 0)
    p = pool_naive(h, (2, 2), (2, 2), (0, 0), "max")
    q = pool_naive(h, (3, 3), (2, 2), (1, 1), "avg")
    c = conv_naive(x, K, (2, 2), (0, 0), (2, 2))
    return (p + q).reshape(len(x), -1) @ W + c.sum((1, 2, 3))[:, None]


def cnn_data(dtype):
    r = rng(22)
    d = {"x": r.normal(size=(2, 2, 6, 6)), "cnn/K": r.normal(size=(3, 2, 3, 3)), "cnn/W": r.normal(size=(27, 4)),
         "u": r.normal(size=(2, 4))}
    d = {k: v.astype(dtype) for k, v in d.items()}
    d["rng"] = np.int64(7)
    return d


SCAN_LOSS_SRC = SCAN_SRC + """
model recurloss(x: f64[B, 4, 3], h0: f64[B, 2], Wx: f64[3, 2], Wh: f64[2, 2], u: f64[B, 4, 2]) {
    return sum(recur(x, h0, Wx, Wh) * u)
}
"""


def scan_data(dtype):
    r = rng(24)
    d = {"x": r.normal(size=(3, 4, 3)), "h0": r.normal(size=(3, 2)), "Wx": r.normal(size=(3, 2)),
         "Wh": r.normal(size=(2, 2)), "u": r.normal(size=(3, 4, 2))}
    return {k: v.astype(dtype) for k, v in d.items()}


# indexing, masks, `and`/`or`/`not`, `//`, and the math ops of ops_math (docs/language.md)
MATH_SRC = """
model mth(x: f64[B, 5, 4], W: f64[3, 5, 4]) {
    a = x[:, -1] * 2 + x[..., 0] @ W[0, :, 1:2]
    s = where(causal_mask(5) and not (x[:, :, 0:1] > 0 or x[:, :, 1:2] < -1), 1.0, 0.0)
    c = cumsum(x, axis = 1) + cumsum(x, axis = 0, reverse = true) + flip(x, 1) * cos(x) + sin(x) * floor(x)
    t = tril(x) + triu(x, 1) + clip(x, -0.5, 0.5)
    r = float(iota([B, 5, 4], 1)) + float(arange(4) // 3) + x // 0.3 + float(cumsum(x > 0, 2))
    return c + s[:, :, 1:] + t + r + reshape(a, [-1, 1, 4])
}
model mthloss(x: f64[B, 5, 4], W: f64[3, 5, 4], u: f64[B, 5, 4]) {
    return sum(mth(x, W) * u)
}
"""


def math_numpy(d):
    x, W = d["x"], d["W"]
    a = x[:, -1] * 2 + x[..., 0] @ W[0, :, 1:2]
    s = np.where(np.tril(np.ones((5, 5), bool)) & ~((x[:, :, 0:1] > 0) | (x[:, :, 1:2] < -1)), 1.0, 0.0)
    c = np.cumsum(x, 1) + np.cumsum(x[::-1], 0)[::-1] + x[:, ::-1] * np.cos(x) + np.sin(x) * np.floor(x)
    t = np.tril(x) + np.triu(x, 1) + np.clip(x, -0.5, 0.5)
    r = np.arange(5)[:, None] + np.arange(4) // 3 + x // 0.3 + np.cumsum(x > 0, 2)
    return c + s[:, :, 1:] + t + r + a[:, None, :]


def math_data(dtype):
    r = rng(25)
    d = {"x": r.normal(size=(3, 5, 4)), "W": r.normal(size=(3, 5, 4)), "u": r.normal(size=(3, 5, 4))}
    return {k: v.astype(dtype) for k, v in d.items()}


PROGRAMS = {  # name -> (source, forward model, loss model, data, NumPy forward, grad wrt)
    "elementwise": (ELEMENTWISE_SRC, "ew", "ewloss", ew_data, ew_numpy, ["x", "y", "z", "w"]),
    "layout": (LAYOUT_SRC, "red", "redloss", red_data, red_numpy, ["x", "W", "E"]),
    "cnn": (CNN_SRC, "cnn", "cnnloss", cnn_data, cnn_numpy, ["x", "cnn/K", "cnn/W"]),
    "scan": (SCAN_LOSS_SRC, None, "recurloss", scan_data, scan_numpy, ["x", "h0", "Wx", "Wh"]),
    "math": (MATH_SRC, "mth", "mthloss", math_data, math_numpy, ["x", "W"]),
}
FORWARD = [p for p in PROGRAMS if PROGRAMS[p][1]]   # a scan compiles once, with its gradient (slow)
_compiled: dict = {}


def compiled(prog: str, mode: str, dtype: str = "f64"):
    """Compiled once per session: (program, "fwd" | "grad", dtype) -> Function."""
    key = (prog, mode, dtype)
    if key not in _compiled:
        src, fwd, loss, *_, wrt = PROGRAMS[prog]
        if mode == "fwd":
            _compiled[key] = compile_function(src, fwd, dtype=dtype)
        else:
            _compiled[key] = compile_function(src, loss, grad=wrt, dtype=dtype)
    return _compiled[key]


def reference(f, data):
    """Every output of f, computed by `ops.evaluate` on f's own optimized graph."""
    g = f.graph
    feeds = {n: np.asarray(data[g[n]["name"]], DTYPES[g.dtype(n)]) for n in g.inputs}
    vals = evaluate(g, feeds)
    return {k: vals[n] for k, n in g.outputs.items()}


@pytest.mark.parametrize("prog", FORWARD)
def test_kernels_forward(prog):
    _, _, _, data_fn, np_fwd, _ = PROGRAMS[prog]
    f = compiled(prog, "fwd")
    data = data_fn(np.float64)
    out = f(**data)
    ref = reference(f, data)
    assert set(out) == {"output"}
    y = out["output"]
    assert y.dtype == np.float64 and y.shape == ref["output"].shape
    np.testing.assert_allclose(y, ref["output"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y, np_fwd(data), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("prog", list(PROGRAMS))
def test_kernels_grad(prog):
    _, _, _, data_fn, np_fwd, wrt = PROGRAMS[prog]
    f = compiled(prog, "grad")
    data = data_fn(np.float64)
    out = f(**data)
    ref = reference(f, data)
    assert set(out) == {"loss"} | {f"grad:{w}" for w in wrt}
    for k in out:
        assert out[k].shape == ref[k].shape and out[k].dtype == np.float64, k
        np.testing.assert_allclose(out[k], ref[k], rtol=1e-11, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(out["loss"], np.sum(np_fwd(data) * data["u"]), rtol=1e-11)
    # one entry of each gradient against central differences of the plain NumPy forward
    for w in wrt:
        i = tuple(n - 1 for n in data[w].shape)          # away from the ties ew_data makes
        fd = []
        for s in (1, -1):
            d = {k: v.copy() for k, v in data.items()}
            d[w][i] += s * 1e-6
            fd.append(np.sum(np_fwd(d) * data["u"]))
        np.testing.assert_allclose(out[f"grad:{w}"][i], (fd[0] - fd[1]) / 2e-6, rtol=1e-5, err_msg=w)


def test_kernels_cover_every_primitive():
    """The compiled programs above run a kernel for every primitive."""
    seen = set()
    for prog in PROGRAMS:
        for mode in ("fwd", "grad") if prog in FORWARD else ("grad",):
            g = compiled(prog, mode).graph
            seen |= {g.op(n) for grp in g.groups for n in grp.nodes}
            # the backward pass runs the transposed matmul variants
            seen |= {f"matmul:{g.attrs(n).get('ta', False)}{g.attrs(n).get('tb', False)}"
                     for n in g.nodes() if g.op(n) == "matmul"}
    seen.add("sample")      # compiled against its reference in test_sample_reference_kernel_and_distribution
    seen.add("stop_gradient")   # compiled and differentiated in tests/test_phases.py
    seen.add("rand_normal")     # compiled against its reference in tests/test_generative.py
    seen.add("conv_transpose2d")    # compiled against PyTorch, fused and unfused, in tests/test_golden_layers.py
    seen.add("top_k")           # compiled against NumPy in tests/test_sample_gpt.py
    missing = set(PRIMITIVES) - seen
    assert not missing, f"primitives no compiled program runs: {sorted(missing)}"
    assert {"matmul:TrueFalse", "matmul:FalseTrue"} <= seen


F32_MODES = [("elementwise", "fwd"), ("elementwise", "grad"), ("layout", "fwd"), ("cnn", "fwd"), ("math", "fwd")]


@pytest.mark.parametrize("prog,mode", F32_MODES)
def test_kernels_f32_stay_f32(prog, mode):
    data_fn = PROGRAMS[prog][3]
    f = compiled(prog, mode, "f32")
    for n in f.graph.nodes():
        assert f.graph.dtype(n) != "f64", f"f64 node %{n} ({f.graph.op(n)}) in an f32 program"
    # every buffer the step allocates is f32 (or an integer or bool)
    assert not re.search(r"np\.empty\([^\n]*np\.float64\)", f.source)
    out = f(**data_fn(np.float32))
    want = compiled(prog, mode, "f64")(**data_fn(np.float64))
    assert set(out) == set(want)
    for k, v in out.items():
        assert v.dtype == np.float32, f"{k}: {v.dtype}"
        scale = max(1.0, float(np.max(np.abs(want[k]))))
        np.testing.assert_allclose(v, want[k], rtol=1e-4, atol=1e-4 * scale, err_msg=k)


def test_transpose_kernel_is_a_gather():
    """A transposed value is read at the permuted index (not a reshape of the input)."""
    f = compile_function("model t(x: f64[B, 2, 3]) { return transpose(x, perm = [2, 0, 1]) * 2.0 }")
    x = np.arange(24.0).reshape(4, 2, 3)
    np.testing.assert_array_equal(f(x=x)["output"], 2 * np.transpose(x, (2, 0, 1)))


def test_scalar_and_rank0_inputs():
    """A rank-0 data input and the random seed (a scalar input) reach the kernels as scalars."""
    f = compile_function("model s(x: f64[], y: f64[3]) { return x * y + rand_like(y) }")
    out = f(x=np.float64(2.0), y=np.arange(3.0), rng=5)["output"]
    np.testing.assert_allclose(out, 2 * np.arange(3.0) + [splitmix_uniform(5, 1, i) for i in range(3)], rtol=1e-15)
