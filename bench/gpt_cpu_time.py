"""CPU time per GPT training step, dlc beside PyTorch, one thread each, alternating.

    python bench/gpt_cpu_time.py --rounds 3
    python bench/gpt_cpu_time.py --rounds 3 --also /path/to/other/checkout   # a baseline dlc too

On a machine shared with other work, wall time per step measures the others as much as the
step (at a load average of 15 on 2 cores, a 16 ms step took 140 ms). The CPU time of a
one-thread process counts only its own work (cache misses caused by the neighbours still
count), so the ratio of two frameworks measured this way, alternating in fresh processes,
is a fair figure where bench_gpt.py's wall-clock table is not. Same workload and machinery
as bench_gpt.py (its workers, with the clock swapped for `time.process_time`).
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
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def worker(kind: str, model: str, steps: int) -> dict:
    import common
    import bench_gpt
    clock = types.SimpleNamespace(**{k: getattr(time, k) for k in dir(time) if not k.startswith("__")})
    clock.perf_counter = time.process_time          # time_steps reads common.time.perf_counter
    common.time = clock
    a = argparse.Namespace(model=Path(model), batches=8, threads=1, steps=steps, repeats=5, warmup=5,
                           max_seconds=None, forward=False, profile=False, torch_adam="default")
    r = common.worker_dlc(a) if kind == "dlc" else common.worker_torch(a, bench_gpt.BENCH)
    return {"median_ms": r["median_ms"], "min_ms": r["min_ms"], "max_ms": r["max_ms"]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of (dlc, PyTorch[, baseline]) (default 3)")
    ap.add_argument("--steps", type=int, default=30, help="steps per timed repeat (default 30)")
    ap.add_argument("--also", type=Path, help="another dlc checkout to time alongside (a baseline)")
    ap.add_argument("--_worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a._worker:
        print(json.dumps(worker(a._worker[0], a._worker[1], int(a._worker[2]))))
        return 0
    import bench_gpt
    env = dict(os.environ, **{v: "1" for v in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                                                 "NUMBA_NUM_THREADS")})
    runs = [("dlc", HERE.parent), ("torch", HERE.parent)] + ([("dlc", a.also.resolve())] if a.also else [])
    times: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="dlc-bench-") as tmp:
        model = bench_gpt.prepare(argparse.Namespace(model=bench_gpt.ROOT / "examples" / "gpt.dl", data_seed=0,
                                                     characters=20000), Path(tmp))
        load0 = os.getloadavg()[0]
        for _ in range(a.rounds):
            for kind, root in runs:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--_worker", kind, str(model), str(a.steps)]
                p = subprocess.run(cmd, env=dict(env, PYTHONPATH=str(root)), cwd=root, capture_output=True,
                                   text=True, check=True)
                label = kind if root == HERE.parent else f"{kind} ({root})"
                times.setdefault(label, []).append(json.loads(p.stdout.strip().splitlines()[-1])["median_ms"])
                print(f"{label:<40} {times[label][-1]:8.2f} ms CPU/step", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"GPT training step, CPU time per step, 1 thread, median of {a.rounds} alternating rounds "
          f"(load average {load0:.1f} -> {os.getloadavg()[0]:.1f}):")
    for k, v in med.items():
        print(f"  {k:<40} {v:8.2f} ms   rounds: {', '.join(f'{x:.2f}' for x in times[k])}")
    print(f"  dlc / torch = {med['dlc'] / med['torch']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
