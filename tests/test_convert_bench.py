"""benchmarks/bench_convert.py --smoke runs end to end (timings are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_convert_smoke():
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_convert.py"), "--smoke"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "| convert --workers 2 --verify sample |" in r.stdout and "| read (gunzip + unpickle), 1 process |" in r.stdout
