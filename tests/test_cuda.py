"""The CUDA target without a GPU.

* The Target interface: both targets implement it; the CUDA source has no host allocation
  inside a kernel and its float32 kernels name no float64 type.
* PTX: every kernel of the examples compiled for a real GPU (sm_90) with
  `numba.cuda.compile_ptx` (needs the `cuda` extra's NVVM/NVRTC wheels, no GPU): a typing
  error fails, and so does any `.f64` instruction in a float32 program.
* The simulator (`NUMBA_ENABLE_CUDASIM=1`), in a subprocess so the variable does not leak
  into other tests: every primitive forward and backward against the NumPy references, a few
  training steps of an MLP and a CNN against the CPU target, and `dlc run --target cuda`.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compiler.codegen import TARGETS, CpuTarget, CudaTarget, Target

ROOT = Path(__file__).resolve().parent.parent
cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install .[cuda])")


def _ptx_works() -> str | None:
    """None when compile_ptx works here, else why not."""
    try:
        def k(y):
            y[0] = np.float32(1.0)
        cuda.compile_ptx(k, "(float32[::1],)", cc=(9, 0))
    except Exception as e:          # no NVVM: the wheels of the `cuda` extra are missing
        return f"numba.cuda.compile_ptx does not work here ({type(e).__name__}: {str(e)[:120]})"
    return None


PTX_MISSING = _ptx_works()


def test_targets_implement_the_interface():
    assert set(TARGETS) == {"cpu", "cuda"}
    for t in (CpuTarget(), CudaTarget(simulator=False)):
        assert isinstance(t, Target)
        assert t.loop_header("i", "n") == "for i in range(n):"
    assert CpuTarget.allow_compiled_step and not CudaTarget.allow_compiled_step
    assert "device_array" in CudaTarget.alloc("(3,)", "np.float32")
    # a view passed reshaped is typed with its view's rank
    assert CudaTarget.call_types([("array", "f32", 3), ("int",)], "flat:n;0=1=-1") == [("array", "f32", 1), ("int",)]


def _source(target: str, dtype: str = "f32") -> str:
    from compiler.api import lower_function
    from compiler.driver import build, optimize
    from compiler.passes import Context
    src = """
