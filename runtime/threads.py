"""Who uses the cores while dlc runs a program: one owner, decided from the program itself.

dlc's kernels are serial `@njit` functions; the only threads a step can use are BLAS's, inside
`np.dot` (matmuls, and the GEMM of each convolution). A multithreaded GEMM pays only when it
is large: below about 512^3 multiply-adds OpenBLAS's fork and join and its spinning workers cost
more than the second core gains (measured on this project's 2-core machine: the LSTM's 32x128 @
128x512 GEMMs run 2.5x slower on two threads, a step 11 -> 17.6 ms; under load from other
processes 100x slower, because a waiting worker spins on a core another process holds). So:

- every GEMM of the program (scan bodies counted once per time step, a convolution's GEMMs once
  per sample) is weighed at the program's batch size;
- BLAS gets the cores when the GEMMs of at least `PARALLEL_GEMM_FLOPS` hold at least half
  of the step's GEMM work, and one thread otherwise;
- the cores are those the process may run on (`os.sched_getaffinity`), capped by `--threads`,
  less those other processes keep busy (the load average, this process counted as one, when
  the plan is made): a BLAS worker waiting for a core another process holds made GPT's step
  6x slower on two threads than on one (112 -> 665 ms, bench_all.py at load 9).

`Session` applies the plan of its training programs when it is built and the plan of its
evaluation program around `evaluate` (a larger batch); `dlc run --json` reports both.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

from compiler.driver import OPS, resolve

PARALLEL_GEMM_FLOPS = 2 * 512 ** 3      # a GEMM from which threads pay (2 x 512^3 = 268 MFLOP; at
                                        # 2 x 256^3 GPT's 1024x64 @ 64x256 GEMMs took 2 threads: 13.9 -> 16.1 ms)
PARALLEL_SHARE = 0.5                    # ... when such GEMMs are at least this share of the GEMM work


@dataclass(frozen=True)
class CorePlan:
    blas_threads: int
    cores: int                 # the process's cores, capped by --threads
    gemm_flops: float          # GEMM work of one call of the programs
    large_share: float         # its share in GEMMs of at least PARALLEL_GEMM_FLOPS
    free: int = 0              # cores not kept busy by other processes when planned

    def describe(self) -> str:
        return (f"BLAS {self.blas_threads} of {self.cores} core(s), {self.free} free: {self.large_share:.0%} of "
                f"{self.gemm_flops / 1e6:.1f} MFLOP of GEMMs per step in GEMMs of >= "
                f"{PARALLEL_GEMM_FLOPS / 1e6:.1f} MFLOP")

    def as_dict(self) -> dict:
        return {"blas_threads": self.blas_threads, "cores": self.cores, "free_cores": self.free,
                "gemm_mflop": round(self.gemm_flops / 1e6, 3), "large_gemm_share": round(self.large_share, 3)}


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
    work = [g for graph in graphs for g in gemms(graph, dims)]
    total = sum(f * c for f, c in work)
    large = sum(f * c for f, c in work if f >= PARALLEL_GEMM_FLOPS)
    share = large / total if total else 0.0
    cores = available_cores(cap)
    free = free_cores(cores, load)
    return CorePlan(free if share >= PARALLEL_SHARE else 1, cores, total, share, free)


_controller = None


def _blas():
    global _controller
    from threadpoolctl import ThreadpoolController
    if _controller is None:
        _controller = ThreadpoolController()
    return _controller.select(user_api="blas")


def apply(p: CorePlan) -> None:
    """Set every loaded BLAS (numpy's, and SciPy's that Numba's np.dot calls) to the plan."""
    _blas().limit(limits=p.blas_threads)


@contextmanager
def using(p: CorePlan):
    """Run a block under plan `p`, then put the BLAS thread counts back."""
    limiter = _blas().limit(limits=p.blas_threads)
    try:
        yield
    finally:
        limiter.restore_original_limits()
