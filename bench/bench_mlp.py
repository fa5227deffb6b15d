"""Median time per training step of `examples/mlp.dl` with dlc, beside the same model in PyTorch.

    python bench/bench_mlp.py                 # table: dlc vs PyTorch at 1 and all threads
    python bench/bench_mlp.py --json          # one JSON object instead
    python bench/bench_mlp.py --threads 1 --steps 1000 --repeats 7

Model: 64-128-64-10 MLP with ReLU, batch 64, float32, softmax cross-entropy with integer
labels, Adam with the `.dl` file's settings (lr 1e-3; its L2 weight decay on the weights, as
dlc applies it, which torch.optim.Adam does with a parameter group). The batches are the
`.dl` file's own training data (the scikit-learn digits), identical for both frameworks.

Every measurement runs in its own subprocess, so each one's thread settings (OpenBLAS,
OpenMP, MKL: set through the environment before numpy is imported, and again with
threadpoolctl where it is installed; `torch.set_num_threads` for PyTorch) are its own, and
no framework's spinning worker threads slow another. A step is timed as `repeats` runs of
`steps` consecutive steps (garbage collector off), after `warmup` steps; the figure is the
median over the repeats of the mean time per step.

The dlc workers also split a step into Python argument assembly, Numba dispatch, and the
compiled step (by calling it in a loop from compiled code), and time each generated kernel
alone the same way (`--no-profile` skips this).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "examples" / "mlp.dl"
THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


# ---- shared helpers (run inside the workers) ---------------------------------------------------

def time_steps(fn, steps: int, repeats: int, warmup: int) -> list[float]:
    """Seconds per call of fn(i), one figure per repeat (the mean over `steps` calls)."""
    for i in range(warmup):
        fn(i)
    per = []
    was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i in range(steps):
                fn(i)
            per.append((time.perf_counter() - t0) / steps)
    finally:
        if was_enabled:
            gc.enable()
    return per


def summary(per: list[float]) -> dict:
    med = statistics.median(per)
    return {"median_ms": 1e3 * med, "steps_per_s": 1.0 / med, "min_ms": 1e3 * min(per),
            "max_ms": 1e3 * max(per), "repeats_ms": [round(1e3 * p, 5) for p in per]}


def load_problem(model: Path, n_batches: int) -> dict:
    """The `.dl` file's optimizer, batch size, parameter shapes and `n_batches` training batches,
    found the way `runtime.session.Session` finds them (no kernels are compiled)."""
    import numpy as np

    from compiler.lower import Lowerer
    from dsl.parser import parse_file
    from runtime import data
    from runtime.session import DEFAULTS, _literal_setting

    module = parse_file(model)
    low = Lowerer(module, "f32")
    train = low.trains[0]
    seed = _literal_setting(train, "seed")
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


def _time_compiled(loop, args, inner: int, repeats: int) -> float:
    """Median seconds per inner call of a compiled loop."""
    loop(1, *args)
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(inner, *args)
        per.append((time.perf_counter() - t0) / inner)
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


def profile_dlc(s, batch: dict, steps: int, repeats: int) -> dict:
    """Where a dlc step goes: Python around the call, Numba dispatch, the compiled step, kernels."""
    import numpy as np
    from numba import njit

    from compiler.optim import bias_corrections

    ex = s.train_ex
    G = ex.fn.py_func.__globals__             # the generated module's namespace
    sc = {"lr": s.optimizer.lr, **bias_corrections(s.optimizer, 10)}
    args = s._args(ex, batch, sc)
    out = {}
    # train_step vs. the executable called with ready arguments vs. the step run from compiled code
    per_step = time_steps(lambda i: s.train_step(batch), steps, repeats, 50)
    per_args = time_steps(lambda i: s._args(ex, batch, {"lr": s.optimizer.lr,
                                                       **bias_corrections(s.optimizer, i + 1)}),
                          steps, repeats, 50)
    per_ex = time_steps(lambda i: ex(*args), steps, repeats, 50)
    loop = _njit_loop(G["step"], len(args))
    t_compiled = _time_compiled(loop, args, steps, repeats)
    t_step, t_args, t_ex = (statistics.median(p) for p in (per_step, per_args, per_ex))
    out["split_ms"] = {
        "train_step": 1e3 * t_step,
        "python_args": 1e3 * t_args,                       # _args + bias corrections
        "python_other": 1e3 * max(t_step - t_ex - t_args, 0.0),   # float(loss), tuple, etc.
        "numba_dispatch": 1e3 * max(t_ex - t_compiled, 0.0),   # typing 23 arguments, boxing results
        "compiled_step": 1e3 * t_compiled,
    }
    # each kernel alone: record the calls of one step run as Python, then time each in a loop
    calls = []
    kernels = {k: v for k, v in G.items() if re.fullmatch(r"k\d+", k)}

    def recorder(name, fn):
        def call(*a):
            calls.append((name, a))
            return fn(*a)
        return call

    G.update({k: recorder(k, v) for k, v in kernels.items()})
    try:
        ex.fn.py_func(*_copy_args(args))
    finally:
        G.update(kernels)
    heads = dict(re.findall(r"# ---- kernel (k\d+): (\w+), \d+ ops? ----", ex.source))
    first_ir = {}
    for m in re.finditer(r"# ---- kernel (k\d+).*\n# (%\d+: [^=]+= \w+)", ex.source):
        first_ir[m.group(1)] = " ".join(m.group(2).split())
    rows, total = [], 0.0
    inner = max(steps // 2, 50)
    g2 = {"np": np}
    exec("def dot1(a, b, c):\n    np.dot(a, b, c)\n", g2)
    dot_loop = _njit_loop(njit(g2["dot1"]), 3, "dot_loop")
    for name, a in calls:
        kl = _njit_loop(kernels[name], len(a), f"loop_{name}")
        t = _time_compiled(kl, _copy_args(a), inner, repeats)
        total += t
        rows.append({"kernel": name, "pattern": heads.get(name, "?"), "first_op": first_ir.get(name, ""),
                     "us": 1e6 * t})
        # for a matmul kernel, the BLAS call alone (the rest is its fused epilogue)
        body = ex.source.split(f"def {name}(", 1)[1].split("\n\n", 1)[0]
        m = re.search(r"np\.dot\((\w+)(\.T)?, (\w+)(\.T)?, (\w+)\)", body)
        if m:
            sig = body.split(")", 1)[0].split(", ")
            pos = {p: i for i, p in enumerate(sig)}
            A, B = a[pos[m.group(1)]], a[pos[m.group(3)]]
            A, B = (A.T if m.group(2) else A), (B.T if m.group(4) else B)
            C = np.empty((A.shape[0], B.shape[1]), A.dtype)
            td = _time_compiled(dot_loop, [A, B, C], inner, repeats)
            rows[-1]["blas_us"] = 1e6 * td
            tr = ", ".join(x for x, t in (("A^T", m.group(2)), ("B^T", m.group(4))) if t)
            rows[-1]["gemm"] = f"{A.shape[0]}x{A.shape[1]} @ {B.shape[0]}x{B.shape[1]}" + (f" ({tr})" if tr else "")
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
    s = Session(a.model, Options())
    limiter = limit_threads(a.threads)
    batches = prob["batches"]
    nb = len(batches)
    per = time_steps(lambda i: s.train_step(batches[i % nb]), a.steps, a.repeats, a.warmup)
    res = {"framework": "dlc", "threads": a.threads, **summary(per), "thread_pools": thread_info(),
           "compile_seconds": s.compile_seconds, "kernel_cache_hit": s.cache_hit,
           "kernel_count": s.train_ex.kernels, "import_seconds": import_s}
    if a.profile:
        res["profile"] = profile_dlc(s, batches[0], a.steps, a.repeats)
    del limiter
    return res


def worker_compile(a) -> dict:
    """One process's compile: the caller points DLC_CACHE_DIR at an empty or a filled cache."""
    t0 = time.perf_counter()
    from runtime.session import Options, Session
    t1 = time.perf_counter()
    s = Session(a.model, Options())
    return {"import_seconds": t1 - t0, "compile_seconds": s.compile_seconds,
            "lower_seconds": s.lower_seconds, "kernel_cache_hit": s.cache_hit,
            "process_seconds": time.perf_counter() - t0}


