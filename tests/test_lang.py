"""Language additions: indexing and slicing, `and`/`or`/`not`, `//`, and the math primitives
(`floor`, `sin`, `cos`, `flip`, `cumsum`, `iota`/`arange`) with the `.dl` helpers built on them
(`clip`, `tril`, `triu`, `causal_mask`).

Each primitive's gradient is checked against central differences and its reference against an
independent NumPy expression (with the helpers of test_ops.py); the compiled kernels run in
test_ops.py's "math" program. Misuse is one located error with exit status 2.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
from test_ops import dl_grad_check, grad_check, op, rng

from compiler.api import compile_function, lower_function
from compiler.ir import Graph
from compiler.ops import OPS, evaluate
from dsl import ast as A
from dsl.diagnostics import DlcError
from dsl.parser import parse
from runtime.cli import main


# ---- syntax ----------------------------------------------------------------------------------
def _expr(text: str) -> A.Node:
    m = parse(f"def f(x) {{\n    return {text}\n}}\n")
    return m.items[0].body[0].values[0]


def _shape(e) -> str:
    """The tree of an expression as compact text."""
    if isinstance(e, A.BinOp):
        return f"({_shape(e.left)} {e.op} {_shape(e.right)})"
    if isinstance(e, A.Not):
        return f"(not {_shape(e.operand)})"
    if isinstance(e, A.Neg):
        return f"(-{_shape(e.operand)})"
    if isinstance(e, A.Index):
        return f"{_shape(e.value)}[{', '.join(_shape(i) for i in e.items)}]"
    if isinstance(e, A.SliceItem):
        return f"{'' if e.start is None else _shape(e.start)}:{'' if e.stop is None else _shape(e.stop)}"
    if isinstance(e, A.EllipsisItem):
        return "..."
    if isinstance(e, A.Call):
        return f"{e.func}({', '.join(_shape(a) for a in e.args)})"
    if isinstance(e, A.Name):
        return e.name
    if isinstance(e, A.Number):
        return e.text
    raise AssertionError(type(e))


@pytest.mark.parametrize("text,tree", [
    ("not a < b and c or d", "(((not (a < b)) and c) or d)"),
    ("a or b and not c", "(a or (b and (not c)))"),
    ("not not a", "(not (not a))"),
    ("a // b * c", "((a // b) * c)"),
    ("a + b // 2", "(a + (b // 2))"),
    ("-x[0] ** 2", "(-(x[0] ** 2))"),
    ("x[:, -1]", "x[:, (-1)]"),
    ("x[..., 0:4]", "x[..., 0:4]"),
    ("x[1:, :2, ...][0]", "x[1:, :2, ...][0]"),
    ("f(x)[1]", "f(x)[1]"),
    ("x[i + 1 : n - 1]", "x[(i + 1):(n - 1)]"),
])
def test_precedence_and_subscripts(text, tree):
    assert _shape(_expr(text)) == tree


def test_subscripts_and_logic_continue_over_lines():
    e = _expr("x[\n        0,\n        ...\n    ] and\n    y")
    assert isinstance(e, A.BinOp) and e.op == "and" and isinstance(e.left, A.Index)
    assert [type(i) for i in e.left.items] == [A.Number, A.EllipsisItem]


def test_subscript_nodes_have_locations():
    e = _expr("x[:, 1:3]")
    sl = e.items[1]
    assert (e.loc.line, e.loc.col) == (2, 12) and (sl.loc.line, sl.loc.col) == (2, 17)


# ---- primitives: references and gradients (NumPy evaluator) -----------------------------------
@pytest.mark.parametrize("shape", [(3, 4), (5,), ()], ids=str)
@pytest.mark.parametrize("name,fn", [("sin", math.sin), ("cos", math.cos)])
def test_sin_cos_grad_and_reference(name, fn, shape):
    x = rng(3).normal(size=shape) * 2
    y, _ = grad_check(op(name, "x"), {"x": x})
    np.testing.assert_allclose(y, np.vectorize(fn)(x), rtol=1e-14)


def test_floor_and_floordiv_references_and_zero_gradients():
    x = np.array([-2.5, -2.0, -0.3, 0.0, 0.3, 1.0, 2.7])
    y, grads = grad_check(op("floor", "x"), {"x": x + 0.01})
    np.testing.assert_array_equal(y, [math.floor(v) for v in x + 0.01])
    assert np.all(grads["x"] == 0)
    a, b = np.array([-7, -7, 7, 7, 0, 5]), np.array([2, -2, 2, -2, 3, 5])
    yi, _ = grad_check(op("floordiv", "a", "b"), {"a": a, "b": b})
    assert yi.dtype == np.int64
    np.testing.assert_array_equal(yi, [int(p) // int(q) for p, q in zip(a, b)])        # toward -inf
    yf, grads = grad_check(op("floordiv", "a", "b"), {"a": a + 0.5, "b": b * 0.7})
    np.testing.assert_allclose(yf, [(p + 0.5) // (q * 0.7) for p, q in zip(a, b)])
    assert all(np.all(v == 0) for v in grads.values())


def test_logical_references():
    g = Graph()
    a, b = g.input("a", (2, 2), "bool", "data"), g.input("b", (2,), "bool", "data")
    n_and, n_or, n_not = g.add("logical_and", a, b), g.add("logical_or", a, b), g.add("logical_not", a)
    av, bv = np.array([[True, False], [True, True]]), np.array([True, False])
    vals = evaluate(g, {a: av, b: bv})
    want = [[[p and q for p, q in zip(row, bv)] for row in av], [[p or q for p, q in zip(row, bv)] for row in av],
            [[not p for p in row] for row in av]]
    for n, w in zip((n_and, n_or, n_not), want):
        assert g.dtype(n) == "bool" and vals[n].tolist() == w
    assert all(OPS[k].grad(g, n, None) == [None] * len(g.args(n))
               for k, n in (("logical_and", n_and), ("logical_or", n_or), ("logical_not", n_not)))


@pytest.mark.parametrize("shape,axis", [((3, 4), 0), ((3, 4), 1), ((2, 3, 4), 1), ((5,), 0), ((2, 3, 4), -1)])
def test_flip_grad_and_reference(shape, axis):
    x = rng(4).normal(size=shape)
    y, _ = grad_check(op("flip", "x", axis=axis), {"x": x})
    ix = [slice(None)] * len(shape)
    ix[axis] = slice(None, None, -1)
    np.testing.assert_array_equal(y, x[tuple(ix)])


def _running_sum(x, axis, reverse):
    """Independent of np.cumsum: a Python loop along the axis."""
    x = np.moveaxis(x, axis, 0)
    out, acc = np.zeros_like(x), np.zeros_like(x[0])
    for k in (range(len(x) - 1, -1, -1) if reverse else range(len(x))):
        acc = acc + x[k]
        out[k] = acc
    return np.moveaxis(out, 0, axis)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("shape,axis", [((3, 4), 0), ((3, 4), 1), ((2, 3, 4), 1), ((5,), 0)])
def test_cumsum_grad_and_reference(shape, axis, reverse):
    x = rng(5).normal(size=shape)
    y, _ = grad_check(op("cumsum", "x", axis=axis, reverse=reverse), {"x": x})
    np.testing.assert_allclose(y, _running_sum(x, axis, reverse), rtol=1e-12, atol=1e-14)


def test_cumsum_of_a_mask_counts():
    x = np.array([[True, False, True, True], [False, False, True, False]])
    y, _ = grad_check(op("cumsum", "x", axis=1, reverse=False), {"x": x})
    assert y.dtype == np.int32
    np.testing.assert_array_equal(y, [[1, 1, 2, 3], [0, 0, 1, 1]])


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_iota_reference(axis):
    g = Graph()
    x = g.input("x", (2, 3, 4), "f64", "data")
    n = g.add("iota", x, axis=axis, dtype="i64")
    y = evaluate(g, {x: np.zeros((2, 3, 4))})[n]
    np.testing.assert_array_equal(y, np.indices((2, 3, 4))[axis])
    assert OPS["iota"].grad(g, n, None) == [None]


# ---- indexing: lowered to slice / reshape / take ----------------------------------------------
INDEX_CASES = [
    ("x[:, -1]", lambda x: x[:, -1]),
    ("x[..., 0:2]", lambda x: x[..., 0:2]),
    ("x[1]", lambda x: x[1]),
    ("x[:, 1:]", lambda x: x[:, 1:]),
    ("x[-1, ..., -2]", lambda x: x[-1, ..., -2]),
    ("x[1:3, :, 0]", lambda x: x[1:3, :, 0]),
    ("x[-3:-1, 2][1:]", lambda x: x[-3:-1, 2][1:]),
    ("x[:, :, :]", lambda x: x),
    ("x[2, 1, 4]", lambda x: x[2, 1, 4]),
]


@pytest.mark.parametrize("expr,fn", INDEX_CASES, ids=[c[0] for c in INDEX_CASES])
def test_indexing_values_and_gradients(expr, fn):
    x = rng(6).normal(size=(4, 3, 5))
    y, grads = dl_grad_check(f"model m(x: f64[4, 3, 5]) {{ return {expr} * 1.0 }}", {"x": x})
    want = fn(x)
    assert y.shape == np.shape(want)                 # an integer drops its axis
    np.testing.assert_array_equal(y, want)
    assert grads["x"].shape == x.shape               # and dl_grad_check compared it with differences


def test_whole_symbolic_axis_and_gather():
    E = rng(7).normal(size=(6, 3))
    ids = np.array([[5, 0], [2, 2]])
    src = "model m(E: f64[6, 3], ids: i64[B, 2]) { return E[ids][:, -1] * 2.0 }"
    y, grads = dl_grad_check(src, {"E": E, "ids": ids})
    np.testing.assert_array_equal(y, E[ids][:, -1] * 2.0)


@pytest.mark.parametrize("expr,fn", [("x[:, -1]", lambda x: x[:, -1]), ("x[:, 0, 1:]", lambda x: x[:, 0, 1:]),
                                     ("x[-1, ..., 0]", lambda x: x[-1, ..., 0]), ("x[0, -1]", lambda x: x[0, -1])])
def test_first_and_last_of_a_symbolic_axis(expr, fn):
    """x: [B, T, 3] with B and T symbolic: positions 0 and -1 always exist."""
    x = rng(11).normal(size=(4, 5, 3))
    y, grads = dl_grad_check(f"model m(x: f64[B, T, 3]) {{ return {expr} * 1.0 }}", {"x": x})
    np.testing.assert_array_equal(y, fn(x))


def test_last_position_kernel_with_symbolic_length():
    f = compile_function("model m(h: f64[B, T, 3]) { return h[:, -1] * 2.0 + h[:, 0] }")
    for T in (1, 4):
        h = rng(12).normal(size=(2, T, 3))
        np.testing.assert_array_equal(f(h=h)["output"], h[:, -1] * 2.0 + h[:, 0])


def test_indexing_lists_and_tuples_at_compile_time():
    src = """
