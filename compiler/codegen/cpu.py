"""The CPU target: serial `@njit` kernels, BLAS matmuls, one compiled step function.

Serial kernels leave the cores to BLAS (numba-notes: `parallel=True` beside threaded BLAS
made a step 100x slower). fastmath flags keep NaN checks (no `nnan`/`ninf`).
"""
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
        ("pow", "f32"): "_pow({0}, {1})",
        ("pow", "f64"): "_pow({0}, {1})",
    }
    kernel_templates: dict = {}
    helpers: dict = {("tanh", "f32"): FAST_TANH, ("sigmoid", "f32"): FAST_TANH, ("pow", "f32"): POW, ("pow", "f64"): POW}
    copy_helper = COPY

    @staticmethod
    def matmul_call(a: str, b: str, out: str) -> str:
        return f"np.dot({a}, {b}, {out})"
