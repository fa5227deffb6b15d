"""Machinery the training-step benchmarks share (bench_mlp.py, bench_lenet.py, bench_lstm.py).

A benchmark script describes its workload with a `Bench` (the default `.dl` file, the
PyTorch twin of the model, how dlc's parameters map onto PyTorch's, default step counts) and
calls `main(bench)`. This module does the rest, the same way for every workload:

- every measurement runs in a fresh subprocess (the script itself, with `--_worker KIND`), so
  its thread settings (OpenBLAS/OpenMP/MKL through the environment before numpy is imported,
  again through threadpoolctl; `torch.set_num_threads`) are its own;
- a figure is the median over `repeats` runs of `steps` consecutive steps (GC off) after
  `warmup` steps; `--max-seconds` caps the time of one figure by using fewer steps;
- each row records `other_load`, the cores other processes kept busy meanwhile (/proc/stat);
- dlc's compile time with an empty and with a filled kernel cache;
- a cross-check that dlc and PyTorch compute the same losses and weights from the same
  initial weights;
- a profile of a dlc step: Python around the call, Numba dispatch, the compiled step, each
  generated kernel timed alone from compiled code (matmul kernels also their BLAS call alone;
  scan kernels also the kernels of their body, per time step);
- optionally (`--forward`) the forward pass alone: dlc's evaluation program
  (`Session.run_eval`) beside PyTorch's model and loss under `torch.no_grad()`.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


@dataclass
class Bench:
    """One workload: what the shared driver needs to know about it."""

    script: Path                      # the benchmark script (re-run as the worker)
    default_model: Path               # the .dl file
    shapes: str                       # one line describing the workload, for the report
    torch_model: Callable             # torch_model(prob, a) -> nn.Module returning logits
    # weight_pairs(model) -> [(dlc parameter name, torch parameter, to_torch(np.ndarray) -> np.ndarray)];
    # torch parameters not listed are zeroed and frozen in the cross-check
    weight_pairs: Callable
    steps: int = 500
    repeats: int = 5
    warmup: int = 100
    batches: int = 16
    forward: bool = False             # measure the forward pass alone by default
    max_seconds: float = 20.0         # cap on the time of one timed figure
    # prepare(a, tmpdir) -> Path: the .dl file to use (e.g. after writing its data there)
    prepare: Callable | None = None
    add_args: Callable | None = None  # add_args(argparser): workload-specific options
    drive: Callable | None = None     # drive(bench, a, shown) -> report dict, in place of `drive` below
    description: str = ""
    # jax_model(prob, a) -> (params: {name: jnp array}, apply(params, x) -> logits, class axis last);
    # the JAX jit twin bench_all.py times where JAX is installed
    jax_model: Callable | None = None


# ---- timing (inside the workers) ---------------------------------------------------------------

def time_steps(fn, steps: int, repeats: int, warmup: int, max_seconds: float | None = None):
    """Seconds per call of fn(i), one figure per repeat (the mean over its calls), and the
    number of calls per repeat actually made. With `max_seconds`, a repeat makes fewer than
    `steps` calls where they would take longer than its share, max_seconds / repeats: the
    number is estimated from a few calls after the warm-up, and a repeat also stops early once
    it has used its share (calls can slow down suddenly when other work takes the cores)."""
    t0 = time.perf_counter()
    for i in range(warmup):
        fn(i)
        if max_seconds and time.perf_counter() - t0 > max_seconds / repeats:
            break                   # a slow step is warm after a few calls
    share = None
    if max_seconds:
        share = max_seconds / repeats
        t0, k = time.perf_counter(), 0
        while k < min(3, steps):
            fn(warmup + k)
            k += 1
            if time.perf_counter() - t0 > share:
                break
        est = (time.perf_counter() - t0) / k
        steps = max(1, min(steps, int(share / max(est, 1e-9))))
    per, used = [], steps
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    clock = time.perf_counter
    try:
        for _ in range(repeats):
            t0 = clock()
            if share is None:
                for i in range(steps):
                    fn(i)
                n = steps
            else:
                n = 0
                while n < steps:
                    fn(n)
                    n += 1
                    if clock() - t0 > share:
                        break
            per.append((clock() - t0) / n)
            used = min(used, n)
    finally:
        if was_enabled:
            gc.enable()
    return per, used


def summary(per: list[float]) -> dict:
    med = statistics.median(per)
    return {"median_ms": 1e3 * med, "steps_per_s": 1.0 / med, "min_ms": 1e3 * min(per),
            "max_ms": 1e3 * max(per), "repeats_ms": [round(1e3 * p, 5) for p in per]}


def load_problem(model: Path, n_batches: int) -> dict:
    """The `.dl` file's optimizer, batch size, parameter shapes and `n_batches` training batches,
    found the way `runtime.session.Session` finds them (no kernels are compiled)."""
    import numpy as np

    from compiler.driver import Lowerer, literal_setting
    from dsl.parser import parse_file
    from runtime import data
    from runtime.session import DEFAULTS

    module = parse_file(model)
    low = Lowerer(module, "f32")
    train = low.trains[0]
    seed = literal_setting(low, train, "seed")
    seed = int(seed) if seed is not None else DEFAULTS["seed"]
    ds = data.load(train.data, model.parent, seed)
    program = low.lower_train(train, ds.fields())
    batch = int(program.settings.get("batch", DEFAULTS["batch"]))
    rng = np.random.default_rng(seed + 1)
    n = len(ds.train["x"])
    batches = []
    for _ in range(n_batches):
        idx = rng.choice(n, batch, replace=False)
        batches.append({k: np.ascontiguousarray(v[idx]) for k, v in ds.train.items()})
    return {"optimizer": program.settings.get("optimizer"), "batch": batch, "batches": batches,
            "params": {k: tuple(v.shape) for k, v in program.params.items()}}


def thread_info() -> list[dict]:
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    return [{"lib": Path(i["filepath"]).name, "api": i["user_api"], "threads": i["num_threads"]}
            for i in threadpool_info()]


def limit_threads(n):
    """Hold thread pools already loaded at n (None: leave them). The environment did it before
    import; threadpoolctl covers libraries that read it differently."""
    if n is None:
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    return threadpool_limits(limits=n)


# ---- dlc ---------------------------------------------------------------------------------------

def _njit_loop(callee, nargs: int, name: str = "loop"):
    """A compiled `loop(n, *args)` that calls `callee(*args)` n times (no Python in between)."""
    from numba import njit
    names = ", ".join(f"a{i}" for i in range(nargs))
    src = f"def {name}(n, {names}):\n    for _ in range(n):\n        callee({names})\n    return 0\n"
    glb = {"callee": callee}
    exec(src, glb)
    return njit(glb[name])


def _time_compiled(loop, args, inner: int, repeats: int, max_seconds: float | None = None) -> float:
    """Median seconds per inner call of a compiled loop. With `max_seconds`: fewer calls per
    repeat where `inner` of them would take longer than max_seconds / repeats (re-estimated
    after every repeat), and no further repeats once max_seconds have passed."""
    loop(1, *args)              # compiles the loop
    t1 = time.perf_counter()
    loop(1, *args)
    est = time.perf_counter() - t1
    share = max_seconds / repeats if max_seconds else None
    if share:
        inner = max(1, min(inner, int(share / max(est, 1e-9))))
    per = []
    start = time.perf_counter()
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(inner, *args)
        per.append((time.perf_counter() - t0) / inner)
        if share:
            if time.perf_counter() - start > max_seconds:
                break
            inner = max(1, min(inner, int(share / max(per[-1], 1e-9))))
    return statistics.median(per)


def _copy_args(args):
    """Copies of the arrays in args, keeping which arguments are the same array."""
    import numpy as np
    memo, out = {}, []
    for a in args:
        if isinstance(a, np.ndarray):
            if id(a) not in memo:
                memo[id(a)] = a.copy()
            out.append(memo[id(a)])
        else:
            out.append(a)
    return out


def _kernel_heads(source: str, pattern: str) -> tuple[dict, dict]:
    """{kernel: fusion pattern} and {kernel: its first IR op} from the generated source."""
    heads = dict(re.findall(rf"# ---- kernel ({pattern}): (\w+), \d+ ops? ----", source))
    first_ir = {}
    for m in re.finditer(rf"# ---- kernel ({pattern}): .*\n# (%\d+: [^=]+= \w+)", source):
        first_ir[m.group(1)] = " ".join(m.group(2).split())
    return heads, first_ir


def _kernel_def(source: str, name: str) -> str:
    """The text of kernel `name` from `def ...(` on: a scan loop is defined in the step's
    module; a kernel is imported (`from dlc_<hash> import kernel as kN`) from its own module,
    which the listing holds under `# ==== module dlc_<hash> ====`."""
    m = re.search(rf"^from (dlc_\w+) import kernel as {name}\b", source, re.M)
    if m:
        module = source.split(f"# ==== module {m.group(1)} ====", 1)[1]
        return module.split("def kernel(", 1)[1]
    return source.split(f"def {name}(", 1)[1]


def _blas_alone(source: str, name: str, args, dot_loop, inner: int, repeats: int, budget: float):
    """For a kernel that calls a matrix product (`_gemm`, the CPU target's, or `np.dot`) on two
    of its arguments: that call alone (us) and its shapes; None for other kernels."""
    import numpy as np
    body = _kernel_def(source, name).split("\n\n", 1)[0]
    m = re.search(r"(?:np\.dot|_gemm)\((\w+)(\.T)?, (\w+)(\.T)?, (\w+)\)", body)
    if not m:
        return None
    sig = body.split(")", 1)[0].split(", ")
    pos = {p: i for i, p in enumerate(sig)}
    if m.group(1) not in pos or m.group(3) not in pos:
        return None
    A, B = args[pos[m.group(1)]], args[pos[m.group(3)]]
    A, B = (A.T if m.group(2) else A), (B.T if m.group(4) else B)
    C = np.empty((A.shape[0], B.shape[1]), A.dtype)
    td = _time_compiled(dot_loop, [A, B, C], inner, repeats, budget)
    tr = ", ".join(x for x, t in (("A^T", m.group(2)), ("B^T", m.group(4))) if t)
    return {"blas_us": 1e6 * td,
            "gemm": f"{A.shape[0]}x{A.shape[1]} @ {B.shape[0]}x{B.shape[1]}" + (f" ({tr})" if tr else "")}


def _scan_parts(G, name: str, args, source: str, dot_loop, inner: int, repeats: int, budget: float):
    """The kernels in the body of scan kernel `name`, each timed alone once (with the arguments
    of its first call) and multiplied by how often one run of the scan calls it."""
    body = G.get(f"{name}_body")
    called = set(re.findall(r"\b(k\d+)\(", _kernel_def(source, f"{name}_body").split("\n\n", 1)[0])) \
        if body is not None else set()
    subs = {k: G[k] for k in called}
    if body is None or not subs or not hasattr(G[name], "py_func"):
        return []
    calls, counts = {}, {}

    def recorder(sub, fn):
        def call(*a):
            if sub not in calls:
                calls[sub] = _copy_args(a)
            counts[sub] = counts.get(sub, 0) + 1
            return fn(*a)
        return call

    saved = {k: G[k] for k in list(subs) + [f"{name}_body"]}
    G.update({k: recorder(k, v) for k, v in subs.items()})
    G[f"{name}_body"] = body.py_func
    try:
        G[name].py_func(*_copy_args(args))
    finally:
        G.update(saved)
    heads, first_ir = _kernel_heads(source, r"k\d+")
    rows = []
    for sub in sorted(calls, key=lambda k: int(k[1:])):
        a = calls[sub]
        kl = _njit_loop(subs[sub], len(a), f"loop_{sub}")
        t = _time_compiled(kl, a, inner, repeats, budget)
        row = {"kernel": sub, "pattern": heads.get(sub, "?"), "first_op": first_ir.get(sub, ""),
               "us": 1e6 * t, "calls": counts[sub], "total_us": 1e6 * t * counts[sub]}
        row.update(_blas_alone(source, sub, a, dot_loop, inner, repeats, budget) or {})
        rows.append(row)
    return rows


def profile_dlc(s, batch: dict, steps: int, repeats: int, max_seconds: float) -> dict:
    """Where a dlc step goes: Python around the call, Numba dispatch, the compiled step, kernels."""
    import numpy as np
    from numba import njit

    from compiler.optim import bias_corrections

    ex = s.train_ex
    py_step = getattr(ex.fn, "py_func", ex.fn)  # the step as Python (a large program's step is Python)
    G = py_step.__globals__                   # the generated module's namespace
    sc = {"lr": s.optimizer.lr, "rng": s.rng_seed(1), **bias_corrections(s.optimizer, 10)}
    args = s._args(ex, batch, sc)
    budget = max_seconds / 2
    out = {"arg_count": len(args)}
    # train_step vs. the executable called with ready arguments vs. the step run from compiled code
    per_step, n1 = time_steps(lambda i: s.train_step(batch), steps, repeats, min(50, steps), budget)
    per_args, _ = time_steps(lambda i: s._args(ex, batch, {"lr": s.optimizer.lr, "rng": s.rng_seed(i + 1),
                                                          **bias_corrections(s.optimizer, i + 1)}),
                             steps, repeats, 50, budget)
    per_ex, _ = time_steps(lambda i: ex(*args), steps, repeats, min(50, steps), budget)
    if ex.compiled_step:
        loop = _njit_loop(G["step"], len(args))
        t_compiled = _time_compiled(loop, args, steps, repeats, budget)
    else:                                     # no compiled step: its time is the executable's
        t_compiled = statistics.median(per_ex)
    t_step, t_args, t_ex = (statistics.median(p) for p in (per_step, per_args, per_ex))
    out["split_ms"] = {
        "train_step": 1e3 * t_step,
        "python_args": 1e3 * t_args,                       # _args + bias corrections
        "python_other": 1e3 * max(t_step - t_ex - t_args, 0.0),   # float(loss), tuple, etc.
        "numba_dispatch": 1e3 * max(t_ex - t_compiled, 0.0),   # typing the arguments, boxing results
        "compiled_step": 1e3 * t_compiled,
    }
    out["timed_steps"] = n1
    # each kernel alone: record the calls of one step run as Python, then time each in a loop
    calls = []
    kernels = {k: v for k, v in G.items() if re.fullmatch(r"k\d+|scan\d+", k)}
    inlined = {k: v for k, v in G.items() if re.fullmatch(r"k\d+i", k)}   # what the compiled step calls

    def recorder(name, fn):
        def call(*a):
            calls.append((name, _copy_args(a)))     # the inputs as the kernel sees them (buffers are reused)
            return fn(*a)
        return call

    G.update({k: recorder(k, v) for k, v in kernels.items()})
    G.update({k: recorder(k[:-1], kernels[k[:-1]]) for k in inlined})
    try:
        py_step(*_copy_args(args))
    finally:
        G.update(kernels)
        G.update(inlined)
    heads, first_ir = _kernel_heads(ex.source, r"k\d+|scan\d+")
    rows, total = [], 0.0
    inner = max(steps // 2, 50)
    # the product alone, as the kernels run it: the CPU target's `_gemm` (split over the pool)
    helper = next((m._gemm for k, m in list(sys.modules.items())
                   if k.startswith("dlc_") and "_gemm_run" in vars(m) and hasattr(m, "GEMM_SMALL")), None)
    g2 = {"np": np, "_gemm": helper}
    exec("def dot1(a, b, c):\n    " + ("_gemm(a, b, c)" if helper is not None else "np.dot(a, b, c)") + "\n", g2)
    dot_loop = _njit_loop(njit(g2["dot1"]), 3, "dot_loop")
    kbudget = max_seconds / 10
    for name, a in calls:
        fresh = _copy_args(a) if heads.get(name) == "scan" else None
        kl = _njit_loop(kernels[name], len(a), f"loop_{name}")
        t = _time_compiled(kl, a, inner, repeats, kbudget)
        total += t
        row = {"kernel": name, "pattern": heads.get(name, "?"), "first_op": first_ir.get(name, ""), "us": 1e6 * t}
        # for a matmul kernel, the BLAS call alone (the rest is its fused epilogue)
        row.update(_blas_alone(ex.source, name, a, dot_loop, inner, repeats, kbudget) or {})
        if row["pattern"] == "scan":
            row["parts"] = _scan_parts(G, name, fresh, ex.source, dot_loop, inner, repeats, kbudget)
        rows.append(row)
    out["kernels"] = rows
    out["kernels_total_ms"] = 1e3 * total
    out["kernel_count"] = len(rows)
    out["allocs_and_glue_ms"] = 1e3 * (t_compiled - total)     # can come out < 0: timing noise
    return out


def worker_dlc(a) -> dict:
    t0 = time.perf_counter()
    from runtime.session import Options, Session
    import_s = time.perf_counter() - t0
    prob = load_problem(a.model, a.batches)
    s = Session(a.model, Options(threads=a.threads))     # a cap: dlc decides how to use the cores
    batches = prob["batches"]
    nb = len(batches)
    busy0, own0, t0 = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    per, steps = time_steps(lambda i: s.train_step(batches[i % nb]), a.steps, a.repeats, a.warmup, a.max_seconds)
    busy1, own1, t1 = _cpu_busy_seconds(), _own_cpu_seconds(), time.perf_counter()
    others = max((busy1 - busy0) - (own1 - own0), 0.0) / (t1 - t0) if busy0 is not None else 0.0
    res = {"framework": "dlc", "threads": a.threads, **summary(per), "steps": steps,
           "thread_pools": thread_info(), "compile_seconds": s.compile_seconds, "kernel_cache_hit": s.cache_hit,
           "kernel_count": s.train_ex.kernels, "import_seconds": import_s, "cores": s.core_plan.as_dict()}
    if a.forward:
        per_f, steps_f = time_steps(lambda i: float(s.run_eval(batches[i % nb])["loss"]), a.steps, a.repeats,
                                    a.warmup, a.max_seconds)
        res["forward"] = {**summary(per_f), "steps": steps_f, "eval_kernel_count": s.eval_ex.kernels}
    if a.profile and contended({"threads": a.threads, "other_load": others}, os.cpu_count()):
        res["profile_skipped"] = (f"other processes kept {others:.2f} cores busy while the step was timed: "
                                  "a profile would measure them")
    elif a.profile:
        res["profile"] = profile_dlc(s, batches[0], a.steps, a.repeats, a.max_seconds)
    return res


def worker_compile(a) -> dict:
    """One process's compile: the caller points DLC_CACHE_DIR at an empty or a filled cache."""
    t0 = time.perf_counter()
    from runtime.session import Options, Session
    t1 = time.perf_counter()
    s = Session(a.model, Options())
    return {"import_seconds": t1 - t0, "compile_seconds": s.compile_seconds,
            "lower_seconds": s.lower_seconds, "kernel_cache_hit": s.cache_hit,
            "process_seconds": time.perf_counter() - t0,
            "train_kernels": s.train_ex.kernels, "eval_kernels": s.eval_ex.kernels}


# ---- PyTorch -----------------------------------------------------------------------------------

def torch_optimizer(params, spec, adam_impl: str = "default"):
    """torch.optim.Adam/AdamW with the .dl file's settings: its weight decay on the parameters
    of rank >= 2 (dlc's `decay = weights`) or on all of them (`decay = all`)."""
    import torch
    if spec is None or spec.name not in ("adam", "adamw"):
        raise SystemExit(f"these benchmarks mirror Adam/AdamW; the .dl file uses {spec and spec.name}")
    if spec.decay not in ("weights", "all"):
        raise SystemExit("these benchmarks mirror decay = weights or all")
    params = [p for p in params if p.requires_grad]
    decayed = [p for p in params if p.ndim >= 2 or spec.decay == "all"]
    other = [p for p in params if not (p.ndim >= 2 or spec.decay == "all")]
    groups = [{"params": decayed, "weight_decay": spec.weight_decay}]
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adam_impl]
    return cls(groups, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps, **impl)


