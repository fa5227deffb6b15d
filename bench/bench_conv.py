"""conv2d on LeNet's layer shapes: dlc's im2col + BLAS per sample vs a direct loop nest (Numba).

    python bench/bench_conv.py                # table, BLAS on 1 thread
    python bench/bench_conv.py --json
    python bench/bench_conv.py --threads 2 --batch 32

For each convolution of LeNet-5 on 28x28 inputs (batch 64: 1->6 5x5 on 28x28 and 6->16 5x5
on 12x12; stride 1, no padding) it times the forward pass and both backward computations
(dx: the gradient for the input, dW: for the weights), each implemented as

  im2col          what dlc generates: the kernel templates of compiler/ops_nn.py (conv2d,
                  conv2d_grad_x, conv2d_grad_w) with their @njit helpers _im2col/_col2im,
                  formatted for these shapes as the code generator does: per sample, im2col
                  then one np.dot (BLAS sgemm); for dx np.dot then col2im; for dW np.dot then
                  `acc += part`;
  direct-axpy     the textbook serial loop nest: per weight tap, out_row += w * input_row
                  (innermost loop along a contiguous row);
  direct-gather   each output value sums its K*K window (taps innermost, unrolled by LLVM,
                  vectorized along the row); dx as the correlation of a zero-padded dy with
                  the flipped kernel; dW with one accumulator per tap;
  direct-chanvec  innermost loop across channels (channels-last copies of weights and
                  accumulators), vectorized over the 6 or 16 channels;
  im2col-batch    (reference) im2col of the whole batch into one [C*K*K, N*HO*WO] matrix and
                  a single GEMM per pass, to tell the per-sample overhead of `im2col`.

All are serial @njit code with dlc's fastmath flags; the direct ones are plain Python loop
nests, no intrinsics. "best direct" is the fastest of the three direct loop orders for each
pass separately.

Kernels are compiled first and timed from compiled code (a @njit loop calling the kernel),
so no Python or dispatch overhead is counted; the figure is the median of `--repeats`
repeats. Each result is checked against dlc's NumPy references of the ops. BLAS runs on
`--threads` threads (default 1: all three variants serial).

The bias add and ReLU that dlc fuses into its conv2d kernel are not part of these figures.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")

# (name, C, H, W, O, K): LeNet-5 on 1x28x28 inputs
LAYERS = [("conv1 1->6 5x5 on 28x28", 1, 28, 28, 6, 5), ("conv2 6->16 5x5 on 12x12", 6, 12, 12, 16, 5)]
FASTMATH = "{'nsz', 'arcp', 'contract', 'afn', 'reassoc'}"
DECO = f"@njit(fastmath={FASTMATH}, error_model='numpy')"


def dlc_source(N, C, H, W, O, K, blas_only=False):
    """dlc's own conv kernels for this shape: the op templates, formatted like codegen does
    (blas_only: without their im2col/col2im calls, to time the rest: BLAS and accumulation)."""
    from compiler.ops_nn import CONV_HELPERS, conv2d, conv2d_grad_w, conv2d_grad_x
    HO, WO = H - K + 1, W - K + 1
    sizes = dict(N=N, C=C, H=H, W=W, O=O, KH=K, KW=K, HO=HO, WO=WO, SH=1, SW=1, PH=0, PW=0, DH=1, DW=1,
                 CKK=C * K * K, P=HO * WO, T="np.float32")
    parts = ["import numpy as np", "from numba import njit", f"FASTMATH = {FASTMATH}",
             CONV_HELPERS.replace("cache=True, ", "")]
    for fname, op, x0, x1 in (("fwd", conv2d, "x", "w"), ("grad_x", conv2d_grad_x, "dy", "w"),
                              ("grad_w", conv2d_grad_w, "x", "dy")):
        # the template follows the geometry; blas_only takes the form that calls the helpers
        # (padded), formatted unpadded, and drops those calls
        body = op.kernel(dict(sizes, PH=1) if blas_only else sizes).format(out="out", x0=x0, x1=x1, **sizes)
        if blas_only:
            body = "\n".join(ln for ln in body.split("\n") if "_im2col(" not in ln and "_col2im(" not in ln)
        parts.append(f"{DECO}\ndef {fname}({x0}, {x1}, out):\n" + "".join(f"    {ln}\n" for ln in body.rstrip().split("\n")))
    return "\n\n".join(parts)


def direct_source(N, C, H, W, O, K):
    """Direct loop nests, "axpy" order: for each weight tap, add w * (a shifted input row) into
    the output row; the innermost loop runs along a contiguous row (sizes as literals)."""
    HO, WO = H - K + 1, W - K + 1
    return f"""
