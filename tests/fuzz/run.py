"""Run the fuzzers at volume (on demand; the fast suite runs a few hundred cases):

    python tests/fuzz/run.py dl 10000          # .dl cases: accepted or one clean located error
    python tests/fuzz/run.py graphs 1000       # random graphs: fused == unfused == NumPy, gradients == FD
    python tests/fuzz/run.py graphs 1000 --start 5000

Prints counts; failing cases are written to fuzz-failures/ with their seed. A case that runs
longer than --timeout seconds is a hang and fails.
"""
from __future__ import annotations

import argparse
import collections
import signal
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


class Hang(BaseException):      # not an Exception: the CLI's error boundary must not catch it
    pass


def _alarm(signum, frame):
    raise Hang()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("which", choices=["dl", "graphs"])
    ap.add_argument("n", type=int)
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--timeout", type=int, default=60)
    ap.add_argument("--out", default="fuzz-failures")
    a = ap.parse_args()
    from tests.fuzz import dl, graphs
    out = Path(a.out)
    counts = collections.Counter()
    signal.signal(signal.SIGALRM, _alarm)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in range(a.start, a.start + a.n):
            signal.alarm(a.timeout)
            try:
                if a.which == "dl":
                    counts[dl.check_case(dl.case(seed), Path(tmp) / f"case{seed}.dl")] += 1
                else:
                    c = graphs.random_program(seed)
                    graphs.check_program(c)
                    counts["smooth (FD checked)" if c.smooth else "kinked"] += 1
            except Hang:
                counts["HANG"] += 1
                _record(out, a.which, seed, "hang")
            except BaseException as e:       # noqa: BLE001 - a fuzzer records everything
                if isinstance(e, KeyboardInterrupt):
                    raise
                counts["FAIL"] += 1
                _record(out, a.which, seed, traceback.format_exc())
            finally:
                signal.alarm(0)
            if (seed - a.start + 1) % 500 == 0:
                print(f"{seed - a.start + 1} cases, {dict(counts)}, {time.time() - t0:.0f}s", flush=True)
    print(f"{a.which}: {a.n} cases (seeds {a.start}..{a.start + a.n - 1}) in {time.time() - t0:.0f}s: {dict(counts)}")
    return 1 if counts["FAIL"] or counts["HANG"] else 0


def _record(out: Path, which: str, seed: int, text: str):
    out.mkdir(exist_ok=True)
    (out / f"{which}-{seed}.txt").write_text(text)


if __name__ == "__main__":
    sys.exit(main())
