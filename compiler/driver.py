"""The compiler's front door: program -> pipeline -> memory plan -> code -> loaded kernels.

The runtime reaches the compiler through here (and `compiler/api.py`): `Lowerer` turns a parsed
file into `Program`s, `optimize_eval`/`optimize_phase` run the pass pipeline of the evaluation
program and of one phase's training step, `build` generates and loads the code, and
`compile_programs` has Numba compile (or load) every kernel."""
from __future__ import annotations

import inspect
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from types import SimpleNamespace

import numba
import numpy as np

from dsl import ast as A

from . import cache, printer  # noqa: F401  (printer: `dlc ir`'s listings and pictures)
from .bounds import index_reads  # noqa: F401  (for the runtime: the data checks of index reads)
from .codegen import TARGETS, generate, helper_module
from .lower import Frame, Lowerer, Phase, Program  # noqa: F401  (for the runtime: the front end)
from .generate import COUNT as SAMPLE_COUNT  # noqa: F401  (a generate block's sample-count input)
from .ir import Graph
from .memory import plan as plan_memory
from .ops import OPS, evaluate  # noqa: F401  (for the runtime: op references for NaN tracing)
from .optim import SCHEDULES, SchedulePlan, ScheduleSpec, step_scalars  # noqa: F401  (the runtime's schedules)
from .passes import PASS_NAMES, Context, pipeline, run_pipeline  # noqa: F401
from .passes.fusion import split_tails
from .shapes import DTYPES, fmt_type, resolve  # noqa: F401  (for the runtime: dtypes and shapes)

# A step of at most this many kernels, and no scan, is one `@njit` function with every kernel
# inlined: the fastest step (no call from Python per kernel; the MLP's 0.11 ms against 0.17 ms
# stepped from Python), but Numba compiles it as one function, so its compile time grows with
# every kernel call. Other programs run their step in Python and compile each distinct kernel
# once (a few microseconds per kernel call per step). A scan's loop is compiled either way and
# dominates its step; its body calls its kernels (inlining the scan into a compiled step made
# a GRU's cold compile 1.5x longer).
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
    calls: list = field(default_factory=list)    # kernels called, not inlined: [(dispatcher, signature)]
    functions: list = field(default_factory=list)  # every distinct kernel function
    distinct_kernels: int = 0
    codegen_seconds: float = 0.0
    numba_seconds: float = 0.0
    target: object = None                         # the codegen Target (None: the CPU)
    numba_compiled: int = 0        # functions Numba compiled here, not loaded from its cache
    pending: list = field(default_factory=list)   # helpers' `ReadyJob`s not yet run here

    def __call__(self, *args):
        if self.pending:                          # helpers' run-time entries, before the first call
            for job in self.pending:
                if not job.overloads:
                    job.compile(READY)
            self.pending = []
        out = self.fn(*args)
        if self.target is not None and self.target.name != "cpu":    # outputs come back to the host
            out = tuple(self.target.to_host(o) for o in out)
        return out

    def kernel_functions(self) -> list:
        return self.functions

    @property
    def compiled_step(self) -> bool:
        return isinstance(self.fn, numba.core.dispatcher.Dispatcher)

    def jobs(self, args) -> list[tuple]:
        """What Numba must compile to run on arguments like `args`: (function, signature).
        Nothing ahead of time for a target whose kernels compile at their first launch."""
        if self.target is not None and not self.target.eager_compile:
            return []
        if self.compiled_step:        # the kernels its scans call, then the step (inlining the rest)
            return list(self.calls) + [(self.fn, tuple(numba.typeof(a) for a in args))]
        return list(self.calls)

    def compile_for(self, args) -> None:
        """Compile (or load from Numba's cache) for these argument types now."""
        compile_programs([(self, args)])


def compile_workers() -> int:
    """Compile processes forked beside this one: one per further core (DLC_COMPILE_WORKERS)."""
    return int(os.environ.get("DLC_COMPILE_WORKERS", max((os.cpu_count() or 1) - 1, 0)))