import numpy as np
from numba import njit


{DECO}
def fwd(x, w, out):
    for n in range({N}):
        for o in range({O}):
            for oh in range({HO}):
                for ow in range({WO}):
                    out[n, o, oh, ow] = 0
            for c in range({C}):
                for kh in range({K}):
                    for kw in range({K}):
                        wv = w[o, c, kh, kw]
                        for oh in range({HO}):
                            for ow in range({WO}):
                                out[n, o, oh, ow] += wv * x[n, c, oh + kh, ow + kw]


{DECO}
def grad_x(dy, w, out):
    out.reshape(-1)[:] = 0
    for n in range({N}):
        for o in range({O}):
            for c in range({C}):
                for kh in range({K}):
                    for kw in range({K}):
                        wv = w[o, c, kh, kw]
                        for oh in range({HO}):
                            for ow in range({WO}):
                                out[n, c, oh + kh, ow + kw] += wv * dy[n, o, oh, ow]


{DECO}
def grad_w(x, dy, out):
    out.reshape(-1)[:] = 0
    for n in range({N}):
        for o in range({O}):
            for c in range({C}):
                for kh in range({K}):
                    for kw in range({K}):
                        s = np.float32(0)
                        for oh in range({HO}):
                            for ow in range({WO}):
                                s += dy[n, o, oh, ow] * x[n, c, oh + kh, ow + kw]
                        out[o, c, kh, kw] += s
"""


def gather_source(N, C, H, W, O, K):
    """Direct loop nests, "gather" order: each output value sums its window (the K*K taps
    innermost, sizes as literals, so LLVM unrolls them and vectorizes along the row); dx as
    the same correlation of a zero-padded dy with the flipped kernel; dW with one accumulator
    per tap (unrolled) over all output positions."""
    HO, WO = H - K + 1, W - K + 1
    taps = [(kh, kw) for kh in range(K) for kw in range(K)]
    init = "\n".join(f"            s{kh}_{kw} = np.float32(0)" for kh, kw in taps)
    upd = "\n".join(f"                        s{kh}_{kw} += d * x[n, c, oh + {kh}, ow + {kw}]" for kh, kw in taps)
    fin = "\n".join(f"            out[o, c, {kh}, {kw}] = s{kh}_{kw}" for kh, kw in taps)
    P = K - 1
    return f"""
import numpy as np
from numba import njit


{DECO}
def fwd(x, w, out):
    for n in range({N}):
        for o in range({O}):
            for c in range({C}):
                for oh in range({HO}):
                    for ow in range({WO}):
                        s = np.float32(0)
                        for kh in range({K}):
                            for kw in range({K}):
                                s += w[o, c, kh, kw] * x[n, c, oh + kh, ow + kw]
                        if c == 0:
                            out[n, o, oh, ow] = s
                        else:
                            out[n, o, oh, ow] += s