def two(x) { return x * 2.0, x * 3.0 }
model m(x: f64[2, 3]) {
    k = [1, 2, 3, 4][-1] + [5, 6, 7][1:][0]
    return two(x)[1] * k + two(x)[-2]
}"""
    x = rng(8).normal(size=(2, 3))
    y, _ = dl_grad_check(src, {"x": x})
    np.testing.assert_allclose(y, x * 3.0 * (4 + 6) + 2 * x)


# ---- compile-time arithmetic and sizes -----------------------------------------------------------
def test_numbers_fold_at_compile_time():
    src = "model m(x: f64[3]) { return x * (7 // 2) + floor(2.5) + sin(0) + cos(0) + clip(5, 0, 3) }"
    lw, prog = lower_function(src)
    g = prog.graph
    assert not {g.op(n) for n in g.nodes()} & {"sin", "cos", "floor", "floordiv", "minimum", "maximum"}
    x = np.arange(3.0)
    out = evaluate(g, {g.inputs[0]: x})[g.outputs["output"]]
    np.testing.assert_allclose(out, x * 3 + 2 + 0 + 1 + 3)


def test_logic_on_compile_time_booleans():
    src = """
def pick(x, a: bool, b: bool) {
    if a and not b or false { return x * 2.0 } else { return x * 3.0 }
}
model m(x: f64[2]) { return pick(x, true, false) + pick(x, true, true) + where(x > 0 and true, x, 0.0) }"""
    lw, prog = lower_function(src)
    g = prog.graph
    assert "logical_and" not in {g.op(n) for n in g.nodes()}     # `t and true` is t
    x = np.array([-1.0, 2.0])
    np.testing.assert_allclose(evaluate(g, {g.inputs[0]: x})[g.outputs["output"]], 2 * x + 3 * x + np.maximum(x, 0))


def test_sizes_divide_and_multiply_as_shapes():
    src = """
