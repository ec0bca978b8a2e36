"""`scripts/bench_sync.py` runs end to end (on the CPU here; the figures come from a GPU) and every path
of one (size, codec) ends with the same state hash on both peers and across paths."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_sync_paths_agree_bit_for_bit() -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts/bench_sync.py"), "--device", "cpu", "--sizes", "20000",
         "--codecs", "sparseloco", "--paths", "gpu,cpu", "--rounds", "2", "--warmup", "0", "--json"],
        capture_output=True, text=True, timeout=100, check=False, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout)
    assert [c["path"] for c in report["cases"]] == ["gpu", "cpu"]
    assert all(c["identical"] and c["sent_bytes"] > 0 and c["sync_s"] >= c["allreduce_s"] > 0
               for c in report["cases"])
    assert report["same_result_on_every_path"] == {"20000/sparseloco": True}