{DECO}
def grad_x(dy, w, out):
    dyp = np.zeros(({O}, {HO + 2 * P}, {WO + 2 * P}), np.float32)
    for n in range({N}):
        for o in range({O}):
            for i in range({HO}):
                for j in range({WO}):
                    dyp[o, i + {P}, j + {P}] = dy[n, o, i, j]
        for c in range({C}):
            for o in range({O}):
                for ih in range({H}):
                    for iw in range({W}):
                        s = np.float32(0)
                        for kh in range({K}):
                            for kw in range({K}):
                                s += w[o, c, kh, kw] * dyp[o, ih - kh + {P}, iw - kw + {P}]
                        if o == 0:
                            out[n, c, ih, iw] = s
                        else:
                            out[n, c, ih, iw] += s


{DECO}
def grad_w(x, dy, out):
    for o in range({O}):
        for c in range({C}):
{init}
            for n in range({N}):
                for oh in range({HO}):
                    for ow in range({WO}):
                        d = dy[n, o, oh, ow]
{upd}
{fin}
"""


def chanvec_source(N, C, H, W, O, K):
    """Direct loop nests vectorized across channels: the innermost loop runs over output
    channels (fwd, dW) or input channels (dx) of a channels-last copy of the weights and a
    channels-last accumulator; sizes read from the arrays at run time (with literal sizes
    LLVM unrolls the short channel loop into scalar code instead of vectorizing it)."""
    return f"""
import numpy as np
from numba import njit


{DECO}
def fwd(x, w, out):
    N, C, H, W = x.shape
    O, _, K, _ = w.shape
    HO, WO = out.shape[2], out.shape[3]
    wt = np.empty((C, K, K, O), np.float32)
    for o in range(O):
        for c in range(C):
            for kh in range(K):
                for kw in range(K):
                    wt[c, kh, kw, o] = w[o, c, kh, kw]
    acc = np.empty((HO, WO, O), np.float32)
    for n in range(N):
        acc[:] = 0
        for c in range(C):
            for kh in range(K):
                for kw in range(K):
                    wr = wt[c, kh, kw]
                    for oh in range(HO):
                        for ow in range(WO):
                            xv = x[n, c, oh + kh, ow + kw]
                            a = acc[oh, ow]
                            for o in range(O):
                                a[o] += wr[o] * xv
        for o in range(O):
            for oh in range(HO):
                for ow in range(WO):
                    out[n, o, oh, ow] = acc[oh, ow, o]


{DECO}
def grad_x(dy, w, out):
    N, O, HO, WO = dy.shape
    _, C, K, _ = w.shape
    H, W = out.shape[2], out.shape[3]
    wt = np.empty((O, K, K, C), np.float32)
    for o in range(O):
        for c in range(C):
            for kh in range(K):
                for kw in range(K):
                    wt[o, kh, kw, c] = w[o, c, kh, kw]
    acc = np.empty((H, W, C), np.float32)
    for n in range(N):
        acc[:] = 0
        for o in range(O):
            for kh in range(K):
                for kw in range(K):
                    wr = wt[o, kh, kw]
                    for oh in range(HO):
                        for ow in range(WO):
                            d = dy[n, o, oh, ow]
                            a = acc[oh + kh, ow + kw]
                            for c in range(C):
                                a[c] += wr[c] * d
        for c in range(C):
            for ih in range(H):
                for iw in range(W):
                    out[n, c, ih, iw] = acc[ih, iw, c]


{DECO}
def grad_w(x, dy, out):
    N, C, H, W = x.shape
    _, O, HO, WO = dy.shape
    K = out.shape[2]
    dyt = np.empty((HO, WO, O), np.float32)
    acc = np.zeros((C, K, K, O), np.float32)
    for n in range(N):
        for o in range(O):
            for oh in range(HO):
                for ow in range(WO):
                    dyt[oh, ow, o] = dy[n, o, oh, ow]
        for c in range(C):
            for kh in range(K):
                for kw in range(K):
                    a = acc[c, kh, kw]
                    for oh in range(HO):
                        for ow in range(WO):
                            xv = x[n, c, oh + kh, ow + kw]
                            d = dyt[oh, ow]
                            for o in range(O):
                                a[o] += d[o] * xv
    for o in range(O):
        for c in range(C):
            for kh in range(K):
                for kw in range(K):
                    out[o, c, kh, kw] = acc[c, kh, kw, o]
