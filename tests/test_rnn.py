"""Recurrent networks: `scan`, its gradient (backpropagation through time) and the layers built on it.

1. Golden cases (`rnn_tanh`, `lstm`, `gru`, PyTorch in float64): loss, every gradient and the
   forward outputs of the stdlib layers, compiled fused and unfused. One program per case: the
   model returns the loss first and the forward values as extra outputs (`output2`, ...).
2. Scan gradients against central differences (NumPy evaluator, no Numba) for the shapes a
   recurrence can take: a carry feeding several outputs, a parameter used twice in the body, a
   carry used only through another, a `range(n)` scan with no input, an integer carry (argmax
   fed back through an embedding). The same models compiled, against the evaluator (slow).
3. One compiled program serves every sequence length: the loop is not unrolled.
4. The sequence examples train end to end (slow).
5. `dlc ir --stage grad` shows the scan and its reverse scan.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from compiler.api import compile_function, lower_function
from compiler.ops import evaluate
from compiler.shapes import DTYPES
from runtime.cli import main

from test_golden import check, load
from test_golden_cnn import check_grads, params_of
from test_ops import check_graph

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"

# =============================================================================================
# 1. golden cases
# =============================================================================================

GOLDEN_LAYERS = {"rnn_tanh": "rnn", "lstm": "lstm", "gru": "gru"}   # golden case -> stdlib layer


def golden_src(layer: str, d: dict) -> str:
    """loss = sum(hs * u); the model also returns the sequence and the final state(s)."""
    _, T, I = d["input.x"].shape
    H = d["output.h"].shape[-1]
    state = "hs, h, c" if layer == "lstm" else "hs, h"
    return f"""
