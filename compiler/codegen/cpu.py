"""The CPU target: serial `@njit` kernels, BLAS matmuls, one compiled step function.

The kernels are serial; the matrix products (`GEMM` below) are split over Numba's thread pool,
each block a single-threaded BLAS call, so that one owner uses the cores (numba-notes:
`parallel=True` beside threaded BLAS made a step 100x slower; runtime/threads.py keeps BLAS on
one thread). fastmath flags keep NaN checks (no `nnan`/`ninf`).
"""
from ..ops import OPS
from .target import Target

FASTMATH = "{'nsz', 'arcp', 'contract', 'afn', 'reassoc'}"


# The float32 helpers below are called, not inlined by Numba (`inline='always'` re-typed and
# re-lowered each in every kernel: about 0.1 s of a kernel's compile). LLVM inlines the small
# callee when it optimizes the kernel's module, and the loop still vectorizes: LSTM and GPT
# steps took the same time either way (bench/README.md).
#
# Eigen's float32 tanh: an odd rational function of degree 13/6, exact to float32 rounding
# beyond |x| = 7.9 where tanh is +-1. NaN passes through (both comparisons are false).
FAST_TANH = """\
@njit(cache=True, fastmath=FASTMATH, error_model='numpy')
def _tanh_f32(x):
    if x > np.float32(7.90531110763549805):
        x = np.float32(7.90531110763549805)
    elif x < np.float32(-7.90531110763549805):
        x = np.float32(-7.90531110763549805)
    x2 = x * x
    p = x2 * np.float32(-2.76076847742355e-16) + np.float32(2.00018790482477e-13)
    p = p * x2 + np.float32(-8.60467152213735e-11)
    p = p * x2 + np.float32(5.12229709037114e-08)
    p = p * x2 + np.float32(1.48572235717979e-05)
    p = p * x2 + np.float32(6.37261928875436e-04)
    p = p * x2 + np.float32(4.89352455891786e-03)
    q = x2 * np.float32(1.19825839466702e-06) + np.float32(1.18534705686654e-04)
    q = q * x2 + np.float32(2.26843463243900e-03)
    q = q * x2 + np.float32(4.89352518554385e-03)
    return x * p / q
"""

# `dst[...] = src` for two C-contiguous arrays of one size (scan carries, body outputs)
COPY = """\
@njit(cache=True, fastmath=FASTMATH, error_model='numpy')
def _copy(dst, src):
    d = dst.reshape(-1)
    s = src.reshape(-1)
    for i in range(d.size):
        d[i] = s[i]
"""


# float32 exp: Cody-Waite reduction x = n ln2 + r (|r| <= ln2 / 2), Cephes' degree-7 polynomial
# for exp(r), and 2^n built from its exponent bits (two factors, so that n down to -150 gives
# subnormals; n = 128 is folded into the polynomial's value). Max relative error 3.0e-7 (2.5
# ulp) against float64 over [-104, 89]; +-inf, overflow (inf), underflow (0) and NaN are exact.
# libm's scalar expf stops vectorization: this is 7x faster in a loop (0.7 vs 4.7 ns a value).
FAST_EXP = """\
from numba.core import types as _nbtypes
from numba.core.extending import intrinsic as _intrinsic


@_intrinsic
def _f32_from_bits(typingctx, i):
    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(_nbtypes.float32))
    return _nbtypes.float32(_nbtypes.int32), codegen


@njit(cache=True, fastmath=FASTMATH, error_model='numpy')
def _exp_f32(x):
    z = x
    if z > np.float32(89.0):
        z = np.float32(89.0)
    elif z < np.float32(-104.0):
        z = np.float32(-104.0)
    n = np.floor(z * np.float32(1.44269504088896341) + np.float32(0.5))
    r = z - n * np.float32(0.693359375)
    r = r - n * np.float32(-2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    y = p * r * r + r + np.float32(1.0)
    k = np.int32(n)
    if k > np.int32(127):
        y = y * np.float32(2.0)
        k = np.int32(127)
    h = k >> 1
    y = y * _f32_from_bits((h + np.int32(127)) << 23) * _f32_from_bits((k - h + np.int32(127)) << 23)
    return y if x == x else x
"""

