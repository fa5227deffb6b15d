"""Every training-step workload, dlc against PyTorch eager, torch.compile and JAX jit, in one run.

    python bench/bench_all.py                     # MLP, LeNet, LSTM, GPT; threads 1 and all cores (~15 min)
    python bench/bench_all.py --only lstm,lenet --rounds 3
    python bench/bench_all.py --quick             # smoke test: MLP only, a few steps, one round
    python bench/bench_all.py --json              # one JSON object instead of the tables

The workloads are those of bench_mlp.py, bench_lenet.py, bench_lstm.py and bench_gpt.py (their
`.dl` files, PyTorch twins, data) and every figure comes from their workers in bench/common.py:
a fresh process per figure, the median over repeats of `steps` consecutive steps. The JAX twins
(`jax_model` in each script; Adam written out in common.worker_jax, all in one `jax.jit` step)
run where JAX is installed (`pip install -e '.[bench]'`), torch.compile where PyTorch is.

The frameworks alternate: each round runs every (framework, thread count) once, in an order
rotated from round to round, so a machine that gets busier or quieter moves them all alike; a
figure is the median over the rounds. dlc is run at each thread count as its cap (it decides
itself how to use the cores it is given: runtime/threads.py); each peer at each thread count
(torch.set_num_threads, OpenBLAS/OpenMP variables, XLA's intra-op threads), and its best counts.

Also per workload: the GEMM FLOPs of dlc's step (runtime/threads.py counts them, scan bodies
once per time step; the elementwise work is left out) and dlc's GFLOP/s against the sgemm peak this machine reaches through the BLAS dlc's
kernels call (`np.dot` in an `@njit` function, 1024^3, each thread count; measured here), the
peak RSS of each worker process (compile included: a JIT's compiler counts), and one line of
where dlc's step goes (the profile of common.profile_dlc: the compiled step, the Python and
dispatch around it, the costliest kernels).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve().parent
WORKLOADS = ("mlp", "lenet", "lstm", "gpt")
TARGETS = {"mlp": 0.30, "lenet": 0.70, "lstm": 0.90, "gpt": 0.70}      # dlc / best peer (issue 14)
FRAMEWORKS = ("dlc", "torch", "torch.compile", "jax")


def workload(name: str) -> common.Bench:
    import importlib
    return importlib.import_module(f"bench_{name}").BENCH


def installed(module: str) -> bool:
    import importlib.util
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ---- the sgemm peak -----------------------------------------------------------------------------

def sgemm_worker(n: int) -> dict:
    """GFLOP/s of an n^3 float32 GEMM through `np.dot` in compiled code: the BLAS dlc calls."""
    import numpy as np
    from numba import njit

    @njit
    def loop(k, a, b, c):
        for _ in range(k):
            np.dot(a, b, c)
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((n, n)).astype(np.float32) for _ in range(2))
    c = np.empty((n, n), np.float32)
    loop(1, a, b, c)
    t0 = time.perf_counter()
    loop(1, a, b, c)
    k = max(1, int(0.3 / max(time.perf_counter() - t0, 1e-6)))
    best = min(_timed(loop, k, a, b, c) for _ in range(5))
    return {"n": n, "gflops": 2 * n ** 3 / best / 1e9}


def _timed(loop, k, *args) -> float:
    t0 = time.perf_counter()
    loop(k, *args)
    return (time.perf_counter() - t0) / k


def sgemm_peak(threads: list, n: int) -> dict:
    """{thread count: GFLOP/s}, each measured in a fresh process with the thread variables set."""
    out = {}
    for t in threads:
        env = dict(os.environ)
        if t is not None:
            env.update({v: str(t) for v in common.THREAD_VARS})
        p = subprocess.run([sys.executable, __file__, "--_sgemm", str(n)], env=env, capture_output=True,
                           text=True, timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"sgemm worker failed:\n{p.stderr[-2000:]}")
        out[common.fmt_threads(t)] = json.loads(p.stdout.strip().splitlines()[-1])["gflops"]
    return out


# ---- one workload -------------------------------------------------------------------------------

def bench_args(bench: common.Bench, a, tmp: Path):
    """The workload script's own options (its defaults), with this run's step counts."""
    argv = ["--no-profile", "--no-check", "--json", "--max-seconds", str(a.max_seconds)]
    if a.quick:
        argv += ["--steps", "20", "--repeats", "2", "--warmup", "5"]
    elif a.repeats:
        argv += ["--repeats", str(a.repeats)]
    wa = common.parser(bench).parse_args(argv)
    wa.forward, wa.wait_quiet, wa.torch_compile = False, a.wait_quiet, False
    wa.model = wa.model.resolve()
    if bench.prepare:
        wa.model = bench.prepare(wa, tmp).resolve()
    return wa


def run_workload(name: str, a, frameworks: list, threads: list, log) -> dict:
    bench = workload(name)
    with tempfile.TemporaryDirectory(prefix=f"dlc-bench-{name}-") as tmp:
        wa = bench_args(bench, a, Path(tmp))
        configs = [(fw, t) for t in threads for fw in frameworks]
        runs = {c: [] for c in configs}
        for r in range(a.rounds):
            k = r % len(configs)
            for fw, t in configs[k:] + configs[:k]:
                log(f"{name}: round {r + 1}/{a.rounds}, {fw}, threads={common.fmt_threads(t)} ...")
                wa.torch_compile = fw == "torch.compile"
                kind = {"torch.compile": "torch"}.get(fw, fw)
                runs[(fw, t)].append(common.run_worker(bench, kind, wa, threads=t))
        rows = []
        for (fw, t), rs in runs.items():
            med = [x["median_ms"] for x in rs]
            other = [x.get("other_load", 0.0) for x in rs]
            rows.append({"framework": fw, "threads": t, "median_ms": statistics.median(med), "rounds_ms": med,
                         "other_load": round(statistics.mean(other), 2), "steps": min(x["steps"] for x in rs),
                         "max_rss_mb": max(x["max_rss_mb"] for x in rs),
                         "contended": any(common.contended(x, os.cpu_count()) for x in rs)})
        best = {fw: min((r for r in rows if r["framework"] == fw), key=lambda r: r["median_ms"])
                for fw in frameworks}
        out = {"workload": name, "shapes": bench.shapes, "rows": rows, "best": best}
        peers = [best[fw] for fw in frameworks if fw != "dlc"]
        if peers:
            peer = min(peers, key=lambda r: r["median_ms"])
            out["best_peer"] = peer["framework"]
            out["dlc_over_best_peer"] = best["dlc"]["median_ms"] / peer["median_ms"]
        out["flops"] = runs[next(c for c in configs if c[0] == "dlc")][0]["cores"]["gemm_mflop"] * 1e6
        if a.profile:
            log(f"{name}: profiling dlc's step ...")
            wa.profile = True
            prof = common.run_worker(bench, "dlc", wa, threads=best["dlc"]["threads"])
            out["profile"] = prof.get("profile") or {"skipped": prof.get("profile_skipped")}
    return out


def where_it_goes(p: dict) -> str:
    """One line from common.profile_dlc's split: the compiled step, Python around it, top kernels."""
    if "split_ms" not in p:
        return f"no profile ({p.get('skipped')})"
    sp = p["split_ms"]
    total = sp["train_step"]
    top = sorted(p["kernels"], key=lambda k: -k["us"])[:3]
    ks = ", ".join(f"{k['kernel']} {k['pattern']} {k['us'] / 1e3 / total:.0%}" for k in top)
    py = sp["python_args"] + sp["python_other"] + sp["numba_dispatch"]
    return (f"step {total:.3f} ms: compiled {sp['compiled_step'] / total:.0%} (kernels {p['kernels_total_ms'] / total:.0%}, "
            f"glue {p['allocs_and_glue_ms'] / total:.0%}), Python+dispatch {py / total:.0%}; top: {ks}")