model net(x: f64[B, {T}, {I}], u: f64[B, {T}, {H}]) -> f64[] {{
    {state} = {layer}(x, {H}, returns = "state", name = "{layer}")
    return sum(hs * u), {state}
}}
"""


# Compiling the unfused GRU step with its gradient takes ~15 s (one Numba function per op):
# it runs with the slow tests, to keep the quick suite near a minute.
GOLDEN_RUNS = [pytest.param(case, fuse, id=f"{case}-{'fused' if fuse else 'unfused'}",
                            marks=[pytest.mark.slow] if (case, fuse) == ("gru", False) else [])
               for case in GOLDEN_LAYERS for fuse in (True, False)]


@pytest.mark.parametrize("case, fuse", GOLDEN_RUNS)
def test_golden_recurrent(case, fuse):
    d = load(case)
    layer = GOLDEN_LAYERS[case]
    p = params_of(d)
    assert p and all(k.startswith(f"net/{layer}/") for k in p)
    f = compile_function(golden_src(layer, d), grad=["x"] + list(p), fuse=fuse)
    out = f(x=d["input.x"], u=d["upstream"], **p)
    assert set(out) == {"loss", "grad:x", "output2", "output3"} | {f"grad:{k}" for k in p} \
        | ({"output4"} if layer == "lstm" else set())
    check(out["loss"], d["loss"], "loss")
    check_grads(out, d)
    check(out["output2"], d["output.h"], "output.h")
    check(out["output3"], d["output.h"][:, -1], "the final h")       # the carry after the scan
    if layer == "lstm":
        check(out["output4"], d["output.c_last"], "output.c_last")


# =============================================================================================
# 2. scan gradients against central differences
# =============================================================================================

def leaves(src: str, batch: int = 2, seed: int = 0, training: bool = True) -> dict:
    """A value for every input and parameter of the model: normal floats, integers in [0, 5)."""
    _, prog = lower_function(src, dtype="f64", training=training)
    g, r = prog.graph, np.random.default_rng(seed)
    out = {}
    for n in g.inputs:
        shape = tuple(batch if isinstance(s, str) else s for s in g.shape(n))
        dt = DTYPES[g.dtype(n)]
        out[g[n]["name"]] = r.normal(size=shape) if g.dtype(n).startswith("f") else r.integers(0, 5, shape).astype(dt)
    return out


def fd_check(src: str, values: dict, training: bool = True):
    """loss = sum(output * u): every float leaf's gradient (autodiff, NumPy evaluator) against
    central differences of the forward graph. Returns (output, {leaf: gradient})."""
    _, prog = lower_function(src, dtype="f64", training=training)
    g = prog.graph
    nodes = {g[n]["name"]: n for n in g.inputs}
    assert set(nodes) == set(values), sorted(nodes)
    return check_graph(g, g.outputs["output"], nodes, {k: np.asarray(v) for k, v in values.items()})


# (a) the carry feeds the next step and two per-step outputs; the final carry is used too
TWO_OUTPUTS = """
model net(x: f64[B, 4, 3], h0: f64[B, 2]) {
    param Wx: [3, 2] = glorot
    param Wh: [2, 2] = glorot
    a, b = scan xt in x, h = h0 {
        h = tanh(xt @ Wx + h @ Wh)
        yield h, h * h
    }
    return a * b + 0.5 * b + reshape(h, [-1, 1, 2])
}
"""


def two_outputs_numpy(v):
    h, a, b = v["h0"], [], []
    for t in range(v["x"].shape[1]):
        h = np.tanh(v["x"][:, t] @ v["net/Wx"] + h @ v["net/Wh"])
        a.append(h)
        b.append(h * h)
    a, b = np.stack(a, 1), np.stack(b, 1)
    return a * b + 0.5 * b + h[:, None, :]


# (b) an outer parameter used twice in the body and once outside it; a layer called twice
# in the body under one name (tied weights, captured once)
SHARED_PARAMS = """
model net(x: f64[B, 4, 3], h0: f64[B, 2]) {
    param W: [3, 2] = glorot
    param W2: [2, 2] = glorot
    hs = scan xt in x, h = h0 {
        h = tanh(xt @ W + h @ W2 + (h * h) @ W2)
        h = dense(h, 2, name = "tied") + 0.5 * dense(h * h, 2, name = "tied")
        yield h
    }
    return hs * reshape(x @ W, [-1, 4, 2])
}
"""


def shared_params_numpy(v):
    W, W2, Wt, bt = v["net/W"], v["net/W2"], v["net/tied/W"], v["net/tied/b"]
    h, hs = v["h0"], []
    for t in range(v["x"].shape[1]):
        h = np.tanh(v["x"][:, t] @ W + h @ W2 + (h * h) @ W2)
        h = h @ Wt + bt + 0.5 * ((h * h) @ Wt + bt)
        hs.append(h)
    return np.stack(hs, 1) * (v["x"] @ W)


# (c) c reaches the loss only through h; k reaches it not at all
CARRY_THROUGH_CARRY = """
model net(x: f64[B, 4, 3], h0: f64[B, 2], c0: f64[B, 2], k0: f64[B, 2]) {
    param Wc: [3, 2] = glorot
    param Wh: [2, 2] = glorot
    hs = scan xt in x, h = h0, c = c0, k = k0 {
        c = 0.9 * tanh(c) + xt @ Wc
        h = tanh(h @ Wh + c)
        k = k + 1.0
        yield h
    }
    return hs
}
"""


def carry_through_carry_numpy(v):
    h, c, hs = v["h0"], v["c0"], []
    for t in range(v["x"].shape[1]):
        c = 0.9 * np.tanh(c) + v["x"][:, t] @ v["net/Wc"]
        h = np.tanh(h @ v["net/Wh"] + c)
        hs.append(h)
    return np.stack(hs, 1)


# (d) no per-step input: a sequence generated from the carry alone
GENERATE = """
model net(h0: f64[B, 3]) {
    param W: [3, 3] = glorot
    param b: [3] = zeros
    hs = scan t in range(4), h = h0 {
        h = tanh(h @ W + b)
        yield h
    }
    return hs
}
"""


def generate_numpy(v):
    h, hs = v["h0"], []
    for _ in range(4):
        h = np.tanh(h @ v["net/W"] + v["net/b"])
        hs.append(h)
    return np.stack(hs, 1)


# (e) an integer carry, as in examples/caption.dl: in evaluation the argmax of each step's
# logits is fed back through the embedding (greedy decoding); in training the true previous
# token is read (teacher forcing) and the integer carry is computed but unused
INT_CARRY = """
model net(h0: f64[B, 4], y_in: i32[B, 3]) {
    logits = scan yt in y_in, h = h0, tok = full([B], 1, dtype = "i32") {
        if training {
            e = embedding(yt, 5, 3, name = "emb")
        } else {
            e = embedding(tok, 5, 3, name = "emb")
        }
        h = rnn_cell(e, h, name = "cell")
        out = dense(h, 5, name = "out")
        tok = argmax(out)
        yield out
    }
    return logits
}
"""


def int_carry_numpy(v, training):
    E, h = v["net/emb/E"], v["h0"]
    tok = np.ones(len(h), np.int32)
    logits, seen = [], set()
    for t in range(v["y_in"].shape[1]):
        ids = v["y_in"][:, t] if training else tok
        seen |= set(ids.tolist())
        h = np.tanh(E[ids] @ v["net/cell/Wx"] + h @ v["net/cell/Wh"] + v["net/cell/b"])
        out = h @ v["net/out/W"] + v["net/out/b"]
        tok = out.argmax(-1)
        logits.append(out)
    return np.stack(logits, 1), seen


@pytest.mark.parametrize("src, numpy_fwd", [(TWO_OUTPUTS, two_outputs_numpy), (SHARED_PARAMS, shared_params_numpy),
                                            (CARRY_THROUGH_CARRY, carry_through_carry_numpy),
                                            (GENERATE, generate_numpy)],
                         ids=["carry_feeds_two_outputs", "param_used_twice", "carry_through_carry", "range"])
def test_scan_grad_finite_differences(src, numpy_fwd):
    v = leaves(src)
    y, grads = fd_check(src, v)
    np.testing.assert_allclose(y, numpy_fwd(v), rtol=1e-12, atol=1e-14)
    assert set(grads) == set(v)
    for k, gk in grads.items():
        if k != "k0":
            assert np.any(gk != 0), f"d loss / d {k} is zero"
    if "k0" in grads:                       # a carry that never reaches the loss
        assert np.all(grads["k0"] == 0)


@pytest.mark.parametrize("training", [True, False], ids=["teacher_forcing", "greedy"])
def test_scan_grad_with_integer_carry(training):
    v = leaves(INT_CARRY, batch=3, seed=1, training=training)
    y, grads = fd_check(INT_CARRY, v, training)
    want, seen = int_carry_numpy(v, training)
    np.testing.assert_allclose(y, want, rtol=1e-12, atol=1e-14)
    assert set(grads) == set(v) - {"y_in"}              # integers get no gradient
    for k, gk in grads.items():
        assert np.any(gk != 0), f"d loss / d {k} is zero"
    unseen = sorted(set(range(5)) - seen)
    assert np.all(grads["net/emb/E"][unseen] == 0)       # rows never looked up
    if not training:                                     # the fed-back tokens differ from step to step
        assert len(seen) > 1


# =============================================================================================
# 3. one program for every sequence length
# =============================================================================================

def rnn_src(T) -> str:
    return f"""