# Eigen's float32 erf: an odd rational function of degree 13/8 on [-4, 4], +-1 beyond, clamped
# to [-1, 1]. Max absolute error 3.3e-7 against float64; NaN passes through. Exact GELU's erf
# was a scalar libm call per value (math.erf: 20 ns); this vectorizes (0.7 ns).
FAST_ERF = """\
@njit(cache=True, fastmath=FASTMATH, error_model='numpy')
def _erf_f32(x):
    if x > np.float32(4.0):
        x = np.float32(4.0)
    elif x < np.float32(-4.0):
        x = np.float32(-4.0)
    x2 = x * x
    p = x2 * np.float32(-2.72614225801306e-10) + np.float32(2.77068142495902e-08)
    p = p * x2 + np.float32(-2.10102402082508e-06)
    p = p * x2 + np.float32(-5.69250639462346e-05)
    p = p * x2 + np.float32(-7.34990630326855e-04)
    p = p * x2 + np.float32(-2.95459980854025e-03)
    p = p * x2 + np.float32(-1.60960333262415e-02)
    q = x2 * np.float32(-1.45660718464996e-05) + np.float32(-2.13374055278905e-04)
    q = q * x2 + np.float32(-1.68282697438203e-03)
    q = q * x2 + np.float32(-7.37332916720468e-03)
    q = q * x2 + np.float32(-1.42647390514189e-02)
    y = x * p / q
    if y > np.float32(1.0):             # (it overshoots by an ulp near +-4)
        y = np.float32(1.0)
    elif y < np.float32(-1.0):
        y = np.float32(-1.0)
    return y
"""


# `a ** b` outside the kernels' fastmath: with `afn`, LLVM rewrites pow(x, float(int)) into
# powi, whose runtime helper (__powisf2/__powidf2) Numba's JIT does not link: the process
# dies (SIGSEGV or "Symbol not found"). An ordinary (not Numba-inlined) call keeps this pow
# instruction's own flags when LLVM inlines it.
POW = """\
@njit(cache=True, fastmath={'nsz', 'arcp', 'contract', 'reassoc'}, error_model='numpy')
def _pow(a, b):
    return a ** b
"""


