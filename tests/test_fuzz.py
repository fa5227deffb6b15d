"""The fuzzers at CI size (tests/fuzz/run.py runs thousands on demand).

* `.dl` text, mutated from the examples or derived from the grammar: `dlc check` accepts it
  or prints one clean (located) error with exit status 2 — never a traceback.
* Random valid programs of registered ops: fused == unfused == the ops' NumPy references,
  and gradients == central finite differences.
"""
import numpy as np
import pytest

from tests.fuzz import dl, graphs

DL_CASES = 200


def test_dl_fuzz_cases(tmp_path):
    kinds = {"ok": 0, "error": 0}
    for seed in range(DL_CASES):
        kinds[dl.check_case(dl.case(seed), tmp_path / "case.dl")] += 1
    assert kinds["error"] > 0 and kinds["ok"] > 0      # the cases reach both outcomes


def test_grammar_derivations_parse_or_fail_cleanly():
    # the derivations follow the grammar: most parse (only names and types are arbitrary)
    from dsl.diagnostics import DlcError
    from dsl.parser import parse
    parsed = 0
    for seed in range(1, 200, 2):
        try:
            parse(dl.generated(seed), "<gen>.dl")
            parsed += 1
        except DlcError:
            pass
    assert parsed >= 50


@pytest.mark.parametrize("seed", range(6))
def test_graph_fuzz_interpreted(seed, monkeypatch):
    # the generated kernels run as Python (NUMBA_DISABLE_JIT): fusion, memory planning and
    # code generation are what is checked, quickly
    import numba
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    graphs.check_program(graphs.random_program(seed))


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(3))
def test_graph_fuzz_compiled(seed):
    graphs.check_program(graphs.random_program(seed))


def test_graph_fuzz_catches_a_wrong_kernel(monkeypatch):
    # the oracle can fail: a wrong gradient rule for tanh is caught against finite differences
    from compiler.ops import OPS
    import numba
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    case = graphs.Case(0, "model f(x: f64[B, 3]) -> f64[] {\n    return sum(tanh(x))\n}\n",
                       {"x": np.random.default_rng(0).normal(size=(2, 3))}, True)
    graphs.check_program(case)
    rule = OPS["tanh"].grad
    monkeypatch.setattr(OPS["tanh"], "grad", lambda g, n, dy: [g.add("mul", rule(g, n, dy)[0], g.const(1.5, "f64"))])
    with pytest.raises(AssertionError, match="finite differences"):
        graphs.check_program(case)


# ---- what the fuzzers found, kept ----------------------------------------------------------------
@pytest.mark.parametrize("decl", ["state s: int = zeros", "param W: mlp", "state lstm: or"])
def test_found_scalar_typed_param_or_state(tmp_path, decl):
    # dl fuzz seeds 389, 5001, 5067: a scalar type on `param`/`state` was an AttributeError
    text = f"model m(x: f32[B, 4]) -> f32[B, 4] {{\n    {decl}\n    return x\n}}\n"
    assert dl.check_case(text, tmp_path / "case.dl") == "error"


def test_found_fusion_cycle(monkeypatch):
    """Graph fuzz seed 30: fusion grouped kernels into a cycle (fixed by checking legality on
    the graph of kernels)."""
    import numba
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    graphs.check_program(graphs.random_program(30))


DEAD_SOFTMAX = """model f(x: f64[B, 1]) -> f64[] {
    h0 = (x * x)
    h1 = dense(h0, 1)
    h2 = (h1 - h0)
    h3 = softmax(h2)
    h6 = softplus(x)
    return mean(h6 * h6) + sum(h2) / 7.0
}
"""


def _dead_softmax_case():
    from compiler.api import lower_function
    _, prog = lower_function(DEAD_SOFTMAX, "f", "f64", "<m>.dl")
    r = np.random.default_rng(0)
    return graphs.Case(167, DEAD_SOFTMAX, {"x": r.normal(size=(2, 1)),
                                           **{k: r.normal(size=i.shape) for k, i in prog.params.items()}}, True)


def test_found_fused_loss_wrong_with_dead_softmax(monkeypatch):
    """Graph fuzz seed 167 (minimized): the fused training loss was wrong (0.1443 vs 0.1608): the
    matmul's own input (same shape as its output) had joined the matmul's epilogue."""
    import numba
    monkeypatch.setattr(numba.config, "DISABLE_JIT", True)
    graphs.check_program(_dead_softmax_case())


def test_found_codegen_keyerror_with_dead_softmax():
    """The fused evaluation program of the same source failed in codegen (a KeyError); it now
    matches the unfused one."""
    from compiler.api import compile_function
    x = np.random.default_rng(1).normal(size=(5, 1))
    fused, plain = compile_function(DEAD_SOFTMAX, "f"), compile_function(DEAD_SOFTMAX, "f", fuse=False)
    params = {k: np.random.default_rng(2).normal(size=v.shape) for k, v in fused.params.items()}
    np.testing.assert_allclose(fused(x=x, **params)["output"], plain(x=x, **params)["output"], rtol=1e-12)
