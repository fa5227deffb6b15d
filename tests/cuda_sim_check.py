"""The CUDA target in numba's simulator, run by tests/test_cuda.py in a subprocess with
NUMBA_ENABLE_CUDASIM=1 (it must be set before numba.cuda is imported, and must not leak into
other tests). `python -m tests.cuda_sim_check CASE` exits 0 when every check holds.

Cases:
  ops    every program of tests/test_ops.py (every primitive, forward and gradient, a scan
         included) on the CUDA target against `ops.evaluate` (the NumPy references) in float64;
         the CNN (dropout included) in float32 too: the masks must be the CPU's, bit for bit.
  train  a few training steps of a small MLP and a small CNN (batch norm, dropout, Adam) on the
         CUDA target against the CPU target: losses, outputs and every parameter.
  examples  examples/mlp.dl and examples/cnn.dl at full width: a training step and the
         evaluation program, CUDA against CPU.
"""
from __future__ import annotations

import sys
import threading

import numpy as np


def _patch_simulator():
    """numba-cuda's simulator creates a block's shared array on first use without a lock:
    two threads can each make their own (a race, not a kernel bug). Make it atomic."""
    import traceback
    from numba.cuda.simulator import kernelapi
    lock = threading.Lock()

    def array(self, shape, dtype, alignment=None):
        with lock:
            caller = traceback.extract_stack(sys._getframe())[-2][0:2]
            if caller not in self._allocations:
                self._allocations[caller] = np.empty(shape, dtype)
            return self._allocations[caller]
    kernelapi.FakeCUDAShared.array = array
    sys.setswitchinterval(1e-5)           # simulated barriers wait on Python threads


def check_ops() -> None:
    from compiler.driver import build
    from tests.test_ops import PROGRAMS, compiled, reference
    runs = [(p, m, "f64") for p in PROGRAMS for m in ("fwd", "grad") if m == "grad" or PROGRAMS[p][1]]
    runs += [("cnn", "fwd", "f32"), ("elementwise", "grad", "f32")]
    for prog, mode, dt in runs:
        f = compiled(prog, mode, dt)
        data = PROGRAMS[prog][3](np.float64 if dt == "f64" else np.float32)
        f.ex = build(f.graph.copy(), "cuda")
        assert f.ex.target.name == "cuda"
        got, want = f(**data), reference(f, data)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (prog, mode, k)
            tol = 1e-12 if dt == "f64" else 2e-5
            scale = max(1.0, float(np.max(np.abs(want[k]))))
            np.testing.assert_allclose(got[k], want[k], rtol=tol, atol=tol * scale, err_msg=f"{prog} {mode} {dt} {k}")
        print(f"ok {prog} {mode} {dt}", flush=True)


TINY_MLP = """
model mlp(x: f32[B, 64]) -> f32[B, 10] {
    h = relu(dense(x, 8))
    h = dropout(relu(dense(h, 8)), 0.25)
    return dense(h, 10)
}
train mlp on digits(test = 0.2) {
    loss = cross_entropy(mlp(x), y)
    optimizer = adam(lr = 1e-2, weight_decay = 1e-4)
    batch = 8
    metrics = [accuracy, loss]
}
"""

TINY_CNN = """
model cnn(x: f32[B, 1, 8, 8]) -> f32[B, 10] {
    h = relu(batch_norm(conv2d(x, 3, kernel = 3, padding = 1)))
    h = max_pool2d(h, 2)
    h = avg_pool2d(relu(conv2d(h, 4, kernel = 3, padding = 1)), 2)
    return dense(dropout(flatten(h), 0.2), 10)
}
train cnn on digits(test = 0.2, shape = [1, 8, 8]) {
    loss = cross_entropy(cnn(x), y)
    optimizer = sgd(lr = 0.05, momentum = 0.9)
    batch = 4
}
"""