# ---- PyTorch -----------------------------------------------------------------------------------

def torch_model(prob, adam_impl: str = "default"):
    import torch
    from torch import nn
    spec = prob["optimizer"]
    dims = [(64, 128), (128, 64), (64, 10)]
    want = [v for k, v in sorted(prob["params"].items()) if len(v) == 2]
    if sorted(want) != sorted(dims):
        raise SystemExit(f"the .dl model's weights are {want}; this benchmark's PyTorch model is {dims}")
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))
    if spec is None or spec.name not in ("adam", "adamw"):
        raise SystemExit(f"this benchmark mirrors Adam/AdamW; the .dl file uses {spec and spec.name}")
    if spec.decay not in ("weights", "all"):
        raise SystemExit("this benchmark mirrors decay = weights or all")
    decayed = [p for p in model.parameters() if p.ndim >= 2 or spec.decay == "all"]
    other = [p for p in model.parameters() if not (p.ndim >= 2 or spec.decay == "all")]
    groups = [{"params": decayed, "weight_decay": spec.weight_decay}]
    if other:
        groups.append({"params": other, "weight_decay": 0.0})
    cls = torch.optim.AdamW if spec.name == "adamw" else torch.optim.Adam
    impl = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}[adam_impl]
    opt = cls(groups, lr=spec.lr, betas=(spec.beta1, spec.beta2), eps=spec.eps, **impl)
    return model, opt