def check_shapes(bench: Bench, prob, model):
    """Refuse a .dl model whose parameters do not match the PyTorch twin's."""
    import numpy as np
    pairs = bench.weight_pairs(model)
    want = {n: tuple(to(np.empty(prob["params"][n], np.float32)).shape) if n in prob["params"] else None
            for n, _, to in pairs}
    bad = [f"{n}: .dl {prob['params'].get(n)} vs torch {tuple(p.shape)}"
           for n, p, to in pairs if want[n] != tuple(p.shape)]
    extra = sorted(set(prob["params"]) - {n for n, _, _ in pairs})
    if bad or extra:
        raise SystemExit("the .dl model does not match this benchmark's PyTorch model:\n  "
                         + "\n  ".join(bad + [f"{n}: only in the .dl model" for n in extra]))


def torch_step_fn(model, opt):
    import torch.nn.functional as F

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()          # dlc's train_step returns the loss as a Python float too
    return step


def torch_forward_fn(model):
    import torch
    import torch.nn.functional as F

    def fwd(x, y):
        with torch.no_grad():
            return F.cross_entropy(model(x), y).item()
    return fwd


def torch_batches(prob):
    import torch
    return [(torch.from_numpy(b["x"]), torch.from_numpy(b["y"].astype("int64"))) for b in prob["batches"]]