READY = ("ready",)                 # the "signature" of a `ReadyJob`
READY_LOCK = ".ready"              # ... and the suffix of its lock's name (`prepare` holds it too)


class ReadyJob:
    """A helper module's run-time entry as a compile job: its `_dlc_ready()` compiles (or loads
    from the disk cache) a function the kernels call through an address cell (cells.py: the
    CPU's matrix-product driver) and fills the cell. Compiled like a kernel, by whichever
    process takes it, beside the kernels that call it; this process then loads it with the
    rest. One per module, so that programs share it."""

    def __init__(self, mod):
        self.mod = mod
        self.py_func = getattr(mod._dlc_ready, "compiles", mod._dlc_ready)   # its cache entry's name
        self.__name__ = self.py_func.__name__
        self.overloads: dict = {}
        self.stats = SimpleNamespace(cache_misses=Counter())

    @classmethod
    def of(cls, mod) -> "ReadyJob":
        job = _READY_JOBS.get(id(mod))
        if job is None or job.mod is not mod:
            job = _READY_JOBS[id(mod)] = cls(mod)
        return job

    def cost(self) -> int:
        """Its weight in the schedule: the text of its whole module (`_schedule`)."""
        return len(inspect.getsource(self.mod))

    def compile(self, sig) -> None:
        with cache.locked(self.mod.__name__ + READY_LOCK):     # (`prepare` may be compiling it)
            if self.mod._dlc_ready():
                self.stats.cache_misses[sig] += 1
        self.overloads[sig] = True


def prepare(target: str = "cpu", dtype: str = "f32") -> None:
    """Start compiling the target's common helpers for `dtype` (the CPU's matrix products:
    nearly every model has one) in a forked process, while this one parses, lowers and
    optimizes the program: a machine's first run waited about 2 s for them before its kernels
    could start compiling. The child holds each helper module's locks until its part is in the
    disk cache; `build` (`cache.load(wait=True)`) and `ReadyJob` take the same locks, so they
    wait for the child and load its work rather than compile it again. Nothing happens when the
    helpers are loaded or cached already, or without compile workers (DLC_COMPILE_WORKERS=0)."""
    if target not in TARGETS or numba.config.DISABLE_JIT:
        return
    if compile_workers() <= 0:
        return
    tgt = TARGETS[target]()
    index = None
    todo = []
    for text in tgt.common_helpers.get(dtype, []):
        name, src = helper_module(tgt, text)
        if name in sys.modules:
            continue
        index = cache.compiled_index() if index is None else index
        if not any(k.startswith(name + ".") for k in index):     # compiled by an earlier run
            todo.append((name, src))
    locks = []
    for name, src in list(todo):       # a module another process is compiling: `build` waits for it
        held = cache.lock(name, block=False), cache.lock(name + READY_LOCK, block=False)
        if None in held:
            todo.remove((name, src))
            for fd in held:
                if fd is not None:
                    os.close(fd)
        else:
            locks.append(held)
    if not todo:
        return
    try:
        ctx = multiprocessing.get_context("fork")
        ctx.Process(target=_prepare_child, args=(target, todo, locks), daemon=True).start()
    finally:
        for fds in locks:                 # the child's copies hold the locks now
            for fd in fds:
                if fd is not None:
                    os.close(fd)


def _prepare_child(target: str, todo: list, locks: list) -> None:
    """`prepare`'s process: import each helper module (compiling what it compiles at import) and
    run its `_dlc_ready`, releasing each lock when that part is cached. Any error is left for
    the parent, which compiles the helper itself and reports it."""
    try:
        for (name, src), (fd_module, fd_ready) in zip(todo, locks):
            try:
                mod = cache.load(src, target, name)
            finally:
                if fd_module is not None:
                    os.close(fd_module)
            try:
                if hasattr(mod, "_dlc_ready"):
                    mod._dlc_ready()
            finally:
                if fd_ready is not None:
                    os.close(fd_ready)
    except Exception:
        pass


_READY_JOBS: dict[int, ReadyJob] = {}


