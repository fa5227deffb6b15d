"""Compile time that scales: kernels deduplicated by content, one module per distinct kernel,
the Python step of large programs, and the compile-time split `dlc run --json` reports.

Counting needs no Numba: `generate` renders the modules; only the tests that run code compile.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler.api import lower_function
from compiler.codegen import CpuTarget, generate
from compiler.driver import build, compile_programs, example_args, optimize
from compiler.lower import OptimizerSpec
from compiler.memory import plan as plan_memory
from compiler.passes import Context

ROOT = Path(__file__).resolve().parent.parent

BLOCK = """
def block(x: [N, T, D]) {
    q = transpose(reshape(dense(x, D), [-1, T, 2, 4]), perm = [0, 2, 1, 3])
    k = transpose(reshape(dense(x, D), [-1, T, 2, 4]), perm = [0, 2, 3, 1])
    o = transpose(softmax((q @ k) * 0.5) @ q, perm = [0, 2, 1, 3])
    h = layer_norm(x + reshape(o, [-1, T, D]))
    return layer_norm(h + dense(relu(dense(h, 16)), D))
}
"""


def encoder(blocks: int) -> str:
    body = "".join("    h = block(h)\n" for _ in range(blocks))
    return BLOCK + f"""
model enc(x: f64[B, 5, 8], y: i64[B, 5]) {{
    h = x
{body}    return cross_entropy(dense(h, 3), y)
}}
"""


def train_graph(src: str):
    _, prog = lower_function(src)
    g = prog.graph
    g.outputs["loss"] = g.outputs.pop("output")
    ctx = Context(params={k: v.node for k, v in prog.params.items()}, optimizer=OptimizerSpec("adam", 1e-3))
    return optimize(g, "train", ctx), prog


def rendered(blocks: int):
    g, _ = train_graph(encoder(blocks))
    return generate(g, plan_memory(g), CpuTarget(), compiled_step=False)


def test_repeated_blocks_share_their_kernels():
    counts = {}
    for blocks in (1, 2, 4):
        source, meta = rendered(blocks)
        counts[blocks] = (meta["kernels"], meta["distinct_kernels"])
        # every call goes to an imported distinct kernel; each module is imported once
        imported = re.findall(r"^from (dlc_\w+) import kernel as (k\d+), inlined as k\d+i$", source, re.M)
        kernel_modules = [m for m, text in meta["modules"].items() if "\ndef kernel(" in text]   # not helpers
        assert sorted(m for m, _ in imported) == sorted(kernel_modules)
        called = set(re.findall(r"^ {4,8}(k\d+)\(", source, re.M))
        assert called == {k for _, k in imported}
    assert counts[2][1] < counts[2][0] / 1.5          # the second block reuses the first's kernels
    assert counts[1][0] < counts[2][0] < counts[4][0]
    assert counts[2][1] == counts[4][1]               # depth adds calls, not kernels
    assert counts[4][1] - counts[1][1] <= 4           # (block 1's input is x; the gradient kernels where blocks meet)


def test_kernels_differing_only_in_sizes_are_one():
    """Two dense + ReLU layers of other widths: one kernel, called with its sizes."""
    _, prog = lower_function("""
model two(x: f64[B, 8]) {
    return relu(dense(relu(dense(x, 16)), 12))
}
""")
    g = optimize(prog.graph, "eval", Context())
    source, meta = generate(g, plan_memory(g), CpuTarget(), compiled_step=False)
    calls = re.findall(r"^ {4,8}(k\d+)\((.*)\)$", source, re.M)
    assert len(calls) == 2 and calls[0][0] == calls[1][0], calls
    assert calls[0][1].endswith(", 16") and calls[1][1].endswith(", 12")
    assert meta["distinct_kernels"] == 1 and meta["kernels"] == 2


def test_kernel_modules_name_no_buffer_or_node():
    """A kernel module's text is its computation alone, so equal computations hash equally."""
    _, meta = rendered(2)
    for name, text in meta["modules"].items():
        if "\ndef kernel(" not in text:             # a helper module (the matrix products)
            continue
        body = text[text.index("def kernel("):]
        params = re.match(r"def kernel\(([^)]*)\):", body).group(1).split(", ")
        assert all(re.fullmatch(r"[xy]\d+|[nm]\d+", p) for p in params), params
        assert not re.search(r"\b(?:v\d+|d\d+)\b", body), body     # node values, the step's dims
        assert name.startswith("dlc_") and "%" not in body