def split_heads(x: [N, T, D], heads: int) {
    return reshape(x, [N, T, heads, D // heads])
}
model m(x: f64[B, T, 8]) {
    h = split_heads(x, 2)
    return reshape(h, [B * T // T, T * 2, 8 // 2])
}"""
    lw, prog = lower_function(src)
    g = prog.graph
    out = g.outputs["output"]
    assert g.shape(out) == ("B", "2*T", 4)
    assert g.shape(g.args(out)[0]) == ("B", "T", 2, 4)


def test_symbolic_causal_mask_in_attention():
    """Masked attention scores over a symbolic length T, the mask built in the model."""
    src = """
model att(q: f64[B, T, 4], k: f64[B, T, 4]) {
    s = q @ transpose(k, perm = [0, 2, 1]) / 2.0
    return softmax(where(causal_mask(T), s, -inf)) + float(arange(T, dtype = "i64"))
}"""
    f = compile_function(src)
    r = rng(9)
    q, k = r.normal(size=(2, 5, 4)), r.normal(size=(2, 5, 4))
    s = q @ k.transpose(0, 2, 1) / 2.0
    s = np.where(np.tril(np.ones((5, 5), bool)), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    np.testing.assert_allclose(f(q=q, k=k)["output"], e / e.sum(-1, keepdims=True) + np.arange(5), rtol=1e-12)


def test_sinusoidal_positions_from_arange():
    """A Transformer's positional encoding written in .dl: arange, //, exp, sin, cos."""
    src = """
def positions(x: [N, T, D]) {
    pos = reshape(float(arange(T)), [T, 1])
    freq = exp(float(arange(D // 2)) * (-2 * 9.210340371976184 / D))
    angle = pos * reshape(freq, [1, D // 2])
    return x + concat([sin(angle), cos(angle)])
}
model m(x: f64[B, 6, 8]) { return positions(x) }"""
    x = rng(13).normal(size=(2, 6, 8))
    y, _ = dl_grad_check(src, {"x": x})
    angle = np.arange(6)[:, None] * 10000.0 ** (-2 * np.arange(4) / 8)
    np.testing.assert_allclose(y, x + np.concatenate([np.sin(angle), np.cos(angle)], -1), rtol=1e-12, atol=1e-15)


def test_clip_gradient_passes_inside_the_range():
    x = np.array([-2.0, -0.9, 0.1, 0.7, 1.5])
    y, grads = dl_grad_check("model m(x: f64[5]) { return clip(x, -1, 1) }", {"x": x})
    np.testing.assert_array_equal(y, np.clip(x, -1, 1))


def test_tril_triu_match_numpy():
    x = rng(10).normal(size=(2, 3, 4))
    for fn, k in (("tril", 0), ("tril", -1), ("triu", 1), ("triu", 0)):
        y, _ = dl_grad_check(f"model m(x: f64[2, 3, 4]) {{ return {fn}(x, {k}) }}", {"x": x})
        np.testing.assert_array_equal(y, getattr(np, fn)(x, k))


# ---- misuse: one located message, exit status 2 -------------------------------------------------
ERRORS = [
    ("x[:, 7]", 4, "index 7 is out of range for axis 1 of [B, 4] (size 4)", "x[:, 7]".index("7")),
    ("x[:, -5]", 4, "index -5 is out of range", "x[:, -5]".index("-")),
    ("x[1]", 4, "cannot index axis 0 of [B, 4]: its size B is only known at run time", 2),
    ("x[-2]", 4, "first (0) or last (-1) position", 2),
    ("x[1:]", 4, "cannot slice axis 0 of [B, 4]", 2),
    ("x[:, 2:2]", 4, "slice 2:2 is out of range for axis 1 of [B, 4] (size 4)", 5),
    ("x[:, 1:9]", 4, "slice 1:9 is out of range", 5),
    ("x[:, :, 0]", 4, "3 indices for a tensor of rank 2 [B, 4]", 0),
    ("x[..., ...]", 4, "an index has at most one `...`", 7),
    ("x[:, 0.5]", 4, "an index must be an integer known at compile time, got 0.5", 5),
    ("float(x > 0 and 1.0)", 4, "`and` takes booleans or comparisons, got the number 1.0", 6),
    ("float(not x)", 4, "`not` takes a boolean or a comparison, got f32[B, 4]", 6),
    ("reshape(x, [B // 3, 4])", 4, "the size B is not known to be divisible by 3", 12),
    ("flip(x, axis = 5)", 4, "`flip`: axis 5 is out of range for a tensor of rank 2", 0),
    ("cumsum(x, reverse = 1)", 4, "`cumsum`: reverse must be true or false", 0),
    ("float(cumsum(x > 0, axis = [0, 1]))", 4, "`cumsum`: axis must be an integer", 6),
    ("floor(x > 0)", 4, "expects floating-point tensors", 0),
    ("x // (x > 0)", 4, "`//` takes numbers, got f32 and bool", 0),
    ("float(arange(0))", 4, "`arange`: n must be a positive size", 6),
    ("x[[1, 2]]", 4, "an index must be an integer", 2),
]


@pytest.mark.parametrize("expr,width,words,col", ERRORS, ids=[c[0] for c in ERRORS])
def test_misuse_is_one_located_error(capsys, dl_file, expr, width, words, col):
    p = dl_file(f"model m(x: f32[B, {width}]) {{\n    return {expr}\n}}\n")
    code = main(["check", str(p)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert err.splitlines()[0].startswith(f"{p}:2:{12 + col}:"), err
    assert words in err, err
    assert err.splitlines()[2].strip().startswith("^"), err


# ---- compiled kernels beyond test_ops.py's "math" program -----------------------------------------
def test_integer_floordiv_and_cumsum_kernels():
    """Integer `//` rounds toward -inf in the kernel as in Python; cumsum keeps the int dtype."""
    f = compile_function("model m(a: i64[B, 3], b: i64[3]) { return cumsum(a // b, axis = 0) }")
    a = np.array([[-7, 7, -1], [9, -9, 0], [5, 6, -4]])
    b = np.array([2, -2, 3])
    y = f(a=a, b=b)["output"]
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, np.cumsum([[int(p) // int(q) for p, q in zip(row, b)] for row in a], 0))


@pytest.mark.slow
def test_training_through_indexing_and_flip(tmp_path, capsys):
    """`dlc run` trains a model that reads the digits by row through indexing, flip and
    cumsum: the gradients of slice/reshape/flip/cumsum reach the parameters."""
    p = tmp_path / "rows.dl"
    p.write_text("""
model rows(x: f32[B, 64]) -> f32[B, 10] {
    img = reshape(x, [-1, 8, 8])
    top = reshape(img[:, 0:4], [-1, 32])
    bottom = reshape(flip(img, 1)[:, :4, ...], [-1, 32])      # rows 7, 6, 5, 4
    running = cumsum(img, axis = 1)[:, -1] / 8                 # the column means
    h = relu(dense(top, 32) + dense(bottom, 32) + dense(running, 32))
    return dense(h, 10)
}
train rows on digits(test = 0.2) {
    loss = cross_entropy(rows(x), y)
    optimizer = adam(lr = 3e-3)
    epochs = 8
    batch = 64
}
""")
    assert main(["run", str(p), "--json", "--quiet"]) == 0
    rep = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rep["test"]["accuracy"] >= 0.9


@pytest.mark.parametrize("src", ["and = 3", "return or(x)", "y = x[not]"])
def test_keywords_are_not_names(src):
    with pytest.raises(DlcError) as err:
        parse(f"def f(x) {{\n    {src}\n    return x\n}}\n")
    assert err.value.loc.line == 2 and ("keyword" in str(err.value) or "syntax error" in str(err.value))


@pytest.mark.parametrize("name", sorted(o.name for o in OPS.values() if o.builtin))
def test_builtins_generated_from_the_registry(name):
    """An op with a builtin signature is callable by its name: on tensors it adds that op, on
    numbers it folds to the op's NumPy reference."""
    params = OPS[name].builtin
    nums = (0.75, -1.5)[:len(params)]
    _, prog = lower_function(f"model m({', '.join(f'{p}: f64[B, 3]' for p in params)}) {{\n"
                             f"    return {name}({', '.join(params)}) * {name}({', '.join(map(str, nums))})\n}}\n")
    g = prog.graph
    out = g.outputs["output"]
    applied, folded = g.args(out)
    assert g.op(out) == "mul" and g.op(applied) == name and g.op(folded) == "const"
    assert [g[a]["name"] for a in g.args(applied)] == list(params)
    want = float(OPS[name].ref(*(np.float64(v) for v in nums)))
    assert g.attrs(folded)["value"] == pytest.approx(want, rel=1e-12)
