"""Characters per second of examples/gpt.dl's sampling programs, with the key/value cache
(`text`) and with a full recompute of the window per character (`text_full`).

    python bench/bench_sample.py [CHECKPOINT] [-n 300] [--repeat 3]

Without a checkpoint the model's parameters are random (the speed does not depend on them).
Compilation is excluded (one warm-up call first); the median of the repeats is reported, in
wall time and in process CPU time (the second is steadier on a shared machine).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPT = ROOT / "examples" / "gpt.dl"


def random_checkpoint(path: Path) -> None:
    from compiler.lower import Lowerer
    from dsl.parser import parse_file
    from runtime import checkpoint
    params = Lowerer(parse_file(GPT), "f32", training=False).lower_model("gpt").params
    rng = np.random.default_rng(0)
    checkpoint.save(path, {k: rng.normal(0, 0.3, p.shape).astype(np.float32) for k, p in params.items()}, {}, {})


def main() -> None:
    from runtime.sample import Sampler, generate_text
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("-n", type=int, default=300)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    ck = args.checkpoint
    if ck is None:
        ck = Path(tempfile.mkdtemp()) / "random.safetensors"
        random_checkpoint(ck)
    prompt = [1, 2, 3, 4]
    rows = {}
    for program in ("text", "text_full"):
        s = Sampler(GPT, program, options={"temperature": 0.8, "top_k": 10})
        s.load(ck)
        s(1, 0, prompt=np.array([prompt[:1]]))                     # compile or load the kernels
        wall, cpu, texts = [], [], []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), time.process_time()
            texts.append(generate_text(s, prompt, args.n, 64))
            wall.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)
        rows[program] = (args.n / statistics.median(wall), args.n / statistics.median(cpu), texts[0])
        print(f"{program:10s} {rows[program][0]:10.1f} chars/s (wall) {rows[program][1]:10.1f} chars/s (CPU)")
    print(f"cache speed-up: {rows['text'][0] / rows['text_full'][0]:.1f}x wall, "
          f"{rows['text'][1] / rows['text_full'][1]:.1f}x CPU; same characters: {rows['text'][2] == rows['text_full'][2]}")


if __name__ == "__main__":
    main()
