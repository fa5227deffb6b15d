"""The compiler's front door: program -> pipeline -> memory plan -> code -> loaded kernels."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numba
import numpy as np

from . import cache
from .codegen import TARGETS, generate
from .memory import plan as plan_memory
from .passes import Context, pipeline, run_pipeline
from .shapes import DTYPES

# A step of at most this many kernels is one `@njit` function with every kernel inlined: the
# fastest step (no call from Python per kernel), but Numba compiles it as one function, so its
# compile time grows with every kernel call. A larger program runs its step in Python and
# compiles each distinct kernel once (a few microseconds per kernel call per step).
INLINE_MAX_KERNELS = 24


@dataclass
class Executable:
    """A compiled program: call it with arrays in `inputs` order; get `outputs` back."""

    fn: object
    source: str
    graph: object
    inputs: list           # [(name, kind, shape, dtype)]
    outputs: list[str]
    kernels: int
    compile_seconds: float = 0.0
    cache_hit: bool = False
    stats: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)    # Python step: [(kernel dispatcher, signature)]
    functions: list = field(default_factory=list)  # every distinct kernel function
    distinct_kernels: int = 0
    codegen_seconds: float = 0.0
    numba_seconds: float = 0.0

    def __call__(self, *args):
        return self.fn(*args)

    def kernel_functions(self) -> list:
        return self.functions

    @property
    def compiled_step(self) -> bool:
        return isinstance(self.fn, numba.core.dispatcher.Dispatcher)

    def compile_for(self, args) -> None:
        """Compile (or load from Numba's cache) for these argument types now."""
        t0 = time.perf_counter()
        if self.compiled_step:
            sig = tuple(numba.typeof(a) for a in args)
            self.fn.compile(sig)
            st = self.fn.stats
            self.cache_hit = st.cache_hits.get(sig, 0) > 0 if hasattr(st, "cache_hits") else False
        else:
            hits = []
            for fn, sig in self.calls:
                if sig not in fn.overloads:
                    fn.compile(sig)
                    hits.append(fn.stats.cache_hits.get(sig, 0) > 0)
            self.cache_hit = all(hits)
        dt = time.perf_counter() - t0
        self.compile_seconds += dt
        self.numba_seconds += dt


def optimize(graph, kind: str, ctx: Context, fuse: bool = True, stop_after: str | None = None):
    return run_pipeline(graph, pipeline(kind, fuse), ctx, stop_after)


def _numba_type(t: tuple):
    if t[0] == "int":
        return numba.types.int64
    dt = numba.from_dtype(np.dtype(DTYPES[t[1]]))
    return dt if t[0] == "scalar" else numba.types.Array(dt, t[2], "C")


def build(graph, target: str = "cpu", compiled_step: bool | None = None) -> Executable:
    """Generate and load the program's modules (Numba compiles on `compile_for` or first call).
    `compiled_step`: one inlined `@njit` step (default: for at most INLINE_MAX_KERNELS kernels)."""
    t0 = time.perf_counter()
    tgt = TARGETS[target]()
    p = plan_memory(graph)
    if compiled_step is None:
        compiled_step = sum(1 for grp in p.order if grp.pattern != "view") <= INLINE_MAX_KERNELS
    source, meta = generate(graph, p, tgt, compiled_step)
    for name, text in meta["modules"].items():         # the kernels, before the step imports them
        cache.load(text, target, name)
    mod = cache.load(source, target)
    ins = [(graph[n]["name"], graph.attrs(n)["kind"], graph.shape(n), graph.dtype(n)) for n in graph.inputs]
    listing = "\n".join([f"# ==== module {name} ====\n{text}" for name, text in meta["modules"].items()] + [source])
    ex = Executable(mod.step, listing, graph, ins, meta["outputs"], meta["kernels"])
    ex.distinct_kernels = meta["distinct_kernels"]
    ex.functions = [getattr(mod, name) for name in meta["names"]]
    seen = set()
    for kname, types in meta["calls"]:
        fn, sig = getattr(mod, kname), tuple(_numba_type(t) for t in types)
        if (id(fn), sig) not in seen:
            seen.add((id(fn), sig))
            ex.calls.append((fn, sig))
    ex.codegen_seconds = ex.compile_seconds = time.perf_counter() - t0
    ex.stats = {"buffers": p.n_buffers, "inplace": len(p.inplace), "copies": len(p.copies)}
    return ex


def example_args(ex: Executable, dims: dict[str, int]) -> list:
    """Arguments of the right types (for eager compilation): scalars as numpy scalars."""
    from .shapes import resolve
    out = []
    for name, kind, shape, dtype in ex.inputs:
        if kind == "scalar":
            out.append(DTYPES[dtype](0))
        else:
            out.append(np.zeros(resolve(shape, dims), DTYPES[dtype]))
    return out
