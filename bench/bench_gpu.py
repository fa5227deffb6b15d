"""Milliseconds per training step on a GPU: dlc's CUDA target beside PyTorch CUDA.

    python bench/bench_gpu.py                    # MLP, LeNet, LSTM, GPT: a table
    python bench/bench_gpu.py --only mlp,lenet --steps 200 --json

The workloads (their `.dl` files, batches and PyTorch twins) are those of bench_mlp.py,
bench_lenet.py, bench_lstm.py and bench_gpt.py. dlc runs `Session(..., target="cuda")`:
parameters and Adam state stay on the device, each step uploads its batch and reads back the
loss (which synchronizes); PyTorch runs the twin on `cuda` with `loss.item()` per step. A
figure is the median over `--repeats` runs of `--steps` steps after `--warmup` steps. The
ratio is dlc / PyTorch (the issue's goal: within 3x, with hand-written kernels against
cuBLAS/cuDNN).

Without a GPU (numba.cuda.is_available() false) it says so and exits 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

WORKLOADS = {"mlp": "bench_mlp", "lenet": "bench_lenet", "lstm": "bench_lstm", "gpt": "bench_gpt"}


def _median_ms(fn, steps: int, repeats: int, warmup: int) -> float:
    for i in range(warmup):
        fn(i)
    per = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(steps):
            fn(i)
        per.append((time.perf_counter() - t0) / steps * 1e3)
    return statistics.median(per)


def run(name: str, a) -> dict:
    import importlib

    import common
    import numpy as np
    mod = importlib.import_module(WORKLOADS[name])
    bench = mod.BENCH
    args = common.parser(bench).parse_args([])
    with tempfile.TemporaryDirectory() as tmp:
        model = bench.prepare(args, Path(tmp)) if getattr(bench, "prepare", None) else bench.default_model
        args.model = Path(model)
        prob = common.load_problem(args.model, a.batches)
        from runtime.session import Options, Session
        s = Session(args.model, Options(target="cuda"))
        batches = prob["batches"]
        dlc = _median_ms(lambda i: s.train_step(batches[i % len(batches)]), a.steps, a.repeats, a.warmup)
        row = {"workload": name, "shapes": bench.shapes, "dlc_ms": round(dlc, 4)}
        if common.have_torch():
            import torch
            torch.manual_seed(0)
            net = bench.torch_model(prob, args).cuda()
            opt = common.torch_optimizer(net.parameters(), prob["optimizer"])
            step = common.torch_step_fn(net, opt)
            tb = [(x.cuda(), y.cuda()) for x, y in common.torch_batches(prob)]
            ms = _median_ms(lambda i: step(*tb[i % len(tb)]), a.steps, a.repeats, a.warmup)
            row.update(torch_ms=round(ms, 4), ratio=round(dlc / ms, 2), torch=torch.__version__)
        row["final_loss_finite"] = bool(np.isfinite(s.loss_history[next(iter(s.loss_history))][-1]))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(WORKLOADS), help="comma-separated: " + ", ".join(WORKLOADS))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    try:
        from numba import cuda
        available = cuda.is_available()
    except Exception as e:          # numba-cuda missing
        print(f"bench_gpu: numba.cuda is not usable here ({e}); pip install '.[cuda]'", file=sys.stderr)
        return 0
    if not available:
        print("bench_gpu: no CUDA GPU here (numba.cuda.is_available() is false); nothing to measure",
              file=sys.stderr)
        return 0
    rows = []
    for name in a.only.split(","):
        rows.append(run(name.strip(), a))
        if not a.json:
            r = rows[-1]
            print(f"{r['workload']:<6} dlc {r['dlc_ms']:>9.3f} ms/step"
                  + (f"   torch {r['torch_ms']:>8.3f} ms/step   ratio {r['ratio']:>6.2f}" if "torch_ms" in r else ""),
                  flush=True)
    if a.json:
        print(json.dumps({"device": cuda.get_current_device().name.decode() if isinstance(
            cuda.get_current_device().name, bytes) else str(cuda.get_current_device().name), "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