# Matrix products: SciPy's BLAS ?gemm (through `numba_xxgemm`, the helper Numba's own np.dot
# calls) on one BLAS thread, and dlc's own split of the product over Numba's thread pool. BLAS's
# threads pay only on large products (OpenBLAS's wake-up and join cost more than a 32x128 @
# 128x512 product, and they fight Numba's pool for the cores); one block of the output's columns
# (or rows) per thread, each a single-threaded ?gemm, made such a product 1.6-1.9x faster on 2
# cores, and 1024x64 @ 64x256 1.9x (bench/README.md). A batch of products is split by batch.
# OpenBLAS multiplies products of M*N*K <= 1e6 without packing, faster: on one thread 32x128 @
# 128x512 took 58 us whole and 37 us as four 128-column blocks. So a product of up to 32e6 is
# cut into such tiles, on any number of threads: blocks of the output's columns (rows), each
# in chunks of K accumulated in place (beta = 1) where the blocks alone stay too large. A tile
# just over 1e6 takes the packing path on a thin block, slower than the whole product: the
# weight gradient 64x1024 @ 1024x64 took 113 us whole, 168 as four 16-column blocks, 73 as
# 16-column blocks in two chunks of K; 64x1024 @ 1024x256 400 -> 292 (bench/README.md).
#
# `_gemm`/`_bgemm` (called by the kernels) reduce their operands to pointers, leading
# dimensions and 'n'/'t' flags; `_gemm_run`, the one parallel function, takes only integers, so
# it has one signature whatever the operands' layouts: a parallel function costs 1-1.6 s to
# compile. It is a C callback compiled on its own (`_dlc_ready`, a compile job beside the
# kernels, or `driver.prepare` beside the front end), and the kernels call it through an address
# cell (cells.py): linked into each kernel, it had cost every kernel with a product about 0.1 s
# of LLVM work, and kept them all waiting for it. One module per dtype (GEMM_F32, GEMM_F64).
# A product under GEMM_SPLIT_FLOPS runs on the calling thread. Numba's helper looks SciPy's
# ?gemm up under the GIL on its first call, so `_dlc_ready` calls it once from its own thread
# (a pool thread would wait for the GIL the caller holds).
GEMM = """\
import numba as _numba
from numba import prange as _prange
from numba.core import cgutils as _cgutils, types as _nbtypes
from numba.core.extending import intrinsic as _intrinsic
from numba.np.linalg import ensure_blas as _ensure_blas
from llvmlite import ir as _llir
from compiler.codegen.cells import address_cell as _address_cell, keep as _keep, load_cell as _load_cell
from compiler.codegen.fpmode import flush_subnormals, restore_mode

GEMM_SPLIT_FLOPS = 2 ** 21       # below this a product stays on one thread (about 20 us of work)
GEMM_MIN_TILE = 16               # the narrowest block
GEMM_SMALL = 1e6                 # M*N*K up to which OpenBLAS uses its small-matrix kernels (no packing)
GEMM_MIN_K = 32                  # the shortest chunk of K
GEMM_SMALL_BLOCKS = 32           # a product of up to 32x that is cut into such tiles
GEMM_SMALL_BLOCKS_AT = 128       # ... and of up to 128x where a is transposed (weight gradients
                                 # x.T @ dy; 67e6 ones 1.1-2.2x faster; others were slower or no faster)
GEMM_NT_MIN_K = 512              # ... where a @ b.T has at least this K (see `_gemm_run`)
_DTYPES = ("float32", "float64")  # the dtypes `_gemm` and `_bgemm` are compiled for


@_intrinsic
def _xxgemm(typingctx, kind, ta, tb, m, n, k, a, lda, b, ldb, c, ldc, acc):
    # numba_xxgemm(kind, transa, transb, m, n, k, &alpha, a, lda, b, ldb, &beta, c, ldc), column-major;
    # a, b, c: addresses; alpha = 1 and beta = 0 (c = ...), or 1 where acc != 0 (c += ...), of the
    # kind's type ('s': float32, 'd': float64)
    sig = _nbtypes.int32(kind, ta, tb, m, n, k, a, lda, b, ldb, c, ldc, acc)

    def codegen(context, builder, sig, args):
        i8, vp = _llir.IntType(8), _cgutils.voidptr_t
        ip = context.get_value_type(_nbtypes.intp)
        fnty = _llir.FunctionType(_llir.IntType(32), [i8, i8, i8, ip, ip, ip, vp, vp, ip, vp, ip, vp, vp, ip])
        fn = _cgutils.get_or_insert_function(builder.module, fnty, "numba_xxgemm")
        v = [context.cast(builder, x, t, _nbtypes.intp) for x, t in zip(args, sig.args)]
        f32, f64 = _llir.FloatType(), _llir.DoubleType()
        one_s, zero_s = _cgutils.alloca_once_value(builder, f32(1)), _cgutils.alloca_once_value(builder, f32(0))
        one_d, zero_d = _cgutils.alloca_once_value(builder, f64(1)), _cgutils.alloca_once_value(builder, f64(0))
        single = builder.icmp_signed("==", v[0], ip(115))
        alpha = builder.select(single, builder.bitcast(one_s, vp), builder.bitcast(one_d, vp))
        beta0 = builder.select(single, builder.bitcast(zero_s, vp), builder.bitcast(zero_d, vp))
        beta = builder.select(builder.icmp_signed("!=", v[12], ip(0)), alpha, beta0)
        ptr = lambda x: builder.inttoptr(x, vp)
        return builder.call(fn, [builder.trunc(v[0], i8), builder.trunc(v[1], i8), builder.trunc(v[2], i8),
                                 v[3], v[4], v[5], alpha, ptr(v[6]), v[7], ptr(v[8]), v[9], beta, ptr(v[10]), v[11]])
    return sig, codegen


@_intrinsic
def _pool_threads(typingctx):
    # numba.get_num_threads() reads a ctypes global, which keeps a function out of the disk
    # cache; this calls the threading layer's own symbol (registered when the pool starts)
    def codegen(context, builder, sig, args):
        fn = _cgutils.get_or_insert_function(builder.module, _llir.FunctionType(_cgutils.intp_t, []),
                                             "get_num_threads")
        return builder.call(fn, [])
    return _nbtypes.intp(), codegen


@njit(cache=True)
def _gemm_block(kind, fa, fb, M, N, K, pa, lda, pb, ldb, pc, ldc, item, lo, hi, by_cols, kch):
    # columns (or rows) lo:hi of out = op(a) @ op(b), in kch chunks of K accumulated;
    # out^T = op(b)^T op(a)^T in BLAS's terms
    if by_cols:
        pb += lo * item * (ldb if fb == 116 else 1)
        pc += lo * item
        m, n = hi - lo, M
    else:
        pa += lo * item * (1 if fa == 116 else lda)
        pc += lo * ldc * item
        m, n = N, hi - lo
    sa = item * (lda if fa == 116 else 1)      # one step along K in a, in b
    sb = item * (1 if fb == 116 else ldb)
    for j in range(kch):
        k0, k1 = K * j // kch, K * (j + 1) // kch
        _xxgemm(kind, fb, fa, m, n, k1 - k0, pb + k0 * sb, ldb, pa + k0 * sa, lda, pc, ldc, j)


@njit(cache=True)
def _gemm_items(c, nt, items, blocks, kch, L, by_cols, kind, fa, fb, M, N, K, pa, lda, pb, ldb, pc, ldc, item, sa, sb,
                sc):
    # the work items of share c of nt: whole products (blocks == 1) or column (row) blocks,
    # each in kch chunks of K
    for w in range(items * c // nt, items * (c + 1) // nt):
        i, j = w // blocks, w % blocks
        _gemm_block(kind, fa, fb, M, N, K, pa + i * sa, lda, pb + i * sb, ldb, pc + i * sc, ldc, item,
                    L * j // blocks, L * (j + 1) // blocks, by_cols, kch)


@njit(cache=True)
def _gemm_share(c, nt, items, blocks, kch, L, by_cols, kind, fa, fb, M, N, K, pa, lda, pb, ldb, pc, ldc, item, sa, sb,
                sc):
    # one pool thread's share, with subnormals flushed as on the step's thread (fpmode.py): the
    # pool's threads met subnormal activations at 100x the cost. (A call with the share's index
    # stays inside the parallel loop: Numba hoists argument-free calls out of it.)
    mode = flush_subnormals()
    _gemm_items(c, nt, items, blocks, kch, L, by_cols, kind, fa, fb, M, N, K, pa, lda, pb, ldb, pc, ldc, item,
                sa, sb, sc)
    restore_mode(mode)


# the parallel driver: a C callback compiled on its own (`_dlc_ready`), whose address the kernels
# read from a cell (cells.py): a kernel's compile neither links it nor waits for it
def _gemm_run(kind, fa, fb, M, N, K, pa, lda, pb, ldb, pc, ldc, item, nb, sa, sb, sc):
    # nb products, the i-th at byte offsets i * (sa, sb, sc), as work items: whole products, or
    # column (row) blocks of each: blocks that fit BLAS's small-matrix kernels, or one per thread
    if nb == 0 or M == 0 or N == 0:
        return
    nt = _pool_threads()
    by_cols = N >= M
    L = N if by_cols else M
    mnk = 1.0 * M * N * K
    blocks = 1
    kch = 1
    # (a @ b.T in tiles was slower than whole, up to 1.8x, unless K is long and the blocks are
    # the output's columns: OpenBLAS's small-matrix kernel for that layout is a slow one)
    slow_nt = fa == 110 and fb == 116 and (K < GEMM_NT_MIN_K or not by_cols)
    if mnk <= (GEMM_SMALL_BLOCKS_AT if fa == 116 else GEMM_SMALL_BLOCKS) * GEMM_SMALL and not slow_nt:
        while blocks * kch * GEMM_SMALL < mnk and L // (2 * blocks) >= GEMM_MIN_TILE:
            blocks *= 2
        while blocks * kch * GEMM_SMALL < mnk and K // (2 * kch) >= GEMM_MIN_K:
            kch *= 2
        if blocks * kch * GEMM_SMALL < mnk:
            blocks = kch = 1
    parallel = nt > 1 and 2.0 * nb * mnk >= GEMM_SPLIT_FLOPS
    if parallel and nb < nt:
        blocks = max(blocks, min(nt, L // GEMM_MIN_TILE))
    items = nb * blocks
    if not parallel:
        _gemm_items(0, 1, items, blocks, kch, L, by_cols, kind, fa, fb, M, N, K, pa, lda, pb, ldb, pc, ldc, item,
                    sa, sb, sc)
        return
    for c in _prange(nt):
        _gemm_share(np.int64(c), nt, items, blocks, kch, L, by_cols, kind, fa, fb, M, N, K, pa, lda, pb, ldb, pc, ldc,
                    item, sa, sb, sc)


_ONE, _ZERO = np.int64(1), np.int64(0)      # (a literal 1 or 0 would be a signature of its own)
_RUN_SIGNATURE = "void(" + ", ".join(["int64"] * 17) + ")"
_RUN_CELL = __name__ + "_gemm_run"          # the symbol of the cell holding `_gemm_run`'s address
_address_cell(_RUN_CELL)


@_intrinsic
def _gemm_run_at(typingctx, kind, fa, fb, M, N, K, pa, lda, pb, ldb, pc, ldc, item, nb, sa, sb, sc):
    # _gemm_run(...), called through its cell
    sig = _nbtypes.void(*[_nbtypes.int64] * 17)

    def codegen(context, builder, sig, args):
        i64 = _llir.IntType(64)
        fn = builder.inttoptr(_load_cell(builder, _RUN_CELL), _llir.FunctionType(_llir.VoidType(), [i64] * 17).as_pointer())
        builder.call(fn, list(args))
        return context.get_dummy_value()
    return sig, codegen


@_intrinsic
def _gemm_run_ready(typingctx):
    # is `_gemm_run`'s address in its cell?
    def codegen(context, builder, sig, args):
        return builder.icmp_signed("!=", _load_cell(builder, _RUN_CELL), _llir.IntType(64)(0))
    return _nbtypes.boolean(), codegen


@njit(cache=True, inline='always')
def _addr(x):
    # an int64 address: `_gemm_run` has one signature of int64s (uintp would compile it again)
    return np.int64(x.ctypes.data)


@njit(cache=True, inline='always')
def _blas_view(x):
    # (leading dimension, 'n' or 't') of a 2-D view that BLAS reads as it is, or (0, 0)
    item = x.itemsize
    if x.strides[1] == item or x.shape[1] <= 1:
        return max(x.strides[0] // item, x.shape[1], 1), 110
    if x.strides[0] == item or x.shape[0] <= 1:
        return max(x.strides[1] // item, x.shape[0], 1), 116
    return 0, 0


# `_gemm` and `_bgemm` are compiled when the module is first imported, before a run forks its
# compile workers (which then share them): one signature each per dtype, for any layout (C and
# F (.T) views convert to these 'A' signatures for free)
@njit(cache=True)
def _gemm(a, b, out):
    # out = a @ b; a and b are arrays or .T views of them (K = 0: BLAS writes zeros)
    lda, fa = _blas_view(a)
    ldb, fb = _blas_view(b)
    if fa == 0 or fb == 0 or out.strides[1] != out.itemsize:
        raise ValueError("dlc: a matrix product's operand is neither row-major nor transposed")
    if not _gemm_run_ready():
        raise RuntimeError("dlc: the matrix-product driver is not loaded (_dlc_ready)")
    _gemm_run_at(115 if out.itemsize == 4 else 100, fa, fb, a.shape[0], b.shape[1], a.shape[1], _addr(a), lda,
              _addr(b), ldb, _addr(out), max(out.strides[0] // out.itemsize, b.shape[1], 1), out.itemsize,
              _ONE, _ZERO, _ZERO, _ZERO)


@njit(cache=True)
def _bgemm(a3, b3, o3, ta, tb):
    # o3[i] = op(a3[i]) @ op(b3[i]) for C-contiguous 3-D arrays; op transposes where ta / tb
    # (ints, not bools: a literal True would be a signature of its own)
    nb, M, N = o3.shape
    if not _gemm_run_ready():
        raise RuntimeError("dlc: the matrix-product driver is not loaded (_dlc_ready)")
    _gemm_run_at(115 if o3.itemsize == 4 else 100, 116 if ta else 110, 116 if tb else 110, M, N,
              a3.shape[1] if ta else a3.shape[2], _addr(a3), max(a3.shape[2], 1), _addr(b3), max(b3.shape[2], 1),
              _addr(o3), max(N, 1), o3.itemsize, nb, a3.strides[0], b3.strides[0], o3.strides[0])


if _numba.config.DISABLE_JIT:               # kernels run as Python (tests): NumPy's products
    def _gemm(a, b, out):
        out[:, :] = np.dot(a, b)

    def _bgemm(a3, b3, o3, ta, tb):
        o3[:] = np.matmul(a3.transpose(0, 2, 1) if ta else a3, b3.transpose(0, 2, 1) if tb else b3)

    def _dlc_ready():
        return False
else:
    from numba.core.caching import FunctionCache
    from compiler.cache import compile_repairing, repairing

    def _eager(fn, sigs):
        # compile (or load) `sigs` now and no others: C arrays and .T views convert to 'A'
        for sig in sigs:
            compile_repairing(fn, sig)
        fn.disable_compile()

    _eager(_gemm, ["void(%s[:, :], %s[:, :], %s[:, :])" % ((t,) * 3) for t in _DTYPES])
    _eager(_bgemm, ["void(%s[:, :, ::1], %s[:, :, ::1], %s[:, :, ::1], int64, int64)" % ((t,) * 3) for t in _DTYPES])
    _ensure_blas()
    _numba.get_num_threads()                 # starts the pool: registers `get_num_threads`
    _gemm_c = None

    def _dlc_ready():
        # compile (or load from the disk cache) `_gemm_run` and put its address in its cell;
        # whether it was compiled here. The driver (runtime/compile jobs) calls this beside the
        # kernels' compile; an Executable before its first call.
        global _gemm_c
        if _gemm_c is not None:
            return False
        c = repairing(lambda: _numba.cfunc(_RUN_SIGNATURE, cache=True, parallel=True)(_gemm_run),
                      lambda: FunctionCache(_gemm_run).flush(), "_gemm_run")
        _keep(c)
        _address_cell(_RUN_CELL).value = c.address
        _gemm_c = c
        for _t in _DTYPES:                   # Numba finds ?gemm now, on this thread (see above)
            _x, _y = np.ones((1, 1), _t), np.empty((1, 1), _t)
            _gemm(_x, _x, _y)
        return c.cache_hits == 0
    _dlc_ready.compiles = _gemm_run          # (what it compiles: the compile jobs' cache key and cost)
"""

