"""`python -m bench`: every workload against its peers (bench/bench_all.py)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_all import main  # noqa: E402

sys.exit(main())
