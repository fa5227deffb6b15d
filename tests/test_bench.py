"""bench/bench_all.py end to end on the MLP (a smoke test: its figures are not checked)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_all_quick_runs_dlc_on_the_mlp():
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_all.py"), "--quick", "--frameworks", "dlc",
                        "--threads", "1", "--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["frameworks"] == ["dlc"] and out["sgemm_gflops"]["1"] > 0
    (w,) = out["workloads"]
    assert w["workload"] == "mlp"
    (row,) = w["rows"]
    assert row["framework"] == "dlc" and row["threads"] == 1 and row["median_ms"] > 0 and row["max_rss_mb"] > 0