# one module per dtype: a float32 program does not wait for the float64 signatures (0.2-0.5 s)
assert GEMM.count('_DTYPES = ("float32", "float64")') == 1
GEMM_F32, GEMM_F64 = (GEMM.replace('_DTYPES = ("float32", "float64")', f'_DTYPES = ("{t}",)')
                      for t in ("float32", "float64"))


class CpuTarget(Target):
    rowwise_tails = True
    name = "cpu"
    prelude = f"from numba import njit\n\nFASTMATH = {FASTMATH}"
    # scan loops and bodies: inlined where they are called
    kernel_decorator = f"@njit(cache=True, inline='always', fastmath={FASTMATH}, error_model='numpy')"
    # a kernel module's `kernel` (called: each distinct kernel is compiled once) and `inlined`
    # (the same function, inlined into a compiled step)
    function_decorator = f"@njit(cache=True, fastmath={FASTMATH}, error_model='numpy')"
    inline_wrapper = f"njit(cache=True, inline='always', fastmath={FASTMATH}, error_model='numpy')"
    step_decorator = f"@njit(cache=True, fastmath={FASTMATH}, error_model='numpy')"
    # Overrides of the op registry's base templates, by op or by (op, dtype). Numba calls
    # libm's scalar tanh/exp, which stops LLVM from vectorizing a loop (there is no SVML here):
    # in float32, tanh and sigmoid use a rational approximation that vectorizes (max error
    # 3.3e-7, below float32's resolution near 1). float64 keeps the exact functions.
    scalar_templates: dict = {
        ("tanh", "f32"): "_tanh_f32({0})",
        ("sigmoid", "f32"): "(np.float32(0.5) + np.float32(0.5) * _tanh_f32(np.float32(0.5) * {0}))",
        ("exp", "f32"): "_exp_f32({0})",
        ("erf", "f32"): "_erf_f32({0})",
        ("pow", "f32"): "_pow({0}, {1})",
        ("pow", "f64"): "_pow({0}, {1})",
    }
    # the row-wise softmax kernels, in float32 with the vectorizing exp (and their own helpers)
    kernel_templates: dict = {(op.name, "f32"): op.kernel.replace("np.exp(", "_exp_f32(")
                              for op in (OPS["softmax"], OPS["log_softmax"])}
    helpers: dict = {("tanh", "f32"): FAST_TANH, ("sigmoid", "f32"): FAST_TANH, ("exp", "f32"): FAST_EXP,
                     ("erf", "f32"): FAST_ERF, ("pow", "f32"): POW, ("pow", "f64"): POW,
                     ("matmul", "f32"): GEMM_F32, ("matmul", "f64"): GEMM_F64,
                     **{(op.name, "f32"): (FAST_EXP, op.helpers) for op in (OPS["softmax"], OPS["log_softmax"])}}
    copy_helper = COPY
    common_helpers = {"f32": [GEMM_F32], "f64": [GEMM_F64]}
    # subnormals flushed to zero while a step runs (fpmode.py: a subnormal Adam moment made
    # LeNet's dense-layer update 4x slower)
    step_imports = "from compiler.codegen.fpmode import flush_subnormals, restore_mode"
    step_enter = "_fpmode = flush_subnormals()"
    step_exit = "restore_mode(_fpmode)"
    step_functions = {"flush_subnormals": (), "restore_mode": (("int",),)}   # from Python: an int
    # a scan run from a Python step whose body calls more kernels than this runs its time loop
    # in Python too (codegen `_Module.hosted`): its compile would re-optimize every kernel
    host_scan_kernels = 16

    def scalar_template(self, spec, dtype: str, const_args: list[bool]) -> str:
        # pow by a compile-time constant exponent stays inline (LLVM expands small integer
        # powers into multiplies and calls libm's pow for the rest: the loop still vectorizes);
        # only a computed exponent, which LLVM may turn into a powi call, goes through `_pow`
        if spec.name == "pow" and const_args[1:2] == [True]:
            return spec.scalar
        return super().scalar_template(spec, dtype, const_args)

    @staticmethod
    def matmul_call(a: str, b: str, out: str) -> str:
        return f"_gemm({a}, {b}, {out})"

    @staticmethod
    def batched_matmul_call(a3: str, b3: str, o3: str, ta: bool, tb: bool) -> str | None:
        return f"_bgemm({a3}, {b3}, {o3}, np.int64({int(ta)}), np.int64({int(tb)}))"
