"""The CPU target's matrix products (compiler/codegen/cpu.py `GEMM`): SciPy's ?gemm on blocks of
the output, on one thread or split over Numba's pool, for every operand layout the kernels pass."""
import importlib.util
import sys

import numba
import numpy as np
import pytest
from numba import njit

from compiler.codegen.cpu import GEMM, CpuTarget


@pytest.fixture(scope="module")
def H(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemm") / "dlc_gemm_under_test.py"
    path.write_text("import math\nimport numpy as np\n" + CpuTarget.prelude + "\n" + GEMM)
    spec = importlib.util.spec_from_file_location("dlc_gemm_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    mod._dlc_ready()             # the parallel driver, compiled on its own (cells.py)
    # as a Session runs them (runtime/threads.py): BLAS on one thread, the pool splits
    from threadpoolctl import threadpool_limits
    with threadpool_limits(1, user_api="blas"):
        yield mod


@pytest.fixture(scope="module")
def calls(H):
    g, bgemm = H._gemm, H._bgemm

    @njit
    def nn(a, b, o):
        g(a, b, o)

    @njit
    def tn(a, b, o):
        g(a.T, b, o)

    @njit
    def nt(a, b, o):
        g(a, b.T, o)

    @njit
    def tt(a, b, o):
        g(a.T, b.T, o)

    @njit
    def batched(a, b, o, ta, tb):
        bgemm(a, b, o, ta, tb)
    return {"nn": nn, "tn": tn, "nt": nt, "tt": tt, "batched": batched}


# shapes: tiny, one BLAS small-matrix block, cut into small blocks (32x128x512: 4 blocks), split
# over threads (1024 rows), a large one, an empty inner dimension, odd sizes, tiles that also
# chunk K (64x1024x64: 16-column blocks in 2 chunks; 64x1000x250, odd chunks), a product too
# large to tile (over 32e6)
SHAPES = [(3, 4, 5), (32, 128, 128), (32, 128, 512), (96, 40, 300), (1024, 64, 96), (5, 0, 3), (1, 7, 1),
          (64, 1024, 64), (64, 1000, 250), (24, 3001, 40), (256, 1024, 160)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("threads", [1, 2])
def test_products_match_numpy_in_every_layout(calls, dtype, threads):
    rng = np.random.default_rng(0)
    before = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        for M, K, N in SHAPES:
            a, b = rng.normal(size=(M, K)).astype(dtype), rng.normal(size=(K, N)).astype(dtype)
            ref = a.astype(np.float64) @ b.astype(np.float64)
            tol = (2e-6 if dtype == np.float32 else 1e-13) * max(K, 1) ** 0.5 * 4
            A = {"n": a, "t": np.ascontiguousarray(a.T)}
            B = {"n": b, "t": np.ascontiguousarray(b.T)}
            for lay, f in calls.items():
                if lay == "batched":
                    continue
                out = np.full((M, N), np.nan, dtype)
                f(A[lay[0]], B[lay[1]], out)
                assert out.dtype == dtype
                np.testing.assert_allclose(out, ref, rtol=tol, atol=tol, err_msg=f"{lay} {M}x{K}x{N}")
            # a batch of 5: o[i] = op(a[i]) @ op(b[i])
            a3, b3 = rng.normal(size=(5, M, K)).astype(dtype), rng.normal(size=(5, K, N)).astype(dtype)
            r3 = np.matmul(a3.astype(np.float64), b3.astype(np.float64))
            for ta in (False, True):
                for tb in (False, True):
                    o3 = np.full((5, M, N), np.nan, dtype)
                    calls["batched"](np.ascontiguousarray(a3.transpose(0, 2, 1)) if ta else a3,
                                     np.ascontiguousarray(b3.transpose(0, 2, 1)) if tb else b3, o3, ta, tb)
                    np.testing.assert_allclose(o3, r3, rtol=tol, atol=tol, err_msg=f"batched {ta} {tb} {M}x{K}x{N}")
    finally:
        numba.set_num_threads(before)


def test_row_views_with_a_leading_dimension(calls):
    # a time step's slice of a sequence: rows of a larger array (leading dimension > columns)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 6, 33)).astype(np.float32)
    w = rng.normal(size=(33, 200)).astype(np.float32)
    out = np.empty((40, 200), np.float32)
    calls["nn"](x[:, 2, :], w, out)
    np.testing.assert_allclose(out, x[:, 2, :].astype(np.float64) @ w, rtol=1e-5, atol=1e-4)
    # K long enough to be chunked: each chunk starts inside a row of the strided operands
    x = rng.normal(size=(64, 3, 1100)).astype(np.float32)
    y = rng.normal(size=(1100, 3, 64)).astype(np.float32)
    out = np.empty((64, 64), np.float32)
    calls["nn"](x[:, 1, :], y[:, 2, :], out)
    np.testing.assert_allclose(out, x[:, 1, :].astype(np.float64) @ y[:, 2, :], rtol=1e-5, atol=2e-4)
    calls["tn"](np.ascontiguousarray(x[:, 1, :].T), y[:, 2, :], out)
    np.testing.assert_allclose(out, x[:, 1, :].astype(np.float64) @ y[:, 2, :], rtol=1e-5, atol=2e-4)


def test_pool_threads_flush_subnormals_like_the_step_thread(H):
    # subnormal operands: with flush-to-zero and denormals-are-zero on the step's thread (the
    # step sets them, fpmode.py), a product split over the pool gives what one thread gives;
    # before the pool's threads set the mode too, their blocks kept the subnormals (and ran
    # 100x slower)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one thread")
    from compiler.codegen.fpmode import flush_subnormals, restore_mode

    @njit
    def run(a, b, out):
        m = flush_subnormals()
        H._gemm(a, b, out)
        restore_mode(m)
    before = numba.get_num_threads()
    try:
        for M, K, N in [(32, 128, 512), (1024, 64, 256)]:
            assert 2.0 * M * N * K >= H.GEMM_SPLIT_FLOPS
            a, b = np.full((M, K), 1e-39, np.float32), np.ones((K, N), np.float32)
            outs = []
            for threads in (1, 2):
                numba.set_num_threads(threads)
                out = np.full((M, N), np.nan, np.float32)
                run(a, b, out)
                outs.append(out)
            np.testing.assert_array_equal(outs[0], outs[1])
            assert np.count_nonzero(outs[0]) < M * N            # flushed (wholly or in part: BLAS's choice)
    finally:
        numba.set_num_threads(before)