model net(x: f32[B, {T}, 4], u: f32[B, {T}, 6]) -> f32[] {{
    hs = rnn(x, 6, name = "rnn")
    return sum(hs * u), hs
}}
"""


def rnn_numpy(x, u, Wx, Wh, b):
    """Forward and backpropagation through time of loss = sum(rnn(x) * u), in float64."""
    x, u, Wx, Wh, b = (a.astype(np.float64) for a in (x, u, Wx, Wh, b))
    B, T, _ = x.shape
    hs = [np.zeros((B, Wh.shape[0]))]
    for t in range(T):
        hs.append(np.tanh(x[:, t] @ Wx + hs[-1] @ Wh + b))
    g = {"x": np.zeros_like(x), "Wx": np.zeros_like(Wx), "Wh": np.zeros_like(Wh), "b": np.zeros_like(b)}
    dh = np.zeros_like(hs[0])
    for t in reversed(range(T)):
        da = (dh + u[:, t]) * (1 - hs[t + 1] ** 2)
        g["Wx"] += x[:, t].T @ da
        g["Wh"] += hs[t].T @ da
        g["b"] += da.sum(0)
        g["x"][:, t] = da @ Wx.T
        dh = da @ Wh.T
    out = np.stack(hs[1:], 1)
    return out, float(np.sum(out * u)), g


def test_one_program_for_every_sequence_length():
    """x: f32[B, T, 4] with T symbolic: one compiled step (forward and reverse scan) runs T = 3
    and T = 7, and no function is compiled again for T = 7."""
    f = compile_function(rnn_src("T"), grad=["x", "net/rnn/Wx", "net/rnn/Wh", "net/rnn/b"], dtype="f32")
    r = np.random.default_rng(5)
    p = {"Wx": r.normal(size=(4, 6)) * 0.5, "Wh": r.normal(size=(6, 6)) * 0.5, "b": r.normal(size=6) * 0.1}
    p = {k: v.astype(np.float32) for k, v in p.items()}
    fns = f.ex.kernel_functions() + ([f.ex.fn] if f.ex.compiled_step else [])   # a scan's program steps in Python
    compiled = []
    for B, T in [(2, 3), (5, 7)]:
        x, u = r.normal(size=(B, T, 4)).astype(np.float32), r.normal(size=(B, T, 6)).astype(np.float32)
        out = f(x=x, u=u, **{f"net/rnn/{k}": v for k, v in p.items()})
        compiled.append([len(fn.signatures) for fn in fns])     # (kernels are shared with other programs)
        hs, loss, grads = rnn_numpy(x, u, **p)
        assert out["output2"].shape == (B, T, 6) and out["output2"].dtype == np.float32
        np.testing.assert_allclose(out["output2"], hs, rtol=1e-5, atol=1e-6, err_msg=f"hs at T={T}")
        np.testing.assert_allclose(out["loss"], loss, rtol=1e-5, err_msg=f"loss at T={T}")
        np.testing.assert_allclose(out["grad:x"], grads["x"], rtol=1e-4, atol=1e-5, err_msg=f"grad x at T={T}")
        for k in ("Wx", "Wh", "b"):
            np.testing.assert_allclose(out[f"grad:net/rnn/{k}"], grads[k], rtol=1e-4, atol=1e-5,
                                       err_msg=f"grad {k} at T={T}")
    assert compiled[0] == compiled[1], "T = 7 compiled again"


@pytest.mark.parametrize("grad", [False, True], ids=["forward", "grad"])
def test_generated_code_does_not_grow_with_sequence_length(grad):
    """The scan stays a loop: a fixed T = 5 and T = 50 generate the same functions and lines."""
    kw = dict(grad=["x", "net/rnn/Wh"]) if grad else {}
    srcs = {}
    for T in (5, 50):
        src = rnn_src(T) if grad else rnn_src(T).replace("sum(hs * u), hs", "hs").replace("-> f32[]", "")
        srcs[T] = compile_function(src, dtype="f32", **kw).source
    defs = {T: len(re.findall(r"^def ", s, re.M)) for T, s in srcs.items()}
    assert defs[5] == defs[50] and defs[5] > 0, defs
    assert srcs[5].count("\n") == srcs[50].count("\n")
    assert abs(len(srcs[50]) - len(srcs[5])) < 200          # only the digits of T differ


def test_scan_bodies_write_their_outputs_in_place():
    """A compiled LSTM step's kernels write the next carries and the saved rows straight into
    the loop's buffers: no body copies a kernel's result into its destinations, and a
    per-step output nobody reads (returns = "last") is not written at all. The goldens above
    check the values; this checks the copies are gone."""
    src = """