def test_train_and_eval_programs_share_kernel_modules():
    src = encoder(1)
    g, prog = train_graph(src)
    _, eprog = lower_function(src, training=False)
    ge = optimize(eprog.graph, "eval", Context())
    _, mt = generate(g, plan_memory(g), CpuTarget(), compiled_step=False)
    _, me = generate(ge, plan_memory(ge), CpuTarget(), compiled_step=False)
    assert set(mt["modules"]) & set(me["modules"])


GRU_TAGGER = """
model tag(x: f64[B, 6, 4], y: i64[B, 6]) {
    hs = scan xt in x, h = zeros([B, 8]) {
        h = gru_cell(xt, h)
        yield h
    }
    return cross_entropy(dense(hs, 3), y)
}
"""


def test_compiled_code_copies_through_one_helper():
    """Scan carries and body outputs are copied by `_copy`, compiled once per array type: a
    slice assignment (`a.reshape(-1)[:] = b.reshape(-1)`) makes Numba compile its shape check
    anew at every site (half of a GRU decoder's scan compile). The Python step keeps NumPy's."""
    g, _ = train_graph(GRU_TAGGER)
    source, meta = generate(g, plan_memory(g), CpuTarget(), compiled_step=False)
    compiled, step = source.split("\ndef step(")
    assert "[:] = " not in compiled.replace("reshape(-1)[:] = 0", "")
    assert len(re.findall(r"^from dlc_\w+ import _copy$", compiled, re.M)) == 1       # from its helper module
    assert sum(len(re.findall(r"^def _copy\(", m, re.M)) for m in meta["modules"].values()) == 1
    assert len(re.findall(r"\b_copy\(cb\d+\[0\], ", compiled)) >= 2     # the carries enter the loop
    assert "_copy(" not in step


CONV = """
model convnet(x: f32[B, 1, 8, 8], y: i64[B]) {
    h = max_pool2d(relu(conv2d(x, 4, kernel = 3, padding = 1)), 2)
    h = relu(conv2d(h, 8, kernel = 3, padding = 1))
    return cross_entropy(dense(reshape(h, [B, 128]), 3), y)
}
"""


def test_a_helper_is_one_module_shared_by_its_kernels():
    """`_im2col` lives in one helper module that every conv kernel imports (typed and compiled
    once per process, not once per kernel); the helper module comes before its kernels, and
    helper modules are not counted as kernels."""
    g, _ = train_graph(CONV)
    _, meta = generate(g, plan_memory(g), CpuTarget(), compiled_step=False)
    names = list(meta["modules"])
    defining = [n for n, m in meta["modules"].items() if re.search(r"^def _im2col\(", m, re.M)]
    assert len(defining) == 1
    importing = [n for n, m in meta["modules"].items() if re.search(rf"^from {defining[0]} import .*_im2col", m, re.M)]
    assert len(importing) >= 2
    assert all(names.index(defining[0]) < names.index(n) for n in importing)
    assert meta["distinct_kernels"] == sum(1 for m in meta["modules"].values() if "\ndef kernel(" in m)


def _feeds(ex, rng):
    args = example_args(ex, {"B": 3})
    out = []
    for (name, kind, shape, dtype), a in zip(ex.inputs, args):
        if kind == "scalar":
            out.append(type(a)({"lr": 1e-3, "rng": 1, "c1": 0.1, "c2": 0.001}.get(name, 0.5)))
        elif name == "y":
            out.append(rng.integers(0, 3, size=a.shape).astype(a.dtype))
        else:
            out.append(rng.normal(size=a.shape).astype(a.dtype))
    return out