def compile_programs(programs: list[tuple[Executable, list]], workers: int | None = None,
                     later: list[tuple[Executable, list]] = ()) -> "Background | None":
    """Compile programs for their example arguments: each distinct (function, signature) once.

    Functions that Numba's disk cache does not hold yet are compiled by this process and
    `workers` forked processes (default: one per further CPU core; `DLC_COMPILE_WORKERS`
    overrides) into the cache; this process then loads the others' from the cache. The
    processes share one list of jobs (`_schedule`): each takes the most urgent job whose
    callees are compiled already, so a compiled step or scan loop, which links every kernel it
    calls into its own module, neither waits at the end on one core nor compiles a kernel
    that another process is compiling. Each program's `cache_hit` says whether all it needed
    was cached already.

    `later` (the evaluation program of a run that trains first) comes after `programs` in the
    same list: the workers go on to it when nothing of `programs` is left to take, and this
    process returns as soon as `programs` are compiled, with a `Background` whose `wait()`
    finishes `later` (None without `later`)."""
    t0 = time.perf_counter()
    jobs, seen = [], set()
    for group, progs in ((0, programs), (1, later)):
        for ex, args in progs:
            for fn, sig in ex.jobs(args):
                if (id(fn), sig) not in seen and sig not in fn.overloads:
                    seen.add((id(fn), sig))
                    jobs.append((ex, fn, sig, group))
    index = cache.compiled_index()
    fresh = [j for j in jobs if not cache.compiled(j[1], index)]
    if workers is None:
        workers = compile_workers()
    workers = min(workers, len(fresh) - 1)
    if workers <= 0 or not any(j[3] == 1 for j in fresh):      # nothing to leave for later: all now
        programs, later = list(programs) + list(later), []
    by_workers: set = set()
    bg = None
    if workers > 0:
        order, deps, groups = _schedule([(fn, sig) for _, fn, sig, _ in fresh], [g for *_, g in fresh])
        queue = [(fresh[i][1], fresh[i][2]) for i in order]
        now = groups.count(0)                              # queue[:now]: what `programs` need
        ctx = multiprocessing.get_context("fork")          # the children inherit the loaded modules
        state = ctx.Array("b", len(queue))                 # per job: 0 waiting, 1 taken, 2 done (3: by a child)
        children = [ctx.Process(target=_compile_queue, args=(queue, deps, state, True), daemon=True)
                    for _ in range(workers)]
        for p in children:
            p.start()
        _compile_queue(queue, deps, state, False, limit=now)
        waited = 0.0
        while any(state[i] < 2 for i in range(now)) and waited < 600:    # the children's last jobs
            time.sleep(0.005)
            waited += 0.005
        if later:
            bg = Background(later, children, queue, deps, state, now)
        else:
            for p in children:
                p.join(timeout=300)      # a stuck worker is stopped: this process compiles its jobs below
                if p.is_alive():
                    p.kill()
                    p.join()
        by_workers = {(id(fn), sig) for (fn, sig), d in zip(queue, state) if d == 3}
    for ex, fn, sig, group in jobs:                   # the rest: loaded from the cache the children filled
        if group == 0 or not later:
            cache.compile_repairing(fn, sig)
    dt = time.perf_counter() - t0
    now_jobs = [j for j in jobs if j[3] == 0 or not later]
    for ex, fn, sig, _ in now_jobs:                   # compiled here or by a worker, not loaded from the cache
        ex.numba_compiled += bool(fn.stats.cache_misses.get(sig)) or (id(fn), sig) in by_workers
    for ex, _ in list(programs) + list(later):
        ex.cache_hit = not any(j[0] is ex for j in fresh)
    total = len(now_jobs) or 1
    for ex, _ in programs:                            # wall time, split by each program's share of jobs
        share = sum(1 for j in now_jobs if j[0] is ex) / total
        ex.compile_seconds += dt * share
        ex.numba_seconds += dt * share
    return bg