"""


def batched_source(N, C, H, W, O, K):
    """im2col of the whole batch, one GEMM (reference variant)."""
    HO, WO = H - K + 1, W - K + 1
    P, CKK = HO * WO, C * K * K
    return f'''
import numpy as np
from numba import njit


{DECO}
def im2col_b(x, cols):
    for n in range({N}):
        for c in range({C}):
            for kh in range({K}):
                for kw in range({K}):
                    r = (c * {K} + kh) * {K} + kw
                    for oh in range({HO}):
                        for ow in range({WO}):
                            cols[r, n * {P} + oh * {WO} + ow] = x[n, c, oh + kh, ow + kw]


{DECO}
def fwd(x, w, out):
    cols = np.empty(({CKK}, {N * P}), np.float32)
    res = np.empty(({O}, {N * P}), np.float32)
    im2col_b(x, cols)
    np.dot(w.reshape(({O}, {CKK})), cols, res)
    for n in range({N}):
        for o in range({O}):
            for p in range({P}):
                out[n, o, p // {WO}, p % {WO}] = res[o, n * {P} + p]


{DECO}
def _dy2(dy, d2):
    for n in range({N}):
        for o in range({O}):
            for p in range({P}):
                d2[o, n * {P} + p] = dy[n, o, p // {WO}, p % {WO}]


{DECO}
def grad_x(dy, w, out):
    d2 = np.empty(({O}, {N * P}), np.float32)
    _dy2(dy, d2)
    cols = np.empty(({CKK}, {N * P}), np.float32)
    np.dot(w.reshape(({O}, {CKK})).T, d2, cols)
    out.reshape(-1)[:] = 0
    for n in range({N}):
        for c in range({C}):
            for kh in range({K}):
                for kw in range({K}):
                    r = (c * {K} + kh) * {K} + kw
                    for oh in range({HO}):
                        for ow in range({WO}):
                            out[n, c, oh + kh, ow + kw] += cols[r, n * {P} + oh * {WO} + ow]


{DECO}
def grad_w(x, dy, out):
    d2 = np.empty(({O}, {N * P}), np.float32)
    _dy2(dy, d2)
    cols = np.empty(({CKK}, {N * P}), np.float32)
    im2col_b(x, cols)
    np.dot(d2, cols.T, out.reshape(({O}, {CKK})))
'''


def load(source: str, name: str) -> dict:
    g = {"__name__": name}
    exec(compile(source, f"<{name}>", "exec"), g)
    return g


def time_kernel(fn, args, repeats: int, budget: float) -> float:
    """Median seconds per call, from a compiled loop."""
    from numba import njit
    src = "def loop(n, a, b, c):\n    for _ in range(n):\n        fn(a, b, c)\n    return 0\n"
    g = {"fn": fn}
    exec(src, g)
    loop = njit(g["loop"])
    loop(1, *args)
    t0 = time.perf_counter()
    loop(1, *args)
    est = max(time.perf_counter() - t0, 1e-7)
    inner = max(3, min(2000, int(budget / (repeats * est))))
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loop(inner, *args)
        per.append((time.perf_counter() - t0) / inner)
    return statistics.median(per)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads (default 1: serial)")
    ap.add_argument("--repeats", type=int, default=7, help="timed repeats; the median is reported (default 7)")
    ap.add_argument("--seconds", type=float, default=1.0, help="time per figure, about (default 1)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    a = ap.parse_args(argv)
    for v in THREAD_VARS:
        os.environ[v] = str(a.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import numpy as np
    from threadpoolctl import threadpool_info, threadpool_limits

    import compiler.ops  # noqa: F401  (the op registry first: ops_nn alone is a circular import)
    from compiler.ops_nn import _conv_grad_w_ref, _conv_grad_x_ref, _conv_ref
    limiter = threadpool_limits(a.threads)
    rng = np.random.default_rng(0)
    N = a.batch
    out = {"batch": N, "threads": a.threads, "cores": os.cpu_count(),
           "thread_pools": [{"lib": Path(i["filepath"]).name, "threads": i["num_threads"]} for i in threadpool_info()],
           "layers": []}
    t_start = time.perf_counter()
    busy0 = _cpu_busy()
    variants = (("im2col", dlc_source), ("direct-axpy", direct_source), ("direct-gather", gather_source),
                ("direct-chanvec", chanvec_source), ("im2col-batch", batched_source))
    for name, C, H, W, O, K in LAYERS:
        HO, WO = H - K + 1, W - K + 1
        x = rng.standard_normal((N, C, H, W)).astype(np.float32)
        w = rng.standard_normal((O, C, K, K)).astype(np.float32)
        dy = rng.standard_normal((N, O, HO, WO)).astype(np.float32)
        ref = {"fwd": _conv_ref(x, w), "grad_x": _conv_grad_x_ref(dy, w, x_shape=x.shape),
               "grad_w": _conv_grad_w_ref(x, dy, w_shape=w.shape)}
        args = {"fwd": (x, w), "grad_x": (dy, w), "grad_w": (x, dy)}
        row = {"layer": name, "shape": {"N": N, "C": C, "H": H, "W": W, "O": O, "K": K},
               "gflop": {k: 2 * N * O * C * K * K * HO * WO / 1e9 for k in ref}, "us": {}, "max_rel_err": {}}
        for vname, src in variants:
            mod = load(src(N, C, H, W, O, K), f"conv_{vname}")
            row["us"][vname], row["max_rel_err"][vname] = {}, {}
            for comp in ("fwd", "grad_x", "grad_w"):
                res = np.empty(ref[comp].shape, np.float32)
                fn = mod[comp]
                fn(*args[comp], res)
                err = float(np.abs(res - ref[comp]).max() / max(np.abs(ref[comp]).max(), 1e-30))
                if err > 1e-4:
                    raise SystemExit(f"{vname} {comp} on {name}: relative error {err:.2e}")
                row["max_rel_err"][vname][comp] = err
                row["us"][vname][comp] = 1e6 * time_kernel(fn, (*args[comp], res), a.repeats, a.seconds)
        mod = load(dlc_source(N, C, H, W, O, K, blas_only=True), "conv_blas_only")
        row["im2col_blas_only_us"] = {}
        for comp in ("fwd", "grad_x", "grad_w"):
            res = np.empty(ref[comp].shape, np.float32)
            row["im2col_blas_only_us"][comp] = 1e6 * time_kernel(mod[comp], (*args[comp], res), a.repeats, a.seconds / 2)
        out["layers"].append(row)
    wall = time.perf_counter() - t_start
    busy1 = _cpu_busy()
    if busy0 is not None:
        own = time.process_time()
        out["others"] = round(max((busy1 - busy0) - own, 0.0) / wall, 2)  # rough: own CPU over the whole run
    del limiter
    if a.json:
        print(json.dumps(out))
    else:
        report(out)
    return 0


def _cpu_busy():
    try:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    return (sum(vals[:8]) - vals[3] - vals[4]) / os.sysconf("SC_CLK_TCK")


# dx of the first layer is not needed in training (its input is data): dlc does not compute it
USED = {0: ("fwd", "grad_w"), 1: ("fwd", "grad_x", "grad_w")}


def report(out):
    print(f"conv2d on LeNet-5 layer shapes, batch {out['batch']}, float32, BLAS threads {out['threads']} "
          f"({out['cores']} cores" + (f"; other processes kept {out['others']:.2f} cores busy" if "others" in out else "")
          + ")")
    print("us per call, timed from compiled code (median of the repeats); GFLOP/s in brackets\n")
    vs = list(out["layers"][0]["us"])
    direct = [v for v in vs if v.startswith("direct")]
    hdr = (f"{'layer':<26} {'pass':<7} " + " ".join(f"{v:>16}" for v in vs)
           + f" {'best direct':>13} {'best/im2col':>12}")
    print(hdr)
    print("-" * len(hdr))
    totals = {v: 0.0 for v in vs + ["best direct"]}
    per_layer = []
    for li, r in enumerate(out["layers"]):
        lt = {v: 0.0 for v in vs + ["best direct"]}
        for comp in ("fwd", "grad_x", "grad_w"):
            cells = []
            for v in vs:
                us = r["us"][v][comp]
                cells.append(f"{us:>8.0f} ({r['gflop'][comp] * 1e6 / us:4.1f})")
            best = min(direct, key=lambda v: r["us"][v][comp])
            bus = r["us"][best][comp]
            if comp in USED[li]:
                for v in vs:
                    lt[v] += r["us"][v][comp]
                lt["best direct"] += bus
            label = {"fwd": "fwd", "grad_x": "dx", "grad_w": "dW"}[comp] + ("" if comp in USED[li] else "*")
            print(f"{r['layer'] if comp == 'fwd' else '':<26} {label:<7} " + " ".join(f"{c:>16}" for c in cells)
                  + f" {bus:>8.0f} {best.split('-')[1]:<4} {bus / r['us']['im2col'][comp]:>12.2f}")
        per_layer.append(lt)
        for k in totals:
            totals[k] += lt[k]
    print("-" * len(hdr))
    print(f"{'a LeNet step (used passes)':<34} " + " ".join(f"{totals[v]:>16.0f}" for v in vs)
          + f" {totals['best direct']:>8.0f}      {totals['best direct'] / totals['im2col']:>12.2f}")
    print("(* conv1's dx is not needed in training, its input being data: dlc does not compute it, and it\n"
          " is left out of the sums)\n")
    for li, r in enumerate(out["layers"]):
        lt = per_layer[li]
        a, d = lt["im2col"], lt["best direct"]
        bv = min(direct, key=lambda v: lt[v])
        print(f"{r['layer']}: {'direct' if d < a else 'im2col'} is faster: im2col {a:.0f} us, best direct "
              f"loop order per pass {d:.0f} us ({a / d:.2f}x), best single direct variant {bv} {lt[bv]:.0f} us")
    print("dlc's im2col kernels without their im2col/col2im calls (the BLAS calls, dW's `acc += part`):")
    for li, r in enumerate(out["layers"]):
        print(f"  {r['layer']:<26} " + ", ".join(
            f"{ {'fwd': 'fwd', 'grad_x': 'dx', 'grad_w': 'dW'}[c]} {r['im2col_blas_only_us'][c]:.0f} of {r['us']['im2col'][c]:.0f} us"
            for c in ("fwd", "grad_x", "grad_w")))
    a, d = totals["im2col"], totals["best direct"]
    hybrid = sum(min(r["us"]["im2col"][c], min(r["us"][v][c] for v in direct))
                 for li, r in enumerate(out["layers"]) for c in USED[li])
    print(f"the faster of im2col and the best direct loop for each pass: {hybrid:.0f} us a step "
          f"({a - hybrid:.0f} us less than im2col throughout)")
    print(f"overall (the five passes of a LeNet step): im2col {a:.0f} us, best direct per pass {d:.0f} us "
          f"({a / d:.2f}x); im2col of the whole batch, one GEMM: {totals['im2col-batch']:.0f} us")
    print("thread pools: " + ", ".join(f"{p['lib'].split('-')[0]}={p['threads']}" for p in out["thread_pools"]))


if __name__ == "__main__":
    sys.exit(main())