SMALL = """
model small(x: f64[B, 5, 8], y: i64[B, 5]) {
    h = layer_norm(relu(dense(x, 8)) + x)
    return cross_entropy(dense(h, 3) + dense(h, 3), y)
}
"""


@pytest.mark.slow
def test_python_step_matches_the_compiled_step(tmp_path, monkeypatch):
    """The same program stepped from Python (a call per kernel, compiled by this process and a
    forked worker into an empty cache) and as one inlined `@njit` step: the same kernels, so
    the same numbers, for every output and every state update."""
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path))
    g, _ = train_graph(SMALL)
    py, nj = build(g.copy(), compiled_step=False), build(g.copy(), compiled_step=True)
    assert not py.compiled_step and nj.compiled_step
    assert py.kernels == nj.kernels and py.distinct_kernels < py.kernels
    rng = np.random.default_rng(0)
    args = _feeds(py, rng)
    compile_programs([(py, args)], workers=1)
    assert py.cache_hit is False and py.numba_seconds > 0
    assert all(sig in fn.overloads for fn, sig in py.calls)
    a1 = [x.copy() if isinstance(x, np.ndarray) else x for x in args]
    a2 = [x.copy() if isinstance(x, np.ndarray) else x for x in args]
    out1, out2 = py(*a1), nj(*a2)
    assert np.isfinite(out1[0]) and out1[0] > 0
    for x, y in zip(out1, out2):
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14)
    moved = 0
    for (name, kind, *_), x0, x, y in zip(py.inputs, args, a1, a2):
        if kind in ("param", "state"):
            np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-14, err_msg=name)
            moved += not np.array_equal(x, x0)
    assert moved > 0


@pytest.mark.slow
def test_run_json_reports_the_compile_split(tmp_path):
    env = {**os.environ, "DLC_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "runtime.cli", "run", str(ROOT / "examples" / "mlp.dl"), "--epochs", "1",
           "--json", "--quiet"]
    reps = []
    for _ in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        reps.append(json.loads(r.stdout.strip().splitlines()[-1]))
    cold, warm = (rep["compile"] for rep in reps)
    for c in (cold, warm):
        assert set(c) >= {"front_end", "passes", "codegen", "numba", "kernels", "distinct_kernels"}
        assert all(c[k] >= 0 for k in ("front_end", "passes", "codegen", "numba"))
        assert 0 < c["distinct_kernels"] <= c["kernels"]
    assert reps[0]["kernel_cache_hit"] is False and reps[1]["kernel_cache_hit"] is True
    assert warm["numba"] < cold["numba"]
    assert cold["numba_compiled"] > 0 and warm["numba_compiled"] == 0    # warm: Numba only loads
    assert 0 <= cold["eval_wait"] <= cold["eval_background"]              # compiled beside training


EVAL_BESIDE = """
import json, sys
from runtime.session import Options, Session
s = Session(sys.argv[1], Options(eval_beside=sys.argv[2] == "beside"))
compiling = s.eval_compiling()
batch = {k: v[:64] for k, v in s.dataset.train.items()}
s.train_step(batch)                    # a training step while the evaluation program compiles
got = s.evaluate(s.dataset.test)
print(json.dumps({"compiling": compiling, "after": s.eval_compiling(), "eval": got, "report": s.compile_report()}))
"""


@pytest.mark.slow
def test_the_evaluation_program_compiles_beside_training(tmp_path):
    """Cold, a training Session with `eval_beside` (as `dlc run` makes it) compiles its
    steps, then leaves the evaluation program to a forked process while it trains; evaluating waits for it and gives exactly what a Session
    that compiled everything first gives (fresh processes: Numba keeps what it compiled)."""
    def session(cache: str, mode: str) -> dict:
        env = {**os.environ, "DLC_CACHE_DIR": str(tmp_path / cache)}
        r = subprocess.run([sys.executable, "-c", EVAL_BESIDE, str(ROOT / "examples" / "mlp.dl"), mode],
                           capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])
    beside, first = session("a", "beside"), session("b", "first")
    assert beside["compiling"] and not beside["after"] and beside["report"]["eval_background"] > 0
    assert not first["compiling"] and "eval_background" not in first["report"]
    assert beside["eval"] == first["eval"]