model net(x: f32[B, 6, 3]) -> f32[] {
    return sum(lstm(x, 4, returns = "last", name = "lstm"))
}
"""
    f = compile_function(src, grad=["x", "net/lstm/Wh"], dtype="f32")
    bodies = re.findall(r"^def (scan\d+_body)\((.*?)\):\n(.*?)\n    return", f.source, re.M | re.S)
    assert len(bodies) == 2                                    # forward and reverse
    for name, params, text in bodies:
        dests = [p for p in params.split(", ") if p.startswith("o")]
        assert dests and not re.search(r"_copy\(o\d+", text), f"{name} copies its outputs:\n{text}"
        written = set(re.findall(r"\bo\d+\b", text))
        assert written and written <= set(dests)
    fwd = bodies[0][2]
    assert len(set(re.findall(r"\bo\d+\b", fwd))) == len([p for p in bodies[0][1].split(", ")
                                                          if p.startswith("o")]) - 1   # h per step: unread
    x = np.random.default_rng(0).normal(size=(2, 6, 3)).astype(np.float32)
    p = {k: np.random.default_rng(1).normal(size=v.shape).astype(np.float32) * 0.5 for k, v in f.params.items()}
    assert set(p) == {"net/lstm/Wx", "net/lstm/Wh", "net/lstm/b"}
    out = f(x=x, **p)
    ref = evaluate(f.graph, {n: np.asarray(({"x": x} | p)[f.graph[n]["name"]], DTYPES[f.graph.dtype(n)])
                             for n in f.graph.inputs})
    for k, n in f.graph.outputs.items():
        np.testing.assert_allclose(out[k], ref[n], rtol=2e-5, atol=2e-6, err_msg=k)


# =============================================================================================
# 4. the sequence examples, end to end (slow)
# =============================================================================================

EXAMPLES = [  # (example, figure in the report's "test", at least)
    ("lstm_digits", "accuracy", 0.95),
    ("gru_digits", "accuracy", 0.95),
    ("tagger", "accuracy", 0.95),
    ("caption", "exact", 0.90),
    ("seq2seq", "accuracy", 0.95),
]


@pytest.mark.slow
@pytest.mark.parametrize("example, metric, least", EXAMPLES, ids=[e[0] for e in EXAMPLES])
def test_example_trains(example, metric, least, capsys, record_property):
    assert main(["run", str(EXAMPLES_DIR / f"{example}.dl"), "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    test = report["test"]
    for k, v in test.items():
        record_property(f"test.{k}", v)
    with capsys.disabled():
        print(f"\n{example}: test {test}")
    assert test[metric] >= least, f"{example}: test {metric} {test[metric]:.4f} < {least}"
    if example == "seq2seq":                   # exact match (whole reversed string) is recorded too
        assert 0.0 <= test["exact"] <= 1.0


# the scan patterns of section 2, compiled (fused): every output against the NumPy evaluator
# running the same optimized graph, and the loss against the plain NumPy forward
@pytest.mark.slow
@pytest.mark.parametrize("src, numpy_fwd, out_shape", [
    (TWO_OUTPUTS, two_outputs_numpy, "4, 2"), (SHARED_PARAMS, shared_params_numpy, "4, 2"),
    (CARRY_THROUGH_CARRY, carry_through_carry_numpy, "4, 2"), (GENERATE, generate_numpy, "4, 3"),
    (INT_CARRY, lambda v: int_carry_numpy(v, False)[0], "3, 5")],
    ids=["carry_feeds_two_outputs", "param_used_twice", "carry_through_carry", "range", "integer_carry"])
def test_scan_patterns_compiled(src, numpy_fwd, out_shape):
    loss_src = re.sub(r"return (.*)\n}", r"return sum((\1) * u)\n}",
                      src.replace("model net(", f"model net(u: f64[B, {out_shape}], "))
    training = src is not INT_CARRY                        # the integer carry: greedy decoding
    v = leaves(loss_src, batch=3, seed=2, training=training)
    f = compile_function(loss_src, grad=[k for k, a in v.items() if k != "u" and a.dtype == np.float64],
                         training=training)
    out = f(**v)
    g = f.graph
    vals = evaluate(g, {n: v[g[n]["name"]] for n in g.inputs})
    for k, n in g.outputs.items():
        np.testing.assert_allclose(out[k], vals[n], rtol=1e-10, atol=1e-12, err_msg=k)
    np.testing.assert_allclose(out["loss"], np.sum(numpy_fwd(v) * v["u"]), rtol=1e-12)


# =============================================================================================
# 5. the IR shows the loop and its reverse
# =============================================================================================

def test_ir_shows_scan_and_reverse_scan(capsys):
    assert main(["ir", str(EXAMPLES_DIR / "lstm_digits.dl"), "--stage", "grad"]) == 0
    text = capsys.readouterr().out
    fwd, back = text.find("body (once per step)"), text.find("body (reverse, once per step)")
    assert "scan(" in text and 0 <= fwd < back, text
    assert re.search(r"^\s+the backward pass saves per step: %h f32\[B, 64\], %c f32\[B, 64\]", text, re.M), text
    assert len(re.findall(r"= scan\(", text)) == 2                        # one forward, one reverse
    assert re.search(r"= scan\([^\n]*reverse=True", text)
