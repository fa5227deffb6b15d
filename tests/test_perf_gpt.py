"""The GPT training step's performance work: float32 exp and erf that vectorize, the row-wise
softmax kernels built on them, and the Python step's scratch-buffer arena.

Values are checked against float64 NumPy/SciPy; the arena by running the same program with
other inputs and checking that earlier results are untouched and later ones still right.
"""
from __future__ import annotations

import numpy as np
import pytest
from numba import njit
from scipy import special

from compiler.api import compile_function

UNARY = """
model m(x: f32[N]) {{
    return {op}(x)
}}
"""


def _special_values():
    return np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-30, -1e-30], np.float32)


def test_fast_exp_f32_matches_float64():
    f = compile_function(UNARY.format(op="exp"), dtype="f32")
    assert "_exp_f32(" in f.source and "np.exp(" not in f.source.split("def kernel")[1]
    x = np.concatenate([np.linspace(-110, 95, 200_001, dtype=np.float32), _special_values()])
    y = f(x=x)["output"]
    assert y.dtype == np.float32
    ref = np.exp(x.astype(np.float64))
    normal = (ref > np.finfo(np.float32).tiny) & (ref < np.finfo(np.float32).max)
    rel = np.abs(y[normal] - ref[normal]) / ref[normal]
    assert rel.max() < 4e-7, rel.max()                         # 2.5 ulp
    # a step flushes subnormal results to zero (compiler/codegen/fpmode.py): below float32's
    # smallest normal the program gives 0, and the helper itself (no step around it) is exact
    # to the last subnormal bit
    sub = ref <= np.finfo(np.float32).tiny
    assert np.all((y[sub] == 0) | (np.abs(y[sub] - ref[sub]) < 1e-44))
    assert np.all(y[ref < np.finfo(np.float32).tiny / 2] == 0)
    helper = _helper("_exp_f32")

    @njit
    def exp(v, out):
        for i in range(v.size):
            out[i] = helper(v[i])
    out = np.empty_like(x)
    exp(x, out)
    assert (np.abs(out[normal] - ref[normal]) / ref[normal]).max() < 4e-7
    assert np.abs(out[sub] - ref[sub]).max() < 1e-44
    big = ref >= np.finfo(np.float32).max
    assert np.all(y[big] == np.inf)
    np.testing.assert_array_equal(y[-7:], np.exp(_special_values()))    # 1, 1, inf, 0, nan, 1, 1


def _helper(name: str):
    """A kernel helper as compiled for the kernels (its own generated module, `dlc_<hash>`)."""
    import sys
    mods = [m for n, m in list(sys.modules.items()) if n.startswith("dlc_") and "kernel" not in vars(m)
            and name in vars(m)]
    assert len(mods) == 1
    return getattr(mods[0], name)


def test_fast_erf_f32_matches_float64():
    f = compile_function(UNARY.format(op="erf"), dtype="f32")
    assert "_erf_f32(" in f.source and "math.erf(" not in f.source.split("def kernel")[1]
    x = np.concatenate([np.linspace(-8, 8, 100_001, dtype=np.float32), _special_values()])
    y = f(x=x)["output"]
    assert y.dtype == np.float32
    err = np.abs(y.astype(np.float64) - special.erf(x.astype(np.float64)))
    assert np.nanmax(err) < 4e-7, np.nanmax(err)
    np.testing.assert_array_equal(y[-7:-2], [0.0, 0.0, 1.0, -1.0, np.nan])
    assert np.all(np.abs(y[:100_001]) <= 1)


def test_exact_gelu_f32_matches_float64():
    """The exact (erf) GELU of the library, through the fast erf, against SciPy."""
    f = compile_function(UNARY.format(op="gelu"), dtype="f32")
    x = np.linspace(-6, 6, 10_001, dtype=np.float32)
    xd = x.astype(np.float64)
    np.testing.assert_allclose(f(x=x)["output"], 0.5 * xd * (1 + special.erf(xd / np.sqrt(2))), rtol=2e-6,
                               atol=1e-6)


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_row_softmax_f32_matches_float64(op):
    src = f"model m(x: f32[B, 4, N]) {{\n    return {op}(x)\n}}\n"
    f = compile_function(src, dtype="f32")
    assert "_exp_f32(" in f.source
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(3, 4, 37)) * 8).astype(np.float32)
    x[0, 1, 5:] = -np.inf                                       # a causal mask's row
    x[1, 2, :] = [40.0] * 37                                    # a flat row of large values
    y = f(x=x)["output"]
    xd = x.astype(np.float64)
    z = xd - xd.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1, keepdims=True))
    ref = np.exp(z - lse) if op == "softmax" else z - lse
    assert y.dtype == np.float32
    fin = np.isfinite(ref)
    np.testing.assert_allclose(y[fin], ref[fin], rtol=2e-6, atol=1e-7)
    np.testing.assert_array_equal(y[~fin], ref[~fin])          # exp(-inf) = 0, log-prob -inf