def test_warm_runs_load_the_optimized_graph(tmp_path, monkeypatch):
    """The pass pipeline's result is stored in the kernel cache under the lowered graph, the
    options and the compiler's source: the same program again loads it (no pass runs); other
    options, or a damaged file, run the passes."""
    from compiler import cache, driver
    from compiler.program import Phase
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path))
    runs = []
    real = driver.optimize
    monkeypatch.setattr(driver, "optimize", lambda *a, **k: runs.append(a[1]) or real(*a, **k))

    def step(fuse=True, **options):
        _, prog = lower_function(SMALL)
        prog.graph.outputs["loss"] = prog.graph.outputs.pop("output")
        phase = Phase("", prog.graph.outputs["loss"], list(prog.params), OptimizerSpec("adam", 1e-3, **options))
        return driver.optimize_phase(prog, phase, fuse)

    first = step()
    again = step()
    assert runs == ["train"]
    assert list(again.g.nodes(data=True)) == list(first.g.nodes(data=True)) and again.outputs == first.outputs
    assert again.updates == first.updates and again.grad_of == first.grad_of
    step(fuse=False)
    step(beta1=0.8)
    assert runs == ["train"] * 3
    for f in (tmp_path / "kernels" / "objects").glob("*.pkl"):
        f.write_bytes(f.read_bytes()[:50])                     # truncated
    step()
    assert runs == ["train"] * 4
    assert cache.compiler_digest() == cache.compiler_digest() and len(cache.compiler_digest()) == 64


DEEP_CELL = """
model deep(x: f64[B, 6, 4], y: i64[B, 6]) {
    hs = scan xt in x, h = zeros([B, 8]) {
        a = tanh(dense(concat([xt, h], axis = 1), 8, name = "l1"))
        b = layer_norm(a + relu(dense(a, 8, name = "l2")), name = "n1")
        c = layer_norm(b + sigmoid(dense(b, 8, name = "l3")), name = "n2")
        h = 0.5 * h + 0.5 * tanh(dense(c, 8, name = "l4"))
        yield h
    }
    return cross_entropy(dense(hs, 3), y)
}
"""


def test_a_scan_with_a_large_body_loops_in_python(tmp_path, monkeypatch):
    """A scan run from the Python step whose body calls more than `host_scan_kernels` kernels
    loops in Python, calling the body's kernels one by one (compiling the loop would link and
    optimize every one of them again); a small body stays one compiled loop. Both compute the
    same numbers, forward and backward."""
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path))
    g, _ = train_graph(DEEP_CELL)
    source, meta = generate(g, plan_memory(g), CpuTarget(), compiled_step=False)
    bodies = re.findall(r"^# ---- (scan\d+)_body: .*\n(.*)\n", source, re.M)
    assert len(bodies) == 2 and all(line == "# (host Python)" for _, line in bodies)   # forward, backward
    assert not any(name.startswith("scan") for name, _ in meta["calls"])     # nothing for Numba to compile
    gru, _ = train_graph(GRU_TAGGER)
    small, _ = generate(gru, plan_memory(gru), CpuTarget(), compiled_step=False)
    assert "# (host Python)" not in small
    assert re.search(r"^@njit\(.*\)\ndef scan0_body\(", small, re.M)

    class Compiled(CpuTarget):
        host_scan_kernels = None
    from compiler.codegen import TARGETS
    monkeypatch.setitem(TARGETS, "cpu_compiled_scans", Compiled)
    Compiled.name = "cpu_compiled_scans"
    hosted, compiled = build(g.copy()), build(g.copy(), target="cpu_compiled_scans")
    assert "# (host Python)" in hosted.source and "# (host Python)" not in compiled.source
    args = _feeds(hosted, np.random.default_rng(0))
    compile_programs([(hosted, args), (compiled, args)])
    a1 = [x.copy() if isinstance(x, np.ndarray) else x for x in args]
    a2 = [x.copy() if isinstance(x, np.ndarray) else x for x in args]
    out1, out2 = hosted(*a1), compiled(*a2)
    assert len(out1) == len(out2)
    for u, v in zip(out1, out2):
        np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-13)
    for u, v in zip(a1, a2):                     # the state updates (parameters, Adam's moments)
        if isinstance(u, np.ndarray):
            np.testing.assert_allclose(u, v, rtol=1e-12, atol=1e-13)