# ---- report -------------------------------------------------------------------------------------

def print_report(out: dict):
    print("dlc vs PyTorch eager, torch.compile, JAX jit: median ms per training step (forward, backward, Adam)")
    m = out["machine"]
    print(f"  {m['cores']} cores, {m['processor']}; " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
    print(f"  sgemm peak (np.dot in njit, {out['sgemm_n']}^3): "
          + ", ".join(f"{v:.0f} GFLOP/s at {k} thread(s)" for k, v in out["sgemm_gflops"].items())
          + f"; load average before {out['load_avg_before'][0]:.2f}, after {out['load_avg_after'][0]:.2f}")
    print(f"  {out['rounds']} round(s), frameworks alternating; each cell: the best thread count's median (threads)")
    print()
    fws = out["frameworks"]
    hdr = (f"{'workload':<8} " + " ".join(f"{fw:>17}" for fw in fws)
           + f" {'dlc/best peer':>14} {'target':>7} {'GEMM MFLOP':>10} {'dlc GFLOP/s':>12}")
    print(hdr)
    print("-" * len(hdr))
    peak = max(out["sgemm_gflops"].values())
    for w in out["workloads"]:
        cells = []
        for fw in fws:
            b = w["best"][fw]
            cells.append(f"{b['median_ms']:9.3f} ({common.fmt_threads(b['threads'])}){'*' if b['contended'] else ' '}")
        ratio = f"{w['dlc_over_best_peer']:.2f} {w['best_peer'][:5]}" if "dlc_over_best_peer" in w else "-"
        flops = w.get("flops")
        gf = flops / (w["best"]["dlc"]["median_ms"] * 1e6) if flops else None
        print(f"{w['workload']:<8} " + " ".join(f"{c:>17}" for c in cells) + f" {ratio:>14} "
              f"{TARGETS.get(w['workload'], float('nan')):>7.2f} {flops / 1e6 if flops else float('nan'):>10.1f} "
              + (f"{gf:>5.1f} ({gf / peak:4.0%})" if gf else f"{'-':>12}"))
    print("(* : other processes competed for the cores during that figure: distrust it)")
    print("\nevery row, median ms (rounds), peak RSS of the worker process:")
    for w in out["workloads"]:
        for r in w["rows"]:
            print(f"  {w['workload']:<6} {r['framework']:<14} threads={common.fmt_threads(r['threads']):<8} "
                  f"{r['median_ms']:9.3f}  ({', '.join(f'{x:.3f}' for x in r['rounds_ms'])})  "
                  f"others {r['other_load']:.2f}{'*' if r['contended'] else ' '} {r['max_rss_mb']:7.0f} MB")
    if any("profile" in w for w in out["workloads"]):
        print("\nwhere dlc's step goes (its best thread count; bench_<workload>.py prints the whole profile):")
        for w in out["workloads"]:
            if "profile" in w:
                print(f"  {w['workload']:<6} {where_it_goes(w['profile'])}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(WORKLOADS), help=f"workloads, comma-separated (default: {','.join(WORKLOADS)})")
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                    help="frameworks, comma-separated; those not installed are skipped (default: all)")
    ap.add_argument("--threads", default=f"1,{os.cpu_count()}", help="thread counts, comma-separated (default: 1,<cores>)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of alternating runs; medians over them (default 3)")
    ap.add_argument("--repeats", type=int, default=0, help="timed repeats inside one run (default: the workload's)")
    ap.add_argument("--max-seconds", type=float, default=4.0, help="cap on one run's timed figure (default 4)")
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profile of dlc's step")
    ap.add_argument("--wait-quiet", type=float, default=0.0, metavar="S",
                    help="before each run, wait up to S seconds for an idle machine")
    ap.add_argument("--quick", action="store_true",
                    help="smoke test: the MLP only (unless --only), 20 steps x 2 repeats, one round, dlc and "
                         "PyTorch eager at the default threads, no profile")
    ap.add_argument("--json", action="store_true", help="print one JSON object (progress goes to stderr)")
    ap.add_argument("--_sgemm", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._sgemm:
        print(json.dumps(sgemm_worker(a._sgemm)))
        return 0
    given = set(argv if argv is not None else sys.argv[1:])
    if a.quick:
        a.rounds, a.profile = 1, False
        if "--only" not in given:
            a.only = "mlp"
        if "--frameworks" not in given:
            a.frameworks = "dlc,torch"
        if "--threads" not in given:
            a.threads = str(os.cpu_count())
    names = [w.strip() for w in a.only.split(",") if w.strip()]
    bad = [w for w in names if w not in WORKLOADS]
    if bad:
        ap.error(f"unknown workload(s) {', '.join(bad)}; choose from {', '.join(WORKLOADS)}")
    need = {"torch": "torch", "torch.compile": "torch", "jax": "jax"}
    frameworks = [fw for fw in a.frameworks.split(",") if fw in FRAMEWORKS and installed(need.get(fw, "numba"))]
    if "dlc" not in frameworks:
        frameworks.insert(0, "dlc")
    threads = [None if t.strip() == "default" else int(t) for t in a.threads.split(",")]

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    import platform

    import numba
    import numpy
    versions = {"numpy": numpy.__version__, "numba": numba.__version__}
    for mod in ("torch", "jax"):
        if installed(mod):
            versions[mod] = __import__(mod).__version__
    out = {"machine": {"cores": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                       "versions": versions},
           "frameworks": frameworks, "threads": threads, "rounds": a.rounds, "load_avg_before": os.getloadavg()}
    out["sgemm_n"] = 256 if a.quick else 1024
    log("measuring the sgemm peak ...")
    out["sgemm_gflops"] = sgemm_peak(threads, out["sgemm_n"])
    out["workloads"] = [run_workload(w, a, frameworks, threads, log) for w in names]
    out["load_avg_after"] = os.getloadavg()
    if a.json:
        print(json.dumps(out))
    else:
        print_report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
