"""Who uses the cores while dlc runs a program: one owner, Numba's thread pool.

BLAS runs on one thread, always. dlc splits each large matrix product itself: the CPU target's
`_gemm` (compiler/codegen/cpu.py) gives every thread of Numba's pool one block of the output's
columns (or rows), each a single-threaded SciPy ?gemm. OpenBLAS's own threads paid only on
large products: on this project's 2-core machine they made the LSTM's 32x128 @ 128x512 products
slower (wake-up and join cost more than the product) and, beside Numba's pool, a step up to
100x slower (a waiting worker spins on a core another thread holds). dlc's split made those
products 1.6-1.9x faster on two cores, and the LSTM step 1.3x (bench/README.md). Two owners
are never active: the pool never calls a multithreaded BLAS.

The pool gets the cores the process may run on (`os.sched_getaffinity`), capped by `--threads`,
less those other processes keep busy (the load average, this process counted as one, when the
plan is made): a pool thread waiting for a core another process holds made GPT's step 6x slower
on two threads than on one (bench_all.py at load 9). With one core, nothing is split.

`gemms` weighs the program's GEMM work (scan bodies once per time step, a convolution's GEMMs
once per sample) for the report: `Session` applies the plan of its training programs when it is
built and the plan of its evaluation program around `evaluate`; `dlc run --json` reports both.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

from compiler.driver import OPS, resolve


@dataclass(frozen=True)
class CorePlan:
    threads: int               # Numba's pool: the threads a matrix product is split over
    cores: int                 # the process's cores, capped by --threads
    gemm_flops: float = 0.0    # GEMM work of one call of the programs
    free: int = 0              # cores not kept busy by other processes when planned
    blas_threads: int = 1      # BLAS's own threads: always 1 (see above)

    def describe(self) -> str:
        return (f"{self.threads} thread(s) of {self.cores} core(s), {self.free} free, BLAS on 1; "
                f"{self.gemm_flops / 1e6:.1f} MFLOP of GEMMs per step")

    def as_dict(self) -> dict:
        return {"threads": self.threads, "blas_threads": self.blas_threads, "cores": self.cores,
                "free_cores": self.free, "gemm_mflop": round(self.gemm_flops / 1e6, 3)}


def available_cores(cap: int | None = None) -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, cap) if cap else n)


def gemms(graph, dims: dict, repeat: int = 1) -> list[tuple[float, int]]:
    """[(FLOPs of one GEMM, how many a call of `graph` runs)], scan bodies included."""
    out = []
    for n in graph.nodes():
        op, a = graph.op(n), graph.attrs(n)
        if op == "scan":
            T = resolve((a["length"],), dims)[0] if "length" in a and not a.get("n_in") else \
                resolve(graph.shape(graph.args(n)[a["n_carry"]]), dims)[0]
            out += gemms(a["body"], dims, repeat * T)
        elif op == "matmul":
            # a 2-D right operand: one GEMM over the left's flattened rows (compiler/codegen/base.py);
            # otherwise one GEMM per batch index
            y = resolve(graph.shape(n), dims)
            s0 = resolve(graph.shape(graph.args(n)[0]), dims)
            k = s0[-2] if a.get("ta") else s0[-1]
            batch = 1
            for d in y[:-2]:
                batch *= d
            rows, calls = (y[-2] * batch, 1) if len(graph.shape(graph.args(n)[1])) == 2 else (y[-2], batch)
            out.append((2.0 * rows * y[-1] * k, repeat * calls))
        elif op in ("conv2d", "conv2d_grad_x", "conv2d_grad_w"):
            # each pass: one GEMM per sample over [O, C*kh*kw] x [C*kh*kw, Ho*Wo] (compiler/ops_nn.py)
            z = OPS[op].kernel_sizes(graph, n)
            N, O, CKK, P = resolve((z["N"], z["O"], z["CKK"], z["P"]), dims)
            out.append((2.0 * O * CKK * P, repeat * N))
    return out


def free_cores(cores: int, load: float | None = None) -> int:
    """Cores of `cores` that other processes leave free: the 1-minute load average (or `load`)
    less this process's own one."""
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    return max(1, min(cores, int(cores - max(load - 1.0, 0.0) + 0.5)))