def torch_step_fn(model, opt):
    import torch.nn.functional as F

    def step(x, y):
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        return loss.item()          # dlc's train_step returns the loss as a Python float too
    return step


def worker_torch(a) -> dict:
    import torch
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    prob = load_problem(a.model, a.batches)
    limiter = limit_threads(a.threads)
    torch.manual_seed(0)
    model, opt = torch_model(prob, a.torch_adam)
    tb = [(torch.from_numpy(b["x"]), torch.from_numpy(b["y"].astype("int64"))) for b in prob["batches"]]
    nb = len(tb)
    step = torch_step_fn(model, opt)
    per = time_steps(lambda i: step(*tb[i % nb]), a.steps, a.repeats, a.warmup)
    res = {"framework": "torch", "threads": a.threads, **summary(per), "thread_pools": thread_info(),
           "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
           "torch_interop_threads": torch.get_num_interop_threads(),
           "optimizer": type(opt).__name__, "adam_impl": a.torch_adam}
    del limiter
    return res


def worker_check(a) -> dict:
    """Same initial weights, same batches: do dlc and PyTorch compute the same steps?"""
    import numpy as np
    import torch

    from runtime.session import Options, Session
    prob = load_problem(a.model, 8)
    s = Session(a.model, Options())
    model, opt = torch_model(prob)
    lin = [m for m in model if isinstance(m, torch.nn.Linear)]
    names = [f"mlp/dense_{i + 1}" for i in range(len(lin))]
    with torch.no_grad():
        for m, n in zip(lin, names):
            m.weight.copy_(torch.from_numpy(s.params[f"{n}/W"].T.copy()))
            m.bias.copy_(torch.from_numpy(s.params[f"{n}/b"]))
    step = torch_step_fn(model, opt)
    diffs = []
    for i in range(20):
        b = prob["batches"][i % 8]
        ld, _ = s.train_step(b)
        lt = step(torch.from_numpy(b["x"]), torch.from_numpy(b["y"].astype("int64")))
        diffs.append(abs(ld - lt) / max(abs(lt), 1e-12))
    pdiff = max(float(np.abs(s.params[f"{n}/W"] - m.weight.detach().numpy().T).max())
                for m, n in zip(lin, names))
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