def test_the_cache_forgets_what_no_run_used_for_a_month(tmp_path, monkeypatch):
    import os
    import time

    from compiler import cache
    monkeypatch.setenv("DLC_CACHE_DIR", str(tmp_path))
    old = cache.load("VALUE = 1\n", "cpu")
    kept = cache.load("VALUE = 2\n", "cpu")
    d = cache.cache_dir()
    (d / "__pycache__").mkdir(exist_ok=True)
    (d / "__pycache__" / f"{old.__name__}.f-1.py311.nbi").write_text("")     # Numba's files for it
    cache.store_object("k" * 32, {"graph": 1})
    now = time.time() + 40 * 86400
    os.utime(d / cache.USED / kept.__name__, (now, now))                       # used again on day 40
    assert cache.prune(now=now) == 4        # the old module, its marker, Numba's index, the graph
    assert not (d / f"{old.__name__}.py").exists() and not list((d / "__pycache__").iterdir())
    assert (d / f"{kept.__name__}.py").exists() and cache.load_object("k" * 32) is None
    assert cache.prune(now=now + 3600) == 0     # once a day


# The CPU's matrix-product driver is compiled on its own and called through an address cell
# (compiler/codegen/cells.py); `driver.prepare` compiles the common helpers in a forked process
# beside the front end. In a fresh process with an empty cache: the prepared module loads (the
# child compiled it), a kernel calling `_gemm` before the driver is ready gets an error (not a
# crash), and the ready job loads the child's driver instead of compiling it again.
HELPERS = r"""
import sys
import numpy as np
from numba import njit
from compiler import cache, driver
from compiler.codegen import CpuTarget, helper_module
from compiler.codegen.cpu import GEMM_F32

import multiprocessing
import os
name, src = helper_module(CpuTarget(), GEMM_F32)
held = cache.lock(name), cache.lock(name + driver.READY_LOCK)      # as if another run were compiling it
driver.prepare("cpu", "f32")
assert not multiprocessing.active_children()          # left to that run: nothing forked
for fd in held:
    os.close(fd)
driver.prepare("cpu", "f32")
assert len(multiprocessing.active_children()) == 1
mod = cache.load(src, "cpu", name, wait=True)
assert not mod._gemm.stats.cache_misses, mod._gemm.stats.cache_misses      # loaded: the child compiled it
assert mod._gemm.stats.cache_hits

@njit
def product(a, b, out):
    mod._gemm(a, b, out)

a, b = np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((3, 4), np.float32)
out = np.zeros((2, 4), np.float32)
try:
    product(a, b, out)
    raise SystemExit("a product ran before its driver was loaded")
except RuntimeError as e:
    assert "not loaded" in str(e), e
job = driver.ReadyJob.of(mod)
job.compile(driver.READY)
assert not job.stats.cache_misses            # the child's driver, from the disk cache
product(a, b, out)
np.testing.assert_array_equal(out, a @ b)
print("ok")
"""


def test_prepared_helpers_load_and_the_driver_is_called_through_its_cell(tmp_path):
    env = {**os.environ, "DLC_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": str(ROOT),
           "DLC_COMPILE_WORKERS": "1"}
    r = subprocess.run([sys.executable, "-c", HELPERS], capture_output=True, text=True, cwd=ROOT, env=env,
                       timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-3000:]