class Background:
    """Programs whose compile goes on in the worker processes of `compile_programs` (into
    Numba's disk cache) while this process goes on: the evaluation program during the first
    steps of training, on the core training leaves idle. `wait()` compiles what is left beside
    the workers, joins them and loads the programs."""

    def __init__(self, programs: list[tuple[Executable, list]], children: list, queue: list, deps: list, state,
                 start: int):
        self.programs, self.children, self.queue, self.deps, self.state = programs, children, queue, deps, state
        self.start = start                           # queue[start:]: the programs' own jobs
        self.t0 = time.perf_counter()
        self.waited = self.seconds = 0.0
        self.done = False


    def wait(self) -> float:
        """Block until the programs are compiled and loaded; the seconds this process waited."""
        if self.done:
            return 0.0
        t = time.perf_counter()
        _compile_queue(self.queue, self.deps, self.state, False)    # what is left, beside the workers
        for p in self.children:
            p.join(timeout=600)
            if p.is_alive():                         # stuck: this process compiles the rest below
                p.kill()
                p.join()
        compile_programs(self.programs, workers=0)   # load what the workers compiled
        self.done = True
        self.waited = time.perf_counter() - t
        self.seconds = time.perf_counter() - self.t0
        # compiled by a worker or by this process while waiting, not loaded from an older cache
        self.programs[0][0].numba_compiled += sum(1 for d in self.state[self.start:] if d >= 2)
        return self.waited


def _schedule(jobs: list[tuple], groups: list[int] | None = None) -> tuple[list, list, list]:
    """The order of the compile jobs by urgency (indices into `jobs`), for each job in that
    order the positions (in that order) of the jobs it must wait for, and each job's group
    (in that order). A scan loop waits for the kernels it calls: compiled there first, they
    would be compiled twice. A compiled step does not wait for the kernels it inlines: it is
    the longest job of its program and starts at once (it compiles those it needs itself).
    With `groups`, a lower group goes first whatever its urgency (the training steps before
    the evaluation program), and whatever a job waits for joins its group.

    A job's cost is the source text Numba turns into code for it: a kernel's module (helpers
    included: Numba's time per kernel follows it, r = 0.8-0.95 measured on translate and cnn);
    a compiled step or scan loop, its own module plus every module it inlines or links (Numba
    optimizes and generates the code of a linked callee again in the caller). Urgency is the
    longest chain of costs that starts at the job (list scheduling by bottom level): a kernel
    that a long scan loop waits for goes before an equally long kernel nobody waits for."""
    def text(f) -> int:
        if isinstance(f, ReadyJob):
            return f.cost()
        mod = sys.modules.get(f.py_func.__module__)
        try:
            return len(inspect.getsource(mod if f.__name__ == "kernel" else f.py_func))
        except (OSError, TypeError):
            return 1000
    where = {id(fn): i for i, (fn, _) in enumerate(jobs)}
    deps, cost = [], []
    for fn, _ in jobs:
        called = cache.callees(fn)
        deps.append(sorted({where[id(g)] for g in called if id(g) in where}))
        modules = {g.py_func.__module__: g for g in called if g.__name__ == "kernel"}
        cost.append(text(fn) + sum(text(g) for g in modules.values()))
    users: list[list[int]] = [[] for _ in jobs]
    for i, d in enumerate(deps):
        for j in d:
            users[j].append(i)
    level: dict[int, int] = {}

    def bottom(i: int) -> int:
        if i not in level:
            level[i] = cost[i] + max((bottom(u) for u in users[i]), default=0)
        return level[i]
    groups = list(groups) if groups else [0] * len(jobs)
    stack = list(range(len(jobs)))
    while stack:                                  # a job's callees go with it
        i = stack.pop()
        for j in deps[i]:
            if groups[j] > groups[i]:
                groups[j] = groups[i]
                stack.append(j)
    order = sorted(range(len(jobs)), key=lambda i: (groups[i], -bottom(i)))
    rank = {i: r for r, i in enumerate(order)}
    return order, [[rank[j] for j in deps[i]] for i in order], [groups[i] for i in order]