def _children_cpu_seconds():
    import resource
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_worker(kind: str, a, threads=None, env_extra=None, timeout=900) -> dict:
    """Run one measurement in a fresh process; add `other_load`: the average number of cores
    that other processes kept busy meanwhile (from /proc/stat), to tell a noisy figure."""
    env = dict(os.environ)
    if threads is not None:
        for v in THREAD_VARS:
            env[v] = str(threads)
    env.update(env_extra or {})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, "--model", str(a.model),
           "--steps", str(a.steps), "--repeats", str(a.repeats), "--warmup", str(a.warmup),
           "--batches", str(a.batches), "--torch-adam", a.torch_adam]
    if threads is not None:
        cmd += ["--_threads", str(threads)]
    if not a.profile:
        cmd.append("--no-profile")
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the .dl file (default: examples/mlp.dl)")
    ap.add_argument("--steps", type=int, default=500, help="steps per timed repeat (default 500)")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats; the median is reported (default 5)")
    ap.add_argument("--warmup", type=int, default=100, help="untimed steps first (default 100)")
    ap.add_argument("--batches", type=int, default=16, help="distinct batches cycled through (default 16)")
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
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each measurement, wait up to S seconds for the machine to be idle "
                         "(other processes under 0.1 core for 2 s): for shared machines (default 0)")
    ap.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_threads", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    a.model = a.model.resolve()

    if a._worker:
        a.threads = a._threads
        fn = {"dlc": worker_dlc, "torch": worker_torch, "compile": worker_compile, "check": worker_check}
        print(json.dumps(fn[a._worker](a)))
        return 0

    threads = []
    for t in a.threads.split(","):
        t = t.strip()
        threads.append(None if t == "default" else int(t))
    torch_ok = have_torch() and not a.no_torch
    q = a.json
    load_before = os.getloadavg()
    out = {"model": str(a.model.relative_to(ROOT) if a.model.is_relative_to(ROOT) else a.model),
           "shapes": "64-128-64-10 MLP, ReLU, batch 64, f32, softmax cross-entropy (int labels), Adam",
           "steps": a.steps, "repeats": a.repeats, "warmup": a.warmup,
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
            cold = run_worker("compile", a, env_extra={"DLC_CACHE_DIR": d})
            log("compiling again from the filled cache ...", q)
            warm = run_worker("compile", a, env_extra={"DLC_CACHE_DIR": d})
        out["compile"] = {"cold": cold, "warm": warm}

    for t in threads:
        log(f"dlc, threads={t or 'default'} ...", q)
        out["results"].append(run_worker("dlc", a, threads=t))
        if torch_ok:
            log(f"PyTorch, threads={t or 'default'} ...", q)
            out["results"].append(run_worker("torch", a, threads=t))
    for r in out["results"]:
        r["contended"] = contended(r, out["machine"]["cores"])
    if torch_ok:
        for t in threads:
            d = next(r for r in out["results"] if r["framework"] == "dlc" and r["threads"] == t)
            p = next(r for r in out["results"] if r["framework"] == "torch" and r["threads"] == t)
            out["ratios"].append({"threads": t, "dlc_over_torch": d["median_ms"] / p["median_ms"],
                                  "contended": d["contended"] or p["contended"]})

        def best(fw):     # the fastest row, among the clean ones if there are any
            rows = [r for r in out["results"] if r["framework"] == fw]
            return min([r for r in rows if not r["contended"]] or rows, key=lambda r: r["median_ms"])
        best_d, best_p = best("dlc"), best("torch")
        out["best"] = {"dlc_threads": best_d["threads"], "torch_threads": best_p["threads"],
                       "dlc_over_torch": best_d["median_ms"] / best_p["median_ms"]}
        if a.check:
            log("checking that both compute the same steps ...", q)
            out["check"] = run_worker("check", a)
        out["torch"] = next(r["torch"] for r in out["results"] if r["framework"] == "torch")
    else:
        out["torch"] = None
        out["torch_missing"] = ("PyTorch is not installed: pip install -e '.[bench]' "
                                "(or pip install torch==2.13.0; the CPU wheel is enough)") if not a.no_torch else None
    out["load_avg_before"] = load_before
    out["load_avg_after"] = os.getloadavg()

    if a.json:
        print(json.dumps(out, indent=None))
    else:
        print_report(out)
    return 0


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
    print(f"  {out['repeats']} repeats x {out['steps']} steps after {out['warmup']} warm-up steps; "
          "median of the repeats")
    print()
    ratio = {r["threads"]: r["dlc_over_torch"] for r in out["ratios"]}
    ratio_bad = {r["threads"]: r["contended"] for r in out["ratios"]}
    hdr = f"{'framework':<20} {'threads':>7} {'median ms/step':>15} {'steps/s':>9} {'min-max ms':>17} {'dlc/torch':>10} {'others':>7}"
    print(hdr)
    print("-" * len(hdr))
    for r in out["results"]:
        rr = (f"{ratio[r['threads']]:.2f}" + ("*" if ratio_bad[r["threads"]] else ""))\
            if r["framework"] == "dlc" and r["threads"] in ratio else ""
        name = r["framework"] + ("" if r.get("adam_impl", "default") == "default" else f" ({r['adam_impl']} Adam)")
        mark = "*" if contended(r, out["machine"]["cores"]) else " "
        print(f"{name:<20} {fmt_threads(r['threads']):>7} {r['median_ms']:>15.4f} "
              f"{r['steps_per_s']:>9.0f} {r['min_ms']:>8.4f}-{r['max_ms']:<8.4f} {rr:>10} "
              f"{r.get('other_load', float('nan')):>6.2f}{mark}")
    print("(others: cores kept busy by other processes meanwhile, on average; * where they and the\n"
          " measured threads together wanted more cores than there are: a figure to distrust)")
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
        if r["framework"] != "dlc" or "profile" not in r:
            continue
        p = r["profile"]
        sp = p["split_ms"]
        print(f"\nwhere a dlc step goes (threads={fmt_threads(r['threads'])}), ms:")
        for k, label in (("train_step", "Session.train_step, total"),
                         ("python_args", "  assembling the 23 arguments (Session._args, bias corrections)"),
                         ("python_other", "  rest of train_step (float(loss), return)"),
                         ("numba_dispatch", "  Numba dispatch (typing arguments, boxing results)"),
                         ("compiled_step", "  compiled step (called from compiled code)")):
            print(f"  {label:<66} {sp[k]:8.4f}")
        print(f"  {'    of which its ' + str(p['kernel_count']) + ' kernels, each timed alone':<66} "
              f"{p['kernels_total_ms']:8.4f}")
        print(f"  {'    of which allocations and glue (the rest)':<66} {p['allocs_and_glue_ms']:8.4f}")
        print(f"  {'kernel':<7} {'pattern':<12} {'us':>8} {'BLAS us':>8}  {'gemm':<28} first op")
        for k in p["kernels"]:
            blas = f"{k['blas_us']:8.2f}" if "blas_us" in k else " " * 8
            print(f"  {k['kernel']:<7} {k['pattern']:<12} {k['us']:8.2f} {blas}  {k.get('gemm', ''):<28} {k['first_op'][:60]}")
    if any(contended(r, out["machine"]["cores"]) for r in out["results"]):
        print("\nnote: other processes competed for the cores during the rows marked *: rerun on a quiet "
              "machine (or with --wait-quiet 120) for clean figures")


if __name__ == "__main__":
    sys.exit(main())