model m(x: f32[B, 6], W: f32[6, 5]) {
    return sum(softmax(tanh(x @ W) * 0.5), axis = 0) + mean(x)
}"""
    _, prog = lower_function(src, dtype=dtype)
    g = optimize(prog.graph, "eval", Context())
    return build(g, target).source


def test_cuda_source_launches_kernels_on_device_buffers():
    src = _source("cuda")
    assert "@cuda.jit" in src and "cuda.device_array(" in src
    assert "np.empty(" not in src and "np.full(" not in src      # nothing allocated on the host
    assert ".reshape(" not in "\n".join(l for l in src.splitlines() if l.startswith("        "))  # not in kernels
    assert "float64" not in src                                   # f32 program: typed literals
    assert "cuda.shared.array" in src                             # the reductions and softmax
    assert "math.tanh(" in src and "np.tanh(" not in src


def test_cpu_source_is_unchanged_by_the_interface():
    src = _source("cpu")
    assert "@njit" in src and "cuda" not in src


def test_cli_ir_source_for_cuda(capsys):
    from runtime.cli import main
    assert main(["ir", str(ROOT / "examples" / "mlp.dl"), "--stage", "source", "--target", "cuda"]) == 0
    out = capsys.readouterr().out
    assert "@cuda.jit" in out and "def step(" in out and "_dev(a0)" in out


# ---- PTX for a real GPU ---------------------------------------------------------------------------
# Each kernel takes about a second to compile: CI compiles the MLP's and the CNN's (and the
# op programs' in the simulator check); DLC_PTX_ALL=1 compiles every example.
PTX_DEFAULT = ("mlp", "cnn")
# libdevice's float32 sin/cos (math.sin/cos on a float32) reduce a huge argument (Payne-Hanek)
# and scale the 64-bit result by pi/2 * 2**-64 in one double multiply: cvt.rn.f64.s64,
# mul.f64 by this constant, cvt.rn.f32.f64. That is the library's, not a float64 leak.
LIBDEVICE_TRIG = "0d3BF921FB54442D19"


def float64_instructions(ptx: str) -> list[str]:
    """The `.f64` instructions of a kernel's PTX, less libdevice's sin/cos reductions."""
    lines = [x.strip() for x in ptx.splitlines() if ".f64" in x and not x.strip().startswith(".reg")]
    n = sum(LIBDEVICE_TRIG in x for x in lines)
    allowed = {"cvt.rn.f64.s64": n, "mul.f64": n, "cvt.rn.f32.f64": n}
    out = []
    for x in lines:
        op = x.split()[0]
        if allowed.get(op, 0) > 0 and (op != "mul.f64" or LIBDEVICE_TRIG in x):
            allowed[op] -= 1
        else:
            out.append(x)
    return out


def test_float64_instructions_filter():
    trig = ["cvt.rn.f64.s64 %fd1, %rd93;", f"mul.f64 %fd2, %fd1, {LIBDEVICE_TRIG};", "cvt.rn.f32.f64 %f33, %fd2;"]
    assert float64_instructions("\n".join([".reg .f64 %fd<5>;"] + trig)) == []
    leak = ["cvt.rn.f64.f32 %fd3, %f1;", "add.f64 %fd4, %fd3, %fd3;", "cvt.rn.f32.f64 %f2, %fd4;"]
    assert float64_instructions("\n".join(trig + leak)) == leak
EXAMPLES = sorted(p.stem for p in (ROOT / "examples").glob("*.dl"))


@pytest.mark.slow
@pytest.mark.skipif(PTX_MISSING is not None, reason=PTX_MISSING or "")
@pytest.mark.parametrize("example", EXAMPLES)
def test_ptx_every_kernel(example, monkeypatch):
    if example not in PTX_DEFAULT and not os.environ.get("DLC_PTX_ALL"):
        pytest.skip("set DLC_PTX_ALL=1 to compile every example's kernels (about a second a kernel)")
    from runtime import device
    from runtime.session import Options, Session
    monkeypatch.setattr(device, "require_gpu", lambda: None)   # PTX needs no GPU; nothing is launched
    s = Session(ROOT / "examples" / f"{example}.dl", Options(target="cuda", batch=8))
    seen = set()
    for ex in s.train_exes + [s.eval_ex]:
        assert ex.target.name == "cuda"
        for fn, sig in ex.calls:
            if not hasattr(fn, "py_func") or (fn.py_func.__module__, sig) in seen:
                continue                     # a scan's host loop; a kernel compiled already
            seen.add((fn.py_func.__module__, sig))
            ptx, _ = cuda.compile_ptx(fn.py_func, sig, cc=(9, 0))
            f64 = float64_instructions(ptx)
            assert not f64, f"{fn.py_func.__module__}: float64 in a float32 kernel: {f64[:4]}"
    assert seen


# ---- the simulator, in a subprocess ---------------------------------------------------------------
def _sim(*args, timeout=900) -> str:
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r.stdout


@pytest.mark.slow
def test_simulator_every_primitive_and_gradient():
    out = _sim("-m", "tests.cuda_sim_check", "ops")
    assert "ok cnn fwd f32" in out and "ok scan grad f64" in out


@pytest.mark.slow
def test_simulator_training_steps_match_the_cpu(tmp_path):
    out = _sim("-m", "tests.cuda_sim_check", "train", str(tmp_path))
    assert "ok train mlp" in out and "ok train cnn" in out


@pytest.mark.slow
def test_simulator_the_mlp_and_cnn_examples_at_full_width():
    out = _sim("-m", "tests.cuda_sim_check", "examples")
    assert "ok example mlp" in out and "ok example cnn" in out


@pytest.mark.slow
def test_simulator_cli_run_target_cuda(tmp_path):
    """`dlc run --target cuda` end to end on a narrow MLP: parameters uploaded, the evaluation
    program on the device, a checkpoint saved from it. (The simulator runs a simulated barrier
    in milliseconds: the examples' full widths and epochs take hours there; the training steps
    are checked above, and the examples' kernels compile to PTX.)"""
    from tests.cuda_sim_check import TINY_MLP
    path = tmp_path / "tiny.dl"
    path.write_text(TINY_MLP.replace("test = 0.2", "test = 0.02"))
    out = _sim("-m", "runtime.cli", "run", str(path), "--target", "cuda", "--epochs", "0", "--json", "--quiet",
               "--save", str(tmp_path / "tiny.npz"))
    report = __import__("json").loads(out.splitlines()[-1])
    assert 0 <= report["test"]["accuracy"] <= 1 and np.isfinite(report["test"]["loss"])
    assert (tmp_path / "tiny.npz").exists()


def test_auto_target_follows_numba_cuda():
    from compiler.driver import resolve_target
    assert resolve_target("auto") == ("cuda" if cuda.is_available() else "cpu")
    assert resolve_target("cpu") == "cpu" and resolve_target("cuda") == "cuda"


class _FakeDevice:
    """A device array stand-in that counts transfers."""
    moves = 0

    def __init__(self, a):
        self.a, self.shape = a.copy(), a.shape
        _FakeDevice.moves += 1

    def copy_to_host(self, out):
        out[...] = self.a
        _FakeDevice.moves += 1

    def copy_to_device(self, a):
        self.a[...] = a
        _FakeDevice.moves += 1


class _FakeTarget:
    name = "fake"
    to_device = staticmethod(_FakeDevice)


def test_device_arrays_move_only_when_the_other_side_asks():
    from runtime.device import DeviceArrays
    _FakeDevice.moves = 0
    p = DeviceArrays({"w": np.zeros(3)}, _FakeTarget())
    d = p.device("w")                         # uploaded once
    assert p.device("w") is d and _FakeDevice.moves == 1
    d.a += 1.0                                 # a step writes it on the device
    p.written()
    assert p.device("w") is d and _FakeDevice.moves == 1      # steps in a row: no transfer
    np.testing.assert_array_equal(p["w"], [1, 1, 1])           # the host asks: downloaded once
    assert _FakeDevice.moves == 2
    p["w"][...] = 5.0                          # the host writes (a checkpoint loaded)
    assert p.device("w") is d and _FakeDevice.moves == 3       # uploaded into the same buffer
    np.testing.assert_array_equal(d.a, [5, 5, 5])
    assert list(p) == ["w"] and len(p) == 1


@pytest.mark.skipif(cuda.is_available(), reason="a GPU is here")
def test_target_cuda_without_a_gpu_is_one_error(capsys):
    from runtime.cli import main
    assert main(["run", str(ROOT / "examples" / "mlp.dl"), "--target", "cuda", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA GPU" in err and "Traceback" not in err