def _compile_queue(queue: list, deps: list, state, child: bool, limit: int | None = None) -> None:
    """Compile jobs of `queue` (its first `limit`) until none is left untaken: each time the
    first untaken one whose callees are done (`state`, shared by the processes). A job that
    fails in a child is marked done all the same: the parent compiles it again and reports the
    error."""
    waited = 0.0
    limit = len(queue) if limit is None else limit
    while True:
        with state.get_lock():
            ready = waiting = None
            for i, s in enumerate(state[:limit]):
                if s == 0:
                    waiting = i if waiting is None else waiting
                    if waited > 120 or all(state[j] >= 2 for j in deps[i]):
                        ready = i
                        break
            if ready is not None:
                state[ready] = 1
        if ready is None:
            if waiting is None:
                return
            time.sleep(0.005)             # the other processes are compiling what it calls
            waited += 0.005
            continue
        try:
            cache.compile_repairing(*queue[ready])
        except Exception:
            if not child:
                state[ready] = 2
                raise
        state[ready] = 3 if child else 2


def optimize(graph, kind: str, ctx: Context, fuse: bool = True, stop_after: str | None = None,
             target: str = "cpu"):
    return run_pipeline(graph, pipeline(kind, fuse, target), ctx, stop_after)


def optimize_eval(graph, fuse: bool = True, stop_after: str | None = None):
    """The evaluation (or sampling) program's pipeline: no gradients, no optimizer."""
    return _optimize_stored(graph, "eval", Context(), fuse, stop_after)


def optimize_phase(program: Program, phase: Phase, fuse: bool = True, stop_after: str | None = None):
    """One phase's training step: its forward graph, its gradients and its optimizer's update."""
    return _optimize_stored(program.step_graph(phase), "train", Context.for_phase(program, phase), fuse, stop_after)


def optimize_gradients(program: Program, phase: Phase, fuse: bool = True):
    """A phase's gradient program (data-parallel training): its forward graph and backward
    pass, the gradients as outputs `grad:NAME`, no optimizer."""
    ctx = Context.for_phase(program, phase)
    ctx.expose_grads = True
    return optimize(program.step_graph(phase), "grad", ctx, fuse)


def optimize_update(program: Program, phase: Phase, fuse: bool = True):
    """A phase's update program (data-parallel training): its optimizer alone, applied to the
    gradients given as inputs `grad:NAME` (averaged over the ranks between the two programs)."""
    g, ctx = Graph(program.graph.name), Context(optimizer=phase.optimizer, phase=phase.name)
    for name in phase.params:
        info = program.params[name]
        p = ctx.params[name] = g.input(name, info.shape, info.dtype, "param", loc=info.loc)
        ctx.grads[p] = g.input(f"grad:{name}", info.shape, info.dtype, "data", loc=info.loc)
    return run_pipeline(g, [p for p in pipeline("train", fuse) if p.__name__ != "autodiff"], ctx)


def _optimize_stored(graph, kind: str, ctx: Context, fuse: bool, stop_after: str | None):
    """The whole pipeline's result, from the kernel cache when this compiler optimized the same
    graph with the same options before (a warm run skips the passes); partial runs are not
    stored."""
    if stop_after is not None:
        return optimize(graph, kind, ctx, fuse, stop_after)
    opt = ctx.optimizer
    key = cache.object_key("optimized", graph, kind, fuse, sorted(ctx.params.items()), ctx.phase, ctx.expose_grads,
                           (opt.name, sorted(opt.options.items())) if opt is not None else None)
    g = cache.load_object(key)
    if g is None:
        g = optimize(graph, kind, ctx, fuse)
        cache.store_object(key, g)
    return g


def literal_setting(lowerer: Lowerer, train: A.TrainDef, name: str):
    """A train block setting needed before lowering (the seed splits the data), when it is a
    compile-time integer such as `seed = 2 * 3`; None otherwise (lowering reports any other
    value)."""
    for st in train.body:
        if isinstance(st, A.Assign) and st.name == name:
            v = lowerer.eval(st.value, Frame({}, {}, "", "train", None))
            return v if isinstance(v, int) and not isinstance(v, bool) else None
    return None


