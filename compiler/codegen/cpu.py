"""The CPU target: serial `@njit` kernels, BLAS matmuls, one compiled step function.

Serial kernels leave the cores to BLAS (numba-notes: `parallel=True` beside threaded BLAS
made a step 100x slower). fastmath flags keep NaN checks (no `nnan`/`ninf`).
"""
from ..ops import OPS
from .target import Target

FASTMATH = "{'nsz', 'arcp', 'contract', 'afn', 'reassoc'}"


# Eigen's float32 tanh: an odd rational function of degree 13/6, exact to float32 rounding
# beyond |x| = 7.9 where tanh is +-1. NaN passes through (both comparisons are false).
FAST_TANH = """\
@njit(cache=True, inline='always', fastmath=FASTMATH, error_model='numpy')
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


@njit(cache=True, inline='always', fastmath=FASTMATH, error_model='numpy')
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
@njit(cache=True, inline='always', fastmath=FASTMATH, error_model='numpy')
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
    # the row-wise softmax kernels, in float32 with the vectorizing exp
    kernel_templates: dict = {(op.name, "f32"): op.kernel.replace("np.exp(", "_exp_f32(")
                              for op in (OPS["softmax"], OPS["log_softmax"])}
    helpers: dict = {("tanh", "f32"): FAST_TANH, ("sigmoid", "f32"): FAST_TANH, ("exp", "f32"): FAST_EXP,
                     ("erf", "f32"): FAST_ERF, ("softmax", "f32"): FAST_EXP, ("log_softmax", "f32"): FAST_EXP,
                     ("pow", "f32"): POW, ("pow", "f64"): POW}
    copy_helper = COPY
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
        return f"np.dot({a}, {b}, {out})"