def check_train(tmp: str) -> None:
    from pathlib import Path

    from runtime.session import Options, Session
    for name, src, steps in (("mlp", TINY_MLP, 3), ("cnn", TINY_CNN, 2)):
        path = Path(tmp) / f"tiny_{name}.dl"
        path.write_text(src)
        cu = Session(path, Options(target="cuda", epochs=1))
        cpu = Session(path, Options(target="cpu", epochs=1))
        assert cu.target == "cuda" and cpu.target == "cpu"
        b = int(cu.settings["batch"])
        for i in range(steps):
            batch = {k: np.ascontiguousarray(v[i * b:(i + 1) * b]) for k, v in cu.dataset.train.items()}
            l_cu, o_cu = cu.train_step(batch)
            l_cpu, o_cpu = cpu.train_step(batch)
            np.testing.assert_allclose(l_cu, l_cpu, rtol=1e-5, err_msg=f"{name} step {i}")
            np.testing.assert_allclose(o_cu, o_cpu, rtol=1e-4, atol=1e-5, err_msg=f"{name} step {i}")
        for k in cpu.params:
            np.testing.assert_allclose(cu.params[k], cpu.params[k], rtol=1e-4, atol=1e-6, err_msg=f"{name} {k}")
        for k in cpu.state:
            np.testing.assert_allclose(cu.state[k], cpu.state[k], rtol=1e-4, atol=1e-6, err_msg=f"{name} {k}")
        # a checkpoint saved from the device is the CPU's: load it into the CPU session
        ck = str(Path(tmp) / f"{name}.npz")
        cu.save(ck)
        cpu.load(ck)
        for k in cpu.params:
            np.testing.assert_array_equal(cpu.params[k], cu.params[k])
        print(f"ok train {name}", flush=True)


def check_examples() -> None:
    """examples/mlp.dl and examples/cnn.dl as written (full width, their batch sizes): one
    training step and the evaluation program on a few held-out examples, CUDA against CPU.
    (A simulated step takes about a minute: the simulator interprets every thread in Python.)"""
    from pathlib import Path

    from runtime.session import Options, Session
    root = Path(__file__).resolve().parent.parent
    for name in ("mlp", "cnn"):
        path = root / "examples" / f"{name}.dl"
        cu = Session(path, Options(target="cuda", epochs=1))
        cpu = Session(path, Options(target="cpu", epochs=1))
        # the evaluation program first, on the same initial parameters (after a step, the conv
        # biases below differ by rounding noise, and batch norm's running mean carries it)
        held = {k: np.ascontiguousarray(v[:8]) for k, v in cu.dataset.test.items()}
        e_cu, e_cpu = cu.run_eval(held), cpu.run_eval(held)
        np.testing.assert_allclose(e_cu["output"], e_cpu["output"], rtol=1e-4, atol=1e-5, err_msg=name)
        np.testing.assert_allclose(e_cu["loss"], e_cpu["loss"], rtol=1e-5, err_msg=name)
        b = int(cu.settings["batch"])
        batch = {k: np.ascontiguousarray(v[:b]) for k, v in cu.dataset.train.items()}
        l_cu, o_cu = cu.train_step(batch)
        l_cpu, o_cpu = cpu.train_step(batch)
        np.testing.assert_allclose(l_cu, l_cpu, rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(o_cu, o_cpu, rtol=1e-4, atol=1e-5, err_msg=name)
        for k in cpu.params:
            # a convolution's bias before batch norm has a zero gradient (the norm takes the
            # channel's mean out): both targets' are rounding noise, which Adam scales to +-lr
            if not (name == "cnn" and k.startswith("cnn/conv2d_") and k.endswith("/b")):
                np.testing.assert_allclose(cu.params[k], cpu.params[k], rtol=1e-4, atol=1e-6, err_msg=f"{name} {k}")
        for k in cpu.state:                 # Adam's moments, batch norm's running statistics
            if not (name == "cnn" and "cnn/conv2d_" in k and k.endswith("/b")):
                np.testing.assert_allclose(cu.state[k], cpu.state[k], rtol=1e-4, atol=1e-6, err_msg=f"{name} {k}")
        print(f"ok example {name}: loss {l_cu:.6f} (cpu {l_cpu:.6f})", flush=True)


if __name__ == "__main__":
    _patch_simulator()
    case = sys.argv[1]
    if case == "ops":
        check_ops()
    elif case == "train":
        check_train(sys.argv[2])
    elif case == "examples":
        check_examples()
    else:
        raise SystemExit(f"unknown case {case}")
