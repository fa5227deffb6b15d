"""A differential fuzzer in the spirit of NNSmith (Liu et al., ASPLOS'23): random *valid*
programs built from the registered ops, compiled fused and unfused, checked against the ops'
NumPy references (`compiler.ops.evaluate` on the lowered graph) and their gradients against
central finite differences.

    case = random_program(seed)          # .dl source, the inputs, whether it is smooth
    check_program(case)                  # raises AssertionError on any disagreement
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from compiler.api import compile_function, lower_function
from compiler.ops import evaluate
from compiler.shapes import DTYPES

SMOOTH_UNARY = ["tanh({})", "sigmoid({})", "sin({})", "cos({})", "exp(tanh({}))", "log(abs({}) + 1.0)",
                "sqrt({} * {} + 1.0)", "erf({})", "softplus({})", "gelu({})", "silu({})", "gelu_tanh({})",
                "({} * 0.5)", "(-{})", "({} ** 2)", "elu({})"]
KINKED_UNARY = ["relu({})", "abs({})", "leaky_relu({}, 0.1)", "sign({}) * {}", "floor({}) + {}"]
SMOOTH_BINARY = ["({} + {})", "({} - {})", "({} * {})", "({} / (abs({}) + 1.0))"]
KINKED_BINARY = ["maximum({}, {})", "minimum({}, {})"]
ROWWISE = ["softmax({})", "log_softmax({})", "layer_norm({})",
           "({} - mean({}, axis = 1, keepdims = true))", "({} * sum({}, axis = 1, keepdims = true))"]


@dataclass
class Case:
    seed: int
    source: str
    inputs: dict          # name -> array (x and every parameter)
    smooth: bool          # no kinks: finite differences apply


def random_program(seed: int) -> Case:
    r = np.random.default_rng(seed)
    smooth = bool(r.integers(2))
    unary = SMOOTH_UNARY + ([] if smooth else KINKED_UNARY)
    binary = SMOOTH_BINARY + ([] if smooth else KINKED_BINARY)
    width = int(r.integers(1, 6))
    values = [("x", width)]              # name, width: every value is f64[B, width]
    lines = []
    for i in range(int(r.integers(1, 8))):
        name, w = values[int(r.integers(len(values)))]
        kind = r.choice(["unary", "binary", "dense", "rowwise"], p=[0.35, 0.3, 0.2, 0.15])
        if kind == "unary":
            t = str(r.choice(unary))
            expr = t.format(*[name] * t.count("{}"))
        elif kind == "binary":
            same = [v for v in values if v[1] == w]
            other = same[int(r.integers(len(same)))][0]
            t = str(r.choice(binary))
            expr = t.format(name, other, other) if t.count("{}") == 3 else t.format(name, other)
        elif kind == "dense":
            w = int(r.integers(1, 6))
            expr = f"dense({name}, {w})"
        else:
            t = str(r.choice(ROWWISE))
            expr = t.format(*[name] * t.count("{}"))
        lines.append(f"    h{i} = {expr}")
        values.append((f"h{i}", w))
    last, _ = values[-1]
    mix = values[int(r.integers(len(values)))][0]
    body = "\n".join(lines)
    src = (f"model f(x: f64[B, {width}]) -> f64[] {{\n{body}\n"
           f"    return mean({last} * {last}) + sum({mix}) / 7.0\n}}\n")
    batch = int(r.integers(1, 5))
    inputs = {"x": r.normal(size=(batch, width))}
    _, prog = lower_function(src, "f", "f64", f"<fuzz {seed}>.dl")
    for pname, info in prog.params.items():
        inputs[pname] = r.normal(size=info.shape) * 0.7
    return Case(seed, src, inputs, smooth)


def _close(a, b, what, case, rtol=1e-9, atol=1e-10):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} vs {b.shape}\n{case.source}"
    assert np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True), \
        f"{what}: max difference {np.nanmax(np.abs(a - b))}\n{case.source}"


def check_program(case: Case, fd_coords: int = 3) -> None:
    wrt = list(case.inputs)                 # x and every parameter
    fused = compile_function(case.source, "f", grad=wrt, fuse=True, filename=f"<fuzz {case.seed}>.dl")
    plain = compile_function(case.source, "f", grad=wrt, fuse=False, filename=f"<fuzz {case.seed}>.dl")
    out_f, out_p = fused(**case.inputs), plain(**case.inputs)
    assert set(out_f) == set(out_p)
    for k in out_f:
        _close(out_f[k], out_p[k], f"fused vs unfused `{k}`", case)
    # the forward value against the ops' NumPy references on the lowered (unoptimized) graph
    _, prog = lower_function(case.source, "f", "f64", f"<fuzz {case.seed}>.dl")
    g = prog.graph
    with np.errstate(all="ignore"):
        vals = evaluate(g, {n: np.asarray(case.inputs[g[n]["name"]], DTYPES[g.dtype(n)]) for n in g.inputs})
    _close(out_f["loss"], vals[g.outputs["output"]], "compiled vs NumPy reference", case)
    # the gradients against the optimized graph's own reference interpretation
    gg = fused.graph
    with np.errstate(all="ignore"):
        rv = evaluate(gg, {n: np.asarray(case.inputs[gg[n]["name"]], DTYPES[gg.dtype(n)]) for n in gg.inputs})
    for k, n in gg.outputs.items():
        _close(out_f[k], rv[n], f"compiled vs reference `{k}`", case)
    if not case.smooth or not np.isfinite(out_f["loss"]):
        return
    r = np.random.default_rng(case.seed + 1)
    names = [k for k in case.inputs if f"grad:{k}" in out_f]
    for _ in range(fd_coords):
        name = names[int(r.integers(len(names)))]
        a = case.inputs[name]
        idx = tuple(int(r.integers(s)) for s in a.shape)
        eps = 1e-6 * max(1.0, abs(a[idx]))
        def loss_at(v):
            b = a.copy()
            b[idx] = v
            return float(plain(**{**case.inputs, name: b})["loss"])
        fd = (loss_at(a[idx] + eps) - loss_at(a[idx] - eps)) / (2 * eps)
        an = float(out_f[f"grad:{name}"][idx])
        assert abs(fd - an) <= 1e-4 * max(1.0, abs(fd), abs(an)), \
            f"d loss / d {name}{list(idx)}: analytic {an}, finite differences {fd}\n{case.source}"