def _numba_type(t: tuple):
    if t[0] == "int":
        return numba.types.int64
    dt = numba.from_dtype(np.dtype(DTYPES[t[1]]))
    return dt if t[0] == "scalar" else numba.types.Array(dt, t[2], "C")


def build(graph, target: str = "cpu", compiled_step: bool | None = None) -> Executable:
    """Generate and load the program's modules (Numba compiles on `compile_for` or first call)
    for `target` (a name in `codegen.TARGETS`: "cpu", "cuda"; "auto": CUDA when a GPU is there).
    `compiled_step`: one inlined `@njit` step (default: for at most INLINE_MAX_KERNELS kernels;
    the environment's `DLC_STEP=compiled` or `python` decides for every program)."""
    t0 = time.perf_counter()
    tgt = TARGETS[resolve_target(target)]()
    if not tgt.rowwise_tails:
        graph = split_tails(graph)
    p = plan_memory(graph)
    if not tgt.allow_compiled_step:
        compiled_step = False
    if compiled_step is None and os.environ.get("DLC_STEP") in ("compiled", "python"):
        compiled_step = os.environ["DLC_STEP"] == "compiled"
    if compiled_step is None:
        compiled_step = (sum(1 for grp in p.order if grp.pattern != "view") <= INLINE_MAX_KERNELS
                         and not any(grp.pattern == "scan" for grp in p.order))
    source, meta = generate(graph, p, tgt, compiled_step)
    for name, text in meta["modules"].items():         # the kernels, before the step imports them
        cache.load(text, target, name, wait=name in meta["helper_modules"])
    mod = cache.load(source, target)
    ins = [(graph[n]["name"], graph.attrs(n)["kind"], graph.shape(n), graph.dtype(n)) for n in graph.inputs]
    listing = "\n".join([f"# ==== module {name} ====\n{text}" for name, text in meta["modules"].items()] + [source])
    ex = Executable(mod.step, listing, graph, ins, meta["outputs"], meta["kernels"])
    ex.distinct_kernels = meta["distinct_kernels"]
    ex.target = tgt
    ex.functions = [getattr(mod, name) for name in meta["names"]]
    for name in meta["modules"]:                      # helpers with a run-time entry: compiled first
        hm = sys.modules.get(name)
        if hm is not None and hasattr(hm, "_dlc_ready"):
            job = ReadyJob.of(hm)
            ex.calls.append((job, READY))
            if not job.overloads:
                ex.pending.append(job)
    seen = set()
    for kname, types in meta["calls"]:
        fn, sig = getattr(mod, kname), tuple(_numba_type(t) for t in types)
        if (id(fn), sig) not in seen:
            seen.add((id(fn), sig))
            ex.calls.append((fn, sig))
    if not ex.compiled_step:                          # what a Python step calls besides its kernels
        for name, types in tgt.step_functions.items():
            ex.calls.append((getattr(mod, name), tuple(_numba_type(t) for t in types)))
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


def resolve_target(name: str) -> str:
    """"auto" -> "cuda" when numba.cuda sees a GPU (or runs its simulator), else "cpu"."""
    if name != "auto":
        return name
    try:
        from numba import cuda
        return "cuda" if cuda.is_available() else "cpu"
    except Exception:          # numba-cuda missing or no driver: the CPU
        return "cpu"


# ONNX (the `onnx` extra), imported only when asked for
def require_onnx() -> None:
    """A user error (exit 2) when the onnx extra is not installed."""
    from .onnx_export import require_onnx as f
    f()


def to_onnx(graph, weights: dict, name: str):
    """The evaluation program `graph` as an ONNX model (compiler/onnx_export.py)."""
    from .onnx_export import to_onnx as f
    return f(graph, weights, name=name)


def from_onnx(*args, **kwargs):
    """A `.dl` file's text and its weights from an ONNX model (compiler/onnx_import.py)."""
    from .onnx_import import from_onnx as f
    return f(*args, **kwargs)
