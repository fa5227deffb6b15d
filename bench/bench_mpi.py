"""Data-parallel scaling: `dlc run FILE` in one process against `mpiexec -n N dlc run FILE`.

    python bench/bench_mpi.py                            # mlp and cnn, 1 and 2 ranks, 3 epochs
    python bench/bench_mpi.py examples/mlp.dl --ranks 1,2,4 --epochs 5 --threads 1 --json

Each run is a fresh `dlc run --json` (kernels from the warm cache: a first untimed run fills
it) with the same global batch; the table shows the median ms per step, the median epoch
time, and, for the runs under mpiexec, how rank 0's steps split between the gradient program,
the allreduce (waiting for the slowest rank included) and the update. One BLAS thread per
rank by default (--threads), so that N ranks use N cores. Note the machine's load: ranks that
share a core with other work wait for each other in every allreduce.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(file: str, ranks: int, epochs: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "runtime.cli", "run", file, "--epochs", str(epochs), "--json", "--quiet",
           "--threads", str(threads)]
    if ranks > 1:
        mpiexec = Path(sys.executable).parent / "mpiexec"
        cmd = [str(mpiexec) if mpiexec.exists() else shutil.which("mpiexec"), "-n", str(ranks), *cmd]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OPENBLAS_NUM_THREADS": str(threads)}
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if r.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr}")
    return json.loads(r.stdout.splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", nargs="*", default=["examples/mlp.dl", "examples/cnn.dl"])
    ap.add_argument("--ranks", default="1,2", help="comma-separated rank counts (default 1,2)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="BLAS threads per rank (default 1)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for f in args.files:
        for n in map(int, args.ranks.split(",")):
            run(f, n, 0, args.threads)                  # compile (or load) the kernels, untimed
            rep = run(f, n, args.epochs, args.threads)
            d = rep.get("distributed", {})
            steps = rep["steps"] or 1
            rows.append({"file": f, "ranks": n, "step_ms": rep["step_ms"],
                         "epoch_s": statistics.median(h["seconds"] for h in rep["history"]),
                         "test": rep["test"].get("accuracy"),
                         **{k: round(1000 * d[f"{k}_seconds"] / steps, 3) for k in ("gradient", "allreduce", "update")
                            if f"{k}_seconds" in d}})
            print(f"{f} ranks={n}: {rows[-1]}", file=sys.stderr)
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = None
    if args.json:
        print(json.dumps({"rows": rows, "load": load, "cores": os.cpu_count()}))
        return
    print(f"| file | ranks | ms/step | epoch (s) | test accuracy | gradient / allreduce / update (ms/step, rank 0) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        split = " / ".join(str(r[k]) for k in ("gradient", "allreduce", "update")) if "allreduce" in r else ""
        print(f"| {r['file']} | {r['ranks']} | {r['step_ms']} | {r['epoch_s']:.3f} | {r['test']:.4f} | {split} |")
    print(f"\n{os.cpu_count()} cores, load average {load:.1f} at the end")


if __name__ == "__main__":
    main()
