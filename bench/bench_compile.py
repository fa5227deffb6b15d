"""Compile time of every example and of a Transformer depth sweep, cold and warm.

    python bench/bench_compile.py                      # every example + 1, 2, 4, 8, 12 blocks
    python bench/bench_compile.py --blocks 1,12 --no-examples
    python bench/bench_compile.py --json               # one JSON object instead of the table

Each figure is one fresh process building a `Session` (both programs: the training step and
the evaluation program) for the `.dl` file: *cold* with an empty kernel cache (`DLC_CACHE_DIR`
pointing at a new directory), then *warm* with the cache that run filled. The split is the
one `dlc run --json` reports under `compile`: front end (parse and lower, without loading the
data), passes, code generation (memory plan, source, writing and importing the modules) and
Numba (compiling or loading the kernels) of the training steps, which is what a run waits
for before its first step (*cold* and *warm* are their sum). A cold run compiles the
evaluation program in a forked process beside training (`eval-bg`: that compile's wall time,
in seconds; a run waits for whatever is left of it at its first evaluation, which `dlc run
--json` reports as `eval_wait`). `kernels` counts kernel calls in both programs, `distinct`
the kernels compiled once each, `w-jit` the functions Numba compiled in the warm run (0: it
only loads them from its cache).

The depth sweep is a Transformer-style encoder on the `tagging` task: token embedding, then N
blocks of multi-head self-attention built from primitives (dense projections, reshape and
transpose into 4 heads, `q @ k * 0.25`, softmax, `a @ v`) and a ReLU MLP, each with a
residual connection and layer norm; d = 64, 4 heads, sequence 12, batch 32, Adam.

The machine is shared: the load average (`os.getloadavg`) is printed beside each row.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BLOCK = """\
def attention(x: [N, T, D], heads: int, dh: int) {
    q = transpose(reshape(dense(x, D), [-1, T, heads, dh]), perm = [0, 2, 1, 3])
    k = transpose(reshape(dense(x, D), [-1, T, heads, dh]), perm = [0, 2, 3, 1])
    v = transpose(reshape(dense(x, D), [-1, T, heads, dh]), perm = [0, 2, 1, 3])
    a = softmax((q @ k) * 0.25)
    o = transpose(a @ v, perm = [0, 2, 1, 3])
    return dense(reshape(o, [-1, T, D]), D)
}

def block(x: [N, T, D]) {
    h = layer_norm(x + attention(x, 4, 16))
    return layer_norm(h + dense(relu(dense(h, 2 * D)), D))
}
"""


def transformer(blocks: int) -> str:
    """The `.dl` source of a `blocks`-deep Transformer-style tagger."""
    body = "".join("    h = block(h)\n" for _ in range(blocks))
    return f"""# A Transformer-style encoder of {blocks} block(s) (bench/bench_compile.py).
{BLOCK}
model tx(x: i32[B, 12]) -> f32[B, 12, 2] {{
    h = embedding(x, 11, 64)
{body}    return dense(h, 2)
}}

train tx on tagging(n = 4000, length = 12, vocab = 10) {{
    loss      = cross_entropy(tx(x), y)
    optimizer = adam(lr = 1e-3)
    batch     = 32
    epochs    = 1
    seed      = 0
}}
"""


def worker(path: str) -> None:
    t0 = time.perf_counter()
    from runtime.session import Options, Session
    t1 = time.perf_counter()
    s = Session(path, Options(eval_beside=True))     # as `dlc run` builds it
    rep = s.compile_report()          # the training steps: what a run waits for before its first step
    rep.update({"import_seconds": round(t1 - t0, 3), "session_seconds": round(s.compile_seconds, 3),
                "cache_hit": s.cache_hit, "compiled_step": s.train_ex.compiled_step})
    s.eval_ready()                    # the evaluation program, compiled beside training: its wall time,
    bg = s.compile_report()           # and the wait had the run evaluated at once (no training step)
    rep.update({"eval_background": bg.get("eval_background") or 0.0, "eval_wait_at_once": bg.get("eval_wait") or 0.0})
    print(json.dumps(rep))


def measure(path: Path, cache: str, timeout: float) -> dict:
    env = {**os.environ, "DLC_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--worker", str(path)], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise SystemExit(f"{path}: worker failed\n{p.stderr[-3000:]}")
    rep = json.loads(p.stdout.strip().splitlines()[-1])
    rep["compile"] = round(rep["front_end"] + rep["passes"] + rep["codegen"] + rep["numba"], 3)
    rep["process_seconds"] = round(time.perf_counter() - t0, 3)
    rep["load"] = round(load, 2)
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--blocks", default="1,2,4,8,12", help="depth sweep (comma-separated; empty: none)")
    ap.add_argument("--no-examples", action="store_true", help="skip examples/*.dl")
    ap.add_argument("--only", default="", help="only examples whose name contains this")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per process")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker)
    models: list[tuple[str, Path]] = []
    if not a.no_examples:
        models += [(p.stem, p) for p in sorted((ROOT / "examples").glob("*.dl")) if a.only in p.stem]
    tmp = Path(tempfile.mkdtemp(prefix="dlc_bench_compile_"))
    for b in [int(x) for x in a.blocks.split(",") if x.strip()]:
        path = tmp / f"transformer_{b}.dl"
        path.write_text(transformer(b))
        models.append((f"transformer x{b}", path))
    rows = []
    if not a.json:
        print(f"{'model':<16} {'kernels':>7} {'distinct':>8} {'front':>6} {'passes':>6} {'codegen':>7} "
              f"{'numba':>6} {'cold':>6} {'eval-bg':>7} {'warm':>6} {'w-jit':>5} {'step':>8}  load", flush=True)
    for name, path in models:
        cache = tempfile.mkdtemp(prefix="dlc_cache_", dir=tmp)
        cold = measure(path, cache, a.timeout)
        warm = measure(path, cache, a.timeout)
        rows.append({"model": name, "cold": cold, "warm": warm})
        if not a.json:
            print(f"{name:<16} {cold['kernels']:>7} {cold['distinct_kernels']:>8} {cold['front_end']:>6.2f} "
                  f"{cold['passes']:>6.2f} {cold['codegen']:>7.2f} {cold['numba']:>6.2f} {cold['compile']:>6.2f} "
                  f"{cold['eval_background']:>7.2f} {warm['compile']:>6.2f} {warm['numba_compiled']:>5} "
                  f"{'compiled' if cold['compiled_step'] else 'python':>8}  "
                  f"{cold['load']:.1f}/{warm['load']:.1f}", flush=True)
    if a.json:
        print(json.dumps({"rows": rows, "cpus": os.cpu_count()}))


if __name__ == "__main__":
    main()
