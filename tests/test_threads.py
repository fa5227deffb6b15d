"""runtime/threads.py: the GEMM work it counts and the owner of the cores it picks."""
import numpy as np
import pytest

from compiler.api import lower_function
from compiler.driver import optimize
from compiler.passes import Context
from runtime import threads

MLP = """
model net(x: f32[B, 16]) -> f32[] {
    param W1: [16, 32] = zeros
    param W2: [32, 8] = zeros
    return sum(relu(x @ W1) @ W2)
}
"""

SEQ = """
model reader(x: f32[B, 5, 3]) -> f32[B, 4] {
    return lstm(x, 4, returns = "last")
}
"""

CONV = """
model convnet(x: f32[B, 2, 9, 9]) -> f32[B, 4, 7, 7] {
    return conv2d(x, 4, 3)
}
"""


def grad_graph(src):
    lw, prog = lower_function(src, dtype="f32")
    g = prog.graph
    g.outputs["loss"] = g.outputs.pop("output")
    wrt = {k: v.node for k, v in prog.params.items()}
    return optimize(g, "grad", Context(params=wrt, expose_grads=True), True), prog


def forward_graph(src):
    lw, prog = lower_function(src, dtype="f32")
    return optimize(prog.graph, "eval", Context(), True)


def total(work):
    return sum(f * c for f, c in work)


def test_mlp_gemm_work_forward_and_backward():
    B = 7
    fwd = total(threads.gemms(forward_graph(MLP), {"B": B}))
    assert fwd == 2 * B * (16 * 32 + 32 * 8)
    g, _ = grad_graph(MLP)
    # backward: both weight gradients, and the hidden layer's input gradient (x is data)
    assert total(threads.gemms(g, {"B": B})) == fwd + 2 * B * (16 * 32 + 32 * 8) + 2 * B * 32 * 8


def test_scan_body_counted_per_step():
    B, T, I, H = 6, 5, 3, 4
    work = threads.gemms(forward_graph(SEQ), {"B": B})
    # per step h @ Wh: [B, H] x [H, 4H], T times; x @ Wx: once over all steps or per step
    assert total(work) == pytest.approx(2 * B * T * (I + H) * 4 * H)
    assert max(c for _, c in work) >= T


def test_convolution_one_gemm_per_sample():
    B = 3
    work = threads.gemms(forward_graph(CONV), {"B": B})
    assert work == [(2.0 * 4 * (2 * 3 * 3) * (7 * 7), B)]


def test_plan_gives_the_free_cores_to_the_pool_and_one_thread_to_blas():
    g = forward_graph(MLP)
    p = threads.plan([g], {"B": 8}, cap=2, load=1.0)          # this process alone
    assert p.threads == min(2, threads.available_cores()) and p.blas_threads == 1
    assert p.gemm_flops == 2 * 8 * (16 * 32 + 32 * 8)
    assert threads.plan([g], {"B": 8}, cap=1, load=1.0).threads == 1
    assert threads.plan([g], {"B": 8}, cap=2, load=2.0).threads == 1    # another process on a core


def test_free_cores():
    assert threads.free_cores(2, 0.0) == 2 and threads.free_cores(2, 1.2) == 2
    assert threads.free_cores(2, 1.8) == 1 and threads.free_cores(2, 9.0) == 1 and threads.free_cores(8, 3.0) == 6


def test_using_restores_blas_and_pool_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    import numba
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    pool = numba.get_num_threads()
    with threads.using(threads.CorePlan(1, 2)):
        assert all(i["num_threads"] == 1 for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas")
        assert numba.get_num_threads() == 1
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"] == before
    assert numba.get_num_threads() == pool


def test_tuner_keeps_the_faster_pool_size(monkeypatch):
    # a fake clock: a step at 2 threads takes 3 ms, at 1 thread 5 ms (and the other way round)
    for fast, slow in ((2, 1), (1, 2)):
        pool = []
        monkeypatch.setattr(threads, "_set_pool", pool.append)
        now = [0.0]
        cost = {fast: 0.003, slow: 0.005}
        t = threads.Tuner(threads.CorePlan(2, 2), time=lambda: now[0])
        chosen = []
        last = [None]
        for step in range(t.WARM + t.PER * t.ROUNDS * 2 + 10):
            t.start()
            now[0] += cost[pool[-1]] if pool else 0.004
            if pool and pool[-1] != last[0] and pool[-1] == fast:
                now[0] += 0.1               # a switch's first step pays for the switch: not counted
            last[0] = pool[-1] if pool else None
            r = t.stop()
            if step == t.WARM + t.PER * t.ROUNDS * 2 - 2:      # one step before the decision
                assert sum(map(len, t.samples.values())) == (t.PER - 1) * t.ROUNDS * 2 - 1
            if r is not None:
                chosen.append((step, r))
        window = t.WARM + t.PER * t.ROUNDS * 2
        assert chosen == [(window - 1, fast)]
        assert t.measured == pytest.approx({fast: 3.0, slow: 5.0})
        assert pool[-1] == fast and pool.count(2) >= t.PER * t.ROUNDS


def test_tuner_idle_with_one_thread(monkeypatch):
    pool = []
    monkeypatch.setattr(threads, "_set_pool", pool.append)
    t = threads.Tuner(threads.CorePlan(1, 2))
    for _ in range(50):
        t.start()
        assert t.stop() is None
    assert pool == [] and t.chosen == 1
