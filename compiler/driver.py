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

    def __call__(self, *args):
        return self.fn(*args)

    def compile_for(self, args) -> None:
        """Compile (or load from Numba's cache) for these argument types now."""
        t0 = time.perf_counter()
        sig = tuple(numba.typeof(a) for a in args)
        self.fn.compile(sig)
        self.compile_seconds += time.perf_counter() - t0
        st = self.fn.stats
        self.cache_hit = st.cache_hits.get(sig, 0) > 0 if hasattr(st, "cache_hits") else False


def optimize(graph, kind: str, ctx: Context, fuse: bool = True, stop_after: str | None = None):
    return run_pipeline(graph, pipeline(kind, fuse), ctx, stop_after)


def build(graph, target: str = "cpu") -> Executable:
    t0 = time.perf_counter()
    tgt = TARGETS[target]()
    p = plan_memory(graph)
    source, meta = generate(graph, p, tgt)
    mod = cache.load(source, target)
    ins = [(graph[n]["name"], graph.attrs(n)["kind"], graph.shape(n), graph.dtype(n)) for n in graph.inputs]
    ex = Executable(mod.step, source, graph, ins, meta["outputs"], meta["kernels"])
    ex.compile_seconds = time.perf_counter() - t0
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