@pytest.mark.parametrize("dtype", ["f32", "f64"])
@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_row_max_in_four_lanes_of_every_width(op, dtype):
    """The row's maximum is taken in four running maxima and a tail (ops.py `_row_max`): rows
    of every width from 1 to 9, with the maximum at every position, and a NaN anywhere in a row
    making the whole row NaN, as the reference does."""
    f = compile_function(f"model m(x: {dtype}[B, N]) {{\n    return {op}(x)\n}}\n", dtype=dtype)
    assert "_row_max(" in f.source
    t = np.float32 if dtype == "f32" else np.float64
    for n in range(1, 10):
        x = np.tile(np.linspace(-3.0, 2.0, n), (n + 2, 1))
        for i in range(n):                      # row i: the maximum at position i, large enough
            x[i, i] = 100.0 if dtype == "f32" else 800.0    # that exp(max - a smaller m) overflows
        x[n, n // 2] = np.nan                   # a NaN row
        x[n + 1, :] = -np.inf if n == 1 else x[n + 1, :]
        x = x.astype(t)
        y = f(x=x)["output"]
        with np.errstate(invalid="ignore"):
            ref = special.softmax(x.astype(np.float64), axis=-1) if op == "softmax" else \
                special.log_softmax(x.astype(np.float64), axis=-1)
        assert np.isnan(y[n]).all() and np.isnan(ref[n]).all(), n
        ok = np.isfinite(ref)
        np.testing.assert_allclose(y[ok], ref[ok], rtol=3e-6 if dtype == "f32" else 1e-12, atol=1e-30,
                                   err_msg=f"width {n}")
        assert np.isnan(y[~ok]).sum() == np.isnan(ref[~ok]).sum()


ARENA = """
model m(x: f32[B, 16]) {
    h = tanh(dense(x, 32, name = "a"))
    return softmax(dense(h, 8, name = "b") * 2.0)
}
"""


def test_python_step_reuses_its_scratch_buffers(monkeypatch):
    """A step run from Python allocates its scratch buffers once per set of dims, and its
    outputs on every call: an earlier result is never overwritten by a later call."""
    monkeypatch.setenv("DLC_STEP", "python")
    f = compile_function(ARENA, dtype="f32")
    assert not f.ex.compiled_step
    arena = f.ex.fn.__globals__["_arena"]
    rng = np.random.default_rng(1)
    params = {k: (rng.normal(size=v.shape) * 0.3).astype(np.float32) for k, v in f.params.items()}

    def ref(x):
        h = np.tanh(x.astype(np.float64) @ params["m/a/W"] + params["m/a/b"])
        z = 2.0 * (h @ params["m/b/W"] + params["m/b/b"])
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    xs = [rng.normal(size=(5, 16)).astype(np.float32) for _ in range(3)] + [rng.normal(size=(2, 16)).astype(np.float32)]
    outs = [f(x=x, **params)["output"] for x in xs[:2]]
    assert len(arena) == 1
    scratch = [id(b) for b in next(iter(arena.values()))]
    assert scratch                                              # the hidden layer, at least
    outs += [f(x=x, **params)["output"] for x in xs[2:]]
    assert len(arena) == 2                                      # B = 5 and B = 2
    assert [id(b) for b in arena[(5,)]] == scratch              # the same buffers, reused
    assert len({id(o) for o in outs}) == len(outs)              # outputs are fresh
    for x, y in zip(xs, outs):
        np.testing.assert_allclose(y, ref(x), rtol=1e-5, atol=1e-6)


# ---- scale, mask and softmax: one kernel, one [B, h, T, T] tensor ----------------------------

ATTENTION = """
model attn(q: f64[B, 2, 6, 4], k: f64[B, 2, 6, 4], v: f64[B, 2, 6, 4]) {
    mask = causal_mask(6)
    p = softmax(where(mask, (q @ transpose(k, perm = [0, 1, 3, 2])) * 0.5, -inf))
    return sum((p @ v) * (p @ v))
}
"""


def _attention_ref(q, k, v):
    s = np.einsum("bhtd,bhsd->bhts", q, k) * 0.5
    s = np.where(np.tril(np.ones((6, 6), bool)), s, -np.inf)
    e = np.exp(s - s.max(-1, keepdims=True))
    p = e / e.sum(-1, keepdims=True)
    return ((p @ v) ** 2).sum()


def _group_of(g, op):
    return next(grp for grp in g.groups for n in grp.nodes if g.op(n) == op)


def test_scale_mask_softmax_fuse_into_the_matmul():
    f = compile_function(ATTENTION)
    g = f.graph
    grp = _group_of(g, "softmax")
    ops = [g.op(n) for n in grp.nodes]
    assert grp.pattern == "anchored" and ops[0] == "matmul" and grp.tail == grp.nodes[-1], ops
    assert {"mul", "where"} <= set(ops) and ops[-1] == "softmax"
    assert grp.outputs == [grp.tail]                   # the scores before softmax are never stored
    assert [x.tail for x in g.copy().groups] == [x.tail for x in g.groups]
    assert g.attrs(grp.anchor).get("tb") and not any(g.op(n) == "transpose" for n in g.topo())  # k^T: BLAS's
    from compiler.memory import plan as plan_memory
    p = plan_memory(g)
    square = [a for allocs in p.allocs.values() for a in allocs if tuple(a[1]) == ("B", 2, 6, 6)]
    assert len(square) == 1, square                    # one [B, h, T, T] buffer in the program
    rng = np.random.default_rng(0)
    q, k, v = (rng.normal(size=(3, 2, 6, 4)) for _ in range(3))
    np.testing.assert_allclose(f(q=q, k=k, v=v)["output"], _attention_ref(q, k, v), rtol=1e-12)


@pytest.mark.slow
def test_fused_softmax_gradient_matches_unfused_and_finite_differences():
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(2, 2, 6, 4)) for _ in range(3))
    fused = compile_function(ATTENTION, grad=["q", "k", "v"])
    plain = compile_function(ATTENTION, grad=["q", "k", "v"], fuse=False)
    assert any(grp.tail is not None for grp in fused.graph.groups)
    assert all(grp.tail is None for grp in plain.graph.groups)
    a, b = fused(q=q, k=k, v=v), plain(q=q, k=k, v=v)
    assert set(a) == set(b) and len(a) == 4
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-11, atol=1e-13, err_msg=name)
    gq = next(a[n] for n in a if n != "loss" and a[n].shape == q.shape and "q" in n)
    eps, i = 1e-6, (1, 0, 3, 2)
    qp, qm = q.copy(), q.copy()
    qp[i] += eps
    qm[i] -= eps
    fd = (_attention_ref(qp, k, v) - _attention_ref(qm, k, v)) / (2 * eps)
    assert abs(gq[i] - fd) < 1e-6 * max(1.0, abs(fd))