def plan(graphs, dims: dict, cap: int | None = None, load: float | None = None) -> CorePlan:
    """The owner of the cores for programs `graphs` at sizes `dims` (e.g. {"B": 64}); `load`:
    the load average to plan for (default: the machine's now)."""
    total = sum(f * c for graph in graphs for f, c in gemms(graph, dims))
    cores = available_cores(cap)
    free = free_cores(cores, load)
    return CorePlan(free, cores, total, free)


_controller = None


class Tuner:
    """Measures which pool size is faster for this run's steps, and keeps it.

    A plan comes from the load average, which misses what it cannot see: a virtual machine's
    second core shared with other guests made dlc's (and PyTorch's) 2-thread LSTM step slower
    than the 1-thread one for minutes at a time on this project's machine. So, when the plan
    gives the pool more than one thread, the first steps after `WARM` alternate between the
    plan's count and one thread, `PER` steps at a time, `ROUNDS` times; the count with the
    lower median step time is kept (the first step after each switch is not counted: it pays
    for the switch). Measured again every `EVERY` steps. `time` is `time.perf_counter` (tests
    pass a fake clock).

    (With 10 steps of warm-up and windows of 2 steps, 1 run in 4 of the LSTM benchmark kept
    one thread, 6.6 ms a step where two threads take 4.0: its first steps are still slow and
    uneven.)"""

    WARM, PER, ROUNDS, EVERY = 20, 4, 3, 1000

    def __init__(self, plan: CorePlan, time=None):
        import time as _time
        self.choices = [plan.threads, 1] if plan.threads > 1 else []
        self.chosen = plan.threads
        self.samples: dict[int, list[float]] = {c: [] for c in self.choices}
        self.measured: dict[int, float] = {}          # the last decision's medians, ms
        self.clock = time or _time.perf_counter
        self.n = 0
        self.t0 = 0.0

    def _window(self) -> int | None:
        """The thread count step `n` is measured at, or None outside a measuring window."""
        k = (self.n % self.EVERY) - self.WARM
        if not self.choices or k < 0 or k >= self.PER * self.ROUNDS * len(self.choices):
            return None
        return self.choices[(k // self.PER) % len(self.choices)]

    def start(self) -> None:
        c = self._window()
        if c is not None:
            _set_pool(c)
            self.t0 = self.clock()

    def stop(self) -> int | None:
        """After a step: record it; return the kept count when this step ended a window."""
        c = self._window()
        first = c is not None and ((self.n % self.EVERY) - self.WARM) % self.PER == 0
        self.n += 1
        if c is None:
            return None
        if not first:
            self.samples[c].append(self.clock() - self.t0)
        if self._window() is not None or (self.n % self.EVERY) < self.WARM:
            return None
        import statistics
        self.measured = {k: 1e3 * statistics.median(v) for k, v in self.samples.items()}
        self.chosen = min(self.choices, key=lambda k: (self.measured[k], k))
        self.samples = {k: [] for k in self.choices}
        _set_pool(self.chosen)
        return self.chosen

    def as_dict(self) -> dict:
        return {"chosen": self.chosen, "step_ms": {str(k): round(v, 4) for k, v in self.measured.items()}}


def _set_pool(n: int) -> None:
    import numba
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))


def _blas(fresh: bool = False):
    """The loaded BLAS libraries (`fresh`: looked up again, e.g. after SciPy's was loaded)."""
    global _controller
    from threadpoolctl import ThreadpoolController
    if _controller is None or fresh:
        _controller = ThreadpoolController()
    return _controller.select(user_api="blas")


def apply(p: CorePlan) -> None:
    """Every loaded BLAS (numpy's, and SciPy's that the kernels call) on one thread, Numba's
    pool on `p.threads` (for this thread's parallel regions: the one that runs the steps)."""
    _blas(fresh=True).limit(limits=p.blas_threads)
    _set_pool(p.threads)


@contextmanager
def using(p: CorePlan):
    """Run a block under plan `p`, then put the thread counts back."""
    import numba
    limiter = _blas().limit(limits=p.blas_threads)
    before = numba.get_num_threads()
    _set_pool(p.threads)
    try:
        yield
    finally:
        numba.set_num_threads(before)
        limiter.restore_original_limits()
