import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.fixture
def dl_file(tmp_path):
    """Write `.dl` text to a file in a temporary directory and return its path."""
    def make(text: str, name: str = "model.dl") -> Path:
        p = tmp_path / name
        p.write_text(text)
        return p
    return make