def worker_torch(a, bench: Bench) -> dict:
    import torch
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    prob = load_problem(a.model, a.batches)
    limiter = limit_threads(a.threads)
    torch.manual_seed(0)
    model = bench.torch_model(prob, a)
    check_shapes(bench, prob, model)
    opt = torch_optimizer(model.parameters(), prob["optimizer"], a.torch_adam)
    tb = torch_batches(prob)
    nb = len(tb)
    compiled = getattr(a, "torch_compile", False)
    t0 = time.perf_counter()
    step = torch_step_fn(torch.compile(model) if compiled else model, opt)
    if compiled:                    # the first call compiles (forward and backward graphs)
        step(*tb[0])
    per, steps = time_steps(lambda i: step(*tb[i % nb]), a.steps, a.repeats, a.warmup, a.max_seconds)
    res = {"framework": "torch", "threads": a.threads, **summary(per), "steps": steps,
           "thread_pools": thread_info(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "torch_interop_threads": torch.get_num_interop_threads(),
           "optimizer": type(opt).__name__, "adam_impl": a.torch_adam}
    if compiled:
        res["framework"], res["compile_seconds"] = "torch.compile", time.perf_counter() - t0
    if a.forward:
        fwd = torch_forward_fn(model)
        per_f, steps_f = time_steps(lambda i: fwd(*tb[i % nb]), a.steps, a.repeats, a.warmup, a.max_seconds)
        res["forward"] = {**summary(per_f), "steps": steps_f}
    del limiter
    return res


def worker_jax(a, bench: Bench) -> dict:
    """The workload's JAX twin: forward, backward and Adam (the .dl file's settings, written out:
    JAX has no optimizer library of its own) in one `jax.jit` step; `float(loss)` waits for it."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    prob = load_problem(a.model, a.batches)
    spec = prob["optimizer"]
    params, apply = bench.jax_model(prob, a)
    decayed = {k: (v.ndim >= 2 or spec.decay == "all") and spec.weight_decay > 0 for k, v in params.items()}
    b1, b2, eps, lr, adamw = spec.beta1, spec.beta2, spec.eps, spec.lr, spec.name == "adamw"

    def loss_fn(p, x, y):
        logits = apply(p, x)
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, y[..., None], axis=-1))

    def step(p, m, v, t, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        out_p, out_m, out_v = {}, {}, {}
        c1, c2 = 1 - b1 ** t, 1 - b2 ** t
        for k in p:
            gk = g[k] + spec.weight_decay * p[k] if decayed[k] and not adamw else g[k]
            out_m[k] = b1 * m[k] + (1 - b1) * gk
            out_v[k] = b2 * v[k] + (1 - b2) * gk * gk
            upd = lr * (out_m[k] / c1) / (jnp.sqrt(out_v[k] / c2) + eps)
            if decayed[k] and adamw:
                upd = upd + lr * spec.weight_decay * p[k]
            out_p[k] = p[k] - upd
        return out_p, out_m, out_v, loss

    jstep = jax.jit(step, donate_argnums=(0, 1, 2))
    batches = [(jnp.asarray(b["x"]), jnp.asarray(b["y"].astype(np.int32))) for b in prob["batches"]]
    nb = len(batches)
    state = {"p": params, "m": {k: jnp.zeros_like(v) for k, v in params.items()},
             "v": {k: jnp.zeros_like(v) for k, v in params.items()}, "t": 0}

    def one(i):
        st = state
        st["t"] += 1
        st["p"], st["m"], st["v"], loss = jstep(st["p"], st["m"], st["v"], jnp.float32(st["t"]), *batches[i % nb])
        return float(loss)

    t0 = time.perf_counter()
    one(0)                          # traces and compiles
    compile_s = time.perf_counter() - t0
    per, steps = time_steps(one, a.steps, a.repeats, a.warmup, a.max_seconds)
    return {"framework": "jax", "threads": a.threads, **summary(per), "steps": steps, "jax": jax.__version__,
            "compile_seconds": compile_s, "thread_pools": thread_info()}


def worker_check(a, bench: Bench) -> dict:
    """Same initial weights, same batches: do dlc and PyTorch compute the same steps?"""
    import numpy as np
    import torch

    from runtime.session import Options, Session
    prob = load_problem(a.model, 8)
    s = Session(a.model, Options())
    torch.manual_seed(0)
    model = bench.torch_model(prob, a)
    check_shapes(bench, prob, model)
    pairs = bench.weight_pairs(model)
    mapped = {id(p if p._base is None else p._base) for _, p, _ in pairs}     # views: their parameter
    with torch.no_grad():
        for n, p, to in pairs:
            p.copy_(torch.from_numpy(np.ascontiguousarray(to(s.params[n]))))
        for p in model.parameters():           # no counterpart in dlc (e.g. LSTM's second bias)
            if id(p) not in mapped:
                p.zero_()
                p.requires_grad_(False)
    opt = torch_optimizer(model.parameters(), prob["optimizer"])
    step = torch_step_fn(model, opt)
    diffs = []
    for i in range(20):
        b = prob["batches"][i % 8]
        ld, _ = s.train_step(b)
        lt = step(torch.from_numpy(b["x"]), torch.from_numpy(b["y"].astype("int64")))
        diffs.append(abs(ld - lt) / max(abs(lt), 1e-12))
    pdiff = max(float(np.abs(to(s.params[n]) - p.detach().numpy()).max()) for n, p, to in pairs)
    return {"steps": 20, "max_rel_loss_diff": max(diffs), "max_abs_weight_diff": pdiff}


# ---- the driver --------------------------------------------------------------------------------

def _cpu_busy_seconds():
    """Seconds of CPU time spent by the whole machine so far (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)          # idle + iowait
    return (sum(vals[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _wait_quiet(timeout: float, window: float = 2.0, limit: float = 0.1) -> bool:
    """Wait (at most `timeout` s) for `window` seconds in which the machine keeps less than
    `limit` cores busy. True if it came."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        b0 = _cpu_busy_seconds()
        if b0 is None:
            return False
        time.sleep(window)
        if (_cpu_busy_seconds() - b0) / window < limit:
            return True
    return False


def _own_cpu_seconds():
    import resource
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _children_cpu_seconds():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


_WORKER_ARGS = ("model", "steps", "repeats", "warmup", "batches", "torch_adam", "profile", "forward", "max_seconds")


def run_worker(bench: Bench, kind: str, a, threads=None, env_extra=None, timeout=900) -> dict:
    """Run one measurement in a fresh process; add `other_load`: the average number of cores
    that other processes kept busy meanwhile (from /proc/stat), to tell a noisy figure."""
    env = dict(os.environ)
    if threads is not None:
        for v in THREAD_VARS:
            env[v] = str(threads)
        if threads == 1:            # XLA's CPU client (the JAX twin)
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    wa = {k: v for k, v in vars(a).items() if not k.startswith("_") and k not in ("threads",)}
    wa = {k: (str(v) if isinstance(v, Path) else v) for k, v in wa.items()}
    wa["threads"] = threads
    cmd = [sys.executable, str(bench.script), "--_worker", kind, "--_args", json.dumps(wa)]
    if a.wait_quiet > 0:
        _wait_quiet(a.wait_quiet)
    busy0, own0, t0 = _cpu_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    busy1, own1, t1 = _cpu_busy_seconds(), _children_cpu_seconds(), time.perf_counter()
    if p.returncode != 0:
        raise RuntimeError(f"{kind} worker failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    res = json.loads(p.stdout.strip().splitlines()[-1])
    if busy0 is not None:
        res["other_load"] = round(max((busy1 - busy0) - (own1 - own0), 0.0) / (t1 - t0), 2)
    res["wall_seconds"] = round(t1 - t0, 2)
    return res


def have_torch() -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):
        return False


def log(msg: str, quiet: bool):
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def parser(bench: Bench) -> argparse.ArgumentParser:
    doc = bench.description
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0], epilog="\n\n".join(doc.split("\n\n")[1:]) or None,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    rel = bench.default_model.relative_to(ROOT) if bench.default_model.is_relative_to(ROOT) else bench.default_model
    ap.add_argument("--model", type=Path, default=bench.default_model, help=f"the .dl file (default: {rel})")
    ap.add_argument("--steps", type=int, default=bench.steps, help=f"steps per timed repeat (default {bench.steps})")
    ap.add_argument("--repeats", type=int, default=bench.repeats,
                    help=f"timed repeats; the median is reported (default {bench.repeats})")
    ap.add_argument("--warmup", type=int, default=bench.warmup, help=f"untimed steps first (default {bench.warmup})")
    ap.add_argument("--batches", type=int, default=bench.batches,
                    help=f"distinct batches cycled through (default {bench.batches})")
    ap.add_argument("--max-seconds", type=float, default=bench.max_seconds, metavar="S",
                    help="cap on one timed figure: fewer steps per repeat where repeats x steps would take "
                         f"longer than S seconds (0: no cap; default {bench.max_seconds:g})")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}",
                    help="comma-separated thread counts for BLAS/OpenMP (dlc) and torch.set_num_threads "
                         "(PyTorch), each measured in a fresh process; 'default' leaves them unset "
                         "(default: 1,<cores>)")
    ap.add_argument("--no-torch", action="store_true", help="measure dlc only")
    ap.add_argument("--torch-adam", choices=("default", "foreach", "fused"), default="default",
                    help="torch.optim.Adam implementation: its default (per-parameter loop on CPU), "
                         "foreach=True or fused=True (default: default)")
    ap.add_argument("--no-compile", action="store_true", help="skip the cold/warm compile measurement")
    ap.add_argument("--no-profile", dest="profile", action="store_false",
                    help="skip the split of dlc's step time and the per-kernel times")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the check that dlc and PyTorch compute the same losses")
    if bench.forward:
        ap.add_argument("--no-forward", dest="forward", action="store_false",
                        help="skip the forward-only measurement (dlc's evaluation program vs torch.no_grad)")
    else:
        ap.add_argument("--forward", action="store_true",
                        help="also time the forward pass alone (dlc's evaluation program vs torch.no_grad)")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each measurement, wait up to S seconds for the machine to be idle "
                         "(other processes under 0.1 core for 2 s): for shared machines (default 0)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    if bench.add_args:
        bench.add_args(ap)
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_args", help=argparse.SUPPRESS)
    return ap


def main(bench: Bench, argv=None) -> int:
    ap = parser(bench)
    a = ap.parse_args(argv)

    if a._worker:
        for k, v in json.loads(a._args).items():
            setattr(a, k, v)
        a.model = Path(a.model)
        fn = {"dlc": worker_dlc, "compile": worker_compile,
              "torch": lambda a: worker_torch(a, bench), "check": lambda a: worker_check(a, bench),
              "jax": lambda a: worker_jax(a, bench)}
        res = fn[a._worker](a)
        import resource
        res["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024     # Linux: KiB
        print(json.dumps(res))
        return 0

    a.model = a.model.resolve()
    with tempfile.TemporaryDirectory(prefix="dlc-bench-") as tmp:
        shown = a.model.relative_to(ROOT) if a.model.is_relative_to(ROOT) else a.model
        if bench.prepare:
            a.model = bench.prepare(a, Path(tmp)).resolve()
        out = (bench.drive or drive)(bench, a, str(shown))
    if a.json:
        print(json.dumps(out, indent=None))
    else:
        print_report(out)
    return 0


def drive(bench: Bench, a, shown: str) -> dict:
    threads = []
    for t in a.threads.split(","):
        t = t.strip()
        threads.append(None if t == "default" else int(t))
    torch_ok = have_torch() and not a.no_torch
    q = a.json
    load_before = os.getloadavg()
    out = {"model": shown, "shapes": bench.shapes,
           "steps": a.steps, "repeats": a.repeats, "warmup": a.warmup, "max_seconds": a.max_seconds,
           "machine": {"cores": os.cpu_count(), "python": platform.python_version(),
                       "processor": platform.processor() or platform.machine(),
                       "env": {k: os.environ[k] for k in sorted(os.environ)
                               if k.startswith("OPENBLAS") or k in THREAD_VARS}},
           "results": [], "ratios": []}
    import numba
    import numpy
    out["machine"]["numpy"], out["machine"]["numba"] = numpy.__version__, numba.__version__

    if not a.no_compile:
        with tempfile.TemporaryDirectory(prefix="dlc-bench-cache-") as d:
            log("compiling with an empty kernel cache ...", q)
            cold = run_worker(bench, "compile", a, env_extra={"DLC_CACHE_DIR": d})
            log("compiling again from the filled cache ...", q)
            warm = run_worker(bench, "compile", a, env_extra={"DLC_CACHE_DIR": d})
        out["compile"] = {"cold": cold, "warm": warm}

    for t in threads:
        log(f"dlc, threads={t or 'default'} ...", q)
        out["results"].append(run_worker(bench, "dlc", a, threads=t))
        if torch_ok:
            log(f"PyTorch, threads={t or 'default'} ...", q)
            out["results"].append(run_worker(bench, "torch", a, threads=t))
    for r in out["results"]:
        r["contended"] = contended(r, out["machine"]["cores"])
    if torch_ok:
        for t in threads:
            d = next(r for r in out["results"] if r["framework"] == "dlc" and r["threads"] == t)
            p = next(r for r in out["results"] if r["framework"] == "torch" and r["threads"] == t)
            ratio = {"threads": t, "dlc_over_torch": d["median_ms"] / p["median_ms"],
                     "contended": d["contended"] or p["contended"]}
            if "forward" in d and "forward" in p:
                ratio["forward_dlc_over_torch"] = d["forward"]["median_ms"] / p["forward"]["median_ms"]
            out["ratios"].append(ratio)

        def best(fw):     # the fastest row, among the clean ones if there are any
            rows = [r for r in out["results"] if r["framework"] == fw]
            return min([r for r in rows if not r["contended"]] or rows, key=lambda r: r["median_ms"])
        best_d, best_p = best("dlc"), best("torch")
        out["best"] = {"dlc_threads": best_d["threads"], "torch_threads": best_p["threads"],
                       "dlc_over_torch": best_d["median_ms"] / best_p["median_ms"]}
        if a.check:
            log("checking that both compute the same steps ...", q)
            out["check"] = run_worker(bench, "check", a, threads=1)
        out["torch"] = next(r["torch"] for r in out["results"] if r["framework"] == "torch")
    else:
        out["torch"] = None
        out["torch_missing"] = ("PyTorch is not installed: pip install -e '.[bench]' "
                                "(or pip install torch==2.13.0; the CPU wheel is enough)") if not a.no_torch else None
    out["load_avg_before"] = load_before
    out["load_avg_after"] = os.getloadavg()
    return out


def contended(r: dict, cores: int) -> bool:
    """Did other processes and this measurement's threads want more cores than there are?"""
    return (r["threads"] or cores) + r.get("other_load", 0.0) > cores + 0.2


def fmt_threads(t):
    return "default" if t is None else str(t)


def print_report(out: dict):
    print(f"dlc training-step benchmark: {out['model']}")
    print(f"  {out['shapes']}")
    m = out["machine"]
    print(f"  {m['cores']} cores, Python {m['python']}, numpy {m['numpy']}, numba {m['numba']}"
          + (f", torch {out['torch']}" if out.get("torch") else ""))
    if m["env"]:
        print("  env: " + " ".join(f"{k}={v}" for k, v in m["env"].items()))
    print(f"  {out['repeats']} repeats x up to {out['steps']} steps after {out['warmup']} warm-up steps; "
          "median of the repeats" + (f"; at most {out['max_seconds']:g} s a figure" if out.get("max_seconds") else ""))
    print()
    ratio = {r["threads"]: r["dlc_over_torch"] for r in out["ratios"]}
    ratio_bad = {r["threads"]: r["contended"] for r in out["ratios"]}
    hdr = (f"{'framework':<20} {'threads':>7} {'median ms/step':>15} {'steps/s':>9} {'min-max ms':>19} "
           f"{'dlc/torch':>10} {'others':>7} {'steps':>6}")
    print(hdr)
    print("-" * len(hdr))
    for r in out["results"]:
        rr = (f"{ratio[r['threads']]:.2f}" + ("*" if ratio_bad[r["threads"]] else ""))\
            if r["framework"] == "dlc" and r["threads"] in ratio else ""
        name = r["framework"] + ("" if r.get("adam_impl", "default") == "default" else f" ({r['adam_impl']} Adam)")
        mark = "*" if contended(r, out["machine"]["cores"]) else " "
        print(f"{name:<20} {fmt_threads(r['threads']):>7} {r['median_ms']:>15.4f} "
              f"{r['steps_per_s']:>9.0f} {r['min_ms']:>9.4f}-{r['max_ms']:<9.4f} {rr:>10} "
              f"{r.get('other_load', float('nan')):>6.2f}{mark} {r.get('steps', ''):>6}")
    print("(others: cores kept busy by other processes meanwhile, on average; * where they and the\n"
          " measured threads together wanted more cores than there are: a figure to distrust;\n"
          " steps: steps per timed repeat, fewer than asked where --max-seconds capped them)")
    if any("forward" in r for r in out["results"]):
        fr = {r["threads"]: r.get("forward_dlc_over_torch") for r in out["ratios"]}
        print("\nforward pass alone (dlc: the evaluation program, Session.run_eval; PyTorch: model and loss "
              "under torch.no_grad()):")
        hdr = f"{'framework':<20} {'threads':>7} {'median ms':>15} {'min-max ms':>19} {'dlc/torch':>10} {'share of step':>14}"
        print(hdr)
        print("-" * len(hdr))
        for r in out["results"]:
            f = r.get("forward")
            if not f:
                continue
            rr = fr.get(r["threads"]) if r["framework"] == "dlc" else None
            print(f"{r['framework']:<20} {fmt_threads(r['threads']):>7} {f['median_ms']:>15.4f} "
                  f"{f['min_ms']:>9.4f}-{f['max_ms']:<9.4f} {'' if rr is None else f'{rr:.2f}':>10} "
                  f"{f['median_ms'] / r['median_ms']:>13.0%}")
    print()
    for r in out["results"]:
        pools = ", ".join(f"{p['lib'].split('-')[0]}({p['api']})={p['threads']}" for p in r["thread_pools"])
        extra = f"; torch.get_num_threads()={r['torch_threads']}" if r["framework"] == "torch" else ""
        print(f"  {r['framework']} threads={fmt_threads(r['threads'])}: {pools or 'threadpoolctl not installed'}{extra}")
    if out.get("best"):
        b = out["best"]
        print(f"\nbest of each: dlc (threads={fmt_threads(b['dlc_threads'])}) / torch "
              f"(threads={fmt_threads(b['torch_threads'])}) = {b['dlc_over_torch']:.2f}")
    if out.get("torch_missing"):
        print(f"\n{out['torch_missing']}")
    if out.get("check"):
        c = out["check"]
        print(f"same initial weights, {c['steps']} steps: max relative loss difference "
              f"{c['max_rel_loss_diff']:.2e}, max weight difference {c['max_abs_weight_diff']:.2e}")
    if out.get("compile"):
        c = out["compile"]
        cold, warm = c["cold"], c["warm"]
        print("\ndlc compile time (Session(...): parse, load data, lower, optimize, build kernels):")
        print(f"  cold (empty kernel cache)  {cold['compile_seconds']:6.2f} s")
        print(f"  warm (kernel cache hit: {warm['kernel_cache_hit']!s:<5}) {warm['compile_seconds']:6.2f} s   "
              f"(parse + data + lowering: {warm['lower_seconds']:.2f} s; importing dlc first: {warm['import_seconds']:.2f} s)")
    for r in out["results"]:
        if r["framework"] == "dlc" and "profile_skipped" in r:
            print(f"\nno profile of the dlc step at threads={fmt_threads(r['threads'])}: {r['profile_skipped']}")
        if r["framework"] != "dlc" or "profile" not in r:
            continue
        p = r["profile"]
        sp = p["split_ms"]
        print(f"\nwhere a dlc step goes (threads={fmt_threads(r['threads'])}), ms:")
        for k, label in (("train_step", "Session.train_step, total"),
                         ("python_args", f"  assembling the {p.get('arg_count', '')} arguments (Session._args, bias corrections)"),
                         ("python_other", "  rest of train_step (float(loss), return)"),
                         ("numba_dispatch", "  Numba dispatch (typing arguments, boxing results)"),
                         ("compiled_step", "  compiled step (called from compiled code)")):
            print(f"  {label:<66} {sp[k]:8.4f}")
        print(f"  {'    of which its ' + str(p['kernel_count']) + ' kernels, each timed alone':<66} "
              f"{p['kernels_total_ms']:8.4f}")
        print(f"  {'    of which allocations and glue (the rest)':<66} {p['allocs_and_glue_ms']:8.4f}")
        print(f"  {'kernel':<9} {'pattern':<12} {'us':>9} {'BLAS us':>8}  {'gemm':<28} first op")
        for k in p["kernels"]:
            blas = f"{k['blas_us']:8.2f}" if "blas_us" in k else " " * 8
            print(f"  {k['kernel']:<9} {k['pattern']:<12} {k['us']:9.2f} {blas}  {k.get('gemm', ''):<28} {k['first_op'][:60]}")
            if k.get("parts"):
                body = sum(s["total_us"] for s in k["parts"])
                print(f"    its body's kernels, timed alone (per call x calls = total us; sum {body:.0f} us, "
                      f"the rest is the scan's own copies and allocations):")
                for s in k["parts"]:
                    blas = f"{s['blas_us']:8.2f}" if "blas_us" in s else " " * 8
                    print(f"    {s['kernel']:<9} {s['pattern']:<12} {s['us']:7.2f} x{s['calls']:<4} = {s['total_us']:9.1f} "
                          f"{blas}  {s.get('gemm', ''):<28} {s['first_op'][:48]}")
    if any(contended(r, out["machine"]["cores"]) for r in out["results"]):
        print("\nnote: other processes competed for the cores during the rows marked *: rerun on a quiet "
              "machine (or with --wait-quiet 120) for clean figures")
