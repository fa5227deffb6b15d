"""The scan gradient's two economies (compiler/ops_scan.py): products saved in the forward
pass instead of recomputed, and a captured weight's gradient as one GEMM after the loop.
The compiled gradients are checked against PyTorch in test_rnn.py (golden LSTM and GRU, fused
and unfused) and by finite differences there; here, that the economies happen and that the
graph's NumPy references give the finite-difference gradients with and without saving."""
import numpy as np
import pytest

from compiler import ops_scan
from compiler.api import lower_function
from compiler.driver import optimize
from compiler.ops import evaluate
from compiler.passes import Context

SRC = """
model net(x: f64[B, 6, 3], u: f64[B, 6, 5]) -> f64[] {
    hs = lstm(x, 5, name = "lstm")
    return sum(hs * u)
}
"""


def grad_graph():
    lw, prog = lower_function(SRC)
    g = prog.graph
    g.outputs["loss"] = g.outputs.pop("output")
    ctx = Context(params={k: v.node for k, v in prog.params.items()}, expose_grads=True)
    return optimize(g, "grad", ctx, False), prog


def scans(g):
    return sorted((n for n in g.nodes() if g.op(n) == "scan"), key=lambda n: bool(g.attrs(n).get("reverse")))


def test_lstm_saves_its_product_and_sums_wh_after_the_loop():
    g, _ = grad_graph()
    fwd, back = scans(g)
    assert g.attrs(fwd)["saved_products"] == 1                  # h @ Wh
    fb = g.attrs(fwd)["body"]
    saved = fb.outputs[max(k for k in fb.outputs if k.startswith("y"))]
    assert fb.op(saved) == "add" and "matmul" in [fb.op(a) for a in fb.args(saved)]   # z = x_t Wx + h Wh
    body = g.attrs(back)["body"]
    # the backward step reads z: it recomputes neither the product nor the sum
    assert not any(body.op(n) == "add" and any(body.op(a) == "matmul" for a in body.args(n)) for n in body.nodes())
    assert not any(body.op(n) == "matmul" and body.shape(n) == (5, 20) for n in body.nodes())
    assert sum(body.op(n) == "matmul" for n in body.nodes()) == 1   # dz @ Wh^T only: h @ Wh is read
    assert g.attrs(back)["n_carry"] == 2                        # dh, dc: no dWh accumulator
    dwh = g.grad_of["net/lstm/Wh"]
    assert g.op(dwh) == "matmul" and g.attrs(dwh)["ta"]          # one GEMM over every step


@pytest.mark.parametrize("limit", [ops_scan.SAVE_PRODUCTS_ELEMENTS, 0], ids=["saved", "recomputed"])
def test_gradients_match_finite_differences(monkeypatch, limit):
    monkeypatch.setattr(ops_scan, "SAVE_PRODUCTS_ELEMENTS", limit)
    g, prog = grad_graph()
    assert g.attrs(scans(g)[0]).get("saved_products", 0) == (1 if limit else 0)
    rng = np.random.default_rng(0)
    vals = {"x": rng.normal(size=(2, 6, 3)), "u": rng.normal(size=(2, 6, 5))}
    vals.update({k: 0.5 * rng.normal(size=v.shape) for k, v in prog.params.items()})
    feed = {n: vals[g[n]["name"]] for n in g.inputs}

    def loss(v):
        return float(evaluate(g, {n: v[g[n]["name"]] for n in g.inputs})[g.outputs["loss"]])

    out = evaluate(g, feed)
    for name in prog.params:
        got = out[g.grad_of[name]]
        i = np.unravel_index(np.argmax(np.abs(got)), got.shape)       # the largest component
        hi, lo = ({**vals, name: vals[name].copy()} for _ in range(2))
        hi[name][i] += 1e-6
        lo[name][i] -= 1e-6
        assert got[i] == pytest.approx((loss(hi) - loss(lo)) / 2e-6, rel=1e-5), name
