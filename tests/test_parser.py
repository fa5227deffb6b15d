"""The grammar and the AST: good programs parse with locations; bad ones give located errors."""
import pytest

from dsl import DlcError, parse
from dsl import ast as A

MLP = """\
# comment
model mlp(x: f32[B, 64]) -> f32[B, 10] {
    h = relu(dense(x,
                   128))        # arguments may span lines
    h = h * 2 +
        1                       # so may an expression after an operator
    return dense(h, 10)
}

def dense(x: [..., I], units: int) {
    param W: [I, units] = glorot
    param b: [units] = zeros
    return x @ W + b
}

train mlp on digits(test = 0.2) {
    loss = cross_entropy(mlp(x), y)
    optimizer = adam(lr = 1e-3, weight_decay = 1e-4); batch = 64
    metrics = [accuracy, loss]
}
"""


def test_parses_items_with_locations():
    m = parse(MLP, "mlp.dl")
    kinds = [type(i).__name__ for i in m.items]
    assert kinds == ["FuncDef", "FuncDef", "TrainDef"]
    model, dense, train = m.items
    assert (model.kind, model.name, model.loc.line, model.loc.col) == ("model", "mlp", 2, 1)
    assert [p.name for p in model.params] == ["x"]
    t = model.params[0].type
    assert t.dtype == "f32" and [d.name if isinstance(d, A.DimName) else d.value for d in t.dims] == ["B", 64]
    assert isinstance(dense.params[0].type.dims[0], A.DimEllipsis)
    assert [type(s).__name__ for s in model.body] == ["Assign", "Assign", "Return"]
    assert model.body[0].loc.line == 3
    # the call spanning two lines is one call with two arguments
    call = model.body[0].value.args[0]
    assert call.func == "dense" and len(call.args) == 2 and call.args[1].value == 128
    assert call.args[1].loc.line == 4
    assert len(train.body) == 4 and train.body[2].name == "batch"


def test_operator_precedence():
    m = parse("def f(a, b, c) { return -a + b * c ** 2 @ a }")
    e = m.items[0].body[0].values[0]
    assert isinstance(e, A.BinOp) and e.op == "+"
    assert isinstance(e.left, A.Neg)
    right = e.right
    assert right.op == "@" and right.left.op == "*" and right.left.right.op == "**"


def test_numbers_strings_and_keywords():
    m = parse('def f(x) { y = f(x, a = 1.5e-3, b = "s\\"q", c = true, d = [1, 2,]); return y }')
    call = m.items[0].body[0].value
    kw = dict(call.kwargs)
    assert kw["a"].value == pytest.approx(1.5e-3)
    assert kw["b"].value == 's"q'
    assert kw["c"].value is True
    assert [i.value for i in kw["d"].items] == [1, 2]


def test_dimension_expressions():
    m = parse("def f(x: [B, 4 * H + 1]) { return x }")
    d = m.items[0].params[0].type.dims[1]
    assert isinstance(d, A.DimBin) and d.op == "+"


@pytest.mark.parametrize("src, line, col, words", [
    ("model m(x: f32[B, 4]) {\n  return x +\n}\n", 3, 1, "unexpected `}`"),
    ("def f(x) {\n  y = (x\n  return y\n}\n", 3, 3, "never closed"),
    ("def f(x) { return x $ 2 }", 1, 21, "unexpected character `$`"),
    ("model m(x: f32[B, 4]) {\n  return x\n", 2, 11, "end of file"),
    ("def f(x) { return g(a = 1, 2) }", 1, 28, "positional argument cannot follow"),
    ("def f(x) { return g(a = 1, a = 2) }", 1, 32, "given twice"),
])
def test_syntax_errors_are_located(src, line, col, words):
    with pytest.raises(DlcError) as e:
        parse(src, "bad.dl")
    err = e.value
    assert (err.loc.line, err.loc.col) == (line, col)
    text = err.render()
    assert words in text
    assert text.startswith(f"bad.dl:{line}:{col}: error: ")
    assert "^" in text.splitlines()[2]


def test_every_node_has_a_location():
    m = parse(MLP, "mlp.dl")
    seen = 0

    def walk(n):
        nonlocal seen
        if isinstance(n, A.Node):
            assert n.loc.file == "mlp.dl" and n.loc.line >= 1 and n.loc.col >= 1
            seen += 1
            for v in n.__dict__.values():
                walk(v)
        elif isinstance(n, tuple):
            for v in n:
                walk(v)
    walk(m)
    assert seen > 40