@pytest.mark.parametrize("op", ["softmax", "log_softmax"])
def test_rowwise_tail_of_an_elementwise_kernel(op):
    src = f"""
model m(x: f32[B, 5, 7], b: f32[7]) {{
    return {op}(x * 3.0 + b)
}}
"""
    f = compile_function(src, dtype="f32")
    grp = _group_of(f.graph, op)
    assert grp.pattern == "elementwise" and grp.tail is not None and len(grp.nodes) == 3
    rng = np.random.default_rng(2)
    x, b = rng.normal(size=(4, 5, 7)).astype(np.float32), rng.normal(size=7).astype(np.float32)
    z = 3.0 * x.astype(np.float64) + b
    z = z - z.max(-1, keepdims=True)
    lse = np.log(np.exp(z).sum(-1, keepdims=True))
    ref = np.exp(z - lse) if op == "softmax" else z - lse
    np.testing.assert_allclose(f(x=x, b=b)["output"], ref, rtol=2e-6, atol=2e-7)


def test_softmax_input_read_elsewhere_is_not_fused():
    """The input is needed in memory by another reader: softmax stays a kernel of its own."""
    src = """
model m(x: f64[B, 7]) {
    h = x * 2.0
    return softmax(h) + h
}
"""
    f = compile_function(src)
    assert all(grp.tail is None for grp in f.graph.groups)
    x = np.random.default_rng(3).normal(size=(4, 7))
    h = 2 * x
    e = np.exp(h - h.max(-1, keepdims=True))
    np.testing.assert_allclose(f(x=x)["output"], e / e.sum(-1, keepdims=True) + h, rtol=1e-12)
