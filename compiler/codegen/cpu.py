"""The CPU target: serial `@njit` kernels, BLAS matmuls, one compiled step function.

Serial kernels leave the cores to BLAS (numba-notes: `parallel=True` beside threaded BLAS
made a step 100x slower). fastmath flags keep NaN checks (no `nnan`/`ninf`).
"""
FASTMATH = "{'nsz', 'arcp', 'contract', 'afn', 'reassoc'}"


class CpuTarget:
    name = "cpu"
    prelude = f"from numba import njit\n\nFASTMATH = {FASTMATH}"
    kernel_decorator = f"@njit(cache=True, inline='always', fastmath={FASTMATH}, error_model='numpy')"
    step_decorator = f"@njit(cache=True, fastmath={FASTMATH}, error_model='numpy')"
    # overrides of the op registry's base templates (none needed on the CPU)
    scalar_templates: dict = {}
    kernel_templates: dict = {}
    helpers: dict = {}

    @staticmethod
    def loop_header(var: str, extent: str) -> str:
        return f"for {var} in range({extent}):"

    @staticmethod
    def matmul_call(a: str, b: str, out: str) -> str:
        return f"np.dot({a}, {b}, {out})"

    @staticmethod
    def launch(kernel: str, args: list[str], group) -> str:
        return f"{kernel}({', '.join(args)})"
