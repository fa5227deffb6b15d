"""The code generator's target interface: what differs between a CPU and a GPU.

The renderer (`base.py`) decides *what* a kernel computes (which values it reads at which
index, the fused scalar expressions, the step's kernel order, buffer reuse); a `Target` decides
*how* that runs. After tinygrad's `renderer/cstyle.py`, a target is a table of templates plus a
few methods; a second target overrides entries, it does not fork the renderer.

A target owns:

* **loop and thread indexing**: `loop_header` (a serial loop inside one thread of work) and,
  through `render_kernel`, how a kernel's iteration space maps onto threads (CPU: the serial
  loop nests of `base._Kernel`; CUDA: grid-stride loops, one block per reduced row, 16x16 tiles);
* **allocation**: `alloc` (a buffer the step allocates) and `full`;
* **reductions and library calls**: `render_kernel` for reductions, `matmul_call` for the CPU's
  BLAS, the op lowerings of `kernel_templates` (the op registry's templates are the CPU lowering,
  like JAX's per-platform lowering rules beside the op; a target overrides them by op name);
* **scalar code**: `scalar_templates` override the registry's scalar expressions by op name or
  by (op, dtype), `helpers` the functions those expressions call;
* **the step driver**: `step_decorator` (one compiled function, or plain Python launching
  kernels), `launch` (one kernel call), `bind_input`, `copy` and `allow_compiled_step`;
  `eager_compile` says whether the driver compiles kernels for example argument types ahead of
  the first call (Numba's CPU dispatchers) or at the first launch (numba.cuda);
* **where buffers live**: `to_device` / `to_host` move a host NumPy array to the target's
  memory and back (identity on the CPU).
"""
from __future__ import annotations


class Target:
    """The base table. Every attribute is a template string or a method; `CpuTarget` and
    `CudaTarget` fill or override them."""

    name: str = ""
    prelude: str = ""                  # imports and constants at the top of every generated module
    kernel_decorator: str = ""         # scan loops and bodies
    function_decorator: str = ""       # a distinct kernel, compiled once
    inline_wrapper: str = ""           # the same kernel inlined into a compiled step ("" : none)
    step_decorator: str = ""           # the step function ("" : plain Python)
    allow_compiled_step: bool = True   # may the step be one compiled function with kernels inlined?
    rowwise_tails: bool = False        # renders a fused row-wise tail (softmax ending its input's
                                       # kernel)? If not, the driver runs each tail as its own kernel
    eager_compile: bool = True         # compile kernels for example arguments before the first call
    host_scan_kernels: int | None = None   # a scan called from host code whose body calls more
                                       # kernels than this loops in host Python (None: compiled)
    # the step's floating-point mode: imported into the step module, set on entry (a statement
    # binding `_fpmode`), restored before it returns ("": the caller's mode)
    step_imports: str = ""
    step_enter: str = ""
    step_exit: str = ""
    # the compiled functions `step_enter`/`step_exit` call, with their argument types: a step
    # run from Python calls them itself, so they are compiled (or loaded) with its kernels
    step_functions: dict = {}
    scalar_templates: dict = {}
    kernel_templates: dict = {}
    helpers: dict = {}              # op or (op, dtype) -> a helper text, or a tuple of them
    # helpers (texts of `helpers`) that nearly every program of a dtype imports and that compile
    # at import or have a run-time entry (`_dlc_ready`): `driver.prepare` compiles them beside
    # the front end
    common_helpers: dict = {}

    # ---- loops and kernels ---------------------------------------------------------------------
    @staticmethod
    def loop_header(var: str, extent: str, start: str = "0") -> str:
        """A serial loop over range(start, extent)."""
        return f"for {var} in range({extent}):" if start == "0" else f"for {var} in range({start}, {extent}):"

    def render_kernel(self, k) -> list[str] | None:
        """The body of kernel `k` (a `base._Kernel`), or None for the renderer's serial loop
        nests. A target that maps work onto threads renders every group itself, with the
        kernel's primitives (`k.compute`, `k.read`, `k.stores`, `k.param`, `k.out`), and sets
        `k.launch` to the launch configuration its `launch` method reads."""
        return None

    def scalar_template(self, spec, dtype: str, const_args: list[bool]) -> str:
        """The scalar expression of op `spec` on `dtype` values: the target's override by
        (op, dtype), then by op, then the registry's. `const_args` says which arguments are
        compile-time constants (a target may render those cases differently)."""
        return self.scalar_templates.get((spec.name, dtype)) or self.scalar_templates.get(spec.name, spec.scalar)

    @staticmethod
    def matmul_call(a: str, b: str, out: str) -> str:
        """`out = a @ b` for 2-D operands (`a`, `b` may be `.T` views)."""
        raise NotImplementedError

    @staticmethod
    def batched_matmul_call(a3: str, b3: str, o3: str, ta: bool, tb: bool) -> str | None:
        """`o3[i] = op(a3[i]) @ op(b3[i])` over the leading axis of 3-D arrays in one call (op:
        transposed where `ta`/`tb`), or None for a loop of `matmul_call`s."""
        return None

    # ---- memory --------------------------------------------------------------------------------
    @staticmethod
    def alloc(shape: str, dtype: str) -> str:
        """An uninitialized buffer of `shape` (an expression) and `dtype` (e.g. `np.float32`)."""
        return f"np.empty({shape}, {dtype})"

    @staticmethod
    def full(shape: str, value: str, dtype: str) -> str:
        return f"np.full({shape}, {value}, {dtype})"

    @staticmethod
    def copy(dst: str, src: str) -> str:
        """Copy array `src` into `dst` (same size, both contiguous) elementwise."""
        return f"{dst}.reshape(-1)[:] = {src}.reshape(-1)"

    @staticmethod
    def to_device(a):
        return a

    @staticmethod
    def to_host(a):
        return a

    # ---- the step ------------------------------------------------------------------------------
    @staticmethod
    def launch(kernel: str, args: list[str], group, config=None) -> str:
        """One kernel call in the step (or a scan body); `config` is the kernel's `k.launch`."""
        return f"{kernel}({', '.join(args)})"

    @staticmethod
    def call_types(types: list, config) -> list:
        """The argument types a launch with `config` passes, from the arguments' own types
        (("array", dtype, ndim), ("scalar", dtype), ("int",)): a target that passes views
        of other ranks says so here."""
        return types

    @staticmethod
    def bind_input(arg: str, kind: str) -> list[str]:
        """Statements at the top of the step for one argument (e.g. moving a batch up)."""
        return []

    def kernel_exports(self) -> list[str]:
        """The lines that end a kernel's module after `def kernel`: what the step imports."""
        if self.inline_wrapper:
            return [f"inlined = {self.inline_wrapper}(getattr(kernel, 'py_func', kernel))"]
        return ["inlined = kernel"]
